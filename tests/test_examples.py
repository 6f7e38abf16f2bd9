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
    config = str(EXAMPLES.parent / "configs" / "demo_clipped.yaml")
    result = load("yaml_run.py")["main"]([config, "max_duration=10ba", f"run_folder={tmp_path}"])
    assert result.summary.steps == 10 and result.clipping == "norm λ=1"
    assert (tmp_path / "demo_clipped" / "metrics.csv").exists()
