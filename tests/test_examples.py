"""Every example runs end to end on tiny sizes."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name))


def test_plain_pytorch_loop_keeps_the_norm_at_the_threshold(capsys: pytest.CaptureFixture[str]) -> None:
    largest = load("plain_pytorch.py")["main"](steps=40)
    assert 0 < largest <= 2.0 * (1 + 1e-5)
    assert "largest grad norm given to the optimizer" in capsys.readouterr().out


@pytest.mark.composer
def test_composer_trainer_logs_the_agc_units_clipped() -> None:
    pytest.importorskip("composer")
    metrics = load("composer_trainer.py")["main"](steps=20)
    fractions = [value for _, value in metrics.data["gradient_clipping/clipped_fraction"]]
    assert len(fractions) == 5 and all(0.0 <= f <= 1.0 for f in fractions)


@pytest.mark.composer
def test_yaml_run_builds_the_block_and_writes_a_run_folder(tmp_path: Path) -> None:
    pytest.importorskip("composer")
    config = "demo_clipped"  # the shipped config, by name
    result = load("yaml_run.py")["main"]([config, "max_duration=10ba", f"run_folder={tmp_path}"])
    assert result.summary.steps == 10 and result.clipping == "norm λ=1"
    assert (tmp_path / "demo_clipped" / "metrics.csv").exists()


@pytest.mark.composer
def test_spike_comparison_survives_the_bad_batch_only_when_clipped(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("composer")
    config = "demo_unclipped"
    out = tmp_path / "spikes.png"
    load("spike_comparison.py")["main"](
        [
            "--config",
            config,
            "--spike-step",
            "40",
            "--factor",
            "1e4",
            "--calibration-steps",
            "20",
            "--out",
            str(out),
            "max_duration=60ba",
            "task.train_samples=4000",
            "task.eval_samples=100",
        ]
    )
    table = capfd.readouterr().out
    rows = {
        line.split("  ")[0]: line
        for line in table.splitlines()
        if line.startswith(("none", "norm", "zscore"))
    }
    recovered = {name: line[len(name) :].split()[3] for name, line in rows.items()}  # steps to pre-spike loss
    assert recovered["none"] == "never"  # the bad batch ends the unclipped run
    norm_rows = [name for name in recovered if name.startswith("norm")]
    assert norm_rows and all(recovered[name] != "never" for name in norm_rows)
    assert out.read_bytes()[:4] == b"\x89PNG"
