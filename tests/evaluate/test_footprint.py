import time

import pytest
import torch

from conftest import build_tiny_llama
from slimlm.evaluate import footprint
from slimlm.evaluate.footprint import (
    PeakMemory,
    dense_sizes,
    footprint_records,
    layer_sparsity,
    parameter_counts,
    peak_memory_record,
    size_on_disk,
    sparse_format_sizes,
)

# Hand count for hidden 64, intermediate 128, 4 heads / 2 KV heads (head_dim 16), 2 layers, vocab 1000, tied head.
EMBEDDING = 1000 * 64
ATTENTION = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # q, k, v, o
MLP = 3 * 64 * 128  # gate, up, down
NORMS = 2 * 64  # input and post-attention RMSNorm
LINEAR_TOTAL = 2 * (ATTENTION + MLP)
TOTAL = EMBEDDING + 2 * (ATTENTION + MLP + NORMS) + 64  # + final norm; the tied LM head adds nothing
NONZERO = TOTAL - 64  # the embedding row of the padding token (id 2) is initialised to zeros


@pytest.fixture()
def model():
    return build_tiny_llama(1000)


def _by_metric(records):
    return {r.metric: r for r in records}


def test_parameter_counts_count_tied_embeddings_once(model):
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    counts = parameter_counts(model)
    assert counts == {"total": TOTAL, "nonzero": NONZERO, "linear_total": LINEAR_TOTAL, "linear_nonzero": LINEAR_TOTAL}
    assert TOTAL == 138_048
    assert dense_sizes(model) == {"fp32": 4 * TOTAL, "bf16": 2 * TOTAL}


def test_untied_head_is_counted():
    untied = build_tiny_llama(1000, tie=False)
    assert parameter_counts(untied)["total"] == TOTAL + EMBEDDING


def test_zeroing_half_a_linear_shows_in_nonzero_counts_and_layer_sparsity(model):
    up = model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        up.weight[: up.weight.shape[0] // 2] = 0.0
    zeroed = up.weight.numel() // 2
    counts = parameter_counts(model)
    assert counts["total"] == TOTAL and counts["nonzero"] == NONZERO - zeroed
    assert counts["linear_nonzero"] == LINEAR_TOTAL - zeroed

    rows = layer_sparsity(model)
    assert len(rows) == 2 * 7
    by_name = {row["name"]: row for row in rows}
    assert by_name["model.layers.1.mlp.up_proj"] == {
        "name": "model.layers.1.mlp.up_proj",
        "shape": (128, 64),
        "sparsity": 0.5,
    }
    assert all(row["sparsity"] == 0.0 for name, row in by_name.items() if name != "model.layers.1.mlp.up_proj")
    assert by_name["model.layers.0.self_attn.k_proj"]["shape"] == (32, 64)


def test_size_on_disk_of_a_saved_folder_matches_the_safetensors_files(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = list(tmp_path.glob("*.safetensors"))
    assert weights
    assert size_on_disk(tmp_path) == sum(f.stat().st_size for f in weights)
    assert size_on_disk(weights[0]) == weights[0].stat().st_size
    # A stale .bin copy beside the safetensors is not what from_pretrained loads, so it is not counted.
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 1000)
    assert size_on_disk(tmp_path) == sum(f.stat().st_size for f in weights)


def test_footprint_records_on_disk_and_in_memory(model, tmp_path):
    model.save_pretrained(tmp_path)
    on_disk = _by_metric(footprint_records(model, tmp_path))
    disk = size_on_disk(tmp_path)
    assert on_disk["params_total"].value == TOTAL and on_disk["params_total"].unit == "params"
    assert on_disk["params_nonzero"].value == NONZERO
    assert on_disk["size_on_disk"].value == disk and on_disk["size_on_disk"].unit == "bytes"
    assert on_disk["dense_fp32_bytes"].value == 4 * TOTAL and on_disk["dense_bf16_bytes"].value == 2 * TOTAL
    assert on_disk["bits_per_weight"].value == pytest.approx(8 * disk / TOTAL)
    assert on_disk["bits_per_weight"].protocol["basis"] == "size_on_disk"
    assert all(r.task == "size" for r in on_disk.values())

    in_memory = _by_metric(footprint_records(model.to(torch.bfloat16)))
    assert "size_on_disk" not in in_memory
    assert in_memory["bits_per_weight"].value == 16.0
    assert in_memory["bits_per_weight"].protocol["basis"] == "in-memory dtypes"


def test_sparse_format_sizes_count_mask_bits_and_kept_values(model):
    assert "sparse_bitmask_bf16_bytes" not in _by_metric(footprint_records(model))  # dense: nothing to report
    with torch.no_grad():
        for _, linear in footprint.named_decoder_linears(model):
            linear.weight.view(-1, 4)[:, :2] = 0.0  # exactly 2 of every 4 consecutive inputs zeroed
    other = TOTAL - LINEAR_TOTAL
    sizes = sparse_format_sizes(model)
    # bitmask: 1 bit per Linear weight + 2 bytes per kept value; everything else dense bf16
    assert sizes["bitmask"] == 2 * other + LINEAR_TOTAL // 8 + 2 * (LINEAR_TOTAL // 2)
    # 2:4: half the values kept, each 2 bytes + a 2-bit index
    assert sizes["2:4"] == 2 * other + LINEAR_TOTAL // 2 * 2 + LINEAR_TOTAL // 2 // 4
    records = _by_metric(footprint_records(model))
    assert records["sparse_bitmask_bf16_bytes"].value == sizes["bitmask"] < 2 * TOTAL
    assert records["sparse_2of4_bf16_bytes"].value == sizes["2:4"]

    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :4] = 1.0  # one group of 4 with four nonzeros: not 2:4
    assert sparse_format_sizes(model)["2:4"] is None
    assert "sparse_2of4_bf16_bytes" not in _by_metric(footprint_records(model))


