"""`slimlm auto` end to end on a tiny model (slimlm target): recipes that run, a report with the plot, the best
recipe written, the rows resumed from state.json; bad command-line values are one line."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import write_documents
from slimlm.auto.allocate import Solution
from slimlm.auto.run import AutoSettings, run_auto
from slimlm.auto.shared_scores import SharedScores
from slimlm.errors import SlimlmError


def _settings(model_dir, tmp_path, **changes):
    settings = {
        "model": str(model_dir),
        "budget": "80KB",
        "target": "slimlm",
        "output": str(tmp_path / "auto"),
        "candidates": 2,
        "calib_data": write_documents(tmp_path),
        "calib_samples": 2,
        "calib_seq_len": 16,
        "fit_samples": 2,
        "fit_seq_len": 32,
        "eval_chunks": 1,
        "baselines": ["w4g32"],
    }
    return AutoSettings(**(settings | changes))


@pytest.mark.builtin  # not the built-in model, but slow: WikiText-2 from the shared data, a pipeline run per row
def test_auto_writes_recipes_report_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    summary = run_auto(_settings(tiny_model_dir, tmp_path))
    out = tmp_path / "auto"
    labels = [r["label"] for r in summary["rows"]]
    assert labels == ["candidate 1", "candidate 2", "uniform w4g32"]
    for row in summary["rows"]:
        if row["label"].startswith("candidate"):
            assert row["predicted_bytes"] <= summary["budget"]["bytes"]
    best = next(r for r in summary["rows"] if r["label"] == summary["best"])
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == yaml.safe_load(Path(best["recipe"]).read_text())
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "| candidate 1 |" in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["best"] == summary["best"]

    import slimlm.auto.run as run_module

    monkeypatch.setattr(run_module, "_score", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rescored")))
    again = run_auto(_settings(tiny_model_dir, tmp_path, resume=True))
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in summary["rows"]]


def test_a_budget_below_the_smallest_output_is_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(SlimlmError, match="below the smallest slimlm output"):
        run_auto(_settings(tiny_model_dir, tmp_path, budget="1KB"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--budget", "lots"], "error: --budget 'lots': not understood"),
        (["--budget", "70MB", "--target", "onnx"], "error: --target 'onnx': not one of gguf, slimlm"),
        (
            ["--budget", "70MB", "--target", "slimlm", "--recover", "1000"],
            "error: --recover 1000: built for --target gguf",
        ),
        (
            ["--budget", "70MB", "--recover", "1000", "--max-removed", "0"],
            "error: --recover: distillation recovers removed layers, and --max-removed 0 removes none",
        ),
        (["--budget", "70MB", "--mlp-keep", "most"], "error: --mlp-keep 'most': give fractions of the MLP's channels"),
        (["--budget", "70MB", "--mlp-keep", "0.8,1.5"], "error: --mlp-keep 1.5: give fractions of the MLP's channels"),
    ],
)
def test_cli_refuses_bad_values_in_one_line(args, expected):
    result = subprocess.run(
        [sys.executable, "-m", "slimlm.cli", "auto", "--model", "smollm2-135m", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr


@pytest.mark.builtin  # not the built-in model, but slow: WikiText-2 from the shared data, a pipeline run per row
def test_latency_budget_with_slimlm_kernels(tiny_model_dir, tmp_path):
    work = str(tmp_path / "work")
    sized = run_auto(_settings(tiny_model_dir, tmp_path, budget="1GB", output=str(tmp_path / "sized"), work=work))
    for row in sized["rows"]:
        assert row["decode_ms_per_token"] > 0 and row["predicted_ms_per_token"] > 0, row["label"]
    uniform = sorted(r["predicted_ms_per_token"] for r in sized["rows"])
    budget = (uniform[0] + uniform[-1]) / 2

    summary = run_auto(_settings(tiny_model_dir, tmp_path, budget=f"{budget:.6f}ms/token", work=work))
    assert summary["budget"]["resource"] == "ms_per_token"
    uniform = [next(r for r in run["rows"] if r["label"] == "uniform w4g32") for run in (sized, summary)]
    assert uniform[1]["path"] == uniform[0]["path"]
    assert Path(uniform[0]["path"]).parent.parent == tmp_path / "sized" / "runs"
    assert Path(uniform[0]["path"]).parent.name.startswith("uniform-w4g32-")
    candidates = [r for r in summary["rows"] if r["label"].startswith("candidate")]
    assert candidates and all(r["predicted_ms_per_token"] <= budget + 1e-6 for r in candidates)
    assert "Latency model" in (tmp_path / "auto" / "report.md").read_text()


def test_shared_scores_are_reused_only_for_the_same_scoring_settings(tmp_path):
    scored = tmp_path / "model"
    scored.mkdir()
    settings = AutoSettings(model="m", budget="1GB", work=str(tmp_path / "work"))
    row, figures = {"label": "uniform Q4_0"}, {"ppl": 9.0, "path": str(scored)}
    assert SharedScores(settings).get(row) is None
    assert SharedScores(settings).put(row, figures) == figures
    assert SharedScores(AutoSettings(model="m", budget="5MB", work=settings.work)).get(row) == figures  # any budget
    assert SharedScores(AutoSettings(model="m", budget="1GB", work=settings.work, eval_chunks=9)).get(row) is None
    assert SharedScores(AutoSettings(model="m", budget="1GB")).put(row, figures) == figures  # no --work: not kept
    scored.rmdir()
    assert SharedScores(settings).get(row) is None  # its file is gone: scored again


def test_slimlm_rows_get_a_folder_per_mix_not_per_label(tmp_path, monkeypatch):
    from slimlm.auto import run

    folders = []
    monkeypatch.setattr(run, "_score_slimlm", lambda settings, target, solution, folder, loaded: folders.append(folder))
    settings, target = AutoSettings(model="m", budget="1GB", target="slimlm"), SimpleNamespace(recipe_version="2")
    for formats in ({"q_proj": "w4g64"}, {"q_proj": "w3g64"}, {"q_proj": "w4g64"}):
        run._score(settings, target, "candidate 1", Solution(formats, (), 0.0), tmp_path, None)
    assert folders[0] != folders[1] and folders[0] == folders[2]  # same label, another mix: another folder
    assert all(f.parent == tmp_path / "runs" and f.name.startswith("candidate-1-") for f in folders)
