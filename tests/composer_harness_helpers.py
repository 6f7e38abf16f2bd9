"""Small stand-ins for the helpers of Composer 0.32.1's ``tests/common`` and checkpoint tests, written for
``tests/test_composer_harness.py``: a tiny classifier, a random classification dataset, ``deep_compare``
and the checkpoint comparisons of ``test_algorithm_resumption.py`` and ``test_checkpoint.py``.

They implement the same facts as Composer's (``deep_compare`` compares tensors with ``torch.allclose``
without ``equal_nan``, Python scalars by type and ``==``, numpy arrays with ``np.allclose(rtol=0.1,
atol=0.1)``, torchmetrics metrics by their computed value with ``equal_nan=True``), not the same code.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from composer.algorithms import SAM, GradientClipping, LabelSmoothing
from composer.core import Algorithm, Time, TimeUnit
from composer.models import ComposerClassifier
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from gradclip_algo import GradClipAlgo

NUM_FEATURES = 8
NUM_HIDDEN = 16
NUM_CLASSES = 4
SPIKE_SCALE = 50.0
"""One sample's features are multiplied by this, so that one batch per epoch has a grad-norm spike."""


# ---- model and data (tests/common/models.py SimpleModel, tests/common/datasets.py) -----------------------


class TinyMLP(ComposerClassifier):
    """A 2-layer MLP classifier (8 features, 16 hidden, 4 classes), in the role of Composer's ``SimpleModel``.

    The weights come from their own generator seeded by ``seed``, so that two instances built with the
    same seed start equal without reading or advancing the global RNG (Composer's tests deep-copy one).
    """

    def __init__(self, seed: int = 0) -> None:
        fc1 = nn.Linear(NUM_FEATURES, NUM_HIDDEN)
        fc2 = nn.Linear(NUM_HIDDEN, NUM_CLASSES)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (fc1, fc2):
                bound = 1.0 / math.sqrt(layer.in_features)
                for param in layer.parameters():
                    param.copy_(torch.rand(param.shape, generator=gen) * 2 * bound - bound)
        super().__init__(module=nn.Sequential(fc1, nn.ReLU(), fc2), num_classes=NUM_CLASSES)
        self.fc1 = fc1
        self.fc2 = fc2


class RandomClassificationDataset(Dataset[tuple[Tensor, Tensor]]):
    """Normal features and uniform labels, drawn once from a generator seeded by ``seed`` (Composer's
    draws them lazily from the global RNG after the Trainer seeds it; a fixed generator gives the same
    data in every run, resumed or not, whatever the seed).

    ``spike_index``: that sample's features are multiplied by :data:`SPIKE_SCALE`.
    """

    def __init__(self, size: int = 16, seed: int = 0, spike_index: int | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, NUM_FEATURES, generator=gen)
        self.y = torch.randint(0, NUM_CLASSES, (size,), generator=gen)
        if spike_index is not None:
            self.x[spike_index] *= SPIKE_SCALE

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


# ---- the configurations under test ---------------------------------------------------------------------

LRS = {"adamw": 0.01, "adam": 0.01, "sgd": 0.05}


def make_optimizer(kind: str, model: nn.Module, lr_scale: float = 1.0) -> Optimizer:
    """``adamw``/``sgd``: torch's fused AdamW / SGD with momentum (they read ``grad_scale`` and ``found_inf``,
    so GradClipAlgo can fold); ``adam``: plain Adam as in Composer's own tests (nothing to fold into)."""
    lr = LRS[kind] * lr_scale
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, fused=True)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    raise ValueError(kind)


def gca(fold: bool, clipping_type: str, threshold: float, **options: Any) -> GradClipAlgo:
    return GradClipAlgo(clipping_type, threshold, fold_into_optimizer=fold, **options)


@dataclass(frozen=True)
class Setup:
    """One list of algorithms, built for ``fold_into_optimizer=fold``, and the optimizer it trains with.

    Composer runs the algorithms of an ``AFTER_*`` event in reverse list order (``passes.set_filo_order``):
    at ``AFTER_TRAIN_BATCH`` the last one in the list clips first.
    """

    name: str
    algorithms: Callable[[bool], list[Algorithm]]
    optimizer: str = "adamw"
    marks: tuple[Any, ...] = field(default=())
    resumable: bool = True
    """Whether Composer can resume this list from a checkpoint (not with SAM: its wrapped optimizer's
    weights mismatch on load, as Composer warns)."""
    folds: bool = False
    """Whether ``fold_into_optimizer=True`` folds anything here (a norm factor into a fused optimizer where
    nothing else acts on the grads, or a skip); elsewhere the folded and unfolded runs are one run."""

    @property
    def fused(self) -> bool:
        return self.optimizer != "adam"

    def build(self, fold: bool, without_gradclip: bool = False) -> list[Algorithm]:
        algorithms = self.algorithms(fold)
        if without_gradclip:
            return [alg for alg in algorithms if not isinstance(alg, GradClipAlgo)]
        return algorithms


