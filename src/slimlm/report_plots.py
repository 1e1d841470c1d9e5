"""The report's PNG plots: quality, size, speed, memory and the size/perplexity trade-off, original vs stages."""

from __future__ import annotations

import io
import math

from slimlm.report_common import (
    NOT_AVAILABLE,
    ORIGINAL,
    format_value,
    index_records,
    is_busy,
    is_bytes,
    kernel_of,
    model_columns,
    row_keys,
)

_ORIGINAL_COLOUR, _STAGE_COLOUR = "#8c8c8c", "#1f77b4"


def _perplexity_task(summary: dict) -> str | None:
    """The task whose perplexity is plotted: wikitext2 when present, else the first with a perplexity."""
    tasks = [task for task, metric in row_keys(model_columns(summary)) if metric == "perplexity"]
    return "wikitext2" if "wikitext2" in tasks else (tasks[0] if tasks else None)


def _entries(summary: dict, task: str | None, metric: str) -> list[tuple[str, dict | None]] | None:
    """(label, record) per model, or None when no model has a usable value (the panel is then skipped)."""
    entries = [(label, index_records(records).get((task, metric))) for label, records in model_columns(summary)]
    return entries if any(_finite(record) for _, record in entries) else None


def _finite(record: dict | None) -> bool:
    value = (record or {}).get("value")
    return isinstance(value, (int, float)) and math.isfinite(value)


def _axis_scale(metric: str, unit: str, largest: float) -> tuple[float, str]:
    """Divisor and unit name for an axis: bytes in MiB or GiB, parameter counts in millions."""
    if is_bytes(metric, unit):
        return (2**30, "GiB") if largest >= 10 * 2**30 else (2**20, "MiB")
    if metric.startswith("params"):
        return 1e6, "millions"
    return 1.0, unit


def _draw_bar(ax, i: int, record: dict, scale: float, colour: str) -> float:
    """One model's bar, its runs' range as an error bar, its label; a busy-machine figure is hatched, faded and
    labelled so, not drawn as a plain result. Returns the bar's top (with the range)."""
    height, busy, spread = record["value"] / scale, is_busy(record), record.get("spread")
    ax.bar(i, height, width=0.6, color=colour, alpha=0.45 if busy else 1.0, hatch="//" if busy else None)
    top = height
    if spread:
        low, high = spread[0] / scale, spread[1] / scale
        ax.errorbar(i, height, yerr=[[height - low], [high - height]], fmt="none", ecolor="black", capsize=3, lw=1)
        top = max(top, high)
    metric, unit = record["metric"], record.get("unit", "")
    text = format_value(record["value"], metric, unit) + (f"\n[{kernel_of(record)}]" if kernel_of(record) else "")
    text += "\nbusy machine" if busy else ""
    ax.annotate(text, (i, top), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
    return top


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
        top = max(top, _draw_bar(ax, i, record, scale, colour))
    ax.set_ylim(0, (top or 1) * 1.25)  # head room for the value labels
    for i, text in missing:  # say so where the bar would be, rather than leave a gap that reads as zero
        ax.text(i, top * 0.03, text, ha="center", va="bottom", fontsize=8, color="dimgray", style="italic")
    ax.set_xticks(
        range(len(entries)),
        [label for label, _ in entries],
        rotation=25 if len(entries) > 3 else 0,
        ha="right" if len(entries) > 3 else "center",
    )
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
    points = [
        (label, s["value"] / 2**20, q["value"])
        for (label, s), (_, q) in zip(sizes or [], quality or [])
        if _finite(s) and _finite(q)
    ]
    if not points:
        return None
    figure = Figure(figsize=(6.4, 4.6), layout="constrained")
    FigureCanvasAgg(figure)  # a renderer to measure the labels with (see _declutter)
    ax = figure.subplots()
    middle = (min(p[1] for p in points) + max(p[1] for p in points)) / 2
    texts = []
    for label, size, perplexity in points:
        original = label == ORIGINAL
        ax.scatter(
            size,
            perplexity,
            s=70,
            marker="s" if original else "o",
            zorder=3,
            color=_ORIGINAL_COLOUR if original else _STAGE_COLOUR,
        )
        right = size > middle  # labels point inwards: no text past the right edge
        texts.append(
            ax.annotate(
                label,
                (size, perplexity),
                xytext=(-7 if right else 7, 4),
                fontsize=8,
                textcoords="offset points",
                ha="right" if right else "left",
                va="bottom",
            )
        )
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
