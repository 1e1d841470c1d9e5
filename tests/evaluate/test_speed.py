import pytest
import torch

from conftest import build_tiny_llama
from slimlm.evaluate import speed
from slimlm.evaluate.machine import EnergyCounter
from slimlm.evaluate.speed import greedy_decode, measure_speed, prompt_ids


@pytest.fixture()
def model():
    return build_tiny_llama(1000)


def _by_metric(records):
    return {r.metric: r for r in records}


class ForwardCounter:
    """Counts the model's forward calls and the tokens each one was given."""

    def __init__(self, model):
        self.lengths = []
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.lengths.append(kwargs["input_ids"].shape[1])


def test_prompt_is_exactly_prompt_tokens_of_real_text(tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, 300, len(tiny_tokenizer))
    assert ids.shape == (1, 300)
    assert "printing press" in tiny_tokenizer.decode(ids[0])
    assert torch.equal(prompt_ids(None, 17, 1000, seed=3), prompt_ids(None, 17, 1000, seed=3))
    assert prompt_ids(None, 17, 1000).max() < 1000


def test_decode_runs_exactly_new_tokens_single_token_steps_after_one_prefill(model):
    # A model that only ever emits EOS must still decode every step: a zero final norm makes all logits 0, so the
    # argmax is token 0, which is made the EOS token.
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.config.eos_token_id = model.generation_config.eos_token_id = 0
    forwards = ForwardCounter(model)
    with torch.inference_mode():
        run = greedy_decode(model, prompt_ids(None, 12, 1000), new_tokens=9)
    assert forwards.lengths == [12] + [1] * 9
    assert len(run.decoded_ids) == 9 and set(run.decoded_ids) == {0}
    assert run.prefill_seconds > 0 and run.decode_seconds > 0


def test_cached_decode_matches_full_recompute(model):
    input_ids = prompt_ids(None, 10, 1000, seed=1)
    with torch.inference_mode():
        run = greedy_decode(model, input_ids, new_tokens=5)
        sequence = input_ids
        for _ in range(6):
            next_token = model(sequence, use_cache=False).logits[:, -1:].argmax(-1)
            sequence = torch.cat([sequence, next_token], dim=1)
    # The first generated token comes from the prefill; the decode steps produce the next five.
    assert run.decoded_ids == sequence[0, 11:].tolist()


def test_measure_speed_records_and_protocol(model, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(speed, "energy_counter", lambda device: None)
    forwards = ForwardCounter(model)
    records = _by_metric(measure_speed(model, None, prompt_tokens=16, new_tokens=4, runs=3, warmup=2))
    assert forwards.lengths == ([16] + [1] * 4) * (2 + 3)  # warm-up runs happen but are not counted
    assert set(records) == {"prefill_ms", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_joules_per_token"}
    for metric in ("prefill_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert records[metric].value > 0 and records[metric].task == "speed"
    assert records["prefill_ms"].higher_is_better is False and records["decode_tokens_per_s"].higher_is_better
    protocol = records["decode_tokens_per_s"].protocol
    assert protocol["prompt_tokens"] == 16 and protocol["new_tokens"] == 4 and protocol["runs"] == 3
    assert protocol["warmup"] == 2 and protocol["statistic"] == "median" and protocol["batch"] == 1
    assert protocol["threads"] == torch.get_num_threads() and protocol["kernel"] == "dense"
    assert protocol["dtype"] == "float32" and protocol["device"] == "cpu"
    energy = records["decode_joules_per_token"]
    assert energy.value is None and energy.note == "no energy counter"

    with_text = _by_metric(
        measure_speed(build_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, 16, 2, runs=1, warmup=0, kernel="sparse")
    )
    assert with_text["prefill_ms"].protocol["prompt"] == "fixed English paragraph"
    assert with_text["prefill_ms"].protocol["kernel"] == "sparse"


def test_energy_per_token_from_a_counter(model, monkeypatch):
    # A fake counter that advances 1.5 J on every read: each run reads it twice around its decode steps.
    state = {"joules": 0.0}

    def read():
        state["joules"] += 1.5
        return state["joules"]

    fake = EnergyCounter("rapl", [read], [None], scope="test")
    monkeypatch.setattr(speed, "energy_counter", lambda device: fake)
    records = _by_metric(measure_speed(model, None, prompt_tokens=8, new_tokens=3, runs=2, warmup=1))
    energy = records["decode_joules_per_token"]
    assert energy.value == pytest.approx(1.5 / 3)
    assert energy.unit == "J/token" and energy.protocol["energy_counter"] == "rapl"


def test_energy_counter_wraparound():
    values = iter([90.0, 5.0])
    counter = EnergyCounter("rapl", [lambda: next(values)], [100.0], scope="test")
    assert counter.joules_since(counter.sample()) == pytest.approx(15.0)


@pytest.mark.parametrize(("load", "busy"), [(0.5, False), (7.5, True)])
def test_a_busy_machine_flags_every_speed_figure(model, monkeypatch, load, busy):
    monkeypatch.setattr(speed, "energy_counter", lambda device: None)
    monkeypatch.setattr(speed, "_load_average", lambda: load)
    monkeypatch.setattr(speed, "usable_cores", lambda: 4)
    records = _by_metric(measure_speed(model, None, prompt_tokens=8, new_tokens=2, runs=3, warmup=0))
    for metric in ("prefill_ms", "prefill_tokens_per_s", "decode_tokens_per_s"):
        record = records[metric]
        assert record.protocol["busy"] is busy and record.protocol["usable_cores"] == 4
        assert record.protocol["load_avg_1min_before"] == record.protocol["load_avg_1min_after"] == load
        assert ("busy machine: 1-min load average 7.5 before" in record.note) is busy
        assert record.spread[0] <= record.value <= record.spread[1]  # the runs' range beside their median


def test_speed_shows_progress_per_run(model, monkeypatch, capsys):
    monkeypatch.setattr(speed, "energy_counter", lambda device: None)
    monkeypatch.delenv("SLIMLM_NO_PROGRESS", raising=False)
    measure_speed(model, None, prompt_tokens=4, new_tokens=2, runs=2, warmup=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("speed (warm-up, then timed runs): 3/3")
