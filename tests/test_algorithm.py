"""``GradClipAlgo`` inside a real Composer ``Trainer``, checked against the functional API."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

import torch  # noqa: E402
from composer import Trainer  # noqa: E402
from composer.callbacks import OptimizerMonitor  # noqa: E402
from composer.core import Event, State  # noqa: E402
from composer.loggers import InMemoryLogger, Logger  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradclip_algo import (  # noqa: E402
    ClipStats,
    GradClipAlgo,
    NonFiniteGradError,
    apply_gradient_clipping,
    unit_norms,
)

BATCH = 8
NUM_BATCHES = 6
LRS = (0.1, 0.05)  # one per parameter group
METRICS = ("grad_norm", "clipped_grad_norm", "clipped_fraction", "clipped_steps_fraction", "skipped_steps")
# Globals Composer itself pickles into every checkpoint (numpy RNG state, wall-clock times, torch version).
COMPOSER_CHECKPOINT_GLOBALS = {
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "datetime.timedelta",
    "torch.torch_version.TorchVersion",
}


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps, for every ``step()``, the weights and grads it is about to update (group order)."""

    def __init__(self, param_groups: list[dict[str, Any]]) -> None:
        super().__init__(param_groups)
        self.seen: list[tuple[list[Tensor], list[Tensor | None]]] = []

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"]]
        self.seen.append(
            (
                [p.detach().clone() for p in params],
                [None if p.grad is None else p.grad.clone() for p in params],
            )
        )
        super().step()
        return loss


def make_model() -> ComposerClassifier:
    torch.manual_seed(0)
    return ComposerClassifier(nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)), num_classes=3)


def param_groups(model: ComposerClassifier) -> list[dict[str, Any]]:
    first, last = model.module[0], model.module[2]
    return [
        {"params": list(first.parameters()), "lr": LRS[0]},
        {"params": list(last.parameters()), "lr": LRS[1]},
    ]


def make_loader(nan_batch: int | None = None) -> DataLoader:
    """Batches whose inputs alternate in scale (x1, x20), so a threshold in between clips every other step."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(NUM_BATCHES, BATCH, 6, generator=gen)
    inputs[1::2] *= 20.0
    if nan_batch is not None:
        inputs[nan_batch, 0, 0] = float("nan")
    targets = torch.randint(0, 3, (NUM_BATCHES * BATCH,), generator=gen)
    return DataLoader(TensorDataset(inputs.reshape(-1, 6), targets), batch_size=BATCH, shuffle=False)


def train(
    algorithm: GradClipAlgo,
    model: ComposerClassifier | None = None,
    batches: int = NUM_BATCHES,
    loader: DataLoader | None = None,
    **trainer_args: Any,
) -> tuple[Trainer, RecordingSGD, InMemoryLogger]:
    model = model or make_model()
    optimizer = RecordingSGD(param_groups(model))
    in_memory = InMemoryLogger()
    trainer = Trainer(
        model=model,
        train_dataloader=loader or make_loader(),
        max_duration=f"{batches}ba",
        optimizers=optimizer,
        algorithms=[algorithm],
        loggers=[in_memory],
        progress_bar=False,
        device="cpu",
        seed=0,
        **{"log_to_console": False, **trainer_args},
    )
    trainer.fit()
    return trainer, optimizer, in_memory


def reference_run(
    model: ComposerClassifier, batches: int = NUM_BATCHES, **clipping: Any
) -> list[tuple[list[Tensor | None], ClipStats]]:
    """The same training with the functional API: whole batch, backward, clip, SGD step."""
    optimizer = torch.optim.SGD(param_groups(model))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    steps = []
    for _, batch in zip(range(batches), make_loader(), strict=False):
        optimizer.zero_grad(set_to_none=True)
        model.loss(model(batch), batch).backward()
        stats = apply_gradient_clipping(model, **clipping)
        steps.append(([None if p.grad is None else p.grad.clone() for p in params], stats))
        optimizer.step()
    return steps


def logged(in_memory: InMemoryLogger, name: str) -> list[tuple[int, float]]:
    return [
        (timestamp.batch.value, value) for timestamp, value in in_memory.data[f"gradient_clipping/{name}"]
    ]


def assert_grads_equal(got: list[Tensor | None], want: list[Tensor | None]) -> None:
    for got_grad, want_grad in zip(got, want, strict=True):
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def assert_loads_weights_only(checkpoint: Path) -> list[tuple[str, dict[str, Any]]]:
    """The checkpoint needs no pickled globals beyond Composer's own; its algorithms entry needs none."""
    assert (
        set(torch.serialization.get_unsafe_globals_in_checkpoint(checkpoint)) <= COMPOSER_CHECKPOINT_GLOBALS
    )
    saved = torch.load(checkpoint, weights_only=False)["state"]["algorithms"]
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(buffer) == []
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert repr(loaded) == repr(saved)
    return loaded


