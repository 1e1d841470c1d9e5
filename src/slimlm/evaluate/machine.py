"""What machine a figure was measured on, and which energy counter (if any) it offers.

Speed and energy figures mean nothing without the CPU, thread count and library versions beside them, so every
report carries `machine_info()`. Energy counters are probed, never estimated: RAPL on Linux CPUs (when the
kernel exposes it and lets this user read it), NVML on NVIDIA GPUs (when ``pynvml`` is installed).
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from pathlib import Path

import psutil
import torch

_RAPL_GLOB = "/sys/class/powercap/intel-rapl:*"  # AMD CPUs are exposed under the same name
_AVX512_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16")


class EnergyCounter:
    """A cumulative energy counter with one or more domains (e.g. one per CPU package).

    Use: ``start = counter.sample()`` ... ``joules = counter.joules_since(start)``. Counters that wrap around
    (RAPL) are corrected for one wrap per domain between the two samples.
    """

    def __init__(self, name: str, readers: list, wrap_joules: list[float | None], scope: str):
        self.name = name  # "rapl" | "nvml"
        self.scope = scope  # what the counter covers, printed in the protocol
        self._readers = readers
        self._wrap_joules = wrap_joules

    def sample(self) -> list[float]:
        return [read() for read in self._readers]

    def joules_since(self, start: list[float]) -> float:
        total = 0.0
        for before, after, wrap in zip(start, self.sample(), self._wrap_joules):
            delta = after - before
            if delta < 0 and wrap:
                delta += wrap
            total += delta
        return total


def _read_microjoules(path: Path) -> float:
    return int(path.read_text().strip()) / 1e6


def _rapl_counter() -> EnergyCounter | None:
    # Top-level zones only (intel-rapl:0, intel-rapl:1): sub-zones (intel-rapl:0:0) are part of their package.
    packages = [Path(p) for p in sorted(glob.glob(_RAPL_GLOB)) if p.count(":") == 1]
    readers, wraps = [], []
    for package in packages:
        energy = package / "energy_uj"
        try:
            _read_microjoules(energy)  # since 2020 kernels often make this root-only
            wrap = _read_microjoules(package / "max_energy_range_uj")
        except (OSError, ValueError):
            continue
        readers.append(lambda energy=energy: _read_microjoules(energy))
        wraps.append(wrap)
    if not readers:
        return None
    return EnergyCounter("rapl", readers, wraps, scope=f"{len(readers)} CPU package(s), whole machine, all processes")


def _nvml_counter(device_index: int | None = None) -> EnergyCounter | None:
    if not torch.cuda.is_available():
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda.current_device() if device_index is None else device_index
        handle = _nvml_handle(pynvml, index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # raises on GPUs older than Volta
    except Exception:  # noqa: BLE001 - any NVML failure means "no counter", never a crash
        return None
    read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # noqa: E731 - millijoules
    return EnergyCounter("nvml", [read], [None], scope=f"GPU {index} board energy")


def _nvml_handle(pynvml, torch_index: int):
    # torch's index counts only CUDA_VISIBLE_DEVICES; NVML counts every GPU, so match by UUID when torch knows it.
    uuid = getattr(torch.cuda.get_device_properties(torch_index), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # noqa: BLE001
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(torch_index)


def energy_counter(device: str | torch.device = "cpu") -> EnergyCounter | None:
    """The energy counter covering `device` (NVML for CUDA, RAPL for CPU), or None when there is none."""
    device = torch.device(device)
    if device.type == "cuda":
        return _nvml_counter(device.index)
    return _rapl_counter()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    # Containers and taskset limit the cores this process may run on; os.cpu_count() ignores that.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def machine_info() -> dict:
    """CPU, cores, threads, library versions, RAM, GPU, vector extensions and energy counters of this machine."""
    flags = _cpu_flags()
    cpu_counter = _rapl_counter()
    gpu_counter = _nvml_counter()
    counters = [c.name for c in (cpu_counter, gpu_counter) if c is not None]
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": _package_version("transformers"),
        "python_version": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "platform": sys.platform,
        "total_ram_bytes": psutil.virtual_memory().total,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "avx512": {flag: flag in flags for flag in _AVX512_FLAGS},
        "energy_counter": {"available": bool(counters), "which": counters},
    }
