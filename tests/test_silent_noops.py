"""Settings and inputs that would make a call do nothing warn (once per clipper) or fail."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from gradclip_algo import GradientClipper, apply_gradient_clipping


class TinyLM(nn.Module):
    """An embedding whose weight the output head shares, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.block = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.block(self.embed(tokens))))


def backward(model: nn.Module) -> None:
    model.zero_grad(set_to_none=True)
    model(torch.tensor([[1, 2, 3]])).square().sum().backward()


def test_an_exclude_glob_that_matches_nothing_warns_once_per_clipper() -> None:
    model = TinyLM()
    backward(model)
    clipper = GradientClipper("adaptive", 0.01, exclude=["*fc.*"])
    with pytest.warns(UserWarning, match=r"exclude: pattern\(s\) '\*fc\.\*' match no parameter name"):
        clipper(model)
    backward(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper(model)


def clip_without_warnings(parameters: object, exclude: list[str]) -> None:
    """Clip to 1e-6 with ``exclude``; a warning (a glob that matches nothing) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_gradient_clipping(parameters, "norm", 1e-6, exclude=exclude)


@pytest.mark.parametrize("glob", ["block.*", "_orig_mod.block.*"])
@pytest.mark.parametrize("wrap", ["compile", "pairs-of-compile"])
def test_globs_match_through_compile_both_ways(wrap: str, glob: str) -> None:
    """A glob written for the plain model, or copied from the compiled model's own names, matches whether
    the compiled module or its named_parameters() is passed."""
    model = TinyLM()
    compiled = torch.compile(model)
    backward(model)
    block = model.block.weight.grad.clone()
    clip_without_warnings(compiled if wrap == "compile" else compiled.named_parameters(), [glob])
    assert torch.equal(model.block.weight.grad, block)


def test_globs_match_ddp_style_names() -> None:
    """``DDP(model).named_parameters()`` names start with ``module.``; a glob for the model still matches."""
    model = TinyLM()
    backward(model)
    block = model.block.weight.grad.clone()
    pairs = [(f"module._orig_mod.{name}", param) for name, param in model.named_parameters()]
    clip_without_warnings(pairs, ["block.*"])
    assert torch.equal(model.block.weight.grad, block)


def test_grads_passed_in_place_of_parameters_warn() -> None:
    model = TinyLM()
    backward(model)
    with pytest.warns(UserWarning, match=r"none of the 3 tensors has a \.grad or requires grad"):
        apply_gradient_clipping([p.grad for p in model.parameters()], "norm", 1.0)


def test_clipping_before_backward_warns_once() -> None:
    model = TinyLM()
    clipper = GradientClipper("norm", 1.0)
    with pytest.warns(UserWarning, match=r"none of the 3 parameters has a \.grad yet, so nothing is clipped"):
        stats = clipper(model)
    assert stats.grad_norm.item() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper(model)
        backward(model)
        clipper(model)


def test_an_exclude_that_leaves_out_every_grad_warns() -> None:
    model = TinyLM()
    backward(model)
    with pytest.warns(UserWarning, match=r"exclude: every parameter that has a \.grad is excluded"):
        apply_gradient_clipping(model, "norm", 1.0, exclude="*")


WARNING_CALLS = {
    "exclude matches nothing, clipper": lambda model, opt: GradientClipper("norm", 1.0, exclude="zz")(model),
    "exclude matches nothing, function": lambda model, opt: apply_gradient_clipping(
        model, "norm", 1.0, exclude="zz"
    ),
    "fold_into cannot fold, function": lambda model, opt: apply_gradient_clipping(
        model, "value", 1.0, fold_into=opt
    ),
    "no grads yet": lambda model, opt: GradientClipper("norm", 1.0)(TinyLM()),
    "grads passed": lambda model, opt: apply_gradient_clipping(
        [p.grad for p in model.parameters()], "norm", 1.0
    ),
}


@pytest.mark.parametrize("case", WARNING_CALLS)
def test_warnings_point_at_the_callers_line(case: str) -> None:
    """Through ``torch.no_grad()``'s wrapper and ``apply_gradient_clipping`` alike, the warning names this
    file and the line of the call."""
    model = TinyLM()
    backward(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        WARNING_CALLS[case](model, optimizer)
    assert caught
    for warning in caught:
        assert (warning.filename, warning.lineno) == (__file__, WARNING_CALLS[case].__code__.co_firstlineno)


@pytest.mark.parametrize("form", ["module", "named_parameters()", "named_parameters(prefix='m')"])
def test_a_tied_weight_is_excluded_by_any_of_its_names_in_every_form(form: str) -> None:
    """named_parameters() lists the shared weight only as embed.weight; its lm_head name still matches."""
    model = TinyLM()
    backward(model)
    shared = model.embed.weight.grad.clone()
    parameters = {
        "module": model,
        "named_parameters()": model.named_parameters(),
        "named_parameters(prefix='m')": model.named_parameters(prefix="m"),
    }[form]
    clip_without_warnings(parameters, ["m.lm_head.*" if "prefix" in form else "lm_head.*"])
    assert torch.equal(model.embed.weight.grad, shared)
    assert model.block.weight.grad.norm() < 1e-6


@pytest.mark.parametrize("wrap", ["plain", "compile", "pairs-of-compile"])
def test_an_exclude_predicate_sees_the_models_own_names(wrap: str) -> None:
    """A predicate is called with the model's names, without wrapper segments: ``name != 'block.bias'``
    clips ``block.bias`` alone, through ``torch.compile`` too (where globs also match the wrapped names)."""
    model = TinyLM()
    seen: set[str] = set()

    def keep_only_block_bias(name: str, _: torch.Tensor) -> bool:
        seen.add(name)
        return name != "block.bias"

    compiled = torch.compile(model)
    passed = {"plain": model, "compile": compiled, "pairs-of-compile": compiled.named_parameters()}[wrap]
    backward(model)
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    apply_gradient_clipping(passed, "norm", 1e-6, exclude=keep_only_block_bias)
    assert {"embed.weight", "block.weight", "block.bias"} <= seen <= {*before, "lm_head.weight"}
    for name, param in model.named_parameters():
        if name == "block.bias":
            assert param.grad.norm().item() == pytest.approx(1e-6, rel=1e-3)
        else:
            assert torch.equal(param.grad, before[name])
