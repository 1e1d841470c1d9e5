"""The run report: files, table figures, protocols, kernels, plots and atomic writes; no model needed."""

from __future__ import annotations

import copy
import json

import pytest

from slimlm import report, report_plots
from slimlm.evaluate.records import Record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DESCRIPTION = (
    "SmolLM2-135M-Instruct, read from the Q4_1 GGUF in ../shared and dequantized to fp32: that fp32 model is "
    "the 'original' every stage is compared with, not the bf16 checkpoint published on the Hub."
)
WIKI = {
    "data": "wikitext-2-raw-v1/test.parquet",
    "sha256": "a1b2c3d4e5f6",
    "seq_len": 512,
    "windows": "8 of 566",
    "dtype": "float32",
    "threads": 2,
}


def _speed(decode: float, prefill_ms: float, kernel: str) -> list[Record]:
    protocol = {"prompt_tokens": 128, "new_tokens": 64, "batch": 1, "threads": 2, "kernel": kernel, "repeats": 3}
    return [
        Record("speed", "prefill_ms", prefill_ms, "ms", False, protocol),
        Record("speed", "prefill_tokens_per_s", 128_000 / prefill_ms, "tokens/s", True, protocol),
        Record("speed", "decode_tokens_per_s", decode, "tokens/s", True, protocol),
        Record("speed", "energy_joules_per_token", None, "J/token", False, protocol, "no energy counter"),
    ]


def _model(
    ppl: float,
    size: float,
    nonzero: int,
    rss: float,
    decode: float,
    prefill: float,
    kernel: str,
    kl: float | None = None,
    piqa: float | None = None,
    note: str = "",
) -> list[dict]:
    records = [
        Record("wikitext2", "perplexity", ppl, "", False, WIKI, note),
        Record("wikitext2", "word_perplexity", ppl * 1.9, "", False, WIKI, note),
        Record("wikitext2", "bits_per_byte", 1.05, "bits", False, WIKI, note),
    ]
    if kl is not None:
        records += [
            Record("wikitext2", "kl_divergence", kl, "nats/token", False, WIKI, note),
            Record("wikitext2", "top1_agreement", 0.9123, "fraction", True, WIKI, note),
        ]
    if piqa is not None:
        records.append(Record("piqa", "acc", piqa, "fraction", True, {"harness": "lm-eval 0.4.13", "limit": 200}))
    how = {"method": "file sizes of the saved model folder"}
    records += [
        Record("size", "params_total", 134_515_008, "params", None, how),
        Record("size", "params_nonzero", nonzero, "params", None, how),
        Record("size", "size_on_disk", size, "bytes", False, how),
        Record("size", "bits_per_weight", size * 8 / 134_515_008, "bits", False, how),
        Record("memory", "peak_rss_eval", rss, "bytes", False, {"method": "psutil peak RSS"}),
    ]
    return [record.to_dict() for record in records + _speed(decode, prefill, kernel)]


def _summary() -> dict:
    mib = 2**20
    return {
        "slimlm_version": "0.1.0",
        "created": "2026-11-23T14:50:00Z",
        "recipe": {
            "model": "smollm2-135m",
            "dtype": "float32",
            "calibration": {"data": "c4", "samples": 128, "seq_len": 512, "seed": 0},
            "evaluate": {"tasks": ["wikitext2", "piqa"], "seq_len": 512, "limit": 8},
            "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"bits": 8}}],
            "output": "runs/demo",
        },
        "machine": {
            "cpu": "AMD EPYC 7763",
            "logical_cores": 2,
            "torch_threads": 2,
            "torch": "2.13.0+cpu",
            "transformers": "5.23.0",
            "python": "3.11.7",
            "os": "Linux-6.8",
            "ram_bytes": 8 * 2**30,
            "cuda": None,
            "energy_counter": None,
        },
        "original": {
            "name": "original",
            "description": DESCRIPTION,
            "source": "smollm2-135m",
            "path": "/shared/models/SmolLM2-135M-Instruct-Q4_1.gguf",
            "cached": True,
            "records": _model(20.0, 513.2 * mib, 134_515_008, 900 * mib, 42.0, 250.0, "dense", piqa=0.6512),
        },
        "stages": [
            {
                "index": 1,
                "name": "prune",
                "label": "01-prune",
                "options": {"method": "magnitude", "sparsity": 0.5},
                "folder": "stages/01-prune",
                "seconds": 12.3,
                "records": _model(
                    25.0, 513.2 * mib, 67_257_504, 950 * mib, 41.16, 255.0, "dense", kl=0.12345, piqa=0.6123
                ),
                "notes": ["Unstructured sparsity: dense kernels run no faster; the files are no smaller."],
            },
            {
                "index": 2,
                "name": "quantize",
                "label": "02-quantize",
                "options": {"bits": 8},
                "folder": "stages/02-quantize",
                "seconds": 30.0,
                "records": _model(
                    25.3,
                    140.1 * mib,
                    67_257_504,
                    1000 * mib,
                    20.5,
                    600.0,
                    "dequantized",
                    kl=0.2,
                    note="simulated (fake-quant)",
                ),
                "notes": ["Weights are stored in int8 but computed in fp32 (dequantized)."],
            },
        ],
        "model_folder": "model",
    }


