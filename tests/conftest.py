"""Shared test models and helpers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn


class MixedModel(nn.Module):
    """Linear, Conv2d, Embedding, LayerNorm and MultiheadAttention parameters in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv2d(2, 4, 3)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8 + 4, 3)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x, _ = self.attn(x, x, x)
        x = self.norm(x).mean(dim=1)
        y = self.conv(image).mean(dim=(2, 3))
        return self.head(torch.cat([x, y], dim=1))


def backward_mixed(model: MixedModel, seed: int = 0, scale: float = 1.0) -> None:
    """One real backward pass through ``model`` with a loss scaled by ``scale``."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (4, 5), generator=gen)
    image = torch.randn(4, 2, 6, 6, generator=gen)
    model.zero_grad(set_to_none=True)
    (model(tokens, image).square().sum() * scale).backward()


def random_grads(model: nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    """Give every parameter a random grad of its own dtype, with per-tensor scales spanning 1e-2..1e2."""
    gen = torch.Generator().manual_seed(seed)
    for i, param in enumerate(model.parameters()):
        magnitude = scale * 10.0 ** ((i % 5) - 2)
        param.grad = (torch.randn(param.shape, generator=gen) * magnitude).to(param.dtype)


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def twin(model: nn.Module) -> nn.Module:
    """A deep copy with its grads, for running a reference implementation side by side."""
    copied = copy.deepcopy(model)
    for source, target in zip(model.parameters(), copied.parameters(), strict=True):
        target.grad = None if source.grad is None else source.grad.clone()
    return copied


@pytest.fixture
def mixed_model() -> MixedModel:
    torch.manual_seed(0)
    return MixedModel()
