"""Folding into fused optimizers: the clipping factor as ``grad_scale``, a skip as ``found_inf``.

The reference is the same training without folding: the grads rescaled in place (and equal to torch's
``clip_grad_norm_``), a skip as grads set to ``None``. Both runs get the same grads every step (set, not
back-propagated), so the clipper's statistics must match bitwise and the weights within rounding
(``g · c`` against the kernel's ``g / (1 / c)``); a skipped step must leave weights and optimizer state
bitwise as they were.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import Guard
from torch import Tensor, nn

from gradclip_algo import FoldError, GradientClipper, apply_gradient_clipping

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, fused=True),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, fused=True),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.1, fused=True),
}
STEPS = 8
SPIKE_STEP = 6  # its grads are 1e4 times larger: skip_spikes skips it
NAN_STEP = 4  # one grad element is NaN: nonfinite='skip' skips it


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3), nn.LayerNorm(3))


def set_grads(module: nn.Module, step: int, nan: bool = False) -> None:
    """The same grads for every run at ``step``: norms around 1-3, larger at ``SPIKE_STEP``."""
    gen = torch.Generator().manual_seed(step)
    scale = 1e4 if step == SPIKE_STEP else 1.0 + (step % 3)
    for i, param in enumerate(module.parameters()):
        param.grad = torch.randn(param.shape, generator=gen) * scale / (i + 1)
    if nan:
        next(module.parameters()).grad[0, 0] = float("nan")


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    state = optimizer.state_dict()["state"]
    return [torch.as_tensor(v) for i in sorted(state) for _, v in sorted(state[i].items())]


def clipper_state(clipper: GradientClipper) -> list[Tensor]:
    return [t for part in clipper.state_dict().values() for _, t in sorted(part.items())]


def assert_same(actual: list[Tensor], expected: list[Tensor], exact: bool) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if exact:
            torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
        else:
            torch.testing.assert_close(a, e, rtol=2e-5, atol=1e-6)


CASES = [
    pytest.param("norm", 1.5, {}, id="norm"),
    pytest.param("norm", 2.5, {"norm_type": math.inf}, id="norm-pinf"),  # a fold needs λ >= 2 for p = inf
    pytest.param("norm", 1.5, {"nonfinite": "skip", "skip_spikes": 3.0, "spike_window": 4}, id="norm-skips"),
    pytest.param(
        "quantile",
        math.inf,
        {"percentile": 50.0, "window": 4, "skip_spikes": 3.0, "spike_window": 4},
        id="quantile",
    ),
    pytest.param("zscore", 2.0, {"warmup_steps": 3, "nonfinite": "skip"}, id="zscore"),
    pytest.param("value", 0.05, {"nonfinite": "skip", "skip_spikes": 3.0, "spike_window": 4}, id="value"),
    pytest.param("adaptive", 0.1, {"skip_spikes": 3.0, "spike_window": 4}, id="adaptive"),
]


@pytest.mark.parametrize("optimizer_name", OPTIMIZERS)
@pytest.mark.parametrize(("clipping_type", "threshold", "options"), CASES)
def test_folded_equals_unfolded(
    optimizer_name: str, clipping_type: str, threshold: float, options: dict[str, Any]
) -> None:
    runs = {}
    for folded in (False, True):
        net = model()
        optimizer = OPTIMIZERS[optimizer_name](list(net.parameters()))
        clipper = GradientClipper(
            clipping_type, threshold, fold_into=optimizer if folded else None, **options
        )
        runs[folded] = (net, optimizer, clipper)
    skips_folded = 0
    for step in range(STEPS):
        results = {}
        for folded, (net, optimizer, clipper) in runs.items():
            set_grads(net, step, nan=step == NAN_STEP and options.get("nonfinite") == "skip")
            weights_before = [p.detach().clone() for p in net.parameters()]
            state_before = optimizer_state(optimizer)
            stats = clipper(net)
            assert stats is not None
            optimizer.step()
            assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
            skipped = bool(stats.skipped)
            if skipped:  # bitwise untouched, folded or not
                assert_same([p.detach() for p in net.parameters()], weights_before, exact=True)
                assert_same(optimizer_state(optimizer), state_before, exact=True)
            results[folded] = (stats, skipped)
        (plain, plain_skipped), (folded_stats, folded_skipped) = results[False], results[True]
        assert plain_skipped == folded_skipped
        assert plain.folded is False
        # the norm factor folds from the first step; skips once the optimizer has state (the second)
        if clipping_type == "norm" or step > 0:
            assert folded_stats.folded, step
        skips_folded += folded_skipped and folded_stats.folded
        for name in ("grad_norm", "clipped_grad_norm", "clipped_fraction"):
            torch.testing.assert_close(
                getattr(folded_stats, name), getattr(plain, name), rtol=1e-6, atol=0, equal_nan=True
            )
        assert_same(clipper_state(runs[True][2]), clipper_state(runs[False][2]), exact=True)
        assert_same(optimizer_state(runs[True][1]), optimizer_state(runs[False][1]), exact=False)
        assert_same(
            [p.detach() for p in runs[True][0].parameters()],
            [p.detach() for p in runs[False][0].parameters()],
            exact=False,
        )
    if options.get("skip_spikes") or options.get("nonfinite") == "skip":
        assert skips_folded >= 1  # the cases do skip, on the device


def test_folded_norm_matches_torch_clip_grad_norm() -> None:
    """After ``step()`` the grads hold the clipped values, which equal torch's, and so do the weights."""
    ours, reference = model(), model()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.01, fused=True)
    opt_reference = torch.optim.AdamW(reference.parameters(), lr=0.01, fused=True)
    for step in range(3):
        set_grads(ours, step)
        set_grads(reference, step)
        unclipped = [p.grad.clone() for p in ours.parameters()]
        stats = apply_gradient_clipping(ours, "norm", 0.5, fold_into=opt_ours)
        assert stats is not None and stats.folded and stats.coefficient is not None
        assert stats.threshold is not None and float(stats.threshold) == 0.5
        for param, grad in zip(ours.parameters(), unclipped, strict=True):
            assert torch.equal(param.grad, grad)  # folded: untouched until step()
        norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        torch.testing.assert_close(stats.grad_norm, norm)
        opt_ours.step()
        opt_reference.step()
        for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_folded_skips_without_host_sync(no_host_sync: Guard) -> None:
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, fused=True)
    clipper = GradientClipper(
        "zscore", 2.0, fold_into=optimizer, nonfinite="skip", skip_spikes=3.0, spike_window=4, warmup_steps=2
    )
    for step in range(SPIKE_STEP):  # warm up: optimizer state, clipper statistics, spike window
        set_grads(net, step)
        clipper(net)
        optimizer.step()
    for step, nan in ((SPIKE_STEP, False), (SPIKE_STEP + 1, True), (SPIKE_STEP + 2, False)):
        set_grads(net, step, nan=nan)
        weights = [p.detach().clone() for p in net.parameters()]
        with no_host_sync():
            stats = clipper(net)
        assert stats is not None and stats.folded and isinstance(stats.skipped, Tensor)
        assert all(p.grad is not None for p in net.parameters())  # a folded skip keeps the grads
        optimizer.step()
        unchanged = all(torch.equal(w, p) for w, p in zip(weights, net.parameters(), strict=True))
        assert bool(stats.skipped) == (step != SPIKE_STEP + 2) == unchanged


