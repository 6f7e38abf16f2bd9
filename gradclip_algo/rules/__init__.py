"""The clipping rules, one module each, and the registry that maps ``clipping_type`` to a rule.

A rule's ``clip(params, threshold, **options)`` clips the ``.grad`` of each parameter in place and returns
:class:`~gradclip_algo.stats.ClipStats`. A stateful rule also has ``init_state(device, **options)``; its
``clip`` then takes the state dict (tensors, updated in place) as third argument.

What ``clipping_threshold`` (λ) means per type: the max global norm (norm), the max absolute value (value),
AGC's clipping factor (adaptive); for the statistics-driven types it is the absolute global-norm threshold
of their papers, and may be ``inf``: a ceiling on every step that the statistics can only lower
(quantile, zscore; the only limit during zscore's warm-up), or λ_abs of adagc's warm-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from gradclip_algo.rules.adagc import (
    ADAGC_BETA,
    ADAGC_RELATIVE_THRESHOLD,
    ADAGC_WARMUP_STEPS,
    adagc_clip,
    init_adagc_state,
)
from gradclip_algo.rules.adaptive import AGC_EPS, adaptive_clip_grad
from gradclip_algo.rules.norm import clip_grad_norm
from gradclip_algo.rules.quantile import (
    QUANTILE_PERCENTILE,
    QUANTILE_WINDOW,
    init_quantile_state,
    quantile_clip,
)
from gradclip_algo.rules.value import clamp_grads, clip_grad_value
from gradclip_algo.rules.zscore import (
    ZSCORE_ALPHA,
    ZSCORE_THRESHOLD,
    ZSCORE_WARMUP_STEPS,
    init_zscore_state,
    zscore_clip,
)
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_in_interval, check_int, check_positive_number

Validator = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Rule:
    """A clipping rule and its options, each ``name -> (default, validator)``."""

    clip: Callable[..., ClipStats]
    options: Mapping[str, tuple[Any, Validator]] = field(default_factory=dict)
    init_state: Callable[..., dict[str, Any]] | None = None
    threshold_may_be_inf: bool = False
    clip_without_stats: Callable[..., None] | None = None  # for rules whose statistics cost extra passes

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


def _norm_type(field: str, value: Any) -> float:
    return check_positive_number(field, value, allow_inf=True)


def _fraction(field: str, value: Any) -> float:
    return check_in_interval(field, value, 0.0, 1.0)


RULES: Mapping[str, Rule] = {
    "norm": Rule(clip_grad_norm, {"norm_type": (2.0, _norm_type)}),
    "value": Rule(clip_grad_value, clip_without_stats=clamp_grads),
    "adaptive": Rule(adaptive_clip_grad, {"eps": (AGC_EPS, check_positive_number)}),
    "quantile": Rule(
        quantile_clip,
        {
            "percentile": (
                QUANTILE_PERCENTILE,
                partial(check_in_interval, low=0.0, high=100.0, include_high=True),
            ),
            "window": (QUANTILE_WINDOW, partial(check_int, minimum=2)),
        },
        init_quantile_state,
        threshold_may_be_inf=True,
    ),
    "zscore": Rule(
        zscore_clip,
        {
            "alpha": (ZSCORE_ALPHA, _fraction),
            "z_threshold": (ZSCORE_THRESHOLD, check_positive_number),
            "warmup_steps": (ZSCORE_WARMUP_STEPS, partial(check_int, minimum=2)),  # a variance needs 2 norms
        },
        init_zscore_state,
        threshold_may_be_inf=True,
    ),
    "adagc": Rule(
        adagc_clip,
        {
            "relative_threshold": (ADAGC_RELATIVE_THRESHOLD, check_positive_number),
            "beta": (ADAGC_BETA, _fraction),
            "warmup_steps": (
                ADAGC_WARMUP_STEPS,
                partial(check_int, minimum=1),
            ),  # gamma starts from warm-up norms
        },
        init_adagc_state,
        threshold_may_be_inf=True,
    ),
}
CLIPPING_TYPES = tuple(RULES)
