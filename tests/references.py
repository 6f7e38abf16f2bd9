"""Float64 references of every clipping rule, written from each paper's rule (never by calling library code).

Each rule comes in up to two forms:

- on grads (``*_reference`` functions and ``*Reference`` classes, one call per step): the grads after the
  call and every :class:`ClipStats` field as an :class:`Outcome`, with ``band``, the relative rounding
  within which a decision may go either way (tests/test_fuzz.py);
- on norms alone (``*_reference`` loops over a list of per-step norms): the coefficient, threshold or
  state of each step, for the rules' unit tests (tests/test_stateful_rules.py, tests/test_spikes.py).

Sections: shared helpers, 'norm', 'value', 'adaptive' (AGC), 'quantile' (AutoClip), 'zscore' (ZClip),
'adagc' (AdaGC) and spike skipping (``skip_spikes``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NORM_EPS = 1e-6  # added to the norm in every coefficient λ / (‖G‖ + 1e-6), as torch does

# ---- shared: outcomes and float64 norms --------------------------------------------------------------


@dataclass
class Outcome:
    """What one clipping call must do, in float64.

    ``grads``: every grad after the call (``None``: the step is skipped and every grad set to ``None``);
    ``clipped_fraction`` is given as bounds, because a decision within rounding of its threshold may go
    either way; ``raises``: a :class:`NonFiniteGradError` with the grads left as they were.
    """

    grads: list[Tensor] | None
    grad_norm: float = 0.0
    clipped_grad_norm: float = 0.0
    fraction: tuple[float, float] = (0.0, 0.0)
    skipped: bool = False
    raises: bool = False


def p_norm(tensors: Iterable[Tensor], p: float) -> float:
    """``‖G‖_p`` of all ``tensors`` together (float64): ``max|g|`` for p = inf, else ``(Σ|g|^p)^(1/p)``,
    computed as ``m · ‖G / m‖_p`` with ``m = max|g|`` so that no power overflows or underflows float64.
    NaN if any element is NaN, inf if any is infinite."""
    flat = torch.cat(
        [t.reshape(-1).to(torch.float64) for t in tensors] + [torch.zeros(0, dtype=torch.float64)]
    )
    if flat.numel() == 0:
        return 0.0
    if bool(flat.isnan().any()):
        return math.nan
    peak = float(flat.abs().max())
    if peak == 0.0 or math.isinf(peak) or math.isinf(p):
        return peak
    return peak * float((flat.abs() / peak).pow(p).sum()) ** (1.0 / p)


def unit_rows(tensor: Tensor) -> Tensor:
    """AGC units as rows: the output rows/filters of a 2+-D tensor, the whole tensor for 0-D and 1-D."""
    if tensor.ndim < 2:
        return tensor.reshape(1, tensor.numel())
    return tensor.reshape(tensor.shape[0], math.prod(tensor.shape[1:]))


def row_norms(rows: Tensor) -> Tensor:
    """L2 norm of each row in float64, scaled by the row's max so that no square overflows."""
    peak = rows.abs().amax(dim=1, keepdim=True) if rows.shape[1] else rows.new_zeros(rows.shape[0], 1)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    return (peak * (rows / safe).square().sum(dim=1, keepdim=True).sqrt()).squeeze(1)


def count_bounds(values: Tensor, limit: Tensor | float, band: float) -> tuple[int, int]:
    """How many ``values > limit``, as bounds: those beyond ``limit·(1 + band)`` certainly, those beyond
    ``limit·(1 - band)`` at most."""
    return int((values > limit * (1 + band)).sum()), int((values > limit * (1 - band)).sum())


def coef_outcome(grads: list[Tensor], coef: float, grad_norm: float) -> Outcome:
    """Every grad · ``coef``; ``clipped_grad_norm`` = ``coef · grad_norm`` (the same p-norm after)."""
    return Outcome([g * coef for g in grads], grad_norm, grad_norm * coef)


