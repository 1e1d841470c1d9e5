"""`--target gguf`: llama.cpp's types per tensor, written and scored by llama.cpp's own tools.

- The model goes out once as an f32 GGUF (slimlm's exporter); every candidate is ``llama-quantize`` of it with a
  per-tensor type file (export/mixed_types.py), so the file is what llama.cpp itself makes for that type map.
- The options of a Linear are the types its rows allow (k-quants on rows of a multiple of 256); their dequantized
  weights come from one ``llama-quantize --pure`` file per type, read back tensor by tensor: the proxy sees
  llama.cpp's own rounding.
- Sizes are exact (mixed_types.gguf_file_bytes); candidates are scored by ``llama-perplexity`` on WikiText-2 test
  (ppl, and KL divergence against the f32 file's log-probs), as the llama.cpp baselines are.
- Decode latency is llama-bench's, on the files themselves; the latency model (latency.py) is fitted on the f32
  and uniform files and prices each (item, type) for latency budgets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from slimlm.auto.latency import LatencyModel, cached_figures, decode_figures, matrix_params
from slimlm.auto.sensitivity import Item, Option
from slimlm.errors import SlimlmError
from slimlm.export import mixed_types as mixed
from slimlm.export.llamacpp import run_perplexity, run_quantize
from slimlm.modules import named_decoder_linears
from slimlm.progress import progress_bar

REFERENCE_TYPE = "Q4_0"  # the option whose KL is measured for every Linear
EMBEDDING_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "IQ4_NL")


class GGUFTarget:
    name = "gguf"
    recipe_version = ""  # the first form: rows keep their keys

    def __init__(self, model, tokenizer, work: Path, threads: int = 2, exclude: list[str] = ()):
        self.model, self.tokenizer, self.config, self.work, self.threads = model, tokenizer, model.config, work, threads
        self.exclude = {t.upper() for t in exclude}
        self.f32 = work / "f32.gguf"
        if not self.f32.is_file():
            from slimlm.export.gguf import export_gguf

            export_gguf(model, tokenizer, self.f32, dtype="f32")
        self.layout = mixed.SourceLayout.read(self.f32)
        self._weights: dict[str, mixed.GGUFWeights] = {}
        self._latency: LatencyModel | None = None

    def uniform(self, type_name: str) -> mixed.GGUFWeights:
        """Every tensor llama-quantize --pure can make `type_name` of, read lazily."""
        if type_name not in self._weights:
            path = self.work / "uniform" / f"{type_name}.gguf"
            if not path.is_file():
                mixed.write_mixed_gguf(self.f32, path, {}, base_type=type_name, threads=self.threads)
            self._weights[type_name] = mixed.GGUFWeights(path, self.config)
        return self._weights[type_name]

    def items(self, probe=None) -> list[Item]:
        """The embedding and every decoder Linear, with the llama.cpp types each allows (`probe`: unused)."""
        items = [self._embedding_item()]
        for name, linear in named_decoder_linears(self.model):
            options = [
                self._option(name, t, linear.weight.shape)
                for t in mixed.allowed_types(linear.in_features)
                if t not in self.exclude and self.uniform(t).types.get(name + ".weight") == t
            ]
            reference = [o.name for o in options].index(REFERENCE_TYPE)
            items.append(Item(name, options, (reference,), layer=int(name.split(".")[2])))
        return items

    def _embedding_item(self) -> Item:
        name = "model.embed_tokens"
        shape = self.model.get_input_embeddings().weight.shape
        options = [
            self._option(name, t, shape)
            for t in EMBEDDING_TYPES
            if t not in self.exclude and self.uniform(t).types.get(name + ".weight") == t
        ]
        return Item(name, options, layer=None, direct=True)

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

    @staticmethod
    def width_step(intermediate: int) -> int:
        """MLP widths are cut to multiples of this: down_proj keeps every type its full rows allow (k-quants: 256)."""
        return 256 if intermediate % 256 == 0 else 32

    def write(self, formats: dict[str, str], removed: tuple[int, ...], path: Path, source: Path | None = None) -> Path:
        """llama-quantize of `source` (default: the original's f32 file) with `formats`, `removed` layers left out."""
        return mixed.write_mixed_gguf(
            source or self.f32, path, self.gguf_names(formats), removed=frozenset(removed), threads=self.threads
        )

    def source(self, cut: Callable[[], nn.Module], name: str) -> Path:
        """The f32 GGUF of `cut()` (the original with its MLP cut, widths.WidthCuts.cut), kept as
        <work>/cut/<name>.gguf for every mix at that width (made only when that file is missing)."""
        path = self.work / "cut" / f"{name}.gguf"
        if not path.is_file():
            from slimlm.export.gguf import export_gguf

            export_gguf(cut(), self.tokenizer, path, dtype="f32")  # atomic: the complete file or none
        return path

    def llama_type(self, type_name: str, path: Path) -> Path:
        """llama.cpp's own recipe `type_name` (Q4_K_M, Q2_K, ...) of the f32 file: the baselines."""
        if not path.is_file():  # written beside, then renamed: a killed run leaves no half file to reuse
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            run_quantize(self.f32, temporary, type_name, threads=self.threads)
            os.replace(temporary, path)
        return path

    def score(self, path: Path, text: Path, chunks: int) -> dict:
        """llama-perplexity ppl and KL divergence to the f32 file on the first `chunks` chunks of 512 tokens;
        kept in <work>/scores.json by file (path, size, mtime) and chunks, so shared baselines are scored once."""

        def measure() -> dict:
            base = self.work / f"f32-base-{chunks}.kld"
            if not base.is_file():
                _retrying(
                    lambda: run_perplexity(self.f32, text, chunks=chunks, threads=self.threads, save_kld_base=base)
                )
            result = _retrying(lambda: run_perplexity(path, None, chunks=chunks, threads=self.threads, kld_base=base))
            keys = ("ppl", "ppl_err", "kld", "kld_err", "same_top_p", "chunks", "n_ctx")
            return {k: result[k] for k in keys} | {"bytes": path.stat().st_size, "command": result["command"]}

        # the key's old form (no settings suffix) kept: the scores of earlier runs stay valid
        return cached_figures(self.work / "scores.json", path, str(chunks), measure)

    def decode(self, path: Path, row: dict | None = None) -> dict:
        """llama-bench's decode speed of `path` (latency.decode_figures, kept in <work>/latency.json) and the
        latency model's prediction for it (from the file's own tensors: the row is not needed)."""
        figures = decode_figures(path, self.work / "latency.json", self.threads)
        predicted = self.latency_model().predict(matrix_params(path))
        return figures | {"predicted_ms_per_token": predicted}

    def latency_model(self) -> LatencyModel:
        """Rates per type fitted on the f32 file and the uniform file of every type the items use."""
        if self._latency is None:
            files = [self.f32] + [self.work / "uniform" / f"{t}.gguf" for t in sorted(self._weights)]
            with progress_bar("auto: decode latency", total=len(files)) as advance:
                measured = {}
                for path in files:
                    measured[str(path)] = decode_figures(path, self.work / "latency.json", self.threads)[
                        "decode_ms_per_token"
                    ]
                    advance(description=f"auto: decode latency ({path.name})")
            self._latency = LatencyModel.fit(measured, {f: matrix_params(Path(f)) for f in measured})
        return self._latency

    def item_latency(self, item: Item) -> list[float]:
        """Predicted ms/token of each of the item's options (its matrices' parameters at the option's rate)."""
        params = self.model.get_submodule(item.name).weight.numel()
        return [self.latency_model().item_ms(params, o.name) for o in item.options]


def _retrying(call, attempts: int = 3):
    """llama-perplexity now and then exits 0 having printed nothing after "computing over N chunks" (seen on tiny
    models, ~1 run in 5 on a busy machine: its last log lines lost at exit); such a run is run again."""
    for attempt in range(attempts):
        try:
            return call()
        except SlimlmError as err:
            if "printed no" not in str(err) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
