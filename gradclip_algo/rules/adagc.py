"""AdaGC: per-tensor clipping against an EMA of each tensor's own clipped grad norms.

Wang, Li, Chen, Zeng, Yang, Yu, Ma and Shen 2025, "AdaGC: Improving Training Stability for Large Language
Model Pretraining" (arXiv 2502.11034).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gradclip_algo import kernels
from gradclip_algo.distributed import Shards
from gradclip_algo.norm_history import statistics_dtype
from gradclip_algo.norms import clip_coefficient, group_by_device_and_dtype, power_sums
from gradclip_algo.options import RuleOptions, option
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_in_interval, check_int, check_positive_number, check_state_tensor


@dataclass(frozen=True)
class AdaGCOptions(RuleOptions):
    """``relative_threshold``: λ_rel > 0 (default 1.05); ``beta``: the EMA factor β in (0, 1) (default
    0.98; both the paper's); ``warmup_steps``: steps of global norm clipping first, ≥ 1 (default 100)."""

    relative_threshold: float = option(1.05, check_positive_number)
    beta: float = option(0.98, partial(check_in_interval, low=0.0, high=1.0))
    warmup_steps: int = option(100, partial(check_int, minimum=1))  # gamma starts from warm-up norms


def init(options: AdaGCOptions, device: torch.device | str) -> dict[str, Tensor]:
    """``step``: finite steps seen (int64); ``gamma``: one gamma_i per tensor
    (:func:`~gradclip_algo.norm_history.statistics_dtype`), sized at the first call."""
    return {
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "gamma": torch.zeros(0, dtype=statistics_dtype(device), device=device),
    }


def check_state(state: dict[str, Tensor], options: AdaGCOptions) -> None:
    """``ValueError`` unless ``step`` ≥ 0 and every gamma_i is > 0 (``inf`` before its first finite norm).
    Reads the values."""
    step = int(check_state_tensor("state.rule.step", state["step"], torch.int64, ndim=0))
    if step < 0:
        raise ValueError(f"state.rule.step: expected an integer >= 0, got {step}")
    gamma = check_state_tensor("state.rule.gamma", state["gamma"], statistics_dtype("cpu"), ndim=1)
    if not bool((gamma.detach().cpu() >= 0).all()):
        raise ValueError("state.rule.gamma: expected numbers >= 0 or inf (no NaN), one per gradient tensor")


def _gamma(state: dict[str, Tensor], count: int) -> Tensor:
    """gamma, created as ``+inf`` for ``count`` tensors at the first call; their number may not change."""
    gamma = state["gamma"]
    if gamma.numel() == 0:
        gamma = state["gamma"] = torch.full((count,), float("inf"), dtype=gamma.dtype, device=gamma.device)
    elif gamma.numel() != count:
        raise ValueError(
            f"clipping_type='adagc' keeps one statistic per gradient tensor: it tracked {gamma.numel()} "
            f"tensors and now got {count}; the set of parameters with grads must stay the same every step"
        )
    return gamma


def update(shards: Shards, max_norm: float, options: AdaGCOptions, state: dict[str, Tensor]) -> ClipStats:
    """Per tensor i, with ``g_i`` its whole grad and ``ĝ_i`` the clipped one:

    - Warm-up, the first ``warmup_steps`` steps: global norm clipping at λ_abs (``clipping_threshold``;
      ``inf``: none), ``ĝ_i = min(1, λ_abs / (‖g‖ + 1e-6))·g_i``, and ``gamma_i ← min(gamma_i, ‖ĝ_i‖)``.
    - Then ``ĝ_i = min(1, λ_rel·gamma_i / ‖g_i‖)·g_i`` (λ_rel = ``relative_threshold``) and
      ``gamma_i ← β·gamma_i + (1 - β)·‖ĝ_i‖``.

    Norms are L2 over the whole tensor, also when it is split across ranks. A non-finite global norm
    leaves gamma and the step count untouched. The set of parameters with grads must be the same every step
    (gamma_i is matched to tensors by position). ``clipped_fraction`` is the share of tensors scaled down.
    """
    grads = shards.grads
    gamma = _gamma(state, len(grads))
    step = state["step"]
    norms = shards.tensor_totals(power_sums(grads, 2.0, shards.device)).sqrt().to(gamma.dtype)
    global_norm = shards.global_norm(2.0)
    warm = step < options.warmup_steps
    warm_coef = clip_coefficient(global_norm, max_norm).to(gamma.dtype)
    cap = options.relative_threshold * gamma
    tensor_coef = torch.where(norms > cap, cap / norms, 1.0)
    coef = torch.where(warm, warm_coef.expand_as(norms), tensor_coef)
    for (device, _), indices in group_by_device_and_dtype(grads).items():
        kernels.scale_(
            [grads[i] for i in indices], coef[torch.tensor(indices, device=coef.device)].to(device)
        )
    clipped_norms = norms * coef
    updated = torch.where(
        warm, torch.minimum(gamma, clipped_norms), options.beta * gamma + (1 - options.beta) * clipped_norms
    )
    finite = torch.isfinite(global_norm)
    gamma.copy_(torch.where(finite, updated, gamma))
    step.add_(finite.to(step.dtype))
    clipped = torch.where(warm, global_norm > max_norm, norms > cap).to(torch.float32)
    # per-tensor values are whole on every rank of a stage: counted once, summed over pipeline stages
    return ClipStats(
        grad_norm=global_norm,
        clipped_grad_norm=shards.total(clipped_norms.square(), partial=False).sqrt().to(global_norm.dtype),
        clipped_fraction=shards.total(clipped, partial=False)
        / shards.total(torch.ones_like(clipped), partial=False),
    )
