"""Differential fuzz tests of the functional core: float64 references and torch's own clipping as oracles.

Every clipping type is run on random model-like parameter lists (0-D to 4-D tensors whose sizes sit on and
around the size constants where the code changes path, four dtypes, strided grads, empty and shared
tensors, ``None`` grads, per-tensor magnitudes from 1e-30 to 1e30) and compared with

- a float64 reference of its rule, written from the rule's docstring (never by calling library code):
  the grads after clipping and every :class:`ClipStats` field, always; a finite float64 norm must never
  give zeroed grads;
- ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` where torch's own norm is finite (norm: same
  norm, same grads, and whether ``error_if_nonfinite=True`` raises; value: bit for bit).

Tolerance model: the library accumulates norms in fp32 (fp64 for fp64 grads) and returns fp32 statistics,
so a coefficient carries the relative error of an fp32 sum over N elements, :func:`coef_rtol`; a grad is
compared in its own dtype after rounding the float64 expectation to it (one more ulp of that dtype).

Runs: ``make test`` uses the bounded, derandomized ``ci`` profile; ``make fuzz`` (``HYPOTHESIS_PROFILE=fuzz``)
runs thousands of examples per test. Cases that failed once are pinned at the bottom as plain tests.
"""

from __future__ import annotations

import math
import os
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass, field, replace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from gradclip_algo import (
    ClipStats,
    GradientClipper,
    NonFiniteGradError,
    apply_gradient_clipping,
    kernels,
)

# ---------------------------------------------------------------------------------------------------------
# The sizes where the implementation changes code path (kernels.SIZE_LIMITS: the CPU dot/aminmax/clamp
# threshold, the pack buffer, the AGC stack and row-block sizes, and the total numel at which the pack buffer
# (1/MEMORY_SHARE of the total) reaches the dot threshold); AGC stacks tensors of numel * 4 <= its buffer.
from gradclip_algo.folding import factor_is_foldable

BOUNDARY_SIZES: tuple[int, ...] = tuple(sorted({*kernels.SIZE_LIMITS, kernels.STACK_NUMEL // 4}))
BOUNDARY_OFFSETS = (-3, -2, -1, 0, 1, 2, 3)  # every boundary size is drawn this many elements either side
FP32_SUM_SAFE_EXP = 9
"""Grads that are not float64 are drawn at most 10^9 · N(0, 1): then no float32 sum of |g|^p (p <= 3) over
the sizes drawn here overflows. Beyond that the library, like torch, sums in float32 and its norm is inf;
that regime is pinned below (test_pinned_float32_overflow_is_torchs)."""
LARGE_NUMEL = 1 << 19  # boundary sizes from here on are drawn for at most one tensor in ~10 % of models
# ---------------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NORM_EPS = 1e-6  # added to the norm in every coefficient λ / (‖G‖ + 1e-6), as torch does
NONFINITE_MODES = ("propagate", "error", "skip", "zero")
FP32_EPS = 2.0**-24  # unit roundoff of fp32, the accumulation type of the library's norms

# The C++ warning that the packing bug prints before it breaks: any resize of an ``out=`` tensor is a bug.
pytestmark = pytest.mark.filterwarnings("error:An output with one or more elements was resized")

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=3000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci")))


# =========================================================================================================
# float64 references
# =========================================================================================================


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


def norm_reference(grads: list[Tensor], threshold: float, norm_type: float, band: float) -> list[Outcome]:
    """'norm': ``g ← g · min(1, λ / (‖G‖_p + 1e-6))``, λ = ``threshold`` (:func:`threshold_reference`)."""
    return threshold_reference(grads, p_norm(grads, norm_type), threshold, band)


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


def threshold_reference(grads: list[Tensor], norm: float, tau: float, band: float) -> list[Outcome]:
    """The clip at a threshold τ of 'norm' and the statistics-driven rules: every grad · ``min(1, τ / (‖G‖
    + 1e-6))`` (torch's factor: continuous in ‖G‖, and below 1 already for ``τ - 1e-6 < ‖G‖ ≤ τ``), and
    the step counts as clipped where ``‖G‖ > τ``; within ``band`` of τ it may count either way."""
    outcome = coef_outcome(grads, min(1.0, tau / (norm + NORM_EPS)), norm)
    near = math.isfinite(tau) and abs(norm - tau) <= band * max(norm, tau)
    outcome.fraction = (float(norm > tau and not near), float(norm > tau or near))
    return [outcome]


def percentile(values: list[float], q: float) -> float:
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
        return spike, ambiguous, norm


def skipped_outcome(norm: float) -> Outcome:
    return Outcome(None, norm, 0.0, (1.0, 1.0), skipped=True)


# =========================================================================================================
# Tolerances
# =========================================================================================================


def coef_rtol(numel: int, norm_type: float = 2.0) -> float:
    """Relative error of a norm (and of a coefficient λ / ‖G‖) accumulated in fp32 over ``numel`` elements.

    Calibrated on torch's own fp32 ``vector_norm`` (about ``numel / 2600`` units of roundoff at 4M
    elements) with a margin; ``p < 1`` raises the power sum to ``1/p > 1``, which multiplies its error.
    For p other than 2 the library's power sums are torch's foreach norm, whose power sums of half-precision
    grads measured up to ``numel / 115`` units (bf16, p = 0.5, 16,381 elements: 142 units; 65,533: 395),
    hence ``numel / 64`` there; ``make fuzz`` found both, against ``64 + numel / 256``.
    """
    slope = 256 if norm_type == 2.0 else 64
    return FP32_EPS * (192 + numel / slope) * max(1.0, 1.0 / norm_type)


def underflow_atol(numel: int, norm_type: float) -> float:
    """Absolute error of a p-norm whose fp32 power sum loses elements below the smallest normal (as torch's
    own fp32 norm does); it never matters to the grads (the coefficient is 1 for norms far below λ)."""
    if math.isinf(norm_type):
        return 0.0
    return (numel * 2.0**-126) ** (1.0 / norm_type) + 2.0**-149


def grad_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """``(ulp, atol)``: one rounding of the grad's dtype, and one spacing of its subnormals (twice)."""
    info = torch.finfo(dtype)
    return float(info.eps), 2 * float(info.smallest_normal) * float(info.eps)


def mismatch(actual: Tensor, expected64: Tensor, rtol: float, what: str) -> str | None:
    """Why ``actual`` is not ``expected64`` rounded to ``actual``'s dtype within ``rtol`` + one ulp; None if
    it is (NaN matches NaN, inf matches the same inf)."""
    if actual.shape != expected64.shape:
        return f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected64.shape)}"
    ulp, atol = grad_tolerances(actual.dtype)
    want = expected64.to(actual.dtype).to(torch.float64)
    got = actual.detach().to(torch.float64)
    bound = atol + (rtol + ulp) * want.abs()
    ok = ((got - want).abs() <= bound) | (got == want) | (got.isnan() & want.isnan())
    if bool(ok.all()):
        return None
    index = int((~ok).reshape(-1).nonzero()[0])
    return (
        f"{what} ({actual.dtype}, shape {tuple(actual.shape)}): {int((~ok).sum())} of {ok.numel()} elements "
        f"differ, first at flat index {index}: got {got.reshape(-1)[index].item()!r}, expected "
        f"{want.reshape(-1)[index].item()!r} (float64 {expected64.reshape(-1)[index].item()!r}, rtol {rtol:.2e})"
    )


def stat_mismatch(actual: Tensor, expected: float, rtol: float, atol: float, what: str) -> str | None:
    """Why the statistic ``actual`` is neither the float64 ``expected`` rounded to fp32 (inf above fp32's max)
    nor, if it is held in a wider dtype, ``expected`` itself."""
    got = float(actual)
    want = float(torch.tensor(expected, dtype=torch.float32))
    if got == want or (math.isnan(got) and math.isnan(want)):
        return None
    if math.isfinite(want) and math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want):
        return None
    if math.isfinite(got) and abs(got - expected) <= atol + rtol * abs(expected):  # a wider statistic
        return None
    return f"{what}: got {got!r}, expected {want!r} (float64 {expected!r}, rtol {rtol:.2e}, atol {atol:.2e})"


