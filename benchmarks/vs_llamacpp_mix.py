"""The "GPTQ mix" rows of vs_llamacpp.py: per tensor, the Q4_0 / Q5_0 / Q8_0 blocks of independent GPTQ W4 / W5 / W8
runs, allocated greedily under a byte budget by a proxy of each choice's damage, and spliced into one GGUF."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from llamacpp_common import log, splice_gguf

SLIM_TIER = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}  # slimlm's bits at group 32 -> the GGUF block type they export as
PROXIES = {
    "fisher": "sum_ij F_ij (W^_ij - W_ij)^2, F the empirical Fisher diagonal (squared gradients of the dense model's "
    "next-token loss, 16 slices of 512 of the 4 x 2048 calibration tokens)",
    "output": "sum_ij E[x_j^2] (W^_ij - W_ij)^2 (the Linear's output error), E[x_j^2] of the dense model's Linear "
    "inputs on the 4 x 2048 calibration tokens",
}
MARGIN = 64 * 1024  # alignment padding and header differences; the written file is checked against the budget


def decoder_linears(model) -> dict:
    """Every decoder Linear of `model` by the GGUF name of its weight (blk.N.attn_q.weight, ...), named by gguf-py's
    own tensor map, as the exporter names them."""
    import gguf

    from slimlm.modules import named_decoder_linears

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return {
        names.get_name(f"{name}.weight", try_suffixes=(".weight",)): module
        for name, module in named_decoder_linears(model)
    }


def input_second_moments(model, windows, cache: Path) -> dict[str, np.ndarray]:
    """E[x_j^2] of the input of every decoder Linear on the calibration windows, by GGUF name (cached in `cache`)."""
    if cache.exists():
        return dict(np.load(cache))
    sums, counts, hooks = {}, Counter(), []
    for key, module in decoder_linears(model).items():

        def hook(_module, inputs, _output, key=key):
            x = inputs[0].detach().double().reshape(-1, inputs[0].shape[-1])
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] += x.shape[0]

        hooks.append(module.register_forward_hook(hook))
    log("input second moments of every Linear on the calibration windows")
    try:
        for window in windows:
            model(window[None])
    finally:
        for h in hooks:
            h.remove()
    moments = {key: (sums[key] / counts[key]).float().numpy() for key in sums}
    np.savez(cache, **moments)
    return moments


def fisher_diagonal(model, windows, cache: Path) -> dict[str, np.ndarray]:
    """Empirical Fisher diagonal E[g_ij^2] of every decoder Linear weight (g the gradient of the next-token loss of
    one 512-token slice of the calibration windows), by GGUF name, rows in the GGUF's order (q/k permuted as the
    exporter permutes them); cached in `cache`."""
    if cache.exists():
        return dict(np.load(cache))
    import torch

    from slimlm.export.gguf import permute_rows

    linears = decoder_linears(model)
    sums = {key: torch.zeros_like(module.weight) for key, module in linears.items()}
    slices = windows.reshape(-1, 512)
    log(f"empirical Fisher diagonal over {len(slices)} slices of 512 calibration tokens")
    try:
        with torch.enable_grad():
            for tokens in slices:
                model.zero_grad(set_to_none=True)
                model(tokens[None], labels=tokens[None]).loss.backward()
                for key, module in linears.items():
                    sums[key] += module.weight.grad.detach() ** 2
    finally:
        model.zero_grad(set_to_none=True)
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    fisher = {}
    for key, total in sums.items():
        values = (total / len(slices)).numpy()
        kind = key.split(".")[2]
        fisher[key] = permute_rows(values, heads[kind]) if kind in heads else values
    np.savez(cache, **fisher)
    return fisher


def proxy_errors(tensors: dict, reference: dict, weights: dict[str, np.ndarray]):
    """(error, bytes) of every weighted tensor at every tier: the proxy's weighted squared error of the tier's
    dequantized blocks against the f32 reference. `tensors`: bits -> GGUF name -> tensor."""
    import gguf

    errors: dict[str, dict[int, float]] = {}
    sizes: dict[str, dict[int, int]] = {}
    log("proxy errors of every Linear at Q4_0 / Q5_0 / Q8_0")
    for name, weight in weights.items():
        exact = np.asarray(reference[name].data, dtype=np.float32)
        weight = weight.astype(np.float64)
        errors[name], sizes[name] = {}, {}
        for bits, by_name in tensors.items():
            tensor = by_name[name]
            values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
            squared = (values - exact).astype(np.float64) ** 2
            errors[name][bits] = float((squared * weight).sum() if weight.ndim == 2 else (squared @ weight).sum())
            sizes[name][bits] = int(tensor.n_bytes)
    return errors, sizes


def choose_upgrades(errors: dict, sizes: dict, spend: int, budget: int) -> tuple[dict[str, int], list]:
    """Start every tensor at 4 bits; repeatedly take the upgrade with the largest proxy drop per extra byte that
    still fits. Returns the bits chosen per tensor and the upgrades (tensor, from, to) in the order taken."""
    chosen = {name: 4 for name in errors}
    order: list[tuple[str, int, int]] = []
    while True:
        best = None
        for name, bits in chosen.items():
            for up in (b for b in errors[name] if b > bits):
                cost = sizes[name][up] - sizes[name][bits]
                gain = errors[name][bits] - errors[name][up]
                if spend + cost <= budget - MARGIN and gain > 0 and (best is None or gain / cost > best[0]):
                    best = (gain / cost, name, up, cost)
        if best is None:
            return chosen, order
        _, name, up, cost = best
        order.append((name, chosen[name], up))
        chosen[name] = up
        spend += cost


def write_mix(
    tiers: dict[int, Path], f32: Path, weights: dict[str, np.ndarray], budget: int, out: Path
) -> tuple[dict, dict]:
    """Write to `out` the 4-bit tier's GGUF with the chosen tensors spliced in from the other tiers, at most `budget`
    bytes (the last upgrades undone while the written file is larger). Returns the choice (types, upgraded tensors)
    and the proxy's totals (every tensor at each tier, and the mix)."""
    import gguf

    reference = {t.name: t for t in gguf.GGUFReader(str(f32)).tensors}
    tensors = {bits: {t.name: t for t in gguf.GGUFReader(str(p)).tensors} for bits, p in tiers.items()}
    errors, sizes = proxy_errors(tensors, reference, weights)
    chosen, order = choose_upgrades(errors, sizes, tiers[4].stat().st_size, budget)
    while True:
        replace = {n: (np.asarray(tensors[b][n].data), tensors[b][n].tensor_type) for n, b in chosen.items() if b != 4}
        splice_gguf(tiers[4], out, replace)
        if out.stat().st_size <= budget or not order:
            break
        name, previous, _ = order.pop()  # over budget: undo the last upgrade and write again
        chosen[name] = previous
    choice = {
        "tensor_types": dict(Counter(SLIM_TIER[b] for b in chosen.values())),
        "upgraded": {n: SLIM_TIER[b] for n, b in chosen.items() if b != 4},
    }
    proxy_totals = {
        "proxy_total": {SLIM_TIER[b]: sum(e[b] for e in errors.values()) for b in tiers},
        "proxy_mix": sum(errors[n][b] for n, b in chosen.items()),
    }
    return choice, proxy_totals
