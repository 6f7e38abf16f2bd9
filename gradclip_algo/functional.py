"""``apply_gradient_clipping``: the one call between ``loss.backward()`` and ``optimizer.step()``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from gradclip_algo.nonfinite import NONFINITE_MODES, NonFiniteGradError, first_nonfinite, zero_nonfinite_
from gradclip_algo.norms import global_norm
from gradclip_algo.parameters import Exclude, Parameters, exclusion_filter, params_with_grads
from gradclip_algo.rules.adaptive import AGC_EPS, adaptive_clip_grad
from gradclip_algo.rules.norm import clip_grad_norm
from gradclip_algo.rules.value import clip_grad_value
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_bool, check_choice, check_known_options, check_positive_number


@dataclass(frozen=True)
class _Rule:
    clip: Callable[..., ClipStats]
    options: Mapping[str, tuple[Any, Callable[[str, Any], Any]]]  # name -> (default, validator)


def _norm_type(field: str, value: Any) -> float:
    return check_positive_number(field, value, allow_inf=True)


RULES: Mapping[str, _Rule] = {
    "norm": _Rule(clip_grad_norm, {"norm_type": (2.0, _norm_type)}),
    "value": _Rule(clip_grad_value, {}),
    "adaptive": _Rule(adaptive_clip_grad, {"eps": (AGC_EPS, check_positive_number)}),
}
CLIPPING_TYPES = tuple(RULES)
COMMON_OPTIONS = ("exclude", "nonfinite", "error_if_nonfinite")


@dataclass(frozen=True)
class ClippingSpec:
    """A validated clipping set-up: build it once with :func:`clipping_spec`, apply it every step."""

    clipping_type: str
    clipping_threshold: float
    rule_options: Mapping[str, Any] = field(default_factory=dict)
    exclude: Exclude = None
    nonfinite: str = "propagate"

    def __call__(self, parameters: Parameters) -> ClipStats:
        """Clip the grads of ``parameters`` in place and return what was done."""
        named = params_with_grads(parameters, self.exclude)
        if not named:
            return ClipStats.empty()
        grads = [param.grad for _, param in named]
        if self.nonfinite == "zero":
            zero_nonfinite_(grads)
        elif self.nonfinite in ("error", "skip"):
            norm = global_norm(grads, 2.0, grads[0].device)
            if not bool(torch.isfinite(norm)):  # the sync these modes ask for
                if self.nonfinite == "error":
                    name = first_nonfinite(named)
                    raise NonFiniteGradError(f"non-finite gradient (inf or NaN) in {name}", name)
                for _, param in named:
                    param.grad = None
                return ClipStats.skipped_step(norm)
        rule = RULES[self.clipping_type]
        return rule.clip([param for _, param in named], self.clipping_threshold, **self.rule_options)


def clipping_spec(clipping_type: str, clipping_threshold: float, **options: Any) -> ClippingSpec:
    """Validate a clipping set-up; every error names the field, the bad value and what is allowed."""
    check_choice("clipping_type", clipping_type, CLIPPING_TYPES)
    threshold = check_positive_number("clipping_threshold", clipping_threshold)
    rule = RULES[clipping_type]
    check_known_options(clipping_type, options, (*rule.options, *COMMON_OPTIONS))
    rule_options = {
        name: validate(name, options.get(name, default)) for name, (default, validate) in rule.options.items()
    }
    nonfinite = check_choice("nonfinite", options.get("nonfinite", "propagate"), NONFINITE_MODES)
    if check_bool("error_if_nonfinite", options.get("error_if_nonfinite", False)):
        if nonfinite not in ("propagate", "error"):
            raise ValueError(
                f"error_if_nonfinite: True contradicts nonfinite={nonfinite!r}; give one of them"
            )
        nonfinite = "error"
    exclude = options.get("exclude")
    exclusion_filter(exclude)  # validates the patterns
    return ClippingSpec(clipping_type, threshold, rule_options, exclude, nonfinite)


def apply_gradient_clipping(
    parameters: Parameters, clipping_type: str, clipping_threshold: float, **options: Any
) -> ClipStats:
    """Clip the gradients of ``parameters`` in place; call between ``loss.backward()`` and ``optimizer.step()``.

    Args:
        parameters: an ``nn.Module``, one tensor, an iterable of tensors, or ``(name, tensor)`` pairs
            such as ``model.named_parameters()``. Grads that are ``None`` are skipped.
        clipping_type: ``'norm'``, ``'value'`` or ``'adaptive'``.
        clipping_threshold: λ > 0: the max norm, the max absolute value, or AGC's clipping factor.
        **options: ``norm_type`` (norm; p > 0 or inf, default 2), ``eps`` (adaptive; weight-norm floor,
            default 1e-3), ``exclude`` (glob patterns on parameter names and/or predicates
            ``(name, param) -> bool``; needs names), ``nonfinite`` (one of ``NONFINITE_MODES``,
            default ``'propagate'``), ``error_if_nonfinite`` (as in torch: same as ``nonfinite='error'``).

    Returns:
        :class:`ClipStats` with 0-d fp32 device tensors. No host sync happens unless ``nonfinite`` is
        ``'error'`` or ``'skip'`` (one sync each call to decide).
    """
    return clipping_spec(clipping_type, clipping_threshold, **options)(parameters)


__all__ = ["CLIPPING_TYPES", "ClippingSpec", "apply_gradient_clipping", "clipping_spec"]
