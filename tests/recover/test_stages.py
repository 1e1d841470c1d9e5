import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import build_tiny_llama, write_documents
from slimlm.calibration import Calibration
from slimlm.errors import SlimlmError
from slimlm.pipeline import run_recipe
from slimlm.recipe import parse_recipe
from slimlm.recover.layers import KEPT_LAYERS_ATTRIBUTE, resolve_layer_map, uniform_layer_map
from slimlm.recover.lora import LoraOptions, attach_lora, merge_lora
from slimlm.recover.objectives import LanguageModelObjective
from slimlm.recover.trainer import TrainConfig, train
from slimlm.registry import StageContext, get_stage


def _error(stage: dict) -> str:
    with pytest.raises(SlimlmError) as err:
        parse_recipe({"model": "m", "stages": [{"prune_depth": {"remove": 1}}, stage]})
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "stage, expected",
    [
        ({"distill": {"temperature": 0}}, "stages[1].distill.temperature: Input should be greater than 0"),
        ({"distill": {"on_policy": 1.5}}, "stages[1].distill.on_policy: Input should be less than or equal to 1"),
        ({"distill": {"jsd_beta": -0.1}}, "stages[1].distill.jsd_beta: Input should be greater than or equal to 0"),
        ({"distill": {"loss": {"kl": -1}}}, "stages[1].distill.loss.kl: Input should be greater than or equal to 0"),
        ({"distill": {"loss": {"kl": 0}}}, "stages[1].distill.loss: every loss weight is 0"),
        ({"distill": {"loss": {"kld": 1}}}, "stages[1].distill.loss.kld: unknown option"),
        ({"distill": {"steps": 0}}, "stages[1].distill.steps: Input should be greater than 0"),
        ({"distill": {"lr": 0}}, "stages[1].distill.lr: Input should be greater than 0"),
        ({"distill": {"qat": {"bits": 1}}}, "stages[1].distill.qat.bits: Input should be greater than or equal to 2"),
        (
            {"distill": {"teacher": [{"model": "original", "weight": 0}]}},
            "stages[1].distill.teacher[0].weight: Input should be greater than 0",
        ),
        ({"distill": {"teacher_topk": 16, "on_policy": 0.5}}, "stages[1].distill.teacher_topk: the cache holds"),
        (
            {"lora": {"targets": ["q_proj", "qkv"]}},
            "stages[1].lora.targets[1]: Input should be 'q_proj', 'k_proj', "
            "'v_proj', 'o_proj', 'gate_proj', 'up_proj' or 'down_proj'",
        ),
        ({"lora": {"rank": 0}}, "stages[1].lora.rank: Input should be greater than 0"),
        ({"lora": {"loss": "mse"}}, "stages[1].lora.loss: Input should be 'lm' or 'kd'"),
    ],
)
def test_bad_options_are_one_line_errors_naming_the_field(stage, expected):
    assert expected in _error(stage)


def test_teacher_may_be_a_path_or_a_weighted_list():
    recipe = parse_recipe(
        {
            "model": "m",
            "stages": [
                {"distill": {"teacher": "some/folder"}},
                {"distill": {"teacher": [{"model": "original", "weight": 2}, {"model": "other"}]}},
            ],
        }
    )
    assert [t.model for t in recipe.stages[0].options.teacher] == ["some/folder"]
    assert [t.weight for t in recipe.stages[1].options.teacher] == [2, 1.0]


def test_layer_map_rules_and_errors():
    student, teacher_depth = build_tiny_llama(64, layers=2), 6
    assert resolve_layer_map(student, teacher_depth, None, True)[0] == uniform_layer_map(2, 6) == [2, 5]
    setattr(student.config, KEPT_LAYERS_ATTRIBUTE, [0, 4])
    assert resolve_layer_map(student, teacher_depth, None, True) == (
        [0, 4],
        "config.slimlm_kept_layers (the layers depth pruning kept)",
    )
    assert resolve_layer_map(student, teacher_depth, None, False)[0] == [2, 5]
    assert resolve_layer_map(student, teacher_depth, [1, 3], True)[0] == [1, 3]
    with pytest.raises(SlimlmError, match=r"^distill.layer_map: has 3 entries but the student has 2 layers"):
        resolve_layer_map(student, teacher_depth, [0, 1, 2], True)
    with pytest.raises(SlimlmError, match=r"^distill.layer_map: 6 is not a teacher layer; the teacher has 6 layers"):
        resolve_layer_map(student, teacher_depth, [0, 6], True)


