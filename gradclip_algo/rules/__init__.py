"""The clipping rules, one module each, and the registry that maps ``clipping_type`` to a rule.

A rule's ``clip(params, threshold, **options)`` clips the ``.grad`` of each parameter in place and returns
:class:`~gradclip_algo.stats.ClipStats`. A stateful rule also has ``init_state(device, **options)``; its
``clip`` then takes the state dict (tensors, updated in place) as third argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradclip_algo.rules.adaptive import AGC_EPS, adaptive_clip_grad
from gradclip_algo.rules.norm import clip_grad_norm
from gradclip_algo.rules.value import clip_grad_value
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_positive_number

Validator = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Rule:
    """A clipping rule and its options, each ``name -> (default, validator)``."""

    clip: Callable[..., ClipStats]
    options: Mapping[str, tuple[Any, Validator]] = field(default_factory=dict)
    init_state: Callable[..., dict[str, Any]] | None = None

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


def _norm_type(field: str, value: Any) -> float:
    return check_positive_number(field, value, allow_inf=True)


RULES: Mapping[str, Rule] = {
    "norm": Rule(clip_grad_norm, {"norm_type": (2.0, _norm_type)}),
    "value": Rule(clip_grad_value),
    "adaptive": Rule(adaptive_clip_grad, {"eps": (AGC_EPS, check_positive_number)}),
}
CLIPPING_TYPES = tuple(RULES)
