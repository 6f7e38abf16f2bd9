"""The Composer cases of tests/test_distributed.py, run by tests/distributed_worker.py on 2 CPU ranks.

The ``Trainer`` runs DDP on CPU; it cannot run FSDP there, so FSDP1 and FSDP2 models go through a
``State`` and an ``Engine`` built by hand, with the algorithm applied at ``Event.AFTER_TRAIN_BATCH``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from composer import Callback, Trainer
from composer.core import Engine, Event, State
from composer.devices import DeviceCPU
from composer.loggers import InMemoryLogger, Logger
from composer.models import ComposerClassifier
from composer.utils import FSDP2Config, FSDPConfig, ParallelismConfig
from composer.utils import dist as composer_dist
from distributed_cases_layouts import STAGES, float64_model
from distributed_cases_nonfinite import poison, snapshot, train_with_skips
from distributed_common import (
    CASES,
    GLOBAL_BATCH,
    WORLD_SIZE,
    Case,
    assert_close_by_name,
    backward,
    case,
    full_grads,
    gather,
    global_batch,
    make_net,
    nonfinite_errors_on_every_rank,
    rank_backward,
    reference_clip,
    wrap,
)
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from gradclip_algo import GradClipAlgo, GradientClipper
from gradclip_algo.distributed import local_shards

STEPS = 4
COMPOSER_CASES: dict[str, Case] = {}


def rank_loader(steps: int) -> DataLoader:
    """The global batches 0..steps-1 in order; Composer's distributed sampler hands each rank its half,
    rows ``rank::WORLD_SIZE`` of every global batch, as ``distributed_common.rank_batch`` does."""
    batches = [global_batch(step) for step in range(steps)]
    dataset = TensorDataset(torch.cat([t for t, _ in batches]), torch.cat([y for _, y in batches]))
    sampler = composer_dist.get_sampler(dataset, shuffle=False)
    return DataLoader(dataset, batch_size=GLOBAL_BATCH // WORLD_SIZE, sampler=sampler)


def logged(in_memory: InMemoryLogger, metric: str) -> list[float]:
    return [value for _, value in in_memory.data.get(f"gradient_clipping/{metric}", [])]


def weights(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Poison(Callback):
    """After backward (so after DDP's all-reduce), on rank 1 only, at ``batches``: see ``poison``."""

    def __init__(self, batches: tuple[int, ...]) -> None:
        self.batches = batches

    def after_backward(self, state: State, logger: Logger) -> None:
        step = state.timestamp.batch.value
        if dist.get_rank() == 1 and step in self.batches:
            poison(state.model, step)


class Snapshots(Callback):
    """This rank's weights and Adam state at the end of every batch."""

    def __init__(self) -> None:
        self.taken: list[list[Tensor]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        self.taken.append(snapshot(state.model, state.optimizers[0]))


def fit(algorithm: GradClipAlgo, optimizer: str, callbacks: list[Callback]) -> tuple[Trainer, InMemoryLogger]:
    """``STEPS`` batches of DDP training on 2 CPU ranks through Composer's ``Trainer``."""
    model = ComposerClassifier(make_net(), num_classes=3)
    optimizers = (
        torch.optim.SGD(model.parameters(), lr=0.5)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    in_memory = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=rank_loader(STEPS),
        max_duration=f"{STEPS}ba",
        optimizers=optimizers,
        algorithms=[algorithm],
        callbacks=callbacks,
        loggers=[in_memory],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    return trainer, in_memory


@case("trainer-ddp-norms-are-global", COMPOSER_CASES)
def check_trainer_ddp(rank: int) -> None:
    """Every rank ends with the same weights; the logged norms are equal on both ranks and equal to those
    of a single-process run on the global batches."""
    trainer, in_memory = fit(GradClipAlgo("norm", 0.1), "sgd", [])
    with_grads = [p for p in trainer.state.model.parameters() if p.grad is not None]
    layout = local_shards(with_grads, trainer.state.model).layout
    final = weights(trainer.state.model)
    everyone = gather(final)
    norms = torch.tensor(logged(in_memory, "grad_norm"))
    all_norms = gather(norms)

    reference = make_net()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    clipper = GradientClipper("norm", 0.1)
    want_norms = []
    for step in range(STEPS):
        backward(reference, *global_batch(step))
        want_norms.append(clipper(reference).grad_norm)
        optimizer.step()
    assert (trainer.state.fsdp_config_version, layout) == (0, "local")
    assert all(torch.equal(w, everyone[0]) for w in everyone), "ranks ended with different weights"
    assert all(torch.equal(n, all_norms[0]) for n in all_norms), "ranks logged different norms"
    assert len(norms) == STEPS and min(norms) > 0.1, "every step must be clipped for the test to bite"
    torch.testing.assert_close(norms, torch.stack(want_norms), rtol=1e-5, atol=0)
    torch.testing.assert_close(final, weights(reference), rtol=1e-5, atol=1e-6)


@case("trainer-ddp-skip-inf-and-nan-on-one-rank", COMPOSER_CASES)
def check_trainer_skip(rank: int) -> None:
    """Inf (batch 1) and NaN (batch 3) on rank 1 only: both ranks skip both steps, weights and Adam state
    stay bitwise unchanged there, and training ends where a single process skipping them ends."""
    skipped = (1, 3)
    snapshots = Snapshots()
    trainer, in_memory = fit(
        GradClipAlgo("norm", 0.1, nonfinite="skip"), "adam", [Poison(skipped), snapshots]
    )
    final = weights(trainer.state.model)
    everyone = gather(final)
    counts = gather(torch.tensor(logged(in_memory, "skipped_steps")))

    reference = make_net()
    train_with_skips(reference, skipped, None, steps=STEPS)
    assert all(torch.equal(w, everyone[0]) for w in everyone), "ranks ended with different weights"
    assert all(c.tolist() == [0, 1, 0, 1] for c in counts), f"skipped_steps logged per step: {counts}"
    for step in skipped:
        before, after = snapshots.taken[step - 1], snapshots.taken[step]
        assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True)), (
            f"batch {step} changed state"
        )
    assert torch.isfinite(final).all()
    torch.testing.assert_close(final, weights(reference), rtol=1e-5, atol=1e-6)


@case("trainer-ddp-error-on-every-rank", COMPOSER_CASES)
def check_trainer_error(rank: int) -> None:
    """NaN on rank 1 only at batch 3: both ranks stop with the same error, naming batch, parameter, rank."""
    messages, names = nonfinite_errors_on_every_rank(
        lambda: fit(GradClipAlgo("norm", 0.1, nonfinite="error"), "sgd", [Poison((3,))])
    )

    message = "batch 3: non-finite gradient (inf or NaN) in module.embed.weight on rank 1"
    assert messages == [message] * WORLD_SIZE
    assert names == ["module.embed.weight"] * WORLD_SIZE


def engine_state(layout: str) -> tuple[State, Logger, InMemoryLogger]:
    """A ``State`` around a ComposerClassifier whose network is FSDP1- or FSDP2-wrapped, and a logger."""
    model = ComposerClassifier(make_net(), num_classes=3)
    model.module = wrap(layout, model.module)
    config = (
        ParallelismConfig(fsdp=FSDPConfig())
        if layout.startswith("fsdp1")
        else ParallelismConfig(fsdp2=FSDP2Config())
    )
    state = State(
        model=model, rank_zero_seed=0, run_name=layout, device=DeviceCPU(), parallelism_config=config
    )
    state.set_dataloader(rank_loader(1), "train")
    state.max_duration = "1ba"
    in_memory = InMemoryLogger()
    logger = Logger(state, [in_memory])
    in_memory.init(state, logger)
    return state, logger, in_memory


def check_engine(layout: str, clipping_type: str, threshold: float, rank: int) -> None:
    """The algorithm, run by Composer's Engine at AFTER_TRAIN_BATCH, clips an FSDP model's grads as the
    single-process reference does and logs the global norm; Shards' layout matches fsdp_config_version."""
    want, want_stats, initial, _ = reference_clip(clipping_type, threshold)
    state, logger, in_memory = engine_state(layout)
    state.algorithms = [GradClipAlgo(clipping_type, threshold)]
    rank_backward(layout, state.model.module, 0, rank)
    engine = Engine(state, logger)
    engine.run_event(Event.AFTER_TRAIN_BATCH)  # clips
    state.timestamp = state.timestamp.copy(batch=state.timestamp.batch.value + 1)  # the batch is counted
    engine.run_event(Event.BATCH_END)  # logs (log_interval=1)
    layout_found = local_shards(
        [p for p in state.model.parameters() if p.grad is not None], state.model
    ).layout
    got = full_grads(layout, state.model.module, initial)
    norms = gather(torch.tensor(logged(in_memory, "grad_norm")))

    assert layout_found == f"fsdp{state.fsdp_config_version}"
    assert all(torch.equal(n, norms[0]) for n in norms)
    torch.testing.assert_close(norms[0], want_stats.grad_norm.reshape(1), rtol=1e-5, atol=0)
    assert_close_by_name(got, want, rtol=1e-5, atol=1e-8)


def check_engine_refuses_adaptive_under_fsdp1(rank: int) -> None:
    """Through the Engine too, AGC under FSDP1 raises the error that names FSDP2 and DDP."""
    state, logger, _ = engine_state("fsdp1-orig")
    state.algorithms = [GradClipAlgo("adaptive", 0.02)]
    rank_backward("fsdp1-orig", state.model.module, 0, rank)
    try:
        Engine(state, logger).run_event(Event.AFTER_TRAIN_BATCH)
    except ValueError as err:
        message = str(err)
    else:
        message = ""
    assert "clipping_type='adaptive' under FSDP1" in message and "use FSDP2 (fully_shard)" in message


@case("engine-pipeline-2-stages-norm", COMPOSER_CASES)
def check_engine_pipeline(rank: int) -> None:
    """``GradClipAlgo(..., process_group=...)`` through Composer's Engine on 2 pipeline stages, one per
    rank, each holding the grads of its own stage only: both log the whole model's norm, and each stage's
    clipped grads equal float64 clipping of the whole model's grads on one process."""
    model = ComposerClassifier(make_net(), num_classes=3)
    state = State(model=model, rank_zero_seed=0, run_name="pipeline", device=DeviceCPU())
    state.set_dataloader(rank_loader(1), "train")
    state.max_duration = "1ba"
    in_memory = InMemoryLogger()
    logger = Logger(state, [in_memory])
    in_memory.init(state, logger)
    state.algorithms = [GradClipAlgo("norm", 0.1, process_group=dist.group.WORLD)]
    backward(model.module, *global_batch(0))  # the whole batch on both ranks: the grads a schedule gives
    named = dict(model.module.named_parameters())
    reference = float64_model(
        {name: p.grad for name, p in named.items()}, {name: p.detach() for name, p in named.items()}
    )
    want_stats = GradientClipper("norm", 0.1)(reference)
    for name, param in named.items():
        if name.split(".")[0] not in STAGES[rank]:
            param.grad = None  # the other stage's
    engine = Engine(state, logger)
    engine.run_event(Event.AFTER_TRAIN_BATCH)  # clips
    state.timestamp = state.timestamp.copy(batch=state.timestamp.batch.value + 1)  # the batch is counted
    engine.run_event(Event.BATCH_END)  # logs (log_interval=1)
    norms = gather(torch.tensor(logged(in_memory, "grad_norm")))

    assert all(torch.equal(n, norms[0]) for n in norms), f"stages logged different norms: {norms}"
    assert want_stats.clipped_fraction == 1, "the reference must clip"
    torch.testing.assert_close(norms[0], want_stats.grad_norm.float().reshape(1), rtol=1e-5, atol=0)
    for name, param in reference:
        if name.split(".")[0] in STAGES[rank]:
            torch.testing.assert_close(named[name].grad, param.grad.float(), rtol=1e-5, atol=1e-8)


COMPOSER_CASES["engine-fsdp1-orig-norm"] = partial(check_engine, "fsdp1-orig", "norm", 0.1)
COMPOSER_CASES["engine-fsdp1-orig-value-is-a-clamp"] = partial(check_engine, "fsdp1-orig", "value", 0.01)
COMPOSER_CASES["engine-fsdp1-orig-adaptive-refused"] = check_engine_refuses_adaptive_under_fsdp1
COMPOSER_CASES["engine-fsdp2-norm"] = partial(check_engine, "fsdp2", "norm", 0.1)
COMPOSER_CASES["engine-fsdp2-adaptive"] = partial(check_engine, "fsdp2", "adaptive", 0.02)
CASES.update(COMPOSER_CASES)
