"""Composer 0.32.1's generic algorithm and Trainer tests, ported to ``GradClipAlgo``.

Ported (mosaicml/composer at tag v0.32.1):

- ``tests/algorithms/test_algorithms_train.py::test_algorithm_trains``: ``fit()`` for 2 batches, then
  ``fit(duration='1ba')`` again, without an error.
- ``tests/algorithms/test_algorithm_resumption.py::test_algorithm_resumption``: train 2 batches saving every
  batch; a second Trainer on a copy of the initial model (optimizer built with 10x the learning rate) resumes
  from the batch-1 checkpoint; the two batch-2 checkpoints agree exactly (``deep_compare`` of the RNG states
  and of the Trainer states, ``atol = rtol = 0``), and the batch-1 and batch-2 weights differ.
- ``tests/algorithms/test_required_on_load.py``: ``test_required_on_load_has_repr`` (a repr without a memory
  address that ``eval`` turns back into the algorithm), ``test_idempotent`` (building a Trainer twice leaves
  the model as it was) and ``test_autoload`` (what loading a checkpoint adds to ``state.algorithms``).
- ``tests/trainer/test_trainer.py::TestTrainerEquivalence``: ``test_determinism``, ``test_microbatch_size``
  (grad accumulation, ``atol=1e-5, rtol=1e-4``), ``test_max_duration`` (``8ba`` == ``2ep``),
  ``test_checkpoint`` (resume from the epoch-1 checkpoint) and the control ``test_algorithm_different``;
  models compared with ``torch.testing.assert_close(atol=0, rtol=0)`` unless stated.
- ``tests/trainer/test_checkpoint.py::TestCheckpointResumption::test_resumption`` (two of its six cases: a
  random seed with the ``latest`` symlink, and a save every 2 batches resumed inside an epoch): the number of
  checkpoint files, and the whole final checkpoints agree exactly (``deep_compare``).

Plus :func:`test_folded_equals_unfolded`: the same run with ``fold_into_optimizer=True`` and ``False`` ends
with the same weights and optimizer state within float32 rounding.

Adapted:

- Every test runs once per configuration (``helpers.SETUPS`` x ``fold_into_optimizer`` in {True, False}):
  each clipping type alone; skip_spikes; Composer's ``GradientClipping`` before and after GradClipAlgo in the
  list; two GradClipAlgo in one list; with ``LabelSmoothing``; with ``SAM`` (which wraps the optimizer and
  clips twice a step; not in the tests that resume from a checkpoint, which Composer's SAM cannot).
  ``LayerFreezing`` and ``EMA`` are left out: with the first Composer 0.32.1 cannot save a checkpoint
  (``KeyError`` in ``optimizer.state_dict()``), with the second a run that saves checkpoints ends with
  other weights than one that does not. Composer runs ``AFTER_*`` events
  in reverse list order, so the last algorithm of a list clips first.
- CPU and fp32 only (the originals also run on GPU, with ``amp_bf16`` / ``amp_fp16``, and on 2 ranks).
- A 2-layer MLP (8 features, 16 hidden, 4 classes) on random data with one sample scaled x50 (a grad-norm
  spike once per epoch) instead of ``SimpleModel`` / ``SimpleConvModel`` on 1-feature or image data; the
  data comes from a fixed generator, not the global RNG.
- Each configuration names its optimizer: fused AdamW (or fused SGD with momentum), which GradClipAlgo folds
  into, or plain Adam (nothing to fold into); the originals use Composer's default or plain Adam.
- ``TestTrainerEquivalence`` trains its reference once per configuration and module, not once per test;
  its control trains without the GradClipAlgo of the configuration (keeping the other algorithms) instead of
  with ``LabelSmoothing``, so it fails where GradClipAlgo never changes a step.
- The checkpoint comparisons drop only the ``repr`` of algorithms whose default repr holds a memory
  address (Composer's drops their whole entry), and never GradClipAlgo's.
- ``test_autoload`` expects no algorithm to be added on load: GradClipAlgo is not ``required_on_load``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.composer,
    pytest.mark.filterwarnings("ignore:.*Detected call of `lr_scheduler.step\\(\\)`.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:The ``compute`` method of metric .*:UserWarning"),
    pytest.mark.filterwarnings("ignore:No batches were trained.*:UserWarning"),
]
pytest.importorskip("composer")

import torch  # noqa: E402
from composer import Callback, Trainer  # noqa: E402
from composer.callbacks import CheckpointSaver  # noqa: E402
from composer.core import State, Time, TimeUnit  # noqa: E402
from composer.loggers import Logger  # noqa: E402
from composer.models import ComposerClassifier, ComposerModel  # noqa: E402
from composer.optim import ExponentialScheduler  # noqa: E402
from composer.utils import dist  # noqa: E402
from composer_harness_helpers import (  # noqa: E402
    SETUPS,
    RandomClassificationDataset,
    Setup,
    TinyMLP,
    assert_checkpoints_equal,
    assert_checkpoints_equivalent,
    assert_model_weights_equal,
    gca,
    make_optimizer,
    model_tensors,
    optimizer_tensors,
)
from torch import nn  # noqa: E402
from torch.optim import Optimizer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from gradclip_algo import GradClipAlgo  # noqa: E402

SEED = 0
QUIET: dict[str, Any] = {"device": "cpu", "progress_bar": False, "log_to_console": False, "loggers": []}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is several times faster than two on a busy 2-core machine
    (the threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def configurations(setups: tuple[Setup, ...] = SETUPS) -> list[Any]:
    """Each setup with the default ``fold_into_optimizer=True``, and also unfolded where that is another
    run (``setup.folds``; :func:`test_folds_only_where_nothing_else_acts_on_the_grads` checks the flag)."""
    return [
        pytest.param(setup, fold, id=f"{setup.name}-{'folded' if fold else 'unfolded'}", marks=setup.marks)
        for setup in setups
        for fold in ((True, False) if setup.folds else (True,))
    ]


CONFIGS = configurations()
RESUMABLE = configurations(tuple(setup for setup in SETUPS if setup.resumable))


# ---- test_algorithms_train.py ----------------------------------------------------------------------------


@pytest.mark.parametrize(("setup", "fold"), CONFIGS)
def test_algorithm_trains(setup: Setup, fold: bool) -> None:
    model = TinyMLP()
    dataset = RandomClassificationDataset(size=16, spike_index=6)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(dataset, batch_size=4),
        max_duration="2ba",
        optimizers=make_optimizer(setup.optimizer, model),
        algorithms=setup.build(fold),
        **QUIET,
    )
    trainer.fit()
    trainer.fit(duration="1ba")


# ---- test_algorithm_resumption.py ------------------------------------------------------------------------


@pytest.mark.parametrize(("setup", "fold"), RESUMABLE)
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()")
def test_algorithm_resumption(setup: Setup, fold: bool, tmp_path: Path) -> None:
    folder1, folder2 = tmp_path / "folder1", tmp_path / "folder2"

    model = TinyMLP()
    copied_model = copy.deepcopy(model)  # the same starting point
    dataset = RandomClassificationDataset(size=16, spike_index=6)  # the spike in the second batch

    optimizer = make_optimizer(setup.optimizer, model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    shared_config: dict[str, Any] = {
        "max_duration": "2ba",
        "save_filename": "checkpoint_ba{batch}-rank{rank}",
        "save_interval": "1ba",
        "train_subset_num_batches": 2,
        "precision": "fp32",
        **QUIET,
    }
    trainer1 = Trainer(
        model=model,
        train_dataloader=DataLoader(dataset, batch_size=4),
        optimizers=optimizer,
        schedulers=scheduler,
        save_folder=str(folder1),
        algorithms=setup.build(fold),
        **shared_config,
    )
    trainer1.fit()

    optimizer = make_optimizer(setup.optimizer, copied_model, lr_scale=10.0)  # the checkpoint's lr wins
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    trainer2 = Trainer(
        model=copied_model,
        train_dataloader=DataLoader(dataset, batch_size=4),
        load_path=str(folder1 / "checkpoint_ba1-rank{rank}"),
        load_weights_only=False,
        load_strict_model_weights=False,
        optimizers=optimizer,
        schedulers=scheduler,
        save_folder=str(folder2),
        algorithms=setup.build(fold),
        **shared_config,
    )
    trainer2.fit()

    assert_checkpoints_equal(folder1 / "checkpoint_ba2-rank0", folder2 / "checkpoint_ba2-rank0")
    # the weights were updated between the two checkpoints
    with pytest.raises(AssertionError):
        assert_model_weights_equal(folder1 / "checkpoint_ba1-rank0", folder1 / "checkpoint_ba2-rank0")


# ---- test_required_on_load.py ----------------------------------------------------------------------------


def gradclip_algorithms() -> list[Any]:
    seen: dict[str, GradClipAlgo] = {}
    for setup in SETUPS:
        for fold in (True, False):
            for alg in setup.build(fold):
                if isinstance(alg, GradClipAlgo):
                    seen.setdefault(repr(alg), alg)
    return [pytest.param(alg, id=text) for text, alg in seen.items()]


@pytest.mark.parametrize("algorithm", gradclip_algorithms())
def test_required_on_load_has_repr(algorithm: GradClipAlgo) -> None:
    """Composer evaluates the repr of ``required_on_load`` algorithms to re-create them from a checkpoint;
    GradClipAlgo is not one (it changes no module), but its repr is its checkpoint's ``repr`` entry."""
    assert not type(algorithm).required_on_load()
    representation = repr(algorithm)
    assert "at 0x" not in representation  # the default repr prints a memory address
    # repr(float('inf')) is 'inf', which Python does not evaluate: the namespace supplies it
    recreated = eval(representation, {"GradClipAlgo": GradClipAlgo, "inf": math.inf})
    assert isinstance(recreated, GradClipAlgo)
    assert repr(recreated) == representation


