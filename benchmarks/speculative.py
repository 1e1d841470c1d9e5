"""Speculative decoding of the built-in SmolLM2-135M with slimlm-compressed drafts: acceptance, tokens/s, projection.

Target: the built-in model in float32 on the compiled static-cache path (decode.py). Drafts, built once with slimlm's
own stages and kept under `--cache` (a rerun loads them):

- depth−8+KD: prune_depth (remove 8 of 30 layers, block influence on c4 windows) then distill (forward KL to the
  original, `--kd-steps` steps of `--kd-batch` × 512 c4 tokens; the row states the tokens trained);
- W4 GPTQ: quantize gptq, 4 bits, symmetric, group 64, packed (int4pack), calibrated on c4 windows;
- both: the depth−8+KD draft, then the same GPTQ.

Runs: greedy continuations of `--new-tokens` tokens of fixed prompts (openings of WikiText-2 test articles, and chat
questions through the model's chat template). In every round each prompt runs without a draft (`generate`), each
draft alone, then with each draft and k (`speculative_generate`): interleaved, so a busy machine slows all alike.
Figures are totals over the prompts per round, medians over rounds: acceptance = proposals kept / proposed, α fit
(the per-token acceptance probability that gives the measured tokens per target forward under independent
acceptances, Leviathan's α), decode tok/s with and without the draft (prefill apart) per CPU second of this process
and per wall second, their speed-ups (median of the rounds' ratios), "same" (prompts whose greedy text with the
draft equals the text without, worst round), c = the draft's CPU time per token / the target's (each decoding
alone), and "verify" = the target's compiled (k+1)-token forward / its one-token step (CPU time, median of
`--reps`). One torch thread by default: on a machine loaded well past its 2 cores, 2 threads made a 5-token forward
~10× slower (OpenMP threads waiting on each other; measured 1.9 s against 0.2 s), and CPU time is then the stable
measure; the load average is recorded with every row. The transformers loop (`generate(assistant_model=)`, eager
dynamic caches) runs per draft at `--hf-k` on `--hf-prompts` prompts for comparison.

Projection: Leviathan et al.'s expected speed-up (1 − α^(k+1)) / ((1 − α)(c·k + 1)) with the fitted α and measured c
("+verify": the same with the verifying forward's measured cost in place of 1), and with c / 10 and c / 50 for a
target 10× and 50× costlier per token. Check: a randomly initialised LLaMA of
TinyLlama-1.1B's shape (hidden 2048, `--wide-layers` layers, SmolLM2's vocabulary) as the target: its one-token
compiled step, its (k+1)-token verifying forward and the real draft's step are timed, and the speed-up they imply
for the measured α is set beside the projection (its acceptance would be meaningless, so none is measured).

    python benchmarks/speculative.py [--threads 1] [--new-tokens 64] [--ks 3,5] [--rounds 2] [--build-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from slimlm.calibration import Calibration
from slimlm.data import calibration_windows, load_text
from slimlm.evaluate.footprint import parameter_counts
from slimlm.evaluate.machine import machine_info
from slimlm.inference.decode import decoder_for
from slimlm.inference.generate import generate
from slimlm.inference.speculative import (
    all_logits,
    assisted_generate,
    rewind,
    speculative_generate,
    verifier_for,
)
from slimlm.models import load_model, save_model
from slimlm.recipe import CalibrationConfig
from slimlm.registry import StageContext, get_stage
from slimlm.report import atomic_write
from slimlm.storage import kernel_summary
from speculative_table import Totals, expected_tokens, leviathan_speedup, print_tables, summarise

MODEL = "smollm2-135m"
RESULTS = Path(__file__).parent / "results"
GPTQ = ("quantize", {"method": "gptq", "bits": 4, "group_size": 64, "sym": True})
PRUNE = ("prune_depth", {"remove": 8, "criterion": "block_influence"})
CHAT_QUESTIONS = (
    "What is the capital of France, and why is it famous?",
    "Write a short poem about the sea.",
    "Explain in two sentences how a refrigerator works.",
)


def draft_stages(args) -> dict[str, tuple[str, list[tuple[str, dict]]]]:
    """name → (the model it starts from: the built-in one or an earlier draft, the stages applied to it)."""
    kd = ("distill", {
        "steps": args.kd_steps, "batch_size": args.kd_batch, "seq_len": 512, "lr": 1e-4, "warmup": 2,
        "data": "c4", "checkpoint_every": 0, "seed": 0, "loss": {"kl": 1.0},
    })  # fmt: skip
    return {
        "depth-8+KD": (MODEL, [PRUNE, kd]),
        "W4 GPTQ": (MODEL, [GPTQ]),
        "depth-8+KD, W4 GPTQ": ("depth-8+KD", [GPTQ]),
    }


def build_drafts(args) -> dict[str, dict]:
    """name → {folder, stages, seconds}: each draft built once by slimlm's stages and saved under --cache."""
    drafts, loaded = {}, None
    for name, (start_from, stages) in draft_stages(args).items():
        if not re.search(args.drafts, name):
            continue
        folder = args.cache / name.replace(" ", "_").replace(",", "")
        meta = folder / "speculative_build.json"
        if not meta.exists():
            loaded = loaded or load_model(MODEL)
            start = time.perf_counter()
            model = build_draft(loaded, drafts.get(start_from, {}).get("folder", MODEL), stages, args)
            save_model(model, loaded.tokenizer, folder, extra_json={meta.name: {
                "stages": stages, "seconds": time.perf_counter() - start, "load_avg": os.getloadavg(),
            }})  # fmt: skip
            print(f"built {name} in {time.perf_counter() - start:.0f} s -> {folder}", file=sys.stderr, flush=True)
        drafts[name] = {"folder": str(folder), **json.loads(meta.read_text())}
    return drafts


