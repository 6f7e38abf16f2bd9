"""``build_algorithms``: Composer algorithms from llm-foundry's ``algorithms:`` YAML block.

The block is read as llm-foundry writes it::

    algorithms:
      gradient_clipping:
        clipping_type: norm
        clipping_threshold: 1.0

``gradclip_algo`` (this package's llm-foundry entry-point name) is accepted as the key too.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

from composer.core import Algorithm
from omegaconf import DictConfig, ListConfig, OmegaConf

from gradclip_algo.algorithm import GradientClipping
from gradclip_algo.clipper import COMMON_OPTIONS
from gradclip_algo.rules import option_names

ALGORITHM_NAMES = ("gradient_clipping", "gradclip_algo")
"""Keys of the ``algorithms:`` block that build :class:`GradientClipping` (both mean the same)."""

Config = Mapping[str, Any] | DictConfig | str | os.PathLike[str] | None


def _parameters() -> list[inspect.Parameter]:
    """``GradientClipping``'s named parameters (not ``**options``)."""
    return [
        param
        for param in inspect.signature(GradientClipping).parameters.values()
        if param.kind is not inspect.Parameter.VAR_KEYWORD
    ]


def allowed_fields() -> tuple[str, ...]:
    """Every key a ``gradient_clipping`` entry may hold: the algorithm's own arguments, every rule's
    options (clipping types added to ``RULES`` are covered) and the options common to all rules."""
    return (*(param.name for param in _parameters()), *sorted({*option_names(), *COMMON_OPTIONS}))


def required_fields() -> tuple[str, ...]:
    """The keys without a default: ``clipping_type`` and ``clipping_threshold``."""
    return tuple(param.name for param in _parameters() if param.default is inspect.Parameter.empty)


def _load(cfg: Config) -> Any:
    """``cfg`` as plain Python containers; a path is read with omegaconf."""
    if isinstance(cfg, (str, os.PathLike)):
        cfg = OmegaConf.load(cfg)
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def algorithms_block(cfg: Config) -> Mapping[str, Any]:
    """The ``algorithms:`` block of ``cfg``: its ``algorithms`` key if it has one, else ``cfg`` itself."""
    cfg = _load(cfg)
    if isinstance(cfg, Mapping) and "algorithms" in cfg:
        cfg = cfg["algorithms"]
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"algorithms: expected a mapping of algorithm name -> settings, got {cfg!r}")
    return cfg


def _build_gradient_clipping(path: str, settings: Any) -> GradientClipping:
    if not isinstance(settings, Mapping):
        raise ValueError(f"{path}: expected a mapping of settings, got {settings!r}")
    allowed = allowed_fields()
    unknown = sorted(str(key) for key in settings if key not in allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    missing = [name for name in required_fields() if name not in settings]
    if missing:
        raise ValueError(f"{path}: missing required key(s) {', '.join(missing)}")
    try:
        return GradientClipping(**settings)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def build_algorithms(cfg: Config) -> list[Algorithm]:
    """Composer algorithms from an llm-foundry ``algorithms:`` block.

    Args:
        cfg: a dict or ``DictConfig``, or the path of a YAML file; either the block itself or a mapping
            with a top-level ``algorithms:`` key (e.g. a whole training config; its other keys are ignored).

    Returns:
        One :class:`GradientClipping` per entry (an empty list for an empty block).

    Raises:
        ValueError: naming the offending key and what is allowed, for an unknown algorithm name, an unknown
            or missing key, or a bad value (checked by ``GradientClipping`` itself), before any training.
    """
    block = algorithms_block(cfg)
    unknown = sorted(str(name) for name in block if name not in ALGORITHM_NAMES)
    if unknown:
        raise ValueError(
            f"algorithms: unknown algorithm(s) {', '.join(unknown)}; allowed: {', '.join(ALGORITHM_NAMES)}"
        )
    if len(block) > 1:
        raise ValueError(
            f"algorithms: {' and '.join(block)} name the same algorithm and would clip twice; give one"
        )
    return [_build_gradient_clipping(f"algorithms.{name}", settings) for name, settings in block.items()]
