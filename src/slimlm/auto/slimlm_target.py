"""`--target slimlm`: RTN and GPTQ grids per projection, as a recipe `slimlm compress` runs, scored by slimlm's
evaluation.

The quantize stage restricts a stage by projection (`targets`) but not by layer, and a projection already packed
cannot be quantized again (recipe.check_chain), so what a recipe can say today is one format per projection
*kind* (q_proj, ..., down_proj) across all layers: one quantize stage per distinct format, each with its targets.
The items are those seven groups (their cost: every Linear of the kind changed at once); per-Linear formats need
a per-layer override in the quantize stage (see the closing report of issue 15).

Options: symmetric grids of 2, 3, 4 and 8 bits with groups of 32, 64 and 128 columns (ggml's scale rule,
grid.py), each by RTN (``w4g64``) and by GPTQ (``gptq-w4g64``; ``--exclude gptq`` leaves the quantizer out). A
GPTQ option's weights for the proxy are each Linear solved alone from the probe's Hessian of the original's
inputs; the recipe's gptq stage is sequential (later layers see earlier ones quantized) and weights v_proj's
Hessian by attention, so the proxy is an estimate of it, checked by the real evaluation like every candidate.
Decoder layers removed (the probe's KL of each left out, as for gguf) go first in the recipe (`prune_depth` by
name); a group's bytes, time and cost then scale with the share of its layers kept (allocate.kept_share).
Size: the folder's weight bytes (safetensors), the packed codes at their bit width plus a float16 scale per group
(the same for both quantizers), the rest (embedding, norms) in the recipe's dtype.

Latency: slimlm's own decode (evaluate/speed.py: greedy, KV cache, the packed kernels, plain path) of one model per
format with every projection at that format, in memory; a group's ms/token is its share of its format's (its
parameters × the format's rate: latency.LatencyModel). The figures are kept in ``<output>/latency.json``; the
candidates are timed the same way from their folders.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from slimlm.auto.latency import LatencyModel, cached
from slimlm.auto.sensitivity import Item, Option
from slimlm.modules import SHORT_NAMES, decoder_layers, named_decoder_linears
from slimlm.progress import progress_bar
from slimlm.quantize.gptq import GPTQ
from slimlm.quantize.grid import QuantGrid, quantize_codes
from slimlm.quantize.packed import packed_columns

QUANTIZERS = ("rtn", "gptq")
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
REFERENCE = "w4g64"
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DECODE = {"prompt_tokens": 16, "new_tokens": 32, "runs": 3}  # per timed model: evaluate/speed.measure_speed
_HEADER_PER_TENSOR = 112  # safetensors JSON header per tensor (name, dtype, shape, offsets): ~99-110 measured


def option_name(bits: int, group: int, method: str = "rtn") -> str:
    """w4g64 (RTN), gptq-w4g64 (GPTQ): the quantizer, then the grid."""
    return f"w{bits}g{group}" if method == "rtn" else f"{method}-w{bits}g{group}"


def parse_option(name: str) -> tuple[str, int, int]:
    """The option name's (method, bits, group size)."""
    method, _, grid = name.rpartition("-")
    bits, group = (int(x) for x in grid[1:].split("g"))
    return method or "rtn", bits, group


def kernel_format(name: str) -> str:
    """The packed format an option runs with: GPTQ's codes sit on the same grid as RTN's (one latency rate)."""
    _, bits, group = parse_option(name)
    return option_name(bits, group)


