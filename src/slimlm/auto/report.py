"""The `slimlm auto` report: report.md, report.json, pareto.png, and the chosen solution in runnable form.

- slimlm target: ``recipe.yaml`` is the best candidate's recipe (`slimlm compress recipe.yaml` makes that model).
- gguf target: ``model.gguf`` is the best candidate's file, ``tensor_types.txt`` and ``quantize.sh`` the
  llama-quantize call that makes it from the f32 GGUF (slimlm's recipe cannot run llama-quantize).

"Best" is the candidate with the lowest measured KL divergence to the original (perplexity when no KL was
measured). Proxy-vs-real agreement is Spearman's rank correlation between the predicted KL and the measured one
over every row that has both (candidates and the uniform mixes).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

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
    candidates = [r for r in rows if r["label"].startswith("candidate")]
    metric = "kld" if all(r.get("kld") is not None for r in candidates) else "ppl"
    return min(candidates, key=lambda r: r[metric])


def pareto_png(rows: list[dict], budget: int, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 5))
    styles = {"candidate": ("o", "tab:red"), "uniform": ("s", "tab:blue"), "llama.cpp": ("^", "tab:green")}
    for kind, (marker, colour) in styles.items():
        chosen = [r for r in rows if r["label"].startswith(kind) and r.get("ppl") is not None]
        if chosen:
            ax.scatter(
                [r["bytes"] / 1e6 for r in chosen], [r["ppl"] for r in chosen], marker=marker, c=colour, label=kind
            )
            for r in chosen:
                ax.annotate(
                    r["label"].split(" ", 1)[-1],
                    (r["bytes"] / 1e6, r["ppl"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.axvline(budget / 1e6, color="grey", linestyle="--", label="budget")
    ax.set_xlabel("size (MB)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _table(rows: list[dict]) -> list[str]:
    lines = ["| row | size | predicted | proxy KL | ppl | KL | removed layers |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        proxy = f"{r['proxy_kl']:.4f}" if r.get("proxy_kl") is not None else "—"
        kld = f"{r['kld']:.4f}" if r.get("kld") is not None else "—"
        predicted = human_bytes(r["predicted_bytes"]) if r.get("predicted_bytes") else "—"
        removed = ",".join(map(str, r.get("removed") or [])) or "—"
        lines.append(
            f"| {r['label']} | {human_bytes(r['bytes'])} ({r['bytes']}) | {predicted} | {proxy} | {r['ppl']:.3f} | "
            f"{kld} | {removed} |"
        )
    return lines


def write_report(summary: dict, out: Path, target) -> None:
    rows, budget = summary["rows"], summary["budget"]
    best = best_candidate(rows)
    summary["best"] = best["label"]
    summary["spearman_proxy_vs_kld"] = spearman(rows, "kld")
    summary["spearman_proxy_vs_ppl"] = spearman(rows, "ppl")
    _write_solution(best, out, target)
    title = f"{summary['settings']['model']} -> {target.name}, budget {budget['text']}"
    (out / "pareto.png").write_bytes(pareto_png(rows, budget["bytes"], title))
    search = summary["search"]
    lines = [
        f"# slimlm auto: {title}",
        "",
        f"Budget {budget['text']} = {budget['bytes']} bytes. Best candidate: **{best['label']}** "
        f"({human_bytes(best['bytes'])}, ppl {best['ppl']:.3f}"
        + (f", KL {best['kld']:.4f}" if best.get("kld") is not None else "")
        + ").",
        "",
        f"Search: {search['items']} items, {search['options']} options, calibration {search['calibration']}; "
        f"{search['new_figures']} new sensitivity figures (cache {search['cache']}); "
        f"CPU {search['cpu_s']:.0f} s, wall {search['wall_s']:.0f} s up to the allocation.",
        f"Proxy vs real rank agreement (Spearman, candidates and uniform mixes): vs KL "
        f"{_fmt(summary['spearman_proxy_vs_kld'])}, vs perplexity {_fmt(summary['spearman_proxy_vs_ppl'])}.",
        "",
        *_table(rows),
        "",
        "![size vs perplexity](pareto.png)",
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


def _write_solution(best: dict, out: Path, target) -> None:
    if target.name == "slimlm":
        shutil.copyfile(best["recipe"], out / "recipe.yaml")
        return
    lines = [f"{name}={t}" for name, t in sorted(target.gguf_names(best["formats"]).items())]
    (out / "tensor_types.txt").write_text("\n".join(lines) + "\n")
    removed = ",".join(map(str, best["removed"]))
    prune = f" --prune-layers {removed}" if removed else ""
    (out / "quantize.sh").write_text(
        "# llama-quantize call making model.gguf from the f32 GGUF (token_embd's type is in tensor_types.txt:\n"
        "# pass it as --token-embedding-type; the others as anchored --tensor-type-file patterns)\n"
        f"llama-quantize --pure --tensor-type-file tensor_types.txt{prune} f32.gguf model.gguf Q8_0\n"
    )
    final = out / "model.gguf"
    final.unlink(missing_ok=True)
    try:
        os.link(best["path"], final)
    except OSError:  # another file system
        shutil.copyfile(best["path"], final)
