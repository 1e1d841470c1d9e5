"""`--target slimlm`: RTN and GPTQ grids per projection, as a recipe `slimlm compress` runs, scored by slimlm's
evaluation.

The quantize stage restricts a stage by projection (`targets`, with a grid of its own per projection kind:
`per_projection`) but not by layer, and a projection already packed cannot be quantized again (recipe.check_chain),
so what a recipe can say today is one format per projection *kind* (q_proj, ..., down_proj) across all layers: one
quantize stage per quantizer (RTN, then GPTQ), so that a mixed recipe is one GPTQ walk, true-sequential as a
uniform one (with a stage per format each walk saw only its own Linears change; for SmolLM2's searched w4g64 mix
KL 0.1895 there, 0.1887 in one walk, a move well inside one recipe's build noise: benchmarks/auto_build_noise.py).
The items are those seven groups (their cost: every Linear of the kind changed at once); per-Linear formats need
a per-layer override in the quantize stage (see the closing report of issue 15).

Options: symmetric grids of 2, 3, 4 and 8 bits with groups of 32, 64 and 128 columns (ggml's scale rule,
grid.py), each by RTN (``w4g64``) and by GPTQ (``gptq-w4g64``; ``--exclude gptq`` leaves the quantizer out). A
GPTQ option's weights for the proxy are each Linear solved alone from the probe's Hessian of the original's
inputs; the recipe's gptq stage is sequential (later layers see earlier ones quantized) and weights v_proj's
Hessian by attention, so the proxy is an estimate of it, checked by the real evaluation like every candidate.
The 2- and 3-bit grids also come with an EoRA correction of rank 16 (``w2g64+eora16``; ``--exclude eora``): its
factors (float16, rank × (in + out) per Linear) fitted to the probe's Hessians for the proxy, by one `lowrank`
eora stage after the quantize stages in the recipe; their time is priced at the dense dtype's rate.
Decoder layers removed (the probe's KL of each left out, as for gguf) go first in the recipe (`prune_depth` by
name); a group's bytes, time and cost then scale with the share of its layers kept (allocate.kept_share).
Size: the folder's weight bytes (safetensors), the packed codes at their bit width plus a float16 scale per group
(the same for both quantizers), the rest (embedding, norms) in the recipe's dtype.

Latency: slimlm's own decode (evaluate/speed.py: greedy, KV cache, the packed kernels, plain path) of one model per
format with every projection at that format, in memory; a group's ms/token is its share of its format's (its
parameters × the format's rate: latency.LatencyModel). The figures are kept in ``<work>/latency.json`` (the
output folder unless `--work` names a shared one); the candidates are timed the same way from their folders.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from pathlib import Path

import torch

from slimlm.auto.latency import LatencyModel, cached
from slimlm.auto.sensitivity import Item, Option
from slimlm.auto.widths import width_share, width_stage
from slimlm.lowrank.factorize import eora_factors
from slimlm.modules import SHORT_NAMES, config_widths, decoder_layers, named_decoder_linears
from slimlm.progress import progress_bar
from slimlm.quantize.gptq import GPTQ, GPTQOptions, per_head_solve
from slimlm.quantize.grid import QuantGrid, quantize_codes
from slimlm.quantize.packed import packed_columns

QUANTIZERS = ("rtn", "gptq")
EORA_RANK, EORA_BITS = 16, (2, 3)  # EoRA is offered on the grids coarse enough for a correction to pay
BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
REFERENCE_GRIDS = ("w4g64", "w3g64")  # a family's KL is measured on the first of these it has (EoRA: from 3 bits)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DECODE = {"prompt_tokens": 16, "new_tokens": 32, "runs": 3}  # per timed model: evaluate/speed.measure_speed
_HEADER_PER_TENSOR = 112  # safetensors JSON header per tensor (name, dtype, shape, offsets): ~99-110 measured


def option_name(bits: int, group: int, method: str = "rtn", rank: int = 0) -> str:
    """w4g64 (RTN), gptq-w4g64 (GPTQ), w2g64+eora16 (with an EoRA correction of rank 16)."""
    name = f"w{bits}g{group}" if method == "rtn" else f"{method}-w{bits}g{group}"
    return f"{name}+eora{rank}" if rank else name


def parse_option(name: str) -> tuple[str, int, int, int]:
    """The option name's (method, bits, group size, EoRA rank or 0)."""
    name, _, eora = name.partition("+eora")
    method, _, grid = name.rpartition("-")
    bits, group = (int(x) for x in grid[1:].split("g"))
    return method or "rtn", bits, group, int(eora or 0)