ALLOCATION = 200 * 1024 * 1024


def test_peak_memory_sees_an_allocation_and_resets_between_blocks():
    with PeakMemory() as with_allocation:
        block = b"\x01" * ALLOCATION  # bytes(n) of a non-zero value: every page is written, so resident
        del block
    with PeakMemory() as without_allocation:
        small = b"\x01" * (1024 * 1024)
        del small
    assert with_allocation.method == "VmHWM"  # this is Linux with a writable clear_refs
    assert with_allocation.peak_bytes >= with_allocation.start_bytes + 190 * 1024 * 1024
    # The second block starts after the big block was freed: a kernel mark that was not reset would still show it.
    assert without_allocation.peak_bytes < with_allocation.peak_bytes - 150 * 1024 * 1024
    record = peak_memory_record(with_allocation, "load")
    assert (record.task, record.metric, record.unit) == ("memory", "peak_rss_load", "bytes")
    assert record.value == with_allocation.peak_bytes and record.protocol["method"] == "VmHWM"


def test_nested_peak_memory_keeps_the_outer_peak():
    with PeakMemory() as outer:
        block = b"\x01" * ALLOCATION
        del block
        with PeakMemory() as inner:
            pass
    assert inner.peak_bytes < outer.peak_bytes - 150 * 1024 * 1024
    assert outer.peak_bytes >= outer.start_bytes + 190 * 1024 * 1024


def test_peak_memory_falls_back_to_sampling(monkeypatch):
    monkeypatch.setattr(footprint, "_reset_high_water_mark", lambda: False)
    with PeakMemory() as peak:
        block = b"\x01" * ALLOCATION
        time.sleep(0.15)  # the sampler polls every 20 ms: hold the allocation long enough to be seen
        del block
    assert peak.method == "sampled"
    assert peak.peak_bytes >= peak.start_bytes + 190 * 1024 * 1024
