"""The run configs shipped with the package (the repository's ``configs/``, installed as ``gradclip_algo.configs``), usable from any directory.

A command's ``CONFIG`` argument is a path, or the name of a shipped config: ``demo_clipped`` (or
``demo_clipped.yaml``) when no such file exists where the command runs.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gradclip_algo.train.run_config import RunConfigError


def shipped_configs() -> tuple[str, ...]:
    """The names of the shipped run configs (file names without ``.yaml``)."""
    folder = resources.files("gradclip_algo.configs")
    return tuple(
        sorted(item.name[: -len(".yaml")] for item in folder.iterdir() if item.name.endswith(".yaml"))
    )


def shipped_config(name: str) -> Path:
    """The file of the shipped config ``name`` (with or without ``.yaml``)."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in shipped_configs():
        raise RunConfigError(
            f"{name}: no shipped config of that name; shipped: {', '.join(shipped_configs())}"
        )
    with resources.as_file(resources.files("gradclip_algo.configs") / f"{stem}.yaml") as path:
        return Path(path)


def resolve_config(arg: str | Path) -> Path:
    """``arg`` if it is a file, else the shipped config of that name.

    Raises:
        RunConfigError: neither a file nor a shipped config (one line, listing the shipped ones).
    """
    path = Path(arg)
    if path.is_file():
        return path
    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if path.parent == Path(".") and stem in shipped_configs():
        return shipped_config(stem)
    raise RunConfigError(
        f"{arg}: no such config file (shipped configs, by name: {', '.join(shipped_configs())})"
    )
