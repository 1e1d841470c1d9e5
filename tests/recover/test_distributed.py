"""Two processes of DDP on the CPU (gloo) through ``accelerate launch``, and the documented accelerate configs.

accelerate 1.15's ``launch --cpu`` starts a single process unless an MPI hostfile is given (its simple launcher);
a MULTI_GPU config (docs/accelerate/ddp_cpu.yaml) goes through torchrun, and on a machine without a GPU (or with
ACCELERATE_USE_CPU) the trainer's processes form a MULTI_CPU group over gloo.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).with_name("train_script.py")
CONFIGS = Path(__file__).parents[2] / "docs" / "accelerate"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_trains_on_both_ranks_and_rank0_saves(tmp_path):
    out = tmp_path / "ddp"
    env = {
        **os.environ,
        "SLIMLM_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "ACCELERATE_USE_CPU": "true",
        "CUDA_VISIBLE_DEVICES": "",
    }
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [
        str(accelerate),
        "launch",
        "--config_file",
        str(CONFIGS / "ddp_cpu.yaml"),
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(SCRIPT),
        "--out",
        str(out),
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--on-policy",
        "0.5",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    logs = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [log["world"] for log in logs] == [2, 2]
    for log in logs:
        assert log["steps"] == 4 and len(log["seen"]) == 4
        assert all(math.isfinite(entry["loss"]) for entry in log["seen"])
    assert logs[0]["seen"] == logs[1]["seen"]  # losses are averaged over the ranks: both log the same numbers
    checkpoint = out / "train" / "checkpoints" / "step-00000002"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 1


def test_documented_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {
        name: load_config_from_file(str(CONFIGS / f"{name}.yaml")).distributed_type
        for name in ("fsdp", "deepspeed_zero3", "ddp_cpu")
    }
    assert kinds == {"fsdp": "FSDP", "deepspeed_zero3": "DEEPSPEED", "ddp_cpu": "MULTI_GPU"}
