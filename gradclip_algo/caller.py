"""Warnings reported at the user's line: the first frame outside this package, torch and Composer."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def _internal() -> tuple[str, ...]:
    """The folders whose frames are not the user's: this package, torch, and Composer where it is loaded
    (``GradClipAlgo`` runs inside Composer's ``Trainer``, so its user's line is the ``fit()`` call)."""
    composer = sys.modules.get("composer")
    path = getattr(composer, "__file__", None)
    return _INTERNAL if path is None else (*_INTERNAL, os.path.dirname(path))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the innermost frame whose file lies outside
    ``gradclip_algo``, torch and Composer (the user's clipping call, ``optimizer.step()`` or
    ``Trainer.fit()``), however many frames of those, decorators such as ``torch.no_grad()`` included,
    lie in between."""
    internal = _internal()
    level, frame = 1, sys._getframe(0)  # stacklevel 1 is this frame
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
