"""The budget `slimlm auto --budget` takes: a file size (``70MB``, ``88.2MiB``, ``91726624B``), bits per weight
(``3.5bpw``) or a decode latency (``5ms/token``).

Sizes are of the output the target produces: the GGUF file for ``--target gguf``, the weight files of the slimlm
folder for ``--target slimlm``. Bits per weight are that size × 8 over the model's parameter count (the tied
embedding counted once), so a bpw budget becomes a size budget once the model is known (`Budget.bytes`).
A latency is the target runtime's decode ms/token on this machine: llama.cpp's for ``--target gguf``, slimlm's
kernels for ``--target slimlm`` (latency.py and the targets predict it per tensor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimlm.errors import SlimlmError

# decimal units as disks and llama.cpp's docs count them; the binary ones spelled with an i
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_ALLOWED = "a file size (70MB, 88.2MiB, 91726624B), bits per weight (3.5bpw) or a latency (5ms/token)"


@dataclass(frozen=True)
class Budget:
    """kind: size (value in bytes), bpw (bits per weight) or latency (milliseconds per decoded token)."""

    kind: str
    value: float
    text: str

    @property
    def resource(self) -> str:
        """What the budget limits: "bytes" (size and bpw budgets) or "ms_per_token" (latency budgets)."""
        return "ms_per_token" if self.kind == "latency" else "bytes"

    def bytes(self, parameters: int) -> int:
        """The size budget in bytes for a model of `parameters` weights (size and bpw budgets)."""
        if self.kind == "size":
            return int(self.value)
        if self.kind == "bpw":
            return int(self.value * parameters / 8)
        raise SlimlmError(f"--budget {self.text!r}: a decode latency, not a size")

    def amount(self, parameters: int) -> float:
        """The budget in its resource's unit: bytes, or milliseconds per decoded token."""
        return self.value if self.kind == "latency" else self.bytes(parameters)


def parse_budget(text: str) -> Budget:
    """``70MB`` -> Budget("size", 70e6); ``3.5bpw`` -> Budget("bpw", 3.5); ``5ms/token`` -> Budget("latency", 5).
    Anything else is one SlimlmError line naming the value and what is allowed."""
    cleaned = text.strip().lower().replace(" ", "")
    if m := re.fullmatch(_NUMBER + r"([kmg]i?b|b)", cleaned):
        value = float(m[1]) * _SIZE_UNITS[m[2]]
        return _positive(Budget("size", value, text))
    if m := re.fullmatch(_NUMBER + r"bpw", cleaned):
        budget = _positive(Budget("bpw", float(m[1]), text))
        if budget.value > 32:
            raise SlimlmError(f"--budget {text!r}: {budget.value:g} bits per weight is more than float32's 32")
        return budget
    if m := re.fullmatch(_NUMBER + r"ms/(?:token|tok)", cleaned):
        return _positive(Budget("latency", float(m[1]), text))
    raise SlimlmError(f"--budget {text!r}: not understood; give {_ALLOWED}")


def _positive(budget: Budget) -> Budget:
    if budget.value <= 0:
        raise SlimlmError(f"--budget {budget.text!r}: must be more than zero")
    return budget
