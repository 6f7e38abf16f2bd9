"""The compiled kernel of 'value' and the row blocks it shares with the L2 norm: the float64 references and
torch's clipping on drawn parameter lists, the same results as the eager kernels, no recompile for new
sizes, and every way back to the eager kernels (the switch, the environment, torch.compile disabled or
already running, a device without them, a kernel that fails to compile).

Every test here runs with the compiled kernels on for the CPU and ``kernels.COMPILE_MIN_NUMEL =
kernels.NORM_ROWS_MIN_NUMEL = 0``, so that small tensors take these paths. Each kernel compiles once per dtype in a process (sizes are
dynamic); Inductor's on-disk cache makes later runs faster, not different. The size tests of
tests/test_value_clipping.py (which run the eager kernels) are imported below and run here compiled;
tests/test_no_sync.py checks that the compiled kernels do not sync.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from conftest import MixedModel, grads, random_grads, twin
from fuzz_strategies import StatelessCase, stateless_cases
from hypothesis import given
from test_fuzz import fuzz, run_stateless
from test_value_clipping import (  # noqa: F401
    test_clipped_flag_is_whether_the_count_is_positive,
    test_half_precision_rows_and_packs_match_torch,
    test_row_and_pack_sizes_match_torch_and_a_float64_loop,
)
from torch import Tensor, nn
from torch._dynamo.utils import counters

from gradclip_algo import GradientClipper, apply_gradient_clipping, compiled, kernels


@pytest.fixture(autouse=True, scope="module")
def _compiled_kernels() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiled, "_devices", ("cpu",))
        patch.setattr(kernels, "COMPILE_MIN_NUMEL", 0)
        patch.setattr(kernels, "NORM_ROWS_MIN_NUMEL", 0)
        yield


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


# ---- the float64 references, through the compiled kernels --------------------------------------------


@fuzz(examples=20)
@given(case=stateless_cases(types=("value", "norm")))
def test_compiled_value_and_norm_match_float64_reference_and_torch(case: StatelessCase) -> None:
    """The differential fuzz of tests/test_fuzz.py for 'value' (compiled) and 'norm' (its L2 norm over
    row blocks): every dtype, layout and size drawn there, against the float64 reference and torch's
    ``clip_grad_value_`` (bit for bit) and ``clip_grad_norm_``."""
    run_stateless(case)


# ---- the same as the eager kernels, compiled once -------------------------------------------------------


def _params(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, seed: int, device: str = "cpu"
) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        param = nn.Parameter((torch.randn(shape, generator=gen) * 0.1).to(device, dtype))
        param.grad = (torch.randn(shape, generator=gen) * 10.0 ** (i % 3 - 2)).to(device, dtype)
        params.append(param)
    return params


SHAPES = [
    [(300, 50), (7,), (3, 5, 4), (2, 2), (1100, 1000)],
    [(5000, 3), (40, 40), *[(9,)] * 30],
    [(17, 4096), (2, 3000), (4000, 300), (9, 4097)],
]
"""Sizes where rows, their parallel form, partial rows and packs differ."""


@pytest.mark.parametrize("clipping_type", ["value", "norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_equals_eager_and_new_sizes_do_not_recompile(
    monkeypatch: pytest.MonkeyPatch, clipping_type: str, dtype: torch.dtype
) -> None:
    """'value''s kernel compiles at the first call in a dtype (two forms: blocks of more and of fewer than
    PARALLEL_MIN_NUMEL elements); new sizes then reuse them. 'value' gives torch's clamp bit for bit and the
    eager kernels' count; both types give the eager paths' norms (within float32 rounding)."""
    threshold = 0.05 if clipping_type == "value" else 1.0
    apply_gradient_clipping(_params(SHAPES[0], dtype, 0), clipping_type, threshold)  # compiles, at most
    graphs = _graphs()
    for seed, shapes in enumerate(SHAPES):
        params, eager = _params(shapes, dtype, seed), _params(shapes, dtype, seed)
        stats = apply_gradient_clipping(params, clipping_type, threshold)
        with monkeypatch.context() as patch:
            patch.setattr(compiled, "_devices", ())
            want = apply_gradient_clipping(eager, clipping_type, threshold)
        for got, expected in zip(params, eager, strict=True):
            if clipping_type == "value":
                assert torch.equal(got.grad, expected.grad)
            else:  # factors within float32 rounding: a grad within one rounding of its dtype
                rtol = max(1e-5, torch.finfo(dtype).eps)
                torch.testing.assert_close(got.grad, expected.grad, rtol=rtol, atol=0)
        assert float(stats.clipped_fraction) == float(want.clipped_fraction) > 0
        for name in ("grad_norm", "clipped_grad_norm"):
            torch.testing.assert_close(getattr(stats, name), getattr(want, name), rtol=1e-5, atol=0)
    assert _graphs() == graphs, "a new size recompiled a kernel"


# ---- back to the eager kernels ---------------------------------------------------------------------------


def _sum_of_squares(x: Tensor) -> tuple[Tensor]:
    return ((x * x).sum(),)


def _recorded(calls: list[str]) -> object:
    def eager(x: Tensor) -> tuple[Tensor]:
        calls.append("eager")
        return _sum_of_squares(x)

    return eager


def test_the_switch_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_devices", compiled._devices)  # restored after the switch's calls
    calls: list[str] = []
    x = torch.arange(6.0).view(2, 3)
    compiled.set_compiled_kernels(False)
    assert compiled.compiled_kernel_devices() == ()
    assert compiled.run(_sum_of_squares, _recorded(calls), x.device, x)[0].item() == 55.0
    assert calls == ["eager"]
    compiled.set_compiled_kernels(True, cuda=True)
    assert compiled.compiled_kernel_devices() == ("cpu", "cuda")
    compiled.set_compiled_kernels(True)
    assert compiled.compiled_kernel_devices() == ("cpu",)
    with pytest.raises(ValueError, match="set_compiled_kernels: expected true or false, got 'no'"):
        compiled.set_compiled_kernels("no")  # type: ignore[arg-type]
    for value, devices in [("0", ()), ("1", ("cpu",)), (" CUDA ", ("cpu", "cuda"))]:
        monkeypatch.setenv("GRADCLIP_ALGO_COMPILE", value)
        assert compiled._from_environment() == devices
    monkeypatch.setenv("GRADCLIP_ALGO_COMPILE", "yes")
    with pytest.warns(
        UserWarning, match=r"GRADCLIP_ALGO_COMPILE: expected one of 0, 1, cuda, got 'yes'"
    ) as w:
        assert compiled._from_environment() == ("cpu",)
    assert w[0].filename == __file__


@pytest.mark.parametrize(
    "why", ["dynamo disabled", "device without compiled kernels", "inside torch.compile"]
)
def test_eager_where_compiling_is_off(why: str) -> None:
    calls: list[str] = []
    x = torch.arange(6.0).view(2, 3)
    if why == "inside torch.compile":

        @torch.compile(fullgraph=True, backend="eager")
        def outer(x: Tensor) -> Tensor:
            return compiled.run(_sum_of_squares, _recorded(calls), x.device, x)[0]

        assert outer(x).item() == 55.0  # traced: the eager form ran while tracing
    elif why == "dynamo disabled":
        with torch._dynamo.config.patch(disable=True):
            assert compiled.run(_sum_of_squares, _recorded(calls), x.device, x)[0].item() == 55.0
    else:
        assert compiled.run(_sum_of_squares, _recorded(calls), torch.device("meta"), x)[0].item() == 55.0
    assert calls == ["eager"] and all(kernel is not _sum_of_squares for kernel, _ in compiled._compiled)


def test_a_clipper_compiled_by_its_caller_runs_the_eager_kernels_inside() -> None:
    """The caller's torch.compile traces the eager kernels (no compile inside a compile): the same grads.
    (Dynamo's tracing is what differs; tests/test_compile.py runs Inductor on compiled clippers.)"""
    model = MixedModel()
    random_grads(model)
    reference = twin(model)
    clipper = GradientClipper("value", 0.05)
    torch.compile(lambda: clipper(model), backend="eager")()
    apply_gradient_clipping(reference, "value", 0.05)
    for got, want in zip(grads(model), grads(reference), strict=True):
        assert torch.equal(got, want)


def _cube_sum(x: Tensor) -> tuple[Tensor]:
    return ((x * x * x).sum(),)


def test_a_kernel_that_fails_to_compile_warns_once_and_runs_eagerly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real failure: no C++ compiler where Inductor looks for one."""
    monkeypatch.setattr(compiled, "_failed", set())
    monkeypatch.setattr(compiled, "_compiled", {})
    calls: list[str] = []

    def eager(x: Tensor) -> tuple[Tensor]:
        calls.append("eager")
        return _cube_sum(x)

    x = torch.arange(6.0).view(2, 3)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.warns(UserWarning, match="_cube_sum failed to compile.*GRADCLIP_ALGO_COMPILE=0") as w:
            assert compiled.run(_cube_sum, eager, x.device, x)[0].item() == 225.0
        assert w[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert compiled.run(_cube_sum, eager, x.device, x)[0].item() == 225.0
    assert calls == ["eager", "eager"]
    assert math.isclose(_cube_sum(x)[0].item(), 225.0)


# ---- CUDA (make gpu-check) -------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("clipping_type", ["norm", "value"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_cuda_equal_eager_and_do_not_sync(
    monkeypatch: pytest.MonkeyPatch, clipping_type: str, dtype: torch.dtype
) -> None:
    """Triton kernels: the eager kernels' grads and norms, and no synchronisation once compiled."""
    monkeypatch.setattr(compiled, "_devices", ("cpu", "cuda"))
    threshold = {"norm": 1.0, "value": 0.05}[clipping_type]
    shapes = [(5000, 3), (40, 40), *[(9,)] * 30, (17, 4096), (2, 3000)]
    params, eager = _params(shapes, dtype, 0, "cuda"), _params(shapes, dtype, 0, "cuda")
    stats = apply_gradient_clipping(params, clipping_type, threshold)
    with monkeypatch.context() as patch:
        patch.setattr(compiled, "_devices", ())
        want = apply_gradient_clipping(eager, clipping_type, threshold)
    for got, expected in zip(params, eager, strict=True):
        rtol = max(2e-6, torch.finfo(dtype).eps)
        torch.testing.assert_close(got.grad, expected.grad, rtol=rtol, atol=0)
    torch.testing.assert_close(stats.grad_norm, want.grad_norm, rtol=1e-5, atol=0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        apply_gradient_clipping(params, clipping_type, threshold)
    finally:
        torch.cuda.set_sync_debug_mode("default")