def test_distill_stage_checks_the_layer_map_against_the_models(tiny_tokenizer, tmp_path):
    teacher = build_tiny_llama(len(tiny_tokenizer), layers=2)
    student = build_tiny_llama(len(tiny_tokenizer), seed=1, layers=1)
    recipe = parse_recipe(
        {
            "model": "m",
            "stages": [
                {
                    "distill": {
                        "loss": {"kl": 1, "hidden": 1},
                        "layer_map": [0, 1],
                        "steps": 1,
                        "seq_len": 16,
                        "data": write_documents(tmp_path),
                    }
                }
            ],
        }
    )
    context = StageContext(tiny_tokenizer, Calibration(recipe.calibration, tiny_tokenizer), tmp_path, lambda: teacher)
    with pytest.raises(SlimlmError, match=r"^distill.layer_map: has 2 entries but the student has 1 layers"):
        get_stage("distill").apply(student, recipe.stages[0].options, context)


def test_recipe_prune_depth_then_distill_gives_a_reloadable_model(tiny_model_dir, tmp_path):
    out, text = tmp_path / "run", write_documents(tmp_path)
    recipe = parse_recipe(
        {
            "model": str(tiny_model_dir),
            "calibration": {"data": str(text), "samples": 2, "seq_len": 32},
            "evaluate": {"tasks": [], "speed": False},
            "stages": [
                {"prune_depth": {"remove": 1}},
                {
                    "distill": {
                        "steps": 3,
                        "batch_size": 2,
                        "seq_len": 32,
                        "lr": 1e-3,
                        "checkpoint_every": 2,
                        "data": str(text),
                        "loss": {"kl": 1.0, "hidden": 0.1, "attention": 0.1, "lm": 0.1},
                    }
                },
            ],
            "output": str(out),
        }
    )
    summary = run_recipe(recipe)
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 1
    notes = " ".join(summary["stages"][1]["notes"])
    assert "layer map student→teacher [1]" in notes and "3 steps" in notes
    scratch = list((out / "scratch").glob("distill-*"))
    assert len(scratch) == 1 and not (scratch[0] / "checkpoints").exists()  # removed once the stage finished
    assert len((scratch[0] / "metrics.jsonl").read_text().splitlines()) == 3


def test_lora_merge_gives_a_plain_model_with_the_adapter_models_logits(tmp_path):
    model = build_tiny_llama(64, seed=1, layers=1)
    options = LoraOptions(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    peft_model = attach_lora(model, options)
    windows = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    result = train(
        peft_model,
        windows,
        LanguageModelObjective(),
        TrainConfig(steps=3, batch_size=2, lr=1e-2, checkpoint_every=1),
        tmp_path / "lora",
    )
    saved = load_file(tmp_path / "lora" / "checkpoints" / "step-00000002" / "model.safetensors")
    assert saved and all("lora_" in name for name in saved)  # adapters only: the frozen base is not copied
    with torch.no_grad():
        adapted = result.model(windows[:2]).logits
    merged = merge_lora(result.model)
    assert all(type(m) in (nn.Linear,) for n, m in merged.named_modules() if n.endswith("_proj"))
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(windows[:2]).logits, adapted, atol=1e-5)
        assert not torch.allclose(build_tiny_llama(64, seed=1, layers=1)(windows[:2]).logits, adapted, atol=1e-4)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(windows[:2]).logits, adapted, atol=1e-5)


