"""Shared test models and helpers."""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

# The xdist workers share the cores. OpenMP threads that spin while they wait for work would burn the other
# worker's time (4x the fuzz's CPU time on 2 cores), so they sleep; and Inductor compiles in the worker
# instead of starting a pool of compile processes that each import torch again. Set before torch loads;
# the processes the tests start inherit them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
import torch
from torch import Tensor, nn

SHARED_PER_FILE = {"test_distributed.py", "test_wheel.py", "test_composer_harness.py"}
"""Files whose tests share work set up once per module (spawned process groups, a built wheel and its
venv, trained reference runs): pytest-xdist runs each on one worker. Every other test goes to whichever
worker is free (``--dist loadgroup``), so one long file does not hold the suite up."""


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SHARED_PER_FILE:
            item.add_marker(pytest.mark.xdist_group(item.path.name))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Stop where xdist would spread a shared file over several workers (each would redo its set-up):
    pytest 9.2 no longer reads the node ids that pytest-xdist 3.8 rewrites for ``--dist loadgroup``."""
    if node.config.getoption("dist") != "loadgroup":
        return
    files = {nodeid.split("::")[0].rsplit("/", 1)[-1]: nodeid for nodeid in ids}
    lost = sorted(name for name, nodeid in files.items() if name in SHARED_PER_FILE and "@" not in nodeid)
    if lost:
        pytest.exit(
            f"--dist loadgroup lost the groups of {', '.join(lost)}: install pytest<9.2", returncode=4
        )


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


# ---- the host-sync guard -------------------------------------------------------------------------------

Guard = Callable[[], contextlib.AbstractContextManager[None]]
"""What the ``no_host_sync`` fixture gives: a context manager factory."""

CONVERSIONS = (
    "item",
    "tolist",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__complex__",
    "__array__",
)
"""Tensor methods that copy a value to the host."""
DATA_DEPENDENT = ("nonzero", "argwhere", "masked_select", "unique", "equal", "allclose", "is_nonzero")
"""Ops whose output shape or Python result depends on the values (a GPU sync), as methods and functions."""


class HostSyncError(AssertionError):
    """A tensor was read back to the host inside the guarded block."""


def _raiser(name: str) -> Callable[..., Any]:
    def raise_sync(*args: Any, **kwargs: Any) -> Any:
        raise HostSyncError(f"host sync inside the clipping call: {name}")

    return raise_sync


def _getitem_without_masks(original: Callable[[Tensor, Any], Tensor]) -> Callable[[Tensor, Any], Tensor]:
    def getitem(self: Tensor, index: Any) -> Tensor:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, Tensor) and p.dtype in (torch.bool, torch.uint8) for p in parts):
            raise HostSyncError("host sync inside the clipping call: boolean-mask indexing")
        return original(self, index)

    return getitem


@pytest.fixture
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Guard:
    """A context manager inside which any read of a tensor into Python raises ``HostSyncError``."""

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        with monkeypatch.context() as patch:
            for name in CONVERSIONS + DATA_DEPENDENT:
                patch.setattr(torch.Tensor, name, _raiser(f"Tensor.{name}"))
            for name in DATA_DEPENDENT:
                patch.setattr(torch, name, _raiser(f"torch.{name}"))
            patch.setattr(torch.Tensor, "__getitem__", _getitem_without_masks(torch.Tensor.__getitem__))
            yield

    return guard
