"""A YAML-driven run: the ``algorithms:`` block of a config file, built into Composer algorithms.

    python examples/yaml_run.py [CONFIG] [key=value ...]

With no arguments it trains the shipped config ``demo_clipped`` (``configs/demo_clipped.yaml``)
for 300 steps (the same thing as ``gradclip-train demo_clipped max_duration=300ba``), printing the block it
built and the run's summary. Overrides use omegaconf's dot-list syntax, e.g.
``algorithms.gradclip_algo.clipping_threshold=1.0``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gradclip_algo import build_algorithms
from gradclip_algo.train.run import RunResult
from gradclip_algo.train.run_config import load_run_config
from gradclip_algo.train.shipped import resolve_config
from gradclip_algo.train.training import train

DEFAULT = ("demo_clipped", "max_duration=300ba")


def main(argv: Sequence[str] = DEFAULT) -> RunResult:
    config = load_run_config(resolve_config(argv[0]), argv[1:])
    print("algorithms:", build_algorithms(config.algorithms))
    result = train(config, progress_bar=False)
    print(f"{result.folder}: {result.summary.describe()}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
