"""ZClip: clip grad-norm outliers by their z-score against running statistics.

Kumar, Owen, Ashraf, Yadav and Zhang 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"
(arXiv 2504.02507); the rule below is that of the authors' reference code (``mode='zscore'``,
``clip_option='adaptive_scaling'``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.rules.threshold import clip_to_threshold_
from gradclip_algo.stats import ClipStats

ZSCORE_ALPHA = 0.97
ZSCORE_THRESHOLD = 2.5
ZSCORE_WARMUP_STEPS = 25
ZSCORE_EPS = 1e-6  # added to sigma in the z-score, as in the reference code


def init_zscore_state(
    device: torch.device | str,
    alpha: float = ZSCORE_ALPHA,
    z_threshold: float = ZSCORE_THRESHOLD,
    warmup_steps: int = ZSCORE_WARMUP_STEPS,
) -> dict[str, Tensor]:
    """``step``: finite norms seen (int64); ``mean``, ``var``: the running statistics μ and sigma² (fp32)."""
    zero = torch.zeros((), dtype=torch.float32, device=device)
    return {"step": torch.zeros((), dtype=torch.int64, device=device), "mean": zero, "var": zero.clone()}


def zscore_clip(
    shards: Shards,
    max_norm: float,
    state: dict[str, Tensor],
    alpha: float = ZSCORE_ALPHA,
    z_threshold: float = ZSCORE_THRESHOLD,
    warmup_steps: int = ZSCORE_WARMUP_STEPS,
) -> ClipStats:
    """Clip the global L2 norm ``n`` to ``min(τ, λ)``, with ``τ`` from the z-score of ``n``.

    - Warm-up, the first ``warmup_steps`` (W) norms: only the ceiling λ (``clipping_threshold``) clips;
      μ and sigma² become the mean and population variance of those W norms (kept as running values).
    - Then ``z = (n - μ) / (sigma + 1e-6)``; if ``z > z_t`` (``z_threshold``) the norm is an outlier and
      ``τ = μ + z_t·sigma / (z / z_t) = μ + z_t²·sigma / z``: the larger the spike, the harder it is cut back;
      otherwise ``τ = ∞``. λ stays a ceiling (``inf``: none).
    - The statistics take ``x = τ`` for an outlier and ``x = n`` otherwise (λ does not enter them):
      ``μ ← alpha·μ + (1 - alpha)·x``, ``sigma² ← alpha·sigma² + (1 - alpha)·(x - μ)²`` with the updated μ.

    A non-finite norm leaves the statistics untouched.
    Defaults (the paper's): alpha = 0.97, z_t = 2.5, W = 25.
    """
    norm = shards.global_norm(2.0)
    step, mean, var = state["step"], state["mean"], state["var"]
    warm = step < warmup_steps
    std = var.sqrt()
    z = (norm - mean) / (std + ZSCORE_EPS)
    outlier = ~warm & (z > z_threshold)
    adaptive = mean + z_threshold**2 * std / z
    threshold = torch.where(outlier, adaptive, float("inf")).clamp(max=max_norm)
    stats = clip_to_threshold_(shards, norm, threshold)

    seen = (step + 1).to(torch.float32)
    warm_mean = mean + (norm - mean) / seen
    warm_var = (var * (seen - 1) + (norm - mean) * (norm - warm_mean)) / seen
    target = torch.where(outlier, adaptive, norm)
    ema_mean = alpha * mean + (1 - alpha) * target
    ema_var = alpha * var + (1 - alpha) * (target - ema_mean).square()
    finite = torch.isfinite(norm)
    mean.copy_(torch.where(finite, torch.where(warm, warm_mean, ema_mean), mean))
    var.copy_(torch.where(finite, torch.where(warm, warm_var, ema_var), var))
    step.add_(finite.to(step.dtype))
    return stats
