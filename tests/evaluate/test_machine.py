import os
import sys

import torch

from slimlm.evaluate import machine
from slimlm.evaluate.machine import energy_counter, machine_info


def test_machine_info_describes_this_machine():
    info = machine_info()
    assert info["cpu_model"]
    assert info["logical_cores"] == os.cpu_count() and 1 <= info["usable_cores"] <= os.cpu_count()
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["torch_version"] == torch.__version__
    assert info["transformers_version"].count(".") >= 1
    assert info["python_version"].startswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert info["total_ram_bytes"] > 1 << 30
    assert (info["cuda_device"] is None) == (not torch.cuda.is_available())
    assert set(info["avx512"]) == {"avx512f", "avx512_vnni", "avx512_bf16"}
    assert all(isinstance(v, bool) for v in info["avx512"].values())
    assert isinstance(info["energy_counter"]["available"], bool)


def test_avx512_flags_are_read_from_cpuinfo(monkeypatch):
    monkeypatch.setattr(machine, "_cpu_flags", lambda: {"fpu", "avx512f", "avx512_bf16"})
    assert machine_info()["avx512"] == {"avx512f": True, "avx512_vnni": False, "avx512_bf16": True}


def test_no_rapl_means_no_counter(monkeypatch, tmp_path):
    monkeypatch.setattr(machine, "_RAPL_GLOB", str(tmp_path / "intel-rapl:*"))
    assert energy_counter("cpu") is None
    if not torch.cuda.is_available():
        assert machine_info()["energy_counter"] == {"available": False, "which": []}


def test_rapl_counter_reads_package_zones_only(monkeypatch, tmp_path):
    for zone, energy in (("intel-rapl:0", 1_000_000), ("intel-rapl:1", 2_000_000), ("intel-rapl:0:0", 7_000_000)):
        (tmp_path / zone).mkdir()
        (tmp_path / zone / "energy_uj").write_text(f"{energy}\n")
        (tmp_path / zone / "max_energy_range_uj").write_text("262143328850\n")
    monkeypatch.setattr(machine, "_RAPL_GLOB", str(tmp_path / "intel-rapl:*"))
    counter = energy_counter("cpu")
    assert counter is not None and counter.name == "rapl"
    start = counter.sample()
    assert start == [1.0, 2.0]  # the sub-zone intel-rapl:0:0 is inside package 0: not added again
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("2500000\n")
    assert counter.joules_since(start) == 0.5
