"""The `slimlm` command. It knows recipes, models and records, nothing of any method's internals."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from slimlm.errors import SlimlmError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make language models small and fast, honestly.")
_out = Console()
_err = Console(stderr=True)

EVAL_TASKS = "wikitext2|wikitext2-valid|c4|triviaqa|piqa|arc_easy|boolq|hellaswag|sst2 (or any lm-eval task, or a text file)"


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """Prune, quantize, distill and evaluate LLaMA-family models."""


def _records_table(title: str, records) -> Table:
    table = Table(title=title)
    for column in ("task", "metric", "value", "unit", "protocol"):
        table.add_column(column, overflow="fold")
    for r in records:
        value = "n/a" if r.value is None else f"{r.value:.6g}"
        table.add_row(r.task, r.metric, value, r.unit, r.protocol_line() + (f" — {r.note}" if r.note else ""))
    return table


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", help="Built-in name, HF folder, hub id or .gguf file."),
    task: List[str] = typer.Option(["wikitext2"], "--task", help=EVAL_TASKS),
    seq_len: int = typer.Option(2048, "--seq-len", min=8, help="Perplexity window length in tokens."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Perplexity windows / task documents to use."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Model to compute KL and top-1 agreement against."),
    speed: bool = typer.Option(False, "--speed", help="Also measure prefill latency and decode speed."),
    dtype: str = typer.Option("float32", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load .bin/.pt weights (can run arbitrary code)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result records as JSON on stdout, nothing else."),
) -> None:
    """Evaluate a model with slimlm's pinned protocol."""
    from slimlm.evaluate.suite import evaluate_model
    from slimlm.models import load_model
    from slimlm.recipe import EvaluateConfig

    config = EvaluateConfig(tasks=task, seq_len=seq_len, limit=limit, task_limit=limit, speed=speed)
    # Libraries print to stdout (lm-eval, transformers); with --json stdout must hold only the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_model(model, dtype, allow_pickle=allow_pickle)
        ref = load_model(reference, dtype, allow_pickle=allow_pickle).model if reference else None
        records = evaluate_model(loaded.model, loaded.tokenizer, config, ref, loaded.source.weights_path)
    if as_json:
        payload = {"model": model, "description": loaded.source.description, "records": [r.to_dict() for r in records]}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    _out.print(loaded.source.description)
    _out.print(_records_table(f"slimlm eval — {model}", records))


@app.command("compress")
def compress_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last finished stage."),
    output: Optional[str] = typer.Option(None, "--output", help="Override the recipe's output folder."),
) -> None:
    """Run a recipe: stages in order, a saved model after each, and a report beside the original."""
    from slimlm.pipeline import run_recipe
    from slimlm.recipe import load_recipe
    from slimlm.report import render_markdown

    parsed = load_recipe(recipe)
    if output:
        parsed.output = output
    summary = run_recipe(parsed, resume=resume)
    _out.print(render_markdown(summary))
    _out.print(f"[bold]model:[/] {Path(parsed.output) / summary['model_folder']}   [bold]report:[/] "
               f"{Path(parsed.output) / 'report.md'}")


@app.command("info")
def info_command(
    model: str = typer.Argument(..., help="Built-in name, HF folder, hub id or .gguf file."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="Show sparsity per decoder Linear."),
) -> None:
    """Architecture, parameters, sizes, dtypes and per-layer sparsity of a model."""
    from slimlm.evaluate.footprint import footprint_records, layer_sparsity
    from slimlm.models import load_model

    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_model(model, allow_pickle=allow_pickle)
    m = loaded.model
    _out.print(f"[bold]{model}[/]: {type(m).__name__}, {m.config.num_hidden_layers} layers, hidden "
               f"{m.config.hidden_size}, {m.config.num_attention_heads} heads / {m.config.num_key_value_heads} KV heads")
    _out.print(loaded.source.description)
    if loaded.source.gguf_types:
        _out.print("GGUF tensor types: " + ", ".join(f"{k}: {v}" for k, v in loaded.source.gguf_types.items()))
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in m.parameters()})
    _out.print(f"in-memory dtypes: {', '.join(dtypes)}")
    _out.print(_records_table("size", footprint_records(m, loaded.source.weights_path)))
    if layers:
        table = Table(title="sparsity per decoder Linear")
        for column in ("layer", "shape", "sparsity"):
            table.add_column(column)
        for row in layer_sparsity(m):
            table.add_row(row["name"], "×".join(map(str, row["shape"])), f"{row['sparsity']:.1%}")
        _out.print(table)


def main() -> None:
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except SlimlmError as err:
        if debug:
            raise
        _err.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        _err.print("aborted")
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - one line unless --debug, whatever broke
        if debug:
            raise
        import click

        if isinstance(err, click.exceptions.ClickException):
            err.show()
            sys.exit(err.exit_code)
        first_line = (str(err).splitlines() or [""])[0]
        _err.print(f"error: {type(err).__name__}: {first_line} (run with --debug for the traceback)",
                   markup=False, highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
