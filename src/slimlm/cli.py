"""The `slimlm` command. It knows recipes, models and records, nothing of any method's internals."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import types
import typing
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slimlm.auto.command import auto_command
from slimlm.errors import SlimlmError
from slimlm.inference.command import chat_command, generate_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Make language models small and fast, honestly.")
_out = Console()
_err = Console(stderr=True)

EVAL_TASKS = (
    "wikitext2|wikitext2-valid|c4|triviaqa|piqa|arc_easy|boolq|hellaswag|sst2 (or any lm-eval task, or a text file)"
)


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    """Prune, quantize, distill and evaluate LLaMA-family models."""


def _value_text(record) -> str:
    if record.value is None:
        return "n/a"
    spread = f" ({record.spread[0]:.6g}–{record.spread[1]:.6g})" if record.spread else ""
    return f"{record.value:.6g}{spread}"


def _records_table(title: str, records) -> Table:
    table = Table(title=escape(title))
    for column in ("task", "metric", "value", "unit", "protocol"):
        table.add_column(column, overflow="fold")
    for r in records:
        protocol = r.protocol_line() + (f" — {r.note}" if r.note else "")
        # escape: rich would take "[dense]" or a path in brackets for markup and drop it
        table.add_row(*(escape(text) for text in (r.task, r.metric, _value_text(r), r.unit, protocol)))
    return table


@app.command("eval")
def eval_command(
    model: str = typer.Option(..., "--model", help="Built-in name, HF folder, hub id or .gguf file."),
    task: list[str] = typer.Option(["wikitext2"], "--task", help=EVAL_TASKS),
    seq_len: int | None = typer.Option(
        None, "--seq-len", min=8, max=1_000_000, help="Perplexity window in tokens (2048; llama.cpp: n_ctx, 512)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Perplexity windows / task documents to use."),
    reference: str | None = typer.Option(None, "--reference", help="Model to compute KL and top-1 agreement against."),
    speed: bool = typer.Option(False, "--speed", help="Also measure prefill latency and decode speed."),
    dtype: str = typer.Option("float32", "--dtype"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Load .bin/.pt weights (can run arbitrary code)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result records as JSON on stdout, nothing else."),
    protocol: str = typer.Option(
        "slimlm",
        "--protocol",
        help="Perplexity protocol: slimlm | llama.cpp (llama-perplexity's chunks: --seq-len is -c, --limit is "
        "--chunks, the second half of each chunk scored; KL as --kl-divergence).",
    ),
) -> None:
    """Evaluate a model with slimlm's pinned protocol (or llama-perplexity's, with --protocol llama.cpp)."""
    from slimlm.evaluate.suite import evaluate_model
    from slimlm.models import load_model
    from slimlm.recipe import EvaluateConfig

    if protocol not in ("slimlm", "llama.cpp"):
        raise typer.BadParameter(f"{protocol!r} is not one of 'slimlm', 'llama.cpp'", param_hint="'--protocol'")
    if protocol == "llama.cpp":  # the same records, perplexity scored as llama-perplexity scores it
        from slimlm.evaluate.llamacpp_protocol import DEFAULT_N_CTX
        from slimlm.evaluate.llamacpp_protocol import evaluate_model_llamacpp as evaluate_model
    seq_len = seq_len or (DEFAULT_N_CTX if protocol == "llama.cpp" else 2048)
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
    _out.print(loaded.source.description, markup=False)
    _out.print(_records_table(f"slimlm eval — {model}", records))


@app.command("compress")
def compress_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last finished stage."),
    output: str | None = typer.Option(None, "--output", help="Override the recipe's output folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the recipe (reads model configs, no weights)."),
) -> None:
    """Run a recipe: stages in order, a saved model after each, and a report beside the original."""
    from slimlm.pipeline import run_recipe
    from slimlm.recipe import check_recipe, load_recipe
    from slimlm.recover.distributed import is_main_process
    from slimlm.report import render_markdown

    parsed = load_recipe(recipe)
    if output:
        parsed.output = output
    if dry_run:
        check_recipe(parsed)
        _out.print(
            f"{recipe}: valid ({len(parsed.stages)} stages: {', '.join(s.name for s in parsed.stages)}); "
            f"would write {parsed.output}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        return
    summary = run_recipe(parsed, resume=resume)
    if not is_main_process():  # under accelerate launch: rank 0 prints the report it wrote
        return
    # soft_wrap: the Markdown report's table rows must stay whole lines, whatever the terminal width
    _out.print(render_markdown(summary), markup=False, highlight=False, soft_wrap=True)
    _out.print(
        f"model: {Path(parsed.output) / summary['model_folder']}   report: {Path(parsed.output) / 'report.md'}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


@app.command("export")
def export_command(
    model: str = typer.Argument(..., help="Built-in name, slimlm output folder, HF folder, hub id or .gguf file."),
    fmt: str = typer.Option(..., "--format", help="gguf (llama.cpp) | hf (plain transformers) | compressed-tensors"),
    output: Path = typer.Option(..., "--output", help="The .gguf file, or the folder, to write."),
    block_type: str | None = typer.Option(None, "--type", help="gguf: auto | q8_0 | q4_0 | q5_0 | q4_1 | q5_1"),
    dtype: str | None = typer.Option(None, "--dtype", help="Dense tensors (gguf: auto|f32|f16; else auto|float32|…)."),
    embeddings: str | None = typer.Option(None, "--embeddings", help="gguf: quantize token_embd (e.g. q8_0)."),
    dequantize: bool = typer.Option(False, "--dequantize", help="Write modules with no exact format dense."),
    pre: str | None = typer.Option(None, "--pre", help="gguf: llama.cpp pre-tokenizer name (gpt-2, llama-bpe, …)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
) -> None:
    """Write a deployable copy of a model: GGUF for llama.cpp, or a folder for transformers / vLLM."""
    from pydantic import TypeAdapter, ValidationError

    from slimlm.export.options import ExportTarget, export_model
    from slimlm.models import load_model
    from slimlm.recipe import format_validation_error

    given = {"type": block_type, "dtype": dtype, "embeddings": embeddings, "dequantize": dequantize or None, "pre": pre}
    try:
        target = TypeAdapter(ExportTarget).validate_python(
            {"format": fmt, **{key: value for key, value in given.items() if value is not None}}
        )
    except ValidationError as err:
        raise SlimlmError(format_validation_error(err, prefix="export")) from None
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_model(model, allow_pickle=allow_pickle)
        summary = export_model(loaded.model, loaded.tokenizer, target, output)
    _out.print(summary.line(), markup=False, highlight=False, soft_wrap=True)


def _allowed(field) -> str:
    """What an option accepts, read from its type and bounds; validators may narrow it further."""
    return _type_text(field.annotation, field.metadata)


def _type_text(annotation, metadata=()) -> str:
    """`float, > 0`; `a | b` for literals and unions (`float, > 0 | {start, end, schedule}`); a nested options model
    as its field names."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (None, type(None)):
        return "null"
    if origin is typing.Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_text(arg) for arg in args if arg is not type(None)) + (
            " | null" if type(None) in args else ""
        )
    if origin is typing.Annotated:
        return _type_text(args[0], [*metadata, *args[1:]])
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return "{" + ", ".join(annotation.model_fields) + "}"
    text = getattr(annotation, "__name__", None) or re.sub(r"(?:\w+\.)+(\w+)", r"\1", str(annotation))
    bounds = [
        f"{symbol} {getattr(item, name)}"
        for item in metadata
        for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if getattr(item, name, None) is not None
    ]
    return ", ".join([text, *bounds])


