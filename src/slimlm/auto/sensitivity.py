"""What each (item, option) costs, measured cheaply and cached on disk.

An item is a Linear (or the token embedding) and its options the formats it may take, each with its exact size
in bytes and its dequantized weight. Measuring the KL of every (item, option) with that one change in place is one
forward pass each (thousands for a 30-layer model): instead

- every option's layer-wise output error e = tr(ΔW·H·ΔWᵀ)/rows comes from the probe's Hessians (no forward pass);
- one option per item and family, its reference (a mid-size format), gets the real KL of the whole model with only
  that change: KL_ref. The item's cost of option j is then KL_ref · e_j / e_ref, with the reference of j's family:
  the measured KL, carried to the other formats of the same Linear in proportion to their output error (both are
  quadratic in ΔW for small changes, so the ratio is what varies between Linears — how much a Linear's error
  grows on its way to the logits — and is measured once per Linear and family). A family is the options whose
  error has one shape: RTN's error is spread over every input direction, GPTQ's and EoRA's is pushed into the
  directions the Hessian weighs least, which the layers after it amplify more (benchmarks/auto_proxy_check.py:
  carried from RTN's ratio, down_proj's GPTQ/EoRA options were priced 1.5-2.7x too low; within a family the ratio
  holds). Options with no output error (the original's own values) cost 0.
- the embedding (tied to the LM head), each "remove this layer" and each MLP width (widths.py) get the real KL
  of every option.

Every measurement is appended to a JSON-lines file keyed by the model's weights hash, the calibration settings and
the target, one complete line per figure (flushed and fsynced): a killed run leaves every figure measured so far,
a rerun (or a second search at another budget) reads them instead of measuring again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slimlm.auto.probe import EMBEDDING, Probe
from slimlm.progress import progress_bar


@dataclass
class Option:
    name: str  # Q4_0, w4g64, ...
    bytes: int  # what it adds to the output's size
    weights: Callable[[], dict[str, torch.Tensor]]  # module name -> its dequantized weight, for the item's modules
    family: str = ""  # options whose KL is carried from one reference (their error has one shape: rtn, gptq, ...)


@dataclass
class Item:
    name: str  # a module name (model.layers.3.mlp.down_proj, model.embed_tokens) or a group's (down_proj)
    options: list[Option]
    references: tuple[int, ...] = (0,)  # the options whose KL is measured: one per family of its options
    layer: int | None = None  # the decoder layer it is in (None: the embedding)
    direct: bool = False  # measure every option's KL (the embedding: no Hessian of its own)
    layers: tuple[int, ...] = ()  # a group's decoder layers (allocate.kept_share: what removing some leaves)

    @property
    def sizes(self) -> list[int]:
        return [o.bytes for o in self.options]


class CostCache:
    """Append-only JSON lines {"key": ..., "value": ...}; a torn last line (a kill mid-write) is ignored."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[str, float] = {}
        if not path.is_file():
            return
        lines = path.read_text().splitlines()
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.values[entry["key"]] = entry["value"]
        if len(self.values) < len(lines) or not path.read_bytes().endswith(b"\n"):
            # a torn line would glue onto the next append: keep the complete ones (temporary file, then rename)
            temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            temporary.write_text("".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in self.values.items()))
            os.replace(temporary, path)

    def get(self, key: str, measure: Callable[[], float]) -> float:
        if key not in self.values:
            value = float(measure())
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"key": key, "value": value}) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            self.values[key] = value
        return self.values[key]


@dataclass
class Costs:
    """costs[i][j] of items[i]'s option j; removal[layer]: the KL with that decoder layer left out; widths[n]: the
    KL with every layer's MLP cut to n of its `intermediate` channels."""

    items: list[Item]
    costs: list[list[float]]
    removal: dict[int, float] = field(default_factory=dict)
    widths: dict[int, float] = field(default_factory=dict)
    intermediate: int = 0
    new_figures: int = 0  # figures measured by this run (the others came from the cache)


def _output_error(probe: Probe, option: Option) -> float:
    return sum(probe.output_error(name, weight) for name, weight in option.weights().items())


def item_costs(probe: Probe, item: Item, cache: CostCache) -> list[float]:
    if item.direct:
        return [cache.get(f"kl|{item.name}|{o.name}", lambda o=o: probe.kl(o.weights())) for o in item.options]
    errors = [cache.get(f"err|{item.name}|{o.name}", lambda o=o: _output_error(probe, o)) for o in item.options]
    ratios = {}  # family -> (KL_ref, e_ref)
    for index in item.references:
        ref = item.options[index]
        ratios[ref.family] = cache.get(f"kl|{item.name}|{ref.name}", lambda o=ref: probe.kl(o.weights())), errors[index]
    missing = {o.family for o in item.options} - ratios.keys()
    if missing:
        raise ValueError(f"{item.name}: no reference option for the families {sorted(missing)}")
    return [_carried(*ratios[o.family], e) for o, e in zip(item.options, errors, strict=True)]


def _carried(kl_ref: float, error_ref: float, error: float) -> float:
    """KL_ref · e / e_ref; a reference with no error (the original's values) carries its KL to any that has one."""
    if error_ref <= 0:
        return 0.0 if error <= 0 else kl_ref
    return kl_ref * error / error_ref


def measure(probe: Probe, items: list[Item], cache: CostCache, removable: list[int] = (), cuts=None) -> Costs:
    """Every item's costs, every removable layer's KL and every MLP width's (`cuts`: widths.WidthCuts), with
    progress and an ETA."""
    widths = cuts.counts if cuts else []
    before = len(cache.values)
    costs = []
    with progress_bar("auto: sensitivity", total=len(items) + len(removable) + len(widths)) as advance:
        for item in items:
            costs.append(item_costs(probe, item, cache))
            advance(description=f"auto: sensitivity ({item.name})")
        removal = {}
        for layer in removable:
            removal[layer] = cache.get(f"skip|{layer}", lambda layer=layer: probe.kl(skip=frozenset({layer})))
            advance(description=f"auto: sensitivity (remove layer {layer})")
        cut = {}
        for channels in widths:
            cut[channels] = cache.get(cuts.key(channels), lambda n=channels: probe.kl(cuts.weights(n)()))
            advance(description=f"auto: sensitivity (MLP width {channels})")
    intermediate = cuts.intermediate if cuts else 0
    return Costs(items, costs, removal, cut, intermediate, new_figures=len(cache.values) - before)


__all__ = ["EMBEDDING", "CostCache", "Costs", "Item", "Option", "item_costs", "measure"]
