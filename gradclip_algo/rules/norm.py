"""Clipping by global norm (Pascanu, Mikolov and Bengio 2013, "On the difficulty of training RNNs")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.norms import clip_coefficient
from gradclip_algo.options import RuleOptions, option
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_positive_number


def _norm_type(field: str, value: object) -> float:
    return check_positive_number(field, value, allow_inf=True)


@dataclass(frozen=True)
class NormOptions(RuleOptions):
    """``norm_type``: the p of the norm, any p > 0 or ``inf`` (default 2)."""

    norm_type: float = option(2.0, _norm_type)

    @property
    def stats_norm_type(self) -> float:
        return self.norm_type


def clip_by_norm(shards: Shards, max_norm: float, options: NormOptions) -> ClipStats:
    """``g ← g · min(1, λ / (‖G‖_p + 1e-6))`` for every grad, ``‖G‖_p`` the p-norm of all grads together.

    The same as ``torch.nn.utils.clip_grad_norm_``. The factor is returned, not applied (see
    :func:`to_norm`); it is 1 under the threshold, so nothing waits for the device.
    """
    return to_norm(shards.global_norm(options.norm_type), max_norm)


def to_norm(norm: Tensor, threshold: float | Tensor, boundary: Tensor | None = None) -> ClipStats:
    """The stats of clipping grads of total ``norm`` to ``threshold`` (a number, or a 0-d tensor that a
    statistics-driven rule computed on the device), with the factor
    :func:`~gradclip_algo.clip_coefficient` as ``coefficient`` for the caller to apply or fold, and
    ``boundary`` (default: ``threshold``), the norm above which the rule clips, as ``threshold``.

    The step counts as clipped where ``norm > threshold``, compared in the threshold's precision: a
    statistics-driven threshold may be this very norm as its statistics hold it.
    """
    coef = clip_coefficient(norm, threshold)
    if isinstance(threshold, Tensor):
        compared = norm.to(threshold.dtype)
    else:
        compared, threshold = norm, torch.full((), threshold, dtype=norm.dtype, device=norm.device)
    return ClipStats(
        norm,
        (norm * coef).to(norm.dtype),
        (compared > threshold).to(torch.float32),
        coefficient=coef,
        threshold=threshold if boundary is None else boundary,
    )
