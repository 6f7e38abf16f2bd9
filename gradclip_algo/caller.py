"""Warnings reported at the user's line: the first frame outside this package and torch."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def warn_at_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message)`` attributed to the innermost frame whose file lies outside
    ``gradclip_algo`` and torch (the user's clipping call or ``optimizer.step()``)."""
    level, frame = 1, sys._getframe(0)  # stacklevel 1 is this frame
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
