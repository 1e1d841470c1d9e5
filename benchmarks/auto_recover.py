"""How much of a layer removal's KL distillation takes back: the figure behind `slimlm auto --recover`
(auto/recover.py's REMOVAL_KL_LEFT, the part of each removal's proxy cost the search counts when recovery follows).

The built-in model without the 1, 2 and 4 decoder layers the search removes first (least KL when removed alone:
the auto sensitivity cache), every matrix Q8_0 so that removal is nearly all of the error. Each file is scored by
llama-perplexity (KL against the f32 file's log-probs on WikiText-2 test) before recovery and after `--tokens` of
c4 distillation from the original (recover.recovery_recipe: the recipe `slimlm auto --recover` runs).
kl_left = (KL after − KL of uniform Q8_0) / (KL before − KL of uniform Q8_0). Written after every point
(results/auto_recover.json); a rerun skips the points already there.

    python benchmarks/auto_recover.py [--layers 1,2,4] [--tokens 40960] [--chunks 8] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import RESULTS
from slimlm.auto.gguf_target import GGUFTarget
from slimlm.auto.recover import recovery_recipe, recovery_steps
from slimlm.auto.run import AutoSettings, sensitivity_costs
from slimlm.evaluate.machine import machine_info
from slimlm.export.gguf_vocab import read_gguf_pre
from slimlm.models import load_model
from slimlm.paths import shared_data_dir
from slimlm.pipeline import run_recipe, write_json_atomic
from slimlm.recipe import parse_recipe

MODEL = "smollm2-135m"


def point(target, formats, removed: list[int], tokens: int, chunks: int, folder: Path) -> dict:
    text = shared_data_dir() / "wikitext-2-raw-v1" / "wiki.test.raw"
    before_path = folder / f"q8_0-without-{'-'.join(map(str, removed))}.gguf"
    if not before_path.is_file():
        target.write(formats, tuple(removed), before_path)
    before = target.score(before_path, text, chunks)
    run = folder / f"recovered-{'-'.join(map(str, removed))}-{tokens}"
    recipe = recovery_recipe(MODEL, formats, removed, tokens, run, read_gguf_pre(target.f32))
    load, started = os.getloadavg()[0], (time.process_time(), time.perf_counter())
    if not (run / "export" / "model.gguf").is_file():
        run_recipe(parse_recipe(recipe, "auto_recover"))
    after = target.score(run / "export" / "model.gguf", text, chunks)
    return {
        "removed": removed,
        "train_tokens": recovery_steps(tokens) * 2048,
        "kld_before": before["kld"],
        "ppl_before": before["ppl"],
        "kld_after": after["kld"],
        "ppl_after": after["ppl"],
        "bytes_after": after["bytes"],
        "run_cpu_s": time.process_time() - started[0],
        "run_wall_s": time.perf_counter() - started[1],
        "loadavg_1min_before": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,2,4", help="how many layers each point removes")
    parser.add_argument("--tokens", type=int, default=40_960, help="distillation tokens per point")
    parser.add_argument("--chunks", type=int, default=8, help="llama-perplexity chunks of 512 tokens")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimlm-auto-bench/shared"), help="auto's work folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "auto_recover.json")
    args = parser.parse_args()
    settings = AutoSettings(model=MODEL, budget="1GB", work=str(args.work), max_removed=max(_counts(args)))
    target, removal, formats = _search_inputs(settings, args)
    order = sorted(removal, key=removal.get)
    text = shared_data_dir() / "wikitext-2-raw-v1" / "wiki.test.raw"
    target.uniform("Q8_0")
    q8 = target.score(args.work / "uniform" / "Q8_0.gguf", text, args.chunks)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"points": {}}
    results |= {
        "machine": machine_info(),
        "q8_0": {"kld": q8["kld"], "ppl": q8["ppl"]},
        "protocol": f"llama-perplexity -c 512 --chunks {args.chunks} on wiki.test.raw, KL against the f32 GGUF; "
        f"distill (auto/recover.py's recipe) on c4, batch 4 × 512; removal order by the auto sensitivity "
        f"(KL on {settings.calib_samples} x {settings.calib_seq_len} c4 tokens, each layer removed alone)",
    }
    folder = args.work.parent / "recover-bench"
    folder.mkdir(parents=True, exist_ok=True)
    for count in _counts(args):
        key = f"{count}-{args.tokens}"
        if key not in results["points"]:
            removed = sorted(order[:count])
            found = point(target, formats, removed, args.tokens, args.chunks, folder)
            found["proxy_removal_kl"] = sum(removal[layer] for layer in removed)
            found["kl_left"] = (found["kld_after"] - q8["kld"]) / (found["kld_before"] - q8["kld"])
            results["points"][key] = found
            write_json_atomic(args.out, results)
    left = [p["kl_left"] for p in results["points"].values() if p["train_tokens"] == recovery_steps(args.tokens) * 2048]
    results["mean_kl_left"] = sum(left) / len(left)
    write_json_atomic(args.out, results)
    print(f"uniform Q8_0: KL {q8['kld']:.4f}, ppl {q8['ppl']:.3f}")
    print("| removed | tokens | proxy KL | KL before | KL after | ppl before | ppl after | KL left |")
    print("|---|---|---|---|---|---|---|---|")
    for p in results["points"].values():
        print(
            f"| {p['removed']} | {p['train_tokens']:,} | {p['proxy_removal_kl']:.4f} | {p['kld_before']:.4f} | "
            f"{p['kld_after']:.4f} | {p['ppl_before']:.3f} | {p['ppl_after']:.3f} | {p['kl_left']:.0%} |"
        )
    print(f"mean KL left at {args.tokens:,} tokens: {results['mean_kl_left']:.2f}")


def _search_inputs(settings: AutoSettings, args) -> tuple[GGUFTarget, dict[int, float], dict[str, str]]:
    """The target, each layer's removal KL and every item at Q8_0; the probe is left behind here (distillation
    needs the memory)."""
    loaded = load_model(MODEL)
    target = GGUFTarget(loaded.model, loaded.tokenizer, args.work, args.threads)
    costs, _ = sensitivity_costs(settings, loaded, target)
    return target, costs.removal, {item.name: "Q8_0" for item in costs.items}


def _counts(args) -> list[int]:
    return [int(x) for x in args.layers.split(",")]


if __name__ == "__main__":
    main()
