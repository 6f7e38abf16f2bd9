"""Byte-level text from the Python standard library, split into training and evaluation windows (torch only).

The text is CPython's own documentation that ships with every installation: ``pydoc_data.topics`` (what
``help('if')`` prints), 79 topics, about 465,000 bytes of English prose and code on Python 3.11. No
download: every machine with Python has it. The topics are joined in sorted key order, encoded as UTF-8
and read as bytes (a vocabulary of 256). The text differs between CPython versions, so results are
reproducible for one Python version.

The split is by position: the first ``1 - eval_fraction`` of the bytes train, the rest evaluate, so no
evaluation window overlaps a training one. Both are cut into non-overlapping windows of
``context_length + 1`` bytes (inputs and next-byte targets); the training order is the data loader's
(seeded) shuffle.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

VOCAB_SIZE = 256
TEXTS = ("pydoc_topics",)


def pydoc_topics_bytes() -> bytes:
    """CPython's ``pydoc_data.topics``, topics in sorted key order separated by blank lines, as UTF-8."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def text_bytes(name: str) -> Tensor:
    """The named text (one of ``TEXTS``) as a 1-D uint8 tensor."""
    if name != "pydoc_topics":
        raise ValueError(f"text: expected one of {', '.join(TEXTS)}, got {name!r}")
    return torch.frombuffer(bytearray(pydoc_topics_bytes()), dtype=torch.uint8)


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context_length + 1`` bytes: item ``i`` is ``(inputs, targets)``, both
    int64 of length ``context_length``, targets the inputs shifted by one byte."""

    def __init__(self, data: Tensor, context_length: int, limit: int | None = None) -> None:
        count = (data.numel() - 1) // context_length
        if limit is not None:
            count = min(count, limit)
        if count < 1:
            raise ValueError(f"{data.numel()} bytes hold no window of {context_length + 1} bytes")
        self.data = data.to(torch.int64)
        self.context_length = context_length
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.context_length
        window = self.data[start : start + self.context_length + 1]
        return window[:-1], window[1:]


def train_and_eval_windows(
    name: str, context_length: int, eval_fraction: float, eval_windows: int | None = None
) -> tuple[ByteWindows, ByteWindows]:
    """The training windows (first part of the text) and at most ``eval_windows`` evaluation windows
    (the start of the held-out last ``eval_fraction``)."""
    data = text_bytes(name)
    cut = int(data.numel() * (1.0 - eval_fraction))
    return ByteWindows(data[:cut], context_length), ByteWindows(data[cut:], context_length, eval_windows)
