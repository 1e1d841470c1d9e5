"""The run report: report.md, report.json and PNG plots comparing the original with every stage's model.

Write semantics: everything (plots, JSON, Markdown) is rendered in memory first, then each file is written
atomically (a temp file in the same folder, then ``os.replace``), plots first and report.md last. A failure
while rendering (e.g. a plot that raises) leaves the previous report untouched; a failure while writing
leaves every file whole (old or new). Either way no temp file stays behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from slimlm.evaluate.records import Record

ORIGINAL = "original"
MISSING = "—"  # the model has no such record, or its value is None with no reason given
NOT_AVAILABLE = "n/a"  # the value is None and the record's note says why
PLOT_NAMES = ("quality", "size", "speed", "memory", "tradeoff")
_FOOTPRINT_TASKS = ("size", "memory", "speed")  # listed after the quality tasks, in this order
_FRACTION_METRICS = {"acc", "acc_norm", "exact_match", "f1", "top1_agreement"}
_ORIGINAL_COLOUR, _STAGE_COLOUR = "#8c8c8c", "#1f77b4"


# ---------------------------------------------------------------- models, records, number formatting
def model_columns(summary: dict) -> list[tuple[str, list[dict]]]:
    """(label, record dicts) of the original, then of each stage in recipe order."""
    columns = [(ORIGINAL, (summary.get("original") or {}).get("records") or [])]
    return columns + [(stage["label"], stage.get("records") or []) for stage in summary.get("stages") or []]


def _index(records: list[dict]) -> dict[tuple[str, str], dict]:
    return {(record["task"], record["metric"]): record for record in records}


def _row_keys(columns: list[tuple[str, list[dict]]]) -> list[tuple[str, str]]:
    """Every (task, metric) of any model: quality tasks in order of appearance, then size, memory, speed."""
    keys = list(dict.fromkeys((r["task"], r["metric"]) for _, records in columns for r in records))
    tasks = list(dict.fromkeys(task for task, _ in keys))
    footprint = {task: i + 1 for i, task in enumerate(_FOOTPRINT_TASKS)}
    # sorted() is stable: metrics keep their order of appearance within a task.
    return sorted(keys, key=lambda key: (footprint.get(key[0], 0), tasks.index(key[0])))


def _is_bytes(metric: str, unit: str) -> bool:
    if unit:
        return unit.lower() in ("b", "byte", "bytes")
    return metric.endswith("_bytes") or metric.startswith("peak_rss") or metric == "size_on_disk"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def format_value(value: float | None, metric: str, unit: str = "") -> str:
    """A figure in the precision its metric deserves (metric may carry an lm-eval filter: ``f1,none``)."""
    if value is None:
        return MISSING
    if not math.isfinite(value):
        return str(value)
    base = metric.split(",")[0]
    if _is_bytes(base, unit):
        return human_bytes(value)
    if base.startswith("params"):
        return f"{value / 1e6:,.2f} M" if abs(value) >= 1e6 else f"{value:,.0f}"
    if base in ("perplexity", "word_perplexity"):
        return f"{value:,.2f}"
    if base == "kl_divergence":
        return f"{value:#.4g}"  # '#' keeps trailing zeros: four significant digits always
    if unit == "fraction" or base in _FRACTION_METRICS:
        return f"{value:.4f}"
    if base.startswith("bits_per"):
        return f"{value:.2f}" if base == "bits_per_weight" else f"{value:.3f}"
    if "per_s" in base or base.endswith("_ms") or unit == "ms":
        return f"{value:,.1f}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:#.4g}".rstrip(".")


def format_ratio(ratio: float) -> str:
    text = f"{ratio:.2f}" if ratio >= 0.01 else f"{ratio:.2g}"
    if text == "1.00" and ratio != 1:
        text = f"{ratio:.3f}"  # a 0.3 % change should not read as "no change"
    return f"×{text}"


def _kernel(record: dict | None) -> str:
    return str((record or {}).get("protocol", {}).get("kernel") or "")


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
    if record.get("note"):
        text += " *"  # e.g. "simulated (fake-quant)": the note, printed below the table, qualifies the number
    if _kernel(record):
        # Speed depends on the kernel: a dequantized or dense run is no real low-bit speedup, so say which.
        text += f" [{_kernel(record)}]"
    return text, ratio


def _heading(metric: str, unit: str, higher_is_better: bool | None) -> str:
    shown_unit = "" if _is_bytes(metric, unit) else unit  # byte cells carry their own KiB/MiB/GiB
    arrow = {True: " ↑", False: " ↓"}.get(higher_is_better, "")
    return f"{metric}{f' ({shown_unit})' if shown_unit else ''}{arrow}"


def comparison_rows(summary: dict) -> list[dict[str, Any]]:
    """One row per (task, metric) of any model: raw values, ratios to the original and the cell texts,
    each keyed by model label ("original", then the stage labels)."""
    columns = [(label, _index(records)) for label, records in model_columns(summary)]
    originals = columns[0][1]
    rows = []
    for key in _row_keys(model_columns(summary)):
        found = [(label, records.get(key)) for label, records in columns]
        first = next(record for _, record in found if record is not None)
        row = {"task": key[0], "metric": key[1], "unit": first.get("unit", ""),
               "higher_is_better": first.get("higher_is_better"),
               "heading": _heading(key[1], first.get("unit", ""), first.get("higher_is_better")),
               "values": {}, "ratios": {}, "cells": {}}
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
    return "\n".join([
        f"# slimlm report: {model}", "",
        f"Created {summary.get('created', '?')} by slimlm {summary.get('slimlm_version', '?')}.", "",
        "## Original model", "",
        f"Source `{original.get('source', '?')}`, file `{original.get('path', '?')}`{cached}.", "",
        original.get("description", ""), "",
        "## Recipe", "", "```yaml", recipe_yaml.rstrip(), "```",
    ])


def _table(summary: dict) -> str:
    labels = [label for label, _ in model_columns(summary)]
    lines = [
        "## Comparison", "",
        f"Stage cells: value (×ratio to the original). `[kernel]`: the kernel a speed figure was measured with "
        f"(\"dense\" or \"dequantized\" is no real low-bit speedup). {MISSING}: not measured; "
        f"{NOT_AVAILABLE}: could not be measured; *: see the notes below. ↓/↑: lower/higher is better.", "",
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
        lines += ["", f"### {task}", ""] + _grouped(
            [(f"`{Record.from_dict(r).protocol_line() or 'no protocol recorded'}`", label, r["metric"])
             for label, r in entries])
        notes = _grouped([(f"note: {r['note']}", label, r["metric"]) for label, r in entries if r.get("note")])
        lines += notes
    return "\n".join(lines)


def _stage_details(summary: dict) -> str:
    lines = ["## Stages"]
    for stage in summary.get("stages") or []:
        options = ", ".join(f"{key}={value}" for key, value in (stage.get("options") or {}).items())
        seconds = stage.get("seconds")
        lines += ["", f"### {stage['label']} ({stage.get('name', '?')})", "",
                  f"- options: `{options or 'defaults'}`",
                  f"- time: {f'{seconds:,.1f} s' if isinstance(seconds, (int, float)) else MISSING}",
                  f"- folder: `{stage.get('folder', '?')}`"]
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
    sections = [_header(summary), _table(summary), images if plots else "", _protocols(summary),
                _stage_details(summary), _machine(summary)]
    return "\n\n".join(section for section in sections if section) + "\n"


# ---------------------------------------------------------------- plots
def _perplexity_task(summary: dict) -> str | None:
    """The task whose perplexity is plotted: wikitext2 when present, else the first with a perplexity."""
    tasks = [task for task, metric in _row_keys(model_columns(summary)) if metric == "perplexity"]
    return "wikitext2" if "wikitext2" in tasks else (tasks[0] if tasks else None)


def _entries(summary: dict, task: str | None, metric: str) -> list[tuple[str, dict | None]] | None:
    """(label, record) per model, or None when no model has a usable value (the panel is then skipped)."""
    entries = [(label, _index(records).get((task, metric))) for label, records in model_columns(summary)]
    return entries if any(_finite(record) for _, record in entries) else None


def _finite(record: dict | None) -> bool:
    value = (record or {}).get("value")
    return isinstance(value, (int, float)) and math.isfinite(value)


def _axis_scale(metric: str, unit: str, largest: float) -> tuple[float, str]:
    """Divisor and unit name for an axis: bytes in MiB or GiB, parameter counts in millions."""
    if _is_bytes(metric, unit):
        return (2**30, "GiB") if largest >= 10 * 2**30 else (2**20, "MiB")
    if metric.startswith("params"):
        return 1e6, "millions"
    return 1.0, unit


def _draw_bars(ax, task: str, metric: str, entries: list[tuple[str, dict | None]]) -> None:
    first = next(record for _, record in entries if _finite(record))
    unit, better = first.get("unit", ""), first.get("higher_is_better")
    scale, axis_unit = _axis_scale(metric, unit, max(r["value"] for _, r in entries if _finite(r)))
    top, missing = 0.0, []
    for i, (label, record) in enumerate(entries):
        colour = _ORIGINAL_COLOUR if label == ORIGINAL else _STAGE_COLOUR
        if not _finite(record):
            missing.append((i, NOT_AVAILABLE if record is not None else "not measured"))
            continue
        height = record["value"] / scale
        top = max(top, height)
        ax.bar(i, height, width=0.6, color=colour)
        text = format_value(record["value"], metric, unit) + (f"\n[{_kernel(record)}]" if _kernel(record) else "")
        ax.annotate(text, (i, height), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylim(0, (top or 1) * 1.25)  # head room for the value labels
    for i, text in missing:  # say so where the bar would be, rather than leave a gap that reads as zero
        ax.text(i, top * 0.03, text, ha="center", va="bottom", fontsize=8, color="dimgray", style="italic")
    ax.set_xticks(range(len(entries)), [label for label, _ in entries],
                  rotation=25 if len(entries) > 3 else 0, ha="right" if len(entries) > 3 else "center")
    direction = {True: " (higher is better)", False: " (lower is better)"}.get(better, "")
    ax.set_title(f"{task}: {metric}{direction}", fontsize=10)
    ax.set_ylabel(f"{metric} ({axis_unit})" if axis_unit else metric)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _bar_figure(summary: dict, title: str, panels: list[tuple[str | None, str]]) -> bytes | None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg renders the PNG

    drawn = [(task, metric, entries) for task, metric in panels if (entries := _entries(summary, task, metric))]
    if not drawn:
        return None
    models = len(model_columns(summary))
    width = max(4.8, 1.1 * models + 1.5)
    # Panels side by side while they are narrow; stacked once many stages would make the figure too wide.
    rows, columns = (len(drawn), 1) if models > 4 else (1, len(drawn))
    figure = Figure(figsize=(width * columns, 4.4 * rows), layout="constrained")
    for ax, (task, metric, entries) in zip(figure.subplots(rows, columns, squeeze=False).flat, drawn):
        _draw_bars(ax, task, metric, entries)
    figure.suptitle(title, fontweight="bold")
    return _png(figure)


def _tradeoff_figure(summary: dict, task: str | None) -> bytes | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes, quality = _entries(summary, "size", "size_on_disk"), _entries(summary, task, "perplexity")
    points = [(label, s["value"] / 2**20, q["value"]) for (label, s), (_, q) in zip(sizes or [], quality or [])
              if _finite(s) and _finite(q)]
    if not points:
        return None
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(figure)  # a renderer to measure the labels with (see _declutter)
    ax = figure.subplots()
    middle = (min(p[1] for p in points) + max(p[1] for p in points)) / 2
    texts = []
    for label, size, perplexity in points:
        original = label == ORIGINAL
        ax.scatter(size, perplexity, s=70, marker="s" if original else "o", zorder=3,
                   color=_ORIGINAL_COLOUR if original else _STAGE_COLOUR)
        right = size > middle  # labels point inwards: no text past the right edge
        texts.append(ax.annotate(label, (size, perplexity), xytext=(-7 if right else 7, 4), fontsize=8,
                                 textcoords="offset points", ha="right" if right else "left", va="bottom"))
    ax.scatter([], [], marker="s", color=_ORIGINAL_COLOUR, label="original (reference)")
    ax.scatter([], [], marker="o", color=_STAGE_COLOUR, label="stages")
    ax.margins(x=0.25, y=0.25)  # room for the labels inside the axes
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)  # outside: never over a point or label
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel(f"{task} perplexity")
    ax.set_title(f"Size vs quality: lower-left is better ({task})", fontsize=10)
    ax.grid(alpha=0.3)
    _declutter(figure, texts)
    return _png(figure)


def _declutter(figure, texts) -> None:
    """Lift labels that overlap a lower one: stages close in size and quality would print on top of each other."""
    figure.draw_without_rendering()  # lay the figure out so the label boxes are where they will be drawn
    renderer = figure.canvas.get_renderer()
    placed = []
    for text in sorted(texts, key=lambda t: t.xy[1]):
        for _ in range(len(texts)):
            box = text.get_window_extent(renderer)
            clash = next((other for other in placed if other.overlaps(box)), None)
            if clash is None:
                break
            x, y = text.xyann
            text.xyann = (x, y + (clash.y1 - box.y0) * 72 / figure.dpi + 1)
        placed.append(text.get_window_extent(renderer))


def render_plots(summary: dict) -> dict[str, bytes]:
    """PNG bytes per plot name; a plot whose metrics no model has is left out."""
    task = _perplexity_task(summary)
    images = {
        "quality": _bar_figure(summary, "Quality", [(task, "perplexity"), (task, "kl_divergence")]),
        "size": _bar_figure(summary, "Size", [("size", "size_on_disk"), ("size", "params_nonzero")]),
        "speed": _bar_figure(summary, "Speed", [("speed", "decode_tokens_per_s"), ("speed", "prefill_ms")]),
        "memory": _bar_figure(summary, "Memory", [("memory", "peak_rss_eval"), ("memory", "peak_rss_stage")]),
        "tradeoff": _tradeoff_figure(summary, task),
    }
    return {name: image for name, image in images.items() if image is not None}


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
    images = render_plots(summary)  # rendered before anything is written: a failure here changes nothing
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