def assert_within_bound(
    clipping_type: str, threshold: float, weights: list[Tensor], grads: list[Tensor]
) -> None:
    """The rule's bound holds for the grads ``optimizer.step()`` received, and clipping was active."""
    if clipping_type == "norm":
        norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
        assert threshold * (1 - 1e-5) <= norm <= threshold * (1 + 1e-5)
    elif clipping_type == "value":
        assert max(g.abs().max() for g in grads) == pytest.approx(threshold, rel=1e-7)
    else:
        ratios = [
            unit_norms(g) / (threshold * unit_norms(w).clamp(min=1e-3))
            for w, g in zip(weights, grads, strict=True)
        ]
        assert max(r.max() for r in ratios) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("microbatch", [BATCH, 2])
@pytest.mark.parametrize(
    ("clipping_type", "threshold"), [("norm", 0.05), ("value", 0.01), ("adaptive", 0.01)]
)
def test_optimizer_sees_clipped_grads_equal_to_whole_batch_reference(
    clipping_type: str, threshold: float, microbatch: int
) -> None:
    """Every step, with or without accumulation over 4 microbatches and with two parameter groups,
    the grads reaching ``optimizer.step()`` obey the bound and equal the functional API on the whole batch."""
    model = make_model()
    reference = reference_run(copy.deepcopy(model), clipping_type=clipping_type, clipping_threshold=threshold)
    _, optimizer, _ = train(
        GradClipAlgo(clipping_type, threshold), model, device_train_microbatch_size=microbatch
    )
    assert len(optimizer.seen) == NUM_BATCHES
    for (weights, grads), (reference_grads, _) in zip(optimizer.seen, reference, strict=True):
        assert_within_bound(clipping_type, threshold, weights, grads)
        assert_grads_equal(grads, reference_grads)


