"""Saving and reloading models holding LowRankLinear and CompensatedLinear modules."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from slimlm.errors import SlimlmError
from slimlm.lowrank.layers import CompensatedLinear, LowRankLinear
from slimlm.lowrank.storage import (LOWRANK_FILE, describe_lowrank, load_lowrank_model, lowrank_extra_json,
                                    restore_lowrank)
from slimlm.models import save_model

from conftest import build_tiny_llama, random_windows
from test_lowrank_stage import VOCAB, _log_probs, run_stage


@pytest.fixture(scope="module")
def compressed():
    """SVD of the MLP, 3-bit RTN of attention, then EoRA everywhere: the MLP compensations wrap LowRankLinears."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    original = build_tiny_llama(VOCAB)
    model = copy.deepcopy(original)
    run_stage(model, original, "lowrank", method="svd", rank=8)
    run_stage(model, original, "quantize", method="rtn", bits=3, group_size=16, pack=False)
    run_stage(model, original, "lowrank", method="eora", rank=4)
    yield model
    torch.set_num_threads(threads)


def test_the_description_lists_every_low_rank_module(compressed):
    section = json.loads(json.dumps(describe_lowrank(compressed)))  # JSON-able
    entries = {entry["name"]: entry for entry in section["modules"]}
    assert len(entries) == 14 + 6
    assert entries["model.layers.1.mlp.up_proj"] == {"name": "model.layers.1.mlp.up_proj", "rank": 4, "in_features": 64,
                                                     "out_features": 128, "kind": "eora", "base": "LowRankLinear"}
    assert entries["model.layers.1.mlp.up_proj.base"]["kind"] == "svd"
    assert entries["model.layers.0.self_attn.k_proj"]["base"] == "Linear"
    assert describe_lowrank(build_tiny_llama(VOCAB)) is None and lowrank_extra_json(build_tiny_llama(VOCAB)) == {}


def test_state_dict_keys_are_stable(compressed):
    keys = set(compressed.state_dict())
    layer = "model.layers.0."
    assert {layer + "mlp.up_proj.base.a.weight", layer + "mlp.up_proj.base.b.weight", layer + "mlp.up_proj.a",
            layer + "mlp.up_proj.b", layer + "self_attn.q_proj.base.weight", layer + "self_attn.q_proj.a",
            layer + "self_attn.q_proj.b"} <= keys
    assert layer + "mlp.up_proj.weight" not in keys and layer + "self_attn.q_proj.weight" not in keys


def test_restore_then_load_state_dict_rebuilds_the_model(compressed):
    fresh = build_tiny_llama(VOCAB, seed=1)
    restore_lowrank(fresh, json.loads(json.dumps(describe_lowrank(compressed))))
    fresh.load_state_dict(compressed.state_dict())  # strict: every key matches
    windows = random_windows(fresh, 2, 16, seed=2)
    assert torch.equal(_log_probs(fresh, windows), _log_probs(compressed, windows))
    assert isinstance(fresh.model.layers[1].mlp.down_proj.base, LowRankLinear)
    assert isinstance(fresh.model.layers[1].self_attn.o_proj, CompensatedLinear)


def test_a_saved_folder_loads_back(compressed, tmp_path):
    folder = save_model(compressed, None, tmp_path / "model", extra_json=lowrank_extra_json(compressed))
    saved = load_file(folder / "model.safetensors")
    assert saved["model.layers.0.self_attn.q_proj.a"].dtype == torch.float16
    assert "lm_head.weight" not in saved  # tied to the embedding: the load must accept it missing
    loaded = load_lowrank_model(folder, AutoConfig.from_pretrained(folder), torch.float32)
    windows = random_windows(loaded, 2, 16, seed=3)
    assert torch.equal(_log_probs(loaded, windows), _log_probs(compressed, windows))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    plain = save_model(build_tiny_llama(VOCAB), None, tmp_path / "plain")
    assert load_lowrank_model(plain, AutoConfig.from_pretrained(plain), torch.float32) is None


def test_a_folder_missing_low_rank_tensors_is_an_error(compressed, tmp_path):
    folder = save_model(build_tiny_llama(VOCAB), None, tmp_path / "model", extra_json=lowrank_extra_json(compressed))
    expected = (r"the saved tensors do not match the model slimlm_lowrank\.json describes \(14 unexpected, 48 "
                r"missing, e\.g\. model\.layers\.0\.self_attn\.q_proj\.weight\)$")
    with pytest.raises(SlimlmError, match=expected):
        load_lowrank_model(folder, AutoConfig.from_pretrained(folder), torch.float32)


def test_a_description_that_does_not_fit_the_model_is_an_error(compressed, tmp_path):
    section = describe_lowrank(compressed)
    section["modules"][0]["name"] = "model.layers.7.mlp.up_proj"
    with pytest.raises(SlimlmError, match=f"^{LOWRANK_FILE}: the model has no module model.layers.7.mlp.up_proj$"):
        restore_lowrank(build_tiny_llama(VOCAB), section)
    svd = next(entry for entry in describe_lowrank(compressed)["modules"] if entry["kind"] == "svd")
    wrong = {"format": 1, "modules": [{**svd, "name": "model.layers.0.self_attn.q_proj"}]}
    with pytest.raises(SlimlmError, match="q_proj should be a Linear with a \\[128, 64\\] weight to factorize"):
        restore_lowrank(build_tiny_llama(VOCAB), wrong)
