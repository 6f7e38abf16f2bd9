"""From a total norm and a threshold to scaled grads, as torch's ``clip_grads_with_norm_``.

Every norm-based type (``norm``, ``quantile``, ``zscore``, the warm-up of ``adagc``) clips with
:func:`clip_coefficient`; only the threshold differs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo import kernels
from gradclip_algo.norms import group_by_device_and_dtype

NORM_EPS = 1e-6
"""Added to the norm in the coefficient's denominator, as in ``torch.nn.utils.clip_grad_norm_``."""


def clip_coefficient(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """``min(1, τ / (‖G‖ + 1e-6))``: the factor that brings the norm ``‖G‖`` down to the threshold ``τ``.

    A factor of exactly 1 when ``‖G‖ + 1e-6 ≤ τ`` (always for ``τ = inf`` and a finite norm). As torch's,
    a NaN norm gives NaN and an infinite one 0 (NaN for ``τ = inf``).
    """
    return torch.clamp(max_norm / (total_norm + NORM_EPS), max=1.0)


def scale_grads_(grads: list[Tensor], coef: Tensor) -> None:
    """``g ← g · coef`` for every grad, in place; ``coef`` is a 0-d tensor on any device. No host sync."""
    for (device, _), indices in group_by_device_and_dtype(grads).items():
        group = grads if len(indices) == len(grads) else [grads[i] for i in indices]
        kernels.scale_(group, coef.to(device, non_blocking=True))


def clip_grads_with_norm_(grads: list[Tensor], max_norm: float | Tensor, total_norm: Tensor) -> Tensor:
    """Scale ``grads`` in place by :func:`clip_coefficient` of ``total_norm`` (computed by the caller, e.g.
    with :func:`~gradclip_algo.get_total_norm`) and ``max_norm``; returns the coefficient.

    The multiply always runs (a factor of 1 under the threshold), so nothing waits for the device.
    """
    coef = clip_coefficient(total_norm, max_norm)
    scale_grads_(grads, coef)
    return coef
