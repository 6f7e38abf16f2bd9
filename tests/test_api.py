"""Call forms, ClipStats, and the promise that the core imports without Composer."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from conftest import MixedModel, backward_mixed, grads, twin
from torch import nn

from gradclip_algo import ClipStats, apply_gradient_clipping
from gradclip_algo.parameters import collect


def test_documented_call_forms_all_agree(mixed_model: MixedModel) -> None:
    backward_mixed(mixed_model)
    copies = [twin(mixed_model) for _ in range(4)]
    apply_gradient_clipping(copies[0], "norm", 2.0)
    apply_gradient_clipping(copies[1].parameters(), clipping_type="norm", clipping_threshold=2.0)
    apply_gradient_clipping(list(copies[2].parameters()), "norm", 2.0)
    apply_gradient_clipping(copies[3].named_parameters(), "norm", 2.0)
    for other in copies[1:]:
        for got, want in zip(grads(other), grads(copies[0]), strict=True):
            assert torch.equal(got, want)


def test_single_tensor_and_generator() -> None:
    param = nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 2.0)  # norm 4
    stats = apply_gradient_clipping(param, "norm", 1.0)
    torch.testing.assert_close(param.grad, torch.full((4,), 0.5), rtol=1e-5, atol=0)
    assert stats.grad_norm.item() == pytest.approx(4.0)
    param.grad = torch.full((4,), 2.0)
    apply_gradient_clipping((p for p in [param]), "value", 1.0)
    assert torch.equal(param.grad, torch.ones(4))


def test_none_grads_are_skipped_and_no_grads_is_not_an_error() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.warns(UserWarning, match=r"none of the 4 parameters has a \.grad yet"):
        stats = apply_gradient_clipping(model, "norm", 1.0)
    assert stats.grad_norm.item() == 0.0 and stats.clipped_fraction.item() == 0.0
    model[1].weight.grad = torch.full((3, 3), 10.0)
    stats = apply_gradient_clipping(model, "norm", 1.0)
    assert model[0].weight.grad is None
    assert stats.grad_norm.item() == pytest.approx(30.0)


def test_shared_parameters_count_once() -> None:
    shared = nn.Parameter(torch.zeros(2))
    shared.grad = torch.tensor([3.0, 4.0])
    stats = apply_gradient_clipping([shared, shared], "norm", 1.0)
    assert stats.grad_norm.item() == pytest.approx(5.0)
    torch.testing.assert_close(shared.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=0)


def test_a_modules_parameters_are_found_as_torch_lists_them() -> None:
    """Without ``exclude`` a Module's parameters are collected without names: same tensors, same order,
    shared and tied ones once, nested and repeated submodules included."""
    block = nn.Linear(4, 4)
    model = nn.Sequential(nn.Embedding(10, 4), block, nn.Sequential(block, nn.LayerNorm(4)), nn.Linear(4, 10))
    model[3].weight = model[0].weight  # tied
    model.register_parameter("frozen", None)
    found = [param for _, param in collect(model, names=False)]
    assert [id(p) for p in found] == [id(p) for p in model.parameters()]
    named = collect(model)
    assert [id(param) for _, param in named] == [id(p) for p in model.parameters()]
    assert [names[0] for names, _ in named] == [name for name, _ in model.named_parameters()]
    assert named[0][0] == ("0.weight", "3.weight")  # a tied weight has both names
    assert named[1][0] == ("1.weight", "2.0.weight")


def test_modules_are_walked_without_hashing_them() -> None:
    """Composer models hold torchmetrics metrics, whose ``__hash__`` is costly: the walk never calls it."""

    class NoHash(nn.Linear):
        def __hash__(self) -> int:
            raise AssertionError("a module was hashed")

    model = nn.Sequential(nn.Linear(2, 2), NoHash(2, 2))
    model[0].weight.grad = torch.full((2, 2), 3.0)
    model[1].bias.grad = torch.full((2,), 4.0)
    stats = apply_gradient_clipping(model, "norm", 1.0)
    assert stats.grad_norm.item() == pytest.approx(math.sqrt(4 * 9 + 2 * 16))


def test_mixed_dtypes_in_one_call() -> None:
    params = [
        nn.Parameter(torch.zeros(3, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16, torch.float64)
    ]
    for param in params:
        param.grad = torch.full((3,), 4.0, dtype=param.dtype)
    stats = apply_gradient_clipping(params, "norm", 1.0)
    assert stats.grad_norm.item() == pytest.approx(12.0, rel=1e-6)
    for param in params:
        assert param.grad.dtype == param.dtype
        torch.testing.assert_close(
            param.grad.double(), torch.full((3,), 4.0 / 12.0, dtype=torch.float64), rtol=4e-3, atol=0
        )


@pytest.mark.parametrize("clipping_type", ["norm", "value", "adaptive"])
def test_stats_are_fp32_scalars_on_the_grads_device(mixed_model: MixedModel, clipping_type: str) -> None:
    backward_mixed(mixed_model)
    stats = apply_gradient_clipping(mixed_model, clipping_type, 0.1)
    assert isinstance(stats, ClipStats)
    for value in (stats.grad_norm, stats.clipped_grad_norm, stats.clipped_fraction):
        assert value.shape == () and value.dtype == torch.float32 and value.device.type == "cpu"
    assert 0.0 <= stats.clipped_fraction.item() <= 1.0
    assert stats.clipped_grad_norm.item() <= stats.grad_norm.item() * (1 + 1e-6)
    assert set(stats.as_dict()) == {"grad_norm", "clipped_grad_norm", "clipped_fraction", "skipped"}


def test_core_import_does_not_load_composer_or_omegaconf() -> None:
    code = (
        "import sys, gradclip_algo, torch\n"
        "p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.ones(2)\n"
        "gradclip_algo.apply_gradient_clipping(p, 'norm', 1.0)\n"
        "assert 'composer' not in sys.modules and 'omegaconf' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("clipping_type", "options"),
    [("zscore", {}), ("quantile", {}), ("adagc", {}), ("norm", {"skip_spikes": 6.0})],
)
def test_one_shot_call_refuses_what_needs_statistics(clipping_type: str, options: dict) -> None:
    param = nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    with pytest.raises(
        ValueError, match=rf"clipping_type='{clipping_type}' .*keeps statistics.*GradientClipper"
    ):
        apply_gradient_clipping(param, clipping_type, 1.0, **options)
    assert torch.equal(param.grad, torch.ones(2))


def test_one_shot_calls_share_one_validated_set_up_per_arguments() -> None:
    """Equal plain arguments reuse the set-up validated at the first call, and clip as a new one would; an
    equal value of another type (``True`` after ``1``) is validated anew, and refused."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    model(torch.randn(8, 4)).square().sum().backward()
    twin = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for copy, param in zip(twin, model.parameters(), strict=True):
        copy.grad = param.grad.clone()
    first = apply_gradient_clipping(model, "norm", 1, norm_type=2.0)
    second = apply_gradient_clipping(model, "norm", 1, norm_type=2.0)  # the grads now have norm 1
    assert first.grad_norm.item() > 1.0 and second.grad_norm.item() == pytest.approx(1.0, rel=1e-6)
    torch.nn.utils.clip_grad_norm_(twin, 1.0)
    for param, want in zip(model.parameters(), twin, strict=True):
        torch.testing.assert_close(param.grad, want.grad)
    with pytest.raises(ValueError, match=r"clipping_threshold: expected a number > 0 and finite, got True"):
        apply_gradient_clipping(model, "norm", True, norm_type=2.0)
