"""`slimlm chat`: the chat template with the history, /reset, end of input, through piped stdin and a terminal."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest

from conftest import build_tiny_llama, build_tokenizer
from slimlm.errors import SlimlmError
from slimlm.inference.chat import ChatSession, chat_loop
from slimlm.inference.decode import Decoder
from slimlm.models import save_model

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture()
def chat_tokenizer():
    tokenizer = build_tokenizer()  # a fresh one: the session's tiny_tokenizer has no template and keeps none
    tokenizer.chat_template = TEMPLATE
    return tokenizer


@pytest.fixture()
def chat_model_dir(tmp_path, chat_tokenizer):
    return save_model(build_tiny_llama(len(chat_tokenizer)), chat_tokenizer, tmp_path / "chat-model")


def _session(tokenizer, **options):
    model = build_tiny_llama(len(tokenizer))
    return ChatSession(model, tokenizer, max_new_tokens=4, decoder=Decoder(model, compile=False), **options)


def test_history_is_kept_rendered_with_the_template_and_reset(chat_tokenizer):
    session = _session(chat_tokenizer)
    prompts = []
    session_prompt = session._prompt_ids

    def recording(messages):
        prompts.append(chat_tokenizer.decode(session_prompt(messages)[0]))
        return session_prompt(messages)

    session._prompt_ids = recording
    written, reported = [], []
    chat_loop(
        session,
        iter(["Hello there\n", "\n", "And again\n", "/reset\n", "Fresh start\n"]),
        written.append,
        reported.append,
    )

    assert len(prompts) == 3  # the empty line asks nothing
    assert prompts[0].startswith("<s>user: Hello there</s><s>assistant:")
    second = prompts[1]
    assert "user: Hello there" in second and "assistant:" in second.split("user: And again")[0]
    assert "Hello" not in prompts[2] and prompts[2].startswith("<s>user: Fresh start")
    assert reported.count("history cleared") == 1
    assert sum(line.startswith("prefill ") for line in reported) == 3
    assert len(session.history) == 2  # after /reset: one exchange


def test_old_exchanges_are_dropped_to_fit_the_context(chat_tokenizer):
    session = _session(chat_tokenizer)
    session.model.config.max_position_embeddings = 40
    for text in ("one two three four", "five six seven eight", "nine ten eleven"):
        session.reply(text)
    assert session.dropped >= 1 and session.history[-2]["content"] == "nine ten eleven"
    with pytest.raises(SlimlmError, match="does not fit the model's context of 40"):
        session.reply("word " * 60)


def test_a_tokenizer_without_a_chat_template_is_one_clear_error(tiny_tokenizer):
    with pytest.raises(SlimlmError, match="no chat template; use `slimlm generate`"):
        _session(tiny_tokenizer)


def _chat_command(folder) -> list[str]:
    return [sys.executable, "-m", "slimlm.cli", "chat", "--model", str(folder), "--max-new-tokens", "4", "--no-compile"]


def test_piped_stdin_replies_per_line_resets_and_ends_at_eof(chat_model_dir):
    done = subprocess.run(
        _chat_command(chat_model_dir), input="Hello\n/reset\nHi again\n", capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2  # one line of reply text per question, nothing else on stdout
    err = done.stderr.splitlines()
    assert "history cleared" in err and "> " not in done.stdout
    figures = [line for line in err if line.startswith("prefill ")]
    assert len(figures) == 2 and all("tok/s" in line and "kernel: dense" in line for line in figures)
    assert err[-1].startswith("2 replies, decode ")


def _read_until(fd: int, marker: bytes, seconds: float) -> bytes:
    seen, deadline = b"", time.monotonic() + seconds
    while marker not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return seen


def test_a_terminal_session_prompts_answers_and_leaves_on_ctrl_d(chat_model_dir):
    parent, child = pty.openpty()
    process = subprocess.Popen(_chat_command(chat_model_dir), stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        assert b"> " in _read_until(parent, b"> ", 120)
        os.write(parent, b"Hello\n")
        answer = _read_until(parent, b"kernel: dense", 120)
        assert b"prefill " in answer and b"tok/s" in answer
        os.write(parent, b"\x04")  # Ctrl-D at the prompt
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(parent)
