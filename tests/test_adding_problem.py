"""The adding problem's data and RNN (torch only)."""

from __future__ import annotations

import pytest
import torch

from gradclip_algo import apply_gradient_clipping
from gradclip_algo.train.adding_problem import (
    MEAN_PREDICTOR_MSE,
    AddingRNN,
    adding_problem,
    train_and_eval_sets,
)


def test_two_markers_one_per_half_and_target_is_their_sum() -> None:
    inputs, targets = adding_problem(500, 12, torch.Generator().manual_seed(1)).tensors
    values, markers = inputs[..., 0], inputs[..., 1]
    assert inputs.shape == (500, 12, 2) and targets.shape == (500, 1)
    assert torch.equal(markers.sum(dim=1), torch.full((500,), 2.0))
    assert torch.equal(markers[:, :6].sum(dim=1), torch.ones(500))
    assert ((values >= 0) & (values < 1)).all()
    torch.testing.assert_close(targets.squeeze(1), (values * markers).sum(dim=1))


def test_same_seed_same_data_and_train_eval_disjoint_draws() -> None:
    first, first_eval = train_and_eval_sets(100, 50, 8, seed=3)
    second, _ = train_and_eval_sets(100, 50, 8, seed=3)
    other, _ = train_and_eval_sets(100, 50, 8, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors, second.tensors, strict=True))
    assert not torch.equal(first.tensors[0], other.tensors[0])
    assert not torch.equal(first.tensors[0][:50], first_eval.tensors[0])


def test_mean_predictor_scores_one_sixth() -> None:
    _, targets = adding_problem(200_000, 10, torch.Generator().manual_seed(0)).tensors
    assert (targets - 1.0).square().mean().item() == pytest.approx(MEAN_PREDICTOR_MSE, rel=0.02)


def test_recurrent_init_gain_is_the_spectral_radius() -> None:
    rnn = AddingRNN(16, recurrent_init_gain=1.7)
    radius = torch.linalg.eigvals(rnn.rnn.weight_hh_l0.detach()).abs().max().item()
    assert radius == pytest.approx(1.7, rel=1e-4)


def test_clipping_bounds_the_exploding_rnn_gradient() -> None:
    """With W_hh's spectral radius at 3 the gradient explodes; norm clipping holds it to λ."""
    torch.manual_seed(0)
    model = AddingRNN(32, recurrent_init_gain=3.0)
    inputs, targets = adding_problem(64, 40, torch.Generator().manual_seed(0)).tensors
    torch.nn.functional.mse_loss(model(inputs), targets).backward()
    stats = apply_gradient_clipping(model, "norm", 1.0)
    assert stats.grad_norm.item() > 10.0
    total = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)
