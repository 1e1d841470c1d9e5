"""The run report: report.md, report.json and PNG plots comparing the original with every stage's model.

Write semantics: everything (plots, JSON, Markdown) is rendered in memory first, then each file is written
atomically (a temp file in the same folder, then ``os.replace``), plots first and report.md last. A failure
while rendering (e.g. a plot that raises) leaves the previous report untouched; a failure while writing
leaves every file whole (old or new). Either way no temp file stays behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from slimlm import report_plots
from slimlm.evaluate.records import Record, at_chance
from slimlm.report_common import (
    MISSING,
    NOT_AVAILABLE,
    ORIGINAL,
    format_ratio,
    format_value,
    human_bytes,
    index_records,
    is_busy,
    is_bytes,
    kernel_of,
    model_columns,
    row_keys,
    spread_text,
)

PLOT_NAMES = ("quality", "size", "speed", "memory", "tradeoff")
BUSY = "⚠busy"
AT_CHANCE = "⚠chance"


# ---------------------------------------------------------------- table cells
def _cell(record: dict | None, reference: dict | None) -> tuple[str, float | None]:
    """The table text of one record and its ratio to `reference` (None for the original itself)."""
    if record is None:
        return MISSING, None
    value = record.get("value")
    if value is None:
        return (NOT_AVAILABLE if record.get("note") else MISSING), None
    text, ratio = format_value(value, record["metric"], record.get("unit", "")), None
    base = (reference or {}).get("value")
    if base and math.isfinite(base) and math.isfinite(value):
        ratio = value / base
        text += f" ({format_ratio(ratio)})"
    if spread_text(record):
        text += f" {{{spread_text(record)}}}"  # the runs' range beside their median: is a difference real?
    if record.get("note"):
        text += " *"  # e.g. "simulated (fake-quant)": the note, printed below the table, qualifies the number
    if at_chance(Record.from_dict(record)):
        text += f" {AT_CHANCE}"  # indistinguishable from guessing: not a quality figure
    if kernel_of(record):
        # Speed depends on the kernel: a dequantized or dense run is no real low-bit speedup, so say which.
        text += f" [{kernel_of(record)}]"
    if is_busy(record):
        text += f" {BUSY}"  # measured on a loaded machine: not to be read as this model's speed
    return text, ratio


def _heading(metric: str, unit: str, higher_is_better: bool | None) -> str:
    shown_unit = "" if is_bytes(metric, unit) else unit  # byte cells carry their own KiB/MiB/GiB
    arrow = {True: " ↑", False: " ↓"}.get(higher_is_better, "")
    return f"{metric}{f' ({shown_unit})' if shown_unit else ''}{arrow}"


def comparison_rows(summary: dict) -> list[dict[str, Any]]:
    """One row per (task, metric) of any model: raw values, ratios to the original and the cell texts,
    each keyed by model label ("original", then the stage labels)."""
    columns = [(label, index_records(records)) for label, records in model_columns(summary)]
    originals = columns[0][1]
    rows = []
    for key in row_keys(model_columns(summary)):
        found = [(label, records.get(key)) for label, records in columns]
        first = next(record for _, record in found if record is not None)
        row = {
            "task": key[0],
            "metric": key[1],
            "unit": first.get("unit", ""),
            "higher_is_better": first.get("higher_is_better"),
            "heading": _heading(key[1], first.get("unit", ""), first.get("higher_is_better")),
            "values": {},
            "ratios": {},
            "cells": {},
        }
        for label, record in found:
            text, ratio = _cell(record, None if label == ORIGINAL else originals.get(key))
            row["values"][label] = None if record is None else record.get("value")
            row["ratios"][label], row["cells"][label] = ratio, text
        rows.append(row)
    return rows


# ---------------------------------------------------------------- Markdown
def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _header(summary: dict) -> str:
    recipe, original = summary.get("recipe") or {}, summary.get("original") or {}
    model = recipe.get("model") or original.get("source") or "model"
    # A JSON round trip turns Paths and the like into plain values that yaml.safe_dump accepts.
    recipe_yaml = yaml.safe_dump(json.loads(json.dumps(recipe, default=str)), sort_keys=False, allow_unicode=True)
    cached = " (evaluation read from cache)" if original.get("cached") else ""
    return "\n".join(
        [
            f"# slimlm report: {model}",
            "",
            f"Created {summary.get('created', '?')} by slimlm {summary.get('slimlm_version', '?')}.",
            "",
            "## Original model",
            "",
            f"Source `{original.get('source', '?')}`, file `{original.get('path', '?')}`{cached}.",
            "",
            original.get("description", ""),
            "",
            "## Recipe",
            "",
            "```yaml",
            recipe_yaml.rstrip(),
            "```",
        ]
    )


def _table(summary: dict) -> str:
    labels = [label for label, _ in model_columns(summary)]
    lines = [
        "## Comparison",
        "",
        f"Stage cells: value (×ratio to the original). `[kernel]`: the kernel a speed figure was measured with "
        f'("dense" or "dequantized" is no real low-bit speedup). {MISSING}: not measured; '
        f"{NOT_AVAILABLE}: could not be measured; *: see the notes below. ↓/↑: lower/higher is better. "
        f"`{{min–max}}`: the range of the timed runs a median comes from. {BUSY}: measured while other work loaded "
        "the machine (load average above its cores): not a clean figure. "
        f"{AT_CHANCE}: within two standard errors of the task's chance level (guessing; TriviaQA: no right answer): "
        "not a quality figure.",
        "",
        "| task | metric | " + " | ".join(labels) + " |",
        "|---|---|" + "---:|" * len(labels),
    ]
    previous_task = None
    for row in comparison_rows(summary):
        task = row["task"] if row["task"] != previous_task else ""
        previous_task = row["task"]
        cells = [_escape(row["cells"][label]) for label in labels]
        lines.append(f"| {_escape(task)} | {_escape(row['heading'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _grouped(triples: list[tuple[str, str, str]]) -> list[str]:
    """(text, model, metric) triples -> one Markdown bullet per distinct text, naming its models and metrics."""
    groups: dict[str, tuple[dict, dict]] = {}
    for text, model, metric in triples:
        models, metrics = groups.setdefault(text, ({}, {}))  # dicts as ordered sets
        models[model] = metrics[metric] = None
    return [f"- {text} — {', '.join(models)}: {', '.join(metrics)}" for text, (models, metrics) in groups.items()]


def _protocols(summary: dict) -> str:
    lines = ["## Protocols and notes", "", "How every figure was measured, per task (identical protocols merged)."]
    by_task: dict[str, list[tuple[str, dict]]] = {}
    for label, records in model_columns(summary):
        for record in records:
            by_task.setdefault(record["task"], []).append((label, record))
    for task, entries in by_task.items():
        lines += [
            "",
            f"### {task}",
            "",
            *_grouped(
                [
                    (f"`{Record.from_dict(r).protocol_line() or 'no protocol recorded'}`", label, r["metric"])
                    for label, r in entries
                ]
            ),
        ]
        notes = _grouped([(f"note: {r['note']}", label, r["metric"]) for label, r in entries if r.get("note")])
        lines += notes
    return "\n".join(lines)


def _stage_details(summary: dict) -> str:
    lines = ["## Stages"]
    for stage in summary.get("stages") or []:
        options = ", ".join(f"{key}={value}" for key, value in (stage.get("options") or {}).items())
        seconds = stage.get("seconds")
        lines += [
            "",
            f"### {stage['label']} ({stage.get('name', '?')})",
            "",
            f"- options: `{options or 'defaults'}`",
            f"- time: {f'{seconds:,.1f} s' if isinstance(seconds, (int, float)) else MISSING}",
            f"- folder: `{stage.get('folder', '?')}`",
        ]
        lines += [f"- note: {note}" for note in stage.get("notes") or []]
    return "\n".join(lines) if len(lines) > 1 else ""


def _machine(summary: dict) -> str:
    lines = ["## Machine", "", "| key | value |", "|---|---|"]
    for key, value in (summary.get("machine") or {}).items():
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
        if key.endswith("_bytes") and isinstance(value, (int, float)):
            text = f"{human_bytes(value)} ({value:,} bytes)"
        lines.append(f"| {_escape(key)} | {_escape(text)} |")
    return "\n".join(lines)


def render_markdown(summary: dict, plots: dict[str, Path] | None = None) -> str:
    """The whole report.md; `plots` (name -> path relative to the report) adds image links."""
    images = "\n\n".join(["## Plots"] + [f"![{name}]({path.as_posix()})" for name, path in (plots or {}).items()])
    sections = [
        _header(summary),
        _table(summary),
        images if plots else "",
        _protocols(summary),
        _stage_details(summary),
        _exports(summary),
        _machine(summary),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _beside_original(entry: dict) -> str:
    original = entry.get("original_gguf_bytes")
    if not original:
        return ""
    return (
        f" — {entry['bytes'] / 1e6:.1f} MB beside the original's GGUF {original / 1e6:.1f} MB "
        f"(×{entry['bytes'] / original:.2f})"
    )


def _exports(summary: dict) -> str:
    """The deployable copies the recipe's `export` list wrote, with their sizes and types."""
    exports = summary.get("exports") or []
    if not exports:
        return ""
    lines = [f"- {entry['format']}: {entry['line']}{_beside_original(entry)}" for entry in exports]
    return "\n".join(["## Exports", "", *lines])