def compare_models(model_1: nn.Module, model_2: nn.Module, is_equal: bool = True) -> None:
    """The same modules (each module's attribute names) and the same state dict, bitwise."""
    with contextlib.nullcontext() if is_equal else pytest.raises(AssertionError):
        if isinstance(model_1, ComposerClassifier) and isinstance(model_2, ComposerClassifier):
            modules_1 = list(model_1.module.modules())
            modules_2 = list(model_2.module.modules())
            assert len(modules_1) == len(modules_2)
            for module_1, module_2 in zip(modules_1, modules_2, strict=True):
                assert sorted(module_1.__dict__) == sorted(module_2.__dict__)
        state_1, state_2 = model_1.state_dict(), model_2.state_dict()
        assert list(state_1) == list(state_2)
        for name in state_1:
            assert torch.equal(state_1[name], state_2[name]), name


@pytest.mark.parametrize(("setup", "fold"), configurations((SETUPS[0], SETUPS[5])))
def test_idempotent(setup: Setup, fold: bool) -> None:
    original_model = TinyMLP()
    algorithms = setup.build(fold)
    applied_once_model = Trainer(
        model=copy.deepcopy(original_model), algorithms=algorithms, **QUIET
    ).state.model
    assert isinstance(applied_once_model, ComposerModel)
    applied_twice_model = Trainer(
        model=copy.deepcopy(applied_once_model), algorithms=algorithms, **QUIET
    ).state.model
    # Composer's test expects required_on_load algorithms to change the model; GradClipAlgo does no surgery
    compare_models(original_model, applied_once_model, is_equal=True)
    compare_models(applied_once_model, applied_twice_model, is_equal=True)  # applying again is a no-op