class GradsDiffer(AssertionError):
    """The grads after the call are not the reference's."""


class StatsDiffer(AssertionError):
    """The grads are right, but a ClipStats field is not."""


class ReturnDiffers(AssertionError):
    """The call returned the wrong kind of thing (None for stats, or stats for ``with_stats=False``)."""


_CRASH_KINDS: dict[str, type[AssertionError]] = {}


def crash(error: Exception, context: str) -> AssertionError:
    """An AssertionError for an exception the library raised, of a class per kind of message (numbers and
    shapes masked): hypothesis then reports crashes with different messages as distinct bugs, even when they
    come from one line of the library."""
    message = re.sub(r"[-0-9]+", "N", re.sub(r"\[[^\]]*\]", "[...]", str(error)))
    key = f"{type(error).__name__}: {message[:160]}"
    kind = _CRASH_KINDS.setdefault(
        key, type(f"Crash{len(_CRASH_KINDS)}", (AssertionError,), {"__doc__": key})
    )
    return kind(f"{context}: the call raised {type(error).__name__}: {error}")


def flag_mismatch(stats: ClipStats, outcome: Outcome) -> tuple[type[AssertionError], list[str]] | None:
    """``with_stats='clipped'`` on 'value': NaN norms (not measured; a call that finds no grads returns
    ``ClipStats.empty()``, zeros), and a ``clipped_fraction`` of 1.0 exactly where the reference clipped an
    element (either where the reference norm is NaN: a max holding NaN reads false)."""
    problems = []
    norms = (float(stats.grad_norm), float(stats.clipped_grad_norm))
    empty = outcome.grad_norm == 0 and norms == (0.0, 0.0)
    if not (empty or all(math.isnan(norm) for norm in norms)):
        problems.append(f"norms: got {norms}, expected NaN (not measured)")
    low, high = outcome.fraction
    either = math.isnan(outcome.grad_norm) or low == 0 < high
    allowed = {0.0, 1.0} if either else {float(low > 0)}
    if float(stats.clipped_fraction) not in allowed:
        problems.append(f"clipped flag: got {float(stats.clipped_fraction)}, expected one of {allowed}")
    return (StatsDiffer, problems) if problems else None


def outcome_mismatch(
    params: list[nn.Parameter],
    stats: ClipStats | None,
    outcome: Outcome,
    rtol: float,
    atol: float,
    with_stats: bool | str = True,
    flag_only: bool = False,
) -> tuple[type[AssertionError], list[str]] | None:
    """The first kind of difference between the state after the call and ``outcome``, with every
    difference of that kind; None if they match."""
    grads = []
    if outcome.grads is None:
        grads = [f"grad {i}: not None on a skipped step" for i, p in enumerate(params) if p.grad is not None]
    else:
        for i, (param, want) in enumerate(zip(params, outcome.grads, strict=True)):
            if param.grad is None:
                grads.append(f"grad {i}: None, expected a clipped grad")
            elif (why := mismatch(param.grad, want, rtol, f"grad {i}")) is not None:
                grads.append(why)
    if grads:
        return GradsDiffer, grads
    if not with_stats and not outcome.skipped:
        return None if stats is None else (ReturnDiffers, [f"with_stats=False returned {stats!r}"])
    if stats is None:
        return ReturnDiffers, ["no ClipStats returned"]
    if flag_only and not outcome.skipped:
        return flag_mismatch(stats, outcome)
    problems = []
    if bool(stats.skipped) != outcome.skipped:
        problems.append(f"skipped: got {stats.skipped}, expected {outcome.skipped}")
    # the norm after clipping is that of grads rounded to their dtype: one more ulp of the coarsest one
    ulp = max((grad_tolerances(p.dtype)[0] for p in params), default=0.0)
    for what, value, tol in (
        ("grad_norm", outcome.grad_norm, rtol),
        ("clipped_grad_norm", outcome.clipped_grad_norm, rtol + ulp),
    ):
        if (why := stat_mismatch(getattr(stats, what), value, tol, atol, what)) is not None:
            problems.append(why)
    low, high = outcome.fraction
    fraction = float(stats.clipped_fraction)
    if not low * (1 - 1e-6) - 1e-7 <= fraction <= high * (1 + 1e-6) + 1e-7:
        problems.append(f"clipped_fraction: got {fraction!r}, expected within [{low!r}, {high!r}]")
    return (StatsDiffer, problems) if problems else None


