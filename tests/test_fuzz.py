"""Differential fuzz tests of the functional core: float64 references and torch's own clipping as oracles.

Every clipping type is run on random model-like parameter lists (0-D to 4-D tensors whose sizes sit on and
around the size constants where the code changes path, four dtypes, strided grads, empty and shared
tensors, ``None`` grads, per-tensor magnitudes from 1e-30 to 1e30) and compared with

- a float64 reference of its rule, written from the rule's docstring (never by calling library code):
  the grads after clipping and every :class:`ClipStats` field, always; a finite float64 norm must never
  give zeroed grads;
- ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` where torch's own norm is finite (norm: same
  norm, same grads, and whether ``error_if_nonfinite=True`` raises; value: bit for bit).

The pieces live in their own modules: the float64 references of every rule in tests/references.py, the
strategies and the cases they draw in tests/fuzz_strategies.py, the tolerances, the comparison with a
reference and the torch oracle in tests/fuzz_checks.py. This file holds the tests, and the glue from a
drawn case to its reference.

Runs: ``make test`` uses the bounded ``ci`` profile, seeded by the torch version (so its two suites draw
different examples, and each the same ones every run); ``make fuzz`` (``HYPOTHESIS_PROFILE=fuzz``) runs
thousands of random examples per test. Cases that failed once are pinned at the bottom as plain tests.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from fuzz_checks import (
    assert_matches_one,
    coef_rtol,
    crash,
    mismatch,
    stat_mismatch,
    torch_norm_clip,
    underflow_atol,
)
from fuzz_strategies import (
    FP32_SQUARE_SAFE_EXP,
    FP32_SUM_SAFE_EXP,
    FoldCase,
    StatefulCase,
    StatelessCase,
    TensorSpec,
    all_finite,
    flat_to_index,
    float64_grads,
    fold_cases,
    grad_values,
    make_params,
    stateful_cases,
    stateless_cases,
    total_numel,
    twins,
    with_grads,
)
from hypothesis import HealthCheck, given, seed, settings
from references import (
    AdaGCReference,
    Outcome,
    QuantileReference,
    SpikeReference,
    ZScoreReference,
    adaptive_reference,
    norm_reference,
    p_norm,
    skipped_outcome,
    value_reference,
)
from torch import Tensor, nn

from gradclip_algo import (
    ClipStats,
    GradientClipper,
    NonFiniteGradError,
    apply_gradient_clipping,
    compiled,
)
from gradclip_algo.folding import factor_is_foldable

# The C++ warning that the packing bug prints before it breaks: any resize of an ``out=`` tensor is a bug.
pytestmark = pytest.mark.filterwarnings("error:An output with one or more elements was resized")

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    database=None,
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
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
TORCH_SEED = int("".join(torch.__version__.split("+")[0].split(".")[:2]))
"""The ``ci`` profile's seed: fixed for a torch version and different between versions, so that the two
runs of ``make test`` (torch 2.13 and 2.7) draw different examples, each run the same ones every time."""


def fuzz(examples: int | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """The fuzz profile's settings; under ``ci``, with :data:`TORCH_SEED` and at most ``examples``."""
    profile = settings.get_profile(PROFILE)

    def apply(test: Callable[..., None]) -> Callable[..., None]:
        if PROFILE != "ci":
            return settings(profile)(test)
        bounded = settings(profile, max_examples=examples or profile.max_examples)
        return seed(TORCH_SEED)(bounded(test))

    return apply