@pytest.mark.parametrize(("setup", "fold"), configurations((SETUPS[0], SETUPS[5])))
@pytest.mark.parametrize(
    ("load_weights_only", "already_added", "exclude"),
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
)
def test_autoload(
    setup: Setup, fold: bool, load_weights_only: bool, already_added: bool, exclude: bool, tmp_path: Path
) -> None:
    original_model = TinyMLP()
    trainer1 = Trainer(
        model=copy.deepcopy(original_model),
        algorithms=setup.build(fold),
        save_folder=str(tmp_path),
        save_filename="ckpt.pt",
        **QUIET,
    )
    checkpoint_saver = next(cb for cb in trainer1.state.callbacks if isinstance(cb, CheckpointSaver))
    checkpoint_saver._save_checkpoint(trainer1.state, trainer1.logger)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer2 = Trainer(
            model=copy.deepcopy(original_model),
            algorithms=setup.build(fold) if already_added else [],
            load_path=os.path.join(str(tmp_path), "ckpt.pt"),
            load_weights_only=load_weights_only,
            load_exclude_algorithms=["GradClipAlgo"] if exclude else None,
            **QUIET,
        )
    # not required_on_load: loading never adds it (Composer's test expects one copy of a required algorithm)
    assert not [w for w in caught if "Automatically adding required_on_load algorithm" in str(w.message)]
    if exclude or not already_added:
        assert len(trainer2.state.algorithms) == 0
    else:
        assert len(trainer2.state.algorithms) == 1
        assert isinstance(trainer2.state.algorithms[0], GradClipAlgo)


