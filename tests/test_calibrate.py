"""``gradclip-calibrate``: measurements of an unclipped run, recommendations, ready YAML blocks, bad input."""

from __future__ import annotations

import csv
import math
import re
import statistics
from pathlib import Path

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

import torch  # noqa: E402
import yaml  # noqa: E402

from gradclip_algo import GradientClipping, build_algorithms  # noqa: E402
from gradclip_algo.calibrate import CalibrationError, Measurements, main, recommend  # noqa: E402
from gradclip_algo.clipper import GradientClipper  # noqa: E402

TYPES = ("norm", "value", "adaptive", "quantile", "zscore", "adagc")
STEPS = 12


def tiny_config(folder: Path, lr: float = 0.05) -> Path:
    config = {
        "run_name": "tiny",
        "run_folder": str(folder / "runs"),
        "max_duration": "1000ba",
        "task": {"sequence_length": 4, "train_samples": 256, "eval_samples": 16, "batch_size": 16},
        "model": {"hidden_size": 4},
        "optimizer": {"name": "sgd", "lr": lr},
        "algorithms": {"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(path: Path) -> dict[str, list[float]]:
    with path.open() as file:
        rows = list(csv.DictReader(file))
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def rounded(value: float) -> float:
    return float(f"{value:.3g}")


def test_tiny_run_writes_blocks_that_build_and_match_the_recorded_norms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration"
    assert main([str(tiny_config(tmp_path)), "--steps", str(STEPS), "--out", str(out), "seed=3"]) == 0
    printed = capsys.readouterr().out
    assert "algorithms block is set aside" in printed
    recorded = read_csv(out / "grad_norms.csv")
    assert recorded["step"] == list(range(1, STEPS + 1))
    norms = recorded["grad_norm"]
    assert all(0 < m <= n for m, n in zip(recorded["max_abs_grad"], norms, strict=True))
    built = {}
    for clipping_type in TYPES:
        path = out / f"algorithms_{clipping_type}.yaml"
        (algorithm,) = build_algorithms(path)
        assert isinstance(algorithm, GradientClipping) and algorithm.clipper.clipping_type == clipping_type
        built[clipping_type] = algorithm.clipper
        assert f"-> {path}" in printed
    assert built["norm"].clipping_threshold == rounded(statistics.mean(norms))
    assert f"mean {statistics.mean(norms):.4g}, std {statistics.stdev(norms):.4g}" in printed
    assert built["value"].clipping_threshold == rounded(statistics.median(recorded["max_abs_grad"]))
    for clipping_type in ("quantile", "zscore", "adagc"):
        assert built[clipping_type].clipping_threshold == rounded(max(norms))
    assert built["quantile"].options.as_dict() == {"percentile": 10.0, "window": 1000}
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_config_and_seed_measure_the_same_norms(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    for name in ("first", "second"):
        assert main([str(config), "--steps", "3", "--out", str(tmp_path / name)]) == 0
    assert read_csv(tmp_path / "first" / "grad_norms.csv") == read_csv(tmp_path / "second" / "grad_norms.csv")


def measurements(norms: list[float]) -> Measurements:
    grad_norms = torch.tensor(norms, dtype=torch.float64)
    return Measurements(
        grad_norms=grad_norms,
        max_abs_grads=grad_norms / 4,
        weight_norms=torch.full_like(grad_norms, 2.0),
        unit_ratio_quantiles=torch.linspace(0, 1, 101, dtype=torch.float64).repeat(len(norms), 1),
    )


def test_recommendations_follow_their_stated_rules() -> None:
    norms = [1.0, 2.0, 3.0, 4.0, 10.0]
    by_type = {r.clipping_type: r for r in recommend(measurements(norms))}
    assert list(by_type) == list(TYPES)
    assert by_type["norm"].clipping_threshold == 4.0  # the mean
    assert by_type["value"].clipping_threshold == 0.75  # median of the largest |g|: 3 / 4
    assert by_type["adaptive"].clipping_threshold == 0.99  # p99 of ratios spread evenly over [0, 1]
    assert by_type["zscore"].clipping_threshold == 10.0  # the max, as a ceiling
    for recommendation in by_type.values():
        GradientClipper(
            recommendation.clipping_type, recommendation.clipping_threshold, **recommendation.options
        )
    assert by_type["norm"].overrides() == (
        "algorithms.gradient_clipping.clipping_type=norm algorithms.gradient_clipping.clipping_threshold=4.0"
    )


def test_a_diverged_run_recommends_nothing() -> None:
    with pytest.raises(CalibrationError, match=r"diverged: its gradient norm was inf or NaN from step 3 on"):
        recommend(measurements([1.0, 50.0, math.inf, math.nan]))


def test_a_diverging_config_exits_1_with_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibration"
    assert main([str(tiny_config(tmp_path, lr=1e30)), "--steps", "4", "--out", str(out)]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "diverged" in errors[0] and "lower optimizer.lr" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "1"], r"argument --steps: expected an integer >= 2, got '1'"),
        (["--steps", "ten"], r"argument --steps: expected an integer >= 2, got 'ten'"),
        ([], r"the following arguments are required: --steps"),
        (["--steps", "5", "optimizer.lr=-1"], r"optimizer.lr: expected a number > 0 and finite, got -1"),
        (["--steps", "5", "model.depth=2"], r"model.depth: unknown key; allowed keys in model: hidden_size"),
        (["--steps", "5", "lr"], r"override 'lr': expected key=value"),
    ],
)
def test_bad_arguments_exit_2_with_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:  # argparse's own errors exit; the config's return 2
        raise SystemExit(main([str(tiny_config(tmp_path)), *args]))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert errors[0].startswith("gradclip-calibrate: error: ")
    assert re.search(message, errors[0])
    assert not (tmp_path / "runs").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "absent.yaml"), "--steps", "5"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"gradclip-calibrate: error: {tmp_path / 'absent.yaml'}: no such config file"
    )
