"""The tokenizer of a GGUF file: a GPT-2-style byte-level BPE vocabulary as llama.cpp's converter writes it
(convert_hf_to_gguf.py, ``get_vocab_base`` and ``get_vocab_base_pre``): tokens, token types, merges, special token
ids, the chat template, and the pre-tokenizer name llama.cpp picks its splitting regex by."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf

from slimlm.errors import SlimlmError

# convert_hf_to_gguf.py's get_vocab_base_pre: llama.cpp picks its pre-tokenizer regex by name, and the converter
# recognises a tokenizer by the sha256 of str(tokenizer.encode(CHECK_TEXT)). A few hashes from its table.
CHECK_TEXT = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"  # noqa: E501
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo-Base-2407
}
PRE_KEY = "tokenizer.ggml.pre"


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's does_token_look_special: added tokens that are control tokens though not marked so."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _byte_level(tokenizer) -> dict:
    """The ByteLevel pre-tokenizer of a byte-level BPE tokenizer (GGUF's "gpt2" model); refuses any other."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    byte_levels = [p for p in pre.get("pretokenizers", [pre]) if p.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or not byte_levels:
        raise SlimlmError(
            f"tokenizer: only byte-level BPE tokenizers (GGUF tokenizer model gpt2) are exported; this "
            f"one is {model.get('type', type(tokenizer).__name__)} without a ByteLevel pre-tokenizer "
            "or with byte fallback"
        )
    return byte_levels[0]


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf's get_vocab_base: every id's token and type, [PADi] for ids the tokenizer lacks."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise SlimlmError(f"tokenizer: token id {max(vocab.values())} is past the model's {vocab_size} embeddings")
    reverse = {index: token for token, index in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token, kind = reverse.get(index, f"[PAD{index}]"), gguf.TokenType.NORMAL
        if index not in reverse:
            kind = gguf.TokenType.UNUSED
        elif token in added:
            if not decoder[index].normalized:  # llama.cpp expects added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[index].special or _looks_special(token):
                kind = gguf.TokenType.CONTROL
            else:
                token, kind = token.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def pre_tokenizer(tokenizer, pre: str | None = None, source_gguf: str | Path | None = None) -> str:
    """tokenizer.ggml.pre: recognised by the check-text hash as convert_hf_to_gguf does, else `pre`, else the
    value in the GGUF the model was loaded from; refused when none says it."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    detected = KNOWN_PRE.get(digest)
    if detected is not None and pre not in (None, detected):
        raise SlimlmError(f"tokenizer: pre={pre!r} contradicts the pre-tokenizer {detected!r} its hash identifies")
    found = detected or pre or read_gguf_pre(source_gguf)
    if found is None:
        raise SlimlmError(
            f"tokenizer: its BPE pre-tokenizer is not recognised (check-text hash {digest[:16]}…, "
            f"known: {', '.join(sorted(set(KNOWN_PRE.values())))}); pass pre='<llama.cpp name>' or "
            "source_gguf='<the .gguf the model came from>'"
        )
    return found


def read_gguf_pre(path: str | Path | None) -> str | None:
    if path is None:
        return None
    try:
        field = gguf.GGUFReader(str(path)).fields.get(PRE_KEY)
    except Exception as err:  # noqa: BLE001 - the reader fails in many ways on a missing, corrupt or truncated file
        raise SlimlmError(f"{path}: not a readable GGUF file ({err})") from None
    return None if field is None else str(field.contents())


@dataclass
class GGUFVocab:
    pre: str
    tokens: list[str]
    types: list[int]
    special: gguf.SpecialVocab
    add_space_prefix: bool | None
    vocab_size: int

    @classmethod
    def build(cls, tokenizer, config, pre: str | None, source_gguf) -> GGUFVocab:
        byte_level = _byte_level(tokenizer)
        found_pre = pre_tokenizer(tokenizer, pre, source_gguf)
        tokens, types = _tokens(tokenizer, config.vocab_size)
        with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads the files the converter reads
            tokenizer.save_pretrained(folder)
            config.to_json_file(os.path.join(folder, "config.json"))
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config.vocab_size)
            settings = json.loads(Path(folder, "tokenizer_config.json").read_text())
        # LlamaModel.set_vocab takes add_prefix_space from tokenizer_config.json; transformers 5 keeps it only in
        # the ByteLevel pre-tokenizer of tokenizer.json
        space = settings.get("add_prefix_space", byte_level.get("add_prefix_space"))
        return cls(found_pre, tokens, types, special, space, config.vocab_size)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """_set_vocab_gpt2 and LlamaModel.set_vocab of convert_hf_to_gguf.py."""
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)
        if self.vocab_size == 49152:  # LlamaModel.set_vocab: "granite small models" (SmolLM's vocabulary too)
            writer.add_add_bos_token(False)
