"""kill -9 in the middle of training, resume, and end with the weights of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimlm.recover.checkpoint import latest_checkpoint

SCRIPT = Path(__file__).with_name("train_script.py")


def _env() -> dict:
    return {**os.environ, "SLIMLM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _start(out: Path, sleep: float) -> subprocess.Popen:
    command = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--steps",
        "12",
        "--checkpoint-every",
        "3",
        "--sleep",
        str(sleep),
        "--grad-accum",
        "2",
        "--on-policy",
        "0.3",
    ]
    return subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model" / "model.safetensors")


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    uninterrupted = _start(reference, 0.0)
    victim = _start(interrupted, 0.4)  # slow enough to be killed between checkpoints
    deadline = time.monotonic() + 90
    while latest_checkpoint(interrupted / "train" / "checkpoints") is None:
        assert victim.poll() is None, "the run ended before writing a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere after the checkpoint, before the end
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (interrupted / "model").exists()
    _finish(uninterrupted)

    resumed = _start(interrupted, 0.0)
    _finish(resumed)
    log = json.loads((interrupted / "rank0.json").read_text())
    assert log["resumed_from"] is not None and log["resumed_from"] >= 3
    assert log["seen"][0]["step"] == log["resumed_from"] + 1 and log["steps"] == 12
    expected, got = _weights(reference), _weights(interrupted)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-6, rtol=0), name
    steps = [r["step"] for r in map(json.loads, (interrupted / "train" / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 13))  # the killed run's steps after its checkpoint were not kept twice