# ---- test_trainer.py::TestTrainerEquivalence ---------------------------------------------------------------


def equivalence_config(setup: Setup, fold: bool, without_gradclip: bool = False) -> dict[str, Any]:
    """The reference config: 16 samples in batches of 4 for 2 epochs (8 steps), evaluated every epoch."""
    model = TinyMLP()
    train_dataset = RandomClassificationDataset(size=16, seed=1, spike_index=10)  # the spike in batch 3
    eval_dataset = RandomClassificationDataset(size=16, seed=2)
    return {
        "model": model,
        "optimizers": make_optimizer(setup.optimizer, model),
        "train_dataloader": DataLoader(train_dataset, batch_size=4, sampler=dist.get_sampler(train_dataset)),
        "eval_dataloader": DataLoader(eval_dataset, batch_size=4, sampler=dist.get_sampler(eval_dataset)),
        "max_duration": "2ep",
        "seed": SEED,
        "precision": "fp32",
        "algorithms": setup.build(fold, without_gradclip=without_gradclip),
        **QUIET,
    }


@dataclass
class Reference:
    model: ComposerModel
    optimizer: Optimizer
    folder: Path


References = Callable[[Setup, bool], Reference]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Iterator[References]:
    """Trains (once per module) the reference run of a configuration, saving a checkpoint every epoch."""
    cache: dict[tuple[str, bool], Reference] = {}

    def get(setup: Setup, fold: bool) -> Reference:
        key = (setup.name, fold)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{setup.name}-{fold}")
            config = equivalence_config(setup, fold)
            config.update(
                {"save_interval": "1ep", "save_folder": str(folder), "save_filename": "ep{epoch}.pt"}
            )
            trainer = Trainer(**config)
            trainer.fit()
            trainer.close()
            cache[key] = Reference(trainer.state.model, trainer.state.optimizers[0], folder)
        return cache[key]

    yield get


def assert_models_equal(
    model_1: nn.Module, model_2: nn.Module, threshold: dict[str, float] | None = None
) -> None:
    threshold = threshold or {"atol": 0.0, "rtol": 0.0}
    assert model_1 is not model_2, "Same model should not be compared."
    for param1, param2 in zip(model_1.parameters(), model_2.parameters(), strict=True):
        torch.testing.assert_close(param1, param2, **threshold)


@pytest.mark.parametrize(("setup", "fold"), CONFIGS)
class TestTrainerEquivalence:
    def test_determinism(self, setup: Setup, fold: bool, references: References) -> None:
        trainer = Trainer(**equivalence_config(setup, fold))
        trainer.fit()
        assert_models_equal(trainer.state.model, references(setup, fold).model)

    def test_microbatch_size(self, setup: Setup, fold: bool, references: References) -> None:
        # microbatching requires non-zero tolerance (fp32)
        config = equivalence_config(setup, fold)
        config["device_train_microbatch_size"] = 2
        trainer = Trainer(**config)
        trainer.fit()
        assert_models_equal(trainer.state.model, references(setup, fold).model, {"atol": 1e-5, "rtol": 1e-4})

    def test_max_duration(self, setup: Setup, fold: bool, references: References) -> None:
        config = equivalence_config(setup, fold)
        config["max_duration"] = f"{2 * len(config['train_dataloader'])}ba"  # 2ep in batches
        trainer = Trainer(**config)
        trainer.fit()
        assert_models_equal(trainer.state.model, references(setup, fold).model)

    def test_algorithm_different(self, setup: Setup, fold: bool, references: References) -> None:
        # control: without this configuration's GradClipAlgo the weights differ (its thresholds clip)
        trainer = Trainer(**equivalence_config(setup, fold, without_gradclip=True))
        trainer.fit()
        with pytest.raises(AssertionError):
            assert_models_equal(trainer.state.model, references(setup, fold).model)


# test_trainer.py::TestTrainerEquivalence::test_checkpoint, for the lists Composer can resume
@pytest.mark.parametrize(("setup", "fold"), RESUMABLE)
def test_checkpoint(setup: Setup, fold: bool, references: References) -> None:
    reference = references(setup, fold)
    config = equivalence_config(setup, fold)
    config["load_path"] = str(reference.folder / "ep1.pt")  # finish training from epoch 1
    trainer = Trainer(**config)
    assert trainer.state.timestamp.epoch == "1ep"  # the checkpoint's state was loaded
    trainer.fit()
    assert_models_equal(trainer.state.model, reference.model)


