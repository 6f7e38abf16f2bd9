"""Gradient clipping for PyTorch and MosaicML Composer.

The functional core (this namespace) needs only torch. ``GradientClipping`` (a Composer ``Algorithm``)
and ``build_algorithms`` import Composer and omegaconf when first accessed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from gradclip_algo.clipper import GradientClipper
from gradclip_algo.functional import apply_gradient_clipping
from gradclip_algo.kernels import unit_norms
from gradclip_algo.nonfinite import NONFINITE_MODES, NonFiniteGradError
from gradclip_algo.norms import clip_coefficient, clip_grads_with_norm_, get_total_norm
from gradclip_algo.rules import CLIPPING_TYPES
from gradclip_algo.stats import ClipStats

_LAZY = {"GradientClipping": "gradclip_algo.algorithm", "build_algorithms": "gradclip_algo.config"}

__version__ = "0.1.0"
__all__ = [
    "CLIPPING_TYPES",
    "NONFINITE_MODES",
    "ClipStats",
    "GradientClipper",
    "GradientClipping",
    "NonFiniteGradError",
    "apply_gradient_clipping",
    "build_algorithms",
    "clip_coefficient",
    "clip_grads_with_norm_",
    "get_total_norm",
    "unit_norms",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gradclip_algo' has no attribute {name!r}")
