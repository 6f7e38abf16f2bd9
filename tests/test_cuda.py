"""Folding and mixed precision on a GPU (``make gpu-check``); the CPU cases run everywhere.

The ``cuda`` cases skip themselves without CUDA. What they check:

- A Composer ``Trainer`` with ``GradClipAlgo('norm', 1.0)`` under ``amp_bf16`` and ``amp_fp16`` (and, as the
  same check on the CPU, in fp32): the logged ``grad_norm`` is torch's norm of the grads the step sees,
  and every step moves the weights by exactly ``-lr · min(1, λ / norm) · grad`` (fused SGD), so the
  clipping reached the optimizer whether it was folded into it or not. Under ``amp_fp16`` the
  GradScaler owns the optimizer's ``grad_scale`` / ``found_inf``: the algorithm must clip the grads in
  place (a fold would be overwritten by the scaler, and the update would come out unclipped).
- ``GradientClipper('norm', 1.0, fold_into=opt, skip_spikes=6.0)`` + a fused AdamW step under
  ``torch.cuda.set_sync_debug_mode('error')``: no host sync, and a spike is still skipped on the device.
- Folded clipping with fused AdamW equals unfolded clipping: weights and optimizer state after several
  steps, within rounding.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from gradclip_algo import GradientClipper

CUDA_AVAILABLE = torch.cuda.is_available()
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs CUDA")]
THRESHOLD = 1.0
LR = 0.01


def folding_supported() -> bool:
    param = nn.Parameter(torch.zeros(1))
    try:
        GradientClipper("norm", 1.0, fold_into=torch.optim.AdamW([param], fused=True))
    except (TypeError, ValueError):
        return False
    return True


needs_folding = pytest.mark.skipif(not folding_supported(), reason="this gradclip_algo has no fold_into")


@contextlib.contextmanager
def cuda_sync_errors() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _norm(tensors: list[Tensor]) -> float:
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])
    ).item()


# ---- Composer Trainer under mixed precision ---------------------------------------------------------


@pytest.mark.composer
@pytest.mark.parametrize(
    ("device", "precision"),
    [
        pytest.param("cpu", "fp32", id="cpu-fp32"),
        pytest.param("gpu", "amp_bf16", marks=CUDA, id="cuda-amp_bf16"),
        pytest.param("gpu", "amp_fp16", marks=CUDA, id="cuda-amp_fp16"),
    ],
)
def test_trainer_clips_every_step_under_each_precision(device: str, precision: str) -> None:
    pytest.importorskip("composer")
    from composer import Callback, Logger, State, Trainer
    from composer.core import Algorithm, Event
    from composer.loggers import InMemoryLogger
    from composer.models import ComposerClassifier
    from torch.utils.data import DataLoader, TensorDataset

    from gradclip_algo import GradClipAlgo

    class Probe(Algorithm):
        """At AFTER_TRAIN_BATCH, before the clipping algorithm (Composer runs AFTER_* algorithms in
        reverse order, and this one is listed after it): the grads and weights the step starts from."""

        def __init__(self) -> None:
            self.grads: list[list[Tensor]] = []
            self.before: list[list[Tensor]] = []

        def match(self, event: Event, state: State) -> bool:
            return event == Event.AFTER_TRAIN_BATCH

        def apply(self, event: Event, state: State, logger: Logger) -> None:
            params = list(state.model.parameters())
            self.grads.append([p.grad.detach().float().clone() for p in params])
            self.before.append([p.detach().float().clone() for p in params])

    class After(Callback):
        """At BATCH_END: the weights after the step and the grads as the step left them."""

        def __init__(self) -> None:
            self.after: list[list[Tensor]] = []
            self.grads: list[list[Tensor]] = []

        def batch_end(self, state: State, logger: Logger) -> None:
            params = list(state.model.parameters())
            self.after.append([p.detach().float().clone() for p in params])
            self.grads.append([p.grad.detach().float().clone() for p in params])

    def fit(algorithm: GradClipAlgo, *extra: Any) -> ComposerClassifier:
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
        model = ComposerClassifier(module, num_classes=4)
        trainer = Trainer(
            model=model,
            train_dataloader=DataLoader(TensorDataset(inputs, targets), batch_size=16),
            optimizers=torch.optim.SGD(model.parameters(), lr=LR, fused=True),
            algorithms=[algorithm, *(alg for alg in extra if isinstance(alg, Algorithm))],
            callbacks=[cb for cb in extra if isinstance(cb, Callback) and not isinstance(cb, InMemoryLogger)],
            loggers=[cb for cb in extra if isinstance(cb, InMemoryLogger)],
            max_duration="6ba",
            device=device,
            precision=precision,
            progress_bar=False,
            log_to_console=False,
            seed=0,
        )
        trainer.fit()
        trainer.close()
        return model

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(96, 64, generator=generator)
    targets = torch.randint(0, 4, (96,), generator=generator)
    probe, after, memory = Probe(), After(), InMemoryLogger()
    algorithm = GradClipAlgo("norm", THRESHOLD)
    probed = fit(algorithm, probe, after, memory)
    # the probe may change the grads after the clip, so nothing is folded
    assert algorithm.last_stats is not None and not algorithm.last_stats.folded
    assert "Probe also runs at AFTER_TRAIN_BATCH" in algorithm.fold_why_not

    logged = [value for _, value in memory.data["gradient_clipping/grad_norm"]]
    assert len(probe.grads) == len(after.after) == len(logged) == 6
    taken = clipped = 0
    for step, (grads, before, weights) in enumerate(zip(probe.grads, probe.before, after.after, strict=True)):
        norm = _norm(grads)
        assert logged[step] == pytest.approx(norm, rel=1e-4, nan_ok=True), f"step {step}"
        if not torch.isfinite(torch.tensor(norm)):  # fp16: the GradScaler skips this step
            assert precision == "amp_fp16"
            for w, b in zip(weights, before, strict=True):
                torch.testing.assert_close(w, b, rtol=0, atol=0)
            continue
        coefficient = min(1.0, THRESHOLD / (norm + 1e-6))
        for w, b, g in zip(weights, before, grads, strict=True):
            torch.testing.assert_close(w - b, -LR * coefficient * g, rtol=1e-3, atol=1e-7)
        taken += 1
        clipped += coefficient < 1.0
        if precision == "amp_fp16":  # not folded: the grads themselves were clipped before the step
            assert _norm(after.grads[step]) == pytest.approx(min(norm, THRESHOLD), rel=1e-4)
    assert taken >= 4 and clipped >= 1, (taken, clipped)
    # alone, it folds into fused SGD, except under fp16 AMP (the GradScaler's attributes): the same weights
    alone = GradClipAlgo("norm", THRESHOLD)
    weights = list(fit(alone).parameters())
    assert alone.last_stats is not None
    assert alone.last_stats.folded is (folding_supported() and precision != "amp_fp16")
    for folded, unfolded in zip(weights, probed.parameters(), strict=True):
        torch.testing.assert_close(folded, unfolded, rtol=1e-3, atol=1e-6)


# ---- no host sync, folded, with spike skipping --------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="needs CUDA")
@needs_folding
def test_folded_step_with_spike_skipping_never_syncs_on_cuda() -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(device)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    clipper = GradientClipper("norm", THRESHOLD, fold_into=optimizer, skip_spikes=6.0, spike_window=16)
    generator = torch.Generator(device=device).manual_seed(0)
    spike_step, steps = 30, 36
    skipped, moved = [], []
    for step in range(steps):
        scale = 1e4 if step == spike_step else 1.0
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator, device=device) * scale
        before = [param.detach().clone() for param in params]
        with cuda_sync_errors():
            stats = clipper(model)
            optimizer.step()
        skipped.append(stats.skipped if isinstance(stats.skipped, Tensor) else torch.tensor(stats.skipped))
        moved.append(
            torch.stack([(p.detach() != b).any() for p, b in zip(params, before, strict=True)]).any()
        )
    skipped_host = torch.stack([s.to(device) for s in skipped]).tolist()
    moved_host = torch.stack(moved).tolist()
    assert skipped_host[spike_step] is True and not moved_host[spike_step]
    assert sum(skipped_host) == 1, skipped_host
    assert all(moved_host[step] for step in range(steps) if step != spike_step)
    assert not hasattr(optimizer, "grad_scale") and not hasattr(optimizer, "found_inf")


# ---- folded equals unfolded ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=CUDA, id="cuda")]
)
@needs_folding
def test_folding_into_fused_adamw_equals_clipping_the_grads(device: str) -> None:
    torch.manual_seed(0)
    folded_model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(device)
    plain_model = copy.deepcopy(folded_model)
    folded_optimizer = torch.optim.AdamW(folded_model.parameters(), lr=1e-2, fused=True)
    plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, fused=True)
    folded = GradientClipper("norm", THRESHOLD, fold_into=folded_optimizer)
    plain = GradientClipper("norm", THRESHOLD)
    generator = torch.Generator().manual_seed(0)
    norms = []
    for step in range(6):
        scale = (0.01, 1.0, 10.0)[step % 3]  # the norm falls below and above λ
        for folded_param, plain_param in zip(
            folded_model.parameters(), plain_model.parameters(), strict=True
        ):
            grad = (torch.randn(folded_param.shape, generator=generator) * scale).to(device)
            folded_param.grad, plain_param.grad = grad.clone(), grad.clone()
        folded_stats = folded(folded_model)
        plain_stats = plain(plain_model)
        torch.testing.assert_close(folded_stats.grad_norm, plain_stats.grad_norm)
        norms.append(plain_stats.grad_norm.item())
        folded_optimizer.step()
        plain_optimizer.step()
    assert min(norms) < THRESHOLD < max(norms)
    for folded_param, plain_param in zip(folded_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(folded_param, plain_param, rtol=1e-5, atol=1e-6)
        folded_state, plain_state = folded_optimizer.state[folded_param], plain_optimizer.state[plain_param]
        assert folded_state.keys() == plain_state.keys()
        for key in plain_state:
            torch.testing.assert_close(folded_state[key], plain_state[key], rtol=1e-5, atol=1e-9)
    assert not hasattr(folded_optimizer, "grad_scale") and not hasattr(folded_optimizer, "found_inf")
