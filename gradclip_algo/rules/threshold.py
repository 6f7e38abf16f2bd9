"""Clipping all grads to a global-norm threshold that is itself a device tensor (statistics-driven rules)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.rules.norm import NORM_EPS
from gradclip_algo.rules.scaling import scale_
from gradclip_algo.stats import ClipStats


def clip_to_threshold_(shards: Shards, norm: Tensor, threshold: Tensor) -> ClipStats:
    """Where ``‖G‖ > τ``, scale every grad by ``τ / (‖G‖ + 1e-6)``; else leave the grads as they are.

    ``norm`` is the global L2 norm ``‖G‖`` and ``threshold`` the 0-d device tensor ``τ`` (``inf``: no cap).
    The comparison is strict: a threshold taken from past norms may equal the current norm exactly, and
    such a norm is not clipped. The multiply always runs, so no host sync is needed.
    """
    clipped = norm > threshold
    coef = torch.where(clipped, threshold / (norm + NORM_EPS), 1.0)
    scale_(shards.grads, coef)
    return ClipStats(
        grad_norm=norm, clipped_grad_norm=norm * coef, clipped_fraction=clipped.to(torch.float32)
    )