def family(name: str) -> str:
    """The options whose error has one shape (sensitivity.Option.family): the quantizer, with or without EoRA."""
    method, _, _, rank = parse_option(name)
    return f"{method}+eora{rank}" if rank else method


def kernel_format(name: str) -> str:
    """The packed format an option runs with: GPTQ's codes sit on the same grid as RTN's (one latency rate)."""
    _, bits, group, _ = parse_option(name)
    return option_name(bits, group)


def lowrank_params(name: str, members) -> int:
    """The EoRA factors' parameters of an option over the Linears `members` (0 without EoRA)."""
    rank = parse_option(name)[3]
    return sum(rank * (linear.in_features + linear.out_features) for _, linear in members)


def packed_bytes(rows: int, columns: int, bits: int, group: int) -> int:
    """A QuantizedLinear's buffers: codes bit-packed into uint8, one float16 scale per group (symmetric grid)."""
    return rows * packed_columns(columns, bits) + rows * (columns // group) * 2


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, grid: QuantGrid) -> torch.Tensor:
    """GPTQ's dequantized solution (the stage's default damping and block size); a stack of Hessians [heads, in, in]
    (v_proj's) solves each head's rows with its own, by the gptq stage's own per_head_solve."""
    if hessian.dim() == 2:
        return GPTQ(weight, hessian, grid).quantize().dequantize()
    return per_head_solve(weight, hessian, grid, GPTQOptions())[0].dequantize()


def _family_references(options: list[Option]) -> tuple[int, ...]:
    """Each family's option on the first of REFERENCE_GRIDS it has, else its first option (what --exclude left)."""
    grids = [option_name(*parse_option(o.name)[1:3]) for o in options]
    ranked = sorted(range(len(options)), key=lambda i: (*REFERENCE_GRIDS, grids[i]).index(grids[i]))
    found: dict[str, int] = {}
    for index in ranked:
        found.setdefault(options[index].family, index)
    return tuple(found.values())


def _quantize_stage(method: str, grids: dict[str, tuple[int, int]]) -> dict:
    """One quantize stage's options for projection kind -> (bits, group size): the grid most of them take as the
    stage's, the others per projection."""
    (bits, group), _ = Counter(grids.values()).most_common(1)[0]  # a tie: the first projection's
    own = {short: {"bits": b, "group_size": g} for short, (b, g) in grids.items() if (b, g) != (bits, group)}
    return {"method": method, "bits": bits, "group_size": group, "targets": list(grids)} | (
        {"per_projection": own} if own else {}
    )


