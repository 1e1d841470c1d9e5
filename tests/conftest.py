"""Shared fixtures: tiny LLaMA models built from a config, with a small BPE tokenizer trained on the spot."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SLIMLM_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Language models predict the next token. "
    "Pruning removes weights; quantization stores them with fewer bits. Distillation teaches a small student. "
    "Perplexity measures how surprised a model is by text it has not seen before. "
) * 20


def build_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        tie_word_embeddings=tie,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config.architectures = ["LlamaForCausalLM"]
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    from slimlm.models import save_model

    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_model(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """The test session has a cache of its own: nothing read from or left in the user's cache."""
    monkeypatch.setenv("SLIMLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "slimlm-cache"))


def write_documents(folder) -> str:
    """A small .jsonl text set (40 documents) for recovery stages: tokenizing it is instant, unlike the
    1,000-document C4 sample."""
    import json

    path = folder / "docs.jsonl"
    text = "Distillation teaches a small student."
    path.write_text(
        "".join(
            json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. {text}"}) + "\n"
            for i in range(40)
        )
    )
    return str(path)


def random_windows(model, samples: int = 4, seq_len: int = 16, seed: int = 0):
    """Seeded random token windows standing in for calibration data."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=generator)


def run_stage(model, name: str, windows=None, original=None, **options):
    """One stage, validated as a recipe would, on these calibration windows (seeded random ones by default; the
    recipe's data is not loaded) with `original` as the uncompressed model; returns the context."""
    from slimlm.calibration import Calibration
    from slimlm.recipe import parse_recipe
    from slimlm.registry import StageContext, get_stage

    recipe = parse_recipe({"model": "m", "stages": [{name: options}]})
    calibration = Calibration(recipe.calibration, windows=random_windows(model, 8, 32) if windows is None else windows)
    context = StageContext(
        tokenizer=None,
        calibration=calibration,
        output_dir=None,
        load_original=None if original is None else (lambda: original),
    )
    get_stage(name).apply(model, recipe.stages[0].options, context)
    return context


def run_prune_stage(model, windows, **options):
    """The prune stage with these calibration windows; returns the context."""
    return run_stage(model, "prune", windows, **options)


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread: OpenMP barriers on a busy machine cost more than 64-wide matmuls gain.
    Tests on the real model (marker `builtin`) keep torch's default."""
    if request.node.get_closest_marker("builtin"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_task_hooks():
    """slimlm's lm-eval task hooks (evaluate/tasks/utils.py) as lm-eval loads them: from their file, since the YAML
    folder is no Python package."""
    import importlib.util

    from slimlm.evaluate.tasks import TASKS_DIR

    spec = importlib.util.spec_from_file_location("slimlm_task_hooks", TASKS_DIR / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