@pytest.mark.parametrize("log_interval", [1, 3])
def test_logged_metrics_match_reference(log_interval: int) -> None:
    threshold = 3.0  # between the grad norms of the x1 and the x20 batches
    model = make_model()
    reference = [
        stats
        for _, stats in reference_run(
            copy.deepcopy(model), clipping_type="norm", clipping_threshold=threshold
        )
    ]
    clipped = [bool(stats.clipped_fraction) for stats in reference]
    assert clipped == [False, True] * (NUM_BATCHES // 2)
    algorithm = GradClipAlgo("norm", threshold, log_interval=log_interval)
    _, _, in_memory = train(algorithm)

    # Composer's numbering: batch k is the k-th batch trained, logged at steps k, 2k, ...
    steps = list(range(log_interval, NUM_BATCHES + 1, log_interval))
    for name in ("grad_norm", "clipped_grad_norm", "clipped_fraction"):
        assert logged(in_memory, name) == [
            (step, pytest.approx(float(getattr(reference[step - 1], name)), rel=1e-5)) for step in steps
        ]
    # share of clipped steps among those since the previous log, this one included
    windows = [range(step - log_interval, step) for step in steps]
    fractions = [sum(clipped[i] for i in window) / len(window) for window in windows]
    assert logged(in_memory, "clipped_steps_fraction") == list(zip(steps, fractions, strict=True))
    assert logged(in_memory, "skipped_steps") == [(step, 0) for step in steps]
    if log_interval == 3:
        assert steps == [3, 6] and fractions == [1 / 3, 2 / 3]
    assert algorithm.last_stats is not None
    assert float(algorithm.last_stats.grad_norm) == pytest.approx(float(reference[-1].grad_norm), rel=1e-5)


@pytest.mark.parametrize("stats_every_step", [False, True])
def test_value_measures_only_its_clipped_flag_on_steps_it_does_not_log(stats_every_step: bool) -> None:
    """With log_interval=4, 'value' measures steps 1-3, 5 and 6 only for clipped_steps_fraction (NaN norms
    in last_stats) unless stats_every_step; the grads, the logged step and the counters equal the
    functional API's full statistics every step."""
    threshold = 0.5  # every other step clips some elements (the x20 batches)
    model = make_model()
    reference = reference_run(copy.deepcopy(model), clipping_type="value", clipping_threshold=threshold)
    clipped = [float(stats.clipped_fraction) > 0 for _, stats in reference]
    assert clipped == [False, True] * (NUM_BATCHES // 2)
    algorithm = GradClipAlgo("value", threshold, log_interval=4, stats_every_step=stats_every_step)
    _, optimizer, in_memory = train(algorithm, model)
    for (_, grads), (reference_grads, _) in zip(optimizer.seen, reference, strict=True):
        assert_grads_equal(grads, reference_grads)
    at_four = reference[3][1]
    for name in ("grad_norm", "clipped_grad_norm", "clipped_fraction"):
        assert logged(in_memory, name) == [(4, pytest.approx(float(getattr(at_four, name)), rel=1e-5))]
    assert logged(in_memory, "clipped_steps_fraction") == [(4, 0.5)]
    assert algorithm.state_dict()["clipped_steps"] == 1  # steps 5 (not clipped) and 6 (clipped)
    last, want = algorithm.last_stats, reference[-1][1]
    assert last is not None and float(last.clipped_fraction) == (
        pytest.approx(float(want.clipped_fraction), rel=1e-6) if stats_every_step else 1.0
    )
    if stats_every_step:
        assert float(last.grad_norm) == pytest.approx(float(want.grad_norm), rel=1e-5)
    else:
        assert math.isnan(float(last.grad_norm)) and math.isnan(float(last.clipped_grad_norm))


def console_blocks(text: str) -> dict[int, dict[str, str]]:
    """Composer's console output, ``[batch=3/6]:`` then one ``\t Train name: value`` line per metric, by batch."""
    blocks: dict[int, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in text.splitlines():
        if line.startswith("[batch="):
            current = blocks.setdefault(int(line[len("[batch=") :].split("/")[0]), {})
        elif current is not None and line.strip().startswith("Train "):
            name, _, value = line.strip()[len("Train ") :].partition(": ")
            current[name] = value
    return blocks


@pytest.mark.parametrize("interval", [2, 3])
def test_logs_on_the_batches_and_steps_of_optimizer_monitor_and_the_console(interval: int) -> None:
    """``log_interval=k`` logs batches k, 2k, ... with the step numbers Composer's ``OptimizerMonitor`` and
    ``console_log_interval`` use at k, and the grads OptimizerMonitor sees are the clipped ones."""
    console = io.StringIO()
    algorithm = GradClipAlgo("norm", 3.0, log_interval=interval)
    _, _, in_memory = train(
        algorithm,
        callbacks=[OptimizerMonitor(batch_log_interval=interval)],
        log_to_console=True,
        console_log_interval=f"{interval}ba",
        console_stream=console,
    )
    steps = list(range(interval, NUM_BATCHES + 1, interval))
    monitor = [(ts.batch.value, value) for ts, value in in_memory.data["l2_norm/grad/global"]]
    ours = logged(in_memory, "clipped_grad_norm")
    assert [step for step, _ in monitor] == [step for step, _ in ours] == steps
    for (_, monitor_norm), (_, clipped_norm) in zip(monitor, ours, strict=True):
        assert clipped_norm == pytest.approx(monitor_norm, rel=1e-5)
    assert any(value == pytest.approx(3.0, rel=1e-5) for _, value in ours)  # a clipped step among them
    blocks = console_blocks(console.getvalue())
    with_ours = [batch for batch, metrics in blocks.items() if "gradient_clipping/grad_norm" in metrics]
    assert with_ours == steps
    for step, value in logged(in_memory, "grad_norm"):
        assert blocks[step]["gradient_clipping/grad_norm"] == f"{value:.4f}"
    assert all("l2_norm/grad/global" in blocks[step] for step in steps)
    assert in_memory.hyperparameters["enabled_algorithms/GradClipAlgo"] is True


def test_exclude_by_parameter_name() -> None:
    """The last layer (``module.2.*``) keeps its raw grads; the others are clipped by their own norm."""
    model = make_model()
    clipping = {"clipping_type": "norm", "clipping_threshold": 0.05, "exclude": ["module.2.*"]}
    reference = reference_run(copy.deepcopy(model), **clipping)
    unclipped = reference_run(copy.deepcopy(model), batches=1, clipping_type="norm", clipping_threshold=1e9)
    _, optimizer, _ = train(GradClipAlgo(**clipping), model)
    for (_, grads), (reference_grads, _) in zip(optimizer.seen, reference, strict=True):
        assert_grads_equal(grads, reference_grads)
        first_layer_norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[:2]]))
        assert first_layer_norm == pytest.approx(0.05, rel=1e-5)
    first_step_grads = optimizer.seen[0][1]
    assert_grads_equal(first_step_grads[2:], unclipped[0][0][2:])
    assert torch.linalg.vector_norm(first_step_grads[2]) > 0.05


