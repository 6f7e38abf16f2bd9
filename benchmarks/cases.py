"""The parameter sets the benchmark clips, their gradients, and thresholds at which every rule clips."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradclip_algo import get_total_norm

Shape = tuple[int, ...]

WEIGHT_STD = 0.02
GRAD_SCALES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""Tensor i gets grads ~ N(0, s²) with s = GRAD_SCALES[i % 5], so a rule clips some tensors and not others."""


@dataclass(frozen=True)
class Case:
    """A named list of parameter shapes."""

    name: str
    shapes: tuple[Shape, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    def describe(self) -> str:
        return f"{self.name}: {len(self.shapes):,} tensors, {self.numel:,} parameters"


def gpt2_shapes(
    vocab: int = 50257, context: int = 1024, width: int = 768, layers: int = 12
) -> tuple[Shape, ...]:
    """GPT-2's parameter shapes (Conv1D weights stored as in x out): ``2 + 12·layers + 2`` tensors.

    wte, wpe; per block ln_1 w/b, attn.c_attn w/b, attn.c_proj w/b, ln_2 w/b, mlp.c_fc w/b, mlp.c_proj w/b;
    ln_f w/b. GPT-2 small (the defaults): 148 tensors, 124,439,808 parameters.
    """
    block = (
        (width,), (width,),
        (width, 3 * width), (3 * width,),
        (width, width), (width,),
        (width,), (width,),
        (width, 4 * width), (4 * width,),
        (4 * width, width), (width,),
    )  # fmt: skip
    return ((vocab, width), (context, width), *block * layers, (width,), (width,))


GPT2_SMALL = Case("GPT-2 small", gpt2_shapes())
GPT2_BLOCKS = Case("9 GPT-2 small blocks", gpt2_shapes(layers=9)[2:-2])  # no embeddings, no final norm
MANY_SMALL = Case("5,000 x 32x32", ((32, 32),) * 5000)
FULL_CASES = (GPT2_SMALL, MANY_SMALL)
SMOKE_CASES = (
    Case("GPT-2 tiny", gpt2_shapes(vocab=64, context=16, width=8, layers=2)),
    Case("50 x 4x4", ((4, 4),) * 50),
)
SMOKE_BLOCKS = Case("2 GPT-2 tiny blocks", gpt2_shapes(vocab=64, context=16, width=8, layers=2)[2:-2])


def make_model(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.ParameterList:
    """Parameters of ``case`` with weights ~ N(0, 0.02²) and grads scaled per tensor by ``GRAD_SCALES``.

    No weight is zero, so Composer's AGC (which has no floor ε on the weight norm) computes the same
    rule as the others.
    """
    generator = torch.Generator().manual_seed(seed)
    params = nn.ParameterList()
    for index, shape in enumerate(case.shapes):
        param = nn.Parameter((torch.randn(shape, generator=generator) * WEIGHT_STD).to(device, dtype))
        grad_scale = GRAD_SCALES[index % len(GRAD_SCALES)]
        param.grad = (torch.randn(shape, generator=generator) * grad_scale).to(device, dtype)
        params.append(param)
    return params


def grad_restorer(model: nn.Module) -> Callable[[], None]:
    """A function that puts the grads of ``model`` back to what they are now (clipping is in place)."""
    grads = [param.grad for param in model.parameters()]
    initial = [grad.clone() for grad in grads]
    return lambda: torch._foreach_copy_(grads, initial)


def clipping_thresholds(model: nn.Module) -> dict[str, float]:
    """λ per clipping type, each active on the grads of ``make_model``.

    norm: half the global L2 norm (every grad is halved); value: 1e-3 (it clamps elements of the
    tensors with s >= 1e-3); adaptive: 0.01, the paper's λ (units whose ‖G_u‖/‖W_u‖ > 0.01, i.e. whose
    s > 2e-4, are rescaled).
    """
    grads = [param.grad for param in model.parameters()]
    return {
        "norm": 0.5 * get_total_norm(grads, 2.0, grads[0].device).item(),
        "value": 1e-3,
        "adaptive": 0.01,
    }