def assert_matches_one(
    params: list[nn.Parameter],
    stats: ClipStats | None,
    outcomes: list[Outcome],
    rtol: float,
    atol: float,
    with_stats: bool | str = True,
    context: str = "",
    flag_only: bool = False,
) -> None:
    """The call's result matches one of ``outcomes`` (several where a decision is within rounding).

    Each kind of difference raises its own exception type, so that hypothesis reports grads, stats and
    return-value failures as distinct bugs.
    """
    reports = [outcome_mismatch(params, stats, o, rtol, atol, with_stats, flag_only) for o in outcomes]
    if any(r is None for r in reports):
        return
    kind, problems = reports[0]
    raise kind(f"{context}: differs from the float64 reference:\n  " + "\n  ".join(problems[:8]))


# =========================================================================================================
# Strategies: random model-like parameter lists
# =========================================================================================================


@dataclass(frozen=True)
class TensorSpec:
    """One parameter: grads ``N(0, 1)·10^scale_exp`` drawn in float64 and cast to ``dtype`` (so fp16 may hold
    inf and 0), weights ``N(0, 1)·10^weight_exp`` (``None``: zeros, AGC's ε floor). ``layout``:
    'contiguous', 'transposed' (a transposed view, 2+ dims) or 'sliced' (every other element of the last dim)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    scale_exp: int
    weight_exp: int | None
    layout: str
    has_grad: bool
    seed: int


@dataclass(frozen=True)
class ModelSpec:
    """Parameters passed as ``form`` ('list', 'pairs', 'iterator', 'module' or 'tensor'), in ``order``
    (indices into ``tensors``; a repeated index passes one Parameter twice)."""

    tensors: tuple[TensorSpec, ...]
    order: tuple[int, ...]
    form: str


def shape_for(draw: st.DrawFn, numel: int, ndim: int) -> tuple[int, ...]:
    """A shape of ``ndim`` dims (0-D only for one element) and exactly ``numel`` elements: dims split off
    as random divisors."""
    if ndim == 0:
        return ()
    if numel == 0:
        dims = [draw(st.integers(1, 5)) for _ in range(ndim)]
        dims[draw(st.integers(0, ndim - 1))] = 0
        return tuple(dims)
    dims, rest = [], numel
    for _ in range(ndim - 1):
        divisors = [d for d in range(1, math.isqrt(rest) + 1) if rest % d == 0]
        divisors += [rest // d for d in divisors]
        d = draw(st.sampled_from(sorted(set(divisors))))
        dims.append(d)
        rest //= d
    dims.append(rest)
    return tuple(draw(st.permutations(dims)))


def draw_numel(draw: st.DrawFn, allow_large: bool) -> int:
    """Small (30 %), a boundary size ± a few (40 %), or a size between boundaries (log-uniform from
    256, 30 %); sizes from ``LARGE_NUMEL`` on only when allowed."""
    kind = draw(st.integers(0, 9))
    if kind < 3:
        return draw(st.integers(0, 40))
    if kind >= 7:
        exponent = draw(st.integers(8, LARGE_NUMEL.bit_length() - 2))
        return draw(st.integers(1 << exponent, 2 << exponent))
    sizes = [s for s in BOUNDARY_SIZES if allow_large or s < LARGE_NUMEL]
    return max(0, draw(st.sampled_from(sizes)) + draw(st.sampled_from(BOUNDARY_OFFSETS)))


@st.composite
def tensor_specs(
    draw: st.DrawFn, dtype: torch.dtype | None, allow_large: bool, scale_exps: tuple[int, int]
) -> TensorSpec:
    numel = draw_numel(draw, allow_large)
    ndim = 0 if numel == 1 and draw(st.booleans()) else draw(st.integers(1, 4))
    shape = shape_for(draw, numel, ndim)
    layouts = ["contiguous", "sliced"] if ndim >= 1 else ["contiguous"]
    if ndim >= 2:
        layouts.append("transposed")
    dtype = dtype if dtype is not None else draw(st.sampled_from(FLOAT_DTYPES))
    high = scale_exps[1] if dtype == torch.float64 else min(scale_exps[1], FP32_SUM_SAFE_EXP)
    return TensorSpec(
        shape=shape,
        dtype=dtype,
        scale_exp=draw(st.integers(min(scale_exps[0], high), high)),
        weight_exp=draw(st.one_of(st.none(), st.integers(-3, 3))),
        layout=draw(st.sampled_from(layouts)),
        has_grad=draw(st.integers(0, 9)) > 0,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def model_specs(
    draw: st.DrawFn, scale_exps: tuple[int, int] = (-30, 30), max_tensors: int = 6, large: bool = True
) -> ModelSpec:
    """1..``max_tensors`` tensors, one dtype or mixed, at most one of ``LARGE_NUMEL`` or more elements
    (none unless ``large``)."""
    count = draw(st.integers(1, max_tensors))
    dtype = None if draw(st.booleans()) else draw(st.sampled_from(FLOAT_DTYPES))
    large_at = draw(st.integers(0, 9 * count)) if large and draw(st.integers(0, 9)) == 9 else -1
    tensors = tuple(draw(tensor_specs(dtype, i == large_at, scale_exps)) for i in range(count))
    order = list(range(count))
    if draw(st.integers(0, 4)) == 0:  # a shared tensor: the same Parameter passed twice
        order.insert(draw(st.integers(0, count)), draw(st.integers(0, count - 1)))
    forms = ["list", "pairs", "iterator", "module"] + (["tensor"] if count == 1 and len(order) == 1 else [])
    return ModelSpec(tensors, tuple(order), draw(st.sampled_from(forms)))


def grad_values(spec: TensorSpec, scale_exp: int, seed: int) -> Tensor:
    """A grad for ``spec`` in its layout: allocated in the grad's dtype, then viewed (transposed/sliced)."""
    gen = torch.Generator().manual_seed(seed)
    shape = list(spec.shape)
    if spec.layout == "transposed":
        shape[-2], shape[-1] = shape[-1], shape[-2]
    elif spec.layout == "sliced":
        shape[-1] *= 2
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**scale_exp).to(spec.dtype)
    if spec.layout == "transposed":
        return values.transpose(-1, -2)
    if spec.layout == "sliced":
        return values[..., ::2]
    return values


