"""Statistics kept as tensors on the grads' device (a stateful rule's, the spike window), updated without a
host sync."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

DeviceState = dict[str, Tensor]
T = TypeVar("T")


def move_to_(state: DeviceState, device: torch.device) -> None:
    """Move the tensors of ``state`` to ``device`` where they are elsewhere (e.g. just loaded on the CPU)."""
    for key, value in state.items():
        if value.device != device:
            state[key] = value.to(device)


def update_unless_(state: DeviceState, skip: Tensor | None, update: Callable[[], T]) -> T:
    """``update()``, which changes the tensors of ``state`` in place, and its result; where the 0-d bool
    device flag ``skip`` is true, every tensor of ``state`` is then put back as it was (no host sync)."""
    if skip is None:
        return update()
    before = {key: value.clone() for key, value in state.items()}
    result = update()
    for key, value in state.items():
        value.copy_(torch.where(skip, before[key], value))
    return result