def test_first_step_skip_is_not_folded() -> None:
    """Without optimizer state a found_inf skip would still create it: the grads are dropped instead."""
    net = model()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, fused=True)
    set_grads(net, 0, nan=True)
    stats = apply_gradient_clipping(net, "norm", 1.0, fold_into=optimizer, nonfinite="skip")
    assert stats is not None and stats.skipped is True and not stats.folded
    assert all(p.grad is None for p in net.parameters())
    optimizer.step()
    assert not optimizer.state


def test_grad_scaler_is_never_overridden() -> None:
    """Under a GradScaler the step falls back to rescaling the grads and to dropping them for a skip."""
    runs = {}
    for folded in (False, True):
        net = model()
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        clipper = GradientClipper(
            "norm", 1.0, fold_into=optimizer if folded else None, skip_spikes=3.0, spike_window=4
        )
        for step in range(STEPS):
            set_grads(net, step)
            loss_scale = scaler.scale(torch.ones(()))
            for param in net.parameters():
                param.grad *= loss_scale  # as scaler.scale(loss).backward() would leave them
            scaler.unscale_(optimizer)
            clipper(net)
            weights = [p.detach().clone() for p in net.parameters()]
            scaler.step(optimizer)
            scaler.update()
            if step == SPIKE_STEP:
                assert all(torch.equal(w, p) for w, p in zip(weights, net.parameters(), strict=True))
        runs[folded] = net
    for a, b in zip(runs[True].parameters(), runs[False].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_stale_factor_is_not_applied_twice() -> None:
    """A call that does not fold clears what an earlier call handed to a step that never ran."""
    net, reference = model(), model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, fused=True)
    clipper = GradientClipper("norm", 0.5)
    set_grads(net, 1)
    clipper(net, fold_into=optimizer)  # folded, but no step follows
    set_grads(net, 2)
    set_grads(reference, 2)
    clipper(net, fold_into=optimizer)
    optimizer.step()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for a, b in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("make_optimizer", "options", "reason"),
    [
        (lambda params: torch.optim.AdamW(params, lr=0.01), {}, "AdamW reads no grad_scale"),
        (
            lambda params: torch.optim.AdamW(params, lr=0.01, fused=True),
            {"exclude": "2.*"},
            "do not step exactly the clipped parameters",
        ),
    ],
    ids=["not-fused", "exclude"],
)
def test_falls_back_with_a_warning(
    make_optimizer: Callable[[Any], torch.optim.Optimizer], options: dict[str, Any], reason: str
) -> None:
    net = model()
    reference = copy.deepcopy(net)
    optimizer = make_optimizer(net.parameters())
    clipper = GradientClipper("norm", 0.5, fold_into=optimizer, **options)
    set_grads(net, 1)
    set_grads(reference, 1)
    with pytest.warns(UserWarning, match=reason):
        stats = clipper(net)
    assert stats is not None and not stats.folded
    excluded = options.get("exclude", "none").removesuffix("*")
    clipped = [p for name, p in reference.named_parameters() if not name.startswith(excluded)]
    torch.nn.utils.clip_grad_norm_(clipped, 0.5)
    for a, b in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper(net)  # once per clipper


