"""``gradclip-train CONFIG.yaml [key=value ...]``: one training run from a YAML config."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gradclip_algo.train.run import train
from gradclip_algo.train.run_config import RunConfigError, load_run_config

PROG = "gradclip-train"


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(
        prog=PROG,
        description="Train a vanilla tanh RNN on the adding problem with Composer, as a YAML config says, "
        "and write a run folder: config.yaml, metrics.csv, summary.json, metrics.png.",
    )
    parse.add_argument("config", help="run config YAML, e.g. configs/demo_clipped.yaml")
    parse.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="override a config value (omegaconf dot-list), e.g. optimizer.lr=0.1 max_duration=500ba",
    )
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Run the config; a bad config exits with status 2 and one line on stderr, before any training."""
    args = parser().parse_args(argv)
    try:
        config = load_run_config(args.config, args.overrides)
        result = train(config)
    except RunConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"{result.folder}: {result.summary.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
