"""The clipping hot path never waits for the device: no tensor is read back into Python.

On CPU every way of turning a tensor into a Python value (``item``, ``bool``, ``float``, ``tolist``, ...)
and the data-dependent-shape ops that synchronise on a GPU (``nonzero``, boolean-mask indexing, ...) are
made to raise while the clipping call runs. On a GPU, ``torch.cuda.set_sync_debug_mode('error')`` does the
same for real synchronisations.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import HostSyncError, MixedModel, grads, random_grads, twin
from torch import Tensor, nn

from gradclip_algo import GradientClipper, apply_gradient_clipping, compiled, kernels

NO_SYNC_CASES = [
    pytest.param("norm", 1.0, {"norm_type": 1.0}, id="norm-p1"),
    pytest.param("norm", 1.0, {}, id="norm-p2"),
    pytest.param("norm", 1.0, {"norm_type": math.inf}, id="norm-pinf"),
    pytest.param("value", 0.1, {}, id="value"),
    pytest.param("adaptive", 0.01, {}, id="adaptive"),
    pytest.param("norm", 1.0, {"nonfinite": "zero", "exclude": "norm.*"}, id="norm-zero-exclude"),
]


SYNCING_CALLS: dict[str, Callable[[Tensor], object]] = {
    "if tensor": lambda t: 1 if t.sum() > 0 else 0,
    "item": lambda t: t.sum().item(),
    "float": lambda t: float(t.sum()),
    "int": lambda t: int(t.sum()),
    "index": lambda t: [0, 1, 2][t.argmax()],
    "format": lambda t: f"{t.sum():.3f}",
    "tolist": lambda t: t.tolist(),
    "nonzero": lambda t: (t > 0).nonzero(),
    "torch.nonzero": lambda t: torch.nonzero(t > 0),
    "mask indexing": lambda t: t[t > 0],
    "equal": lambda t: torch.equal(t, t),
    "max of a tensor list": lambda t: max(list(t)),
}


NUMPY_CALL = pytest.param(
    lambda t: t.numpy(),
    id="numpy",
    marks=pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="numpy is not installed"),
)


@pytest.mark.parametrize(
    "call", [*(pytest.param(call, id=name) for name, call in SYNCING_CALLS.items()), NUMPY_CALL]
)
def test_the_guard_catches_every_kind_of_sync(no_host_sync, call: Callable[[Tensor], object]) -> None:
    tensor = torch.tensor([0.5, -1.0, 2.0])
    call(tensor)  # fine outside the guard
    with no_host_sync(), pytest.raises(HostSyncError):
        call(tensor)


def test_the_guard_catches_a_clipper_that_branches_on_the_norm(no_host_sync, mixed_model: MixedModel) -> None:
    random_grads(mixed_model)

    def syncing_clip(model: MixedModel, max_norm: float) -> None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if norm > max_norm:  # the Python branch is the sync
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)

    with no_host_sync(), pytest.raises(HostSyncError, match="__bool__"):
        syncing_clip(mixed_model, 1.0)
    with no_host_sync():
        torch.nn.utils.clip_grad_norm_(mixed_model.parameters(), 1.0)  # torch's own clip does not sync


@pytest.mark.parametrize(("clipping_type", "threshold", "options"), NO_SYNC_CASES)
def test_apply_gradient_clipping_does_not_sync(
    no_host_sync, mixed_model: MixedModel, clipping_type: str, threshold: float, options: dict[str, Any]
) -> None:
    random_grads(mixed_model)
    reference = twin(mixed_model)
    expected = apply_gradient_clipping(reference, clipping_type, threshold, **options)
    with no_host_sync():
        stats = apply_gradient_clipping(mixed_model, clipping_type, threshold, **options)
    for got, want in zip(grads(mixed_model), grads(reference), strict=True):
        assert torch.equal(got, want)
    assert 0.0 < stats.clipped_fraction.item() <= 1.0  # it did clip
    assert torch.equal(stats.grad_norm, expected.grad_norm)


def test_value_measuring_only_its_clipped_flag_does_not_sync(no_host_sync, mixed_model: MixedModel) -> None:
    random_grads(mixed_model)
    reference = twin(mixed_model)
    apply_gradient_clipping(reference, "value", 0.1)
    with no_host_sync():
        stats = apply_gradient_clipping(mixed_model, "value", 0.1, with_stats="clipped")
    for got, want in zip(grads(mixed_model), grads(reference), strict=True):
        assert torch.equal(got, want)
    assert stats.clipped_fraction.item() == 1.0


@pytest.mark.parametrize("clipping_type", ["norm", "value", "adaptive"])
def test_a_clipper_called_every_step_does_not_sync(
    no_host_sync, mixed_model: MixedModel, clipping_type: str
) -> None:
    clipper = GradientClipper(clipping_type, 0.05)
    reference = twin(mixed_model)
    for step in range(3):
        random_grads(mixed_model, seed=step)
        random_grads(reference, seed=step)
        with no_host_sync():
            stats = clipper(mixed_model)
        apply_gradient_clipping(reference, clipping_type, 0.05)
        for got, want in zip(grads(mixed_model), grads(reference), strict=True):
            assert torch.equal(got, want)
        assert stats.clipped_fraction.item() > 0.0


@pytest.mark.parametrize(
    ("clipping_type", "with_stats"),
    [("norm", True), ("value", True), ("value", "clipped")],
)
def test_the_compiled_kernels_do_not_sync(
    monkeypatch: pytest.MonkeyPatch,
    no_host_sync,
    mixed_model: MixedModel,
    clipping_type: str,
    with_stats: bool | str,
) -> None:
    """The compiled kernel of 'value' and the norm's row blocks (on for this small model, with a grad of 4
    rows and a partial one), called step after step once compiled."""
    monkeypatch.setattr(compiled, "_devices", ("cpu",))
    monkeypatch.setattr(kernels, "COMPILE_MIN_NUMEL", 0)
    monkeypatch.setattr(kernels, "NORM_ROWS_MIN_NUMEL", 0)
    model = nn.ModuleList([mixed_model, nn.Linear(128, 130)])
    clipper = GradientClipper(clipping_type, 0.05)
    random_grads(model)
    reference = twin(model)
    clipper(reference, with_stats=with_stats)  # compiles, outside the guard
    for step in range(2):
        random_grads(model, seed=step + 1)
        random_grads(reference, seed=step + 1)
        with no_host_sync():
            stats = clipper(model, with_stats=with_stats)
        apply_gradient_clipping(reference, clipping_type, 0.05)
        for got, want in zip(grads(model), grads(reference), strict=True):
            assert torch.equal(got, want)
        assert stats.clipped_fraction.item() > 0.0


@pytest.mark.parametrize("nonfinite", ["skip", "error"])
def test_nonfinite_skip_and_error_sync_as_documented(
    no_host_sync, mixed_model: MixedModel, nonfinite: str
) -> None:
    random_grads(mixed_model)
    with no_host_sync(), pytest.raises(HostSyncError):
        apply_gradient_clipping(mixed_model, "norm", 1.0, nonfinite=nonfinite)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("clipping_type", "threshold", "options"), NO_SYNC_CASES)
def test_no_sync_on_cuda(clipping_type: str, threshold: float, options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = MixedModel().cuda()
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    clipper = GradientClipper(clipping_type, threshold, **options)
    clipper(model)  # first call outside the check: lazy CUDA initialisation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            clipper(model)
        apply_gradient_clipping(model, clipping_type, threshold, **options)
        for nonfinite in ("skip", "error"):
            with pytest.raises(RuntimeError, match="synchroniz"):
                apply_gradient_clipping(model, "norm", 1.0, nonfinite=nonfinite)
    finally:
        torch.cuda.set_sync_debug_mode("default")
