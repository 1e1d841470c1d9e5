"""The `slimlm generate` and `slimlm chat` commands (registered by cli.py). Module-level imports stay light: cli
imports this module at start; torch and the model code load when a command runs."""

from __future__ import annotations

import contextlib
import json
import sys

import typer
from rich.console import Console

_err = Console(stderr=True)

# one definition per option the two commands share (typer reads each as the parameter's default)
_MODEL = typer.Option(..., "--model", help="Built-in name, slimlm output folder, HF folder, hub id or .gguf file.")
_TEMPERATURE = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy.")
_TOP_P = typer.Option(1.0, "--top-p", min=0.0, max=1.0)
_SEED = typer.Option(0, "--seed")
_DTYPE = typer.Option("float32", "--dtype")
_COMPILE = typer.Option(
    True, "--compile/--no-compile",
    help="Decode on the compiled static-cache path (torch.compile; falls back to plain if it fails).",
)  # fmt: skip
_ALLOW_PICKLE = typer.Option(False, "--allow-pickle")


def _one_line(message: str) -> None:
    _err.print(message, markup=False, highlight=False, soft_wrap=True)


def _sampling(temperature: float, top_p: float, seed: int):
    from slimlm.inference.generate import Sampling

    return Sampling(temperature=temperature, top_p=top_p, seed=seed)


def _load_for_decoding(model: str, dtype: str, allow_pickle: bool, compile: bool):
    """(loaded model, its decoder); libraries' prints go to stderr."""
    from slimlm.inference.decode import decoder_for
    from slimlm.models import load_model

    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_model(model, dtype, allow_pickle=allow_pickle)
    return loaded, decoder_for(loaded.model, compile)


def _writer(out):
    """Writes text and shows it at once (a piped stdout is block-buffered)."""

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    return write


def _speculative(loaded, decoder, drafting: tuple, k: int, prompt_ids, max_new_tokens: int, sampling, on_text):
    """generate's speculative form; `drafting` is the draft's (loaded model, decoder)."""
    from slimlm.inference.speculative import check_same_vocabulary, speculative_generate

    draft, draft_decoder = drafting
    check_same_vocabulary(loaded.model, draft.model, loaded.tokenizer, draft.tokenizer)
    return speculative_generate(
        loaded.model, draft.model, loaded.tokenizer, prompt_ids, max_new_tokens, sampling, k, decoder, draft_decoder,
        on_text,
    )  # fmt: skip


def generate_command(
    model: str = _MODEL,
    prompt: str = typer.Option(..., "--prompt", help="The text to continue (no chat template; see `slimlm chat`)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    seed: int = _SEED,
    dtype: str = _DTYPE,
    compile: bool = _COMPILE,
    allow_pickle: bool = _ALLOW_PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print text and figures as JSON on stdout, nothing else."),
    draft: str | None = typer.Option(
        None, "--draft", help="Speculative decoding: a smaller model with the same tokenizer proposes tokens."
    ),
    draft_tokens: int = typer.Option(4, "--draft-tokens", min=1, max=64, help="Tokens the draft proposes per round."),
) -> None:
    """Continue a prompt: the text alone on stdout, streamed; prefill ms, decode tok/s and the kernel on stderr
    (with --draft also the draft's acceptance rate and tokens per target forward)."""
    from slimlm.inference.generate import generate

    sampling = _sampling(temperature, top_p, seed)
    loaded, decoder = _load_for_decoding(model, dtype, allow_pickle, compile)
    drafting = _load_for_decoding(draft, dtype, allow_pickle, compile) if draft is not None else None
    out = sys.stdout
    prompt_ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    on_text = None if as_json else _writer(out)
    with contextlib.redirect_stdout(sys.stderr):
        if drafting is None:
            generation = generate(
                loaded.model, loaded.tokenizer, prompt_ids, max_new_tokens, sampling, decoder, on_text=on_text
            )
        else:
            generation = _speculative(
                loaded, decoder, drafting, draft_tokens, prompt_ids, max_new_tokens, sampling, on_text
            )
    if as_json:
        payload = {"model": model, "prompt": prompt, "text": generation.text, "token_ids": generation.token_ids}
        out.write(json.dumps({**payload, "stats": generation.stats.to_dict()}, indent=2) + "\n")
        return
    out.write("\n")
    out.flush()  # the text before the figures, also when both go to one terminal
    _one_line(generation.stats.line())


def chat_command(
    model: str = _MODEL,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="Per reply."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    seed: int = _SEED,
    dtype: str = _DTYPE,
    compile: bool = _COMPILE,
    allow_pickle: bool = _ALLOW_PICKLE,
) -> None:
    """Chat through the model's chat template: history kept, /reset clears it, Ctrl-D leaves; figures on stderr."""
    from slimlm.inference.chat import ChatSession, chat_loop, user_lines

    sampling = _sampling(temperature, top_p, seed)
    loaded, decoder = _load_for_decoding(model, dtype, allow_pickle, compile)
    session = ChatSession(loaded.model, loaded.tokenizer, max_new_tokens, sampling, decoder)
    interactive = sys.stdin.isatty()
    if interactive:
        _one_line(f"chatting with {model}: /reset clears the history, Ctrl-D leaves")
    write = _writer(sys.stdout)  # taken before stdout is redirected: the replies go to the real stdout
    with contextlib.redirect_stdout(sys.stderr):
        generations = chat_loop(session, user_lines(interactive), write, _one_line)
    rates = [g.stats.decode_tokens_per_s for g in generations if g.stats.decode_tokens_per_s is not None]
    if rates:
        _one_line(f"{len(generations)} replies, decode {sum(rates) / len(rates):.1f} tok/s on average")