INF = math.inf

SETUPS = (
    Setup("norm", lambda f: [gca(f, "norm", 0.1)], folds=True),
    Setup("norm-fused_sgd", lambda f: [gca(f, "norm", 0.1)], optimizer="sgd", folds=True),
    Setup("norm-plain_adam", lambda f: [gca(f, "norm", 0.1)], optimizer="adam"),
    Setup("value", lambda f: [gca(f, "value", 0.01)]),
    Setup("adaptive", lambda f: [gca(f, "adaptive", 0.01)]),
    Setup("quantile", lambda f: [gca(f, "quantile", INF, window=4)]),
    Setup("zscore", lambda f: [gca(f, "zscore", INF, warmup_steps=2)]),
    Setup("adagc", lambda f: [gca(f, "adagc", INF, warmup_steps=2)]),
    Setup("norm-skip_spikes", lambda f: [gca(f, "norm", 0.1, skip_spikes=3.0, spike_window=4)], folds=True),
    Setup(
        "zscore-skip_spikes-sgd",
        lambda f: [gca(f, "zscore", INF, warmup_steps=2, skip_spikes=3.0, spike_window=4)],
        optimizer="sgd",
        folds=True,
    ),
    # list order [GradientClipping, GradClipAlgo]: GradClipAlgo clips first, then Composer's
    Setup(
        "composer_value-gradclip_norm",
        lambda f: [GradientClipping(clipping_type="value", clipping_threshold=0.01), gca(f, "norm", 0.1)],
    ),
    # list order [GradClipAlgo, GradientClipping]: Composer's clips first, then GradClipAlgo
    Setup(
        "gradclip_norm-composer_value",
        lambda f: [gca(f, "norm", 0.1), GradientClipping(clipping_type="value", clipping_threshold=0.01)],
    ),
    Setup("norm0.5-norm0.1", lambda f: [gca(f, "norm", 0.5), gca(f, "norm", 0.1)]),
    Setup("value0.01-norm0.1", lambda f: [gca(f, "value", 0.01), gca(f, "norm", 0.1)]),
    Setup("norm-label_smoothing", lambda f: [gca(f, "norm", 0.1), LabelSmoothing(smoothing=0.1)], folds=True),
    # SAM wraps the optimizer at AFTER_LOAD and runs the closure (forward, backward, clip) twice a step
    Setup("sam-norm", lambda f: [SAM(rho=0.05), gca(f, "norm", 0.1)], resumable=False),
)
SETUP_BY_NAME = {setup.name: setup for setup in SETUPS}


# ---- deep_compare (tests/common/compare.py) --------------------------------------------------------------


def deep_compare(
    item1: Any, item2: Any, atol: float = 0.0, rtol: float = 0.0, ignore_keys: Iterable[str] | None = None
) -> None:
    """Assert that two nested structures of dicts, lists, tuples, tensors, numpy arrays, Python scalars,
    Composer times and torchmetrics metrics are equal: tensors by ``torch.allclose(atol, rtol)`` (NaN is
    unequal to everything, NaN included), scalars by type and ``==``."""
    _compare(item1, item2, "", atol, rtol, set(ignore_keys or ()))


