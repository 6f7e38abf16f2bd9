"""Bad input fails fast, naming the field, the value and what is allowed."""

from __future__ import annotations

import math

import pytest
import torch

from gradclip_algo import GradientClipper, apply_gradient_clipping


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


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (None, r"parameters: expected an nn.Module, a tensor, or an iterable .* got None \(NoneType\)"),
        (42, r"parameters: expected an nn.Module, .* got 42 \(int\)"),
        ("weight", r"parameters: expected an nn.Module, .* got 'weight' \(str\)"),
    ],
)
def test_parameters_of_the_wrong_kind(parameters: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        apply_gradient_clipping(parameters, "norm", 1.0)


def test_an_optimizer_in_place_of_parameters_says_what_to_pass(param: torch.nn.Parameter) -> None:
    optimizer = torch.optim.SGD([param], lr=0.1)
    with pytest.raises(TypeError, match=r"parameters: got an optimizer \(SGD\); pass the model"):
        apply_gradient_clipping(optimizer, "norm", 1.0)
    assert torch.equal(param.grad, torch.ones(3))


def test_a_used_up_generator_is_an_error() -> None:
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    parameters = model.parameters()
    apply_gradient_clipping(parameters, "norm", 1.0)
    with pytest.raises(ValueError, match=r"parameters: the iterator yielded no tensors .* read only once"):
        apply_gradient_clipping(parameters, "norm", 1.0)


@pytest.mark.parametrize("exclude", [5, 1.5, {"a": 1}])
def test_exclude_of_the_wrong_kind(param: torch.nn.Parameter, exclude: object) -> None:
    with pytest.raises(TypeError, match=r"exclude: expected a glob pattern, a callable .* got"):
        apply_gradient_clipping(param, "norm", 1.0, exclude=exclude)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64, torch.int8])
@pytest.mark.parametrize("clipping_type", ["norm", "value", "adaptive"])
def test_non_floating_grads_are_named_before_any_grad_changes(dtype: torch.dtype, clipping_type: str) -> None:
    model = torch.nn.ModuleDict({"good": torch.nn.Linear(3, 3), "odd": torch.nn.Linear(3, 3)})
    model["good"].weight.grad = torch.full((3, 3), 100.0)
    odd = torch.nn.Parameter(torch.zeros(3, dtype=dtype), requires_grad=False)
    odd.grad = torch.ones(3, dtype=dtype)
    model["odd"].register_parameter("bias", odd)
    with pytest.raises(
        TypeError, match=rf"parameters: gradient of odd\.bias has dtype {dtype}; only floating"
    ):
        apply_gradient_clipping(model, clipping_type, 0.1)
    assert torch.equal(model["good"].weight.grad, torch.full((3, 3), 100.0))


@pytest.mark.parametrize("clipping_type", ["norm", "value", "adaptive"])
def test_a_meta_parameter_fails_before_the_cpu_grads_change(clipping_type: str) -> None:
    cpu = torch.nn.Linear(3, 3)
    cpu.weight.grad = torch.full((3, 3), 100.0)
    meta = torch.nn.Linear(3, 3, device="meta")
    meta.weight.grad = torch.ones(3, 3, device="meta")
    model = torch.nn.Sequential(cpu, meta)
    with pytest.raises(ValueError, match=r"parameters: 1\.weight is on the meta device and holds no values"):
        apply_gradient_clipping(model, clipping_type, 0.1)
    assert torch.equal(cpu.weight.grad, torch.full((3, 3), 100.0))


def test_quantile_window_beyond_what_a_quantile_can_take() -> None:
    from gradclip_algo import GradientClipper

    with pytest.raises(ValueError, match=r"window: expected an integer in \[2, 16777216\], got 16777217"):
        GradientClipper("quantile", 1.0, window=2**24 + 1)


def test_spike_window_without_skip_spikes_is_an_error() -> None:
    from gradclip_algo import GradientClipper

    with pytest.raises(ValueError, match=r"spike_window: 64 has no effect without skip_spikes"):
        GradientClipper("norm", 1.0, spike_window=64)


