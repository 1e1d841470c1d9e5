"""An interactive chat with a model through its own chat template, on the fast decode path (generate.py).

`ChatSession` keeps the history (the model's replies included) and renders it with the tokenizer's chat template
for every turn, the whole conversation prefilled afresh: templates may rewrite earlier turns, so reusing the cache
of the last turn would not be safe in general. When history and reply no longer fit the model's context, the
oldest exchanges are dropped (said on the figures line). `chat_loop` reads lines until end of input: ``/reset``
clears the history, an empty line is ignored, Ctrl-C stops the reply being written (at the prompt: leaves).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from slimlm.errors import SlimlmError
from slimlm.inference.decode import Decoder, decoder_for
from slimlm.inference.generate import Generation, Sampling, generate

RESET = "/reset"


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    max_new_tokens: int = 256
    sampling: Sampling = field(default_factory=Sampling)
    decoder: Decoder | None = None
    history: list[dict] = field(default_factory=list)
    dropped: int = 0  # exchanges dropped from the front to fit the context

    def __post_init__(self):
        if not getattr(self.tokenizer, "chat_template", None):
            raise SlimlmError("chat: the model's tokenizer has no chat template; use `slimlm generate` instead")
        self.decoder = self.decoder or decoder_for(self.model)

    def reset(self) -> None:
        self.history.clear()

    def _prompt_ids(self, messages: list[dict]):
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the template writes the special tokens itself
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    def _fitting_prompt(self, message: dict):
        """The prompt ids of history + message, the oldest exchanges dropped until the reply fits the context."""
        context = getattr(self.model.config, "max_position_embeddings", None)
        while True:
            ids = self._prompt_ids([*self.history, message])
            if context is None or ids.shape[1] + self.max_new_tokens <= context:
                return ids
            if not self.history:
                raise SlimlmError(
                    f"chat: the message takes {ids.shape[1]} tokens; with {self.max_new_tokens} new tokens it "
                    f"does not fit the model's context of {context}"
                )
            del self.history[:2]  # one user message and its reply
            self.dropped += 1

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> Generation:
        message = {"role": "user", "content": text}
        ids = self._fitting_prompt(message)
        generation = generate(
            self.model, self.tokenizer, ids, self.max_new_tokens, self.sampling, self.decoder, on_text=on_text
        )
        self.history += [message, {"role": "assistant", "content": generation.text.strip()}]
        return generation


def chat_loop(
    session: ChatSession,
    lines: Iterator[str],
    write: Callable[[str], None],
    report: Callable[[str], None],
) -> list[Generation]:
    """Answer each line of `lines` (the user's turns); reply text to `write`, notes and figures to `report`."""
    generations = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == RESET:
            session.reset()
            report("history cleared")
            continue
        try:
            generation = session.reply(text, on_text=write)
        except KeyboardInterrupt:
            write("\n")
            report("reply interrupted")
            continue
        write("\n")
        generations.append(generation)
        dropped = f"; {session.dropped} oldest exchanges dropped to fit the context" if session.dropped else ""
        report(generation.stats.line() + dropped)
    return generations


def user_lines(interactive: bool) -> Iterator[str]:
    """The user's lines from stdin: prompted by input() on a terminal (line editing; Ctrl-D or Ctrl-C at the prompt
    end the chat), read as they come otherwise (piped, no prompt)."""
    if not interactive:
        yield from sys.stdin
        return
    while True:
        try:
            yield input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
