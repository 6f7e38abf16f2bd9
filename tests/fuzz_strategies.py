"""Hypothesis strategies of the differential fuzz (tests/test_fuzz.py), and the cases they draw.

- random model-like parameter lists: :class:`TensorSpec` / :class:`ModelSpec` (0-D to 4-D tensors whose
  sizes sit on and around the size constants where the code changes path, four dtypes, strided grads,
  empty and shared tensors, ``None`` grads, per-tensor magnitudes from 1e-30 to 1e30), and the helpers that
  turn a spec into parameters with grads;
- the cases of each fuzz test: :class:`StatelessCase`, :class:`StatefulCase` and :class:`FoldCase`, with
  their strategies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from gradclip_algo import kernels

# ---------------------------------------------------------------------------------------------------------
# The sizes where the implementation changes code path (kernels.SIZE_LIMITS: rows and packs, the one-thread
# and compile thresholds, the AGC stack, the norm's row blocks, the CPU reuse limit); AGC stacks tensors of
# numel * 4 <= its buffer.
BOUNDARY_SIZES: tuple[int, ...] = tuple(sorted({*kernels.SIZE_LIMITS, kernels.STACK_NUMEL // 4}))
BOUNDARY_OFFSETS = (-3, -2, -1, 0, 1, 2, 3)  # every boundary size is drawn this many elements either side
FP32_SUM_SAFE_EXP = 9
"""Grads that are not float64 are drawn at most 10^9 · N(0, 1): then no float32 sum of |g|^p (p <= 3) over
the sizes drawn here overflows. Beyond that the library, like torch, sums in float32 and its norm is inf;
that regime is pinned in tests/test_fuzz.py (test_pinned_float32_overflow_is_torchs)."""
FP32_SQUARE_SAFE_EXP = -18
"""The stateful types' fuzz draws grads that are not float64 at least 10^-18 · N(0, 1): their squares' sum
stays above float32's smallest normal, so a norm keeps float32's precision. Below it the power sum loses
digits, as torch's norm does (tests/fuzz_checks.py: ``underflow_atol``); the stateless types' coefficient
is then 1, but the stateful types' thresholds are such norms, and their factors carry that loss."""
LARGE_NUMEL = 1 << 19  # boundary sizes from here on are drawn for at most one tensor in ~10 % of models
# ---------------------------------------------------------------------------------------------------------

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
NONFINITE_MODES = ("propagate", "error", "skip", "zero")


# =========================================================================================================
# Random model-like parameter lists
# =========================================================================================================


