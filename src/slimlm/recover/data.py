"""Training data: documents packed into fixed-length windows, read in a seeded order from a resumable position.

Packing: each document is tokenized without special tokens, followed by the EOS token, and the documents are
concatenated and cut into windows of `seq_len` tokens (the tail shorter than a window is dropped). A window can
span a document boundary; attention is not masked at the boundary (standard packing: the EOS tells the model a new
document starts, and no token is padding).

Order: an endless stream of window indices, epoch after epoch, each epoch a permutation drawn from
``seed + epoch``. Micro-batch b of a run with `world` processes is stream positions
``[(b·world + rank)·batch_size, … + batch_size)``, so the stream position is one integer shared by every rank; a
run resumed at micro-batch b sees exactly the batches an uninterrupted run would have seen from b on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.data import load_text
from slimlm.errors import SlimlmError


def pack_documents(token_lists: list[list[int]], seq_len: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (each followed by EOS when given) and cut the stream into [N, seq_len] windows."""
    stream: list[int] = []
    for tokens in token_lists:
        if not tokens:
            continue
        stream.extend(tokens)
        if eos_id is not None:
            stream.append(eos_id)
    count = len(stream) // seq_len
    if count == 0:
        raise SlimlmError(f"the training text has {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def packed_windows(tokenizer, source: str, seq_len: int) -> torch.Tensor:
    """The named set or file `source` (see slimlm.data.load_text), tokenized per document and packed."""
    text = load_text(source)
    documents = [doc for doc in text.documents if doc.strip()]
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    try:
        return pack_documents(encoded, seq_len, eos)
    except SlimlmError as err:
        raise SlimlmError(f"data '{source}': {err}") from err


@dataclass(frozen=True)
class WindowOrder:
    """Seeded, random-access order of windows: ``batch(b, rank, world)`` is the same on every run."""

    num_windows: int
    batch_size: int
    seed: int = 0

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=generator)

    def indices(self, start: int, count: int) -> list[int]:
        """Window indices at stream positions start … start+count−1."""
        result, cached_epoch, permutation = [], None, None
        for position in range(start, start + count):
            epoch, offset = divmod(position, self.num_windows)
            if epoch != cached_epoch:
                cached_epoch, permutation = epoch, self._permutation(epoch)
            result.append(int(permutation[offset]))
        return result

    def batch(self, micro_batch: int, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's window indices of global micro-batch `micro_batch`."""
        return self.indices((micro_batch * world + rank) * self.batch_size, self.batch_size)

    def windows_visited(self, micro_batches: int, world: int = 1) -> list[int]:
        """Every window index the first `micro_batches` global micro-batches read, on any rank, sorted."""
        return sorted(set(self.indices(0, micro_batches * world * self.batch_size)))


class DataPosition:
    """The stream position (global micro-batches consumed) as a checkpointable object for accelerate."""

    def __init__(self) -> None:
        self.micro_batch = 0
        self.step = 0

    def state_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.micro_batch = int(state["micro_batch"])
        self.step = int(state["step"])
