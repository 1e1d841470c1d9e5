"""The `slimlm auto` report: report.md, report.json, pareto.png, and the chosen solution in runnable form.

- slimlm target: ``recipe.yaml`` is the answer's recipe (`slimlm compress recipe.yaml` makes that model): the best
  candidate's, or a uniform row's that fits the budget and measured better (chosen_row).
- gguf target: ``model.gguf`` is the answer's file; ``recipe.yaml`` a recipe with no stages whose gguf
  export (tensor_types, prune_layers) makes that same file with llama-quantize (`slimlm compress recipe.yaml`);
  ``tensor_types.txt`` and ``quantize.sh`` the bare llama-quantize call, for users without slimlm.

The best candidate is the one with the lowest measured KL divergence to the original (perplexity when no KL was
measured). Proxy-vs-real agreement is Spearman's rank correlation between the predicted KL and the measured one
over every row that has both (candidates and the uniform mixes).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

from slimlm.auto.widths import width_stage
from slimlm.pipeline import write_json_atomic
from slimlm.report_common import human_bytes


def spearman(rows: list[dict], real: str = "kld") -> float | None:
    """Rank correlation of proxy_kl with the measured `real` figure over rows having both (None below 3)."""
    from scipy.stats import spearmanr

    pairs = [(r["proxy_kl"], r[real]) for r in rows if r.get("proxy_kl") is not None and r.get(real) is not None]
    if len(pairs) < 3:
        return None
    return float(spearmanr(*zip(*pairs, strict=True)).statistic)


def best_candidate(rows: list[dict]) -> dict:
    metric = _metric(rows)
    return min(_candidates(rows), key=lambda r: r[metric])


def _candidates(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["label"].startswith("candidate")]


def _metric(rows: list[dict]) -> str:
    """What ranks the candidates: KL when every candidate has it, else perplexity."""
    return "kld" if all(r.get("kld") is not None for r in _candidates(rows)) else "ppl"


def chosen_row(rows: list[dict], budget: dict) -> dict:
    """What auto answers with: the best candidate, unless a uniform row scored beside it fits the budget (by the
    same prediction the candidates were chosen by) and measured better; then that uniform recipe, so the answer is
    never worse than a uniform format the run compared it with."""
    metric, key = _metric(rows), "predicted_bytes" if budget["resource"] == "bytes" else "predicted_ms_per_token"
    uniform = [r for r in rows if r["label"].startswith("uniform") and r.get(key) is not None]
    fitting = [r for r in uniform if r[key] <= budget["amount"] and r.get(metric) is not None]
    return min([best_candidate(rows), *fitting], key=lambda r: r[metric])  # a tie keeps the candidate


def pareto_png(rows: list[dict], budget: int | None, title: str, latency_budget: float | None = None) -> bytes:
    """Size vs perplexity, and decode ms/token vs perplexity beside it when the rows were timed; the budget's
    line on its own panel (`budget` in bytes, `latency_budget` in ms/token)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    timed = any(r.get("decode_ms_per_token") for r in rows)
    figure, axes = plt.subplots(1, 2 if timed else 1, figsize=(14 if timed else 8, 5), squeeze=False)
    _panel(axes[0][0], rows, lambda r: r["bytes"] / 1e6, "size (MB)", budget and budget / 1e6)
    if timed:
        _panel(axes[0][1], rows, lambda r: r.get("decode_ms_per_token"), "llama.cpp decode (ms/token)", latency_budget)
    figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _panel(ax, rows: list[dict], x, xlabel: str, limit: float | None) -> None:
    styles = {"candidate": ("o", "tab:red"), "uniform": ("s", "tab:blue"), "llama.cpp": ("^", "tab:green")}
    for kind, (marker, colour) in styles.items():
        chosen = [r for r in rows if r["label"].startswith(kind) and r.get("ppl") is not None and x(r) is not None]
        if chosen:
            ax.scatter([x(r) for r in chosen], [r["ppl"] for r in chosen], marker=marker, c=colour, label=kind)
            for r in chosen:
                ax.annotate(
                    r["label"].split(" ", 1)[-1],
                    (x(r), r["ppl"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    if limit:
        ax.axvline(limit, color="grey", linestyle="--", label="budget")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def _table(rows: list[dict]) -> list[str]:
    lines = [
        "| row | size | predicted | proxy KL | ppl | KL | decode tok/s | ms/token (predicted) | removed layers "
        "| MLP channels |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        proxy = f"{r['proxy_kl']:.4f}" if r.get("proxy_kl") is not None else "—"
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else "—"
        predicted = human_bytes(r["predicted_bytes"]) if r.get("predicted_bytes") else "—"
        removed = ",".join(map(str, r.get("removed") or [])) or "—"
        lines.append(
            f"| {r['label']} | {human_bytes(r['bytes'])} ({r['bytes']}) | {predicted} | {proxy} | {r['ppl']:.3f} | "
            f"{kld} | {_speed(r)} | {removed} | {r.get('mlp_channels') or 'all'} |"
        )
    return lines


def _speed(row: dict) -> str:
    """decode tok/s ± sd, then measured ms/token (median repetition) and the latency model's prediction."""
    if row.get("decode_tps") is None:
        return "— | —"
    predicted = row.get("predicted_ms_per_token")
    return f"{row['decode_tps']:.1f} ± {row['decode_tps_sd'] or 0:.1f} | {row['decode_ms_per_token']:.2f} " + (
        f"({predicted:.2f})" if predicted else "(—)"
    )


def _latency_lines(summary: dict) -> list[str]:
    model = summary.get("latency_model")
    if not model:
        return []
    parts = []
    kinds = {
        "candidates": "candidates",
        "llamacpp": "llama.cpp's mixes",
        "uniform": "uniform mixes (the fitted types timed again: the noise)",
    }
    for kind, name in kinds.items():
        found = model.get(f"agreement_{kind}")
        if found:
            parts.append(
                f"{name} {found['mean_abs_rel_error']:.0%} mean, {found['max_abs_rel_error']:.0%} max "
                f"({found['rows']} rows, mean signed {found['mean_rel_error']:+.0%})"
            )
    loads = [r["decode_loadavg_1min"] for r in summary["rows"] if r.get("decode_loadavg_1min") is not None]
    load = f" 1-min load average during the timings {min(loads):.1f}-{max(loads):.1f}." if loads else ""
    return [
        "Latency model (Σ matrix params × a rate per format, fitted on the dense and uniform outputs): predicted vs "
        "measured ms/token off by " + ("; ".join(parts) or "— (no row timed)") + "." + load,
    ]


def _recovery_lines(summary: dict) -> list[str]:
    recovery = summary.get("recovery")
    if not recovery:
        return []
    found = [
        f"{r['label']} (layers {','.join(map(str, r['removed']))}): KL {r['kld_before']:.4f} → {r['kld_after']:.4f}"
        + (f" ({r['kl_left']:.0%} left)" if r["kl_left"] is not None else "")
        for r in recovery["rows"]
    ]
    return [
        f"Recovery: {recovery['tokens']:,} tokens of c4 distillation after layer removal; the search counted "
        f"{recovery['removal_kl_left_assumed']:.0%} of each removal's measured KL. "
        + ("; ".join(found) if found else "No candidate removed layers, so none was trained.")
    ]


def write_report(summary: dict, out: Path, target) -> None:
    rows, budget = summary["rows"], summary["budget"]
    best = chosen_row(rows, budget)
    summary["best"] = best["label"]
    summary["spearman_proxy_vs_kld"] = spearman(rows, "kld")
    summary["spearman_proxy_vs_ppl"] = spearman(rows, "ppl")
    _write_solution(best, out, target, summary["settings"]["model"], summary.get("width_calibration"))
    title = f"{summary['settings']['model']} -> {target.name}, budget {budget['text']}"
    latency = budget["amount"] if budget.get("resource") == "ms_per_token" else None
    (out / "pareto.png").write_bytes(pareto_png(rows, budget["bytes"], title, latency))
    search = summary["search"]
    lines = [
        f"# slimlm auto: {title}",
        "",
        f"Budget {budget['text']}"
        + (f" = {budget['bytes']} bytes" if budget["bytes"] is not None else " of llama.cpp decode (predicted)")
        + f". Answer: **{best['label']}**"
        + (
            " (no searched candidate measured better than this uniform format, which fits)"
            if best is not best_candidate(rows)
            else ""
        )
        + " "
        f"({human_bytes(best['bytes'])}, ppl {best['ppl']:.3f}"
        + (f", KL {best['kld']:.4f}" if best.get("kld") is not None else "")
        + (f", {best['decode_ms_per_token']:.2f} ms/token" if best.get("decode_ms_per_token") else "")
        + ").",
        f"Reproduce it: `slimlm compress {out / 'recipe.yaml'}`.",
        "",
        f"Search: {search['items']} items, {search['options']} options, calibration {search['calibration']}; "
        f"{search['new_figures']} new sensitivity figures (cache {search['cache']}); "
        f"CPU {search['cpu_s']:.0f} s, wall {search['wall_s']:.0f} s up to the allocation.",
        f"Proxy vs real rank agreement (Spearman, candidates and uniform mixes): vs KL "
        f"{_fmt(summary['spearman_proxy_vs_kld'])}, vs perplexity {_fmt(summary['spearman_proxy_vs_ppl'])}.",
        *_latency_lines(summary),
        *_recovery_lines(summary),
        "",
        *_table(rows),
        "",
        "![size and decode latency vs perplexity](pareto.png)",
        "",
        "Scoring: " + _protocol(rows, target.name),
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_json_atomic(out / "report.json", summary)


def _fmt(value: float | None) -> str:
    return "— (fewer than 3 points)" if value is None else f"{value:.2f}"


def _protocol(rows: list[dict], target: str) -> str:
    if target == "gguf":
        command = next((r.get("command") for r in rows if r.get("command")), "")
        return f"llama-perplexity on WikiText-2 test, KL against the f32 GGUF's log-probs (`{command}`)."
    protocol = next((r.get("protocol") for r in rows if r.get("protocol")), {})
    return "slimlm perplexity_records, " + ", ".join(f"{k}={v}" for k, v in protocol.items())


def _write_solution(best: dict, out: Path, target, model: str, calibration: dict | None) -> None:
    if best.get("recipe"):  # made by running a recipe (the slimlm target, a recovered candidate): that is the answer
        shutil.copyfile(best["recipe"], out / "recipe.yaml")
    else:
        _write_gguf_recipe(best, out, target, model, calibration)
    if target.name == "gguf":
        final = out / "model.gguf"
        final.unlink(missing_ok=True)
        try:
            os.link(best["path"], final)
        except OSError:  # another file system
            shutil.copyfile(best["path"], final)


def _write_gguf_recipe(best: dict, out: Path, target, model: str, calibration: dict | None) -> None:
    import yaml

    from slimlm.export.mixed_types import BASE_TYPE

    # the gguf target's file as a recipe: no stages (the export is the compression) unless the MLP is cut, the float32
    # model exported as f32 and llama-quantized with the candidate's types (GGUFTarget.write: the same call, the same
    # base type)
    cut = best.get("mlp_channels")
    recipe = {
        "model": model,
        "dtype": "float32",
        **({"calibration": calibration, "stages": [width_stage(cut)]} if cut else {}),
        "evaluate": {"tasks": [], "speed": False},  # slimlm would score the unchanged model, not the GGUF
        "export": [
            {
                "format": "gguf",
                "tensor_types": best["formats"],
                "prune_layers": sorted(best["removed"]),
                "base_type": BASE_TYPE,
            }
        ],
        "output": str(out / "compress"),
    }
    (out / "recipe.yaml").write_text(
        f"# slimlm auto's {best['label']}: `slimlm compress recipe.yaml` writes {out / 'compress'}/export/model.gguf,\n"
        "# the tensors of model.gguf (llama-quantize of the f32 export with these types, these layers removed;\n"
        "# the MLP cut first when it has a prune_width stage).\n"
        "# Its llama-perplexity figures are in report.md; slimlm's evaluate would only score the unchanged model.\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    lines = [f"{name}={t}" for name, t in sorted(target.gguf_names(best["formats"]).items())]
    (out / "tensor_types.txt").write_text("\n".join(lines) + "\n")
    removed = ",".join(map(str, best["removed"]))
    prune = f" --prune-layers {removed}" if removed else ""
    source = "f32.gguf" if not cut else f"f32.gguf (of the model cut to {cut} MLP channels: recipe.yaml)"
    (out / "quantize.sh").write_text(
        f"# llama-quantize call making model.gguf from {source} (token_embd's type is in tensor_types.txt:\n"
        "# pass it as --token-embedding-type; the others as anchored --tensor-type-file patterns)\n"
        f"llama-quantize --pure --tensor-type-file tensor_types.txt{prune} f32.gguf model.gguf Q8_0\n"
    )