def _default(field) -> str:
    if field.is_required():
        return "required"
    from pydantic_core import to_jsonable_python

    # JSON spells null, true and lists as a recipe does
    return json.dumps(to_jsonable_python(field.get_default(call_default_factory=True)))


def _print_options(title: str, options, methods: list[str]) -> None:
    _out.print(title, markup=False, highlight=False, soft_wrap=True)
    table = Table()
    for column in ("option", "default", "allowed"):
        table.add_column(column, overflow="fold")
    for name, field in options.model_fields.items():
        # a registry-checked `method` is typed str: the registry knows the names
        allowed = " | ".join(methods) if name == "method" and methods else _allowed(field)
        table.add_row(*(escape(text) for text in (name, _default(field), allowed)))
    _out.print(table)


@app.command("stages")
def stages_command() -> None:
    """Every stage, its methods, and each method's options with their defaults."""
    from slimlm.registry import get_stage, stage_names

    for name in stage_names():
        spec = get_stage(name)
        methods = sorted(spec.methods or [])
        own = dict(spec.methods.options) if spec.methods else {}  # methods with an options model of their own
        shared = [method for method in methods if method not in own]
        if shared or not own:
            label = f" (methods: {', '.join(shared)})" if shared else ""
            _print_options(f"{name}{label}: {spec.summary}", spec.options, methods)
        for method, options in sorted(own.items()):
            _print_options(f"{name}, method: {method}", options, methods)


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
    _out.print(
        f"[bold]{escape(model)}[/]: {type(m).__name__}, {m.config.num_hidden_layers} layers, hidden "
        f"{m.config.hidden_size}, {m.config.num_attention_heads} heads / {m.config.num_key_value_heads} KV heads"
    )
    _out.print(loaded.source.description, markup=False)
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


# commands that live beside their packages, their options with their code
app.command("generate")(generate_command)
app.command("chat")(chat_command)
app.command("auto")(auto_command)


def _quiet_libraries() -> None:
    """transformers' and the hub's tqdm bars would interleave with slimlm's own progress lines, and their config
    warnings would print before (and bury) slimlm's one-line error; set before either library is imported."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers follows the hub's setting
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _one_line(message: str) -> None:
    _err.print(message, markup=False, highlight=False, soft_wrap=True)


def _usage_error(err: typer.TyperException) -> int:
    """click's errors (typer bundles its own click, so these are not click.ClickException): one line naming the
    option, with click's exit code (2 for usage errors)."""
    ctx = getattr(err, "ctx", None)
    if type(err).__name__ == "NoArgsIsHelpError":  # bare `slimlm`: the help, as click shows it
        err.show()
        return err.exit_code
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    _one_line(f"error: {err.format_message()}{hint}")
    return err.exit_code


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    # --debug works anywhere on the command line, not only before the command
    args = [arg for arg in args if arg != "--debug"]
    if not debug:
        _quiet_libraries()
    try:
        code = app(args=args, prog_name="slimlm", standalone_mode=False)
    except SlimlmError as err:
        if debug:
            raise
        _one_line(f"error: {err}")
        sys.exit(1)
    except typer.TyperException as err:
        if debug:
            raise
        sys.exit(_usage_error(err))
    except typer.Abort:
        _err.print("aborted")
        sys.exit(130)
    except Exception as err:
        if debug:
            raise
        first_line = (str(err).splitlines() or [""])[0]
        _one_line(f"error: {type(err).__name__}: {first_line} (run with --debug for the traceback)")
        sys.exit(1)
    # Without standalone mode typer turns Ctrl-C into a returned 130 (and --help into 0); commands return None.
    if isinstance(code, int) and code:
        if code == 130:
            _err.print("interrupted")
        sys.exit(code)


if __name__ == "__main__":
    main()