@pytest.fixture(autouse=True, scope="module")
def _eager_kernels() -> Iterator[None]:
    """The eager kernels here; tests/test_compiled_kernels.py fuzzes the compiled ones with these cases."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled, "_devices", ())
        yield


# =========================================================================================================
# Fuzz tests
# =========================================================================================================


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
            # twice its spacing times each grad (torch's may round to 0 where the library's does not)
            extra, slack = 0.0, 0.0
            halves = [p.dtype for p in params if p.dtype.itemsize < 4]
            if halves:
                info = torch.finfo(torch.bfloat16 if torch.bfloat16 in halves else torch.float16)
                spacing = float(info.smallest_normal) * float(info.eps)
                extra, slack = 2 * float(info.eps), 2 * spacing * before[i].to(torch.float64).abs()
            why = mismatch(param.grad, want.to(torch.float64), rtol + extra, f"grad {i} vs torch", slack)
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


@fuzz()
@given(case=stateless_cases())
def test_stateless_types_match_float64_reference_and_torch(case: StatelessCase) -> None:
    """'norm', 'value' and 'adaptive' on random parameter lists, every nonfinite mode, with and without stats."""
    run_stateless(case)


@fuzz()
@given(case=stateless_cases(scale_exps=(-8, 8), plain=True, types=("norm",)))
def test_norm_at_moderate_magnitudes(case: StatelessCase) -> None:
    """'norm' at magnitudes where no fp32 sum of squares overflows, with stats: the shapes and sizes alone
    (against torch and the reference), so that other bugs do not hide theirs."""
    run_stateless(case)


@fuzz()
@given(case=stateless_cases(inject=True))
def test_nonfinite_modes_on_injected_inf_and_nan(case: StatelessCase) -> None:
    """inf/NaN written into some grads: 'error' raises and leaves the grads alone, 'skip' drops every grad,
    'zero' zeroes the non-finite elements and clips the rest, 'propagate' matches torch."""
    run_stateless(case)


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


@fuzz()
@given(case=stateful_cases())
def test_stateful_types_match_float64_reference_loop(case: StatefulCase) -> None:
    """'quantile', 'zscore', 'adagc' and ``skip_spikes`` over 3-8 steps of varying grads, every step's grads
    and stats against the reference loop (up to the first decision within rounding of its threshold)."""

    # fp16 grads stay finite here (the non-finite modes have their own test), and no float32 sum
    # overflows or underflows over the steps: scale exponents capped
    def capped(spec: TensorSpec) -> int:
        if spec.dtype == torch.float16:
            return min(spec.scale_exp, -3)
        if spec.dtype != torch.float64:
            lowest = FP32_SQUARE_SAFE_EXP - min(case.step_exps)
            return max(min(spec.scale_exp, FP32_SUM_SAFE_EXP - max(case.step_exps)), lowest)
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


@fuzz(examples=20)  # the interleavings of folding are the state machine's (tests/test_fold_machine.py)
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
    sums in order, in float32). Both norms are now sums over rows of 4,096 elements, within 4e-6 of float64
    (1.6e-6 here; torch's own norm of the clamped grad is off by 8.7e-6)."""
    gen = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.zeros(16381))
    param.grad = torch.randn(2 * 16381, generator=gen)[::2]
    want = param.grad.double()
    stats = apply_gradient_clipping([param], "value", 0.1)
    assert float(stats.grad_norm) == pytest.approx(float(want.norm()), rel=4e-6)
    assert float(stats.clipped_grad_norm) == pytest.approx(float(want.clamp(-0.1, 0.1).norm()), rel=4e-6)


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


def test_pinned_fp16_coefficient_below_half_the_smallest_subnormal() -> None:
    """fp16 grads of norm 33,956 clipped to 0.001: torch rounds its coefficient (2.9e-8) to fp16, where it is
    below half the smallest subnormal, and zeroes the grads; the library's coefficient is float32 and the
    grads end at norm 0.001. The fuzz compared with torch's zeros by a tolerance relative to them."""
    grad = (torch.randn(8, generator=torch.Generator().manual_seed(0)) * 1e4).half()
    ours, theirs = (
        nn.Parameter(torch.zeros(8, dtype=torch.float16)),
        nn.Parameter(torch.zeros(8, dtype=torch.float16)),
    )
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    nn.utils.clip_grad_norm_([theirs], 0.001)
    stats = apply_gradient_clipping([ours], "norm", 0.001)
    assert stats is not None and float(stats.grad_norm) == pytest.approx(
        float(grad.double().norm()), rel=1e-3
    )
    assert not theirs.grad.any()
    assert float(ours.grad.double().norm()) == pytest.approx(0.001, rel=1e-3)