# ---- fold_into_optimizer=True and False agree ------------------------------------------------------------


@pytest.mark.parametrize(
    "setup", [pytest.param(setup, id=setup.name, marks=setup.marks) for setup in SETUPS if setup.fused]
)
def test_folded_equals_unfolded(setup: Setup, references: References) -> None:
    """Folding the clip into the fused optimizer's step changes where the grads are divided, not what the
    optimizer computes: the same run (same seed) folded and unfolded ends with the same weights and the
    same optimizer state within float32 rounding."""
    folded, unfolded = references(setup, True), references(setup, False)
    torch.testing.assert_close(
        model_tensors(folded.model), model_tensors(unfolded.model), rtol=2e-5, atol=1e-6
    )
    torch.testing.assert_close(
        optimizer_tensors(folded.optimizer), optimizer_tensors(unfolded.optimizer), rtol=2e-5, atol=1e-6
    )


FOLD_WHY_NOT = {
    "norm-plain_adam": "Adam reads no grad_scale/found_inf (use fused=True)",
    "composer_value-gradclip_norm": "GradientClipping also runs at AFTER_TRAIN_BATCH",
    "gradclip_norm-composer_value": "GradientClipping also runs at AFTER_TRAIN_BATCH",
    "norm0.5-norm0.1": "GradClipAlgo also runs at AFTER_TRAIN_BATCH",
    "value0.01-norm0.1": "GradClipAlgo also runs at AFTER_TRAIN_BATCH",
    "sam-norm": "SAMOptimizer reads no grad_scale/found_inf (use fused=True)",
}


class GradEditor(Callback):
    """A user's callback that acts at ``AFTER_TRAIN_BATCH`` (it could change the grads)."""

    def after_train_batch(self, state: State, logger: Logger) -> None:
        pass


