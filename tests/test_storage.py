"""Every stage and method that produces a model saves and reloads through one storage protocol (slimlm/storage.py):
identical logits, every tensor loaded (nothing initialised afresh), and plain `from_pretrained` either loads the
folder correctly or refuses it loudly — never random weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama, random_windows, run_stage
from slimlm.errors import SlimlmError
from slimlm.evaluate.footprint import parameter_counts
from slimlm.models import load_model, save_model
from slimlm.storage import MODEL_TYPE, SECTION, kernel_summary, storage_kinds, stored_modules

G32 = {"bits": 4, "group_size": 32}
# (id, [(stage, options), ...]): every distinct storage a stage leaves, alone and stacked
CHAINS = [
    ("rtn-w4-g32-int4pack", [("quantize", {"method": "rtn", **G32})]),
    ("rtn-w4-asym-g16-dequantized", [("quantize", {"method": "rtn", "bits": 4, "group_size": 16, "sym": False})]),
    ("rtn-w3-g16", [("quantize", {"method": "rtn", "bits": 3, "group_size": 16})]),
    ("rtn-w8-per-channel-int8pack", [("quantize", {"method": "rtn", "bits": 8, "group_size": None})]),
    ("rtn-w8-g32", [("quantize", {"method": "rtn", "bits": 8, "group_size": 32})]),
    ("rtn-w2-asym-per-channel", [("quantize", {"method": "rtn", "bits": 2, "group_size": None, "sym": False})]),
    ("rtn-unpacked", [("quantize", {"method": "rtn", **G32, "pack": False})]),
    ("gptq-w4", [("quantize", {"method": "gptq", **G32})]),
    ("awq-w4", [("quantize", {"method": "awq", **G32})]),
    ("smoothquant-w8a8", [("quantize", {"method": "smoothquant", "bits": 8, "group_size": None})]),
    ("kmeans-tensor", [("share", {"method": "kmeans", "bits": 3})]),
    (
        "kmeans-row-groups",
        [("share", {"method": "kmeans", "bits": 5, "granularity": "row_group", "rows_per_codebook": 16})],
    ),
    ("tie-layers", [("share", {"method": "tie_layers", "count": 3})]),
    ("tie-then-rtn", [("share", {"method": "tie_layers", "count": 3}), ("quantize", {"method": "rtn", **G32})]),
    ("tie-then-kmeans", [("share", {"method": "tie_layers", "count": 3}), ("share", {"method": "kmeans", "bits": 4})]),
    ("svd", [("lowrank", {"method": "svd", "rank": 8})]),
    ("prune-then-eora", [("prune", {"sparsity": 0.5}), ("lowrank", {"method": "eora", "rank": 4})]),
    ("gptq-then-eora", [("quantize", {"method": "gptq", **G32}), ("lowrank", {"method": "eora", "rank": 4})]),
    ("kmeans-then-eora", [("share", {"method": "kmeans", "bits": 3}), ("lowrank", {"method": "eora", "rank": 4})]),
    (
        "smoothquant-then-eora",
        [
            ("quantize", {"method": "smoothquant", "bits": 8, "group_size": None}),
            ("lowrank", {"method": "eora", "rank": 4}),
        ],
    ),
    ("depth-then-prune", [("prune_depth", {"remove": 1}), ("prune", {"method": "wanda", "sparsity": 0.5})]),
    ("width-then-gptq", [("prune_width", {"mlp_keep": 0.5, "heads_keep": 2}), ("quantize", {"method": "gptq", **G32})]),
    (
        "svd-mlp-rtn-attention-then-eora",
        [
            ("lowrank", {"method": "svd", "rank": 8, "targets": ["gate_proj", "up_proj", "down_proj"]}),
            (
                "quantize",
                {"method": "rtn", "bits": 3, "group_size": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            ),
            ("lowrank", {"method": "eora", "rank": 4}),
        ],
    ),
    (
        "depth-then-rtn-then-svd",
        [
            ("prune_depth", {"remove": 1}),
            ("quantize", {"method": "rtn", **G32, "targets": ["q_proj", "k_proj"]}),
            ("lowrank", {"method": "svd", "rank": 8, "targets": ["up_proj"]}),
        ],
    ),
]


def _compress(vocab: int, chain) -> torch.nn.Module:
    original = build_tiny_llama(vocab, layers=3)
    model = build_tiny_llama(vocab, layers=3)
    windows = random_windows(model, 4, 32)
    for name, options in chain:
        run_stage(model, name, windows, original, **options)
    return model


def _logits(model, windows) -> torch.Tensor:
    with torch.no_grad():
        return model(windows).logits


@pytest.mark.parametrize("chain", [c for _, c in CHAINS], ids=[i for i, _ in CHAINS])
def test_every_stage_output_reloads_with_identical_logits_and_tensors(chain, tiny_tokenizer, tmp_path):
    model = _compress(len(tiny_tokenizer), chain)
    windows = random_windows(model, 2, 24, seed=3)
    save_model(model, tiny_tokenizer, tmp_path / "saved")
    reloaded = load_model(str(tmp_path / "saved")).model

    # same kernels on both sides, so the logits are bit-identical, not merely close
    assert torch.equal(_logits(reloaded, windows), _logits(model, windows))
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing initialised afresh
    assert [(n, type(m)) for n, m in stored_modules(reloaded)] == [(n, type(m)) for n, m in stored_modules(model)]
    assert kernel_summary(reloaded) == kernel_summary(model)
    assert parameter_counts(reloaded) == parameter_counts(model)


@pytest.mark.parametrize("chain", [c for _, c in CHAINS], ids=[i for i, _ in CHAINS])
def test_plain_from_pretrained_loads_correctly_or_refuses_loudly(chain, tiny_tokenizer, tmp_path):
    model = _compress(len(tiny_tokenizer), chain)
    save_model(model, tiny_tokenizer, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    if stored_modules(model) or SECTION in config:
        assert config["model_type"] == MODEL_TYPE
        with pytest.raises(ValueError, match=f"model type `{MODEL_TYPE}`"):
            AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    else:
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
        windows = random_windows(model, 2, 24, seed=3)
        assert torch.equal(_logits(plain, windows), _logits(model, windows))


def test_w8a8_reload_regression(tiny_model, tiny_tokenizer, tmp_path):
    """SmoothQuant's W8A8Linears used to reload as randomly initialised Linears (logits off by half their scale)."""
    run_stage(tiny_model, "quantize", method="smoothquant", bits=8, group_size=None)
    save_model(tiny_model, tiny_tokenizer, tmp_path / "w8a8")
    reloaded = load_model(str(tmp_path / "w8a8")).model
    windows = random_windows(tiny_model, 2, 16)
    assert torch.equal(_logits(reloaded, windows), _logits(tiny_model, windows))
    assert kernel_summary(reloaded).startswith("W8A8")


