"""The MLP width as a dimension of `slimlm auto`: counts, the allocation's outer choice, the cut the probe measures
and the recipe stage that makes it."""

import pytest
import torch

from conftest import build_tiny_llama
from slimlm.auto.allocate import allocate, size_resource
from slimlm.auto.probe import Probe
from slimlm.auto.sensitivity import Costs, Item, Option
from slimlm.auto.slimlm_target import SlimlmTarget
from slimlm.auto.widths import WidthCuts, width_counts, width_share, width_stage
from slimlm.errors import SlimlmError
from slimlm.modules import config_widths
from slimlm.recipe import parse_recipe


def test_width_counts_round_down_to_the_step_and_drop_no_cut():
    assert width_counts(1536, [5 / 6, 2 / 3, 0.9], 256) == [1280, 1024]  # 0.9 -> 1382 -> 1280 (once)
    assert width_counts(1536, [1.0, 0.1], 256) == []  # all of it, and 153 -> 0: neither is a cut
    assert width_counts(64, [0.5], 256) == []  # a step above the width: no cut


def test_only_mlp_projections_shrink_with_the_width():
    assert width_share("model.layers.3.mlp.down_proj", 768, 1536) == 0.5
    assert width_share("gate_proj", 768, 1536) == 0.5
    assert width_share("q_proj", 768, 1536) == 1.0
    assert width_share("model.embed_tokens", 768, 1536) == 1.0
    assert width_share("up_proj", None, 1536) == 1.0


def _costs(width_kl: float) -> Costs:
    options = [Option(n, size, lambda: {}) for n, size in (("big", 10), ("small", 4))]
    items = [Item(name, options) for name in ("q_proj", "up_proj", "down_proj")]
    return Costs(items, [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], widths={50: width_kl}, intermediate=100)


def test_the_allocation_cuts_the_mlp_when_that_beats_smaller_formats():
    # 20 bytes: all big (30) does not fit; one small costs 1.0 (24 bytes: no); two small (18) cost 2.0;
    # the MLP at half width makes up/down 5 bytes each: all big takes 20 at the cut's cost
    cheap = _costs(0.5)
    best = allocate(cheap, budget=20, limit=size_resource(cheap, lambda removed: 0), count=3)[0]
    assert best.mlp_channels == 50 and set(best.formats.values()) == {"big"}
    assert best.bytes == 20 and best.proxy == pytest.approx(0.5)
    dear = _costs(5.0)
    best = allocate(dear, budget=20, limit=size_resource(dear, lambda removed: 0), count=3)[0]
    assert best.mlp_channels is None and best.proxy == pytest.approx(2.0) and best.bytes == 18


def test_the_cut_the_probe_measures_is_the_recipes_prune_width():
    torch.manual_seed(0)
    model = build_tiny_llama(64, layers=2).eval()
    windows = torch.randint(0, 64, (2, 16))
    cuts = WidthCuts(model, windows, {"data": "c4", "samples": 2, "seq_len": 16, "seed": 1}, [0.5, 0.25], 32)
    intermediate = config_widths(model.config)[0]
    channels = intermediate // 2
    assert cuts.counts == [channels, 32]
    weights = cuts.weights(channels)()
    assert weights["model.layers.1.mlp.down_proj"].shape == (model.config.hidden_size, channels)
    assert weights["model.layers.0.mlp.gate_proj"].shape == (channels, model.config.hidden_size)
    assert config_widths(model.config)[0] == intermediate  # the original is untouched
    probe = Probe(model, windows)
    cut_kl = probe.kl(weights)
    assert cut_kl > 0 and probe.kl() == pytest.approx(0.0, abs=1e-6)
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] == intermediate  # put back after the KL
    assert "mlp|" in cuts.key(channels) and cuts.key(channels) != cuts.key(channels // 2)
    assert width_stage(channels) == {"prune_width": {"mlp_keep": channels}}


def test_the_slimlm_recipe_cuts_the_mlp_before_removing_layers_and_quantizing(tmp_path):
    target = SlimlmTarget(build_tiny_llama(64, layers=3))
    formats = {"q_proj": "w4g32", "down_proj": "gptq-w4g32"}
    data = target.recipe(formats, "m", {}, {}, tmp_path, removed=(1,), mlp_channels=32)
    names = [next(iter(stage)) for stage in data["stages"]]
    assert names == ["prune_width", "prune_depth", "quantize", "quantize"]
    assert data["stages"][0] == {"prune_width": {"mlp_keep": 32}}
    parse_recipe(data)  # the stages follow one another (a cut model is quantized like any other)
    assert target.width_step(1536) == 128 and target.width_step(96) == 32  # down_proj keeps its group sizes


def test_fractions_that_leave_no_width_are_one_clear_error():
    model = build_tiny_llama(64, layers=1)
    with pytest.raises(
        SlimlmError, match=r"--mlp-keep 0.9: no width below the MLP's 128 channels is a multiple of 256"
    ):
        WidthCuts(model, torch.zeros(1, 4, dtype=torch.long), {}, [0.9], 256)


def test_a_recovered_candidate_is_cut_as_its_unrecovered_file(tmp_path):
    from slimlm.auto.recover import recovery_recipe

    calibration = {"data": "c4", "samples": 2, "seq_len": 16, "seed": 1}
    formats = {"model.layers.0.mlp.down_proj": "Q4_0", "model.layers.2.mlp.up_proj": "Q8_0"}
    data = recovery_recipe("m", formats, [1], 4096, tmp_path, width=(64, calibration))
    assert [next(iter(s)) for s in data["stages"]] == ["prune_width", "prune_depth", "distill"]
    assert data["stages"][0] == {"prune_width": {"mlp_keep": 64}} and data["calibration"] == calibration
    assert data["export"][0]["tensor_types"] == {
        "model.layers.0.mlp.down_proj": "Q4_0",
        "model.layers.1.mlp.up_proj": "Q8_0",
    }
    parse_recipe(data)
    plain = recovery_recipe("m", formats, [1], 4096, tmp_path)
    assert "calibration" not in plain and [next(iter(s)) for s in plain["stages"]] == ["prune_depth", "distill"]