@dataclass(frozen=True)
class TensorSpec:
    """One parameter: grads ``N(0, 1)·10^scale_exp`` drawn in float64 and cast to ``dtype`` (so fp16 may hold
    inf and 0), weights ``N(0, 1)·10^weight_exp`` (``None``: zeros, AGC's ε floor). ``layout``:
    'contiguous', 'transposed' (a transposed view, 2+ dims) or 'sliced' (every other element of the last dim)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    scale_exp: int
    weight_exp: int | None
    layout: str
    has_grad: bool
    seed: int


@dataclass(frozen=True)
class ModelSpec:
    """Parameters passed as ``form`` ('list', 'pairs', 'iterator', 'module' or 'tensor'), in ``order``
    (indices into ``tensors``; a repeated index passes one Parameter twice)."""

    tensors: tuple[TensorSpec, ...]
    order: tuple[int, ...]
    form: str


def shape_for(draw: st.DrawFn, numel: int, ndim: int) -> tuple[int, ...]:
    """A shape of ``ndim`` dims (0-D only for one element) and exactly ``numel`` elements: dims split off
    as random divisors."""
    if ndim == 0:
        return ()
    if numel == 0:
        dims = [draw(st.integers(1, 5)) for _ in range(ndim)]
        dims[draw(st.integers(0, ndim - 1))] = 0
        return tuple(dims)
    dims, rest = [], numel
    for _ in range(ndim - 1):
        divisors = [d for d in range(1, math.isqrt(rest) + 1) if rest % d == 0]
        divisors += [rest // d for d in divisors]
        d = draw(st.sampled_from(sorted(set(divisors))))
        dims.append(d)
        rest //= d
    dims.append(rest)
    return tuple(draw(st.permutations(dims)))


def draw_numel(draw: st.DrawFn, allow_large: bool) -> int:
    """Small (30 %), a boundary size ± a few (40 %), or a size between boundaries (log-uniform from
    256, 30 %); sizes from ``LARGE_NUMEL`` on only when allowed."""
    kind = draw(st.integers(0, 9))
    if kind < 3:
        return draw(st.integers(0, 40))
    if kind >= 7:
        exponent = draw(st.integers(8, LARGE_NUMEL.bit_length() - 2))
        return draw(st.integers(1 << exponent, 2 << exponent))
    sizes = [s for s in BOUNDARY_SIZES if allow_large or s < LARGE_NUMEL]
    return max(0, draw(st.sampled_from(sizes)) + draw(st.sampled_from(BOUNDARY_OFFSETS)))


@st.composite
def tensor_specs(
    draw: st.DrawFn, dtype: torch.dtype | None, allow_large: bool, scale_exps: tuple[int, int]
) -> TensorSpec:
    numel = draw_numel(draw, allow_large)
    ndim = 0 if numel == 1 and draw(st.booleans()) else draw(st.integers(1, 4))
    shape = shape_for(draw, numel, ndim)
    layouts = ["contiguous", "sliced"] if ndim >= 1 else ["contiguous"]
    if ndim >= 2:
        layouts.append("transposed")
    dtype = dtype if dtype is not None else draw(st.sampled_from(FLOAT_DTYPES))
    high = scale_exps[1] if dtype == torch.float64 else min(scale_exps[1], FP32_SUM_SAFE_EXP)
    return TensorSpec(
        shape=shape,
        dtype=dtype,
        scale_exp=draw(st.integers(min(scale_exps[0], high), high)),
        weight_exp=draw(st.one_of(st.none(), st.integers(-3, 3))),
        layout=draw(st.sampled_from(layouts)),
        has_grad=draw(st.integers(0, 9)) > 0,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def model_specs(
    draw: st.DrawFn, scale_exps: tuple[int, int] = (-30, 30), max_tensors: int = 6, large: bool = True
) -> ModelSpec:
    """1..``max_tensors`` tensors, one dtype or mixed, at most one of ``LARGE_NUMEL`` or more elements
    (none unless ``large``)."""
    count = draw(st.integers(1, max_tensors))
    dtype = None if draw(st.booleans()) else draw(st.sampled_from(FLOAT_DTYPES))
    large_at = draw(st.integers(0, 9 * count)) if large and draw(st.integers(0, 9)) == 9 else -1
    tensors = tuple(draw(tensor_specs(dtype, i == large_at, scale_exps)) for i in range(count))
    order = list(range(count))
    if draw(st.integers(0, 4)) == 0:  # a shared tensor: the same Parameter passed twice
        order.insert(draw(st.integers(0, count)), draw(st.integers(0, count - 1)))
    forms = ["list", "pairs", "iterator", "module"] + (["tensor"] if count == 1 and len(order) == 1 else [])
    return ModelSpec(tensors, tuple(order), draw(st.sampled_from(forms)))


def grad_values(spec: TensorSpec, scale_exp: int, seed: int) -> Tensor:
    """A grad for ``spec`` in its layout: allocated in the grad's dtype, then viewed (transposed/sliced)."""
    gen = torch.Generator().manual_seed(seed)
    shape = list(spec.shape)
    if spec.layout == "transposed":
        shape[-2], shape[-1] = shape[-1], shape[-2]
    elif spec.layout == "sliced":
        shape[-1] *= 2
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * 10.0**scale_exp).to(spec.dtype)
    if spec.layout == "transposed":
        return values.transpose(-1, -2)
    if spec.layout == "sliced":
        return values[..., ::2]
    return values


