"""``gradclip-calibrate CONFIG --steps N [key=value ...]``: measure gradient norms, recommend thresholds.

It trains ``N`` steps of a ``gradclip-train`` run config *without* clipping (see
:mod:`gradclip_algo.train.calibration`), prints the statistics and a recommended setting per clipping type
with its reasoning, and writes into a new folder ``<run_folder>/<run_name>-calibration`` (``-2``, ``-3``,
... when it exists), or into ``--out DIR`` (refused if ``DIR`` holds files, unless ``--force``):

- ``algorithms_<type>.yaml``: a ready llm-foundry ``algorithms:`` block per clipping type,
- ``grad_norms.csv``: the per-step measurements,
- ``calibration.png``: the norm trajectory and its histogram with the recommended thresholds.

``--help`` works without Composer; running needs ``pip install "gradclip_algo[composer,yaml]"``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gradclip_algo.train.cli import SHIPPED_HELP, int_at_least, missing_dependency
from gradclip_algo.train.interrupt import Interrupted, report, stop_signals

if TYPE_CHECKING:
    from gradclip_algo.train.calibration import Measurements, Recommendation

PROG = "gradclip-calibrate"
MIN_STEPS = 2  # a standard deviation needs two norms
OUTPUT_FILES = ("grad_norms.csv", "calibration.png")


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog=PROG,
        description="Train N steps of a gradclip-train config without clipping, print gradient-norm "
        "statistics and a recommended threshold for every clipping type, and write ready algorithms "
        "blocks (YAML), the measurements (CSV) and a plot (PNG). A run that diverges (inf/NaN, or a loss "
        "growing by orders of magnitude) recommends nothing and exits with status 1. Ctrl-C or SIGTERM "
        "stops it after the current step: nothing is written, a folder it made is removed, one line says "
        "so, and the exit status is 130 (143 for SIGTERM).",
    )
    parse.add_argument("config", help=SHIPPED_HELP)
    parse.add_argument(
        "--steps",
        type=int_at_least(MIN_STEPS),
        required=True,
        help=f"optimizer steps to measure (>= {MIN_STEPS})",
    )
    parse.add_argument(
        "--out",
        type=Path,
        help="output folder (default: a new <run_folder>/<run_name>-calibration, -2, ... if it exists); "
        "one that holds files is refused unless --force",
    )
    parse.add_argument(
        "--force", action="store_true", help="write into an --out folder that holds files, replacing ours"
    )
    parse.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optimizer.lr=0.1"
    )
    return parse


def _output_folder(out: Path | None, force: bool, run_folder: str, run_name: str) -> tuple[Path, bool]:
    """The folder to write into, made now (before any training), and whether it was made here.

    Raises:
        RunConfigError: ``out`` holds files and ``force`` is off, or the folder cannot be made.
    """
    from gradclip_algo.train.run import create_run_folder
    from gradclip_algo.train.run_config import RunConfigError

    if out is None:
        return create_run_folder(Path(run_folder), f"{run_name}-calibration"), True
    if out.exists() and not out.is_dir():
        raise RunConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise RunConfigError(
            f"--out {out}: the folder holds files; give --force to write into it (replacing "
            f"{', '.join(OUTPUT_FILES)} and algorithms_*.yaml), or another --out"
        )
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunConfigError(f"--out {out}: cannot create the folder: {err.strerror or err}") from err
    return out, created


def main(argv: Sequence[str] | None = None) -> int:
    """Calibrate; a bad config, argument or path exits with status 2 and one line, before any training.

    SIGINT or SIGTERM stops the measurement after its current step: nothing is written, a folder made for
    the files is removed, one line says so, and the exit status is 128 + the signal's number."""
    args = parser().parse_intermixed_args(argv)
    try:  # Composer first (sorted before yaml): the message then names the extra most users lack
        import composer  # noqa: F401

        from gradclip_algo.train.calibration import CalibrationError, measure, recommend
        from gradclip_algo.train.run import build_parts
        from gradclip_algo.train.run_config import RunConfigError, load_run_config
        from gradclip_algo.train.shipped import resolve_config
    except ModuleNotFoundError as err:
        return missing_dependency(PROG, err)
    with stop_signals():
        try:
            config = load_run_config(resolve_config(args.config), args.overrides)
            build_parts(
                replace(config, algorithms={})
            )  # the optimizer's options, checked before a folder exists
            folder, created = _output_folder(args.out, args.force, config.run_folder, config.run_name)
        except RunConfigError as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        if config.algorithms:
            print(f"{PROG}: the config's algorithms block is set aside: calibration measures unclipped steps")
        try:
            measured = measure(config, args.steps)
            recommendations = recommend(measured)
        except (CalibrationError, Interrupted) as err:
            if created:
                folder.rmdir()  # made above and still empty: a diverged or stopped run leaves nothing behind
            if isinstance(err, Interrupted):
                removed = f"; the folder made for its files, {folder}, is removed" if created else ""
                return report(PROG, Interrupted(err.signum, (f"{err}{removed}",)))
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 1
        _report(args, folder, measured, recommendations)
    return 0


def _report(
    args: argparse.Namespace, folder: Path, measured: Measurements, recommendations: list[Recommendation]
) -> None:
    """Print the statistics and recommendations; write the blocks, the measurements and the plot."""
    import yaml  # the optional dependencies, loaded once main has checked them

    from gradclip_algo.train.calibration import Statistics, plot_calibration

    measured.write_csv(folder / "grad_norms.csv")
    print(f"{args.steps} unclipped steps of {args.config}")
    print(f"  global grad L2 norm:  {Statistics.of(measured.grad_norms).describe()}")
    print(f"  largest |g| per step: {Statistics.of(measured.max_abs_grads).describe()}")
    ratio = measured.grad_norms / measured.weight_norms
    print(f"  ||G|| / ||W||:        {Statistics.of(ratio).describe()}")
    print("recommended settings:")
    for recommendation in recommendations:
        path = folder / f"algorithms_{recommendation.clipping_type}.yaml"
        with path.open("w") as file:
            yaml.safe_dump(recommendation.algorithms_block(), file, sort_keys=False)
        print(
            f"  {recommendation.clipping_type:<9} {recommendation.clipping_threshold:<8g} {recommendation.reason}"
        )
        print(f"            -> {path}")
    plot_calibration(measured, recommendations, folder / "calibration.png")
    print(f"plot: {folder / 'calibration.png'}")
    print(
        f"use one: gradclip-train {' '.join([args.config, *args.overrides, recommendations[0].overrides()])}"
    )


if __name__ == "__main__":
    sys.exit(main())
