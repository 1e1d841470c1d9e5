"""The slimlm target's predicted folder size against a real packed save, its recipe runs; allocation with layer
removal picks the cheap layers and fits the budget."""

import copy

import pytest
import torch

from conftest import random_windows, run_stage
from slimlm.auto.allocate import allocate, size_resource, uniform_solution
from slimlm.auto.probe import Probe
from slimlm.auto.sensitivity import Costs, Item, Option
from slimlm.auto.slimlm_target import SlimlmTarget, parse_option
from slimlm.auto.widths import width_share
from slimlm.evaluate.footprint import size_on_disk
from slimlm.lowrank.layers import CompensatedLinear
from slimlm.models import save_model
from slimlm.modules import config_widths, decoder_layers
from slimlm.quantize.gptq import GPTQ
from slimlm.quantize.grid import QuantGrid
from slimlm.recipe import parse_recipe


@pytest.mark.parametrize(("removed", "channels"), [((), None), ((1,), None), ((1,), 64)])
def test_predicted_folder_size_is_the_saved_ones(tiny_model, tiny_tokenizer, tmp_path, removed, channels):
    target = SlimlmTarget(tiny_model, dtype="float32")
    items = target.items()
    formats = {item.name: ("w4g32" if i % 2 else "w2g64") for i, item in enumerate(items)}
    share = 1 - len(removed) / len(tiny_model.model.layers)  # every layer's Linears of a kind are alike
    intermediate = tiny_model.config.intermediate_size
    predicted = target.fixed_bytes(items)(frozenset(removed)) + share * sum(
        width_share(item.name, channels, intermediate)
        * next(o.bytes for o in item.options if o.name == formats[item.name])
        for item in items
    )
    recipe = parse_recipe(target.recipe(formats, "m", {}, {}, tmp_path, removed, channels))
    structure = ["prune_width"] * bool(channels) + ["prune_depth"] * bool(removed)
    assert [s.name for s in recipe.stages][: len(structure)] == structure
    for stage in recipe.stages:
        run_stage(tiny_model, stage.name, **stage.options.model_dump(exclude_unset=True))
    save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    actual = size_on_disk(tmp_path / "model")
    assert abs(predicted - actual) / actual < 0.01, (predicted, actual)


def test_recipe_has_one_quantize_stage_per_quantizer_rtn_first(tiny_model, tmp_path):
    target = SlimlmTarget(tiny_model)
    formats = {
        "q_proj": "gptq-w4g32",
        "k_proj": "w4g32",
        "v_proj": "w8g32",
        "o_proj": "w4g32",
        "gate_proj": "w2g64",
        "up_proj": "gptq-w2g64",
        "down_proj": "gptq-w3g128",
    }
    recipe = target.recipe(formats, "m", {}, {}, tmp_path)
    assert recipe["stages"] == [
        {
            "quantize": {
                "method": "rtn",
                "bits": 4,
                "group_size": 32,
                "targets": ["k_proj", "v_proj", "o_proj", "gate_proj"],
                "per_projection": {"v_proj": {"bits": 8, "group_size": 32}, "gate_proj": {"bits": 2, "group_size": 64}},
            }
        },
        {
            "quantize": {
                "method": "gptq",
                "bits": 4,
                "group_size": 32,
                "targets": ["q_proj", "up_proj", "down_proj"],
                "per_projection": {
                    "up_proj": {"bits": 2, "group_size": 64},
                    "down_proj": {"bits": 3, "group_size": 128},
                },
            }
        },
    ]
    parse_recipe(recipe)  # a valid recipe: the stages follow one another (recipe.check_chain)
    uniform = target.recipe(dict.fromkeys(formats, "gptq-w4g64"), "m", {}, {}, tmp_path)["stages"]
    assert uniform == [{"quantize": {"method": "gptq", "bits": 4, "group_size": 64, "targets": list(formats)}}]


def _synthetic_costs():
    def item(name, layer, costs):
        options = [Option(n, size, lambda: {}) for n, size in (("big", 10), ("small", 4))]
        return Item(name, options, layer=layer)

    items = [item(f"l{k}", k, None) for k in range(3)]
    return Costs(items, [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], removal={0: 5.0, 1: 0.1, 2: 3.0})


def test_allocation_removes_the_cheapest_layer_when_that_beats_smaller_formats():
    costs = _synthetic_costs()
    sizes = size_resource(costs, lambda removed: 2)
    best = allocate(costs, budget=2 + 20, limit=sizes, max_removed=2, count=3)[0]
    assert best.removed == (1,) and best.bytes <= 22
    assert best.proxy == pytest.approx(0.1)
    no_removal = allocate(costs, budget=22, limit=sizes, max_removed=0, count=1)[0]
    assert no_removal.removed == () and no_removal.proxy == pytest.approx(2.0)


