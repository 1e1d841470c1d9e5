"""Distillation under FSDP2 on two CPU processes (gloo), beside the same run under DDP, through ``accelerate launch``.

Both runs (fsdp_worker.py train) start from the same seeds and read the same windows for 6 optimizer steps of 2
micro-batches, with a checkpoint at step 3 and one pruned Linear whose zeros must stay. Then the pipeline: a recipe
with distill and lora stages under ``accelerate launch`` with FSDP2, where only rank 0 may write the output folder.

Tolerance between DDP and FSDP2 losses: the forward pass sees the same weights and data, so step 1 agrees exactly.
Afterwards the runs differ only in how gradients are reduced: DDP all-reduces whole gradients, FSDP2 reduce-scatters
shards, and the clipping norm is one sum of squares under DDP but per-shard sums all-reduced under FSDP2. With two
ranks the mean of two gradients is exact either way (one addition, a division by 2), but the norm's summation order
moves the clip coefficient by a few float32 ulps (eps 1.2e-7), and AdamW carries that into each later update. A
relative tolerance of 1e-5 (about 100 ulps) bounds that over 6 steps while any real difference (another batch,
an unsynchronised gradient, a lost update) moves the loss by 1e-3 or more. Measured here: the two runs agree exactly.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama, build_tokenizer, write_documents
from slimlm.models import load_model, save_model

WORKER = Path(__file__).with_name("fsdp_worker.py")
CONFIGS = Path(__file__).parents[2] / "docs" / "accelerate"
LOSS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(config: str, *args: str, hf_home: Path) -> None:
    """Two processes of the worker under `accelerate launch` with docs/accelerate/<config>.yaml, on the CPU."""
    env = {
        **os.environ,
        "SLIMLM_NO_PROGRESS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(hf_home),
        "ACCELERATE_USE_CPU": "true",
        "CUDA_VISIBLE_DEVICES": "",
    }
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(CONFIGS / f"{config}.yaml"), "--dynamo_backend", "no"]
    command += ["--main_process_port", str(_free_port()), str(WORKER), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same distillation under DDP and under FSDP2: {backend: output folder}."""
    root = tmp_path_factory.mktemp("fsdp")
    for config, name in (("ddp_cpu", "ddp"), ("fsdp_cpu", "fsdp")):
        _launch(config, "train", "--out", str(root / name), hf_home=root / "hf")
    return {"ddp": root / "ddp", "fsdp": root / "fsdp"}


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_fsdp2_shards_the_student_and_leaves_the_teacher_whole_and_frozen(runs):
    for log in _ranks(runs["fsdp"]):
        assert log["world"] == 2
        student = log["student"]
        assert student["distributed_type"].endswith("FSDP") and student["fsdp2"]
        assert student["class"] == "FSDPLlamaForCausalLM" and student["sharded"]
        assert student["rows"] == [64, 128]  # up_proj's 128 rows: 64 on each rank
        # the teacher is never prepared: a full replica per rank, no grads, weights as they were
        assert log["teacher"] == {"requires_grad": False, "has_grad": False, "sharded": False, "unchanged": True}
        assert log["returned_class"] == "LlamaForCausalLM"  # a plain model comes back, not the FSDP module
    ddp = _ranks(runs["ddp"])[0]["student"]
    assert ddp["distributed_type"].endswith("MULTI_CPU") and not ddp["sharded"]
    shards = runs["fsdp"] / "train" / "checkpoints" / "step-00000003" / "pytorch_model_fsdp_0"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in shards.iterdir()}  # each rank wrote its shard


def test_fsdp2_losses_match_ddp(runs):
    ddp, fsdp = (_ranks(runs[name]) for name in ("ddp", "fsdp"))
    assert fsdp[0]["losses"] == fsdp[1]["losses"]  # averaged over ranks: both log the same numbers
    ddp_losses, fsdp_losses = ddp[0]["losses"], fsdp[0]["losses"]
    assert len(ddp_losses) == len(fsdp_losses) == 6
    assert fsdp_losses[0] == ddp_losses[0]  # same weights, same windows: the first forward pass agrees exactly
    assert fsdp_losses == pytest.approx(ddp_losses, rel=LOSS_RTOL)
    assert fsdp_losses[-1] < fsdp_losses[0]  # and it trains


def test_gathered_student_saves_reloads_and_gives_the_trained_logits(runs):
    for log in _ranks(runs["fsdp"]):
        assert log["returned_vs_trained"] == 0.0  # every rank's plain model equals the sharded one it came from
    reloaded = load_model(str(runs["fsdp"] / "model")).model
    saved = torch.load(runs["fsdp"] / "logits.pt")
    with torch.no_grad():
        logits = reloaded(input_ids=saved["probe"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=1e-6)
    start = build_tiny_llama(reloaded.config.vocab_size, seed=1, layers=2)
    assert not torch.equal(reloaded.model.layers[1].mlp.up_proj.weight, start.model.layers[1].mlp.up_proj.weight)
    assert (reloaded.model.layers[0].mlp.up_proj.weight[:, ::2] == 0).all()  # the pruned zeros, kept on shards
    ddp_logits = torch.load(runs["ddp"] / "logits.pt")["logits"]
    torch.testing.assert_close(saved["logits"], ddp_logits, rtol=LOSS_RTOL, atol=1e-5)


def test_pipeline_distill_and_lora_under_fsdp2_write_only_on_rank_0(tmp_path):
    model_dir, out, text = tmp_path / "tiny", tmp_path / "run", write_documents(tmp_path)
    tokenizer = build_tokenizer()
    save_model(build_tiny_llama(len(tokenizer), seed=0, layers=2), tokenizer, model_dir)
    training = {"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 1e-3, "checkpoint_every": 1, "data": text}
    recipe = {
        "model": str(model_dir),
        "calibration": {"data": text, "samples": 2, "seq_len": 32},
        "evaluate": {"tasks": [], "speed": False},
        # teacher_topk: rank 0 builds the teacher cache, the others wait for it and read it
        "stages": [{"distill": {**training, "teacher_topk": 16}}, {"lora": {**training, "rank": 4}}],
        "output": str(out),
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))  # YAML is a superset of JSON
    audit = tmp_path / "audit"
    _launch(
        "fsdp_cpu",
        "compress",
        "--recipe",
        str(tmp_path / "recipe.json"),
        "--watch",
        str(out),
        "--audit",
        str(audit),
        hf_home=tmp_path / "hf",
    )
    writes = {rank: json.loads((audit / f"writes-rank{rank}.json").read_text()) for rank in (0, 1)}
    # rank 1 writes only its own checkpoint shards (and their folders) in the stages' scratch folders
    assert [path for path in writes[1] if "/checkpoints/" not in path] == []
    assert any(path.endswith("__1_0.distcp") for path in writes[1])
    assert any("/teacher-cache/" in path for path in writes[0])
    for written in ("state.json", "report.md", "report.json"):
        assert any(Path(path).name.startswith(f".{written}") or path == written for path in writes[0])
    report = json.loads((out / "report.json").read_text())
    assert [stage["label"] for stage in report["stages"]] == ["01-distill", "02-lora"]
    notes = " ".join(report["stages"][0]["notes"])
    assert "2 steps" in notes and "teacher top-16 cache written" in notes
    assert not list((out / "scratch").glob("*/checkpoints"))  # removed by rank 0 when each stage finished
    final = load_model(str(out / "model")).model
    assert type(final).__name__ == "LlamaForCausalLM" and not any("lora" in n for n in final.state_dict())