def skipped_outcome(norm: float) -> Outcome:
    return Outcome(None, norm, 0.0, (1.0, 1.0), skipped=True)


def cap_coef(norm: float, cap: float) -> float:
    """The coefficient of a step whose global norm is ``norm`` under the threshold ``cap``, on norms alone:
    ``cap / (norm + 1e-6)`` above it, 1 at or below it."""
    return cap / (norm + NORM_EPS) if norm > cap else 1.0


# ---- 'norm' ------------------------------------------------------------------------------------------


def norm_reference(grads: list[Tensor], threshold: float, norm_type: float, band: float) -> list[Outcome]:
    """'norm': ``g ← g · min(1, λ / (‖G‖_p + 1e-6))``, λ = ``threshold`` (:func:`threshold_reference`)."""
    return threshold_reference(grads, p_norm(grads, norm_type), threshold, band)


def threshold_reference(grads: list[Tensor], norm: float, tau: float, band: float) -> list[Outcome]:
    """The clip at a threshold τ of 'norm' and the statistics-driven rules: every grad · ``min(1, τ / (‖G‖
    + 1e-6))`` (torch's factor: continuous in ‖G‖, and below 1 already for ``τ - 1e-6 < ‖G‖ ≤ τ``), and
    the step counts as clipped where ``‖G‖ > τ``; within ``band`` of τ it may count either way."""
    outcome = coef_outcome(grads, min(1.0, tau / (norm + NORM_EPS)), norm)
    near = math.isfinite(tau) and abs(norm - tau) <= band * max(norm, tau)
    outcome.fraction = (float(norm > tau and not near), float(norm > tau or near))
    return [outcome]


# ---- 'value' -----------------------------------------------------------------------------------------


def value_reference(grads: list[Tensor], threshold: float, bands: list[float]) -> list[Outcome]:
    """'value': ``g ← clamp(g, -λ, λ)``; L2 norms before and after; fraction: share of elements ``|g| > λ``
    (an element within its dtype's rounding of λ may count either way: λ is rounded to the grad's dtype)."""
    after = [g.clamp(-threshold, threshold) for g in grads]
    numel = sum(g.numel() for g in grads)
    low = high = 0
    for g, band in zip(grads, bands, strict=True):
        sure, maybe = count_bounds(g.abs().reshape(-1), threshold, band)
        low, high = low + sure, high + maybe
    total = max(1, numel)
    return [Outcome(after, p_norm(grads, 2.0), p_norm(after, 2.0), (low / total, high / total))]


# ---- 'adaptive' (AGC) --------------------------------------------------------------------------------


def adaptive_reference(
    grads: list[Tensor], weights: list[Tensor], threshold: float, eps: float, band: float
) -> list[Outcome]:
    """'adaptive' (AGC), per unit u: ``M_u = λ · max(‖W_u‖, ε)``; if ``‖G_u‖ > M_u`` then
    ``G_u ← G_u · M_u / ‖G_u‖``. Fraction: share of units clipped (0-D/1-D tensors are one unit each,
    a 2+-D tensor has ``shape[0]`` units)."""
    after, low, high, units = [], 0, 0, 0
    for grad, weight in zip(grads, weights, strict=True):
        rows = unit_rows(grad)
        grad_norms, limits = row_norms(rows), threshold * row_norms(unit_rows(weight)).clamp(min=eps)
        clipped = grad_norms > limits
        coef = torch.where(clipped, limits / torch.where(clipped, grad_norms, 1.0), 1.0)
        after.append((rows * coef.unsqueeze(1)).reshape(grad.shape))
        sure, maybe = count_bounds(grad_norms, limits, band)
        low, high, units = low + sure, high + maybe, units + rows.shape[0]
    total = max(1, units)
    return [Outcome(after, p_norm(grads, 2.0), p_norm(after, 2.0), (low / total, high / total))]