def test_removing_a_layer_shrinks_the_groups_that_span_it():
    options = [Option(n, size, lambda: {}) for n, size in (("big", 40), ("small", 16))]
    groups = [Item(f"g{k}", options, layers=(0, 1, 2, 3)) for k in range(2)]  # 4 layers, 10 or 4 bytes each
    costs = Costs(groups, [[0.0, 1.0], [0.0, 2.0]], removal={0: 0.5, 1: 9.0, 2: 9.0, 3: 9.0})
    sizes = size_resource(costs, lambda removed: 0)
    # 60 bytes: both big (80) too much; one small (56) costs 1.0; without layer 0 both big take 60, cost 0.5
    best = allocate(costs, budget=60, limit=sizes, max_removed=1, count=2)[0]
    assert best.removed == (0,) and best.formats == {"g0": "big", "g1": "big"}
    assert best.bytes == 60 and best.proxy == pytest.approx(0.5)
    kept = allocate(costs, budget=60, limit=sizes, max_removed=0, count=1)[0]
    assert kept.formats == {"g0": "small", "g1": "big"} and kept.bytes == 56 and kept.proxy == pytest.approx(1.0)
    # with 3 of 4 layers left, a group's cost is 3/4 of the measured one
    smaller = allocate(costs, budget=42, limit=sizes, max_removed=1, count=4)
    assert min(s.proxy for s in smaller if s.removed == (0,)) == pytest.approx(0.5 + 0.75 * 1.0)


def test_uniform_solution_prices_every_item_at_one_format():
    costs = _synthetic_costs()
    solution = uniform_solution(costs, "small", [size_resource(costs, lambda removed: 2)])
    assert (solution.bytes, solution.proxy) == (14, 3.0)
    assert uniform_solution(costs, "missing", [size_resource(costs, lambda removed: 2)]) is None