def test_kmeans_is_stored_packed_at_the_size_it_claims(tiny_model, tiny_tokenizer, tmp_path):
    context = run_stage(tiny_model, "share", method="kmeans", bits=3)
    save_model(tiny_model, tiny_tokenizer, tmp_path / "kmeans")
    tensors = load_file(tmp_path / "kmeans" / "model.safetensors")
    up = "model.layers.0.mlp.up_proj"
    assert tensors[f"{up}.indices"].dtype == torch.uint8
    assert tuple(tensors[f"{up}.indices"].shape) == (128, 64 * 3 // 8)  # 3-bit indices, packed
    assert tensors[f"{up}.codebook"].dtype == torch.float16 and tensors[f"{up}.codebook"].shape == (1, 8)
    assert f"{up}.weight" not in tensors
    stored = sum(
        t.numel() * t.element_size() for name, t in tensors.items() if name.endswith((".indices", ".codebook"))
    )
    assert f"{stored / 1e6:.2f} MB for the clustered weights" in context.notes[-1]


def test_every_registered_kind_is_covered_by_the_reload_test(tiny_tokenizer):
    covered = set()
    for _, chain in CHAINS:
        covered |= {module.kind for _, module in stored_modules(_compress(len(tiny_tokenizer), chain))}
    assert covered == set(storage_kinds())


@pytest.fixture()
def packed_folder(tiny_model, tiny_tokenizer, tmp_path):
    run_stage(tiny_model, "quantize", method="rtn", **G32)
    run_stage(tiny_model, "lowrank", method="eora", rank=4, original=build_tiny_llama(len(tiny_tokenizer)))
    return save_model(tiny_model, tiny_tokenizer, tmp_path / "packed")


def _edit_config(folder, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config[SECTION])
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(format=99), r"slimlm_storage format 99 of model type 'llama' is not supported"),
        (lambda s: s["modules"][0].update(kind="sparse"), r"has unknown kind 'sparse'; known: "),
        (
            lambda s: s["modules"][0].update(name="model.layers.7.mlp.up_proj"),
            r"the model has no module model\.layers\.7",
        ),
        (
            lambda s: s["modules"][1].pop("bits"),
            r"the packed entry of model\.layers\.0\.self_attn\.q_proj\.base does not "
            r"fit the model \(KeyError",
        ),
    ],
)
def test_a_damaged_description_is_one_clear_line(packed_folder, edit, message):
    _edit_config(packed_folder, edit)
    with pytest.raises(SlimlmError, match=message):
        load_model(str(packed_folder))


def test_missing_or_extra_tensors_are_named(packed_folder):
    path = packed_folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.down_proj.b"]
    tensors["model.layers.1.mlp.down_proj.extra"] = torch.zeros(1)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(SlimlmError, match=r"do not match the model config\.json describes \(1 missing, 1 unexpected"):
        load_model(str(packed_folder))


def test_a_truncated_safetensors_file_is_named(packed_folder):
    path = packed_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(SlimlmError, match=r"model\.safetensors: not a complete safetensors file"):
        load_model(str(packed_folder))


def test_a_model_saved_again_without_slimlm_modules_is_plain(tiny_model, tiny_tokenizer, tmp_path):
    run_stage(tiny_model, "quantize", method="rtn", **G32)
    save_model(tiny_model, tiny_tokenizer, tmp_path / "m")
    plain = build_tiny_llama(len(tiny_tokenizer))
    save_model(plain, tiny_tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert SECTION not in config and config["model_type"] == "llama"
