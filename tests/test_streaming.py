import json

import pytest
import torch

from conftest import build_tiny_llama, random_windows
from slimlm.calibration import Calibration
from slimlm.errors import SlimlmError
from slimlm.registry import StageContext, get_stage
from slimlm.streaming import load_streamed


def _run_stage(model, windows, tmp_path, name, **options):
    spec = get_stage(name)
    context = StageContext(None, Calibration(None, windows=windows), tmp_path)
    return spec.apply(model, spec.options_model(options).model_validate(options), context)


def write_bf16_checkpoint(tmp_path, tokenizer):
    """A 3-layer tiny model in bfloat16, saved in several shards (so the index path is exercised)."""
    model = build_tiny_llama(len(tokenizer), layers=3, tie=False).to(torch.bfloat16)
    folder = tmp_path / "dense"
    model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    return model, folder


@pytest.fixture()
def bf16_checkpoint(tmp_path, tiny_tokenizer):
    return write_bf16_checkpoint(tmp_path, tiny_tokenizer)


@pytest.mark.parametrize("method,allocation", [("wanda", "uniform"), ("wanda", "owl"), ("sparsegpt", "uniform")])
def test_streamed_pruning_equals_pruning_the_loaded_model(bf16_checkpoint, tmp_path, method, allocation):
    from transformers import AutoModelForCausalLM

    dense, folder = bf16_checkpoint
    windows = random_windows(dense, samples=3, seq_len=16)
    # Loaded the ordinary way (from_pretrained keeps the rotary tables in float32, as streaming does)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    expected = _run_stage(dense, windows, tmp_path, "prune", method=method, sparsity=0.5, allocation=allocation)

    streamed = load_streamed(folder, tmp_path / "pruned")
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())  # nothing of a layer held yet
    _run_stage(streamed, windows, tmp_path, "prune", method=method, sparsity=0.5, allocation=allocation)
    assert all(p.device.type == "meta" for p in streamed.model.layers.parameters())  # released again
    out = streamed.slimlm_layer_stream.finish()

    assert not (tmp_path / ".pruned.partial").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len({f for f in index["weight_map"].values()}) == 3 + 1  # one shard per layer + the rest
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for (name, want), got in zip(expected.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(want, got), name
    assert (
        streamed.slimlm_layer_stream.peak_layer_bytes < sum(p.numel() * 2 for p in dense.model.layers.parameters()) / 2
    )  # one layer of three, not all


def test_whole_model_methods_refuse_a_streamed_model(bf16_checkpoint, tmp_path):
    _, folder = bf16_checkpoint
    streamed = load_streamed(folder, tmp_path / "out")
    windows = random_windows(streamed, samples=2, seq_len=8)
    with pytest.raises(SlimlmError, match="magnitude pruning needs the whole model"):
        _run_stage(streamed, windows, tmp_path, "prune", method="magnitude", sparsity=0.5)
    with pytest.raises(SlimlmError, match="depth pruning"):
        _run_stage(streamed, windows, tmp_path, "prune_depth", remove=1)


def test_finish_refuses_layers_never_streamed(bf16_checkpoint, tmp_path):
    _, folder = bf16_checkpoint
    streamed = load_streamed(folder, tmp_path / "out")
    with pytest.raises(SlimlmError, match="never released"):
        streamed.slimlm_layer_stream.finish()
    assert not (tmp_path / "out").exists()