def test_slimlm_latency_model_times_packed_models_and_prices_groups(tiny_model, tiny_tokenizer, tmp_path):
    target = SlimlmTarget(tiny_model, exclude=["w2g32", "w3g32", "w2g128", "w3g128"], work=tmp_path / "auto")
    model = target.latency_model()
    formats = {o.name for item in target.items() for o in item.options}
    assert set(model.rates) == formats | {"bfloat16"} and all(rate >= 0 for rate in model.rates.values())
    assert any(rate > 0 for rate in model.rates.values())
    item = target.items()[0]
    assert target.item_latency(item) == [
        model.rates[o.name] * sum(lin.weight.numel() for n, lin in target.linears if n.endswith(".self_attn.q_proj"))
        for o in item.options
    ]
    kept = (tmp_path / "auto" / "latency.json").read_text()
    assert SlimlmTarget(tiny_model, exclude=target.exclude, work=tmp_path / "auto").latency_model().rates == model.rates
    assert (tmp_path / "auto" / "latency.json").read_text() == kept  # read back, not timed again

    save_model(tiny_model, tiny_tokenizer, tmp_path / "model")
    row = {"formats": {item.name: "w4g64" for item in target.items()}}
    figures = target.decode(tmp_path / "model", row)
    assert figures["decode_ms_per_token"] > 0 and "plain path" in figures["decode_protocol"]
    at_w4g64 = [target.item_latency(i)[[o.name for o in i.options].index("w4g64")] for i in target.items()]
    assert figures["predicted_ms_per_token"] == pytest.approx(sum(at_w4g64))
    # a row that removes a layer and cuts the MLP is predicted as the knapsack priced it: the layers and channels kept
    layers, intermediate = len(decoder_layers(tiny_model)), config_widths(tiny_model.config)[0]
    cut = row | {"removed": [1], "mlp_channels": intermediate // 2}
    shares = [(1 - 1 / layers) * width_share(i.name, intermediate // 2, intermediate) for i in target.items()]
    assert target.decode(tmp_path / "model", cut)["predicted_ms_per_token"] == pytest.approx(
        sum(ms * share for ms, share in zip(at_w4g64, shares, strict=True))
    )


def test_gptq_options_come_with_a_probe_and_beat_rtn_on_output_error(tiny_model):
    target = SlimlmTarget(tiny_model)
    assert not any(o.name.startswith("gptq") for item in target.items() for o in item.options)  # no Hessians yet
    probe = Probe(tiny_model, random_windows(tiny_model, 2, 32))
    for item in target.items(probe):
        options = {o.name: o for o in item.options}
        for name in ("w2g32", "w4g64"):
            rtn, gptq = options[name], options[f"gptq-{name}"]
            assert rtn.bytes == gptq.bytes  # one packed format, two ways of choosing its codes
            error = {o.name: sum(probe.output_error(n, w) for n, w in o.weights().items()) for o in (rtn, gptq)}
            assert error[gptq.name] < error[rtn.name], (item.name, error)
    assert all(
        not o.name.startswith("gptq") for o in SlimlmTarget(tiny_model, exclude=["gptq"]).items(probe)[0].options
    )


def test_allocation_without_removal_figures_and_never_removing_every_layer():
    costs = _synthetic_costs()
    sizes = size_resource(costs, lambda removed: 2)
    assert allocate(Costs(costs.items, costs.costs), budget=100, limit=sizes, max_removed=4, count=1)[0].removed == ()
    nothing_fixed = size_resource(costs, lambda removed: 0)
    # 0 bytes: only a model with all 3 layers removed would fit, and that is no model
    assert allocate(costs, budget=0, limit=nothing_fixed, max_removed=3, count=10) == []


def test_eora_options_pay_bytes_for_less_output_error_and_end_the_recipe(tiny_model, tmp_path):
    probe = Probe(tiny_model, random_windows(tiny_model, 2, 32))
    target = SlimlmTarget(tiny_model)
    for item in target.items(probe):
        options = {o.name: o for o in item.options}
        assert {parse_option(name)[1] for name in options if "+eora" in name} == {2, 3}  # not on 4 or 8 bits
        plain, compensated = options["w2g32"], options["w2g32+eora16"]
        members = [lin for name, lin in target.linears if name.endswith(item.name)]
        factors = sum(16 * (lin.in_features + lin.out_features) * 2 for lin in members)
        assert compensated.bytes - plain.bytes == factors + 2 * len(members) * 112  # float16 factors, their headers
        error = {o.name: sum(probe.output_error(n, w) for n, w in o.weights().items()) for o in (plain, compensated)}
        assert error[compensated.name] < error[plain.name]
    formats = {short: "w4g64" for short in ("q_proj", "k_proj", "v_proj", "o_proj")}
    formats |= {"gate_proj": "gptq-w2g32+eora16", "up_proj": "w2g32+eora16", "down_proj": "w3g64"}
    recipe = target.recipe(formats, "m", {}, {}, tmp_path)
    assert recipe["stages"][-1] == {"lowrank": {"method": "eora", "rank": 16, "targets": ["gate_proj", "up_proj"]}}
    original = copy.deepcopy(tiny_model)
    for stage in parse_recipe(recipe).stages:  # the stages run one after another on the model
        run_stage(tiny_model, stage.name, original=original, **stage.options.model_dump(exclude_unset=True))
    up = tiny_model.model.layers[0].mlp.up_proj
    assert isinstance(up, CompensatedLinear) and up.rank == 16


def test_gptq_fitted_to_other_windows_is_scored_out_of_sample(tiny_model):
    from slimlm.auto.probe import input_hessians

    probe = Probe(tiny_model, random_windows(tiny_model, 2, 32))
    fit_windows = random_windows(tiny_model, 2, 32, seed=1)
    fit = input_hessians(tiny_model, fit_windows)
    assert fit.keys() == probe.hessians.keys()
    plain = Probe(tiny_model, fit_windows).hessians
    kv_heads = tiny_model.config.num_key_value_heads
    for name in list(fit)[:7]:  # layer 0: v_proj's per KV head, attention-weighted (as the gptq stage fits it)
        if name.endswith("v_proj"):
            assert fit[name].shape == (kv_heads, *plain[name].shape)
            assert not torch.allclose(fit[name].mean(0), plain[name])
        else:
            assert torch.allclose(fit[name], plain[name])
    item = SlimlmTarget(tiny_model).items(probe, fit)[0]
    gptq = next(o for o in item.options if o.name == "gptq-w2g32")
    name, linear = next((n, lin) for n, lin in SlimlmTarget(tiny_model).linears if n.endswith(item.name))
    expected = GPTQ(linear.weight, fit[name], QuantGrid(2, True, 32)).quantize().dequantize()
    assert torch.equal(gptq.weights()[name], expected)  # solved on the fitting windows, not the probe's


def test_every_quantizer_family_has_its_own_measured_reference(tiny_model):
    probe = Probe(tiny_model, random_windows(tiny_model, 2, 32))
    for item in SlimlmTarget(tiny_model).items(probe):
        measured = sorted(item.options[i].name for i in item.references)
        assert measured == ["gptq-w3g64+eora16", "gptq-w4g64", "w3g64+eora16", "w4g64"]
        assert {o.family for o in item.options} == {"rtn", "gptq", "rtn+eora16", "gptq+eora16"}
    left = SlimlmTarget(tiny_model, exclude=["w4g64", "w3g64+eora16"]).items(probe)[0]
    assert sorted(left.options[i].name for i in left.references) == [
        "gptq-w3g64+eora16",
        "gptq-w4g64",
        "w2g32+eora16",  # the family's first option once its reference grid is excluded
        "w3g64",
    ]


def test_gptq_of_v_proj_solves_each_kv_head_with_its_own_hessian(tiny_model):
    from slimlm.auto.probe import input_hessians

    probe = Probe(tiny_model, random_windows(tiny_model, 2, 32))
    fit = input_hessians(tiny_model, random_windows(tiny_model, 2, 32, seed=1))
    item = next(i for i in SlimlmTarget(tiny_model).items(probe, fit) if i.name == "v_proj")
    gptq = next(o for o in item.options if o.name == "gptq-w4g32")
    name, linear = next((n, lin) for n, lin in SlimlmTarget(tiny_model).linears if n.endswith("v_proj"))
    heads, grid = fit[name], QuantGrid(4, True, 32)
    rows = linear.weight.shape[0] // len(heads)
    blocks = linear.weight.split(rows)
    expected = [GPTQ(block, h, grid).quantize().dequantize() for block, h in zip(blocks, heads, strict=True)]
    assert torch.allclose(gptq.weights()[name], torch.cat(expected), atol=1e-6)