def make_params(model: ModelSpec) -> tuple[list[nn.Parameter], Callable[[], Any]]:
    """The distinct parameters (in first-use order), and a function that makes the ``parameters`` argument
    passing them in ``model.form`` (afresh each call: an iterator is spent after one use)."""
    distinct: list[nn.Parameter] = []
    for spec in model.tensors:
        gen = torch.Generator().manual_seed(spec.seed + 1)
        weight = torch.zeros(spec.shape, dtype=torch.float64)
        if spec.weight_exp is not None:
            weight = torch.randn(spec.shape, generator=gen, dtype=torch.float64) * 10.0**spec.weight_exp
        param = nn.Parameter(weight.to(spec.dtype))
        if spec.has_grad:
            param.grad = grad_values(spec, spec.scale_exp, spec.seed)
        distinct.append(param)
    passed = [distinct[i] for i in model.order]
    module = nn.Module()
    for k, param in enumerate(passed):
        module.register_parameter(f"p{k}", param)
    forms: dict[str, Callable[[], Any]] = {
        "list": lambda: passed,
        "pairs": lambda: [(f"p{i}", distinct[i]) for i in model.order],
        "iterator": lambda: iter(passed),
        "tensor": lambda: passed[0],
        "module": lambda: module,
    }
    return distinct, forms[model.form]


def with_grads(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.grad is not None]


def float64_grads(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad.detach().to(torch.float64) for p in params]


def total_numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def twins(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Independent copies (weights and grads) for torch's clipping."""
    copies = []
    for param in params:
        copy = nn.Parameter(param.detach().clone())
        copy.grad = param.grad.detach().clone()
        copies.append(copy)
    return copies


def flat_to_index(position: int, shape: torch.Size) -> tuple[int, ...]:
    """The index of element ``position`` of a tensor of ``shape`` in row-major order."""
    index = []
    for size in reversed(shape):
        position, rest = divmod(position, size)
        index.append(rest)
    return tuple(reversed(index))


def all_finite(grads: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads)


# =========================================================================================================
# Torch oracle
# =========================================================================================================


@dataclass
class TorchResult:
    """torch's ``clip_grad_norm_`` on copies: its total norm and grads, and whether
    ``error_if_nonfinite=True`` raised (then ``grads`` are its untouched copies)."""

    norm: float
    grads: list[Tensor]
    raises: bool = False
    grads_after_raise: list[Tensor] = field(default_factory=list)


def torch_norm_clip(params: list[nn.Parameter], threshold: float, norm_type: float) -> TorchResult | None:
    """torch's clipping of copies of ``params`` (None where torch itself cannot run on them)."""
    copies = twins(params)
    try:
        norm = torch.nn.utils.clip_grad_norm_(copies, threshold, norm_type)
    except RuntimeError:  # e.g. an inf-norm of empty tensors in some versions
        return None
    result = TorchResult(float(norm), [c.grad for c in copies])
    strict = twins(params)
    try:
        torch.nn.utils.clip_grad_norm_(strict, threshold, norm_type, error_if_nonfinite=True)
    except RuntimeError as error:
        assert "non-finite" in str(error)
        result.raises = True
    result.grads_after_raise = [c.grad for c in strict]
    return result


# =========================================================================================================
# Fuzz tests
# =========================================================================================================


@dataclass(frozen=True)
class StatelessCase:
    model: ModelSpec
    clipping_type: str
    threshold: float
    norm_type: float
    eps: float | None
    nonfinite: str
    error_if_nonfinite: bool
    with_stats: bool | str
    inject: tuple[
        tuple[int, int, float], ...
    ]  # (tensor index, flat position, inf/-inf/NaN) written into grads


@st.composite
def thresholds(draw: st.DrawFn) -> float:
    return draw(st.sampled_from([1.0, 2.5, 7.0])) * 10.0 ** draw(st.integers(-3, 3))


@st.composite
def stateless_cases(
    draw: st.DrawFn,
    inject: bool = False,
    scale_exps: tuple[int, int] = (-30, 30),
    plain: bool = False,
    types: tuple[str, ...] = ("norm", "value", "adaptive", "norm"),
) -> StatelessCase:
    """A stateless call; ``plain``: with stats and no nonfinite handling (so that other bugs do not hide
    the crashes behind them)."""
    model = draw(model_specs(scale_exps=scale_exps))
    clipping_type = draw(st.sampled_from(types))
    nonfinite = "propagate" if plain else draw(st.sampled_from(NONFINITE_MODES))
    injected = []
    if inject:
        for _ in range(draw(st.integers(1, 3))):
            index = draw(st.integers(0, len(model.tensors) - 1))
            numel = math.prod(model.tensors[index].shape)
            if numel and model.tensors[index].has_grad:
                value = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
                injected.append((index, draw(st.integers(0, numel - 1)), value))
    return StatelessCase(
        model=model,
        clipping_type=clipping_type,
        threshold=draw(thresholds()),
        norm_type=draw(st.sampled_from([2.0, 1.0, math.inf, 3.0, 0.5])),
        eps=draw(st.one_of(st.none(), st.sampled_from([1e-6, 1e-3, 0.1]))),
        nonfinite=nonfinite,
        error_if_nonfinite=not plain and nonfinite in ("propagate", "error") and draw(st.booleans()),
        with_stats=True if plain else draw(st.sampled_from([True, True, True, False, "clipped"])),
        inject=tuple(injected),
    )


def call_options(case: StatelessCase) -> dict[str, Any]:
    options: dict[str, Any] = {"nonfinite": case.nonfinite}
    if case.error_if_nonfinite:
        options["error_if_nonfinite"] = True
    if case.clipping_type == "norm":
        options["norm_type"] = case.norm_type
    if case.clipping_type == "adaptive" and case.eps is not None:
        options["eps"] = case.eps
    return options


def stateless_reference(
    case: StatelessCase, params: list[nn.Parameter], grads: list[Tensor]
) -> list[Outcome] | None:
    """The float64 outcomes of ``case`` on ``grads`` (float64 copies of ``params``' grads); ``None`` where
    no rule is defined (non-finite grads left to propagate)."""
    mode = "error" if case.error_if_nonfinite else case.nonfinite
    finite = all_finite(grads)
    if not finite and mode == "error":
        return [Outcome(grads, raises=True)]
    if not finite and mode == "skip":
        return [skipped_outcome(p_norm(grads, case.norm_type if case.clipping_type == "norm" else 2.0))]
    if not finite and mode == "propagate":
        return None
    if mode == "zero":
        grads = [g.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) for g in grads]
    rtol = coef_rtol(total_numel(params), case.norm_type)
    if case.clipping_type == "norm":
        return norm_reference(grads, case.threshold, case.norm_type, rtol)
    if case.clipping_type == "value":
        bands = [2 * float(torch.finfo(p.dtype).eps) for p in params]
        return value_reference(grads, case.threshold, bands)
    weights = [p.detach().to(torch.float64) for p in params]
    eps = 1e-3 if case.eps is None else case.eps
    return adaptive_reference(grads, weights, case.threshold, eps, rtol)


