"""AdaGC: per-tensor clipping against an EMA of each tensor's own clipped grad norms.

Wang, Li, Chen, Zeng, Yang, Yu, Ma and Shen 2025, "AdaGC: Improving Training Stability for Large Language
Model Pretraining" (arXiv 2502.11034).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.norms import group_by_device_and_dtype, power_sums
from gradclip_algo.rules.norm import NORM_EPS
from gradclip_algo.stats import ClipStats

ADAGC_RELATIVE_THRESHOLD = 1.05
ADAGC_BETA = 0.98
ADAGC_WARMUP_STEPS = 100


def init_adagc_state(
    device: torch.device | str,
    relative_threshold: float = ADAGC_RELATIVE_THRESHOLD,
    beta: float = ADAGC_BETA,
    warmup_steps: int = ADAGC_WARMUP_STEPS,
) -> dict[str, Tensor]:
    """``step``: finite steps seen (int64); ``gamma``: one gamma_i per tensor (fp32), sized at the first call."""
    return {
        "step": torch.zeros((), dtype=torch.int64, device=device),
        "gamma": torch.zeros(0, dtype=torch.float32, device=device),
    }


def _whole_tensor_squares(shards: Shards) -> Tensor:
    """``‖g_i‖²`` of each whole tensor: local sums, summed over the ranks that split each tensor."""
    return shards.tensor_totals(power_sums(shards.grads, 2.0, shards.device))


def _gamma(state: dict[str, Tensor], count: int) -> Tensor:
    """gamma, created as ``+inf`` for ``count`` tensors at the first call; their number may not change."""
    gamma = state["gamma"]
    if gamma.numel() == 0:
        gamma = state["gamma"] = torch.full((count,), float("inf"), device=gamma.device)
    elif gamma.numel() != count:
        raise ValueError(
            f"clipping_type='adagc' keeps one statistic per gradient tensor: it tracked {gamma.numel()} "
            f"tensors and now got {count}; the set of parameters with grads must stay the same every step"
        )
    return gamma


def adagc_clip(
    shards: Shards,
    max_norm: float,
    state: dict[str, Tensor],
    relative_threshold: float = ADAGC_RELATIVE_THRESHOLD,
    beta: float = ADAGC_BETA,
    warmup_steps: int = ADAGC_WARMUP_STEPS,
) -> ClipStats:
    """Per tensor i, with ``g_i`` its whole grad and ``ĝ_i`` the clipped one:

    - Warm-up, the first ``warmup_steps`` steps: global norm clipping at λ_abs (``clipping_threshold``;
      ``inf``: none), ``ĝ_i = min(1, λ_abs / (‖g‖ + 1e-6))·g_i``, and ``gamma_i ← min(gamma_i, ‖ĝ_i‖)``.
    - Then ``ĝ_i = min(1, λ_rel·gamma_i / ‖g_i‖)·g_i`` (λ_rel = ``relative_threshold``) and
      ``gamma_i ← β·gamma_i + (1 - β)·‖ĝ_i‖``.

    Norms are L2 over the whole tensor, also when FSDP splits it across ranks. A non-finite global norm
    leaves gamma and the step count untouched. The set of parameters with grads must be the same every step
    (gamma_i is matched to tensors by position). ``clipped_fraction`` is the share of tensors scaled down.
    Defaults: λ_rel = 1.05, β = 0.98 (the paper's), warm-up 100 steps.
    """
    grads = shards.grads
    gamma = _gamma(state, len(grads))
    step = state["step"]
    squares = _whole_tensor_squares(shards)
    norms = squares.sqrt()
    global_norm = shards.total(squares, partial=False).sqrt()  # all pipeline stages
    warm = step < warmup_steps
    warm_coef = torch.where(global_norm > max_norm, max_norm / (global_norm + NORM_EPS), 1.0)
    cap = relative_threshold * gamma
    tensor_coef = torch.where(norms > cap, cap / norms, 1.0)
    coef = torch.where(warm, warm_coef.expand_as(norms), tensor_coef)
    factors = coef.unbind()
    for (grad_device, _), indices in group_by_device_and_dtype(grads).items():
        torch._foreach_mul_(
            [grads[i] for i in indices], [factors[i].to(grad_device, non_blocking=True) for i in indices]
        )
    clipped_norms = norms * coef
    updated = torch.where(
        warm, torch.minimum(gamma, clipped_norms), beta * gamma + (1 - beta) * clipped_norms
    )
    finite = torch.isfinite(global_norm)
    gamma.copy_(torch.where(finite, updated, gamma))
    step.add_(finite.to(step.dtype))
    return ClipStats(
        grad_norm=global_norm,
        clipped_grad_norm=shards.total(clipped_norms.square(), partial=False).sqrt(),
        clipped_fraction=shards.total((coef < 1.0).to(torch.float32), partial=False)
        / shards.total(torch.ones_like(coef), partial=False),
    )
