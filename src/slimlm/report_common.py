"""What the report (report.py) and its plots (report_plots.py) share: the models of a run summary, their records
by (task, metric), and every figure formatted in the precision its metric deserves. Both import from here, and
report_plots never imports report: the import arrow between the two points one way.
"""

from __future__ import annotations

import math

ORIGINAL = "original"
MISSING = "—"  # the model has no such record, or its value is None with no reason given
NOT_AVAILABLE = "n/a"  # the value is None and the record's note says why
_FOOTPRINT_TASKS = ("size", "memory", "speed")  # listed after the quality tasks, in this order
_FRACTION_METRICS = {"acc", "acc_norm", "exact_match", "f1", "top1_agreement"}


def model_columns(summary: dict) -> list[tuple[str, list[dict]]]:
    """(label, record dicts) of the original, then of each stage in recipe order."""
    columns = [(ORIGINAL, (summary.get("original") or {}).get("records") or [])]
    return columns + [(stage["label"], stage.get("records") or []) for stage in summary.get("stages") or []]


def index_records(records: list[dict]) -> dict[tuple[str, str], dict]:
    return {(record["task"], record["metric"]): record for record in records}


def row_keys(columns: list[tuple[str, list[dict]]]) -> list[tuple[str, str]]:
    """Every (task, metric) of any model: quality tasks in order of appearance, then size, memory, speed."""
    keys = list(dict.fromkeys((r["task"], r["metric"]) for _, records in columns for r in records))
    tasks = list(dict.fromkeys(task for task, _ in keys))
    footprint = {task: i + 1 for i, task in enumerate(_FOOTPRINT_TASKS)}
    # sorted() is stable: metrics keep their order of appearance within a task.
    return sorted(keys, key=lambda key: (footprint.get(key[0], 0), tasks.index(key[0])))


def is_bytes(metric: str, unit: str) -> bool:
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
    if is_bytes(base, unit):
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


def kernel_of(record: dict | None) -> str:
    return str((record or {}).get("protocol", {}).get("kernel") or "")


def is_busy(record: dict | None) -> bool:
    """A speed figure measured while other work loaded the machine (evaluate/speed.py): shown flagged, never plain."""
    return bool((record or {}).get("protocol", {}).get("busy"))


def spread_text(record: dict) -> str:
    """ "lo–hi" of the runs a median was taken from, "" when the record has no spread."""
    spread = record.get("spread")
    if not spread:
        return ""
    return "–".join(format_value(value, record["metric"], record.get("unit", "")) for value in spread)
