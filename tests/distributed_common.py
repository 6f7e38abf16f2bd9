"""What every distributed case shares: the registry of cases (:data:`CASES`, :data:`FOUR_RANKS`,
:data:`LIMITS`), the model and data, the wrapping of a model under a layout (DDP, FSDP1 with and without
``use_orig_params``, FSDP2), gathering whole grads and weights from the ranks, and the single-process
reference clip. The cases themselves are in the ``distributed_cases_*`` modules, by feature; the worker
that spawns the ranks and runs them is tests/distributed_worker.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.nn.parallel import DistributedDataParallel

from gradclip_algo import ClipStats, GradientClipper, NonFiniteGradError
from gradclip_algo.nonfinite import texts_from_every_rank
from gradclip_algo.parameters import unwrapped_name

WORLD_SIZE = 2
GLOBAL_BATCH = 8
VOCAB = 11
LAYOUTS = ("ddp", "fsdp1-orig", "fsdp1-flat", "fsdp2")
CASES: dict[str, Callable[[int], None]] = {}
"""Every case by name: ``function(rank)``, raising where a check fails."""
FOUR_RANKS: set[str] = set()
"""The cases that run on 4 ranks (2x2 meshes); the others run on 2."""
LIMITS: dict[str, str] = {}
"""Cases a torch limitation blocks on the running torch: the reason, by case (the test skips them)."""
TORCH_2_7 = torch.__version__.startswith("2.7")


class ShardedNet(nn.Module):
    """Embedding, LayerNorm, Conv1d and Linear layers; odd sizes, so shards over 2 ranks are uneven, and
    zero biases (``hidden.bias`` zero-initialised, LayerNorm's bias zero), whose AGC unit spans ranks."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 5)
        self.norm = nn.LayerNorm(5)
        self.conv = nn.Conv1d(5, 3, 3)
        self.hidden = nn.Linear(5, 7)
        nn.init.zeros_(self.hidden.bias)
        self.head = nn.Linear(7 + 3, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.norm(self.embed(tokens))
        h = torch.tanh(self.hidden(x)).mean(1)
        c = self.conv(x.transpose(1, 2)).mean(2)
        return self.head(torch.cat([h, c], 1))


def make_net(dtype: torch.dtype = torch.float32) -> ShardedNet:
    torch.manual_seed(0)
    return ShardedNet().to(dtype)


def global_batch(step: int) -> tuple[Tensor, Tensor]:
    """Tokens (8 sequences of 6) and class targets of global batch ``step``."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, 6), generator=gen)
    return tokens, torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def rank_batch(step: int, rank: int) -> tuple[Tensor, Tensor]:
    """Rows ``rank::WORLD_SIZE`` of the global batch, as a ``DistributedSampler`` without shuffling gives."""
    tokens, targets = global_batch(step)
    return tokens[rank::WORLD_SIZE], targets[rank::WORLD_SIZE]


def backward(model: nn.Module, tokens: Tensor, targets: Tensor, scale: float = 1.0) -> None:
    """Mean cross-entropy over the batch (times ``scale``): averaged over ranks, the global batch's mean."""
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(tokens), targets) * scale).backward()


@cache
def fsdp2_loss_scale() -> float:
    """``1 / WORLD_SIZE`` where FSDP2's reduce-scatter sums the ranks' grads instead of averaging them
    (torch 2.7 on gloo, which has no AVG reduction), else 1: so FSDP2 grads are means as on GPUs.

    Measured once per process with a tiny sharded layer (a collective: every rank calls it in step).
    """
    layer = nn.Linear(1, WORLD_SIZE, bias=False)
    fully_shard(layer)
    layer(torch.ones(1, 1)).sum().backward()  # every rank's grad is all ones
    return 1 / WORLD_SIZE if layer.weight.grad.full_tensor()[0, 0].item() == WORLD_SIZE else 1.0


def rank_backward(layout: str, model: nn.Module, step: int, rank: int) -> None:
    """Backward on this rank's half of batch ``step``; averaged over ranks, the global batch's grads."""
    backward(model, *rank_batch(step, rank), scale=fsdp2_loss_scale() if layout == "fsdp2" else 1.0)


