"""`--target gguf`: llama.cpp's types per tensor, written and scored by llama.cpp's own tools.

- The model goes out once as an f32 GGUF (slimlm's exporter); every candidate is ``llama-quantize`` of it with a
  per-tensor type file (export/mixed_types.py), so the file is what llama.cpp itself makes for that type map.
- The options of a Linear are the types its rows allow (k-quants on rows of a multiple of 256); their dequantized
  weights come from one ``llama-quantize --pure`` file per type, read back tensor by tensor: the proxy sees
  llama.cpp's own rounding.
- Sizes are exact (mixed_types.gguf_file_bytes); candidates are scored by ``llama-perplexity`` on WikiText-2 test
  (ppl, and KL divergence against the f32 file's log-probs), as the llama.cpp baselines are.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimlm.auto.sensitivity import Item, Option
from slimlm.export import mixed_types as mixed
from slimlm.export.llamacpp import run_perplexity, run_quantize
from slimlm.modules import named_decoder_linears
from slimlm.pipeline import write_json_atomic

REFERENCE_TYPE = "Q4_0"  # the option whose KL is measured for every Linear
EMBEDDING_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")


class GGUFTarget:
    name = "gguf"

    def __init__(self, model, tokenizer, work: Path, threads: int = 2, exclude: list[str] = ()):
        self.model, self.config, self.work, self.threads = model, model.config, work, threads
        self.exclude = {t.upper() for t in exclude}
        self.f32 = work / "f32.gguf"
        if not self.f32.is_file():
            from slimlm.export.gguf import export_gguf

            export_gguf(model, tokenizer, self.f32, dtype="f32")
        self.layout = mixed.SourceLayout.read(self.f32)
        self._weights: dict[str, mixed.GGUFWeights] = {}

    def uniform(self, type_name: str) -> mixed.GGUFWeights:
        """Every tensor llama-quantize --pure can make `type_name` of, read lazily."""
        if type_name not in self._weights:
            path = self.work / "uniform" / f"{type_name}.gguf"
            if not path.is_file():
                mixed.write_mixed_gguf(self.f32, path, {}, base_type=type_name, threads=self.threads)
            self._weights[type_name] = mixed.GGUFWeights(path, self.config)
        return self._weights[type_name]

    def items(self) -> list[Item]:
        items = [self._embedding_item()]
        for name, linear in named_decoder_linears(self.model):
            options = [
                self._option(name, t, linear.weight.shape)
                for t in mixed.allowed_types(linear.in_features)
                if t not in self.exclude and self.uniform(t).types.get(name + ".weight") == t
            ]
            reference = [o.name for o in options].index(REFERENCE_TYPE)
            items.append(Item(name, options, reference, layer=int(name.split(".")[2])))
        return items

    def _embedding_item(self) -> Item:
        name = "model.embed_tokens"
        shape = self.model.get_input_embeddings().weight.shape
        options = [
            self._option(name, t, shape)
            for t in EMBEDDING_TYPES
            if t not in self.exclude and self.uniform(t).types.get(name + ".weight") == t
        ]
        return Item(name, options, 0, layer=None, direct=True)

    def _option(self, name: str, type_name: str, shape) -> Option:
        weights = self.uniform(type_name)
        return Option(
            type_name, mixed.tensor_bytes(tuple(shape), type_name), lambda: {name: weights.get(name + ".weight")}
        )

    def gguf_names(self, formats: dict[str, str]) -> dict[str, str]:
        return {mixed.gguf_name(name + ".weight", self.config): t for name, t in formats.items()}

    def fixed_bytes(self, items: list[Item]):
        """removed layers -> the file's bytes besides the items' tensors."""

        def fixed(removed: frozenset[int]) -> int:
            kept = [i for i in items if i.layer not in removed]
            formats = {i.name: i.options[0].name for i in kept}
            return mixed.gguf_file_bytes(self.layout, self.gguf_names(formats), removed) - sum(
                i.options[0].bytes for i in kept
            )

        return fixed

    def write(self, formats: dict[str, str], removed: tuple[int, ...], path: Path) -> Path:
        return mixed.write_mixed_gguf(
            self.f32, path, self.gguf_names(formats), removed=frozenset(removed), threads=self.threads
        )

    def llama_type(self, type_name: str, path: Path) -> Path:
        """llama.cpp's own recipe `type_name` (Q4_K_M, Q2_K, ...) of the f32 file: the baselines."""
        if not path.is_file():
            run_quantize(self.f32, path, type_name, threads=self.threads)
        return path

    def score(self, path: Path, text: Path, chunks: int) -> dict:
        """llama-perplexity ppl and KL divergence to the f32 file on the first `chunks` chunks of 512 tokens;
        kept in <work>/scores.json by file (path, size, mtime) and chunks, so shared baselines are scored once."""
        scores_path = self.work / "scores.json"
        scores = json.loads(scores_path.read_text()) if scores_path.is_file() else {}
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{chunks}"
        if key not in scores:
            base = self.work / f"f32-base-{chunks}.kld"
            if not base.is_file():
                run_perplexity(self.f32, text, chunks=chunks, threads=self.threads, save_kld_base=base)
            result = run_perplexity(path, None, chunks=chunks, threads=self.threads, kld_base=base)
            keys = ("ppl", "ppl_err", "kld", "kld_err", "same_top_p", "chunks", "n_ctx")
            scores[key] = {k: result[k] for k in keys} | {"bytes": stat.st_size, "command": result["command"]}
            write_json_atomic(scores_path, scores)
        return scores[key]
