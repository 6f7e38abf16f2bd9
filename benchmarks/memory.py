"""Peak of the memory torch allocates during one call, beyond what was live when the call began."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_extra_bytes(call: Callable[[], object], device: torch.device) -> int:
    """``max_t Σ_{events up to t} nbytes``: the high-water mark of bytes allocated and not yet freed.

    On CPU, from the allocator events that ``torch.profiler`` records with ``profile_memory=True``
    (``+n`` per allocation, ``-n`` per free, ordered by time). On CUDA, from the caching allocator's
    peak statistic.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keeps the profiler's start-up log lines off the output
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        call()
    # The raw allocator events; the aggregated ``profiler.events()`` only keep each op's net change.
    events = profiler.profiler.kineto_results.events()
    deltas = sorted(
        (event.start_ns(), event.nbytes())
        for event in events
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak
