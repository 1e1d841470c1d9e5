"""`slimlm auto --target gguf` end to end on a tiny model with llama.cpp's tools: a size budget gives every row
llama-bench's decode speed and the latency model's prediction; a latency budget (ms/token) is searched with the
same knapsack, its candidates predicted within it, the report showing both Pareto panels."""

from pathlib import Path

import pytest

from conftest import write_documents
from slimlm.auto.run import AutoSettings, run_auto
from slimlm.errors import SlimlmError


@pytest.fixture(scope="module")
def llama_tools():
    from slimlm.export.llamacpp import llama_cpp_bin

    try:
        return llama_cpp_bin()
    except SlimlmError as err:
        pytest.skip(f"llama.cpp's tools are not available: {err}")


@pytest.fixture()
def work(tiny_model_dir, tmp_path, llama_tools):
    """The f32 GGUF the search starts from, written with the tiny tokenizer's pre-tokenizer named."""
    from slimlm.export.gguf import export_gguf
    from slimlm.models import load_model

    loaded = load_model(str(tiny_model_dir))
    folder = tmp_path / "work"
    folder.mkdir()
    export_gguf(loaded.model, loaded.tokenizer, folder / "f32.gguf", dtype="f32", pre="gpt-2")
    return folder


def _settings(model_dir, tmp_path, work, budget, name):
    return AutoSettings(
        model=str(model_dir),
        budget=budget,
        target="gguf",
        output=str(tmp_path / name),
        candidates=2,
        max_removed=1,
        calib_data=write_documents(tmp_path),
        calib_samples=2,
        calib_seq_len=16,
        eval_chunks=2,  # llama-perplexity saving KL base logits prints no estimate for 1 chunk
        baselines=["Q8_0"],
        work=str(work),
        threads=1,  # a 2-thread llama-bench of a tiny model on a busy 2-core machine can take minutes
    )


@pytest.mark.builtin  # not the built-in model, but slow (~40 s): WikiText-2 from the shared data, llama.cpp per row
def test_latency_budget_end_to_end(tiny_model_dir, tmp_path, work):
    sized = run_auto(_settings(tiny_model_dir, tmp_path, work, "1GB", "size"))
    for row in sized["rows"]:
        assert row["decode_tps"] > 0 and row["decode_ms_per_token"] > 0, row["label"]
        assert row["predicted_ms_per_token"] > 0, row["label"]
    uniform = [r["predicted_ms_per_token"] for r in sized["rows"] if r["label"].startswith("uniform")]
    budget = (min(uniform) + max(uniform)) / 2

    summary = run_auto(_settings(tiny_model_dir, tmp_path, work, f"{budget:.6f}ms/token", "latency"))
    assert summary["budget"]["resource"] == "ms_per_token" and summary["budget"]["bytes"] is None
    candidates = [r for r in summary["rows"] if r["label"].startswith("candidate")]
    assert candidates
    for row in candidates:
        assert row["predicted_ms_per_token"] <= budget + 1e-6
        assert row["decode_tps"] > 0 and row["bytes"] == row["predicted_bytes"]
    assert summary["latency_model"]["agreement_candidates"]["rows"] == len(candidates)
    out = tmp_path / "latency"
    report = (out / "report.md").read_text()
    assert "Latency model" in report and "decode tok/s" in report
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(SlimlmError, match="ms/token is below the smallest gguf output"):
        run_auto(_settings(tiny_model_dir, tmp_path, work, "0.000001ms/token", "tiny"))


def test_recovered_types_follow_the_layers_that_remain():
    from slimlm.auto.recover import renumbered

    formats = {
        "model.embed_tokens": "Q8_0",
        "model.layers.0.self_attn.q_proj": "Q4_0",
        "model.layers.1.mlp.up_proj": "Q5_0",
        "model.layers.2.mlp.up_proj": "Q4_1",
        "model.layers.3.mlp.down_proj": "IQ4_NL",
    }
    assert renumbered(formats, [1, 2]) == {
        "model.embed_tokens": "Q8_0",
        "model.layers.0.self_attn.q_proj": "Q4_0",
        "model.layers.1.mlp.down_proj": "IQ4_NL",
    }


@pytest.mark.builtin  # not the built-in model, but slow: a pipeline run with distillation, llama.cpp per row
def test_recover_distills_candidates_that_remove_layers(tiny_model_dir, tmp_path, work, monkeypatch):
    import yaml
    from gguf import GGUFReader

    import slimlm.auto.run as run_module

    # removal counted free: at a tight budget the candidates remove the layer the search allows
    monkeypatch.setattr(run_module, "REMOVAL_KL_LEFT", 0.0)
    settings = _settings(tiny_model_dir, tmp_path, work, "5bpw", "recover")
    settings.recover, settings.decode = 2048, False
    summary = run_auto(settings)

    rows = {r["label"]: r for r in summary["rows"]}
    candidates = [r for r in rows.values() if r["label"].startswith("candidate") and "+" not in r["label"]]
    pruned = [r for r in candidates if r["removed"]]
    assert pruned and not any(r.get("recovered_from") for r in candidates)
    others = [r for r in rows if not r.startswith("candidate")]
    assert len(rows) == len(summary["rows"]) == len(candidates) + len(pruned) + len(others)
    for row in pruned:
        recovered = rows[f"{row['label']} + recovery"]
        assert recovered["recovered_from"] == row["label"] and recovered["recover_tokens"] == 2048
        assert recovered["kld_before_recovery"] == row["kld"] and recovered["kld"] != row["kld"]
        recipe = yaml.safe_load(Path(recovered["recipe"]).read_text())
        assert recipe["stages"][0] == {"prune_depth": {"layers": row["removed"]}}
        assert recipe["stages"][1]["distill"]["steps"] == 1
        reader = GGUFReader(recovered["path"])
        assert int(reader.fields["llama.block_count"].parts[-1][0]) == 2 - len(row["removed"])
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        for name, type_name in row["formats"].items():  # the candidate's types, on the layer that remains
            if name.startswith("model.layers."):
                assert types[f"blk.0.{_GGUF_SUFFIX[name.split('.', 3)[3]]}.weight"] == type_name
    assert [r["label"] for r in summary["recovery"]["rows"]] == [f"{r['label']} + recovery" for r in pruned]
    out = tmp_path / "recover"
    assert "Recovery: 2,048 tokens" in (out / "report.md").read_text()
    best = rows[summary["best"]]
    if best.get("recovered_from"):
        assert yaml.safe_load((out / "recipe.yaml").read_text()) == yaml.safe_load(Path(best["recipe"]).read_text())
    assert (out / "model.gguf").stat().st_size == best["bytes"]


_GGUF_SUFFIX = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
