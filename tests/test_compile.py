"""torch.compile: a pre-built clipper compiles whole (torch 2.13) and a compiled training step breaks its
graph no more often than with torch's own clip_grad_norm_; on torch 2.7 nothing crashes."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from gradclip_algo import CLIPPING_TYPES, GradientClipper

NEW_TORCH = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
THRESHOLDS = {"norm": 0.5, "value": 0.05, "adaptive": 0.01, "quantile": 0.5, "zscore": 0.5, "adagc": 0.5}


def _model_with_grads(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    model(torch.randn(4, 8)).square().sum().backward()
    return model


def _step(model: nn.Module, clip: Callable[[], object], optimizer: torch.optim.Optimizer) -> Callable:
    def step(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        clip()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    return step


@pytest.mark.parametrize("clipping_type", CLIPPING_TYPES)
def test_a_clipper_compiles_and_clips_as_in_eager_mode(clipping_type: str) -> None:
    """Two calls (the stateful types carry their statistics into the second) give eager mode's grads."""
    threshold = THRESHOLDS[clipping_type]
    eager, compiled = _model_with_grads(0), _model_with_grads(0)
    eager_clipper, compiled_clipper = (
        GradientClipper(clipping_type, threshold),
        GradientClipper(clipping_type, threshold),
    )
    torch._dynamo.reset()
    clip = torch.compile(lambda: compiled_clipper(compiled), fullgraph=NEW_TORCH)
    for _ in range(2):
        eager_clipper(eager)
        clip()
        for got, want in zip(compiled.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)
    assert any(p.grad.abs().max() > 0 for p in compiled.parameters())


def _graph_breaks(clip: Callable[[nn.Module], object]) -> int:
    """Graph breaks of a compiled training step of a fresh model that clips with ``clip``; the step is also
    run, traced by dynamo and AOT autograd (the clipper alone is compiled by Inductor in the test above)."""
    model = _model_with_grads(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.compile(_step(model, lambda: clip(model), optimizer), backend="aot_eager")(x)
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@functools.cache
def _torchs_graph_breaks() -> int:
    return _graph_breaks(lambda model: nn.utils.clip_grad_norm_(model.parameters(), 0.5))


@pytest.mark.parametrize("clipping_type", CLIPPING_TYPES)
def test_a_compiled_training_step_breaks_no_more_often_than_with_torchs_clip(clipping_type: str) -> None:
    clipper = GradientClipper(clipping_type, THRESHOLDS[clipping_type])
    breaks = _graph_breaks(clipper)  # runs on every torch version
    if NEW_TORCH:
        assert breaks <= _torchs_graph_breaks(), (breaks, _torchs_graph_breaks())
