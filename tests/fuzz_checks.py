"""How the differential fuzz (tests/test_fuzz.py) judges a call: tolerances, the comparison of the grads
and :class:`ClipStats` after a call with the float64 :class:`~references.Outcome` of its rule, and
torch's own ``clip_grad_norm_`` as a second oracle.

Tolerance model: the library accumulates norms in fp32 (fp64 for fp64 grads) and returns fp32 statistics,
so a coefficient carries the relative error of an fp32 sum over N elements, :func:`coef_rtol`; a grad is
compared in its own dtype after rounding the float64 expectation to it (one more ulp of that dtype).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from fuzz_strategies import twins
from references import Outcome
from torch import Tensor, nn

from gradclip_algo import ClipStats

FP32_EPS = 2.0**-24  # unit roundoff of fp32, the accumulation type of the library's norms


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


# =========================================================================================================
# Comparison with the float64 reference
# =========================================================================================================


def mismatch(
    actual: Tensor, expected64: Tensor, rtol: float, what: str, slack: Tensor | float = 0.0
) -> str | None:
    """Why ``actual`` is not ``expected64`` rounded to ``actual``'s dtype within ``rtol`` + one ulp (and the
    absolute ``slack``, per element or for all); None if it is (NaN matches NaN, inf matches the same inf)."""
    if actual.shape != expected64.shape:
        return f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected64.shape)}"
    ulp, atol = grad_tolerances(actual.dtype)
    want = expected64.to(actual.dtype).to(torch.float64)
    got = actual.detach().to(torch.float64)
    bound = atol + slack + (rtol + ulp) * want.abs()
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
