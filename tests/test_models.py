import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.errors import SlimlmError
from slimlm.models import SUPPORTED_ARCHITECTURES, load_model, resolve_source, save_model


def test_folder_round_trip_keeps_weights_and_tied_embeddings(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.source.kind == "folder"
    model = loaded.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = save_model(model, loaded.tokenizer, tmp_path / "copy")
    again = AutoModelForCausalLM.from_pretrained(out)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_pickle_only_folder_is_refused_with_the_file_and_flag(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(SlimlmError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "pytorch_model.bin" in message and "--allow-pickle" in message and "\n" not in message


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(folder)
    with pytest.raises(SlimlmError) as err:
        load_model(str(folder))
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and all(a in message for a in SUPPORTED_ARCHITECTURES)
    assert "\n" not in message


def test_unreachable_hub_id_says_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SlimlmError) as err:
        load_model("some-org/some-model-that-is-not-cached")
    message = str(err.value)
    assert "hub" in message and "local" in message and "\n" not in message


def test_unknown_model_name_is_one_line():
    with pytest.raises(SlimlmError, match="not a built-in name"):
        resolve_source("no-such-model")


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(SlimlmError, match="GGUF file not found"):
        resolve_source(str(tmp_path / "x.gguf"))


def test_crash_while_saving_leaves_the_previous_folder_intact(tiny_model_dir, tmp_path, monkeypatch):
    loaded = load_model(str(tiny_model_dir))
    target = save_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    before = sorted(os.listdir(target))

    class Boom(RuntimeError):
        pass

    def broken_save(*args, **kwargs):
        raise Boom("disk full")

    monkeypatch.setattr(loaded.tokenizer, "save_pretrained", broken_save)
    with pytest.raises(Boom):
        save_model(loaded.model, loaded.tokenizer, target, extra_json={"meta.json": {"a": 1}})
    assert sorted(os.listdir(target)) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_extra_json_is_written_beside_the_weights(tiny_model_dir, tmp_path):
    loaded = load_model(str(tiny_model_dir))
    out = save_model(loaded.model, loaded.tokenizer, tmp_path / "m", extra_json={"slimlm_stage.json": {"k": 2}})
    assert json.loads((out / "slimlm_stage.json").read_text()) == {"k": 2}


@pytest.mark.builtin
def test_builtin_model_is_converted_once_and_described_as_dequantized_q4_1():
    loaded = load_model("smollm2-135m")
    assert loaded.source.kind == "builtin"
    assert "Q4_1" in loaded.source.description and "original" in loaded.source.description
    assert loaded.source.gguf_types.get("Q4_1") == 210
    model = loaded.model
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not hasattr(model.config, "quantization_config")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids.shape[1] :])


def _logits(model, windows):
    with torch.no_grad():
        return model(windows, use_cache=False).logits


@pytest.mark.parametrize(
    "stages",
    [
        [("lowrank", {"method": "svd", "rank": 8})],
        [("share", {"method": "tie_layers", "count": 1})],
        [("quantize", {"method": "rtn", "bits": 4, "group_size": 32}), ("lowrank", {"method": "eora", "rank": 4})],
    ],
    ids=["svd", "tie_layers", "packed+eora"],
)
def test_slimlm_modules_survive_save_model_and_load_model(tiny_model, tiny_tokenizer, tmp_path, stages):
    import copy

    from conftest import random_windows, run_stage

    original = copy.deepcopy(tiny_model)
    for name, options in stages:
        run_stage(tiny_model, name, original=original, **options)
    windows = random_windows(tiny_model, samples=2, seq_len=16)
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    reloaded = load_model(str(tmp_path / "m")).model
    assert torch.equal(_logits(reloaded, windows), _logits(tiny_model, windows))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in tiny_model.parameters())