def build_draft(loaded, start_from: str, stages, args):
    """`start_from` (built-in name or folder) through `stages`; `loaded` is the original (teacher, tokenizer)."""
    windows = calibration_windows(loaded.tokenizer, load_text("c4"), args.calib_samples, 1024, 0)
    config = CalibrationConfig(data="c4", samples=args.calib_samples, seq_len=1024, seed=0)
    model = load_model(start_from).model
    with tempfile.TemporaryDirectory() as scratch:
        context = StageContext(loaded.tokenizer, Calibration(config, loaded.tokenizer, windows), Path(scratch))
        context.load_original = lambda: loaded.model
        for name, options in stages:
            spec = get_stage(name)
            model = spec.apply(model, spec.options_model(options).model_validate(options), context)
            print(f"  {name}: {'; '.join(context.notes)}", file=sys.stderr, flush=True)
    return model


def prompt_set(tokenizer, articles: int, tokens: int) -> dict[str, torch.Tensor]:
    """label → prompt ids [1, n]: the first paragraph of the first `articles` WikiText-2 test articles (cut to
    `tokens` tokens), and the chat questions through the chat template."""
    documents, prompts = load_text("wikitext2").documents, {}
    for i, document in enumerate(documents):
        title = document.strip()
        if title.startswith("= ") and not title.startswith("= ="):  # an article's title line
            paragraph = next(d for d in documents[i + 1 :] if d.strip())
            prompts[f"wiki: {title.strip('= ')}"] = tokenizer(paragraph.strip(), return_tensors="pt").input_ids[
                :, :tokens
            ]
            if len(prompts) == articles:
                break
    for question in CHAT_QUESTIONS:
        messages = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        prompts[f"chat: {question[:30]}"] = ids["input_ids"]
    return prompts


def median_seconds(function, reps: int) -> float:
    """Median CPU seconds of a call (process time: on a busy machine wall time mostly measures the others)."""
    times = []
    for _ in range(reps):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return statistics.median(times)


def step_costs(model, ks: list[int], reps: int, context: int = 64) -> dict:
    """Seconds of the model's one-token compiled step and of its (k+1)-token verifying forward (compiled as
    speculative_generate runs it, and eager), all on a static cache holding `context` tokens (rewound after every
    call, so each call sees the same length)."""
    decoder = decoder_for(model)
    cache, verifier = decoder.new_cache(context + max(ks) + 2), verifier_for(decoder)
    decoder.prefill(torch.randint(0, model.config.vocab_size, (1, context)), cache)
    token = torch.zeros(1, 1, dtype=torch.long)

    def timed(function, *args) -> float:
        def call():
            function(*args)
            rewind(cache, context)

        call()
        return median_seconds(call, reps)

    costs = {"step": timed(decoder.step, token, cache), "path": decoder.step_path(cache)}
    for k in ks:
        verifier.warm_up(k + 1, context + max(ks) + 2)
        ids = torch.zeros(1, k + 1, dtype=torch.long)
        costs[f"verify_{k}"] = timed(verifier, ids, cache)
        costs[f"eager_verify_{k}"] = timed(all_logits, model, ids, cache)
    costs["verify_note"] = verifier.note
    return costs


