"""ZClip: clip grad-norm outliers by their z-score against running statistics.

Kumar, Owen, Ashraf, Yadav and Zhang 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"
(arXiv 2504.02507); the rule below is that of the authors' reference code (``mode='zscore'``,
``clip_option='adaptive_scaling'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.norm_history import statistics_dtype
from gradclip_algo.options import RuleOptions, option
from gradclip_algo.rules.norm import to_norm
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_in_interval, check_int, check_positive_number, check_state_tensor

ZSCORE_EPS = 1e-6  # added to sigma in the z-score, as in the reference code


@dataclass(frozen=True)
class ZScoreOptions(RuleOptions):
    """``alpha``: the EMA factor in (0, 1) (default 0.97); ``z_threshold``: z_t > 0 (default 2.5);
    ``warmup_steps``: W ≥ 2 norms before the z-score is used (default 25). The defaults are the paper's."""

    alpha: float = option(0.97, partial(check_in_interval, low=0.0, high=1.0))
    z_threshold: float = option(2.5, check_positive_number)
    warmup_steps: int = option(25, partial(check_int, minimum=2))  # a variance needs 2 norms


def init(options: ZScoreOptions, device: torch.device | str) -> dict[str, Tensor]:
    """``step``: finite norms seen (int64); ``mean``, ``var``: the running statistics μ and sigma²
    (:func:`~gradclip_algo.norm_history.statistics_dtype`)."""
    zero = torch.zeros((), dtype=statistics_dtype(device), device=device)
    return {"step": torch.zeros((), dtype=torch.int64, device=device), "mean": zero, "var": zero.clone()}


def check_state(state: dict[str, Tensor], options: ZScoreOptions) -> None:
    """``ValueError`` unless ``step`` ≥ 0 and ``mean``, ``var`` are finite and ≥ 0. Reads the values."""
    step = int(check_state_tensor("state.rule.step", state["step"], torch.int64, ndim=0))
    if step < 0:
        raise ValueError(f"state.rule.step: expected an integer >= 0, got {step}")
    for key in ("mean", "var"):
        value = float(check_state_tensor(f"state.rule.{key}", state[key], statistics_dtype("cpu"), ndim=0))
        if not (value >= 0 and value != float("inf")):
            raise ValueError(f"state.rule.{key}: expected a finite number >= 0, got {value}")


def update(shards: Shards, max_norm: float, options: ZScoreOptions, state: dict[str, Tensor]) -> ClipStats:
    """Clip the global L2 norm ``n`` to ``τ = min(τ_z, λ)``, coefficient ``min(1, τ / (n + 1e-6))``.

    - Warm-up, the first ``warmup_steps`` (W) norms: only the ceiling λ (``clipping_threshold``) clips;
      μ and sigma² become the mean and population variance of those W norms (kept as running values).
    - Then ``z = (n - μ) / (sigma + 1e-6)``; if ``z > z_t`` (``z_threshold``) the norm is an outlier and
      ``τ_z = μ + z_t·sigma / (z / z_t) = μ + z_t²·sigma / z``: the larger the spike, the harder it is cut
      back; otherwise ``τ_z = ∞``. λ stays a ceiling (``inf``: none).
    - The statistics take ``x = τ_z`` for an outlier and ``x = n`` otherwise (λ does not enter them):
      ``μ ← alpha·μ + (1 - alpha)·x``, ``sigma² ← alpha·sigma² + (1 - alpha)·(x - μ)²`` with the updated μ.

    A non-finite norm leaves the statistics untouched.
    """
    alpha, z_threshold = options.alpha, options.z_threshold
    norm = shards.global_norm(2.0)
    n = norm.to(state["mean"].dtype)
    step, mean, var = state["step"], state["mean"], state["var"]
    warm = step < options.warmup_steps
    std = var.sqrt()
    z = (n - mean) / (std + ZSCORE_EPS)
    outlier = ~warm & (z > z_threshold)
    adaptive = mean + z_threshold**2 * std / z
    threshold = torch.where(outlier, adaptive, float("inf")).clamp(max=max_norm)
    boundary = torch.where(warm, float("inf"), mean + z_threshold * (std + ZSCORE_EPS)).clamp(max=max_norm)
    stats = to_norm(norm, threshold, boundary)

    seen = (step + 1).to(n.dtype)
    warm_mean = mean + (n - mean) / seen
    warm_var = (var * (seen - 1) + (n - mean) * (n - warm_mean)) / seen
    target = torch.where(outlier, adaptive, n)
    ema_mean = alpha * mean + (1 - alpha) * target
    ema_var = alpha * var + (1 - alpha) * (target - ema_mean).square()
    finite = torch.isfinite(n)
    mean.copy_(torch.where(finite, torch.where(warm, warm_mean, ema_mean), mean))
    var.copy_(torch.where(finite, torch.where(warm, warm_var, ema_var), var))
    step.add_(finite.to(step.dtype))
    return stats
