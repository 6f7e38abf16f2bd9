"""Bad input fails fast, naming the field, the value and what is allowed."""

from __future__ import annotations

import math

import pytest
import torch

from gradclip_algo import apply_gradient_clipping


@pytest.fixture
def param() -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    return p


@pytest.mark.parametrize("clipping_type", ["Norm", "l2", "", None, 2])
def test_unknown_clipping_type(param: torch.nn.Parameter, clipping_type: object) -> None:
    with pytest.raises(ValueError, match=r"clipping_type: expected one of 'norm', 'value', 'adaptive'"):
        apply_gradient_clipping(param, clipping_type, 1.0)


@pytest.mark.parametrize("threshold", [0, 0.0, -1.0, math.nan, math.inf, -math.inf, "1.0", True, False, None])
def test_bad_threshold(param: torch.nn.Parameter, threshold: object) -> None:
    with pytest.raises(ValueError, match=r"clipping_threshold: expected a number > 0 and finite, got"):
        apply_gradient_clipping(param, "norm", threshold)
    assert torch.equal(param.grad, torch.ones(3))


@pytest.mark.parametrize(
    ("clipping_type", "option"),
    [("norm", "eps"), ("value", "norm_type"), ("adaptive", "norm_type"), ("norm", "max_norm")],
)
def test_unknown_option(param: torch.nn.Parameter, clipping_type: str, option: str) -> None:
    with pytest.raises(TypeError, match=rf"clipping_type='{clipping_type}' got unknown option\(s\) {option}"):
        apply_gradient_clipping(param, clipping_type, 1.0, **{option: 1.0})


@pytest.mark.parametrize("norm_type", [0, -2.0, math.nan, "2", True])
def test_bad_norm_type(param: torch.nn.Parameter, norm_type: object) -> None:
    with pytest.raises(ValueError, match=r"norm_type: expected a number > 0, got"):
        apply_gradient_clipping(param, "norm", 1.0, norm_type=norm_type)


@pytest.mark.parametrize("eps", [0, -1e-3, math.inf, "1e-3"])
def test_bad_eps(param: torch.nn.Parameter, eps: object) -> None:
    with pytest.raises(ValueError, match=r"eps: expected a number > 0 and finite, got"):
        apply_gradient_clipping(param, "adaptive", 0.01, eps=eps)


def test_bad_exclude(param: torch.nn.Parameter) -> None:
    with pytest.raises(TypeError, match=r"exclude: expected glob patterns or callables"):
        apply_gradient_clipping({"w": param}.items(), "adaptive", 0.01, exclude=[3])


def test_bad_nonfinite_mode(param: torch.nn.Parameter) -> None:
    with pytest.raises(ValueError, match=r"nonfinite: expected one of 'propagate', 'error', 'skip', 'zero'"):
        apply_gradient_clipping(param, "norm", 1.0, nonfinite="ignore")


def test_bad_parameters_element() -> None:
    with pytest.raises(
        TypeError, match=r"parameters: expected tensors or \(name, tensor\) pairs, got 1.0 \(float\)"
    ):
        apply_gradient_clipping([1.0], "norm", 1.0)


def test_sparse_grad_is_a_type_error() -> None:
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"gradient of weight has layout torch.sparse_coo"):
        apply_gradient_clipping(embedding, "norm", 1.0)