def _compare(item1: Any, item2: Any, path: str, atol: float, rtol: float, ignore: set[str]) -> None:
    if item1 is None:
        assert item2 is None, f"{path} differs: {item1!r} != {item2!r}"
        return
    if isinstance(item1, (str, float, int, bool, Time, datetime.timedelta, TimeUnit)):
        assert type(item1) is type(item2), f"{path} differs in type: {type(item1)} != {type(item2)}"
        assert item1 == item2, f"{path} differs: {item1!r} != {item2!r}"
        return
    if isinstance(item1, Tensor):
        assert isinstance(item2, Tensor), f"{path} differs: a tensor and {type(item2)}"
        item1, item2 = item1.cpu(), item2.cpu()
        assert item1.shape == item2.shape, f"{path} differs in shape: {item1.shape} != {item2.shape}"
        assert item1.allclose(item2, rtol=rtol, atol=atol), f"{path} differs: {item1} != {item2}"
        return
    if isinstance(item1, np.ndarray):
        assert isinstance(item2, np.ndarray), f"{path} differs: an array and {type(item2)}"
        assert np.allclose(item1, item2, rtol=0.1, atol=0.1), f"{path} differs"
        return
    if isinstance(item1, dict):
        assert isinstance(item2, dict), f"{path} differs: {item1!r} != {item2!r}"
        if "schedulers" in path.lower() and "lr" in path.lower():  # torch >= 2.7 dropped 'verbose'
            item1.pop("verbose", None)
            item2.pop("verbose", None)
        assert len(item1) == len(item2), f"{path} differs in keys: {sorted(item1)} != {sorted(item2)}"
        for key, value in item1.items():
            if key in ignore:
                continue
            assert key in item2, f"{path}/{key} is missing from the second item"
            _compare(value, item2[key], f"{path}/{key}", atol, rtol, ignore)
        return
    if isinstance(item1, (tuple, list)):  # a broadcast turns tuples into lists: the type is not checked
        assert len(item1) == len(item2), f"{path} differs in length: {len(item1)} != {len(item2)}"
        for i, (value1, value2) in enumerate(zip(item1, item2, strict=True)):
            _compare(value1, value2, f"{path}/{i}", atol, rtol, ignore)
        return
    if isinstance(item1, torchmetrics.Metric):
        assert isinstance(item2, torchmetrics.Metric), f"{path} differs: a metric and {type(item2)}"
        item1._update_count += 1
        item2._update_count += 1
        value1, value2 = item1.compute(), item2.compute()
        item1._update_count -= 1
        item2._update_count -= 1
        assert isinstance(value1, Tensor) and isinstance(value2, Tensor), f"{path}: unexpected compute()"
        assert value1.allclose(value2, atol=atol, rtol=rtol, equal_nan=True), f"{path} differs"
        return
    raise NotImplementedError(f"{path}: unsupported type {type(item1)}")


# ---- checkpoints (test_algorithm_resumption.py, test_checkpoint.py) -------------------------------------

WALL_CLOCK = ("total_wct", "iteration_wct", "epoch_wct", "batch_wct")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(str(path).format(rank=0), map_location="cpu", weights_only=False)


def drop_volatile(checkpoint: dict[str, Any]) -> None:
    """Remove what differs between two equal runs: wall-clock times, the run name, the saver's list of
    saved files, and the ``repr`` of algorithms whose default repr holds a memory address (Composer's
    ``GradientClipping``, ``SAM``). Composer's resumption test drops those algorithms' entries
    whole; here only their ``repr`` goes, so the rest of their state is still compared."""
    state = checkpoint["state"]
    for key in WALL_CLOCK:
        del state["timestamp"]["Timestamp"][key]
    del state["run_name"]
    del state["callbacks"]["CheckpointSaver"]["all_saved_checkpoints_to_timestamp"]
    for name, algorithm_state in state["algorithms"]:
        if " at 0x" in algorithm_state.get("repr", ""):
            assert name != "GradClipAlgo", algorithm_state["repr"]
            del algorithm_state["repr"]


def assert_checkpoints_equal(file1: str | Path, file2: str | Path) -> None:
    """``test_algorithm_resumption._assert_checkpoints_equal``: the RNG states and the Trainer states agree
    exactly (``atol = rtol = 0``)."""
    checkpoint1, checkpoint2 = load_checkpoint(file1), load_checkpoint(file2)
    deep_compare(checkpoint1["rng"], checkpoint2["rng"])
    drop_volatile(checkpoint1)
    drop_volatile(checkpoint2)
    deep_compare(checkpoint1["state"], checkpoint2["state"])


def assert_model_weights_equal(file1: str | Path, file2: str | Path) -> None:
    deep_compare(load_checkpoint(file1)["state"]["model"], load_checkpoint(file2)["state"]["model"])


def assert_checkpoints_equivalent(file1: str | Path, file2: str | Path) -> None:
    """``test_checkpoint._assert_checkpoints_equivalent``: the whole checkpoints agree exactly, and both
    hold the model and the optimizers."""
    checkpoint1, checkpoint2 = load_checkpoint(file1), load_checkpoint(file2)
    drop_volatile(checkpoint1)
    drop_volatile(checkpoint2)
    deep_compare(checkpoint1, checkpoint2)
    assert all(
        "model" in ckpt["state"] and "optimizers" in ckpt["state"] for ckpt in (checkpoint1, checkpoint2)
    )


def optimizer_tensors(optimizer: Optimizer) -> dict[str, Tensor]:
    """Every tensor of ``optimizer.state_dict()['state']``, keyed ``<param index>/<name>``."""
    return {
        f"{index}/{name}": value
        for index, param_state in optimizer.state_dict()["state"].items()
        for name, value in param_state.items()
        if isinstance(value, Tensor)
    }


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}