# ---------------------------------------------------------------- writing
def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename it over `path`: readers never see half a file."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), 0o644)  # mkstemp makes 0600 files: a report is meant to be shared
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def write_report(summary: dict, out_dir: Path) -> dict[str, Path]:
    """Write report.md, report.json and plots/*.png into `out_dir`; returns the paths written, keyed
    "markdown", "json" and the plot names ("quality", "size", "speed", "memory", "tradeoff")."""
    out_dir = Path(out_dir)
    images = report_plots.render_plots(summary)  # rendered before anything is written: a failure here changes nothing
    plots = {name: Path("plots") / f"{name}.png" for name in images}  # relative: the links in report.md
    markdown = render_markdown(summary, plots)
    table = comparison_rows(summary)
    report_json = json.dumps({**summary, "table": table}, indent=2, ensure_ascii=False, default=str)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    written = {name: out_dir / path for name, path in plots.items()}
    for name, image in images.items():
        atomic_write(written[name], image)
    atomic_write(out_dir / "report.json", report_json.encode("utf-8"))
    atomic_write(out_dir / "report.md", markdown.encode("utf-8"))
    for name in set(PLOT_NAMES) - set(images):  # a plot left by an earlier run would contradict this report
        (out_dir / "plots" / f"{name}.png").unlink(missing_ok=True)
    return {"markdown": out_dir / "report.md", "json": out_dir / "report.json", **written}
