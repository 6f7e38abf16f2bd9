"""The ``nonfinite`` modes on one process: 'propagate', 'error', 'skip' and 'zero' (two ranks: test_distributed)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MixedModel, backward_mixed, grads, twin
from torch import nn

from gradclip_algo import GradientClipper, NonFiniteGradError, apply_gradient_clipping

BAD = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@pytest.mark.parametrize(
    "grad",
    [
        torch.full((3,), 65504.0, dtype=torch.float16),  # fp16's largest value: its square overflows fp16
        torch.full((10,), 2e22, dtype=torch.float64),  # its sum of squares overflows fp32
        torch.full((10,), 1e18),  # fp32, norm 3.2e18: its sum of squares still fits
    ],
    ids=["fp16-max", "fp64-2e22", "fp32-1e18"],
)
@pytest.mark.parametrize("mode", ["error", "skip"])
def test_huge_finite_grads_are_clipped_not_taken_for_nonfinite(grad: torch.Tensor, mode: str) -> None:
    param = torch.nn.Parameter(torch.zeros_like(grad))
    param.grad = grad.clone()
    reference = torch.nn.Parameter(torch.zeros_like(grad))
    reference.grad = grad.clone()
    stats = apply_gradient_clipping(param, "norm", 1.0, nonfinite=mode)
    assert not stats.skipped and math.isfinite(stats.grad_norm.item())
    torch.testing.assert_close(param.grad.double().norm().item(), 1.0, rtol=1e-3, atol=0)
    if grad.dtype != torch.float16:  # torch's fp16 norm overflows fp16; ours is summed in fp32
        torch.nn.utils.clip_grad_norm_(reference, 1.0, error_if_nonfinite=True)
        torch.testing.assert_close(param.grad, reference.grad)


def test_finite_grads_whose_fp32_norm_overflows_raise_as_in_torch() -> None:
    """fp32 grads of 1e20: their sum of squares overflows fp32 in torch's kernels and ours alike. torch
    raises with error_if_nonfinite=True and leaves the grads alone; so does nonfinite='error', saying why."""
    param = torch.nn.Parameter(torch.zeros(10))
    param.grad = torch.full((10,), 1e20)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(param, 1.0, error_if_nonfinite=True)
    with pytest.raises(
        NonFiniteGradError, match=r"every gradient element is finite: it overflows torch\.float32"
    ):
        apply_gradient_clipping(param, "norm", 1.0, nonfinite="error")
    assert torch.equal(param.grad, torch.full((10,), 1e20))


def test_propagate_is_the_default_and_lets_nan_through(mixed_model: MixedModel) -> None:
    """As torch's clip_grad_norm_: a NaN anywhere makes the norm NaN, and every grad NaN."""
    backward_mixed(mixed_model)
    mixed_model.head.bias.grad[0] = math.nan
    stats = apply_gradient_clipping(mixed_model, "norm", 1.0)
    assert math.isnan(stats.grad_norm.item()) and not stats.skipped
    assert all(torch.isnan(g).all() for g in grads(mixed_model))