def make_params(model: ModelSpec) -> tuple[list[nn.Parameter], Callable[[], Any]]:
    """The distinct parameters (in first-use order), and a function that makes the ``parameters`` argument
    passing them in ``model.form`` (afresh each call: an iterator is spent after one use)."""
    distinct: list[nn.Parameter] = []
    for spec in model.tensors:
        gen = torch.Generator().manual_seed(spec.seed + 1)
        weight = torch.zeros(spec.shape, dtype=torch.float64)
        if spec.weight_exp is not None:
            weight = torch.randn(spec.shape, generator=gen, dtype=torch.float64) * 10.0**spec.weight_exp
        param = nn.Parameter(weight.to(spec.dtype))
        if spec.has_grad:
            param.grad = grad_values(spec, spec.scale_exp, spec.seed)
        distinct.append(param)
    passed = [distinct[i] for i in model.order]
    module = nn.Module()
    for k, param in enumerate(passed):
        module.register_parameter(f"p{k}", param)
    forms: dict[str, Callable[[], Any]] = {
        "list": lambda: passed,
        "pairs": lambda: [(f"p{i}", distinct[i]) for i in model.order],
        "iterator": lambda: iter(passed),
        "tensor": lambda: passed[0],
        "module": lambda: module,
    }
    return distinct, forms[model.form]


def with_grads(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.grad is not None]


def float64_grads(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad.detach().to(torch.float64) for p in params]