def run_stateless(case: StatelessCase) -> None:
    """Build the case, run the library, and compare with the float64 reference and with torch."""
    distinct, argument = make_params(case.model)
    for index, position, value in case.inject:
        grad = distinct[index].grad
        assert grad is not None
        grad[flat_to_index(position, grad.shape)] = value  # also through a strided view
    params = with_grads(distinct)
    before = [p.grad.detach().clone() for p in params]
    grads = float64_grads(params)
    outcomes = stateless_reference(case, params, grads)
    oracle = None
    if case.clipping_type == "norm" and case.nonfinite in ("propagate", "error"):
        oracle = torch_norm_clip(params, case.threshold, case.norm_type)
    value_oracle = None
    if (
        case.clipping_type == "value"
        and case.nonfinite == "propagate"
        and not case.error_if_nonfinite
        and params
    ):
        copies = twins(params)
        torch.nn.utils.clip_grad_value_(copies, case.threshold)
        value_oracle = [c.grad for c in copies]

    options = call_options(case)
    raised = None
    try:
        stats = apply_gradient_clipping(
            argument(), case.clipping_type, case.threshold, with_stats=case.with_stats, **options
        )
    except NonFiniteGradError as error:
        raised, stats = error, None
    except Exception as error:
        raise crash(error, f"{case.clipping_type} λ={case.threshold} {options}") from error
    context = f"{case.clipping_type} λ={case.threshold} {options}"

    # torch: its norm where finite, whether error_if_nonfinite raises where its norm is not finite
    if oracle is not None and math.isfinite(oracle.norm):
        assert raised is None, f"{context}: raised {raised!r} where torch's norm {oracle.norm} is finite"
        rtol = 2 * coef_rtol(total_numel(params), case.norm_type)
        for i, (param, want) in enumerate(zip(params, oracle.grads, strict=True)):
            # torch takes the norm of fp16/bf16 grads in their dtype and rounds its coefficient to it: two
            # more ulps of the coarsest half dtype for every grad (the total norm, hence the coefficient of
            # fp32 grads too, carries that rounding), and where the coefficient is subnormal in that dtype,
            # its spacing relative to the coefficient
            extra = 0.0
            halves = [p.dtype for p in params if p.dtype.itemsize < 4]
            if halves:
                info = torch.finfo(torch.bfloat16 if torch.bfloat16 in halves else torch.float16)
                coef = min(1.0, case.threshold / (oracle.norm + NORM_EPS))
                spacing = float(info.smallest_normal) * float(info.eps)
                extra = 2 * float(info.eps) + 2 * spacing / max(coef, spacing)
            why = mismatch(param.grad, want.to(torch.float64), rtol + extra, f"grad {i} vs torch")
            assert why is None, f"{context}: {why}"
        if stats is not None and not any(p.dtype.itemsize < 4 for p in params):
            atol = underflow_atol(total_numel(params), case.norm_type)
            why = stat_mismatch(stats.grad_norm, oracle.norm, rtol, atol, "grad_norm vs torch")
            assert why is None, f"{context}: {why}"
    strict = case.nonfinite == "error" or case.error_if_nonfinite
    if oracle is not None and oracle.raises and strict and not all_finite(grads):
        # torch raised for inf/NaN grads: so must the library, leaving them alone
        assert raised is not None, f"{context}: torch raised for non-finite grads, the library did not"
        for i, (param, want) in enumerate(zip(params, oracle.grads_after_raise, strict=True)):
            assert torch.equal(param.grad.nan_to_num(), want.nan_to_num()), f"{context}: grad {i} changed"
    if value_oracle is not None:
        for i, (param, want) in enumerate(zip(params, value_oracle, strict=True)):
            assert torch.equal(param.grad.nan_to_num(), want.nan_to_num()), (
                f"{context}: grad {i} is not torch's clip_grad_value_ bit for bit"
            )

    # the float64 reference
    if outcomes is None:
        return
    if outcomes[0].raises:
        assert raised is not None, f"{context}: non-finite grads and no NonFiniteGradError"
        for i, (param, was) in enumerate(zip(params, before, strict=True)):
            same = torch.equal(param.grad.nan_to_num(), was.nan_to_num()) and torch.equal(
                param.grad.isnan(), was.isnan()
            )
            assert same, f"{context}: grad {i} changed by a call that raised"
        return
    assert raised is None, (
        f"{context}: raised {raised!r}; the grads are {'' if all_finite(grads) else 'not '}finite"
    )
    numel = total_numel(params)
    p = case.norm_type if case.clipping_type == "norm" else 2.0
    flag_only = case.with_stats == "clipped" and case.clipping_type == "value"
    assert_matches_one(
        params,
        stats,
        outcomes,
        coef_rtol(numel, p),
        underflow_atol(numel, p),
        case.with_stats,
        context,
        flag_only,
    )


@FUZZ
@given(case=stateless_cases())
def test_stateless_types_match_float64_reference_and_torch(case: StatelessCase) -> None:
    """'norm', 'value' and 'adaptive' on random parameter lists, every nonfinite mode, with and without stats."""
    run_stateless(case)


@FUZZ
@given(case=stateless_cases(scale_exps=(-8, 8), plain=True, types=("norm",)))
def test_norm_at_moderate_magnitudes(case: StatelessCase) -> None:
    """'norm' at magnitudes where no fp32 sum of squares overflows, with stats: the shapes and sizes alone
    (against torch and the reference), so that other bugs do not hide theirs."""
    run_stateless(case)


@FUZZ
@given(case=stateless_cases(inject=True))
def test_nonfinite_modes_on_injected_inf_and_nan(case: StatelessCase) -> None:
    """inf/NaN written into some grads: 'error' raises and leaves the grads alone, 'skip' drops every grad,
    'zero' zeroes the non-finite elements and clips the rest, 'propagate' matches torch."""
    run_stateless(case)