def wide_llama(layers: int, vocab_size: int):
    """A randomly initialised LLaMA of TinyLlama-1.1B's width (hidden 2048, MLP 5632, 32 heads, 4 KV heads), its
    embedding tied to the head as SmolLM2's is (memory: the machine had ~5 GB free)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=vocab_size, tie_word_embeddings=True, max_position_embeddings=2048,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.normal_(0, 0.02, generator=generator)
    model.model.rotary_emb.__init__(config)  # its inverse frequencies are a buffer to_empty left uninitialised
    return model.eval()


def measure(args, target, tokenizer, drafts: dict, prompts: dict, ks: list[int]) -> dict:
    """Every round: each prompt without a draft, then each draft alone (for c), then with each draft and k."""
    base = decoder_for(target)
    runs = {"no draft": [], **{f"{name} alone": [] for name in drafts}}
    runs |= {(name, k): [] for name in drafts for k in ks}
    generate_args = {"max_new_tokens": args.new_tokens}
    for ids in list(prompts.values())[:1]:  # warm-up: compile every decoder, touch every verify length
        generate(target, tokenizer, ids, 4, decoder=base)
        for draft in drafts.values():
            generate(draft, tokenizer, ids, 4, decoder=decoder_for(draft))
            for k in ks:
                speculative_generate(target, draft, tokenizer, ids, 2 * k + 2, k=k, decoder=base)
    for round_index in range(args.rounds):
        totals = {key: Totals() for key in runs}
        load = os.getloadavg()[0]
        for ids in prompts.values():
            reference = generate(target, tokenizer, ids, decoder=base, **generate_args)
            totals["no draft"].add(reference)
            for name, draft in drafts.items():
                totals[f"{name} alone"].add(
                    generate(draft, tokenizer, ids, decoder=decoder_for(draft), **generate_args)
                )
                for k in ks:
                    result = speculative_generate(target, draft, tokenizer, ids, k=k, decoder=base, **generate_args)
                    totals[(name, k)].add(result, reference)
        for key, total in totals.items():
            runs[key].append((total, load))
        print(f"round {round_index + 1}/{args.rounds}: load {load:.1f}, no draft {totals['no draft'].tps:.1f} tok/s",
              file=sys.stderr, flush=True)  # fmt: skip
    return runs


def transformers_rows(args, target, tokenizer, drafts: dict, prompts: dict) -> list[dict]:
    """transformers' assisted generation (eager) beside its plain greedy generate and slimlm's loop at --hf-k."""
    rows = []
    for name, draft in drafts.items():
        for schedule in ("constant", "heuristic"):
            plain, assisted, ours = Totals(), Totals(), Totals()
            for ids in list(prompts.values())[: args.hf_prompts]:
                start, cpu_start = time.perf_counter(), time.process_time()
                out = target.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
                plain.tokens += out.shape[1] - ids.shape[1] - 1
                plain.seconds += time.perf_counter() - start
                plain.cpu_seconds += time.process_time() - cpu_start
                assisted.add(
                    assisted_generate(target, draft, tokenizer, ids, args.new_tokens, k=args.hf_k, schedule=schedule)
                )
                ours.add(speculative_generate(target, draft, tokenizer, ids, args.new_tokens, k=args.hf_k))
            rows.append({
                "draft": name, "k": args.hf_k, "schedule": schedule, "hf_plain_tps": plain.tps,
                "hf_assisted_tps": assisted.tps, "hf_tokens_per_target_forward": assisted.tokens / assisted.forwards,
                "slimlm_loop_tps": ours.tps, "hf_plain_cpu_tps": plain.cpu_tps, "hf_assisted_cpu_tps": assisted.cpu_tps,
                "slimlm_loop_cpu_tps": ours.cpu_tps, "load_avg_1min": os.getloadavg()[0],
            })  # fmt: skip
            print(f"transformers loop, {name}, {schedule}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def wide_check(args, drafts: dict, rows: list[dict], ks: list[int], target_costs: dict) -> dict:
    """The projection checked on a target ~10× costlier: a random wide LLaMA's step and verify costs and the real
    drafts' step costs (all timed here, interleaved per repetition block), set into the speed-up formula with each
    row's measured alpha. Nothing of its text is used: its acceptance would be meaningless."""
    wide = wide_llama(args.wide_layers, next(iter(drafts.values())).config.vocab_size)
    wide_costs = step_costs(wide, ks, args.reps)
    params = sum(p.numel() for p in wide.parameters())
    del wide
    draft_steps = {name: step_costs(draft, [1], args.reps)["step"] for name, draft in drafts.items()}
    checks = []
    for row in rows:
        c = draft_steps[row["draft"]] / wide_costs["step"]
        verify = wide_costs[f"verify_{row['k']}"] / wide_costs["step"]
        checks.append({
            "draft": row["draft"], "k": row["k"], "alpha_fit": row["alpha_fit"], "c_wide": c,
            "verify_over_step_wide": verify, "leviathan_wide": leviathan_speedup(row["alpha_fit"], row["k"], c),
            "timed_wide": expected_tokens(row["alpha_fit"], row["k"]) / (c * row["k"] + verify),
            "projected_10x": row["projected_10x"],
        })  # fmt: skip
    return {
        "layers": args.wide_layers, "params": params, "costs": wide_costs, "draft_step_seconds": draft_steps,
        "cost_ratio_to_target": wide_costs["step"] / target_costs["step"], "rows": checks,
        "load_avg_1min": os.getloadavg()[0],
    }  # fmt: skip