def agc_reference(weight: Tensor, grad: Tensor, clipping: float, eps: float = 1e-3) -> Tensor:
    """One tensor's grad after 'adaptive' (:func:`adaptive_reference` on float64 copies), in float64."""
    return adaptive_reference([grad.double()], [weight.double()], clipping, eps, 0.0)[0].grads[0]


# ---- 'quantile' (AutoClip) ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q / 100.0 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class QuantileReference:
    """AutoClip: ``h_t = ‖G_t‖`` enters the history (the last ``window`` finite norms) first, then
    ``τ = min(P_p(history), λ)`` and the grads are clipped at τ (:func:`threshold_reference`)."""

    def __init__(self, threshold: float, percentile: float = 10.0, window: int = 1000) -> None:
        self.threshold, self.percentile = threshold, percentile
        self.history: deque[float] = deque(maxlen=window)

    def __call__(self, grads: list[Tensor], band: float) -> list[Outcome]:
        norm = p_norm(grads, 2.0)
        if math.isfinite(norm):
            self.history.append(norm)
        tau = self.threshold
        if self.history:
            tau = min(percentile(list(self.history), self.percentile), self.threshold)
        return threshold_reference(grads, norm, tau, band)


def autoclip_caps(norms: Sequence[float], p: float, window: int, ceiling: float) -> list[float]:
    """The threshold of every step: the percentile of the window with the current norm in it, capped."""
    history: list[float] = []
    caps = []
    for norm in norms:
        history = [*history, norm][-window:]  # the current norm enters first
        caps.append(min(percentile(history, p), ceiling))
    return caps


def autoclip_reference(norms: Sequence[float], p: float, window: int, ceiling: float) -> list[float]:
    """AutoClip on norms alone: the coefficient of every step (:func:`cap_coef` at its threshold)."""
    return [
        cap_coef(norm, cap) for norm, cap in zip(norms, autoclip_caps(norms, p, window, ceiling), strict=True)
    ]


# ---- 'zscore' (ZClip) --------------------------------------------------------------------------------


class ZScoreReference:
    """ZClip (gradclip_algo/rules/zscore.py), global L2 norm n:

    - warm-up (the first W finite norms): only λ clips; μ, sigma² = mean and population variance of those norms;
    - then ``z = (n - μ) / (sigma + 1e-6)``; an outlier (``z > z_t``) gets ``τ = μ + z_t²·sigma / z``, others
      ``τ = ∞``; the grads are clipped at ``min(τ, λ)``;
    - after warm-up, with ``x = τ`` for an outlier and ``x = n`` otherwise: ``μ ← alpha·μ + (1 - alpha)·x``,
      ``sigma² ← alpha·sigma² + (1 - alpha)·(x - μ)²`` (the updated μ). A non-finite norm changes nothing.
    """

    def __init__(
        self, threshold: float, alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25
    ) -> None:
        self.threshold, self.alpha, self.z_t, self.warmup = threshold, alpha, z_threshold, warmup_steps
        self.warm_norms: list[float] = []
        self.mean = self.var = 0.0

    def __call__(self, grads: list[Tensor], band: float) -> list[Outcome]:
        norm = p_norm(grads, 2.0)
        if len(self.warm_norms) < self.warmup:
            outcomes = threshold_reference(grads, norm, self.threshold, band)
            if math.isfinite(norm):
                self.warm_norms.append(norm)
                self.mean = sum(self.warm_norms) / len(self.warm_norms)
                self.var = sum((x - self.mean) ** 2 for x in self.warm_norms) / len(self.warm_norms)
            return outcomes
        std = math.sqrt(self.var)
        z = (norm - self.mean) / (std + 1e-6)
        outlier = z > self.z_t
        tau = self.mean + self.z_t**2 * std / z if outlier else math.inf
        outcomes = threshold_reference(grads, norm, min(tau, self.threshold), band)
        # sigma is an fp32 square root of a variance: near sigma = 0 it is off by ~sqrt(eps)·μ
        boundary = self.mean + self.z_t * (std + 1e-6)
        if abs(norm - boundary) <= band * norm + self.z_t * 3e-4 * self.mean:
            other = self.mean + self.z_t**2 * std / z if not outlier and z > 0 else math.inf
            outcomes += threshold_reference(grads, norm, min(other, self.threshold), band)
        if math.isfinite(norm):
            target = tau if outlier else norm
            self.mean = self.alpha * self.mean + (1 - self.alpha) * target
            self.var = self.alpha * self.var + (1 - self.alpha) * (target - self.mean) ** 2
        return outcomes


