"""Gradient clipping for PyTorch and MosaicML Composer.

The functional core (this namespace) needs only torch. ``GradClipAlgo`` (a Composer ``Algorithm``)
and ``build_algorithms`` import Composer when first accessed (``pip install "gradclip_algo[composer]"``);
``build_algorithms`` on a YAML file or preset name also needs omegaconf (``gradclip_algo[yaml]``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from gradclip_algo.clipper import GradientClipper
from gradclip_algo.compiled import set_compiled_kernels
from gradclip_algo.folding import FoldError
from gradclip_algo.functional import apply_gradient_clipping
from gradclip_algo.kernels import unit_norms
from gradclip_algo.nonfinite import NONFINITE_MODES, NonFiniteGradError
from gradclip_algo.norms import clip_coefficient, clip_grads_with_norm_, get_total_norm
from gradclip_algo.rules import CLIPPING_TYPES
from gradclip_algo.stats import ClipStats

_LAZY = {"GradClipAlgo": "gradclip_algo.algorithm", "build_algorithms": "gradclip_algo.config"}

__version__ = "0.1.0"
__all__ = [
    "CLIPPING_TYPES",
    "NONFINITE_MODES",
    "ClipStats",
    "FoldError",
    "GradClipAlgo",
    "GradientClipper",
    "NonFiniteGradError",
    "apply_gradient_clipping",
    "build_algorithms",
    "clip_coefficient",
    "clip_grads_with_norm_",
    "get_total_norm",
    "set_compiled_kernels",
    "unit_norms",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = import_module(_LAZY[name])
        except ModuleNotFoundError as err:
            from gradclip_algo.extras import missing_extra

            raise missing_extra(err, f"gradclip_algo.{name}") from None
        return getattr(module, name)
    raise AttributeError(f"module 'gradclip_algo' has no attribute {name!r}")