def test_fold_into_must_be_an_optimizer() -> None:
    with pytest.raises(TypeError, match=r"fold_into: expected a torch.optim.Optimizer .* got 'adamw'"):
        GradientClipper("norm", 1.0, fold_into="adamw")


def fit_with_fused_adamw(algorithm: Any, scale: float, **trainer_args: Any) -> nn.Module:
    """8 batches of a Composer Trainer with fused AdamW and ``algorithm``; returns the model."""
    from composer import Trainer
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    gen = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(64, 6, generator=gen) * scale, torch.randint(0, 3, (64,), generator=gen)
    net = ComposerClassifier(model(), num_classes=3)
    Trainer(
        model=net,
        train_dataloader=DataLoader(TensorDataset(inputs, targets), batch_size=8),
        optimizers=torch.optim.AdamW(net.parameters(), lr=0.01, fused=True),
        algorithms=[algorithm],
        max_duration="8ba",
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        seed=0,
        **trainer_args,
    ).fit()
    return net


@pytest.mark.composer
def test_composer_trainer_folds_by_default() -> None:
    """A Trainer with fused AdamW: folded by default, equal to fold_into_optimizer=False."""
    pytest.importorskip("composer")
    from composer.callbacks import OptimizerMonitor
    from composer.loggers import InMemoryLogger

    from gradclip_algo import GradClipAlgo

    runs, monitored = {}, {}
    for fold in (True, False):
        metrics = InMemoryLogger()
        algorithm = GradClipAlgo("norm", 0.1, fold_into_optimizer=fold, skip_spikes=50.0, spike_window=4)
        runs[fold] = fit_with_fused_adamw(
            algorithm, 30.0, loggers=[metrics], callbacks=[OptimizerMonitor(batch_log_interval=1)]
        )
        monitored[fold] = [value for _, value in metrics.data["l2_norm/grad/global"]]
        assert algorithm.last_stats is not None and algorithm.last_stats.folded is fold
        assert float(algorithm.last_stats.clipped_fraction) == 1.0  # every step clips at 0.1
    for a, b in zip(runs[True].parameters(), runs[False].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # OptimizerMonitor reads the grads at BATCH_END, after the step wrote the clipped ones back
    assert len(monitored[True]) == 8
    assert monitored[True] == pytest.approx(monitored[False], rel=1e-4)
    assert max(monitored[True]) == pytest.approx(0.1, rel=1e-4)


@pytest.mark.composer
def test_composer_folded_skipping_does_not_sync(no_host_sync: Guard) -> None:
    """From the second step on, neither event of the algorithm reads a tensor on the host when folded,
    with nonfinite='skip' and skip_spikes, on steps that do not log."""
    pytest.importorskip("composer")
    from composer.core import Event

    from gradclip_algo import GradClipAlgo

    algorithm = GradClipAlgo(
        "zscore", 1.0, log_interval=100, nonfinite="skip", skip_spikes=3.0, spike_window=4, warmup_steps=2
    )
    apply = algorithm.apply
    guarded = []

    def apply_without_sync(event: Event, state: Any, logger: Any) -> None:
        if state.timestamp.batch.value < 2:  # the optimizer and the clipper make their state first
            return apply(event, state, logger)
        with no_host_sync():
            apply(event, state, logger)
        guarded.append(algorithm.last_stats is not None and algorithm.last_stats.folded)

    algorithm.apply = apply_without_sync  # type: ignore[method-assign]
    fit_with_fused_adamw(algorithm, 1.0, loggers=[])
    assert guarded == [True] * 13  # BATCH_END of batch 1 (the timestamp then counts 2), then batches 2-7


@pytest.mark.parametrize("clipping_type", ["value", "adaptive", "adagc"])
def test_fold_into_without_anything_to_fold_warns(clipping_type: str) -> None:
    optimizer = torch.optim.AdamW(model().parameters(), fused=True)
    with pytest.warns(UserWarning, match=f"fold_into: clipping_type='{clipping_type}' .* has no effect"):
        GradientClipper(clipping_type, 0.1, fold_into=optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradientClipper(clipping_type, 0.1, fold_into=optimizer, skip_spikes=6.0)  # skips fold
        GradientClipper("quantile", 0.1, fold_into=optimizer)


def test_a_strided_grad_is_not_folded() -> None:
    """Found by the fold fuzz: a fused step reads a grad view's storage as if contiguous, so the factor is
    applied to the grads instead, and the weights are those of the unfolded clip."""
    runs = []
    for fold in (False, True):
        param = nn.Parameter(torch.zeros(8))
        optimizer = torch.optim.SGD([param], lr=1.0, fused=True)
        param.grad = torch.arange(16.0)[::2]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = GradientClipper("norm", 10.0, fold_into=optimizer if fold else None)(param)
        assert stats is not None and not stats.folded
        assert [str(w.message) for w in caught if "not contiguous" in str(w.message)] or not fold
        optimizer.step()
        runs.append(param.detach())
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)


# ---- the loops of the fold-exactness report: each folded run equals the unfolded one, or stops ---------


def accumulate(net: nn.Module, step: int) -> None:
    """A further backward pass: new grads added in place, as autograd accumulates."""
    gen = torch.Generator().manual_seed(100 + step)
    for param in net.parameters():
        new = torch.randn(param.shape, generator=gen)
        if param.grad is None:
            param.grad = new
        else:
            param.grad.add_(new)


def two_clips(first: str, threshold: float) -> Callable[[nn.Module, torch.optim.Optimizer, Any], None]:
    """A ``first`` clip at ``threshold``, then a norm clip at 0.1, before each step."""

    def loop(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
        for step in range(3):
            set_grads(net, step)
            apply_gradient_clipping(net, first, threshold, fold_into=fold)
            apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
            opt.step()

    loop.__name__ = f"{first}_then_norm"
    return loop


def stale_factor(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    set_grads(net, 0)
    apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)  # no step follows
    opt.zero_grad()
    set_grads(net, 1)
    opt.step()  # unclipped, as unfolded


def foreign_grad_scale(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    for step in range(3):
        set_grads(net, step)
        apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
        opt.grad_scale = torch.tensor(2.0)  # set by the user or a wrapper after the clip
        opt.step()
        del opt.grad_scale


def foreign_found_inf(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    for step in range(3):
        set_grads(net, step)
        apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        del opt.found_inf
        assert not hasattr(opt, "grad_scale")  # none of ours left behind


def second_step_after_skip(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    clipper = GradientClipper("norm", 0.5, nonfinite="skip", fold_into=fold)
    for step in range(4):
        set_grads(net, step, nan=step == 2)
        clipper(net)
        opt.step()
        opt.step()  # stepped twice: skipped again after a skip


def state_read_then_skip(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    clipper = GradientClipper("norm", 0.5, nonfinite="skip", fold_into=fold)
    params = list(net.parameters())
    set_grads(net, 0)
    params[0].grad = None  # params[0] gets no optimizer state on the first step
    clipper(net)
    opt.step()
    opt.state[params[0]]  # a read adds an empty entry
    set_grads(net, 1, nan=True)
    clipper(net)
    opt.step()


def float64(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    net.double()
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for param in net.parameters():
            param.grad = torch.randn(param.shape, generator=gen, dtype=torch.float64)
        stats = apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
        assert stats is not None and not stats.folded  # grad_scale is float32
        opt.step()


def overflowing_factor(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    set_grads(net, 0)
    for param in net.parameters():
        param.grad *= 1e36
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fold's warning: 1/coefficient could overflow float32
        apply_gradient_clipping(net, "norm", 1e-4, norm_type=math.inf, fold_into=fold)
    opt.step()


class WrappingOptimizer(torch.optim.Optimizer):
    """An optimizer wrapper in the style of Lightning's ``LightningOptimizer``: it shares the wrapped
    optimizer's ``__dict__`` (its hooks included) and steps it."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no super().__init__(), as Lightning
        self.__dict__ = optimizer.__dict__
        self._wrapped = optimizer
        self._step_supports_amp_scaling = True

    def step(self, closure: Any = None) -> Any:
        return self._wrapped.step(closure)


def wrapper(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    wrapped = WrappingOptimizer(opt)
    clipper = GradientClipper("norm", 0.1, fold_into=wrapped if fold is not None else None)
    for step in range(3):
        set_grads(net, step)
        clipper(net)
        wrapped.step()


def clip_inside_closure(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    for step in range(3):

        def closure(step: int = step) -> None:
            set_grads(net, step)
            GradientClipper("norm", 0.1, fold_into=fold)(net)  # made inside the first step

        opt.step(closure)


def step_that_raises(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    def refuse(*_: Any) -> None:
        raise KeyboardInterrupt  # after the fold's own pre-hook: its attributes are set

    for step in range(2):
        set_grads(net, step)
        apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
        handle = opt.register_step_pre_hook(refuse)
        with pytest.raises(KeyboardInterrupt):
            opt.step()
        handle.remove()
        if step == 0:
            opt.step()  # the same step again
        else:
            apply_gradient_clipping(net, "norm", 0.05, fold_into=fold)  # clipped again, then stepped
            opt.step()


def clip_then_value_clip(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    set_grads(net, 0)
    apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
    torch.nn.utils.clip_grad_value_(net.parameters(), 0.01)
    opt.step()


def clip_every_microbatch(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    set_grads(net, 0)
    apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
    accumulate(net, 0)
    apply_gradient_clipping(net, "norm", 0.1, fold_into=fold)
    opt.step()


def zero_grads_in_place_after_skip(net: nn.Module, opt: torch.optim.Optimizer, fold: Any) -> None:
    clipper = GradientClipper("norm", 0.5, nonfinite="skip", fold_into=fold)
    set_grads(net, 0)
    clipper(net)
    opt.step()
    set_grads(net, 1, nan=True)
    clipper(net)
    opt.step()  # skipped
    opt.zero_grad(set_to_none=False)  # unfolded there are no grads to zero
    accumulate(net, 2)
    opt.step()


EXACT = [
    two_clips("norm", 0.5),
    two_clips("value", 0.05),
    stale_factor,
    foreign_grad_scale,
    foreign_found_inf,
]
EXACT += [second_step_after_skip, state_read_then_skip, float64, overflowing_factor, wrapper]
EXACT += [clip_inside_closure, step_that_raises]
STOPS = [clip_then_value_clip, clip_every_microbatch, zero_grads_in_place_after_skip]


def run_loop(
    loop: Callable[[nn.Module, torch.optim.Optimizer, Any], None], folded: bool
) -> tuple[list[Tensor], list[Tensor]]:
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, fused=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fold_into", category=UserWarning)
        loop(net, optimizer, optimizer if folded else None)
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")
    return [p.detach().clone() for p in net.parameters()], optimizer_state(optimizer)


@pytest.mark.parametrize("loop", EXACT, ids=lambda loop: loop.__name__)
def test_a_users_loop_computes_what_it_computes_unfolded(
    loop: Callable[[nn.Module, torch.optim.Optimizer, Any], None],
) -> None:
    (weights, state), (plain_weights, plain_state) = run_loop(loop, True), run_loop(loop, False)
    assert all(torch.isfinite(w).all() for w in weights)
    assert_same(weights, plain_weights, exact=False)
    assert_same(state, plain_state, exact=False)


@pytest.mark.parametrize("loop", STOPS, ids=lambda loop: loop.__name__)
def test_a_grad_written_after_a_folded_clip_stops_the_step_before_any_change(
    loop: Callable[[nn.Module, torch.optim.Optimizer, Any], None],
) -> None:
    run_loop(loop, False)  # fine unfolded
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, fused=True)
    snapshots = [[p.detach().clone() for p in net.parameters()]]
    optimizer.register_step_pre_hook(
        lambda *_: snapshots.append([p.detach().clone() for p in net.parameters()])
    )
    with pytest.raises(FoldError, match=r"fold_into: .*grad of param_groups\[0\]\['params'\]\[0\]"):
        loop(net, optimizer, optimizer)
    assert_same([p.detach() for p in net.parameters()], snapshots[-1], exact=True)
