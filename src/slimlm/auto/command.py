"""The `slimlm auto` command (registered by cli.py). Imports nothing heavy at module level: cli imports it at start."""

from __future__ import annotations

import typer


def auto_command(
    model: str = typer.Option(..., "--model", help="Model to compress: 'smollm2-135m', a folder or a hub id."),
    budget: str = typer.Option(
        ...,
        "--budget",
        help="A file size (70MB, 88.2MiB), bits per weight (3.5bpw) or a decode latency (5ms/token).",
    ),
    target: str = typer.Option("gguf", "--target", help="gguf (llama.cpp types per tensor) or slimlm (a recipe)."),
    output: str = typer.Option("runs/auto", "--output", help="Folder for the report, the model and the recipe."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run in --output (same settings)."),
    candidates: int = typer.Option(4, "--candidates", min=1, help="Solutions verified by real evaluation."),
    max_removed: int = typer.Option(4, "--max-removed", min=0, help="Decoder layers the search may remove."),
    calib_samples: int = typer.Option(2, "--calib-samples", min=1, help="Calibration windows for the sensitivity."),
    calib_seq_len: int = typer.Option(256, "--calib-seq-len", min=8, help="Tokens per calibration window."),
    eval_chunks: int = typer.Option(8, "--eval-chunks", min=1, help="WikiText-2 chunks of 512 tokens per score."),
    baselines: str = typer.Option(
        "", "--baselines", help="Comma list: llama.cpp types (gguf) or uniform formats like w4g64 (slimlm) to score."
    ),
    exclude: str = typer.Option("", "--exclude", help="Comma list of formats the search may not use (Q4_1, w2g64)."),
    mlp_keep: str = typer.Option(
        "",
        "--mlp-keep",
        help="Comma list of MLP widths the search may cut every layer to, as fractions of the channels (0.83,0.67).",
    ),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Time every row's decode in the target's runtime."),
    recover: int | None = typer.Option(
        None,
        "--recover",
        min=1,
        help="gguf: distill each candidate that removes layers for this many c4 tokens before export.",
    ),
) -> None:
    """Find the best compression of MODEL for a budget: sensitivity, allocation, candidates verified by evaluation,
    the export and a report with the size-vs-perplexity plot."""
    from slimlm.errors import SlimlmError

    if target not in ("gguf", "slimlm"):
        raise SlimlmError(f"--target {target!r}: not one of gguf, slimlm")
    from slimlm.auto.budget import parse_budget
    from slimlm.auto.run import AutoSettings, run_auto

    parse_budget(budget)  # a bad budget fails before any model loads
    settings = AutoSettings(
        model=model,
        budget=budget,
        target=target,
        output=output,
        resume=resume,
        candidates=candidates,
        max_removed=max_removed,
        calib_samples=calib_samples,
        calib_seq_len=calib_seq_len,
        eval_chunks=eval_chunks,
        baselines=[b.strip() for b in baselines.split(",") if b.strip()],
        exclude=[x.strip() for x in exclude.split(",") if x.strip()],
        decode=decode,
        recover=recover,
        mlp_keep=_fractions(mlp_keep),
    )
    summary = run_auto(settings)
    best = next(r for r in summary["rows"] if r["label"] == summary["best"])
    speed = f", {best['decode_ms_per_token']:.2f} ms/token" if best.get("decode_ms_per_token") else ""
    typer.echo(
        f"{summary['best']}: {best['bytes']} bytes{speed} (budget {summary['budget']['text']}), "
        f"ppl {best['ppl']:.3f}; report {output}/report.md"
    )


def _fractions(text: str) -> list[float]:
    from slimlm.errors import SlimlmError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SlimlmError(
            f"--mlp-keep {text!r}: give fractions of the MLP's channels, comma-separated (0.83,0.67)"
        ) from None