def test_nonfinite_error_names_the_batch_and_the_parameter() -> None:
    with pytest.raises(
        NonFiniteGradError, match=r"^batch 2: non-finite gradient .* in module\.0\.weight"
    ) as info:
        train(GradClipAlgo("norm", 1.0, nonfinite="error"), loader=make_loader(nan_batch=2))
    assert info.value.param_name == "module.0.weight"
    assert isinstance(info.value.__cause__, NonFiniteGradError)


def test_nonfinite_skip_leaves_weights_untouched_and_is_counted() -> None:
    algorithm = GradClipAlgo("norm", 1.0, nonfinite="skip", log_interval=3)
    trainer, optimizer, in_memory = train(algorithm, batches=4, loader=make_loader(nan_batch=2))
    weights_before, grads = optimizer.seen[2]
    assert all(grad is None for grad in grads)
    for before, after in zip(weights_before, optimizer.seen[3][0], strict=True):
        assert torch.equal(before, after)
    assert logged(in_memory, "skipped_steps") == [(3, 1)]  # batches 1-3, the third one skipped
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())


def test_checkpoint_resume_restores_counters_and_loads_weights_only(tmp_path: Path) -> None:
    threshold = 3.0
    _, _, uninterrupted = train(GradClipAlgo("norm", threshold, log_interval=3))

    first = GradClipAlgo("norm", threshold, log_interval=3)
    train(first, batches=2, save_folder=str(tmp_path), save_interval="2ba")
    checkpoint = tmp_path / "ep0-ba2-rank0.pt"
    # after batches 1 and 2 (the second clipped), neither logged: two steps in the window, one clipped
    assert first.state_dict() == {
        "repr": "GradClipAlgo(clipping_type='norm', clipping_threshold=3.0, log_interval=3)",
        "clipper": {},
        "steps_since_log": 2,
        "clipped_steps": 1,
        "skipped_steps": 0,
    }

    saved = assert_loads_weights_only(checkpoint)
    assert saved == [("GradClipAlgo", first.state_dict())]

    resumed = GradClipAlgo("norm", threshold, log_interval=3)
    _, _, in_memory = train(resumed, load_path=str(checkpoint))
    assert logged(in_memory, "clipped_steps_fraction") == [(3, 1 / 3), (6, 2 / 3)]
    for name in METRICS:
        assert logged(in_memory, name) == [
            (step, pytest.approx(value, rel=1e-5)) for step, value in logged(uninterrupted, name)
        ]


def test_stateful_rule_resumes_with_its_statistics(tmp_path: Path) -> None:
    """AutoClip's norm history goes through the checkpoint: the resumed run clips as the uninterrupted one."""
    clipping = {
        "clipping_type": "quantile",
        "clipping_threshold": float("inf"),
        "percentile": 10.0,
        "window": 8,
    }
    _, uninterrupted, uninterrupted_log = train(GradClipAlgo(**clipping))
    # a fresh history never clips its first step, so clipping at step 3 needs the restored one
    assert logged(uninterrupted_log, "clipped_fraction")[3] == (4, 1.0)

    train(GradClipAlgo(**clipping), batches=3, save_folder=str(tmp_path), save_interval="3ba")
    saved = assert_loads_weights_only(tmp_path / "ep0-ba3-rank0.pt")
    assert set(saved[0][1]["clipper"]) == {"rule"}
    resumed = GradClipAlgo(**clipping)
    _, optimizer, _ = train(resumed, load_path=str(tmp_path / "ep0-ba3-rank0.pt"))
    # loading first runs one step with zero grads at lr 0 to create the optimizer state (torch's
    # distributed-checkpoint helper); the training steps follow
    init_step, *steps = optimizer.seen
    assert all(torch.count_nonzero(grad) == 0 for grad in init_step[1])
    for (_, grads), (_, want) in zip(steps, uninterrupted.seen[3:], strict=True):
        assert_grads_equal(grads, want)


