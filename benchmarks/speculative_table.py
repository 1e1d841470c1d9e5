"""The speculative benchmark's figures (speculative.py): round totals, the independent-acceptance model (alpha fitted
to tokens per target forward, Leviathan's expected speed-up), one summary row per draft and k, and the tables."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table


class Totals:
    """Sums over the prompts of one round: decoded tokens (after the prefill's), seconds, proposals, forwards."""

    def __init__(self):
        self.tokens = self.seconds = self.cpu_seconds = self.proposed = self.accepted = self.forwards = self.same = 0

    def add(self, generation, reference=None) -> None:
        stats = generation.stats
        self.tokens += stats.new_tokens - 1
        self.seconds += stats.decode_seconds
        self.cpu_seconds += stats.decode_cpu_seconds
        self.proposed += getattr(stats, "draft_tokens", 0)
        self.accepted += getattr(stats, "accepted_tokens", 0)
        self.forwards += getattr(stats, "target_forwards", 0)
        self.same += reference is not None and generation.token_ids == reference.token_ids

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds

    @property
    def cpu_tps(self) -> float:
        """Tokens per second of this process's CPU time (one thread: the work, whatever else runs)."""
        return self.tokens / self.cpu_seconds


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per target forward when each proposal is kept with probability alpha, independently."""
    return float(k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def fitted_alpha(tokens_per_forward: float, k: int) -> float:
    """The alpha of the independent-acceptance model that gives the measured tokens per target forward."""
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if expected_tokens(middle, k) < tokens_per_forward else (low, middle)
    return (low + high) / 2


def leviathan_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al. (2023), eq. for the expected walltime improvement: (1 − α^(k+1)) / ((1 − α)(c·k + 1))."""
    return expected_tokens(alpha, k) / (c * k + 1)


def summarise(runs: dict, drafts: dict, ks: list[int], costs: dict, prompts: int) -> list[dict]:
    """One row per draft and k: medians over rounds of the round totals; alpha fitted to tokens per forward."""
    rows = []
    base = [total for total, _ in runs["no draft"]]
    for name, info in drafts.items():
        alone = [total for total, _ in runs[f"{name} alone"]]
        c = statistics.median(a.cpu_tps / b.cpu_tps for a, b in zip(base, alone))  # CPU time per token, draft / target
        for k in ks:
            spec = [total for total, _ in runs[(name, k)]]
            per_forward = statistics.median(s.tokens / s.forwards for s in spec)
            alpha = fitted_alpha(per_forward, k)
            verify = costs[f"verify_{k}"] / costs["step"]  # the verifying forward, in one-token steps
            rows.append({
                "draft": name, "params": info["params"], "bytes": info["bytes"], "k": k,
                "acceptance_rate": statistics.median(s.accepted / s.proposed for s in spec),
                "alpha_fit": alpha, "tokens_per_target_forward": per_forward,
                "tps_draft": statistics.median(s.tps for s in spec),
                "tps_no_draft": statistics.median(b.tps for b in base),
                "speedup": statistics.median(s.tps / b.tps for s, b in zip(spec, base)),
                "cpu_tps_draft": statistics.median(s.cpu_tps for s in spec),
                "cpu_tps_no_draft": statistics.median(b.cpu_tps for b in base),
                "cpu_speedup": statistics.median(s.cpu_tps / b.cpu_tps for s, b in zip(spec, base)),
                "same_text": f"{min(s.same for s in spec)}/{prompts}",
                "c": c, "verify_over_step": verify,
                "leviathan": leviathan_speedup(alpha, k, c),
                "with_verify_cost": expected_tokens(alpha, k) / (c * k + verify),
                "projected_10x": leviathan_speedup(alpha, k, c / 10),
                "projected_50x": leviathan_speedup(alpha, k, c / 50),
                "load_avg_1min": [min(load for _, load in runs[(name, k)]), max(load for _, load in runs[(name, k)])],
                "rounds": [vars(s) for s in spec],
            })  # fmt: skip
    return rows


def print_tables(console: Console, payload: dict) -> None:
    table = Table(title=f"Speculative decoding, {payload['model']} fp32 target, greedy, "
                  f"{payload['new_tokens']} new tokens, {len(payload['prompts'])} prompts, "
                  f"{payload['threads']} threads")  # fmt: skip
    columns = ("draft", "params", "MB", "k", "accept", "α fit", "tok/fwd", "CPU tok/s draft", "CPU tok/s none",
               "speed-up CPU", "speed-up wall", "same", "c", "verify", "Leviathan", "+verify", "10×", "50×",
               "load")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in payload["rows"]:
        table.add_row(
            r["draft"], f"{r['params'] / 1e6:.0f}M", f"{r['bytes'] / 1e6:.0f}", str(r["k"]),
            f"{r['acceptance_rate']:.0%}",
            f"{r['alpha_fit']:.2f}", f"{r['tokens_per_target_forward']:.2f}", f"{r['cpu_tps_draft']:.1f}",
            f"{r['cpu_tps_no_draft']:.1f}", f"{r['cpu_speedup']:.2f}×", f"{r['speedup']:.2f}×", r["same_text"],
            f"{r['c']:.2f}",
            f"{r['verify_over_step']:.2f}", f"{r['leviathan']:.2f}×", f"{r['with_verify_cost']:.2f}×",
            f"{r['projected_10x']:.2f}×", f"{r['projected_50x']:.2f}×", "{:.1f}–{:.1f}".format(*r["load_avg_1min"]),
        )  # fmt: skip
    console.print(table)
    hf = Table(title=f"slimlm's loop against transformers' assisted generation (k {payload['hf_k']})")
    for column in ("draft", "schedule", "HF greedy", "HF assisted", "HF tok/fwd", "slimlm loop", "(CPU tok/s)"):
        hf.add_column(column, justify="right")
    for r in payload["transformers"]:
        hf.add_row(r["draft"], r["schedule"], f"{r['hf_plain_cpu_tps']:.1f}", f"{r['hf_assisted_cpu_tps']:.1f}",
                   f"{r['hf_tokens_per_target_forward']:.2f}", f"{r['slimlm_loop_cpu_tps']:.1f}", "")  # fmt: skip
    console.print(hf)
    wide = payload["wide"]
    table = Table(title=f"Check: random LLaMA, hidden 2048, {wide['layers']} layers ({wide['params'] / 1e9:.2f}B), "
                  f"{wide['cost_ratio_to_target']:.1f}× the 135M's step time, real drafts timed")  # fmt: skip
    for column in ("draft", "k", "α fit", "c", "verify", "Leviathan (c)", "timed (c, verify)", "projected 10×"):
        table.add_column(column, justify="right")
    for r in wide["rows"]:
        table.add_row(r["draft"], str(r["k"]), f"{r['alpha_fit']:.2f}", f"{r['c_wide']:.3f}",
                      f"{r['verify_over_step_wide']:.2f}", f"{r['leviathan_wide']:.2f}×", f"{r['timed_wide']:.2f}×",
                      f"{r['projected_10x']:.2f}×")  # fmt: skip
    console.print(table)
