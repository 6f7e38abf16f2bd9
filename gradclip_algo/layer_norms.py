"""Per-parameter and per-block gradient norms: which layer a gradient spike comes from (torch only).

:func:`grad_norms_by_name` takes the L2 norm of every parameter's grad (one foreach kernel per device and
dtype, no host sync); :func:`layer_norm_metrics` reads them back in one transfer and names the ``top_k``
largest and every block's, with Composer ``OptimizerMonitor``'s names: ``l2_norm/grad/<parameter name>``
for a parameter, ``l2_norm/grad_block/<block>`` for a block.

A *block* is the part of a parameter's name up to and including its first numeric component (the index
into a ``ModuleList`` or ``Sequential``: ``net.blocks.3.attn.qkv.weight`` belongs to ``net.blocks.3``);
a parameter without one belongs to its module (``net.embed.weight`` to ``net.embed``). For a transformer
these are the embeddings, each layer, the final norm and the head. A block's norm is the L2 norm of all
its grads together.

Grads that are DTensors (FSDP2, tensor parallel) are resolved to the norm of the whole tensor, a collective
that every rank must join: call these on the same steps on every rank. FSDP1's flat parameters are seen
as they are named by the wrapped module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

GRAD_PREFIX = "l2_norm/grad/"
BLOCK_PREFIX = "l2_norm/grad_block/"


@dataclass(frozen=True)
class LayerGradNorms:
    """L2 grad norms of named parameters: ``norms[i]`` (fp32, on the grads' device) belongs to ``names[i]``."""

    names: tuple[str, ...]
    norms: Tensor

    def blocks(self) -> tuple[tuple[str, ...], Tensor]:
        """Block names (in order of first appearance) and the L2 norm of each block's grads together."""
        block_names = [block_of(name) for name in self.names]
        order = list(dict.fromkeys(block_names))
        index = torch.tensor([order.index(b) for b in block_names], device=self.norms.device)
        squares = torch.zeros(len(order), dtype=torch.float32, device=self.norms.device)
        squares.index_add_(0, index, self.norms.square())
        return tuple(order), squares.sqrt()


def block_of(name: str) -> str:
    """The block of a parameter name: up to its first numeric component, else its module's name."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: position + 1])
    return ".".join(parts[:-1]) or name


def _whole_norm(grad: Tensor) -> Tensor:
    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
    full_tensor = getattr(norm, "full_tensor", None)  # a DTensor: the norm over every rank's piece
    return full_tensor() if full_tensor is not None else norm


@torch.no_grad()
def grad_norms_by_name(parameters: nn.Module | Iterable[tuple[str, Tensor]]) -> LayerGradNorms:
    """The L2 norm of the grad of every named parameter that has one, without reading it to the host.

    ``parameters``: a module (its ``named_parameters()``; a tensor shared under two names counts once,
    under its first name) or ``(name, tensor)`` pairs.
    """
    names, grads = _named_grads(parameters)
    if not grads:
        return LayerGradNorms((), torch.zeros(0, dtype=torch.float32))
    device = grads[0].device
    norms = _local_norms(grads)
    for i, grad in enumerate(grads):
        if norms[i] is None:
            norms[i] = _whole_norm(grad) if grad.numel() > 0 else torch.zeros((), device=grad.device)
    stacked = torch.stack([n.to(device, torch.float32) for n in norms if n is not None])
    return LayerGradNorms(tuple(names), stacked)


def _named_grads(parameters: nn.Module | Iterable[tuple[str, Tensor]]) -> tuple[list[str], list[Tensor]]:
    """The names and grads of the parameters that have a grad."""
    named = parameters.named_parameters() if isinstance(parameters, nn.Module) else parameters
    names: list[str] = []
    grads: list[Tensor] = []
    for name, param in named:
        if param.grad is not None:
            names.append(name)
            grads.append(param.grad)
    return names, grads


def _local_norms(grads: list[Tensor]) -> list[Tensor | None]:
    """The L2 norm (fp32) of each non-empty grad that is not a DTensor, one foreach kernel per device and
    dtype; ``None`` for the others."""
    norms: list[Tensor | None] = [None] * len(grads)
    local = [i for i, g in enumerate(grads) if not hasattr(g, "full_tensor") and g.numel() > 0]
    by_group: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i in local:
        by_group.setdefault((grads[i].device, grads[i].dtype), []).append(i)
    for indices in by_group.values():
        group_norms = torch._foreach_norm([grads[i] for i in indices], 2.0, dtype=torch.float32)
        for i, norm in zip(indices, group_norms, strict=True):
            norms[i] = norm
    return norms


def norm_metrics(norms: LayerGradNorms, top_k: int | None) -> dict[str, float]:
    """``l2_norm/grad/<name>`` of the ``top_k`` largest parameter norms (all when ``None``) and
    ``l2_norm/grad_block/<block>`` of every block, read from the device in one transfer."""
    if not norms.names:
        return {}
    block_names, block_norms = norms.blocks()
    values = torch.cat([norms.norms, block_norms]).tolist()
    params, blocks = values[: len(norms.names)], values[len(norms.names) :]
    # largest first; a NaN norm (the grad holds a NaN) ranks above everything
    ranked = sorted(range(len(params)), key=lambda i: -math.inf if math.isnan(params[i]) else -params[i])
    chosen = ranked if top_k is None else ranked[:top_k]
    metrics = {f"{GRAD_PREFIX}{norms.names[i]}": params[i] for i in chosen}
    metrics.update({f"{BLOCK_PREFIX}{name}": value for name, value in zip(block_names, blocks, strict=True)})
    return metrics


def layer_norm_metrics(
    parameters: nn.Module | Iterable[tuple[str, Tensor]], top_k: int | None = 10
) -> dict[str, float]:
    """For plain training loops: the per-parameter (top ``top_k``) and per-block grad norms of
    ``parameters`` as ``{metric name: value}``. Call it between ``backward()`` and clipping to see the
    norms before clipping; it reads from the device once."""
    return norm_metrics(grad_norms_by_name(parameters), top_k)