def zclip_reference(
    norms: Sequence[float], ceiling: float, alpha: float, z_t: float, warmup: int
) -> tuple[list[float], list[tuple[float, float]]]:
    """The ZClip authors' rule: warm-up buffer, then EMA of the (z-clipped) norm and its variance."""
    buffer: list[float] = []
    mean = var = math.nan
    coefs, states = [], []
    for norm in norms:
        if len(buffer) < warmup:
            buffer.append(norm)
            cap = ceiling
            mean = sum(buffer) / len(buffer)
            var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
        else:
            std = math.sqrt(var)
            z = (norm - mean) / (std + NORM_EPS)
            outlier = z > z_t
            threshold = mean + z_t * std / (z / z_t) if outlier else math.inf
            cap = min(threshold, ceiling)
            x = threshold if outlier else norm
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
        coefs.append(cap_coef(norm, cap))
        states.append((mean, var))
    return coefs, states


# ---- 'adagc' (AdaGC) ---------------------------------------------------------------------------------


class AdaGCReference:
    """AdaGC (gradclip_algo/rules/adagc.py), per tensor i with ``g_i`` its grad, ``ĝ_i`` the clipped one,
    ``gamma_i`` starting at +inf:

    - warm-up (the first W finite steps): ``ĝ_i = min(1, λ / (‖g‖ + 1e-6))·g_i`` (‖g‖ global L2),
      ``gamma_i ← min(gamma_i, ‖ĝ_i‖)``;
    - then ``ĝ_i = min(1, λ_rel·gamma_i / ‖g_i‖)·g_i`` (no clip where ‖g_i‖ ≤ λ_rel·gamma_i),
      ``gamma_i ← β·gamma_i + (1 - β)·‖ĝ_i‖``.

    ``clipped_fraction``: share of tensors scaled down. A non-finite global norm changes no statistic.
    """

    def __init__(
        self, threshold: float, relative_threshold: float = 1.05, beta: float = 0.98, warmup_steps: int = 100
    ) -> None:
        self.threshold, self.relative, self.beta, self.warmup = (
            threshold,
            relative_threshold,
            beta,
            warmup_steps,
        )
        self.steps = 0
        self.gamma: list[float] | None = None

    def __call__(self, grads: list[Tensor], band: float) -> list[Outcome]:
        norms = [p_norm([g], 2.0) for g in grads]
        norm = p_norm(grads, 2.0)
        gamma = self.gamma if self.gamma is not None else [math.inf] * len(grads)
        warm = self.steps < self.warmup
        if warm:
            ratio = self.threshold / (norm + NORM_EPS)
            coefs = [min(1.0, ratio)] * len(grads)
            sure = maybe = 0
            if norm > 0:
                sure, maybe = (len(grads), len(grads)) if ratio < 1 - band else (0, 0)
                if abs(ratio - 1) <= band or abs(norm - self.threshold) <= 2e-6:
                    sure, maybe = 0, len(grads)
        else:
            caps = [self.relative * g for g in gamma]
            coefs = [cap / n if n > cap else 1.0 for n, cap in zip(norms, caps, strict=True)]
            sure = sum(n > cap * (1 + band) for n, cap in zip(norms, caps, strict=True))
            maybe = sum(n > cap * (1 - band) for n, cap in zip(norms, caps, strict=True))
        clipped_norms = [n * c for n, c in zip(norms, coefs, strict=True)]
        if math.isfinite(norm):
            self.steps += 1
            if warm:
                self.gamma = [min(g, c) for g, c in zip(gamma, clipped_norms, strict=True)]
            else:
                self.gamma = [
                    self.beta * g + (1 - self.beta) * c for g, c in zip(gamma, clipped_norms, strict=True)
                ]
        total = max(1, len(grads))
        after = [g * c for g, c in zip(grads, coefs, strict=True)]
        return [
            Outcome(after, norm, math.sqrt(sum(c * c for c in clipped_norms)), (sure / total, maybe / total))
        ]


