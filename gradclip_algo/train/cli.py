"""``gradclip-train CONFIG [key=value ...]``: one training run from a YAML config.

``--help`` works without Composer; running needs ``pip install "gradclip_algo[composer,yaml]"``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from gradclip_algo.extras import install_hint
from gradclip_algo.train.interrupt import Interrupted, report

PROG = "gradclip-train"
PROGRESS_EVERY = 100


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum``, else a one-line error naming the value."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return number

    return parse


SHIPPED_HELP = (
    "run config YAML, or the name of a shipped one: demo_clipped, demo_unclipped (the adding problem, a "
    "tanh RNN, with and without clipping), demo_lm (a byte-level transformer language model)"
)
STOPPING_HELP = (
    "Ctrl-C or SIGTERM stops a run after its current step: its files are written, summary.json is "
    'marked "interrupted": true, one line names the folder and the last step, and the exit status is '
    "130 (143 for SIGTERM)."
)


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog=PROG,
        description="Train one run with Composer as a YAML config says: the adding problem with a tanh RNN "
        "(task.name: adding_problem) or next-byte prediction with a small transformer (task.name: "
        "language_model). It writes a run folder: config.yaml, metrics.csv, summary.json, metrics.png "
        "(and, for the language model, layer_norms.csv and eval.csv). An existing run folder is never "
        "overwritten: the run goes to <run_name>-2, -3, ... A run stops after the first step whose loss is "
        f"inf or NaN unless stop_on_nonfinite_loss=false. {STOPPING_HELP}",
    )
    parse.add_argument("config", help=SHIPPED_HELP)
    parse.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a config value (omegaconf dot-list), e.g. optimizer.lr=0.1 max_duration=500ba; "
        "algorithms=ctrl_norm_0.25 (a preset's name) or algorithms=FILE.yaml sets the clipping block; "
        "algorithms={} or algorithms=null turns clipping off",
    )
    parse.add_argument(
        "--progress-every",
        type=int_at_least(1),
        default=PROGRESS_EVERY,
        metavar="N",
        help="when stderr is not a terminal: one progress line every N steps instead of Composer's "
        f"progress bar (default {PROGRESS_EVERY})",
    )
    return parse


def missing_dependency(prog: str, err: ModuleNotFoundError) -> int:
    """One line naming the module and the extra that installs it; exit status 1."""
    print(f"{prog}: error: {err.name} is not installed: {install_hint(err.name)}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the config; a bad config or path exits with status 2 and one line on stderr."""
    args = parser().parse_intermixed_args(argv)
    try:
        import composer  # noqa: F401 (checked first: with no extra installed, the line names composer's)

        from gradclip_algo.train.run_config import RunConfigError, load_run_config
        from gradclip_algo.train.shipped import resolve_config
        from gradclip_algo.train.training import train
    except ModuleNotFoundError as err:
        return missing_dependency(PROG, err)
    try:
        config = load_run_config(resolve_config(args.config), args.overrides)
        result = train(config, progress_every=args.progress_every)
    except RunConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        return report(PROG, stop)
    print(f"{result.folder}: {result.summary.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