@dataclass(frozen=True)
class StatefulCase:
    model: ModelSpec
    clipping_type: str
    threshold: float
    options: tuple[tuple[str, Any], ...]
    skip_spikes: float | None
    spike_window: int
    step_exps: tuple[int, ...]  # every grad of step t is N(0, 1)·10^(scale_exp + step_exps[t])


@st.composite
def stateful_cases(draw: st.DrawFn) -> StatefulCase:
    model = draw(model_specs(scale_exps=(-20, 20), max_tensors=4, large=False))
    clipping_type = draw(st.sampled_from(["quantile", "zscore", "adagc", "norm", "value", "adaptive"]))
    options: list[tuple[str, Any]] = []
    if clipping_type == "quantile":
        options = [
            ("percentile", draw(st.sampled_from([10.0, 1.0, 50.0, 90.0, 100.0]))),
            ("window", draw(st.integers(2, 6))),
        ]
    elif clipping_type == "zscore":
        options = [
            ("alpha", draw(st.sampled_from([0.97, 0.5, 0.1]))),
            ("z_threshold", draw(st.sampled_from([2.5, 1.0, 0.5]))),
            ("warmup_steps", draw(st.integers(2, 4))),
        ]
    elif clipping_type == "adagc":
        options = [
            ("relative_threshold", draw(st.sampled_from([1.05, 0.5, 2.0]))),
            ("beta", draw(st.sampled_from([0.98, 0.5]))),
            ("warmup_steps", draw(st.integers(1, 3))),
        ]
    stateless = clipping_type in ("norm", "value", "adaptive")
    skip_spikes = draw(st.sampled_from([1.0, 3.0])) if stateless or draw(st.booleans()) else None
    steps = draw(st.integers(3, 8))
    return StatefulCase(
        model=model,
        clipping_type=clipping_type,
        threshold=draw(st.one_of(thresholds(), st.just(math.inf))) if not stateless else draw(thresholds()),
        options=tuple(options),
        skip_spikes=skip_spikes,
        spike_window=draw(st.integers(4, 6)),
        step_exps=tuple(draw(st.integers(-2, 6)) for _ in range(steps)),
    )


def stateful_rule_reference(
    case: StatefulCase, params: list[nn.Parameter]
) -> Callable[[list[Tensor], float], list[Outcome]]:
    options = dict(case.options)
    if case.clipping_type == "quantile":
        return QuantileReference(case.threshold, **options)
    if case.clipping_type == "zscore":
        return ZScoreReference(case.threshold, **options)
    if case.clipping_type == "adagc":
        return AdaGCReference(case.threshold, **options)
    if case.clipping_type == "norm":
        return lambda grads, band: norm_reference(grads, case.threshold, 2.0, band)
    if case.clipping_type == "value":
        bands = [2 * float(torch.finfo(p.dtype).eps) for p in params]
        return lambda grads, band: value_reference(grads, case.threshold, bands)
    weights = [p.detach().to(torch.float64) for p in params]
    return lambda grads, band: adaptive_reference(grads, weights, case.threshold, 1e-3, band)


@FUZZ
@given(case=stateful_cases())
def test_stateful_types_match_float64_reference_loop(case: StatefulCase) -> None:
    """'quantile', 'zscore', 'adagc' and ``skip_spikes`` over 3-8 steps of varying grads, every step's grads
    and stats against the reference loop (up to the first decision within rounding of its threshold)."""

    # fp16 grads stay finite here (the non-finite modes have their own test), and no float32 sum
    # overflows over the steps: scale exponents capped
    def capped(spec: TensorSpec) -> int:
        if spec.dtype == torch.float16:
            return min(spec.scale_exp, -3)
        if spec.dtype != torch.float64:
            return min(spec.scale_exp, FP32_SUM_SAFE_EXP - max(case.step_exps))
        return spec.scale_exp

    model = replace(case.model, tensors=tuple(replace(t, scale_exp=capped(t)) for t in case.model.tensors))
    distinct, argument = make_params(model)
    specs = [s for s, p in zip(model.tensors, distinct, strict=True) if p.grad is not None]
    params = with_grads(distinct)
    options = dict(case.options)
    if case.skip_spikes is not None:
        options.update(skip_spikes=case.skip_spikes, spike_window=case.spike_window)
    clipper = GradientClipper(case.clipping_type, case.threshold, **options)
    rule = stateful_rule_reference(case, params)
    spikes = SpikeReference(case.skip_spikes, case.spike_window) if case.skip_spikes is not None else None
    rtol = 4 * coef_rtol(total_numel(params))
    atol = underflow_atol(total_numel(params), 2.0)
    for step, step_exp in enumerate(case.step_exps):
        for spec, param in zip(specs, params, strict=True):
            param.grad = grad_values(spec, spec.scale_exp + step_exp, spec.seed + 7919 * step)
        grads = float64_grads(params)
        spike = ambiguous_spike = False
        if spikes is not None:
            spike, ambiguous_spike, norm = spikes(grads, rtol)
        if spike and not ambiguous_spike:
            outcomes = [skipped_outcome(norm)]
        else:
            outcomes = rule(grads, rtol)
            if ambiguous_spike:
                outcomes.append(skipped_outcome(norm))
        try:
            stats = clipper(argument())
        except Exception as error:
            raise crash(error, f"{clipper!r}, step {step}") from error
        assert_matches_one(params, stats, outcomes, rtol, atol, context=f"{clipper!r}, step {step}")
        if len(outcomes) > 1:  # a decision within rounding: the states may part from here on
            return


# =========================================================================================================
# Pinned failures: cases the fuzz found, as plain tests
# =========================================================================================================


def linear_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 1))
    model(torch.randn(8, 100)).square().sum().backward()
    return model


def assert_same_as_torch_norm(model: nn.Module, threshold: float, norm_type: float, **options: Any) -> None:
    params = with_grads(list(model.parameters()))
    oracle = torch_norm_clip(params, threshold, norm_type)
    assert oracle is not None and math.isfinite(oracle.norm)
    stats = apply_gradient_clipping(model, "norm", threshold, norm_type=norm_type, **options)
    assert stats is not None
    assert float(stats.grad_norm) == pytest.approx(oracle.norm, rel=1e-5)
    for param, want in zip(params, oracle.grads, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=0)


@dataclass(frozen=True)
class FoldCase:
    model: ModelSpec
    norm_type: float
    threshold: float
    nonfinite: str
    nan_step: int | None


