"""The language-model task: its text and split, the transformer and its instability signals, loss spikes,
LR sensitivity and the sweep's tables, and short runs of ``gradclip-train`` and of the ``demo-lm`` sweep."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gradclip_algo.train.language_model import INIT_STD, ByteTransformer
from gradclip_algo.train.lm_results import LanguageModelSummary
from gradclip_algo.train.lm_sweep import (
    Sweep,
    capped_loss,
    largest_trainable_lr,
    loss_table,
    loss_verdicts,
    lr_sensitivity,
    range_verdicts,
    sensitivity_table,
)
from gradclip_algo.train.loss_spikes import count_episodes, spike_report, spike_steps
from gradclip_algo.train.text_data import ByteWindows, pydoc_topics_bytes, train_and_eval_windows

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_LM = [
    "max_duration=6ba",
    "model.d_model=16",
    "model.n_heads=2",
    "task.context_length=16",
    "task.batch_size=4",
    "task.eval_windows=8",
    "task.eval_interval=3",
]


def test_the_split_is_deterministic_disjoint_and_next_byte() -> None:
    text = pydoc_topics_bytes()
    assert len(text) > 100_000 and b"if_stmt" not in text[:0]
    train, held_out = train_and_eval_windows("pydoc_topics", 32, 0.1, None)
    cut = int(len(text) * 0.9)
    assert len(train) == (cut - 1) // 32 and len(held_out) == (len(text) - cut - 1) // 32
    inputs, targets = train[5]
    assert bytes(inputs.tolist()) == text[160:192] and bytes(targets.tolist()) == text[161:193]
    first_eval, _ = held_out[0]
    assert bytes(first_eval.tolist()) == text[cut : cut + 32]  # after every training byte
    again, _ = train_and_eval_windows("pydoc_topics", 32, 0.1, 4)
    assert len(_) == 4 and torch.equal(again[7][0], train[7][0])


def test_windows_refuse_a_text_too_short() -> None:
    with pytest.raises(ValueError, match="hold no window of 9 bytes"):
        ByteWindows(torch.zeros(8, dtype=torch.uint8), 8)


def test_the_transformer_is_causal() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(context_length=12, d_model=16, n_layers=2, n_heads=4)
    tokens = torch.randint(0, 256, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    before, after = model(tokens), model(changed)
    assert before.shape == (2, 12, 256)
    assert torch.equal(before[:, :7], after[:, :7]) and not torch.allclose(before[:, 7:], after[:, 7:])


def test_attention_equals_torch_and_its_largest_logit_is_kept() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(context_length=12, d_model=16, n_layers=2, n_heads=4)
    tokens = torch.randint(0, 256, (3, 12))
    model(tokens)
    x = model.embed(tokens) + model.position(torch.arange(12))
    largest = []
    for layer in model.layers:
        attn = layer.attn
        q, k, v = attn.qkv(layer.attn_norm(x)).view(3, 12, 3, 4, 4).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q @ k.transpose(-2, -1)) / 2.0  # sqrt(d_head = 4)
        largest.append(logits.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), -math.inf).amax())
        assert attn.max_logit.item() == pytest.approx(largest[-1].item(), rel=1e-6)
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mixed = attn.out(reference.transpose(1, 2).reshape(3, 12, 16))
        assert torch.allclose(attn(layer.attn_norm(x)), mixed, atol=1e-6)
        x = layer(x)
    assert model.max_attention_logit().item() == max(value.item() for value in largest)


def test_gpt2_initialisation() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(context_length=64, d_model=64, n_layers=4, n_heads=4)
    params = dict(model.named_parameters())
    for name in ("embed.weight", "position.weight", "layers.0.attn.qkv.weight", "layers.3.mlp.up.weight"):
        assert params[name].std().item() == pytest.approx(INIT_STD, rel=0.1)
    for name in ("layers.0.attn.out.weight", "layers.2.mlp.down.weight"):
        assert params[name].std().item() == pytest.approx(INIT_STD / math.sqrt(8), rel=0.1)
    assert all(not p.any() for n, p in params.items() if n.endswith("bias") and "norm" not in n)
    assert all(bool((p == 1).all()) for n, p in params.items() if n.endswith("norm.weight"))


def test_spike_steps_count_and_score() -> None:
    losses = [2.0 + 0.01 * (i % 3) for i in range(60)]
    losses[55] = 3.0  # a spike
    losses[56] = 2.9  # its second step
    losses[58] = math.nan
    steps = spike_steps(losses, window=50, sigmas=4.0)
    assert steps == [56, 57, 59]
    assert count_episodes(steps, merge_gap=10) == 1 and count_episodes([3, 20, 25], merge_gap=10) == 2
    report = spike_report(losses, window=50, sigmas=4.0, merge_gap=10)
    assert report.spikes == 1 and report.score == pytest.approx(30.0)
    assert spike_report(losses[:50]).score == 0.0


def test_lr_sensitivity_is_the_papers_formula() -> None:
    initial = 5.5
    losses = [4.0, 3.0, 2.5, 2.7, math.nan, 7.0]  # a NaN and a loss above L0 both count as L0
    assert [capped_loss(loss, initial) for loss in losses] == [4.0, 3.0, 2.5, 2.7, 5.5, 5.5]
    expected = ((4.0 - 2.5) + (3.0 - 2.5) + 0.0 + (2.7 - 2.5) + 3.0 + 3.0) / 6
    assert lr_sensitivity(losses, initial) == pytest.approx(expected)
    assert lr_sensitivity([3.0, 3.0], initial) == 0.0
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 3.0, 10.0]
    assert largest_trainable_lr(lrs, losses, margin=0.2) == 1.0  # 2.7 is within 0.2 of 2.5
    assert largest_trainable_lr(lrs, losses, margin=0.1) == 1e-1
    assert math.isnan(largest_trainable_lr(lrs[:2], [math.nan, math.inf], margin=0.1))


def _summary(final: float, spikes: int = 0) -> LanguageModelSummary:
    return LanguageModelSummary(
        steps=10,
        initial_eval_loss=5.5,
        final_eval_loss=final,
        best_eval_loss=final,
        log_partition=5.0,
        max_attention_logit=1.0,
        mean_update_norm=0.1,
        loss_spikes=spikes,
        spike_score=0.0,
        clipped_steps=0,
        skipped_steps=0,
        max_grad_norm=1.0,
        first_nonfinite_step=None,
    )


def test_the_sweep_tables_and_verdicts_come_from_the_numbers() -> None:
    lrs = (1e-2, 1e-1, 1.0)
    curves = {  # per set-up, per seed: final loss at each lr
        "none": ([3.0, 3.5, math.nan], [3.1, 3.4, 6.0]),
        "wide": ([3.0, 3.05, 3.6], [3.1, 3.15, 3.5]),  # trainable to 0.1, lower sensitivity on both seeds
        "mixed": ([3.0, 3.2, 5.5], [3.1, 3.8, 5.5]),  # lower on seed 0, higher on seed 1
    }
    runs = {
        (setup, lr, seed): _summary(curve[seed][index], spikes=seed)
        for setup, curve in curves.items()
        for seed in (0, 1)
        for index, lr in enumerate(lrs)
    }
    sweep = Sweep(("none", "wide", "mixed"), {"none": "none", "wide": "w", "mixed": "m"}, lrs, (0, 1), runs)
    assert sweep.sensitivities("none") == pytest.approx([(0.5 + 2.5) / 3, (0.3 + 2.4) / 3])
    assert sweep.largest_lr("none", 0.1) == 1e-2 and sweep.largest_lr("wide", 0.1) == 1e-1
    table = loss_table(sweep)
    assert "| none | none | 3.050 [3.000, 3.100] | 3.450 [3.400, 3.500] | inf/nan in 1 |" in table
    sensitivity = sensitivity_table(sweep, 0.1)
    assert (
        "| wide | w | 0.183 [0.150, 0.217] | 3.050 | 0.01 | 0.1 | 0.1, 0.1 | 1.5 [0.0, 3.0] |" in sensitivity
    )
    assert range_verdicts(sweep, 0.1) == [
        "largest trainable lr (seed-mean loss within 0.1 nats/byte of the set-up's best), none: 0.01; "
        "larger: wide; smaller: (no set-up); the same: mixed",
        "largest trainable lr larger than none's on every seed: wide; smaller on every seed: (no set-up)",
        "LR sensitivity lower than none's on every seed: wide; higher on every seed: (no set-up); neither: mixed",
    ]
    assert loss_verdicts(sweep) == [  # a NaN loses to every finite loss
        "wide: final loss below none's on every seed at lr 0.1, 1; above at lr (none)",
        "mixed: final loss below none's on every seed at lr 1; above at lr (none)",
    ]
    flat = Sweep(
        ("none", "same"),
        {"none": "none", "same": "s"},
        lrs,
        (0,),
        {(setup, lr, 0): _summary(3.0) for setup in ("none", "same") for lr in lrs},
    )
    assert (
        range_verdicts(flat, 0.1)[-1]
        == "no clipping set-up makes a larger learning rate trainable on its one seed"
    )


@pytest.mark.composer
def test_a_short_lm_run_writes_its_folder(tmp_path: Path) -> None:
    pytest.importorskip("composer")
    from gradclip_algo.train.cli import main

    clipping = [
        "algorithms.gradclip_algo.clipping_type=zscore",
        "algorithms.gradclip_algo.clipping_threshold=0.5",
        "algorithms.gradclip_algo.warmup_steps=2",
        "algorithms.gradclip_algo.log_layer_norms=3",
    ]
    assert main([str(CONFIGS / "demo_lm.yaml"), f"run_folder={tmp_path}", *TINY_LM, *clipping]) == 0
    folder = tmp_path / "demo_lm"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    for row in rows[:2]:  # warm-up: the ceiling alone
        assert float(row["threshold"]) == 0.5
    for row in rows:
        threshold, before, after = (float(row[k]) for k in ("threshold", "grad_norm", "clipped_grad_norm"))
        assert threshold <= 0.5
        assert (row["clipped"] == "True") == (before > threshold)
        assert after == pytest.approx(min(before, threshold), rel=1e-4)
    layer_rows = list(csv.reader((folder / "layer_norms.csv").open()))
    assert layer_rows[0][:3] == ["step", "net.embed.weight", "net.position.weight"] and len(layer_rows) == 7
    for row, layer in zip(rows, layer_rows[1:], strict=True):  # pre-clip: they add up to the pre-clip norm
        assert math.sqrt(sum(float(v) ** 2 for v in layer[1:])) == pytest.approx(
            float(row["grad_norm"]), rel=1e-4
        )
    evals = list(csv.DictReader((folder / "eval.csv").open()))
    assert [int(e["step"]) for e in evals] == [0, 3, 6]  # the initialisation first
    initial = evals[0]
    assert float(initial["loss"]) == pytest.approx(math.log(256), abs=0.02)  # logits near 0 at init
    assert float(initial["log_partition"]) == pytest.approx(math.log(256), abs=0.02)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["clipping"] == "zscore λ=0.5" and summary["steps"] == 6
    assert summary["initial_eval_loss"] == float(initial["loss"])
    assert summary["final_eval_loss"] == pytest.approx(float(evals[-1]["loss"]))
    assert summary["best_eval_loss"] == pytest.approx(min(float(e["loss"]) for e in evals[1:]))
    assert summary["log_partition"] == pytest.approx(float(evals[-1]["log_partition"]))
    assert 3.0 < summary["final_eval_loss"] < 6.0  # from ln 256 = 5.55 down
    assert summary["clipped_steps"] == sum(r["clipped"] == "True" for r in rows)
    attention = [float(r["max_attention_logit"]) for r in rows]
    assert summary["max_attention_logit"] == pytest.approx(max(attention)) and min(attention) > 0
    updates = [float(r["update_norm"]) for r in rows]
    assert 0 < updates[0] < updates[-1]  # the warm-up: step k at k/15 of the lr
    assert (folder / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    config = (folder / "config.yaml").read_text()
    assert "name: language_model" in config and "d_model: 16" in config


@pytest.mark.composer
def test_linear_warmup_then_cosine_decay() -> None:
    pytest.importorskip("composer")
    from composer import Callback, State
    from composer.loggers import Logger

    from gradclip_algo.train.run import build_parts, make_trainer
    from gradclip_algo.train.run_config import load_run_config

    class LearningRates(Callback):
        def __init__(self) -> None:
            self.seen: list[float] = []

        def after_train_batch(self, state: State, logger: Logger) -> None:  # the lr this step uses
            self.seen.append(state.optimizers[0].param_groups[0]["lr"])

    schedule = ["max_duration=8ba", "optimizer.warmup_steps=3", "optimizer.lr=0.5"]
    config = load_run_config(CONFIGS / "demo_lm.yaml", [*TINY_LM, *schedule])
    spy = LearningRates()
    make_trainer(config, build_parts(config), [spy], evaluate=False, progress_bar=False).fit()
    warmup = [0.5 * step / 3 for step in (1, 2, 3)]
    cosine = [0.25 * (1 + math.cos(math.pi * (step - 3) / 5)) for step in (4, 5, 6, 7, 8)]
    assert spy.seen == pytest.approx(warmup + cosine, abs=1e-12) and spy.seen[-1] == 0.0
    constant = ["optimizer.schedule=constant", "optimizer.warmup_steps=0"]
    assert build_parts(load_run_config(CONFIGS / "demo_lm.yaml", constant)).scheduler is None


@pytest.mark.composer
def test_the_same_seeds_give_the_same_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("composer")
    from gradclip_algo.train.demo_lm import collect, report, sweep_jobs, train_job
    from gradclip_algo.train.pool import run_all
    from gradclip_algo.train.run_config import load_run_config

    base = load_run_config(CONFIGS / "demo_lm.yaml", [*TINY_LM, "max_duration=4ba", "task.eval_interval=4"])
    settings = {"none": {}, "norm": {"clipping_type": "norm", "clipping_threshold": 0.5}}
    printed = []
    for name in ("first", "second"):
        jobs = sweep_jobs(base, settings, (0.01, 0.3), (0,), 0.3, tmp_path / name)
        report(collect(jobs, run_all(train_job, jobs, 1)), 0.3)
        printed.append(capsys.readouterr().out.split("\n\nfinal eval loss", 1)[1])
    assert printed[0] == printed[1] and "| norm | norm λ=0.5 |" in printed[0]
    for run in ("none-lr0.3-seed0", "norm-lr0.01-seed0"):
        first, second = ((tmp_path / name / run / "metrics.csv").read_bytes() for name in ("first", "second"))
        assert first == second


@pytest.mark.composer
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.name=translation"], "task.name: expected one of"),
        (["model.hidden_size=8"], "model.hidden_size: unknown key; allowed keys in model: d_model"),
        (["model.d_model=31"], "model.d_model: expected a multiple of model.n_heads=2, got 31"),
        (["task.eval_fraction=1.5"], "task.eval_fraction: expected a number in (0, 1), got 1.5"),
        (["task.sequence_length=8"], "task.sequence_length: unknown key"),
        (["optimizer.schedule=linear"], "optimizer.schedule: expected one of"),
        (["optimizer.warmup_steps=-1"], "optimizer.warmup_steps: expected an integer >= 0, got -1"),
    ],
)
def test_bad_lm_configs_exit_2(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], overrides: list[str], message: str
) -> None:
    pytest.importorskip("composer")
    from gradclip_algo.train.cli import main

    runs = tmp_path / "runs"
    assert main([str(CONFIGS / "demo_lm.yaml"), f"run_folder={runs}", *overrides]) == 2
    err = capfd.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not runs.exists()


@pytest.mark.composer
def test_the_demo_sweeps_every_setup_from_a_calibration(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("composer")
    from gradclip_algo.train.demo_lm import SETUPS, main

    settings = [arg for override in TINY_LM for arg in ("--set", override)]
    args = ["--config", str(CONFIGS / "demo_lm.yaml"), "--out", str(tmp_path), "--seeds", "0", "--lrs", "0.3"]
    assert main([*args, "--jobs", "1", "--calibration-steps", "4", *settings]) == 0
    out = capfd.readouterr().out
    folder = tmp_path / "demo_lm"
    calibrated = (folder / "algorithms_norm.yaml").read_text()
    threshold = float(calibrated.split("clipping_threshold:")[1].split()[0])
    run = folder / "norm_calibrated-lr0.3-seed0"
    assert json.loads((run / "summary.json").read_text())["clipping"] == f"norm λ={threshold:g}"
    config = (run / "config.yaml").read_text()
    assert "lr: 0.3\n" in config and f"weight_decay: {0.01 * 0.01 / 0.3}\n" in config  # independent decay
    for name in SETUPS:
        assert f"\n| {name} | " in out
        assert (folder / f"{name}-lr0.3-seed0" / "layer_norms.csv").exists() == (name in ("none", "norm"))
    assert "LR sensitivity lower than none's on its one seed: " in out and "\nnorm at lr 0.3: clipped " in out
    for plot in ("lr_sensitivity", "instability", "loss", "grad_norms", "layer_norms", "calibration"):
        assert (folder / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
