"""'quantile', 'zscore' and 'adagc' against float64 references of their papers' rules, step by step.

The references are in tests/references.py; the rules across ranks are in tests/distributed_cases_layouts.py
(``SETTINGS``: every type on every parallel set-up)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import pytest
import torch
from conftest import Guard
from references import NORM_EPS as EPS
from references import adagc_reference, autoclip_caps, autoclip_reference, zclip_reference
from torch import nn

from gradclip_algo import GradientClipper

SHAPES = [(4, 3), (5,), (2, 2, 2)]
SHARES = [3 / 13, 4 / 13, 12 / 13]  # each tensor's share of the global norm (squares sum to 1)


# Conversions of a tensor to a Python value: each one waits for the device.
def make_params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(shape)) for shape in SHAPES]


def unit_directions(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    directions = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]
    return [d / d.norm() for d in directions]


def set_grads(params: list[nn.Parameter], tensor_norms: Sequence[float]) -> list[torch.Tensor]:
    """Grads with the given per-tensor L2 norms; returns them in float64."""
    wanted = [d * a for d, a in zip(unit_directions(), tensor_norms, strict=True)]
    for param, grad in zip(params, wanted, strict=True):
        param.grad = grad.float()
    return [p.grad.double() for p in params]


def assert_scaled(params: list[nn.Parameter], before: list[torch.Tensor], coefs: Sequence[float]) -> None:
    for param, grad, coef in zip(params, before, coefs, strict=True):
        torch.testing.assert_close(param.grad.double(), grad * coef, rtol=2e-6, atol=1e-9)


def run_global(
    clipper: GradientClipper,
    norms: Sequence[float],
    expected_coefs: Sequence[float],
    no_host_sync: Guard,
    thresholds: Sequence[float] | None = None,
) -> None:
    """Step through global norms ``norms``; each step every grad must be scaled by its expected coef (and
    ``ClipStats.threshold`` be the expected one), with no host sync (``no_host_sync``: the guard of
    ``conftest.py``)."""
    params = make_params()
    for step, (norm, coef) in enumerate(zip(norms, expected_coefs, strict=True)):
        before = set_grads(params, [norm * share for share in SHARES])
        with no_host_sync():
            stats = clipper(params)
        assert_scaled(params, before, [coef] * len(params))
        assert stats.clipped_fraction.item() == float(coef < 1.0), f"step {step}"
        torch.testing.assert_close(stats.grad_norm.double(), torch.tensor(norm, dtype=torch.float64))
        if thresholds is not None:
            assert stats.threshold is not None
            assert stats.threshold.item() == pytest.approx(thresholds[step], rel=1e-5), f"step {step}"


# ---- the rules against them ----------------------------------------------------------------------------

NORMS = [1.0, 1.3, 0.8, 1.1, 6.0, 0.9, 1.2, 40.0, 1.0, 0.7, 1.05, 3.0, 1.1]


@pytest.mark.parametrize(
    ("percentile_p", "window", "ceiling"), [(10, 4, math.inf), (50, 5, 2.0), (90, 100, 1.0)]
)
def test_quantile_matches_autoclip(
    percentile_p: float, window: int, ceiling: float, no_host_sync: Guard
) -> None:
    clipper = GradientClipper("quantile", ceiling, percentile=percentile_p, window=window)
    coefs = autoclip_reference(NORMS, percentile_p, window, ceiling)
    run_global(clipper, NORMS, coefs, no_host_sync, autoclip_caps(NORMS, percentile_p, window, ceiling))


def test_quantile_first_step_is_not_clipped_and_history_holds_the_norms(no_host_sync: Guard) -> None:
    clipper = GradientClipper("quantile", math.inf, window=3)
    run_global(
        clipper, [5.0, 1.0, 2.0, 7.0], autoclip_reference([5.0, 1.0, 2.0, 7.0], 10, 3, math.inf), no_host_sync
    )
    state = clipper.state_dict()["rule"]
    assert state["count"].item() == 4
    assert sorted(state["norms"].tolist()) == pytest.approx([1.0, 2.0, 7.0])


@pytest.mark.parametrize(("warmup", "ceiling"), [(3, math.inf), (4, 1.2), (2, 50.0)])
def test_zscore_matches_zclip(warmup: int, ceiling: float, no_host_sync: Guard) -> None:
    clipper = GradientClipper("zscore", ceiling, warmup_steps=warmup)
    coefs, states = zclip_reference(NORMS, ceiling, 0.97, 2.5, warmup)
    params = make_params()
    for step, (norm, coef, (mean, var)) in enumerate(zip(NORMS, coefs, states, strict=True)):
        before = set_grads(params, [norm * share for share in SHARES])
        with no_host_sync():
            stats = clipper(params)
        assert_scaled(params, before, [coef] * len(params))
        # the norm above which the step clips: mu + z_t (sigma + eps) of the statistics before, capped
        previous_mean, previous_var = states[step - 1] if step else (math.nan, math.nan)
        boundary = previous_mean + 2.5 * (math.sqrt(previous_var) + EPS) if step >= warmup else math.inf
        assert stats.threshold is not None
        assert stats.threshold.item() == pytest.approx(min(boundary, ceiling), rel=1e-5)
        state = clipper.state_dict()["rule"]
        assert state["step"].item() == step + 1
        assert state["mean"].item() == pytest.approx(mean, rel=1e-5)
        assert state["var"].item() == pytest.approx(var, rel=1e-4, abs=1e-9)


def test_zscore_clips_an_outlier_below_the_plain_mu_plus_z_sigma_bound(no_host_sync: Guard) -> None:
    """The reciprocal rule: tau = mu + z_t^2 sigma / z < mu + z_t sigma, and a larger spike is cut harder."""
    norms = [1.0, 1.2, 0.8, 1.1, 0.9]
    coefs, states = zclip_reference([*norms, 10.0], math.inf, 0.97, 2.5, 5)
    mean, var = states[4]
    clipped = 10.0 * coefs[-1]
    assert mean < clipped < mean + 2.5 * math.sqrt(var)
    clipper = GradientClipper("zscore", math.inf, warmup_steps=5)
    run_global(clipper, [*norms, 10.0], coefs, no_host_sync)


@pytest.mark.parametrize(("warmup", "lam_abs"), [(3, 2.0), (1, math.inf), (5, 1.5)])
def test_adagc_matches_reference(warmup: int, lam_abs: float, no_host_sync: Guard) -> None:
    gen = torch.Generator().manual_seed(1)
    tensor_norms = (0.5 + torch.rand(12, len(SHAPES), generator=gen, dtype=torch.float64)).tolist()
    tensor_norms[1][2] = 4.0  # a spike during warm-up (global clipping)
    tensor_norms[7][0] = 9.0  # and after it (that tensor alone)
    tensor_norms[9] = [3.0, 3.0, 3.0]
    coefs, gammas = adagc_reference(tensor_norms, lam_abs, 1.05, 0.98, warmup)
    clipper = GradientClipper("adagc", lam_abs, warmup_steps=warmup)
    params = make_params()
    for step, (norms, step_coefs, gamma) in enumerate(zip(tensor_norms, coefs, gammas, strict=True)):
        before = set_grads(params, norms)
        with no_host_sync():
            stats = clipper(params)
        assert_scaled(params, before, step_coefs)
        got = clipper.state_dict()["rule"]["gamma"].double()
        torch.testing.assert_close(got, torch.tensor(gamma, dtype=torch.float64), rtol=1e-5, atol=0)
        clipped = sum(c < 1.0 for c in step_coefs) / len(step_coefs)
        assert stats.clipped_fraction.item() == pytest.approx(clipped), f"step {step}"
        want_norm = math.sqrt(sum((a * c) ** 2 for a, c in zip(norms, step_coefs, strict=True)))
        assert stats.clipped_grad_norm.item() == pytest.approx(want_norm, rel=1e-5)


def test_adagc_refuses_a_changing_set_of_tensors() -> None:
    clipper = GradientClipper("adagc", 1.0)
    params = make_params()
    set_grads(params, [1.0, 1.0, 1.0])
    clipper(params)
    params[1].grad = None
    with pytest.raises(ValueError, match=r"adagc.*tracked 3 tensors and now got 2"):
        clipper(params)


@pytest.mark.parametrize("clipping_type", ["quantile", "zscore", "adagc"])
def test_nonfinite_norm_leaves_the_statistics_untouched(clipping_type: str) -> None:
    clipper = GradientClipper(
        clipping_type, 10.0, **({} if clipping_type == "quantile" else {"warmup_steps": 2})
    )
    params = make_params()
    for norm in [1.0, 2.0, 1.5]:
        set_grads(params, [norm * share for share in SHARES])
        clipper(params)
    before = clipper.state_dict()
    params[0].grad[0, 0] = math.nan
    clipper(params)
    after = clipper.state_dict()
    for key, value in before["rule"].items():
        assert torch.equal(value, after["rule"][key]) or torch.equal(
            value.isnan(), after["rule"][key].isnan()
        )


# ---- state, checkpoints, API ---------------------------------------------------------------------------

CASES = [
    ("quantile", math.inf, {"window": 4}),
    ("zscore", 5.0, {"warmup_steps": 3}),
    ("adagc", 2.0, {"warmup_steps": 3}),
    ("norm", 2.0, {"skip_spikes": 3.0, "spike_window": 4}),
]


@pytest.mark.parametrize(("clipping_type", "threshold", "options"), CASES)
def test_state_dict_round_trip_continues_bitwise(clipping_type: str, threshold: float, options: dict) -> None:
    """A clipper restored from a saved state (weights_only load) clips exactly as the original does."""
    gen = torch.Generator().manual_seed(2)
    sequence = (0.5 + torch.rand(14, len(SHAPES), generator=gen)).tolist()
    sequence[9] = [8.0, 0.1, 9.0]
    original = GradientClipper(clipping_type, threshold, **options)
    params = make_params()
    for norms in sequence[:6]:
        set_grads(params, norms)
        original(params)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = GradientClipper(clipping_type, threshold, **options)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    twin = make_params()
    for norms in sequence[6:]:
        set_grads(params, norms)
        set_grads(twin, norms)
        stats, restored_stats = original(params), restored(twin)
        assert stats.skipped == restored_stats.skipped
        for got, want in zip(twin, params, strict=True):
            assert (got.grad is None and want.grad is None) or torch.equal(got.grad, want.grad)
    for part, state in original.state_dict().items():
        for key, value in state.items():
            assert torch.equal(restored.state_dict()[part][key], value)


@pytest.mark.parametrize(
    ("clipping_type", "options"),
    [("quantile", {"window": 8}), ("norm", {"skip_spikes": 3.0, "spike_window": 8})],
    ids=["quantile", "skip_spikes"],
)
def test_a_window_not_yet_full_holds_no_nan_and_old_nan_checkpoints_still_load(
    clipping_type: str, options: dict
) -> None:
    """Composer's resumption test compares a state with ``allclose`` without ``equal_nan``: a state must
    equal its copy before its window is full. Checkpoints written with NaN in the empty slots load."""
    original = GradientClipper(clipping_type, math.inf if clipping_type == "quantile" else 1.0, **options)
    params = make_params()
    for norms in ([1.0, 2.0, 0.5], [0.7, 0.3, 1.1], [2.0, 1.0, 1.0]):
        set_grads(params, norms)
        original(params)
    saved = original.state_dict()
    for part in saved.values():
        for value in part.values():
            assert value.allclose(value.clone(), rtol=0, atol=0)  # no NaN anywhere
    old = {name: dict(part) for name, part in saved.items()}
    history = old["rule" if clipping_type == "quantile" else "spikes"]
    history["norms"] = history["norms"].clone()
    history["norms"][3:] = math.nan  # 3 norms recorded; the slots after them as they were written before
    restored = GradientClipper(clipping_type, math.inf if clipping_type == "quantile" else 1.0, **options)
    restored.load_state_dict(old)
    for name, part in restored.state_dict().items():
        for key, value in part.items():
            assert torch.equal(value, saved[name][key]), (name, key)


def test_state_dict_is_a_snapshot_and_empty_for_stateless_types() -> None:
    assert GradientClipper("norm", 1.0).state_dict() == {}
    clipper = GradientClipper("zscore", 1.0)
    params = make_params()
    set_grads(params, [1.0, 1.0, 1.0])
    clipper(params)
    saved = clipper.state_dict()
    set_grads(params, [2.0, 2.0, 2.0])
    clipper(params)
    assert saved["rule"]["step"].item() == 1


@pytest.mark.parametrize(
    ("clipping_type", "state", "message"),
    [
        (
            "zscore",
            {"rule": {"step": torch.tensor(1)}},
            r"state.rule: expected keys mean, step, var, got step",
        ),
        (
            "quantile",
            {"rule": {"norms": torch.zeros(5), "count": torch.tensor(1)}},
            r"state.rule.norms: .*\(1000,\)",
        ),
        ("norm", {"rule": {"step": torch.tensor(1)}}, r"clipping_type='norm' keeps none"),
        ("zscore", {"spikes": {}}, r"holds a spike window, but skip_spikes is not set"),
        ("zscore", {"ema": {}}, r"state: unknown key\(s\) ema; allowed: rule, spikes"),
    ],
)
def test_load_state_dict_refuses_other_settings(clipping_type: str, state: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientClipper(clipping_type, 1.0).load_state_dict(state)


def _trained(clipping_type: str, **options: object) -> GradientClipper:
    clipper = GradientClipper(clipping_type, 1.0, **options)
    params = make_params()
    for norms in ([1.0, 1.0, 1.0], [2.0, 1.0, 0.5], [1.0, 3.0, 1.0]):
        set_grads(params, norms)
        clipper(params)
    return clipper


def _with(state: dict, part: str, key: str, value: object) -> dict:
    changed = {name: dict(values) for name, values in state.items()}
    changed[part][key] = value
    return changed


@pytest.mark.parametrize(
    ("clipping_type", "options", "part", "key", "value", "message"),
    [
        (
            "zscore",
            {},
            "rule",
            "mean",
            torch.tensor(math.nan, dtype=torch.float64),
            r"state.rule.mean: expected a finite number >= 0, got nan",
        ),
        (
            "zscore",
            {},
            "rule",
            "var",
            torch.tensor(-1.0, dtype=torch.float64),
            r"state.rule.var: expected a finite number >= 0, got -1.0",
        ),
        (
            "zscore",
            {},
            "rule",
            "step",
            torch.tensor(-3),
            r"state.rule.step: expected an integer >= 0, got -3",
        ),
        (
            "zscore",
            {},
            "rule",
            "step",
            3,
            r"state.rule.step: expected a torch.int64 tensor of shape \(\), got 3",
        ),
        ("zscore", {}, "rule", "step", torch.tensor(2.5), r"state.rule.step: expected a torch.int64 tensor"),
        (
            "adagc",
            {},
            "rule",
            "gamma",
            torch.tensor([1.0, math.nan, 1.0], dtype=torch.float64),
            r"state.rule.gamma: expected numbers >= 0",
        ),
        ("adagc", {}, "rule", "step", torch.tensor(-1), r"state.rule.step: expected an integer >= 0, got -1"),
        (
            "quantile",
            {"window": 4},
            "rule",
            "count",
            torch.tensor(-2),
            r"state.rule.count: expected an integer >= 0",
        ),
        (
            "quantile",
            {"window": 4},
            "rule",
            "norms",
            torch.tensor([1.0, math.nan, 2.0, math.nan], dtype=torch.float64),
            r"state.rule.norms: the 3 recorded norms must be finite and >= 0",
        ),
        (
            "norm",
            {"skip_spikes": 3.0, "spike_window": 4},
            "spikes",
            "norms",
            torch.tensor([1.0, -1.0, 2.0, math.nan], dtype=torch.float64),
            r"state.spikes.norms: the 3 recorded norms must be finite and >= 0",
        ),
    ],
)
def test_load_state_dict_checks_values_and_changes_nothing_on_error(
    clipping_type: str, options: dict, part: str, key: str, value: object, message: str
) -> None:
    """A bad value anywhere raises before anything is replaced: the clipper goes on as it was."""
    clipper = _trained(clipping_type, **options)
    good = clipper.state_dict()
    with pytest.raises(ValueError, match=message):
        clipper.load_state_dict(_with(good, part, key, value))
    for name, values in clipper.state_dict().items():
        for field, tensor in values.items():
            torch.testing.assert_close(tensor, good[name][field], rtol=0, atol=0, equal_nan=True)


def test_a_bad_spike_window_leaves_the_rule_state_alone() -> None:
    """Both parts are checked before either is replaced (no half-loaded state)."""
    clipper = _trained("zscore", skip_spikes=3.0, spike_window=4)
    good = clipper.state_dict()
    fresh = GradientClipper("zscore", 1.0, skip_spikes=3.0, spike_window=4)
    with pytest.raises(ValueError, match=r"state.spikes: expected keys count, norms, got norms"):
        fresh.load_state_dict({"rule": good["rule"], "spikes": {"norms": good["spikes"]["norms"]}})
    assert fresh.state_dict() == {}


def test_a_zscore_state_with_a_nan_mean_cannot_switch_spike_clipping_off() -> None:
    """The issue this guards: a NaN mean loaded silently made every later spike pass unclipped."""
    clipper = _trained("zscore")
    state = clipper.state_dict()
    state["rule"]["mean"] = torch.tensor(math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state\.rule\.mean"):
        GradientClipper("zscore", 1.0).load_state_dict(state)


def test_state_lives_on_the_grads_device_and_follows_a_cpu_load() -> None:
    clipper = GradientClipper("zscore", 1.0)
    params = make_params()
    set_grads(params, [1.0, 1.0, 1.0])
    clipper(params)
    assert all(value.device == params[0].grad.device for value in clipper.state_dict()["rule"].values())


# ---- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("clipping_type", "options", "message"),
    [
        ("quantile", {"percentile": 0}, r"percentile: expected a number in \(0, 100\], got 0"),
        ("quantile", {"percentile": 101.0}, r"percentile: expected a number in \(0, 100\], got 101.0"),
        ("quantile", {"percentile": "10"}, r"percentile: expected a number in \(0, 100\], got '10' \(str\)"),
        ("quantile", {"window": 1}, r"window: expected an integer in \[2, 16777216\], got 1"),
        ("quantile", {"window": 10.0}, r"window: expected an integer in \[2, 16777216\], got 10.0"),
        ("zscore", {"alpha": 1.0}, r"alpha: expected a number in \(0, 1\), got 1.0"),
        ("zscore", {"alpha": True}, r"alpha: expected a number in \(0, 1\), got True"),
        ("zscore", {"z_threshold": -2.5}, r"z_threshold: expected a number > 0 and finite, got -2.5"),
        ("zscore", {"warmup_steps": 1}, r"warmup_steps: expected an integer >= 2, got 1"),
        ("adagc", {"relative_threshold": 0}, r"relative_threshold: expected a number > 0 and finite, got 0"),
        ("adagc", {"beta": 0.0}, r"beta: expected a number in \(0, 1\), got 0.0"),
        ("adagc", {"warmup_steps": 0}, r"warmup_steps: expected an integer >= 1, got 0"),
        ("adagc", {"warmup_steps": True}, r"warmup_steps: expected an integer >= 1, got True"),
    ],
)
def test_bad_options_name_field_value_and_allowed(clipping_type: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientClipper(clipping_type, 1.0, **options)


@pytest.mark.parametrize("clipping_type", ["quantile", "zscore", "adagc"])
def test_threshold_may_be_inf_for_statistics_types_only(clipping_type: str) -> None:
    assert GradientClipper(clipping_type, math.inf).clipping_threshold == math.inf
    with pytest.raises(ValueError, match=r"clipping_threshold: expected a number > 0, got -inf"):
        GradientClipper(clipping_type, -math.inf)
    with pytest.raises(ValueError, match=r"clipping_threshold: expected a number > 0 and finite, got inf"):
        GradientClipper("norm", math.inf)


def test_options_of_one_type_are_refused_by_another() -> None:
    with pytest.raises(TypeError, match=r"clipping_type='quantile' got unknown option\(s\) alpha"):
        GradientClipper("quantile", 1.0, alpha=0.9)


def test_repr_names_the_statistics_settings() -> None:
    assert repr(GradientClipper("zscore", math.inf)) == (
        "GradientClipper(clipping_type='zscore', clipping_threshold=inf, alpha=0.97, z_threshold=2.5, "
        "warmup_steps=25)"
    )
