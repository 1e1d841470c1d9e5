"""`slimlm auto --recover TOKENS`: candidates that remove decoder layers are distilled before they are exported.

A candidate's recovered form is a recipe: `prune_depth` of exactly its layers, `distill` from the original for
TOKENS tokens of c4 (logit KL, the recovery benchmark's learning rate), then the gguf export with the candidate's
types, renumbered to the layers that remain. It is run by the pipeline, its GGUF scored as every other row, and
it stands beside the unrecovered candidate in the report; the best row may be either.

The search knows recovery will follow: a removed layer's proxy cost is weighted by `REMOVAL_KL_LEFT`, the part
of a removal's KL that recovery leaves (benchmarks/auto_recover.py measures it: KL of files with 1, 2 and 4
layers removed and every matrix Q8_0, before and after recovery, less the Q8_0 file's own KL). Quantization
error is not recovered: distillation runs on the float32 model before llama-quantize.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from slimlm.auto.widths import width_stage
from slimlm.export import mixed_types as mixed

# benchmarks/results/auto_recover.json, SmolLM2-135M, 40,960 c4 tokens: 77 %, 69 % and 73 % of the KL left with
# 1, 2 and 4 layers removed (WikiText-2 KL 0.134 -> 0.103, 0.301 -> 0.210, 0.705 -> 0.515); their mean. Measured at
# that one token budget: more tokens recover more, by an amount not measured
REMOVAL_KL_LEFT = 0.73
BATCH_SIZE, SEQ_LEN, LR = 4, 512, 1e-4


def recovery_steps(tokens: int) -> int:
    """Optimizer steps of BATCH_SIZE windows of SEQ_LEN tokens within `tokens` (at least one)."""
    return max(1, tokens // (BATCH_SIZE * SEQ_LEN))


def renumbered(formats: dict[str, str], removed: list[int]) -> dict[str, str]:
    """`formats` by the module names of the model once `removed` layers are gone (later layers move down)."""
    gone = frozenset(removed)
    found = {name: mixed.renumbered(name, gone, "model.layers") for name in formats}
    return {new: formats[name] for name, new in found.items() if new is not None}


def recovery_recipe(
    model: str,
    formats: dict[str, str],
    removed: list[int],
    tokens: int,
    output: Path,
    pre: str | None = None,
    width: tuple[int, dict] | None = None,
) -> dict:
    """The recipe that removes `removed`, distills for `tokens` and exports `formats` to <output>/export/model.gguf
    (`pre`: llama.cpp's pre-tokenizer name, that of the file the search started from; `width`: (MLP channels,
    the calibration the cut is fitted to) when the candidate cuts the MLP first, as its unrecovered file does)."""
    steps = recovery_steps(tokens)
    distill = {
        "steps": steps,
        "batch_size": BATCH_SIZE,
        "seq_len": SEQ_LEN,
        "lr": LR,
        "warmup": steps // 10,
        "data": "c4",
        "loss": {"kl": 1.0},
        "checkpoint_every": 0,
    }
    cut = {"calibration": width[1], "stages": [width_stage(width[0])]} if width else {"stages": []}
    return {
        "model": model,
        "dtype": "float32",
        "evaluate": {"tasks": [], "speed": False},  # the GGUF is scored by llama-perplexity, as every row
        **({"calibration": cut["calibration"]} if width else {}),
        "stages": cut["stages"] + [{"prune_depth": {"layers": sorted(removed)}}, {"distill": distill}],
        "export": [
            {"format": "gguf", "tensor_types": renumbered(formats, removed), "base_type": mixed.BASE_TYPE}
            | ({"pre": pre} if pre else {})
        ],
        "output": str(output),
    }


def recovered_rows(
    settings, target, rows: list[dict], state: dict, out: Path, save_state, text: Path, calibration: dict
) -> list[dict]:
    """The recovered form of every candidate row that removes layers, scored (and kept in `state` for --resume);
    `calibration`: the windows an MLP cut is fitted to."""
    import yaml

    from slimlm.export.gguf_vocab import read_gguf_pre
    from slimlm.pipeline import run_recipe
    from slimlm.progress import progress_bar
    from slimlm.recipe import parse_recipe

    pruned = [r for r in rows if r["label"].startswith("candidate") and r.get("removed")]
    found, pre = [], read_gguf_pre(target.f32)
    with progress_bar("auto: recovery", total=len(pruned)) as advance:
        for row in pruned:
            what = [row["formats"], row["removed"], settings.recover]
            width = (row["mlp_channels"], calibration) if row.get("mlp_channels") else None
            what += [row["mlp_channels"]] if width else []  # rows without a cut keep their keys
            key = "recover-" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
            folder = out / "recover" / row["label"].replace(" ", "-")
            if key not in state["scores"]:
                data = recovery_recipe(
                    settings.model, row["formats"], row["removed"], settings.recover, folder, pre, width
                )
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "recipe.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
                run_recipe(parse_recipe(data, str(folder / "recipe.yaml")))
                path = folder / "export" / "model.gguf"
                state["scores"][key] = target.score(path, text, settings.eval_chunks) | {
                    "path": str(path),
                    "recipe": str(folder / "recipe.yaml"),
                }
                save_state()
            figures = state["scores"][key]
            if settings.decode:
                figures = figures | target.decode(Path(figures["path"]), row)
            found.append(
                {
                    "label": f"{row['label']} + recovery",
                    "formats": row["formats"],
                    "removed": row["removed"],
                    "proxy_kl": row["proxy_kl_recovered"],
                    "predicted_bytes": row["predicted_bytes"],
                    "recovered_from": row["label"],
                    **({"mlp_channels": row["mlp_channels"]} if width else {}),
                    "recover_tokens": recovery_steps(settings.recover) * BATCH_SIZE * SEQ_LEN,
                    "kld_before_recovery": row["kld"],
                }
                | figures
            )
            advance(description=f"auto: recovery ({row['label']})")
    return found