def adagc_reference(
    tensor_norms: Sequence[Sequence[float]], lam_abs: float, lam_rel: float, beta: float, warmup: int
) -> tuple[list[list[float]], list[list[float]]]:
    """AdaGC on per-tensor norms alone (``tensor_norms[t][i]``): every step's per-tensor coefficients and
    the gammas after it (the first step's clipped norms start them)."""
    gamma: list[float] = []
    coefs, gammas = [], []
    for step, norms in enumerate(tensor_norms):
        if step < warmup:
            h = cap_coef(math.sqrt(sum(a * a for a in norms)), lam_abs)
            step_coefs = [h] * len(norms)
            clipped = [a * h for a in norms]
            gamma = clipped if step == 0 else [min(g, c) for g, c in zip(gamma, clipped, strict=True)]
        else:
            step_coefs = [
                lam_rel * g / a if a > lam_rel * g else 1.0 for a, g in zip(norms, gamma, strict=True)
            ]
            clipped = [a * c for a, c in zip(norms, step_coefs, strict=True)]
            gamma = [beta * g + (1 - beta) * c for g, c in zip(gamma, clipped, strict=True)]
        coefs.append(step_coefs)
        gammas.append(gamma)
    return coefs, gammas


# ---- spike skipping (skip_spikes) --------------------------------------------------------------------


class SpikeReference:
    """``skip_spikes=k`` (gradclip_algo/spikes.py): with the window holding the last ``spike_window`` finite
    global L2 norms, a step is skipped when the window holds at least ``max(2, spike_window // 2)`` norms and
    ``n > mean + k·std`` (sample std, ddof 1) of the window before this step, or when n is not finite;
    every finite norm then enters the window. A skipped step sets every grad to ``None``;
    its stats are ``(n, 0, 1, skipped=True)``."""

    def __init__(self, limit: float, window: int = 128) -> None:
        self.limit, self.window = limit, window
        self.norms: deque[float] = deque(maxlen=window)

    def __call__(self, grads: list[Tensor], band: float) -> tuple[bool, bool, float]:
        """``(spike, ambiguous, n)`` for this step; records n."""
        norm = p_norm(grads, 2.0)
        return (*self.judge(norm, band), norm)

    def judge(self, norm: float, band: float = 0.0) -> tuple[bool, bool]:
        """``(spike, ambiguous)`` for a step of global norm ``norm``; records it."""
        spike, ambiguous = not math.isfinite(norm), False
        if math.isfinite(norm) and len(self.norms) >= max(2, self.window // 2):
            mean = sum(self.norms) / len(self.norms)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.norms) / (len(self.norms) - 1))
            limit = mean + self.limit * std
            spike = norm > limit
            # the window's std is an fp32 square root: near 0 it is off by ~sqrt(eps)·mean
            ambiguous = abs(norm - limit) <= band * norm + self.limit * 3e-4 * mean
        if math.isfinite(norm):
            self.norms.append(norm)
        return spike, ambiguous


def spike_reference(norms: Sequence[float], limit: float, window: int) -> list[bool]:
    """Whether each step of global norm ``norms[t]`` is skipped (:class:`SpikeReference` on norms alone)."""
    judge = SpikeReference(limit, window)
    return [judge.judge(norm)[0] for norm in norms]