def packed_bytes(rows: int, columns: int, bits: int, group: int) -> int:
    """A QuantizedLinear's buffers: codes bit-packed into uint8, one float16 scale per group (symmetric grid)."""
    return rows * packed_columns(columns, bits) + rows * (columns // group) * 2


class SlimlmTarget:
    name = "slimlm"

    def __init__(self, model, dtype: str = "bfloat16", exclude: list[str] = (), work: Path | None = None):
        self.model, self.dtype, self.exclude = model, dtype, set(exclude)
        self.linears = named_decoder_linears(model)
        self.work = work  # where latency.json is kept (None: the timings are not kept)
        self._latency: LatencyModel | None = None

    def _group_params(self, short: str) -> int:
        inside = SHORT_NAMES[short]
        return sum(linear.weight.numel() for name, linear in self.linears if name.endswith("." + inside))

    def items(self, probe=None) -> list[Item]:
        """One item per projection kind; its options every grid its inputs allow, by RTN, and by GPTQ when a probe
        (the Hessians GPTQ needs) is given and "gptq" is not excluded."""
        methods = [m for m in QUANTIZERS if m not in self.exclude and (m == "rtn" or probe is not None)]
        items = []
        for short, inside in SHORT_NAMES.items():
            members = [(name, linear) for name, linear in self.linears if name.endswith("." + inside)]
            options = [
                self._option(members, bits, group, method, probe)
                for method in methods
                for bits in BITS
                for group in GROUPS
                if all(linear.in_features % group == 0 for _, linear in members)
                and option_name(bits, group, method) not in self.exclude
            ]
            reference = [o.name for o in options].index(REFERENCE)
            items.append(Item(short, options, reference, layers=tuple(range(len(decoder_layers(self.model))))))
        return items

    def _option(self, members, bits: int, group: int, method: str, probe) -> Option:
        grid = QuantGrid(bits, True, group)
        size = sum(packed_bytes(*linear.weight.shape, bits, group) for _, linear in members)

        def weights() -> dict[str, torch.Tensor]:
            if method == "gptq":  # each Linear on its own, from the original's inputs (the stage is sequential)
                return {
                    name: GPTQ(lin.weight, probe.hessians[name], grid).quantize().dequantize() for name, lin in members
                }
            return {name: quantize_codes(linear.weight, grid).dequantize() for name, linear in members}

        return Option(option_name(bits, group, method), size, weights)

    def fixed_bytes(self, items: list[Item]):
        """removed layers -> the folder's weight bytes besides the packed Linears: every other unique tensor in the
        recipe's dtype, norms included, plus the safetensors header (estimated per tensor)."""
        linear_weights = {id(linear.weight) for _, linear in self.linears}
        others = {id(p): p for p in self.model.parameters() if id(p) not in linear_weights}
        dense = sum(p.numel() for p in others.values()) * DTYPE_BYTES[self.dtype]
        tensors = len(others) + 2 * len(self.linears)  # qweight and scales per Linear
        layers = decoder_layers(self.model)
        # one layer's share (all alike): its norms, and its tensors' header entries (2 per Linear, 1 per norm)
        norms = [p for p in layers[0].parameters() if id(p) not in linear_weights]
        per_layer = sum(p.numel() for p in norms) * DTYPE_BYTES[self.dtype]
        per_layer_tensors = len(norms) + 2 * len(self.linears) // len(layers)
        return lambda removed: (
            dense - len(removed) * per_layer + (tensors - len(removed) * per_layer_tensors) * _HEADER_PER_TENSOR
        )

    def recipe(
        self,
        formats: dict[str, str],
        model: str,
        calibration: dict,
        evaluate: dict,
        output: Path,
        removed: tuple[int, ...] = (),
    ) -> dict:
        """The recipe (as YAML data) that removes the `removed` decoder layers, then quantizes every projection kind
        to its format: one stage per format."""
        by_format: dict[str, list[str]] = {}
        for short, name in formats.items():
            by_format.setdefault(name, []).append(short)
        stages = [{"prune_depth": {"layers": sorted(removed)}}] if removed else []
        for name, targets in sorted(by_format.items()):
            method, bits, group = parse_option(name)
            stages.append({"quantize": {"method": method, "bits": bits, "group_size": group, "targets": targets}})
        return {
            "model": model,
            "dtype": self.dtype,
            "calibration": calibration,
            "evaluate": evaluate,
            "stages": stages,
            "output": str(output),
        }

    def latency_model(self) -> LatencyModel:
        """A rate per format (and for the dense dtype): least squares over slimlm's decode ms/token of the dense
        model and of one model per format with every projection group that allows it at that format."""
        if self._latency is None:
            items = self.items()
            names = [self.dtype, *sorted({kernel_format(o.name) for item in items for o in item.options})]
            measured, compositions = {}, {}
            with progress_bar("auto: decode latency (slimlm kernels)", total=len(names)) as advance:
                for name in names:
                    groups = [i.name for i in items if name in {kernel_format(o.name) for o in i.options}]
                    measured[name] = self._timed(f"uniform|{name}", lambda n=name, g=groups: self._uniform(n, g))
                    at_format = sum(self._group_params(short) for short in groups)
                    compositions[name] = {name: at_format, self.dtype: self._all_params() - at_format}
                    advance(description=f"auto: decode latency ({name})")
            self._latency = LatencyModel.fit(measured, compositions)
        return self._latency

    def _all_params(self) -> int:
        return sum(linear.weight.numel() for _, linear in self.linears)

    def item_latency(self, item: Item) -> list[float]:
        params = self._group_params(item.name)
        return [self.latency_model().item_ms(params, kernel_format(o.name)) for o in item.options]

    def decode(self, path: Path, formats: dict[str, str] | None = None) -> dict:
        """slimlm's decode speed of the model saved in `path`, and the latency model's prediction for `formats`."""
        from slimlm.models import load_model

        config = (Path(path) / "config.json").stat()  # rewritten with the folder: a new folder is timed again
        key = f"folder|{Path(path).resolve()}|{config.st_mtime_ns}"
        figures = self._figures(key, lambda: load_model(str(path)).model)
        predicted = None
        if formats:
            composition: dict[str, int] = {}
            for short, name in formats.items():
                kernel = kernel_format(name)
                composition[kernel] = composition.get(kernel, 0) + self._group_params(short)
            predicted = self.latency_model().predict(composition)
        return figures | {"predicted_ms_per_token": predicted}

    def _uniform(self, name: str, groups: list[str]):
        """The model in the recipe's dtype with the projection `groups` RTN-quantized to `name` and packed (the
        dense model when `name` is the dtype)."""
        from slimlm.registry import StageContext, get_stage

        model = copy.deepcopy(self.model).to(getattr(torch, self.dtype))
        if name == self.dtype:
            return model
        bits, group = (int(x) for x in name[1:].split("g"))
        spec = get_stage("quantize")
        given = {"method": "rtn", "bits": bits, "group_size": group, "targets": groups}
        options = spec.options_model(given).model_validate(given)
        with tempfile.TemporaryDirectory() as folder:
            return spec.apply(model, options, StageContext(None, None, Path(folder)))

    def _timed(self, key: str, build) -> float:
        return self._figures(key, build)["decode_ms_per_token"]

    def _figures(self, key: str, build) -> dict:
        def measure() -> dict:
            from slimlm.evaluate.speed import measure_speed

            records = {r.metric: r for r in measure_speed(build(), None, **DECODE)}
            speed = records["decode_tokens_per_s"]
            return {
                "decode_tps": speed.value,
                "decode_tps_sd": None,
                "decode_ms_per_token": 1e3 / speed.value,
                "decode_loadavg_1min": speed.protocol["load_avg_1min_before"],
                "decode_protocol": f"slimlm measure_speed {DECODE}, plain path, {torch.get_num_threads()} threads",
            }

        if self.work is None:
            return measure()
        self.work.mkdir(parents=True, exist_ok=True)
        return cached(self.work / "latency.json", f"{key}|t{torch.get_num_threads()}", measure)