def wide_only(args, built: dict) -> None:
    payload = json.loads(args.out.read_text())
    drafts = {name: load_model(info["folder"]).model for name, info in built.items()}
    payload["wide"] = wide_check(args, drafts, payload["rows"], payload["ks"], payload["target_costs"])
    payload["load_avg_end"] = os.getloadavg()
    print_tables(Console(width=240), payload)
    atomic_write(args.out, json.dumps(payload, indent=2, default=str).encode())
    print(f"wrote {args.out}")


def draft_size(model, folder: str) -> tuple[int, int]:
    """(weights counted as dense ones, bytes of the saved safetensors)."""
    return parameter_counts(model)["total"], sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ks", default="3,5")
    parser.add_argument("--hf-k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kd-steps", type=int, default=12)
    parser.add_argument("--kd-batch", type=int, default=1)
    parser.add_argument("--calib-samples", type=int, default=8, help="c4 windows of 1024 (prune_depth, GPTQ)")
    parser.add_argument("--wide-layers", type=int, default=12, help="0 skips the wide check (12: ~3.3 GB)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/slimlm-speculative-drafts"))
    parser.add_argument("--articles", type=int, default=2, help="WikiText-2 article openings among the prompts")
    parser.add_argument("--reps", type=int, default=10, help="repetitions of each timed step (median)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' assisted generation")
    parser.add_argument("--hf-prompts", type=int, default=2, help="prompts of the transformers comparison")
    parser.add_argument("--drafts", default=".", help="regex over the draft names")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--wide-only", action="store_true", help="only the wide check, added to --out's results")
    parser.add_argument("--out", type=Path, default=RESULTS / "speculative.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("SLIMLM_NO_PROGRESS", "1")
    built = build_drafts(args)
    if args.build_only:
        return
    if args.wide_only:  # the wide check alone, added to an earlier run's results
        wide_only(args, built)
        return
    ks = [int(k) for k in args.ks.split(",")]
    started, loaded = time.strftime("%Y-%m-%d %H:%M:%S"), load_model(MODEL)
    target, tokenizer = loaded.model, loaded.tokenizer
    drafts = {name: load_model(info["folder"]).model for name, info in built.items()}
    for name, draft in drafts.items():
        built[name]["params"], built[name]["bytes"] = draft_size(draft, built[name]["folder"])
        built[name]["kernel"] = kernel_summary(draft)
    prompts = prompt_set(tokenizer, args.articles, 48)
    load_start = os.getloadavg()
    costs = step_costs(target, ks, args.reps)
    runs = measure(args, target, tokenizer, drafts, prompts, ks)
    rows = summarise(runs, built, ks, costs, len(prompts))
    payload = {
        "started": started, "model": MODEL, "threads": args.threads, "new_tokens": args.new_tokens, "ks": ks,
        "rounds": args.rounds, "hf_k": args.hf_k, "prompts": {label: ids.shape[1] for label, ids in prompts.items()},
        "drafts": built, "target_costs": costs, "load_avg_start": load_start, "machine": machine_info(), "rows": rows,
        "transformers": transformers_rows(args, target, tokenizer, drafts, prompts) if args.hf else [],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(payload, indent=2, default=str).encode())  # kept if the wide check fails
    payload["wide"] = wide_check(args, drafts, rows, ks, costs) if args.wide_layers else {"rows": []}
    payload["load_avg_end"] = os.getloadavg()
    print_tables(Console(width=240), payload)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, json.dumps(payload, indent=2, default=str).encode())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