@st.composite
def fold_cases(draw: st.DrawFn) -> FoldCase:
    """Parameter lists the fused optimizers take (float32 and float64; no shared tensor), norm clipping
    at a drawn p and threshold, and maybe a NaN grad on one step with ``nonfinite='skip'``."""
    model = draw(model_specs(scale_exps=(-4, 4), max_tensors=5, large=False))
    tensors = tuple(
        TensorSpec(t.shape, draw(st.sampled_from([torch.float32, torch.float64])), *astuple(t)[2:])
        for t in model.tensors
    )
    nonfinite = draw(st.sampled_from(["propagate", "skip"]))
    return FoldCase(
        ModelSpec(tensors, tuple(range(len(tensors))), draw(st.sampled_from(["list", "pairs", "module"]))),
        norm_type=draw(st.sampled_from([1.0, 2.0, math.inf])),
        threshold=draw(thresholds()),
        nonfinite=nonfinite,
        nan_step=draw(st.sampled_from([None, 1, 2])) if nonfinite == "skip" else None,
    )


@FUZZ
@given(case=fold_cases())
def test_folded_into_fused_adamw_matches_rescaling(case: FoldCase) -> None:
    """``fold_into`` against the unfolded clip on the same drawn parameters and grads, 3 AdamW steps: the
    same stats, weights within rounding, and a skipped step (NaN grad, from the second step on when the
    optimizer has state) bitwise untouched in both runs."""
    runs = []
    for fold in (False, True):
        params, passed = make_params(case.model)
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
        clipper = GradientClipper(
            "norm",
            case.threshold,
            norm_type=case.norm_type,
            nonfinite=case.nonfinite,
            fold_into=optimizer if fold else None,
        )
        runs.append((params, passed, optimizer, clipper))
    for step in range(3):
        outcomes = []
        for params, passed, optimizer, clipper in runs:
            for spec, param in zip(case.model.tensors, params, strict=True):
                if spec.has_grad:
                    param.grad = grad_values(spec, spec.scale_exp, spec.seed + step)
            filled = [p for p in params if p.grad is not None and p.numel()]
            if step == case.nan_step and filled:
                filled[0].grad[(0,) * filled[0].ndim] = float("nan")
            before = [p.detach().clone() for p in params]
            stats = clipper(passed())
            optimizer.step()
            assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
            skipped = stats is not None and bool(stats.skipped)
            if skipped:
                for old, param in zip(before, params, strict=True):
                    assert torch.equal(old, param.detach())
            outcomes.append((stats, skipped))
        (plain, plain_skipped), (folded, folded_skipped) = outcomes
        assert plain_skipped == folded_skipped, step
        if plain is None or folded is None:
            assert plain is None and folded is None
            continue
        grads = [p.grad for p in runs[1][0] if p.grad is not None]
        dense = all(g.is_contiguous() for g in grads)
        foldable = dense and factor_is_foldable(case.threshold, case.norm_type)
        foldable &= all(g.dtype != torch.float64 for g in grads)
        # the factor folds exactly where every grad is contiguous, none is float64 and 1/c cannot overflow
        # float32 (a skip may fold without them)
        if grads and not folded_skipped and (foldable or case.nonfinite == "propagate"):
            assert folded.folded == foldable
        for name in ("grad_norm", "clipped_grad_norm", "clipped_fraction"):
            torch.testing.assert_close(
                getattr(folded, name), getattr(plain, name), rtol=1e-6, atol=0, equal_nan=True
            )
        for a, b in zip(runs[1][0], runs[0][0], strict=True):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_pinned_linear_100x100_default_norm_call(norm_type: float) -> None:
    """A 100x100 weight (10,000 elements, between the old 4,096-element pack block and the dot threshold) broke the packing:
    ``RuntimeError: shape '[-1, 100]' is invalid for input of size 4096``."""
    assert_same_as_torch_norm(linear_model(), 1.0, norm_type)


