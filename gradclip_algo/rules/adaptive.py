"""Adaptive gradient clipping, AGC (Brock, De, Smith and Simonyan 2021, arXiv 2102.06171)."""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.norms import unit_norms
from gradclip_algo.stats import ClipStats

AGC_EPS = 1e-3  # the paper's floor on the weight norm


def adaptive_clip_grad(params: list[Tensor], clipping: float, eps: float = AGC_EPS) -> ClipStats:
    """Per unit u: ``M_u = λ · max(‖W_u‖, ε)``; if ``‖G_u‖ > M_u`` then ``G_u ← G_u · M_u / ‖G_u‖``.

    Units are output rows/filters for tensors of 2+ dims and the whole tensor for 0-D and 1-D ones.
    The floor ε keeps zero-initialised parameters trainable. Norms are L2 and computed in fp32.
    """
    device = params[0].grad.device
    pre_sq, post_sq, clipped, units = [], [], [], 0
    for param in params:
        grad = param.grad
        grad_norm = unit_norms(grad)
        max_norm = clipping * unit_norms(param.detach()).clamp(min=eps)
        clip = grad_norm > max_norm
        coef = torch.where(clip, max_norm / grad_norm, 1.0)
        grad.mul_(coef)
        pre_sq.append(grad_norm.square().sum().to(device, torch.float32))
        post_sq.append(torch.minimum(grad_norm, max_norm).square().sum().to(device, torch.float32))
        clipped.append(clip.sum().to(device))
        units += grad_norm.numel()
    return ClipStats(
        grad_norm=torch.stack(pre_sq).sum().sqrt(),
        clipped_grad_norm=torch.stack(post_sq).sum().sqrt(),
        clipped_fraction=torch.stack(clipped).sum().to(torch.float32) / units,
    )