@pytest.fixture()
def written(tmp_path):
    return report.write_report(_summary(), tmp_path), tmp_path


def test_write_report_writes_every_file(written):
    paths, folder = written
    assert set(paths) == {"markdown", "json", *report.PLOT_NAMES}
    for name in report.PLOT_NAMES:
        data = paths[name].read_bytes()
        assert paths[name] == folder / "plots" / f"{name}.png"
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not list(folder.rglob("*.tmp"))


def test_report_json_round_trips_with_the_table(written):
    paths, _ = written
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data == {**_summary(), "table": report.comparison_rows(_summary())}
    assert any(row["metric"] == "perplexity" and row["ratios"]["01-prune"] == 1.25 for row in data["table"])


def test_markdown_content(written):
    paths, _ = written
    text = paths["markdown"].read_text(encoding="utf-8")
    assert DESCRIPTION in text
    assert "01-prune" in text and "02-quantize" in text
    assert "| wikitext2 | perplexity ↓ | 20.00 | 25.00 (×1.25) | 25.30 (×1.27) * |" in text
    assert Record.from_dict(_summary()["original"]["records"][0]).protocol_line() in text
    assert "| energy_joules_per_token (J/token) ↓ | n/a | n/a | n/a |" in text
    assert "20.5 (×0.49) [dequantized]" in text  # decode tok/s with the kernel it ran on
    assert "42.0 [dense]" in text
    assert "513.2 MiB" in text and "140.1 MiB (×0.27)" in text
    assert "simulated (fake-quant)" in text and "no energy counter" in text
    assert "Unstructured sparsity: dense kernels run no faster" in text
    assert "energy_counter" in text and "8.0 GiB" in text  # every machine key
    assert "![speed](plots/speed.png)" in text
    assert "sparsity: 0.5" in text  # the recipe as YAML


def test_missing_metric_shows_a_dash():
    rows = {(row["task"], row["metric"]): row for row in report.comparison_rows(_summary())}
    assert rows["piqa", "acc"]["cells"] == {"original": "0.6512", "01-prune": "0.6123 (×0.94)", "02-quantize": "—"}
    assert rows["wikitext2", "kl_divergence"]["cells"]["original"] == "—"  # the reference has no KL to itself
    assert rows["wikitext2", "kl_divergence"]["cells"]["01-prune"] == "0.1235"
    assert "| piqa | acc (fraction) ↑ | 0.6512 | 0.6123 (×0.94) | — |" in report.render_markdown(_summary())


def test_table_orders_quality_before_footprint():
    tasks = list(dict.fromkeys(row["task"] for row in report.comparison_rows(_summary())))
    assert tasks == ["wikitext2", "piqa", "size", "memory", "speed"]


@pytest.mark.parametrize(
    ("value", "metric", "unit", "expected"),
    [
        (513.2 * 2**20, "size_on_disk", "bytes", "513.2 MiB"),
        (134_515_008, "params_total", "params", "134.52 M"),
        (20.0, "perplexity", "", "20.00"),
        (0.012345, "kl_divergence", "nats/token", "0.01235"),
        (0.5, "f1,none", "fraction", "0.5000"),
        (41.16, "decode_tokens_per_s", "tokens/s", "41.2"),
        (None, "perplexity", "", "—"),
        (4.5, "bits_per_weight", "bits", "4.50"),
        (1.05, "bits_per_byte", "bits", "1.050"),
    ],
)
def test_format_value(value, metric, unit, expected):
    assert report.format_value(value, metric, unit) == expected