def test_lora_stage_keeps_pruned_weights_zero(tiny_tokenizer, tmp_path):
    student = build_tiny_llama(len(tiny_tokenizer), seed=1, layers=1)
    with torch.no_grad():
        student.model.layers[0].mlp.up_proj.weight[:, ::2] = 0
    recipe = parse_recipe(
        {
            "model": "m",
            "stages": [
                {
                    "lora": {
                        "steps": 2,
                        "batch_size": 2,
                        "seq_len": 32,
                        "lr": 1e-2,
                        "targets": ["up_proj", "q_proj"],
                        "data": write_documents(tmp_path),
                    }
                }
            ],
        }
    )
    context = StageContext(tiny_tokenizer, Calibration(recipe.calibration, tiny_tokenizer), tmp_path, None)
    model = get_stage("lora").apply(student, recipe.stages[0].options, context)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.model.layers[0].mlp.up_proj.weight[:, ::2] == 0).all()
    assert any("masks re-applied" in note for note in context.notes)
    lines = (next(tmp_path.glob("lora-*")) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_distill_stage_with_a_teacher_cache_qat_and_kept_sparsity(tiny_tokenizer, tmp_path):
    teacher = build_tiny_llama(len(tiny_tokenizer), layers=2)
    student = build_tiny_llama(len(tiny_tokenizer), seed=1, layers=1)
    with torch.no_grad():
        student.model.layers[0].mlp.gate_proj.weight[::2] = 0
    options = {
        "steps": 2,
        "batch_size": 2,
        "seq_len": 32,
        "lr": 1e-3,
        "teacher_topk": 8,
        "data": write_documents(tmp_path),
        "qat": {"bits": 4, "group_size": 32},
        "loss": {"kl": 1.0, "reverse_kl": 0.5},
    }
    recipe = parse_recipe({"model": "m", "stages": [{"distill": options}]})
    context = StageContext(tiny_tokenizer, Calibration(recipe.calibration, tiny_tokenizer), tmp_path, lambda: teacher)
    model = get_stage("distill").apply(student, recipe.stages[0].options, context)
    gate = model.model.layers[0].mlp.gate_proj
    assert (gate.weight[::2] == 0).all() and torch.equal(gate.slimlm_quantized.dequantize(), gate.weight)
    assert any("cache written" in note for note in context.notes)
    again = StageContext(tiny_tokenizer, Calibration(recipe.calibration, tiny_tokenizer), tmp_path, lambda: teacher)
    get_stage("distill").apply(build_tiny_llama(len(tiny_tokenizer), seed=1, layers=1), recipe.stages[0].options, again)
    assert any("cache reused" in note for note in again.notes)


def test_a_reloaded_student_finds_the_same_training_folder(tiny_tokenizer, tmp_path):
    from slimlm.models import load_model, save_model
    from slimlm.recover.options import stage_folder

    student = build_tiny_llama(len(tiny_tokenizer), seed=1, layers=1)
    save_model(student, tiny_tokenizer, tmp_path / "saved")
    reloaded = load_model(str(tmp_path / "saved")).model
    options = parse_recipe({"model": "m", "stages": [{"distill": {}}]}).stages[0].options
    context = StageContext(tiny_tokenizer, Calibration(None), tmp_path / "scratch")
    assert stage_folder(context, "distill", options, student) == stage_folder(context, "distill", options, reloaded)
    other = build_tiny_llama(len(tiny_tokenizer), seed=2, layers=1)
    assert stage_folder(context, "distill", options, other) != stage_folder(context, "distill", options, student)


def test_interrupted_lora_training_resumes_from_an_adapter_only_checkpoint(tmp_path):
    windows = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    options = LoraOptions(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "up_proj"])
    config = TrainConfig(steps=4, batch_size=2, lr=1e-2, checkpoint_every=2)

    def fresh():
        torch.manual_seed(5)  # LoRA's A matrices are drawn at attach time
        return attach_lora(build_tiny_llama(64, seed=1, layers=1), options)

    expected = merge_lora(train(fresh(), windows, LanguageModelObjective(), config, tmp_path / "a").model)

    def crash(step, record):
        if step == 3:
            raise KeyboardInterrupt("killed after the step-2 checkpoint")

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), windows, LanguageModelObjective(), config, tmp_path / "b", on_step=crash)
    torch.manual_seed(123)  # a different init: the checkpoint must restore the adapters (and dropout's RNG)
    result = train(
        attach_lora(build_tiny_llama(64, seed=1, layers=1), options),
        windows,
        LanguageModelObjective(),
        config,
        tmp_path / "b",
    )
    assert result.resumed_from == 2
    got = merge_lora(result.model)
    for (name, a), (_, b) in zip(expected.state_dict().items(), got.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