def total_numel(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def twins(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Independent copies (weights and grads) for torch's clipping."""
    copies = []
    for param in params:
        copy = nn.Parameter(param.detach().clone())
        copy.grad = param.grad.detach().clone()
        copies.append(copy)
    return copies


def flat_to_index(position: int, shape: torch.Size) -> tuple[int, ...]:
    """The index of element ``position`` of a tensor of ``shape`` in row-major order."""
    index = []
    for size in reversed(shape):
        position, rest = divmod(position, size)
        index.append(rest)
    return tuple(reversed(index))


def all_finite(grads: list[Tensor]) -> bool:
    return all(bool(torch.isfinite(g).all()) for g in grads)


# =========================================================================================================
# The cases of each fuzz test
# =========================================================================================================


@st.composite
def thresholds(draw: st.DrawFn) -> float:
    return draw(st.sampled_from([1.0, 2.5, 7.0])) * 10.0 ** draw(st.integers(-3, 3))


@dataclass(frozen=True)
class StatelessCase:
    model: ModelSpec
    clipping_type: str
    threshold: float
    norm_type: float
    eps: float | None
    nonfinite: str
    error_if_nonfinite: bool
    with_stats: bool | str
    inject: tuple[
        tuple[int, int, float], ...
    ]  # (tensor index, flat position, inf/-inf/NaN) written into grads


@st.composite
def stateless_cases(
    draw: st.DrawFn,
    inject: bool = False,
    scale_exps: tuple[int, int] = (-30, 30),
    plain: bool = False,
    types: tuple[str, ...] = ("norm", "value", "adaptive", "norm"),
) -> StatelessCase:
    """A stateless call; ``plain``: with stats and no nonfinite handling (so that other bugs do not hide
    the crashes behind them)."""
    model = draw(model_specs(scale_exps=scale_exps))
    clipping_type = draw(st.sampled_from(types))
    nonfinite = "propagate" if plain else draw(st.sampled_from(NONFINITE_MODES))
    injected = []
    if inject:
        for _ in range(draw(st.integers(1, 3))):
            index = draw(st.integers(0, len(model.tensors) - 1))
            numel = math.prod(model.tensors[index].shape)
            if numel and model.tensors[index].has_grad:
                value = draw(st.sampled_from([math.inf, -math.inf, math.nan]))
                injected.append((index, draw(st.integers(0, numel - 1)), value))
    return StatelessCase(
        model=model,
        clipping_type=clipping_type,
        threshold=draw(thresholds()),
        norm_type=draw(st.sampled_from([2.0, 1.0, math.inf, 3.0, 0.5])),
        eps=draw(st.one_of(st.none(), st.sampled_from([1e-6, 1e-3, 0.1]))),
        nonfinite=nonfinite,
        error_if_nonfinite=not plain and nonfinite in ("propagate", "error") and draw(st.booleans()),
        with_stats=True if plain else draw(st.sampled_from([True, True, True, False, "clipped"])),
        inject=tuple(injected),
    )


@dataclass(frozen=True)
class StatefulCase:
    model: ModelSpec
    clipping_type: str
    threshold: float
    options: tuple[tuple[str, Any], ...]
    skip_spikes: float | None
    spike_window: int
    step_exps: tuple[int, ...]  # every grad of step t is N(0, 1)·10^(scale_exp + step_exps[t])


@st.composite
def stateful_cases(draw: st.DrawFn) -> StatefulCase:
    model = draw(model_specs(scale_exps=(-20, 20), max_tensors=4, large=False))
    clipping_type = draw(st.sampled_from(["quantile", "zscore", "adagc", "norm", "value", "adaptive"]))
    options: list[tuple[str, Any]] = []
    if clipping_type == "quantile":
        options = [
            ("percentile", draw(st.sampled_from([10.0, 1.0, 50.0, 90.0, 100.0]))),
            ("window", draw(st.integers(2, 6))),
        ]
    elif clipping_type == "zscore":
        options = [
            ("alpha", draw(st.sampled_from([0.97, 0.5, 0.1]))),
            ("z_threshold", draw(st.sampled_from([2.5, 1.0, 0.5]))),
            ("warmup_steps", draw(st.integers(2, 4))),
        ]
    elif clipping_type == "adagc":
        options = [
            ("relative_threshold", draw(st.sampled_from([1.05, 0.5, 2.0]))),
            ("beta", draw(st.sampled_from([0.98, 0.5]))),
            ("warmup_steps", draw(st.integers(1, 3))),
        ]
    stateless = clipping_type in ("norm", "value", "adaptive")
    skip_spikes = draw(st.sampled_from([1.0, 3.0])) if stateless or draw(st.booleans()) else None
    steps = draw(st.integers(3, 8))
    return StatefulCase(
        model=model,
        clipping_type=clipping_type,
        threshold=draw(st.one_of(thresholds(), st.just(math.inf))) if not stateless else draw(thresholds()),
        options=tuple(options),
        skip_spikes=skip_spikes,
        spike_window=draw(st.integers(4, 6)),
        step_exps=tuple(draw(st.integers(-2, 6)) for _ in range(steps)),
    )


@dataclass(frozen=True)
class FoldCase:
    model: ModelSpec
    norm_type: float
    threshold: float
    nonfinite: str
    nan_step: int | None


@st.composite
def fold_cases(draw: st.DrawFn) -> FoldCase:
    """Parameter lists the fused optimizers take (float32 and float64; no shared tensor), norm clipping
    at a drawn p and threshold, and maybe a NaN grad on one step with ``nonfinite='skip'``."""
    model = draw(model_specs(scale_exps=(-4, 4), max_tensors=5, large=False))
    tensors = tuple(
        TensorSpec(t.shape, draw(st.sampled_from([torch.float32, torch.float64])), *astuple(t)[2:])
        for t in model.tensors
    )
    nonfinite = draw(st.sampled_from(["propagate", "skip"]))
    return FoldCase(
        ModelSpec(tensors, tuple(range(len(tensors))), draw(st.sampled_from(["list", "pairs", "module"]))),
        norm_type=draw(st.sampled_from([1.0, 2.0, math.inf])),
        threshold=draw(thresholds()),
        nonfinite=nonfinite,
        nan_step=draw(st.sampled_from([None, 1, 2])) if nonfinite == "skip" else None,
    )
