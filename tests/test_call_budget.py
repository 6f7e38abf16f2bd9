"""The Python work of one default clipping call, counted: the calls made in the package's own code, the
modules they run in, and the switches between modules (consecutive calls in different modules).

The budget of the default norm call is 30 calls and 12 switches (torch's ``clip_grad_norm_`` makes 9
calls in one module); a prebuilt clipper skips the functional layer's lookup, and does less. A stage added
to the hot path shows up here before it shows up in a benchmark. Counted with no fold waiting for its step
anywhere in the process (one that is adds the stage that settles it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from types import FrameType

import pytest
import torch
from torch import nn

import gradclip_algo
from gradclip_algo import GradientClipper, apply_gradient_clipping
from gradclip_algo.folding import ACTIVE_LEDGERS

PACKAGE = str(Path(gradclip_algo.__file__).parent)


@pytest.fixture(autouse=True)
def _no_fold_waiting() -> Iterator[None]:
    """Ledgers that earlier tests of this process left active (their optimizers not yet collected) are
    set aside for the count, and put back."""
    active = list(ACTIVE_LEDGERS)
    ACTIVE_LEDGERS.clear()
    yield
    ACTIVE_LEDGERS.update(active)


def _calls_in_package(call: Callable[[], object]) -> list[str]:
    """The module (file) of every Python call made inside the package while ``call()`` runs."""
    modules: list[str] = []

    def profile(frame: FrameType, event: str, _: object) -> None:
        if event == "call" and frame.f_code.co_filename.startswith(PACKAGE):
            modules.append(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return modules


def _switches(modules: list[str]) -> int:
    return sum(a != b for a, b in pairwise(modules))


def _mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    model(torch.randn(4, 8)).sum().backward()
    return model


def test_default_norm_call_stays_within_its_budget() -> None:
    model = _mlp()
    apply_gradient_clipping(model, "norm", 1.0)  # builds and caches the clipper
    modules = _calls_in_package(lambda: apply_gradient_clipping(model, "norm", 1.0))
    assert len(modules) <= 30, f"{len(modules)} calls: {modules}"
    assert _switches(modules) <= 12, f"{_switches(modules)} switches: {modules}"


def test_prebuilt_clipper_does_less_than_the_functional_call() -> None:
    model = _mlp()
    clipper = GradientClipper("norm", 1.0)
    clipper(model)
    apply_gradient_clipping(model, "norm", 1.0)
    prebuilt = _calls_in_package(lambda: clipper(model))
    functional = _calls_in_package(lambda: apply_gradient_clipping(model, "norm", 1.0))
    assert len(prebuilt) < len(functional)
    assert _switches(prebuilt) < _switches(functional)