@pytest.mark.parametrize("bad", list(BAD))
def test_error_names_the_first_bad_parameter_and_leaves_grads_alone(
    mixed_model: MixedModel, bad: str
) -> None:
    backward_mixed(mixed_model)
    mixed_model.norm.weight.grad[3] = BAD[bad]
    mixed_model.head.weight.grad[0, 0] = BAD[bad]  # later in parameter order
    before = grads(mixed_model)
    with pytest.raises(
        NonFiniteGradError, match=r"^non-finite gradient \(inf or NaN\) in norm\.weight$"
    ) as info:
        apply_gradient_clipping(mixed_model, "norm", 1.0, nonfinite="error")
    assert info.value.param_name == "norm.weight"
    for got, want in zip(grads(mixed_model), before, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_error_without_names_counts_the_parameters() -> None:
    params = [nn.Parameter(torch.zeros(2)) for _ in range(3)]
    for param, value in zip(params, (1.0, 2.0, math.inf), strict=True):
        param.grad = torch.full((2,), value)
    with pytest.raises(NonFiniteGradError, match=r"in parameter #2$"):
        apply_gradient_clipping(params, "value", 1.0, error_if_nonfinite=True)


def test_error_on_finite_grads_clips_as_usual(mixed_model: MixedModel) -> None:
    backward_mixed(mixed_model, scale=100.0)
    reference = twin(mixed_model)
    apply_gradient_clipping(mixed_model, "norm", 1.0, nonfinite="error")
    apply_gradient_clipping(reference, "norm", 1.0)
    for got, want in zip(grads(mixed_model), grads(reference), strict=True):
        assert torch.equal(got, want)


def adam_state(optimizer: torch.optim.Adam) -> list[torch.Tensor]:
    """Every tensor of Adam's state (step, exp_avg, exp_avg_sq of each parameter), copied."""
    return [value.clone() for state in optimizer.state.values() for value in state.values()]


def test_skip_leaves_weights_and_adam_state_bitwise_unchanged(mixed_model: MixedModel) -> None:
    """A real loop: inf at step 2, NaN at step 4; those steps change nothing, the others train."""
    optimizer = torch.optim.Adam(mixed_model.parameters(), lr=1e-2)
    clipper = GradientClipper("norm", 1.0, nonfinite="skip")
    bad_steps = {2: math.inf, 4: math.nan}
    for step in range(6):
        weights = [p.detach().clone() for p in mixed_model.parameters()]
        state = adam_state(optimizer)
        backward_mixed(mixed_model, seed=step)
        if step in bad_steps:
            mixed_model.conv.weight.grad[0, 0, 0, 0] = bad_steps[step]
        stats = clipper(mixed_model)
        optimizer.step()
        unchanged = all(torch.equal(w, p) for w, p in zip(weights, mixed_model.parameters(), strict=True))
        assert stats.skipped == (step in bad_steps) == unchanged
        if step in bad_steps:
            assert all(p.grad is None for p in mixed_model.parameters())
            assert all(torch.equal(a, b) for a, b in zip(state, adam_state(optimizer), strict=True))
            assert not math.isfinite(stats.grad_norm.item()) and stats.clipped_fraction.item() == 1.0
    assert all(torch.isfinite(p).all() for p in mixed_model.parameters())
    assert all(s["step"].item() == 4 for s in optimizer.state.values())  # 6 steps, 2 skipped


def test_skip_drops_the_grads_of_excluded_parameters_too(mixed_model: MixedModel) -> None:
    """The whole optimizer step is skipped, so an excluded (unclipped) parameter must not move either."""
    backward_mixed(mixed_model)
    mixed_model.embed.weight.grad[0, 0] = math.nan
    stats = apply_gradient_clipping(mixed_model, "adaptive", 0.01, exclude="head.*", nonfinite="skip")
    assert stats.skipped
    assert all(p.grad is None for p in mixed_model.parameters())


def test_skip_decides_on_clipped_parameters_only(mixed_model: MixedModel) -> None:
    """An excluded parameter is not looked at: its inf goes through, the others are clipped."""
    backward_mixed(mixed_model)
    mixed_model.head.bias.grad[0] = math.inf
    stats = apply_gradient_clipping(mixed_model, "norm", 0.1, exclude="head.bias", nonfinite="skip")
    assert not stats.skipped and math.isfinite(stats.grad_norm.item())
    assert mixed_model.head.bias.grad[0].item() == math.inf


@pytest.mark.parametrize(
    ("clipping_type", "threshold", "options"),
    [("norm", 0.5, {}), ("norm", 0.5, {"norm_type": math.inf}), ("value", 0.05, {}), ("adaptive", 0.05, {})],
)
def test_zero_equals_clipping_with_the_bad_elements_zeroed_by_hand(
    mixed_model: MixedModel, clipping_type: str, threshold: float, options: dict[str, float]
) -> None:
    backward_mixed(mixed_model)
    by_hand = twin(mixed_model)
    bad_elements = [
        (lambda m: m.embed.weight.grad, (3, 1), math.inf),
        (lambda m: m.conv.weight.grad, (1, 0, 2, 2), -math.inf),
        (lambda m: m.head.bias.grad, (2,), math.nan),
    ]
    for grad_of, index, value in bad_elements:
        grad_of(mixed_model)[index] = value
        grad_of(by_hand)[index] = 0.0
    stats = apply_gradient_clipping(mixed_model, clipping_type, threshold, nonfinite="zero", **options)
    want = apply_gradient_clipping(by_hand, clipping_type, threshold, **options)
    assert want.clipped_fraction.item() > 0, "the reference must clip for the test to bite"
    for got, expected in zip(grads(mixed_model), grads(by_hand), strict=True):
        assert torch.equal(got, expected)
    for field in ("grad_norm", "clipped_grad_norm", "clipped_fraction"):
        assert torch.equal(getattr(stats, field), getattr(want, field))


@pytest.mark.composer
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Composer's fp16 AMP needs a GPU")
def test_fp16_amp_leaves_inf_steps_to_the_grad_scaler() -> None:
    """Under fp16 AMP the GradScaler skips the step with an inf grad; ``nonfinite='error'`` must not raise
    there (the algorithm treats it as 'propagate'), and the skip is counted once."""
    pytest.importorskip("composer")
    from composer import Callback, Trainer
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    from gradclip_algo import GradClipAlgo

    class InfAtBatch2(Callback):
        def after_backward(self, state, logger) -> None:  # before the scaler unscales and checks
            if state.timestamp.batch.value == 2:
                next(state.model.parameters()).grad.view(-1)[0] = math.inf

    class Weights(Callback):
        def __init__(self) -> None:
            self.seen: list[list[torch.Tensor]] = []

        def batch_end(self, state, logger) -> None:
            self.seen.append([p.detach().clone() for p in state.model.parameters()])

    torch.manual_seed(0)
    model = ComposerClassifier(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), num_classes=3)
    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    weights, in_memory = Weights(), InMemoryLogger()
    with pytest.warns(UserWarning, match="'error' is treated as 'propagate'"):
        Trainer(
            model=model,
            train_dataloader=DataLoader(data, batch_size=8),
            max_duration="4ba",
            optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
            algorithms=[GradClipAlgo("norm", 1.0, nonfinite="error")],
            callbacks=[InfAtBatch2(), weights],
            loggers=[in_memory],
            device="gpu",
            precision="amp_fp16",
        ).fit()
    assert all(torch.equal(a, b) for a, b in zip(weights.seen[1], weights.seen[2], strict=True))
    # counted once, at batch 2 (earlier steps may also overflow while the scaler lowers its scale)
    assert in_memory.data["gradient_clipping/skipped_steps"][2][1] == 1


def test_a_skipped_step_returns_its_stats_even_without_stats() -> None:
    """Dropping the grads is a host decision, so the caller learns of it: ClipStats with skipped=True."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    for param in params:
        param.grad = torch.ones(3)
    params[1].grad[0] = float("nan")
    stats = apply_gradient_clipping(params, "norm", 1.0, nonfinite="skip", with_stats=False)
    assert stats is not None and stats.skipped is True
    assert all(param.grad is None for param in params)
