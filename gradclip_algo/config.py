"""``build_algorithms``: Composer algorithms from llm-foundry's ``algorithms:`` YAML block.

The block is read as llm-foundry reads it, with this package's registry name as the key::

    algorithms:
      gradclip_algo:
        clipping_type: norm
        clipping_threshold: 1.0

In llm-foundry the key ``gradient_clipping`` builds Composer's own ``GradientClipping``, so it is refused
here, with a message that names the key to write instead. The presets shipped in
``configs/presets/`` are such blocks; ``build_algorithms("ctrl_norm_0.25")`` takes one by name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from gradclip_algo.algorithm import GradClipAlgo
from gradclip_algo.extras import missing_extra
from gradclip_algo.keys import NAME

if TYPE_CHECKING:
    from composer.core import Algorithm
    from omegaconf import DictConfig

REGISTRY_NAME = "gradclip_algo"
"""The name this package registers in llm-foundry's ``llmfoundry_algorithms`` entry-point group."""

ALGORITHM_NAMES = (REGISTRY_NAME,)
"""Keys of the ``algorithms:`` block that build :class:`GradClipAlgo`."""

COMPOSER_NAME = "gradient_clipping"
"""llm-foundry's name of Composer's own ``GradientClipping``: refused, with a hint."""

Config: TypeAlias = "Mapping[str, Any] | DictConfig | str | os.PathLike[str] | None"


def presets() -> tuple[str, ...]:
    """The names of the presets shipped in ``configs/presets/`` (file names without ``.yaml``)."""
    folder = resources.files("gradclip_algo.configs") / "presets"
    return tuple(
        sorted(item.name[: -len(".yaml")] for item in folder.iterdir() if item.name.endswith(".yaml"))
    )


def preset_path(name: str) -> Path:
    """The file of the preset ``name`` (with or without ``.yaml``).

    Raises:
        ValueError: no such preset; the message lists them.
    """
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in presets():
        raise ValueError(f"{name}: no such file or preset; presets: {', '.join(presets())}")
    with resources.as_file(resources.files("gradclip_algo.configs") / "presets" / f"{stem}.yaml") as path:
        return Path(path)


def _omegaconf() -> Any:
    try:
        import omegaconf
    except ModuleNotFoundError as err:
        raise missing_extra(err, "build_algorithms on a YAML file") from None
    return omegaconf


def _load(cfg: Config) -> Any:
    """``cfg`` as plain Python containers; a path or a preset name is read with omegaconf."""
    if isinstance(cfg, (str, os.PathLike)):
        path = Path(cfg)
        if not path.is_file():
            path = preset_path(str(cfg))
        omegaconf = _omegaconf()
        try:
            cfg = omegaconf.OmegaConf.load(path)
        except Exception as err:  # yaml and omegaconf errors: one line that names the file
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: cannot read it as YAML: {first_line}") from err
    if "omegaconf" in sys.modules:
        from omegaconf import DictConfig, ListConfig, OmegaConf

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


def _build(path: str, settings: Any) -> GradClipAlgo:
    if not isinstance(settings, Mapping):
        raise ValueError(f"{path}: expected a mapping of settings, got {settings!r}")
    try:
        return GradClipAlgo(**{str(key): value for key, value in settings.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err


def build_algorithms(cfg: Config) -> list[Algorithm]:
    """Composer algorithms from an llm-foundry ``algorithms:`` block.

    Args:
        cfg: a dict or ``DictConfig``, the path of a YAML file, or the name of a shipped preset
            (``"agc_0.01_large_batch"``, see :func:`presets`); either the block itself or a mapping with a
            top-level ``algorithms:`` key (e.g. a whole training config; its other keys are ignored).

    Returns:
        One :class:`GradClipAlgo` per entry (an empty list for an empty or null block).

    Raises:
        ValueError: naming the offending key and what is allowed, for an unknown algorithm name, an unknown
            or missing key, or a bad value (checked by ``GradClipAlgo`` itself), before any training.
    """
    block = algorithms_block(cfg)
    if COMPOSER_NAME in block:
        raise ValueError(
            f"algorithms.{COMPOSER_NAME}: in llm-foundry this name builds Composer's own GradientClipping, "
            f"not {NAME}; name the entry {REGISTRY_NAME} (the same settings)"
        )
    unknown = sorted(str(name) for name in block if name not in ALGORITHM_NAMES)
    if unknown:
        raise ValueError(
            f"algorithms: unknown algorithm(s) {', '.join(unknown)}; allowed: {', '.join(ALGORITHM_NAMES)}"
        )
    return [_build(f"algorithms.{name}", settings) for name, settings in block.items()]