def test_load_state_dict_of_composers_own_algorithm_keeps_a_fresh_state() -> None:
    algorithm = GradClipAlgo("norm", 1.0)
    with pytest.warns(UserWarning, match="holds no gradclip_algo state"):
        algorithm.load_state_dict({"repr": "GradClipAlgo(clipping_type='norm', clipping_threshold=1.0)"})
    assert algorithm.state_dict()["steps_since_log"] == 0


def _zscore_state_after_two_steps() -> dict:
    algorithm = GradClipAlgo("zscore", 1.0, log_interval=4)
    params = [nn.Parameter(torch.zeros(3))]
    for scale in (1.0, 2.0):
        params[0].grad = torch.full((3,), scale)
        algorithm.clipper(params)
    state = algorithm.state_dict()
    state.update(steps_since_log=2, clipped_steps=1, skipped_steps=0)
    return state


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps_since_log": -1}, r"state\.steps_since_log: expected an integer >= 0, got -1"),
        ({"clipped_steps": 1.5}, r"state\.clipped_steps: expected an integer >= 0, got 1\.5"),
        ({"skipped_steps": True}, r"state\.skipped_steps: expected an integer >= 0, got True"),
        ({"clipped_steps": 3}, r"state\.clipped_steps: 3 is more than the 2 steps since the last log"),
        ({"steps_since_log": None}, r"state\.steps_since_log: expected an integer >= 0, got None"),
        (
            {"clipper": {"rule": {"step": torch.tensor(2)}}},
            r"GradClipAlgo: state\.rule: expected keys mean, step, var",
        ),
    ],
)
def test_load_state_dict_is_checked_and_all_or_nothing(change: dict, message: str) -> None:
    """A bad counter or clipper state raises before anything is replaced (it used to fail later inside
    fit() with a ZeroDivisionError, or half-load)."""
    good = _zscore_state_after_two_steps()
    algorithm = GradClipAlgo("zscore", 1.0, log_interval=4)
    with pytest.raises(ValueError, match=message):
        algorithm.load_state_dict({**good, **change})
    assert algorithm.clipper.state_dict() == {} and algorithm.state_dict()["steps_since_log"] == 0
    missing = {key: value for key, value in good.items() if key != "skipped_steps"}
    with pytest.raises(ValueError, match=r"state: missing key 'skipped_steps'"):
        algorithm.load_state_dict(missing)
    algorithm.load_state_dict(good)
    assert algorithm.state_dict()["clipped_steps"] == 1
    assert torch.equal(algorithm.clipper.state_dict()["rule"]["step"], torch.tensor(2))


def test_amp_fp16_propagates_nonfinite_grads_warns_once_and_counts_scaler_skips() -> None:
    """Under fp16 AMP the GradScaler skips inf/NaN steps, so 'error' must not raise (State built on CPU)."""
    model = make_model()
    state = State(model=model, rank_zero_seed=0, run_name="fp16", device="cpu", precision="amp_fp16")
    in_memory = InMemoryLogger()
    logger = Logger(state, in_memory)
    in_memory.init(state, logger)
    algorithm = GradClipAlgo("norm", 1.0, nonfinite="error", log_interval=2)
    assert algorithm.match(Event.AFTER_TRAIN_BATCH, state) and algorithm.match(Event.BATCH_END, state)
    assert not algorithm.match(Event.AFTER_BACKWARD, state)
    with pytest.warns(UserWarning, match="'error' is treated as 'propagate'") as warned:
        for step in range(5):
            state.timestamp = state.timestamp.copy(batch=step)  # batches trained before this one
            for param in model.parameters():
                param.grad = torch.full_like(param, float("nan") if step > 0 else 1.0)
            algorithm.apply(Event.AFTER_TRAIN_BATCH, state, logger)
            state.timestamp = state.timestamp.copy(
                batch=step + 1
            )  # Composer counts the batch, then BATCH_END
            algorithm.apply(Event.BATCH_END, state, logger)
    assert len(warned) == 1
    assert all(torch.isnan(p.grad).all() for p in model.parameters())
    assert logged(in_memory, "skipped_steps") == [(2, 1), (4, 2)]
    assert algorithm.nonfinite == "error"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Composer runs AMP precisions on GPU only")