class SlimlmTarget:
    name = "slimlm"
    recipe_version = "2"  # rows scored by recipes of another form are scored again (2: a stage per quantizer)

    def __init__(self, model, dtype: str = "bfloat16", exclude: list[str] = (), work: Path | None = None):
        self.model, self.dtype, self.exclude = model, dtype, set(exclude)
        self.linears = named_decoder_linears(model)
        self.work = work  # where latency.json is kept (None: the timings are not kept)
        self._latency: LatencyModel | None = None

    def _members(self, short: str) -> list:
        """(name, Linear) of every decoder layer's projection of kind `short`."""
        return [(name, linear) for name, linear in self.linears if name.endswith("." + SHORT_NAMES[short])]

    def _group_params(self, short: str) -> int:
        return sum(linear.weight.numel() for _, linear in self._members(short))

    def items(self, probe=None, fit: dict[str, torch.Tensor] | None = None) -> list[Item]:
        """One item per projection kind; its options every grid its inputs allow, by RTN, and by GPTQ and with an
        EoRA correction when a probe is given and "gptq" / "eora" are not excluded; they are fitted to the input
        Hessians `fit` (probe.input_hessians of other windows: their error is then measured out of sample) or, without
        them, to the probe's own."""
        solve = fit if fit is not None else (probe.hessians if probe is not None else {})
        with_probe = {"gptq", "eora"} - self.exclude if probe is not None else set()
        methods = [m for m in QUANTIZERS if m not in self.exclude and (m == "rtn" or m in with_probe)]
        items = []
        for short in SHORT_NAMES:
            members = self._members(short)
            options = [
                self._option(members, bits, group, method, rank, solve)
                for method in methods
                for bits in BITS
                for group in GROUPS
                for rank in ((0, EORA_RANK) if "eora" in with_probe and bits in EORA_BITS else (0,))
                if all(linear.in_features % group == 0 and rank < min(linear.weight.shape) for _, linear in members)
                and option_name(bits, group, method, rank) not in self.exclude
            ]
            layers = tuple(range(len(decoder_layers(self.model))))
            items.append(Item(short, options, _family_references(options), layers=layers))
        return items

    def _option(self, members, bits: int, group: int, method: str, rank: int, hessians: dict) -> Option:
        grid = QuantGrid(bits, True, group)
        name = option_name(bits, group, method, rank)
        factors = lowrank_params(name, members) * 2 + (2 * len(members) * _HEADER_PER_TENSOR if rank else 0)
        size = sum(packed_bytes(*linear.weight.shape, bits, group) for _, linear in members) + factors

        def weights() -> dict[str, torch.Tensor]:
            # each Linear on its own, from the original's inputs (the stages are sequential: an estimate)
            if method == "gptq":
                found = {n: _gptq(lin.weight, hessians[n], grid) for n, lin in members}
            else:
                found = {n: quantize_codes(lin.weight, grid).dequantize() for n, lin in members}
            if rank:
                for n, lin in members:
                    # v_proj's per-head Hessians: their mean (the eora stage fits each head's rows to its own)
                    fitted_to = hessians[n].mean(0) if hessians[n].dim() == 3 else hessians[n]
                    a, b = eora_factors(lin.weight.float() - found[n], fitted_to, rank)
                    found[n] = found[n] + (b.half().float() @ a.half().float())  # the factors as stored (float16)
            return found

        return Option(name, size, weights, family(name))

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

    @staticmethod
    def width_step(intermediate: int) -> int:
        """MLP widths are cut to multiples of this: down_proj keeps every group size its full rows allow."""
        return max((g for g in GROUPS if intermediate % g == 0), default=GROUPS[0])

    def recipe(
        self,
        formats: dict[str, str],
        model: str,
        calibration: dict,
        evaluate: dict,
        output: Path,
        removed: tuple[int, ...] = (),
        mlp_channels: int | None = None,
    ) -> dict:
        """The recipe (as YAML data) that cuts the MLP to `mlp_channels` (on the full model, as the search measured
        it) and removes the `removed` decoder layers, then quantizes every projection kind to its format: one
        quantize stage per quantizer, RTN first (so that GPTQ's walk sees those Linears rounded and compensates for
        them), each projection on its own grid (per_projection), then the EoRA corrections."""
        stages = [width_stage(mlp_channels)] if mlp_channels else []
        stages += [{"prune_depth": {"layers": sorted(removed)}}] if removed else []
        by_method: dict[str, dict[str, tuple[int, int]]] = {}
        compensated: dict[int, list[str]] = {}
        for short, name in formats.items():
            method, bits, group, rank = parse_option(name)
            by_method.setdefault(method, {})[short] = (bits, group)
            if rank:
                compensated.setdefault(rank, []).append(short)
        for method in sorted(by_method, key=QUANTIZERS.index):
            stages.append({"quantize": _quantize_stage(method, by_method[method])})
        for rank, targets in sorted(compensated.items()):  # after every quantize stage: EoRA fits the final error
            stages.append({"lowrank": {"method": "eora", "rank": rank, "targets": targets}})
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
        return [self._option_ms(item.name, o.name) for o in item.options]

    def _option_ms(self, short: str, name: str) -> float:
        """ms/token of every layer's `short` projection at option `name`: its packed format's rate, and an EoRA
        correction's factors at the dense rate."""
        model = self.latency_model()
        lowrank = lowrank_params(name, self._members(short))
        return model.item_ms(self._group_params(short), kernel_format(name)) + model.item_ms(lowrank, self.dtype)

    def decode(self, path: Path, row: dict | None = None) -> dict:
        """slimlm's decode speed of the model saved in `path`, and the latency model's prediction for the row's
        formats, scaled as the knapsack scales them to the layers and MLP channels the row keeps."""
        from slimlm.models import load_model

        config = (Path(path) / "config.json").stat()  # rewritten with the folder: a new folder is timed again
        key = f"folder|{Path(path).resolve()}|{config.st_mtime_ns}"
        figures = self._figures(key, lambda: load_model(str(path)).model)
        predicted = None
        formats = (row or {}).get("formats") or {}
        if formats and {kernel_format(name) for name in formats.values()} <= set(self.latency_model().rates):
            kept = 1 - len(row.get("removed", ())) / len(decoder_layers(self.model))
            channels, intermediate = row.get("mlp_channels"), config_widths(self.model.config)[0]
            predicted = sum(
                kept * width_share(short, channels, intermediate) * self._option_ms(short, name)
                for short, name in formats.items()
            )
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
