"""Host synchronisations per clip + fused AdamW step: the step cases of ``optimizer_step``, counted.

On CUDA, ``torch.cuda.set_sync_debug_mode('warn')`` makes torch warn at every synchronising CUDA call
(copies to the host, ``.item()``, data-dependent shapes, ...), in C++ as in Python; the warnings are
counted. On CPU there is no device to wait for; what is counted there is every read of a tensor into
Python (``item``, ``bool``, ``float``, ``tolist``, ``nonzero``, ...), the calls that would be
synchronisations on a GPU (``tests/test_no_sync.py`` asserts there are none for the folded cases).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

import torch
from torch import nn

from benchmarks.cases import Case, make_model
from benchmarks.optimizer_step import StepCase, folding_supported, make_step, step_cases
from gradclip_algo import get_total_norm, spikes

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero", "equal")
"""Tensor methods that bring a value to the host (or, like ``nonzero``, need one to size their output)."""


@contextlib.contextmanager
def count_host_reads(counter: list[int]) -> Iterator[None]:
    """Count every call of ``READS`` on a tensor (Python-level calls only) into ``counter[0]``."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counting(original: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            return original(*args, **kwargs)

        return wrapper

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def count_cuda_syncs(counter: list[int]) -> Iterator[None]:
    """Count the synchronising CUDA calls torch's sync debug mode warns about into ``counter[0]``."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counter[0] += sum("synchroniz" in str(warning.message) for warning in caught)


SYNC_CASES = (StepCase("ours unfolded, skip_spikes=6 + step", "ours", {"skip_spikes": 6.0}),)
"""Beyond the step cases: unfolded spike skipping, which reads its decision on the host."""


def count_syncs(case: Case, device: torch.device, steps: int) -> dict[str, float]:
    """Host syncs per step of every step case (and ``SYNC_CASES``) over ``steps`` steps after warm-up.

    Warm-up: one window's worth of steps for the spike cases, so that skipping decisions are made (a
    window that is not yet half full decides nothing).
    """
    model = make_model(case, device, torch.float32)
    params = list(model.parameters())
    grads = [param.grad for param in params]
    initial = [grad.clone() for grad in grads]
    threshold = 0.5 * get_total_norm(grads, 2.0, device).item()
    counter_context = count_cuda_syncs if device.type == "cuda" else count_host_reads
    results = {}
    for step_case in [*step_cases(folding_supported()), *SYNC_CASES]:
        copy = [nn.Parameter(param.detach().clone()) for param in params]
        step = make_step(step_case, copy, threshold)
        warmup = spikes.SPIKE_WINDOW // 2 + 1 if "skip_spikes" in step_case.options else 1
        counter = [0]
        for index in range(warmup + steps):
            for param, grad in zip(copy, initial, strict=True):  # fresh grads, as zero_grad() and backward()
                param.grad = grad.clone()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index < warmup:
                step()
                continue
            with counter_context(counter):
                step()
        results[step_case.label] = counter[0] / steps
    return results