def test_format_ratio_keeps_small_changes_visible():
    assert report.format_ratio(1.25) == "×1.25"
    assert report.format_ratio(1.003) == "×1.003"
    assert report.format_ratio(1.0) == "×1.00"


def test_absent_and_none_metrics_skip_their_plots(tmp_path):
    summary = _summary()
    for model in [summary["original"], *summary["stages"]]:
        model["records"] = [r for r in model["records"] if r["task"] == "wikitext2"]
    summary["stages"][1]["records"][0]["value"] = None  # a perplexity that could not be measured
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "speed.png").write_bytes(b"stale plot of an earlier run")
    paths = report.write_report(summary, tmp_path)
    assert set(paths) == {"markdown", "json", "quality"}
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["quality.png"]


def test_failing_plot_leaves_the_previous_report_and_no_temp_files(tmp_path, monkeypatch):
    (tmp_path / "report.md").write_text("previous report\n", encoding="utf-8")

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report_plots, "_tradeoff_figure", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        report.write_report(_summary(), tmp_path)
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "previous report\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["report.md"]


def test_failing_rename_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    target.write_text("previous report\n", encoding="utf-8")

    def broken_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        report.atomic_write(target, b"new report")
    assert target.read_text(encoding="utf-8") == "previous report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_summary_without_stages(tmp_path):
    summary = copy.deepcopy(_summary())
    summary["stages"] = []
    paths = report.write_report(summary, tmp_path)
    assert "| wikitext2 | perplexity ↓ | 20.00 |" in paths["markdown"].read_text(encoding="utf-8")


def _busy_summary() -> dict:
    summary = _summary()
    for record in summary["stages"][0]["records"]:
        if record["task"] == "speed" and record["value"] is not None:
            record["protocol"] = {**record["protocol"], "busy": True}
            record["note"] = "busy machine: 1-min load average 5.1 before, 6.0 after the runs, above its 2 usable cores"
            record["spread"] = [record["value"] * 0.9, record["value"] * 1.1]
    return summary


def test_busy_speed_figures_are_flagged_with_their_spread():
    rows = {(row["task"], row["metric"]): row for row in report.comparison_rows(_busy_summary())}
    cell = rows["speed", "decode_tokens_per_s"]["cells"]["01-prune"]
    assert cell == f"41.2 (×0.98) {{37.0–45.3}} * [dense] {report.BUSY}"
    assert rows["speed", "decode_tokens_per_s"]["cells"]["original"] == "42.0 [dense]"  # measured on a quiet machine
    text = report.render_markdown(_busy_summary())
    assert "busy machine: 1-min load average 5.1 before" in text and f"{report.BUSY}: measured while" in text


def test_busy_figures_render_in_the_plots(tmp_path):
    paths = report.write_report(_busy_summary(), tmp_path)
    assert paths["speed"].read_bytes().startswith(PNG_MAGIC)


def test_the_plots_module_does_not_import_the_report_module():
    import subprocess
    import sys

    code = "import sys, slimlm.report_plots; print('slimlm.report' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_a_task_figure_at_its_chance_level_is_marked_as_no_quality_figure():
    summary = _summary()
    for model in [summary["original"], *summary["stages"]]:
        for record in model["records"]:
            if record["task"] == "piqa":  # two choices: chance 0.5, a standard error of 0.035 at 200 documents
                record["protocol"] = {**record["protocol"], "chance": 0.5, "stderr": 0.035}
    summary["stages"][0]["records"] = [
        {**r, "value": 0.55} if r["task"] == "piqa" else r for r in summary["stages"][0]["records"]
    ]
    rows = {(row["task"], row["metric"]): row for row in report.comparison_rows(summary)}
    cells = rows["piqa", "acc"]["cells"]
    assert cells["01-prune"].endswith(report.AT_CHANCE)  # 0.55 ≤ 0.5 + 2 × 0.035
    assert report.AT_CHANCE not in cells["original"]  # 0.65 is well above guessing
    assert f"{report.AT_CHANCE}: within two standard errors" in report.render_markdown(summary)