@pytest.mark.parametrize("setup", [pytest.param(setup, id=setup.name) for setup in SETUPS])
def test_folds_only_where_nothing_else_acts_on_the_grads(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    """With the default ``fold_into_optimizer=True``, each GradClipAlgo folds (its norm factor becomes the
    fused step's ``grad_scale``) exactly where no other algorithm or user callback runs at
    ``AFTER_TRAIN_BATCH``; elsewhere ``fold_why_not`` and one INFO line name the cause."""
    model = TinyMLP()
    algorithms = setup.build(True)
    caplog.set_level("INFO", logger="gradclip_algo.algorithm")
    Trainer(
        model=model,
        train_dataloader=DataLoader(RandomClassificationDataset(size=8), batch_size=4),
        max_duration="2ba",
        optimizers=make_optimizer(setup.optimizer, model),
        algorithms=algorithms,
        **QUIET,
    ).fit()
    expected = FOLD_WHY_NOT.get(setup.name, "")
    clippers = [alg for alg in algorithms if isinstance(alg, GradClipAlgo)]
    # the flag that spares the harness an unfolded twin of a run that folds nothing
    assert any(alg.last_stats is not None and alg.last_stats.folded for alg in clippers) == setup.folds
    for algorithm in clippers:
        assert algorithm.last_stats is not None
        assert expected in algorithm.fold_why_not and bool(algorithm.fold_why_not) == bool(expected)
        if algorithm.clipper.clipping_type == "norm":
            assert bool(algorithm.last_stats.folded) == (not expected)
    logged = [record.getMessage() for record in caplog.records if "not folded" in record.getMessage()]
    assert len(logged) == (sum(isinstance(alg, GradClipAlgo) for alg in algorithms) if expected else 0)


def test_a_user_callback_at_after_train_batch_stops_the_fold() -> None:
    model = TinyMLP()
    algorithm = gca(True, "norm", 0.1)
    Trainer(
        model=model,
        train_dataloader=DataLoader(RandomClassificationDataset(size=8), batch_size=4),
        max_duration="2ba",
        optimizers=make_optimizer("adamw", model),
        algorithms=[algorithm],
        callbacks=[GradEditor()],
        **QUIET,
    ).fit()
    assert algorithm.fold_why_not == "callback GradEditor handles AFTER_TRAIN_BATCH and may change the grads"
    assert algorithm.last_stats is not None and not algorithm.last_stats.folded


class SkipCounter(Callback):
    """Counts the steps GradClipAlgo skipped (``ClipStats.skipped``), read at ``BATCH_END``."""

    def __init__(self, algorithm: GradClipAlgo) -> None:
        self.algorithm = algorithm
        self.skipped = 0

    def batch_end(self, state: State, logger: Logger) -> None:
        stats = self.algorithm.last_stats
        if stats is not None and bool(stats.skipped):
            self.skipped += 1


@pytest.mark.parametrize(
    ("setup", "fold"), configurations(tuple(setup for setup in SETUPS if "skip_spikes" in setup.name))
)
def test_skip_spikes_configurations_skip_a_step(setup: Setup, fold: bool) -> None:
    """The spiked batch of the equivalence runs is skipped, so those runs test skipping."""
    config = equivalence_config(setup, fold)
    counter = SkipCounter(next(alg for alg in config["algorithms"] if isinstance(alg, GradClipAlgo)))
    Trainer(**config, callbacks=[counter]).fit()
    assert counter.skipped >= 1


# ---- test_checkpoint.py::TestCheckpointResumption -------------------------------------------------------


def resumption_trainer(
    setup: Setup,
    fold: bool,
    max_duration: str = "2ep",
    train_subset_num_batches: int = 5,
    **kwargs: Any,
) -> Trainer:
    model = TinyMLP()
    train_dataset = RandomClassificationDataset(size=24, seed=3, spike_index=6)  # the spike in batch 4
    eval_dataset = RandomClassificationDataset(size=12, seed=4)
    train_batch_size = 2
    return Trainer(
        model=model,
        train_dataloader=DataLoader(
            train_dataset, batch_size=train_batch_size, sampler=dist.get_sampler(train_dataset)
        ),
        eval_dataloader=DataLoader(
            eval_dataset, batch_size=train_batch_size, sampler=dist.get_sampler(eval_dataset)
        ),
        device_train_microbatch_size=train_batch_size // 2,
        precision="fp32",
        train_subset_num_batches=train_subset_num_batches,
        max_duration=max_duration,
        optimizers=make_optimizer(setup.optimizer, model),
        schedulers=ExponentialScheduler(gamma=0.9),
        algorithms=setup.build(fold),
        **QUIET,
        **kwargs,
    )


def assert_expected_num_checkpoints(
    save_folder: Path, save_interval: str, num_epochs: int, num_batches_per_epoch: int
) -> None:
    interval = Time.from_timestring(save_interval)
    if interval.unit == TimeUnit.EPOCH:
        expected_num_files = ((num_epochs - 1) // interval.value) + 1
    else:
        expected_num_files = ((num_batches_per_epoch * num_epochs - 1) // interval.value) + 1
    expected_num_files += 1  # the latest symlink
    assert len(os.listdir(save_folder)) == expected_num_files


@pytest.mark.parametrize(("setup", "fold"), RESUMABLE)
@pytest.mark.parametrize(
    ("seed", "save_interval", "save_filename", "resume_file", "final_checkpoint"),
    [
        # a randomized seed saved in the checkpoint, and the latest symlink
        pytest.param(
            None, "1ep", "ep{epoch}-rank{rank}.pt", "ep1-rank{rank}.pt", "latest-rank{rank}.pt", id="ep"
        ),
        # a save every 2 batches, resumed inside the first epoch
        pytest.param(42, "2ba", "ba{batch}-rank{rank}.pt", "ba4-rank{rank}.pt", "ba8-rank{rank}.pt", id="ba"),
    ],
)
def test_resumption(
    setup: Setup,
    fold: bool,
    seed: int | None,
    save_interval: str,
    save_filename: str,
    resume_file: str,
    final_checkpoint: str,
    tmp_path: Path,
) -> None:
    def train(folder: str, **kwargs: Any) -> None:
        trainer = resumption_trainer(
            setup,
            fold,
            save_folder=str(tmp_path / folder),
            save_filename=save_filename,
            save_interval=save_interval,
            eval_interval=save_interval,
            seed=seed,
            **kwargs,
        )
        trainer.fit()
        trainer.close()

    train("first")
    assert_expected_num_checkpoints(tmp_path / "first", save_interval, num_epochs=2, num_batches_per_epoch=5)
    train("second", load_path=str(tmp_path / "first" / resume_file.format(rank=0)))

    assert_checkpoints_equivalent(
        tmp_path / "first" / final_checkpoint, tmp_path / "second" / final_checkpoint
    )
