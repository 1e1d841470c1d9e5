import json

import pytest
from transformers import AutoModelForCausalLM

from slimlm.errors import SlimlmError
from slimlm.modules import named_decoder_linears
from slimlm.pipeline import Pipeline, run_recipe
from slimlm.prune import unstructured
from slimlm.recipe import parse_recipe


def _recipe(model_dir, out, stages):
    return parse_recipe(
        {
            "model": str(model_dir),
            "calibration": {"data": "c4", "samples": 2, "seq_len": 32},
            "evaluate": {"tasks": ["wikitext2"], "seq_len": 32, "limit": 2, "prompt_tokens": 8, "new_tokens": 4},
            "stages": stages,
            "output": str(out),
        }
    )


def _linear_sparsity(model) -> float:
    weights = [linear.weight for _, linear in named_decoder_linears(model)]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


def test_recipe_writes_a_reloadable_model_and_a_side_by_side_report(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = run_recipe(_recipe(tiny_model_dir, out, [{"prune": {"method": "magnitude", "sparsity": 0.5}}]))
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert _linear_sparsity(model) == pytest.approx(0.5, abs=0.01)
    report = (out / "report.md").read_text()
    assert "original" in report and "01-prune" in report
    data = json.loads((out / "report.json").read_text())
    assert data["stages"][0]["label"] == "01-prune"
    stage_metrics = {(r["task"], r["metric"]) for r in summary["stages"][0]["records"]}
    assert {
        ("wikitext2", "perplexity"),
        ("wikitext2", "kl_divergence"),
        ("speed", "decode_tokens_per_s"),
    } <= stage_metrics
    kl = next(r for r in summary["stages"][0]["records"] if r["metric"] == "kl_divergence")
    assert kl["value"] > 0  # the pruned model differs from the original it is compared with
    assert summary["stages"][0]["notes"]


def test_evaluate_after_the_last_stage_only_scores_the_result(tiny_model_dir, tmp_path):
    recipe = _recipe(tiny_model_dir, tmp_path / "run", [{"prune": {"sparsity": 0.3}}, {"prune": {"sparsity": 0.6}}])
    recipe.evaluate.after = "last_stage"
    summary = run_recipe(recipe)
    first, last = ({r["metric"] for r in stage["records"]} for stage in summary["stages"])
    assert "perplexity" not in first and "size_on_disk" in first  # saved and sized, not scored
    assert {"perplexity", "kl_divergence"} <= last
    assert "02-prune" in (tmp_path / "run" / "report.md").read_text()


def test_original_evaluation_is_cached_between_runs(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE_DIR", str(tmp_path / "cache"))
    first = run_recipe(_recipe(tiny_model_dir, tmp_path / "a", [{"prune": {"sparsity": 0.3}}]))
    second = run_recipe(_recipe(tiny_model_dir, tmp_path / "b", [{"prune": {"sparsity": 0.3}}]))
    assert first["original"]["cached"] is False and second["original"]["cached"] is True
    assert first["original"]["records"][0] == second["original"]["records"][0]


def test_resume_continues_after_the_last_finished_stage(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stages = [{"prune": {"sparsity": 0.3}}, {"prune": {"sparsity": 0.6}}]
    calls = []
    magnitude = unstructured.PRUNE_METHODS["magnitude"]
    monkeypatch.setitem(
        unstructured.PRUNE_METHODS,
        "magnitude",
        lambda model, options, context: (calls.append(options.sparsity), magnitude(model, options, context)),
    )
    original_run_stage = Pipeline._run_stage

    def crash_on_second(self, index, *args):
        if index == 2:
            raise KeyboardInterrupt("killed")
        return original_run_stage(self, index, *args)

    monkeypatch.setattr(Pipeline, "_run_stage", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(_recipe(tiny_model_dir, out, stages))
    state = json.loads((out / "state.json").read_text())
    assert [s["label"] for s in state["completed"]] == ["01-prune"]
    assert not (out / "model").exists()

    monkeypatch.setattr(Pipeline, "_run_stage", original_run_stage)
    partial = out / "stages" / ".02-prune.tmp-0badf00d"  # what a save killed half-way leaves
    (partial / "model.safetensors").parent.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half a file")
    summary = run_recipe(_recipe(tiny_model_dir, out, stages), resume=True)
    assert not partial.exists()
    assert calls == [0.3, 0.6]  # stage 1 was not run again
    assert [s["label"] for s in summary["stages"]] == ["01-prune", "02-prune"]
    assert _linear_sparsity(AutoModelForCausalLM.from_pretrained(out / "model")) == pytest.approx(0.6, abs=0.01)


def test_resume_refuses_a_different_recipe(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_recipe(_recipe(tiny_model_dir, out, [{"prune": {"sparsity": 0.3}}]))
    with pytest.raises(SlimlmError, match="different recipe"):
        run_recipe(_recipe(tiny_model_dir, out, [{"prune": {"sparsity": 0.4}}]), resume=True)


def test_resume_without_state_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(SlimlmError, match="nothing to resume"):
        run_recipe(_recipe(tiny_model_dir, tmp_path / "none", [{"prune": {"sparsity": 0.3}}]), resume=True)


def test_a_fresh_run_replaces_what_an_earlier_run_left(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    run_recipe(_recipe(tiny_model_dir, out, [{"prune": {"sparsity": 0.3}}, {"prune": {"sparsity": 0.6}}]))
    (out / "plots" / "stale.png").write_bytes(b"a plot of the earlier run")
    summary = run_recipe(_recipe(tiny_model_dir, out, [{"prune": {"sparsity": 0.4}}]))
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["01-prune"]
    assert not (out / "plots" / "stale.png").exists()
    assert [s["label"] for s in json.loads((out / "report.json").read_text())["stages"]] == ["01-prune"]
    assert _linear_sparsity(AutoModelForCausalLM.from_pretrained(out / "model")) == pytest.approx(0.4, abs=0.01)
    assert summary["stages"][0]["options"]["sparsity"] == 0.4


def test_a_fresh_run_leaves_a_folder_it_did_not_write_alone(tiny_model_dir, tmp_path):
    out = tmp_path / "mine"
    (out / "stages").mkdir(parents=True)
    (out / "stages" / "notes.txt").write_text("not slimlm's: no state.json beside it")
    run_recipe(_recipe(tiny_model_dir, out, [{"prune": {"sparsity": 0.3}}]))
    assert (out / "stages" / "notes.txt").is_file() and (out / "stages" / "01-prune").is_dir()


def test_a_model_that_fails_to_load_leaves_no_output_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SlimlmError, match="no such file or folder"):
        run_recipe(_recipe(tmp_path / "missing-model", out, [{"prune": {"sparsity": 0.3}}]))
    assert not out.exists()


def test_the_recipe_is_checked_before_anything_is_written(tiny_model_dir, tmp_path, monkeypatch):
    from slimlm import pipeline

    def refuse(recipe):
        raise SlimlmError("stages[0].quantize.group_size: 48 does not divide hidden size 64")

    monkeypatch.setattr(pipeline, "check_recipe", refuse)
    with pytest.raises(SlimlmError, match="does not divide"):
        run_recipe(_recipe(tiny_model_dir, tmp_path / "run", [{"prune": {"sparsity": 0.3}}]))
    assert not (tmp_path / "run").exists()


def test_an_output_path_that_is_a_file_is_refused_before_loading(tiny_model_dir, tmp_path, monkeypatch):
    from slimlm import pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    (tmp_path / "run").write_text("a file, not a folder")
    with pytest.raises(SlimlmError, match=r"output: .*run is a file; expected a folder"):
        run_recipe(_recipe(tiny_model_dir, tmp_path / "run", [{"prune": {"sparsity": 0.3}}]))