def test_pinned_conv2d_16_32_3_norm_call() -> None:
    """A Conv2d(16, 32, 3) weight (4,608 elements, one pack of its own) hit the same packing bug."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 4, 3))
    model(torch.randn(2, 16, 8, 8)).square().sum().backward()
    assert_same_as_torch_norm(model, 1.0, 2.0)


@pytest.mark.parametrize(
    ("clipping_type", "options"),
    [("quantile", {}), ("zscore", {}), ("norm", {"skip_spikes": 3.0})],
)
def test_pinned_linear_100x100_stateful_first_step(clipping_type: str, options: dict[str, Any]) -> None:
    """The statistics-driven types and spike skipping take the same global norm (the packing bug): their
    first step must measure it and leave the grads alone (quantile: τ is this norm itself, zscore: warm-up
    under λ = inf, spikes: nothing judged yet, under λ = 1e9)."""
    model = linear_model()
    before = [p.grad.clone() for p in model.parameters()]
    want = p_norm(before, 2.0)
    threshold = 1e9 if clipping_type == "norm" else math.inf
    stats = GradientClipper(clipping_type, threshold, **options)(model)
    assert stats is not None
    assert float(stats.grad_norm) == pytest.approx(want, rel=1e-5)
    for param, was in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(param.grad, was, rtol=1e-6, atol=0)


def huge_fp64_params(value: float, numel: int) -> list[nn.Parameter]:
    param = nn.Parameter(torch.zeros(numel, dtype=torch.float64))
    param.grad = torch.full((numel,), value, dtype=torch.float64)
    return [param]


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
def test_pinned_fp64_grads_of_2e22_are_clipped_not_zeroed(error_if_nonfinite: bool) -> None:
    """Ten fp64 grads of 2e22: ‖G‖ = 6.3246e22 (Σg² = 4e45 overflows fp32); torch clips them to 0.3162 and
    does not raise. They were zeroed, with grad_norm inf."""
    params = huge_fp64_params(2e22, 10)
    oracle = torch_norm_clip(params, 1.0, 2.0)
    assert oracle is not None and not oracle.raises
    stats = apply_gradient_clipping(params, "norm", 1.0, error_if_nonfinite=error_if_nonfinite)
    assert stats is not None
    assert float(stats.grad_norm) == pytest.approx(6.324555e22, rel=1e-6)
    assert float(stats.clipped_grad_norm) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(params[0].grad, oracle.grads[0], rtol=1e-6, atol=0)
    assert float(params[0].grad[0]) == pytest.approx(1 / math.sqrt(10), rel=1e-6)


@pytest.mark.parametrize("norm_type", [math.inf, 1.0])
def test_pinned_fp64_grad_of_2e200_is_clipped_not_zeroed(norm_type: float) -> None:
    """One fp64 element of 2e200 among small ones: ‖G‖ = 2e200 (beyond fp32: grad_norm is inf), but the
    grads must be clipped as torch does (the big one to λ), not zeroed."""
    param = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    param.grad = torch.tensor([2e200, 1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    oracle = torch_norm_clip([param], 1.0, norm_type)
    assert oracle is not None and math.isfinite(oracle.norm)
    stats = apply_gradient_clipping([param], "norm", 1.0, norm_type=norm_type)
    assert stats is not None
    norm = float(stats.grad_norm)
    assert norm == math.inf or norm == pytest.approx(2e200, rel=1e-6)  # 2e200 as fp32, or in a wider dtype
    torch.testing.assert_close(param.grad, oracle.grads[0], rtol=1e-6, atol=0)
    assert float(param.grad[0]) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("nonfinite", ["error", "skip"])
def test_pinned_finite_grad_of_1e20_is_not_nonfinite(nonfinite: str) -> None:
    """A finite fp64 grad of 1e20 (its square overflows fp32) is neither an error nor a skip: it is clipped."""
    param = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    param.grad = torch.tensor([1e20, 0.0, 0.0], dtype=torch.float64)
    stats = apply_gradient_clipping([param], "norm", 1.0, nonfinite=nonfinite)
    assert stats is not None and not stats.skipped
    assert param.grad is not None
    assert float(stats.grad_norm) == pytest.approx(1e20, rel=1e-6)
    torch.testing.assert_close(
        param.grad, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pinned_float32_overflow_is_torchs(dtype: torch.dtype) -> None:
    """Grads summed in float32 (fp32, bf16) whose sum of squares overflows it (1e20 here): as torch, the norm
    is inf and the grads become 0; with ``nonfinite='error'`` (or ``error_if_nonfinite``) the call raises,
    as torch's does, saying that finite grads overflowed, and leaves them alone; 'skip' skips the step."""
    grad = torch.tensor([1e20, 1.0, 0.0]).to(dtype)
    param, reference = nn.Parameter(torch.zeros(3, dtype=dtype)), nn.Parameter(torch.zeros(3, dtype=dtype))
    param.grad, reference.grad = grad.clone(), grad.clone()
    stats = apply_gradient_clipping([param], "norm", 1.0)
    norm = torch.nn.utils.clip_grad_norm_([reference], 1.0)
    assert math.isinf(float(stats.grad_norm)) and math.isinf(float(norm))
    assert torch.equal(param.grad, reference.grad)
    param.grad = grad.clone()
    with pytest.raises(NonFiniteGradError, match="every gradient element is finite: it overflows"):
        apply_gradient_clipping([param], "norm", 1.0, error_if_nonfinite=True)
    assert torch.equal(param.grad, grad)
    assert apply_gradient_clipping([param], "norm", 1.0, nonfinite="skip").skipped
    assert param.grad is None


def test_pinned_with_stats_false_returns_none_without_grads() -> None:
    """``with_stats=False`` returns None; with no grads at all it returned ``ClipStats.empty()``."""
    param = nn.Parameter(torch.zeros(3))
    assert apply_gradient_clipping([param], "norm", 1.0, with_stats=False) is None
    assert param.grad is None


def test_pinned_clipped_flag_without_grads_is_empty_stats() -> None:
    """``with_stats='clipped'`` with no grads at all returns ``ClipStats.empty()`` (zero norms, nothing
    clipped), as the full statistics do: the fuzz's flag checker expected NaN norms there."""
    param = nn.Parameter(torch.zeros(1))
    stats = apply_gradient_clipping([param, param], "value", 1.0, with_stats="clipped", nonfinite="skip")
    assert stats is not None and stats.as_dict() == ClipStats.empty().as_dict()
    assert param.grad is None


def test_pinned_value_norms_of_a_long_strided_grad() -> None:
    """'value' on a strided fp32 grad of 16,381 elements (every other one of a buffer), most of them
    clamped to ±0.1: its norm after clipping was off by 1.9e-5 (torch's reduction over a strided tensor
    sums in order, in float32); both norms now within 1e-6 of float64."""
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(16381))
    param.grad = torch.randn(2 * 16381, generator=gen)[::2]
    want = param.grad.double()
    stats = apply_gradient_clipping([param], "value", 0.1)
    assert float(stats.grad_norm) == pytest.approx(float(want.norm()), rel=1e-6)
    assert float(stats.clipped_grad_norm) == pytest.approx(float(want.clamp(-0.1, 0.1).norm()), rel=1e-6)


@pytest.mark.parametrize("shape", [(1, 0), (3, 0, 2)])
def test_pinned_value_stats_on_empty_grad_with_zero_trailing_dim(shape: tuple[int, ...]) -> None:
    """'value' with stats on an empty grad whose trailing dims hold a 0 raised ``RuntimeError: cannot reshape
    tensor of 0 elements into shape [-1, 0]`` (packing by shape)."""
    empty = nn.Parameter(torch.zeros(shape))
    empty.grad = torch.zeros(shape)
    other = nn.Parameter(torch.zeros(3))
    other.grad = torch.tensor([3.0, -0.5, -4.0])
    stats = apply_gradient_clipping([empty, other], "value", 1.0)
    assert stats is not None
    assert torch.equal(other.grad, torch.tensor([1.0, -0.5, -1.0]))
    assert float(stats.grad_norm) == pytest.approx(math.sqrt(25.25), rel=1e-6)
    assert float(stats.clipped_fraction) == pytest.approx(2 / 3, rel=1e-6)


def test_pinned_1d_grad_between_block_and_dot_sizes() -> None:
    """A 1-D fp32 grad of 16,381 elements (above the old 4,096-element pack block, below the dot threshold) got a pack larger than
    the packing buffer: torch warned "An output with one or more elements was resized" (an error here)."""
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(16381))
    param.grad = torch.randn(16381, generator=gen)
    want = float(param.grad.double().norm())
    stats = apply_gradient_clipping([param], "norm", 1e9)
    assert stats is not None
    assert float(stats.grad_norm) == pytest.approx(want, rel=1e-5)
