"""Clipping by global norm (Pascanu, Mikolov and Bengio 2013, "On the difficulty of training RNNs")."""

from __future__ import annotations

import torch

from gradclip_algo.distributed import Shards
from gradclip_algo.rules.scaling import scale_
from gradclip_algo.stats import ClipStats

NORM_EPS = 1e-6  # as in torch.nn.utils.clip_grad_norm_


def clip_grad_norm(shards: Shards, max_norm: float, norm_type: float = 2.0) -> ClipStats:
    """Scale every grad by ``min(1, λ / (‖G‖_p + 1e-6))``, ``‖G‖_p`` the p-norm of all grads together.

    The multiply always runs (a factor of 1 when under the threshold), so no host sync is needed.
    """
    norm = shards.global_norm(norm_type)
    coef = torch.clamp(max_norm / (norm + NORM_EPS), max=1.0)
    scale_(shards.grads, coef)
    return ClipStats(
        grad_norm=norm,
        clipped_grad_norm=norm * coef,
        clipped_fraction=(coef < 1.0).to(torch.float32),
    )
