"""Optional dependencies: a missing one is named with the extra that installs it, in one line."""

from __future__ import annotations

EXTRAS = {
    "composer": "composer",
    "torchvision": "composer",
    "matplotlib": "composer",
    "omegaconf": "yaml",
    "yaml": "yaml",  # PyYAML, which omegaconf brings
}
"""Top-level module -> the extra of ``gradclip_algo`` that installs it."""


def install_hint(module: str | None) -> str:
    """``pip install "gradclip_algo[<extra>]"`` for a missing optional module (Composer's extra by default)."""
    top = (module or "").split(".")[0]
    return f'pip install "gradclip_algo[{EXTRAS.get(top, "composer")}]"'


def missing_extra(err: ModuleNotFoundError, what: str) -> ModuleNotFoundError:
    """A one-line ``ModuleNotFoundError`` for ``what`` (e.g. ``gradclip_algo.GradClipAlgo``): the module that
    is missing and the extra that installs it."""
    return ModuleNotFoundError(
        f"{what} needs {err.name or 'a module'}, which is not installed: {install_hint(err.name)}",
        name=err.name,
    )