@pytest.mark.parametrize("precision", ["amp_fp16", "amp_bf16"])
def test_amp_precisions_on_gpu(precision: str) -> None:
    _, optimizer, in_memory = train(GradClipAlgo("norm", 0.05), device="gpu", precision=precision)
    assert optimizer.seen  # the fp16 GradScaler may skip the first steps while it lowers its scale
    for _, grads in optimizer.seen:
        norm = torch.linalg.vector_norm(torch.cat([g.float().flatten() for g in grads]))
        assert norm <= 0.05 * (1 + 1e-3)
    assert [step for step, _ in logged(in_memory, "grad_norm")] == list(range(1, NUM_BATCHES + 1))


def test_repr() -> None:
    assert repr(GradClipAlgo("norm", 1)) == (
        "GradClipAlgo(clipping_type='norm', clipping_threshold=1.0, log_interval=1)"
    )
    assert repr(GradClipAlgo("adaptive", 0.01, log_interval=10, eps=1e-4, exclude=["*fc.*"])) == (
        "GradClipAlgo(clipping_type='adaptive', clipping_threshold=0.01, log_interval=10, "
        "eps=0.0001, exclude=['*fc.*'])"
    )


@pytest.mark.parametrize(
    ("args", "options", "error", "message"),
    [
        (
            ("l2", 1.0),
            {},
            ValueError,
            r"clipping_type: expected one of 'norm', 'value', 'adaptive'.* got 'l2'",
        ),
        (("norm", -1.0), {}, ValueError, r"clipping_threshold: expected a number > 0 and finite, got -1.0"),
        (("norm", "1.0"), {}, ValueError, r"clipping_threshold: .* got '1.0' \(str\)"),
        (
            ("norm", 1.0),
            {"log_interval": 0},
            ValueError,
            r"log_interval: expected an integer >= 1 or a count of batches such as .10ba., got 0",
        ),
        (("norm", 1.0), {"log_interval": True}, ValueError, r"log_interval: .* got True"),
        (("norm", 1.0), {"log_interval": 2.0}, ValueError, r"log_interval: .* got 2.0"),
        (("norm", 1.0), {"eps": 1e-3}, TypeError, r"unknown option\(s\) eps; allowed: "),
        (("norm", 1.0), {"nonfinite": "ignore"}, ValueError, r"nonfinite: expected one of .* got 'ignore'"),
        (("norm", 1.0), {"exclude": [3]}, TypeError, r"exclude: expected glob patterns"),
        (
            ("norm", 1.0),
            {"norm_typ": 1},
            TypeError,
            r"^GradClipAlgo: unknown key\(s\) 'norm_typ' \(did you mean 'norm_type'\?\); allowed keys: clipping_type, clipping_threshold, log_interval, ",
        ),
        (
            ("norm",),
            {"threshold": 1},
            TypeError,
            r"^GradClipAlgo: missing required key 'clipping_threshold'; got 'threshold', which is not a key",
        ),
        (
            (),
            {},
            TypeError,
            r"^GradClipAlgo: missing required key\(s\) 'clipping_type', 'clipping_threshold'; allowed keys: ",
        ),
        (
            ("adagc", "inf"),
            {},
            ValueError,
            r"^GradClipAlgo: clipping_threshold: .* got 'inf' \(str\); YAML reads inf as a string: write \.inf$",
        ),
        (
            ("norm", "1e-3"),
            {},
            ValueError,
            r"got '1e-3' \(str\); write it as a number, not a string \(YAML: 0\.001\)$",
        ),
    ],
)
def test_bad_values_raise_at_construction(
    args: tuple[Any, ...], options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        GradClipAlgo(*args, **options)
    assert str(info.value).startswith("GradClipAlgo: ")  # which class failed, not Composer's
