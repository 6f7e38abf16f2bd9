"""The language-model task: its text and split, the transformer, loss spikes, and short runs of
``gradclip-train`` and of the ``demo-lm`` comparison."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from gradclip_algo.train.language_model import ByteTransformer
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
    assert [int(e["step"]) for e in evals] == [3, 6]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["clipping"] == "zscore λ=0.5" and summary["steps"] == 6
    assert summary["final_eval_loss"] == pytest.approx(float(evals[-1]["eval_loss"]))
    assert summary["best_eval_loss"] == pytest.approx(min(float(e["eval_loss"]) for e in evals))
    assert 3.0 < summary["final_eval_loss"] < 6.0  # from ln 256 = 5.55 down
    assert summary["clipped_steps"] == sum(r["clipped"] == "True" for r in rows)
    assert (folder / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    config = (folder / "config.yaml").read_text()
    assert "name: language_model" in config and "d_model: 16" in config


@pytest.mark.composer
def test_the_same_seed_gives_the_same_lm_run(tmp_path: Path) -> None:
    pytest.importorskip("composer")
    from gradclip_algo.train.cli import main

    for _ in range(2):
        assert main([str(CONFIGS / "demo_lm.yaml"), f"run_folder={tmp_path}", *TINY_LM]) == 0
    first, second = ((tmp_path / name / "metrics.csv").read_text() for name in ("demo_lm", "demo_lm-2"))
    assert first == second


@pytest.mark.composer
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task.name=translation"], "task.name: expected one of"),
        (["model.hidden_size=8"], "model.hidden_size: unknown key; allowed keys in model: d_model"),
        (["model.d_model=30"], "model.d_model: expected a multiple of model.n_heads=4, got 30"),
        (["task.eval_fraction=1.5"], "task.eval_fraction: expected a number in (0, 1), got 1.5"),
        (["task.sequence_length=8"], "task.sequence_length: unknown key"),
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
def test_the_demo_compares_every_setup_from_a_calibration(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("composer")
    from gradclip_algo.train.demo_lm import main

    settings = [arg for override in TINY_LM for arg in ("--set", override)]
    assert (
        main(["--out", str(tmp_path), "--seeds", "0", "--jobs", "1", "--calibration-steps", "4", *settings])
        == 0
    )
    out = capfd.readouterr().out
    folder = tmp_path / "demo_lm"
    calibrated = (folder / "algorithms_norm.yaml").read_text()
    threshold = float(calibrated.split("clipping_threshold:")[1].split()[0])
    summary = json.loads((folder / "norm_calibrated-seed0" / "summary.json").read_text())
    assert summary["clipping"] == f"norm λ={threshold:g}"
    for name in ("none", "norm", "quantile", "zscore", "adagc", "norm_skip_spikes"):
        assert f"| {name}-seed0 |" in out
    assert "| none-seed0 | none | " in out and "on every seed:" in out
    for plot in ("loss.png", "grad_norms.png", "layer_norms.png", "calibration.png"):
        assert (folder / plot).read_bytes()[:4] == b"\x89PNG"
