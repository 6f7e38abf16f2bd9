"""Spike skipping (``skip_spikes``): against a float64 reference of the rule, with every clipping type."""

from __future__ import annotations

import math

import pytest
import torch
from references import spike_reference
from torch import nn

from gradclip_algo import GradientClipper, distributed
from gradclip_algo.norms import power_sum


def params_with_norm(norm: float) -> list[nn.Parameter]:
    """Two parameters whose grads have global L2 norm ``norm`` (3-4-5 split)."""
    first, second = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    first.grad = torch.tensor([0.6 * norm, 0.0])
    second.grad = torch.tensor([0.8 * norm])
    return [first, second]


def noisy_norms(count: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    return (1.0 + 0.1 * torch.randn(count, generator=gen, dtype=torch.float64)).tolist()


@pytest.mark.parametrize(("limit", "window"), [(6.0, 128), (3.0, 8), (2.0, 4)])
def test_skips_exactly_the_reference_spikes(limit: float, window: int) -> None:
    norms = noisy_norms(80)
    norms[1] = 50.0  # before any window is judged: not skipped
    norms[60] = math.inf
    norms[70] = norms[75] = 100.0
    norms[71] = 5.0
    expected = spike_reference(norms, limit, window)
    clipper = GradientClipper("norm", 100.0, skip_spikes=limit, spike_window=window)
    got = []
    for norm in norms:
        params = params_with_norm(norm)
        stats = clipper(params)
        got.append(stats.skipped)
        assert all(p.grad is None for p in params) == stats.skipped
        if stats.skipped:
            assert stats.clipped_fraction.item() == 1.0
            assert stats.grad_norm.item() == pytest.approx(norm)
    assert got == expected
    assert expected[60] and expected[70] and not expected[1]


def test_the_current_norm_is_judged_against_the_previous_ones_only() -> None:
    """With window 4 the step after two equal norms is judged: a rise of any size over a zero std skips."""
    clipper = GradientClipper("norm", 100.0, skip_spikes=6.0, spike_window=4)
    assert [clipper(params_with_norm(n)).skipped for n in (1.0, 1.0, 1.0, 1.01, 0.5)] == [
        False,
        False,
        False,
        True,
        False,
    ]


def test_a_lasting_rise_is_learnt_instead_of_skipping_forever() -> None:
    norms = [*noisy_norms(16), *[10.0 * n for n in noisy_norms(16, seed=1)]]
    clipper = GradientClipper("norm", 100.0, skip_spikes=3.0, spike_window=8)
    skipped = [clipper(params_with_norm(n)).skipped for n in norms]
    assert skipped == spike_reference(norms, 3.0, 8)
    assert skipped[16] and not any(skipped[16 + 8 :])


@pytest.mark.parametrize(
    ("clipping_type", "threshold", "options"),
    [
        ("norm", 100.0, {}),
        ("value", 100.0, {}),
        ("adaptive", 100.0, {}),
        ("quantile", math.inf, {}),
        ("zscore", math.inf, {"warmup_steps": 2}),
        ("adagc", math.inf, {"warmup_steps": 2}),
    ],
)
def test_every_type_skips_before_its_rule_runs(clipping_type: str, threshold: float, options: dict) -> None:
    """A skipped step leaves the grads None and the rule's statistics as they were."""
    clipper = GradientClipper(clipping_type, threshold, skip_spikes=4.0, spike_window=6, **options)
    for norm in noisy_norms(6):
        assert not clipper(params_with_norm(norm)).skipped
    before = clipper.state_dict()
    params = params_with_norm(30.0)
    assert clipper(params).skipped
    assert all(p.grad is None for p in params)
    after = clipper.state_dict()
    for key, value in before.get("rule", {}).items():
        assert torch.equal(value.nan_to_num(), after["rule"][key].nan_to_num()), key
    assert after["spikes"]["count"].item() == before["spikes"]["count"].item() + 1


def test_spike_state_is_only_kept_when_asked_for() -> None:
    clipper = GradientClipper("norm", 1.0)
    clipper(params_with_norm(1.0))
    assert clipper.state_dict() == {}
    assert "skip_spikes=6.0, spike_window=128" in repr(GradientClipper("norm", 1.0, skip_spikes=6))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"skip_spikes": 0}, r"skip_spikes: expected a number > 0 and finite, got 0"),
        ({"skip_spikes": "6"}, r"skip_spikes: expected a number > 0 and finite, got '6' \(str\)"),
        ({"skip_spikes": math.inf}, r"skip_spikes: expected a number > 0 and finite, got inf"),
        ({"skip_spikes": 6, "spike_window": 3}, r"spike_window: expected an integer >= 4, got 3"),
        ({"skip_spikes": 6, "spike_window": 12.5}, r"spike_window: expected an integer >= 4, got 12.5"),
    ],
)
def test_bad_spike_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GradientClipper("norm", 1.0, **options)


def test_skipping_makes_a_clipper_stateful_and_drops_excluded_grads_too() -> None:
    assert GradientClipper("norm", 1.0, skip_spikes=6.0).stateful
    assert not GradientClipper("norm", 1.0).stateful
    clipper = GradientClipper("norm", 100.0, skip_spikes=3.0, spike_window=4, exclude="bias")
    for norm in (1.0, 1.1, 0.9, 1.0):
        first, second = params_with_norm(norm)
        assert not clipper([("weight", first), ("bias", second)]).skipped
    first, second = params_with_norm(1.0)
    first.grad *= 100
    assert clipper([("weight", first), ("bias", second)]).skipped
    assert first.grad is None and second.grad is None


def test_the_spike_check_and_the_rule_share_one_read_of_the_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``skip_spikes`` the global norm is computed once per step, for the check and the rule alike."""
    reads = []
    monkeypatch.setattr(distributed, "power_sum", lambda *args: reads.append(args) or power_sum(*args))
    clipper = GradientClipper("norm", 1.0, skip_spikes=6.0)
    for norm in noisy_norms(5):
        reads.clear()
        stats = clipper(params_with_norm(norm))
        assert len(reads) == 1
        assert stats.grad_norm.item() == pytest.approx(norm, rel=1e-6)
