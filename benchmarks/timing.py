"""Wall time of calls, interleaved round-robin so drifts in machine load hit every implementation alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import torch

Key = TypeVar("Key", bound=Hashable)


def time_call(call: Callable[[], object], device: torch.device) -> float:
    """Seconds ``call()`` takes; on CUDA measured with events between two synchronisations."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    call()
    return time.perf_counter() - start_s


def round_robin(
    calls: Mapping[Key, Callable[[], object]],
    reset: Callable[[], None],
    device: torch.device,
    rounds: int,
    warmup_rounds: int,
) -> dict[Key, list[float]]:
    """Seconds per call of each entry over ``rounds`` rounds, after ``warmup_rounds`` untimed ones.

    Every round runs each entry once, ``reset()`` (untimed) before each, in an order rotated by one
    every round so no entry always follows the same other one.
    """
    names = list(calls)
    seconds: dict[Key, list[float]] = {name: [] for name in names}
    for round_index in range(warmup_rounds + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            reset()
            elapsed = time_call(calls[name], device)
            if round_index >= warmup_rounds:
                seconds[name].append(elapsed)
    return seconds
