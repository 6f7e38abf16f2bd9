"""Clipping plus a fused AdamW step, against the step alone: what clipping adds to an optimizer step.

Every case has its own copy of the parameters and its own ``torch.optim.AdamW(..., fused=True)``; all
copies share one set of grad tensors, restored (untimed) before every call, so each call sees the same
grads. Folding (``GradientClipper(..., fold_into=optimizer)``) hands the norm rule's coefficient to the
optimizer's fused kernel as ``grad_scale`` instead of rescaling the grads; where the installed
gradclip_algo has no folding, its cases are left out and the table says so.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks.cases import Case, make_model
from benchmarks.timing import round_robin
from gradclip_algo import GradientClipper, get_total_norm

LR = 1e-4
STEP_ALONE = "AdamW step alone"
TORCH = "torch clip_grad_norm_ + step"
FOLDED = "ours folded + step"
UNFOLDED = "ours unfolded + step"
FOLDED_SKIP = "ours folded, skip_spikes=6 + step"
SCALE_ONLY = "AdamW step handed grad_scale = 1 (no clipping)"
FOLD_FLOOR = "one read of every grad + step handed grad_scale = 1 (the least a fold adds)"
FOLDED_CASES = (FOLDED, FOLDED_SKIP)


def fused_adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, fused=True)


def folding_supported() -> bool:
    """Whether this gradclip_algo accepts ``fold_into=`` (the folding API)."""
    param = nn.Parameter(torch.zeros(1))
    try:
        GradientClipper("norm", 1.0, fold_into=fused_adamw([param]))
    except (TypeError, ValueError):
        return False
    return True


def read_every_grad(grads: list[torch.Tensor]) -> None:
    """The cheapest read of every element that any norm needs: ``sum`` per tensor on CPU, torch's foreach
    norm (one multi-tensor kernel) elsewhere."""
    if grads[0].device.type == "cpu":
        for grad in grads:
            grad.sum()
    else:
        torch._foreach_norm(grads)


@dataclass(frozen=True)
class StepCase:
    """How one case clips before ``optimizer.step()``: ``None`` (not at all), ``'torch'`` or ours."""

    label: str
    clip: str | None
    options: dict[str, Any]


def step_cases(folding: bool) -> list[StepCase]:
    cases = [
        StepCase(STEP_ALONE, None, {}),
        StepCase(TORCH, "torch", {}),
        StepCase(FOLDED, "ours", {"fold": True}),
        StepCase(UNFOLDED, "ours", {}),
        StepCase(FOLDED_SKIP, "ours", {"fold": True, "skip_spikes": 6.0}),
        StepCase(SCALE_ONLY, "scale", {}),
        StepCase(FOLD_FLOOR, "read and scale", {}),
    ]
    return [case for case in cases if folding or case.label not in FOLDED_CASES]


def make_step(case: StepCase, params: list[nn.Parameter], threshold: float) -> Callable[[], None]:
    """One optimizer step of ``case`` on ``params`` (their grads set), with its own fused AdamW."""
    optimizer = fused_adamw(params)
    if case.clip is None:
        return optimizer.step
    if case.clip in ("scale", "read and scale"):  # what the fused kernel adds when handed a grad_scale (it
        one = torch.ones((), dtype=torch.float32, device=params[0].device)  # writes the unscaled grads back)
        read = case.clip == "read and scale"

        def scaled_step() -> None:
            if read:
                read_every_grad([param.grad for param in params if param.grad is not None])
            optimizer.grad_scale = one
            optimizer.step()
            del optimizer.grad_scale

        return scaled_step
    if case.clip == "torch":

        def torch_step() -> None:
            nn.utils.clip_grad_norm_(params, threshold)
            optimizer.step()

        return torch_step
    options = {key: value for key, value in case.options.items() if key != "fold"}
    if case.options.get("fold"):
        options["fold_into"] = optimizer
    clipper = GradientClipper("norm", threshold, **options)

    def our_step() -> None:
        stats = clipper(params)
        optimizer.step()
        if case.options.get("fold") and not stats.folded:  # one attribute read: no sync, no cost
            raise RuntimeError(f"{case.label}: the clipping was not folded into the optimizer")

    return our_step


@dataclass(frozen=True)
class StepResult:
    title: str
    seconds: dict[str, list[float]]
    threshold: float
    folding: bool

    def added(self, label: str) -> list[float]:
        """Per round: this case's time minus the step alone's in the same round."""
        return [a - b for a, b in zip(self.seconds[label], self.seconds[STEP_ALONE], strict=True)]

    def added_median(self, label: str) -> float:
        return statistics.median(self.added(label))


def time_optimizer_steps(
    case: Case, device: torch.device, dtype: torch.dtype, rounds: int, warmup_rounds: int
) -> StepResult:
    """Seconds per call of every step case, interleaved round-robin; λ is half the grads' norm."""
    model = make_model(case, device, dtype)
    source = list(model.parameters())
    grads = [param.grad for param in source]
    initial = [grad.clone() for grad in grads]
    threshold = 0.5 * get_total_norm(grads, 2.0, device).item()
    folding = folding_supported()
    cases = step_cases(folding)
    copies: list[list[nn.Parameter]] = [source]
    for _ in cases[1:]:
        copies.append([nn.Parameter(param.detach().clone()) for param in source])

    def reset() -> None:
        # fresh grads, as zero_grad() and a backward pass give
        for params in copies:
            for param, grad in zip(params, initial, strict=True):
                param.grad = grad.clone()

    reset()
    calls = {
        step_case.label: make_step(step_case, params, threshold)
        for step_case, params in zip(cases, copies, strict=True)
    }
    seconds = round_robin(calls, reset, device, rounds, warmup_rounds)
    title = f"{case.describe()}, {device.type.upper()} {str(dtype).removeprefix('torch.')}"
    return StepResult(title, seconds, threshold, folding)