def wrap(layout: str, model: nn.Module) -> nn.Module:
    """``model`` under ``layout``; FSDP wraps each Linear as its own unit, so there are several shards."""
    if layout == "ddp":
        return DistributedDataParallel(model)
    if layout.startswith("fsdp1"):
        return FullyShardedDataParallel(
            model,
            device_id=torch.device("cpu"),
            use_orig_params=layout == "fsdp1-orig",
            auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
        )
    for module in (model.hidden, model.head, model):  # separate calls: separate meshes, one group
        fully_shard(module)
    return model


def full_grads(layout: str, model: nn.Module, initial: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole grads by parameter name, gathered from the ranks (a collective).

    FSDP1 cannot gather grads with ``use_orig_params=False``, so there one SGD step with lr 1 is taken and
    the grads are read back as ``initial - weights``.
    """
    if layout == "ddp":
        return {name: p.grad.clone() for name, p in model.module.named_parameters()}
    if layout == "fsdp2":
        return {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if layout == "fsdp1-orig":
        with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
            return {unwrapped_name(name): p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    with FullyShardedDataParallel.summon_full_params(model):
        return {
            unwrapped_name(name): initial[unwrapped_name(name)] - p for name, p in model.named_parameters()
        }


def full_weights(layout: str, model: nn.Module) -> dict[str, Tensor]:
    """The whole weights by parameter name (a collective)."""
    if layout == "ddp":
        return {name: p.detach().clone() for name, p in model.module.named_parameters()}
    if layout == "fsdp2":
        return {name: p.detach().full_tensor() for name, p in model.named_parameters()}
    with FullyShardedDataParallel.summon_full_params(model):
        return {unwrapped_name(name): p.detach().clone() for name, p in model.named_parameters()}


def gather(tensor: Tensor) -> list[Tensor]:
    """``tensor`` from every rank."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return gathered


def nonfinite_errors_on_every_rank(call: Callable[[], object]) -> tuple[list[str | None], list[str | None]]:
    """Run ``call`` expecting a ``NonFiniteGradError``; its message and ``param_name`` from every rank
    (``None`` where a rank raised nothing)."""
    try:
        call()
    except NonFiniteGradError as err:
        raised = (str(err), err.param_name)
    else:
        raised = (None, None)
    return tuple(texts_from_every_rank(text, torch.device("cpu")) for text in raised)


def stats_tensor(stats: ClipStats) -> Tensor:
    return torch.stack([stats.grad_norm, stats.clipped_grad_norm, stats.clipped_fraction])


def assert_same_on_every_rank(stats: ClipStats) -> None:
    """The statistics are bitwise equal on every rank (a collective)."""
    first, *others = gather(stats_tensor(stats))
    for other in others:
        assert torch.equal(first, other), f"ClipStats differ between ranks: {first} vs {other}"


def assert_close_by_name(got: dict[str, Tensor], want: dict[str, Tensor], **tolerance: float) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


Named = dict[str, Tensor]


def reference_clip(
    clipping_type: str, threshold: float, **options: Any
) -> tuple[Named, ClipStats, Named, Named]:
    """One process, whole global batch 0: the clipped grads by name, the stats, the initial weights and the
    grads before clipping."""
    model = make_net()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    backward(model, *global_batch(0))
    unclipped = {name: p.grad.clone() for name, p in model.named_parameters()}
    stats = GradientClipper(clipping_type, threshold, **options)(model)
    clipped = {name: p.grad for name, p in model.named_parameters()}
    return clipped, stats, initial, unclipped


Case = Callable[[int], None]


def case(name: str, registry: dict[str, Case] = CASES) -> Callable[[Case], Case]:
    """Register the decorated ``function(rank)`` as case ``name``."""

    def register(function: Case) -> Case:
        registry[name] = function
        return function

    return register


def local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_grads(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, local grad)`` of the parameters that have a non-empty local grad."""
    unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
    for wrapped_name, param in unwrapped.named_parameters():
        name = unwrapped_name(wrapped_name)
        if param.grad is not None and local(param.grad).numel():
            yield name, local(param.grad)