@pytest.mark.parametrize("with_stats", ["no", 0, None])
def test_with_stats_must_be_a_bool_or_clipped(param: torch.nn.Parameter, with_stats: object) -> None:
    with pytest.raises(ValueError, match=r"with_stats: expected true, false or 'clipped', got"):
        apply_gradient_clipping(param, "norm", 1.0, with_stats=with_stats)
    assert torch.equal(param.grad, torch.ones(3))


def test_thresholds_take_0d_cpu_tensors(param: torch.nn.Parameter) -> None:
    param.grad = torch.full((3,), 2.0)
    for threshold in (torch.tensor(1.5), torch.tensor(1), torch.tensor(1.5, dtype=torch.float64)):
        clipper = GradientClipper("norm", threshold, skip_spikes=torch.tensor(6.0))
        assert type(clipper.clipping_threshold) is float and clipper.clipping_threshold == float(threshold)
        assert clipper.skip_spikes == 6.0
    stats = apply_gradient_clipping(param, "norm", torch.tensor(1.5))
    assert stats.clipped_grad_norm.item() == pytest.approx(1.5, rel=1e-5)


def test_thresholds_take_numpy_scalars(param: torch.nn.Parameter) -> None:
    """Every real number is a number: NumPy scalars clip as their Python float does."""
    np = pytest.importorskip("numpy")
    param.grad = torch.full((3,), 2.0)
    for threshold in (np.float32(1.5), np.float64(1.5), np.int64(1)):
        clipper = GradientClipper("norm", threshold, skip_spikes=np.float32(6.0))
        assert type(clipper.clipping_threshold) is float and clipper.clipping_threshold == float(threshold)
    stats = apply_gradient_clipping(param, "norm", np.float32(1.5))
    assert stats.clipped_grad_norm.item() == pytest.approx(1.5, rel=1e-5)
    options = GradientClipper("zscore", 1.0, alpha=np.float32(0.5), warmup_steps=np.int64(3)).options
    assert options.alpha == 0.5 and options.warmup_steps == 3 and type(options.warmup_steps) is int


@pytest.mark.parametrize(
    ("threshold", "message"),
    [
        (torch.tensor([1.0]), r"a tensor must be 0-d, got a torch.float32 tensor of shape \(1,\) on cpu$"),
        (torch.tensor(True), r"got a torch.bool tensor of shape \(\) on cpu, which is not a real number$"),
        (torch.tensor(-1.0), r", got -1.0 \(a Tensor\)$"),
        (torch.tensor(1.0, device="meta"), r"on meta, which holds no value$"),
    ],
)
def test_a_tensor_threshold_that_cannot_be_one_says_why(threshold: torch.Tensor, message: str) -> None:
    with pytest.raises(
        ValueError, match=r"^clipping_threshold: expected a number > 0 and finite.*" + message
    ):
        GradientClipper("norm", threshold)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_threshold_is_refused_without_a_sync() -> None:
    with pytest.raises(ValueError, match=r"cannot be read without waiting for the device"):
        GradientClipper("norm", torch.tensor(1.0, device="cuda"))


SHORT_ERRORS = {
    "param_groups": (
        lambda p, o: apply_gradient_clipping(o.param_groups, "norm", 1.0),
        "param_groups (dicts with 'params')",
    ),
    "fold_into item": (
        lambda p, o: apply_gradient_clipping(p, "norm", 1.0, fold_into=[o, "x"]),
        "got 'x' (str) at index 1",
    ),
    "process_group": (
        lambda p, o: apply_gradient_clipping(p, "norm", 1.0, process_group="pp"),
        "got 'pp' (str)",
    ),
    "predicate signature": (
        lambda p, o: apply_gradient_clipping([("w", p)], "norm", 1.0, exclude=lambda name: True),
        "<lambda>(name) cannot take those two arguments",
    ),
}


@pytest.mark.parametrize("case", SHORT_ERRORS)
def test_errors_name_the_bad_item_in_one_short_line(param: torch.nn.Parameter, case: str) -> None:
    """A TypeError whose one line names the culprit, not a repr of tensors or of an optimizer."""
    call, named = SHORT_ERRORS[case]
    with pytest.raises(TypeError) as err:
        call(param, torch.optim.SGD([param], lr=0.1))
    message = str(err.value)
    assert named in message and len(message) < 320 and message.count("\n") == 0, message
    assert "tensor(" not in message and "Parameter Group" not in message
    assert torch.equal(param.grad, torch.ones(3))
