"""Two CPU ranks (gloo) run the cases of tests/test_distributed.py, all in one spawn.

Each case builds a model, wraps it (DDP, FSDP1 with and without ``use_orig_params``, FSDP2), trains it on
its rank's half of a global batch and checks the result against a single-process reference that sees the
whole batch. Cases do their collectives first and their local asserts last, so a failing assert leaves the
ranks in step for the next case. :func:`run_cases` returns, per case, each rank's traceback or ``None``.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
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


# ---- clipping rules on every layout ------------------------------------------------------------------

RULE_SETTINGS = {
    "norm-p1": ("norm", 0.1, {"norm_type": 1.0}),
    "norm-p2": ("norm", 0.1, {}),
    "norm-inf": ("norm", 0.01, {"norm_type": math.inf}),
    "value": ("value", 0.01, {}),
    "adaptive": ("adaptive", 0.02, {}),
}


def check_rule(layout: str, clipping_type: str, threshold: float, options: dict[str, Any], rank: int) -> None:
    """The clipped whole grads and the stats equal the single-process reference; stats equal on all ranks."""
    want, want_stats, initial, unclipped = reference_clip(clipping_type, threshold, **options)
    model = wrap(layout, make_net())
    rank_backward(layout, model, 0, rank)
    stats = GradientClipper(clipping_type, threshold, **options)(model)
    assert_same_on_every_rank(stats)
    got = full_grads(layout, model, initial)

    assert 0 < want_stats.clipped_fraction <= 1, "the reference must clip something"
    torch.testing.assert_close(stats_tensor(stats), stats_tensor(want_stats), rtol=1e-5, atol=0)
    assert_close_by_name(got, want, rtol=1e-5, atol=1e-6 if layout == "fsdp1-flat" else 1e-8)
    if clipping_type == "value":  # an elementwise clamp, not the uniform rescale by the inf-norm
        rescaled = [g.clone() for g in unclipped.values()]
        torch.nn.utils.clip_grad_norm_(rescaled, threshold, norm_type=math.inf)
        assert max((r - g).abs().max() for r, g in zip(rescaled, want.values(), strict=True)) > 1e-3
        assert max(g.abs().max() for g in got.values()) <= threshold + 1e-6


def check_adaptive_refused(layout: str, rank: int) -> None:
    """AGC under FSDP1 raises on every rank, naming what works, before touching any grad."""
    model = wrap(layout, make_net())
    rank_backward(layout, model, 0, rank)
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    try:
        GradientClipper("adaptive", 0.02)(model)
    except ValueError as err:
        message = str(err)
    else:
        raise AssertionError("AGC under FSDP1 must be refused")
    assert "clipping_type='adaptive' under FSDP1" in message
    assert "use FSDP2 (fully_shard)" in message and "or DDP" in message
    after = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True)), "refusal must not touch grads"


def check_fsdp1_parameters_without_module_refused(layout: str, rank: int) -> None:
    """Bare FSDP1 parameters carry no process group: the clipper asks for the module instead."""
    model = wrap(layout, make_net())
    rank_backward(layout, model, 0, rank)
    try:
        GradientClipper("norm", 0.1)(model.parameters())
    except ValueError as err:
        message = str(err)
    else:
        message = ""
    assert "FSDP1 (FullyShardedDataParallel) parameters were passed without their module" in message


for _layout in LAYOUTS:
    if _layout.startswith("fsdp1"):
        CASES[f"{_layout}-parameters-without-module-refused"] = partial(
            check_fsdp1_parameters_without_module_refused, _layout
        )
    for _rule, (_type, _threshold, _options) in RULE_SETTINGS.items():
        if _layout.startswith("fsdp1") and _type == "adaptive":
            CASES[f"{_layout}-adaptive-refused"] = partial(check_adaptive_refused, _layout)
        else:
            CASES[f"{_layout}-{_rule}"] = partial(check_rule, _layout, _type, _threshold, _options)


@case("fsdp1-orig-rank-without-grads")
def check_rank_without_grads(rank: int) -> None:
    """Only ``head.bias`` is clipped and one rank holds none of it: that rank still joins the reductions
    (it used to return early and leave the other rank waiting), and both get the reference's stats."""

    def options() -> dict[str, Any]:
        return {"exclude": lambda name, _: name != "head.bias"}

    for clipping_type in ("norm", "value"):
        want, want_stats, initial, _ = reference_clip(clipping_type, 0.01, **options())
        model = wrap("fsdp1-orig", make_net())
        rank_backward("fsdp1-orig", model, 0, rank)
        held = [p for name, p in model.named_parameters() if unwrapped_name(name) == "head.bias"]
        stats = GradientClipper(clipping_type, 0.01, **options())(model)
        assert_same_on_every_rank(stats)
        torch.testing.assert_close(stats_tensor(stats), stats_tensor(want_stats), rtol=1e-5, atol=0)
        got = full_grads("fsdp1-orig", model, initial)
        torch.testing.assert_close(got["head.bias"], want["head.bias"], rtol=1e-5, atol=1e-8)
    holders = gather(torch.tensor(float(any(p.grad is not None and p.grad.numel() for p in held))))
    assert sorted(float(h) for h in holders) == [0.0, 1.0], "the case needs a rank without a head.bias grad"


@case("fsdp2-empty-local-shard")
def check_empty_local_shard(rank: int) -> None:
    """A (1, 10) weight and a (1,) bias: rank 1 holds empty shards of both; every rule still works."""
    for settings in RULE_SETTINGS.values():
        torch.manual_seed(0)
        reference = nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 1))
        model = copy.deepcopy(reference)
        inputs = torch.randn(GLOBAL_BATCH, 4, generator=torch.Generator().manual_seed(3))
        reference(inputs).square().mean().backward()
        clipping_type, threshold, options = settings
        want_stats = GradientClipper(clipping_type, threshold, **options)(reference)
        fully_shard(model)
        (model(inputs[rank::WORLD_SIZE]).square().mean() * fsdp2_loss_scale()).backward()
        stats = GradientClipper(clipping_type, threshold, **options)(model)
        assert_same_on_every_rank(stats)
        got = [p.grad.full_tensor() for p in model.parameters()]
        torch.testing.assert_close(stats_tensor(stats), stats_tensor(want_stats), rtol=1e-5, atol=0)
        for g, w in zip(got, reference.parameters(), strict=True):
            torch.testing.assert_close(g, w.grad, rtol=1e-5, atol=1e-8)


# ---- non-finite grads -------------------------------------------------------------------------------


def local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def local_grads(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, local grad)`` of the parameters that have a non-empty local grad."""
    unwrapped = model.module if isinstance(model, DistributedDataParallel) else model
    for wrapped_name, param in unwrapped.named_parameters():
        name = unwrapped_name(wrapped_name)
        if param.grad is not None and local(param.grad).numel():
            yield name, local(param.grad)


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """This rank's weights and optimizer state (Adam: step, exp_avg, exp_avg_sq), copied."""
    state = [local(v).clone() for s in optimizer.state.values() for v in s.values()]
    return [local(p.detach()).clone() for p in model.parameters()] + state


def poison(model: nn.Module, step: int) -> None:
    """Rank 1 only, after backward (so after DDP's all-reduce): inf at step 1 and NaN at step 3."""
    _, grad = next(local_grads(model))
    grad.view(-1)[0] = math.inf if step == 1 else math.nan


def train_with_skips(
    model: nn.Module, skipped: tuple[int, ...], layout: str | None, rank: int = 0, steps: int = 5
) -> tuple[list[bool], list[bool]]:
    """Adam for ``steps`` steps with ``nonfinite='skip'``, rank 1 poisoning the ``skipped`` steps; ``layout``
    None is the single-process reference, which skips them itself. Returns, per step, whether it was
    skipped and whether this rank's weights and Adam state stayed bitwise the same."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    clipper = GradientClipper("norm", 0.1, nonfinite="skip")
    taken, frozen = [], []
    for step in range(steps):
        before = snapshot(model, optimizer)
        if layout is None:
            backward(model, *global_batch(step))
        else:
            rank_backward(layout, model, step, rank)
        if layout is None and step in skipped:
            model.zero_grad(set_to_none=True)
            taken.append(True)
        else:
            if rank == 1 and step in skipped:
                poison(model, step)
            taken.append(clipper(model).skipped)
        optimizer.step()
        frozen.append(all(torch.equal(b, a) for b, a in zip(before, snapshot(model, optimizer), strict=True)))
    return taken, frozen


def check_skip(layout: str, rank: int) -> None:
    """Inf then NaN in one rank's grads: every rank skips those steps and ends where the reference does."""
    skipped = (1, 3)
    reference = make_net()
    train_with_skips(reference, skipped, None)
    model = wrap(layout, make_net())
    taken, frozen = train_with_skips(model, skipped, layout, rank)
    weights = full_weights(layout, model)
    flags = gather(torch.tensor(taken))

    assert all(torch.equal(f, flags[0]) for f in flags), f"ranks decided differently: {flags}"
    assert taken == [step in skipped for step in range(len(taken))]
    assert frozen == taken, "a skipped step changed weights or Adam's state, or a kept one did not"
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert_close_by_name(weights, dict(reference.named_parameters()), rtol=1e-5, atol=1e-6)


def check_error(layout: str, rank: int) -> None:
    """NaN in one grad on rank 1 only: both ranks raise the same error, naming the parameter and rank 1."""
    model = wrap(layout, make_net())
    rank_backward(layout, model, 0, rank)
    # the FSDP1 flat shards hold the tail of head.weight and head.bias on rank 1: element 0 is head.weight's
    target = {"fsdp1-flat": "head._flat_param"}.get(layout, "head.weight")
    grads = dict(local_grads(model))
    if rank == 1:
        grads[target].view(-1)[0] = math.nan
    messages, names = nonfinite_errors_on_every_rank(
        lambda: GradientClipper("norm", 0.1, nonfinite="error")(model)
    )

    assert messages == ["non-finite gradient (inf or NaN) in head.weight on rank 1"] * WORLD_SIZE
    assert names == ["head.weight"] * WORLD_SIZE


def check_zero(rank: int) -> None:
    """Under FSDP2, inf and NaN in rank 1's shard of hidden.weight (whole rows 4..6): zeroed, then clipped
    exactly as the reference clips the grads with those elements zeroed by hand."""
    reference = make_net()
    backward(reference, *global_batch(0))
    reference.hidden.weight.grad[4, 0] = 0.0
    reference.hidden.weight.grad[5, 2] = 0.0
    want_stats = GradientClipper("norm", 0.1)(reference)
    model = wrap("fsdp2", make_net())
    rank_backward("fsdp2", model, 0, rank)
    if rank == 1:
        shard = model.hidden.weight.grad.to_local()
        shard[0, 0], shard[1, 2] = math.inf, math.nan
    stats = GradientClipper("norm", 0.1, nonfinite="zero")(model)
    assert_same_on_every_rank(stats)
    got = {name: p.grad.full_tensor() for name, p in model.named_parameters()}

    torch.testing.assert_close(stats_tensor(stats), stats_tensor(want_stats), rtol=1e-5, atol=0)
    assert_close_by_name(
        got, {name: p.grad for name, p in reference.named_parameters()}, rtol=1e-5, atol=1e-8
    )


for _layout in LAYOUTS:
    CASES[f"{_layout}-skip-inf-and-nan-on-one-rank"] = partial(check_skip, _layout)
    CASES[f"{_layout}-error-names-the-parameter-on-every-rank"] = partial(check_error, _layout)
CASES["fsdp2-zero-repairs-one-rank-shard"] = check_zero


# ---- precision -------------------------------------------------------------------------------------


@case("fsdp2-bf16-norm-accumulates-in-fp32")
def check_bf16(rank: int) -> None:
    """bf16 weights and grads sharded over 2 ranks: the norm is the fp32 norm of the whole bf16 grads."""
    want, want_stats, _, _ = reference_clip("norm", 0.1)
    model = wrap("fsdp2", make_net(torch.bfloat16))
    rank_backward("fsdp2", model, 0, rank)
    unclipped = [p.grad.full_tensor().double() for p in model.parameters()]
    stats = GradientClipper("norm", 0.1)(model)
    assert_same_on_every_rank(stats)
    got = {name: p.grad.full_tensor() for name, p in model.named_parameters()}

    exact = torch.linalg.vector_norm(torch.cat([g.flatten() for g in unclipped]))
    assert stats.grad_norm.dtype == torch.float32
    torch.testing.assert_close(stats.grad_norm.double(), exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.grad_norm, want_stats.grad_norm, rtol=3e-2, atol=0)  # vs fp32 training
    for name, grad in got.items():
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), want[name], rtol=5e-2, atol=2e-3)


# ---- every clipping type on every set-up, against float64 clipping of the gathered whole grads --------

SETTINGS: dict[str, tuple[str, float, dict[str, Any]]] = {
    "norm-p1": ("norm", 0.1, {"norm_type": 1.0}),
    "norm-p2": ("norm", 0.1, {}),
    "norm-inf": ("norm", 0.01, {"norm_type": math.inf}),
    "value": ("value", 0.01, {}),
    "adaptive": ("adaptive", 0.02, {}),
    "quantile": ("quantile", math.inf, {"percentile": 50.0, "window": 4}),
    "zscore": ("zscore", math.inf, {"warmup_steps": 2, "z_threshold": 1.0}),
    "adagc": ("adagc", 0.1, {"warmup_steps": 2, "relative_threshold": 0.5}),
    "skip-spikes": ("norm", 10.0, {"skip_spikes": 2.0, "spike_window": 4}),
    "value-clipped-flag": ("value", 0.01, {}),
}
FLAG_ONLY = {"value-clipped-flag"}
"""Settings called with ``with_stats='clipped'``: the reference's clipped flag, NaN norms."""
STEP_SCALES = (1.0, 1.5, 30.0)  # the loss scale of each step: the last one is a spike
NONFINITE_MODES = ("propagate", "propagate-inf-norm", "zero", "skip", "error")
FOUR_RANKS: set[str] = set()
"""The cases that run on 4 ranks (2x2 meshes); the others run on 2."""
LIMITS: dict[str, str] = {}
"""Cases a torch limitation blocks on the running torch: the reason, by case (the test skips them)."""
TORCH_2_7 = torch.__version__.startswith("2.7")


@dataclass
class Setup:
    """A model under one parallel set-up, on this rank: what the clipper is called on, the parameters it
    clips (by their name in the unwrapped model, in the clipper's order) and a backward pass."""

    target: Any
    named: list[tuple[str, Tensor]]
    backward: Callable[[int, float], None]  # (step, loss scale)
    options: dict[str, Any] = field(default_factory=dict)  # process_group
    stages: dist.ProcessGroup | None = None  # the pipeline stages, to gather every stage's tensors
    gather_whole: Callable[[str], dict[str, Tensor]] | None = None  # FSDP1: through summon_full_params
    atol: float = 1e-7  # on the grads


def stage_whole(setup: Setup, kind: str) -> dict[str, Tensor]:
    """The whole grads (``kind='grad'``) or weights of this rank's clipped parameters (a collective)."""
    if setup.gather_whole is not None:
        return setup.gather_whole(kind)
    found = {}
    for name, param in setup.named:
        tensor = param.grad if kind == "grad" else param.detach()
        if tensor is not None:
            found[name] = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach().clone()
    return found


def model_whole(setup: Setup, kind: str) -> dict[str, Tensor]:
    """:func:`stage_whole` of every pipeline stage, in stage order."""
    mine = stage_whole(setup, kind)
    if setup.stages is None:
        return mine
    return {name: tensor for part in exchange(mine, setup.stages) for name, tensor in part.items()}


def exchange(tensors: dict[str, Tensor], group: dist.ProcessGroup) -> list[dict[str, Tensor]]:
    """``tensors`` from every rank of ``group``, in rank order (``all_gather_object`` needs numpy)."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    ranks = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ranks)]
    dist.all_gather(sizes, torch.tensor([data.numel()]), group=group)
    padded = torch.zeros(int(max(sizes)), dtype=torch.uint8)
    padded[: data.numel()] = data
    gathered = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(gathered, padded, group=group)
    return [torch.load(io.BytesIO(bytes(g[: int(n)].tolist()))) for g, n in zip(gathered, sizes, strict=True)]


def float64_model(grads: dict[str, Tensor], weights: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """One process's copy of the whole model in float64, with the gathered grads."""
    named = []
    for name, weight in weights.items():
        param = nn.Parameter(weight.detach().double().clone())
        param.grad = grads[name].double().clone() if name in grads else None
        named.append((name, param))
    return named


class Findings:
    """Failed checks, collected (a rank must not leave the collectives of a case early) and raised at the end."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.failures.append(message)

    def close(self, label: str, got: Tensor, want: Tensor, rtol: float = 1e-5, atol: float = 1e-7) -> None:
        try:
            torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol, equal_nan=True)
        except AssertionError as err:
            self.failures.append(f"{label}: {err}")

    def raise_any(self) -> None:
        if self.failures:
            raise AssertionError("\n".join(self.failures))


def compare_step(
    findings: Findings, label: str, setup: Setup, got: ClipStats, want: ClipStats, reference: list
) -> None:
    """Stats equal on every rank and to the reference's; this stage's clipped grads equal the reference's."""
    everyone = gather(torch.cat([stats_tensor(got), torch.tensor([float(got.skipped)])]))
    after = stage_whole(setup, "grad")
    same = all(torch.allclose(e, everyone[0], rtol=0, atol=0, equal_nan=True) for e in everyone)
    findings.check(same, f"{label}: ranks differ: {everyone}")
    findings.check(got.skipped == want.skipped, f"{label}: skipped {got.skipped}, reference {want.skipped}")
    findings.close(f"{label} stats", stats_tensor(got), stats_tensor(want))
    want_grads = {name: p.grad for name, p in reference if p.grad is not None}
    findings.check(
        set(after) == {name for name, _ in setup.named} & set(want_grads),
        f"{label}: grads held {sorted(after)}, reference {sorted(want_grads)}",
    )
    for name, grad in after.items():
        if name in want_grads:
            findings.close(f"{label} {name}", grad, want_grads[name], atol=setup.atol)


def compare_state(
    findings: Findings,
    label: str,
    setup: Setup,
    got: GradientClipper,
    want: GradientClipper,
    order: list[str],
) -> None:
    """The statistics equal the reference's: global ones whole, adagc's gamma for this stage's tensors."""
    got_state, want_state = got.state_dict(), want.state_dict()
    findings.check(got_state.keys() == want_state.keys(), f"{label}: state {got_state.keys()}")
    stage = [order.index(name) for name, _ in setup.named]
    for part, values in want_state.items():
        for key, value in values.items():
            if key == "gamma":
                value = value[stage]
            findings.close(f"{label} state {part}.{key}", got_state.get(part, {}).get(key, value * 0), value)


def check_types(
    make: Callable[[int], Setup], rank: int, skip: tuple[str, ...] = (), nonfinite: bool = True
) -> None:
    """Every clipping type, over the steps of ``STEP_SCALES`` (the first only for a stateless type;
    statistics carry over), then every non-finite mode (``nonfinite``: for set-ups where a grad is
    split), each against float64 clipping of the gathered whole grads of the whole model."""
    setup = make(rank)
    weights = model_whole(setup, "weight")  # clipping leaves them as they are
    findings = Findings()
    for label, (clipping_type, threshold, options) in SETTINGS.items():
        if label in skip:
            continue
        clipper = GradientClipper(clipping_type, threshold, **options, **setup.options)
        reference = GradientClipper(clipping_type, threshold, **options)
        bites = []
        for step, scale in enumerate(STEP_SCALES if clipper.stateful else STEP_SCALES[:1]):
            setup.backward(step, scale)
            model = float64_model(model_whole(setup, "grad"), weights)
            want = reference(model)
            flag_only = label in FLAG_ONLY
            got = clipper(setup.target, "clipped" if flag_only else True)
            expected = ClipStats.clipped_only(want.clipped_fraction > 0) if flag_only else want
            compare_step(findings, f"{label} step {step}", setup, got, expected, model)
            bites.append(bool(want.clipped_fraction > 0) or want.skipped)
        findings.check(any(bites), f"{label}: the reference never clipped: the check does not bite")
        if clipper.stateful:
            compare_state(findings, label, setup, clipper, reference, [name for name, _ in model])
    for mode in NONFINITE_MODES if nonfinite else ():
        check_nonfinite(findings, setup, weights, mode, rank)
    findings.raise_any()


def poison_one_shard(setup: Setup, rank: int) -> str:
    """NaN in one element of a split grad: in the last rank's piece, and in every replica of that piece
    (HSDP keeps one per replica group), as a fault in a reduction would; the poisoned parameter's name."""
    last = dist.get_world_size() - 1
    chosen = None
    if rank == last:
        candidates = [(n, p) for n, p in setup.named if p.grad is not None and local(p.grad).numel()]
        split = [(n, p) for n, p in candidates if is_split(p)]
        chosen = (split or candidates)[0][0]
    name = texts_from_every_rank(chosen, torch.device("cpu"))[last]
    param = dict(setup.named).get(name)
    where = piece(param) if param is not None else None
    pieces = texts_from_every_rank(where, torch.device("cpu"))
    if param is not None and where == pieces[last]:
        local(param.grad).view(-1)[0] = math.nan
    return name


def piece(param: Tensor) -> str:
    """Which piece of its grad this rank holds: its coordinates on the mesh dims that shard it."""
    grad = param.grad
    if not isinstance(grad, DTensor):
        return str(dist.get_rank())
    coordinate = grad.device_mesh.get_coordinate()
    return str([c for c, p in zip(coordinate, grad.placements, strict=True) if not p.is_replicate()])


def is_split(param: Tensor) -> bool:
    """Whether the grad of ``param`` is sharded (its pieces differ from rank to rank)."""
    if isinstance(param.grad, DTensor):
        return any(p.is_shard() or "Strided" in type(p).__name__ for p in param.grad.placements)
    return getattr(param, "_fsdp_flattened", False)


def check_nonfinite(
    findings: Findings, setup: Setup, weights: dict[str, Tensor], mode: str, rank: int
) -> None:
    """NaN in one rank's piece of one grad: the reference sees it in the gathered whole grad."""
    setup.backward(0, 1.0)
    name = poison_one_shard(setup, rank)
    model = float64_model(model_whole(setup, "grad"), weights)
    mode, options = (
        mode.removesuffix("-inf-norm"),
        {"norm_type": math.inf} if mode.endswith("-inf-norm") else {},
    )
    clipper = GradientClipper("norm", 0.1, nonfinite=mode, **options, **setup.options)
    if mode == "error":
        messages, names = nonfinite_errors_on_every_rank(lambda: clipper(setup.target))
        findings.check(
            messages[0] is not None and messages == [messages[0]] * len(messages), f"error: {messages}"
        )
        findings.check(names == [name] * len(names), f"error: named {names}, poisoned {name}")
        return
    want = GradientClipper("norm", 0.1, nonfinite=mode, **options)(model)
    got = clipper(setup.target)
    compare_step(findings, f"nonfinite={mode}", setup, got, want, model)


def global_batch_scaled(step: int, rows: slice) -> tuple[Tensor, Tensor]:
    tokens, targets = global_batch(step)
    return tokens[rows], targets[rows]


def loss_backward(model: nn.Module, tokens: Tensor, targets: Tensor, scale: float) -> None:
    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(tokens), targets) * scale).backward()


def data_parallel(model: nn.Module, rank: int, ranks: int) -> Callable[[int, float], None]:
    """Backward on rows ``rank::ranks`` of each global batch."""
    return lambda step, scale: loss_backward(
        model, *global_batch_scaled(step, slice(rank, None, ranks)), scale
    )


def ddp_setup(rank: int) -> Setup:
    model = DistributedDataParallel(make_net())
    return Setup(model, list(model.module.named_parameters()), data_parallel(model, rank, WORLD_SIZE))


def fsdp2_setup(rank: int) -> Setup:
    model = wrap("fsdp2", make_net())
    return Setup(model, list(model.named_parameters()), data_parallel(model, rank, WORLD_SIZE))


def fsdp1_orig_setup(rank: int) -> Setup:
    model = wrap("fsdp1-orig", make_net())
    named = [(unwrapped_name(name), param) for name, param in model.named_parameters()]

    def whole(kind: str) -> dict[str, Tensor]:
        with FullyShardedDataParallel.summon_full_params(model, with_grads=kind == "grad"):
            tensors = {n: p.grad if kind == "grad" else p.detach() for n, p in named}
            return {n: t.clone() for n, t in tensors.items() if t is not None}

    return Setup(model, named, data_parallel(model, rank, WORLD_SIZE), gather_whole=whole)


def fsdp1_flat_setup(rank: int) -> Setup:
    """FSDP1 with flat parameters: whole grads can only be read back through one SGD step with lr 1
    (``initial - weights``), after which the weights are restored."""
    model = wrap("fsdp1-flat", make_net())
    names = list(full_weights("fsdp1-flat", model))

    def whole(kind: str) -> dict[str, Tensor]:
        initial = full_weights("fsdp1-flat", model)
        if kind != "grad":
            return initial
        if all(p.grad is None for p in model.parameters()):  # a skipped step
            return {}
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        with FullyShardedDataParallel.summon_full_params(model), torch.no_grad():
            grads = {}
            for name, param in model.named_parameters():
                grads[unwrapped_name(name)] = initial[unwrapped_name(name)] - param
                param.copy_(initial[unwrapped_name(name)])
        return grads

    named = [(name, torch.empty(0)) for name in names]  # adagc's per-tensor state is per flat parameter
    return Setup(model, named, data_parallel(model, rank, WORLD_SIZE), gather_whole=whole, atol=1e-6)


class GainNet(ShardedNet):
    """ShardedNet whose logits are scaled by ``gain``, a ``Replicate`` DTensor fed batch-sharded DTensor
    logits: its grad comes out ``Partial`` (each rank holds its batch's summand)."""

    def __init__(self, mesh: Any) -> None:
        super().__init__()
        self.mesh = mesh
        self.gain = nn.Parameter(distribute_tensor(torch.linspace(0.5, 1.5, 3), mesh, [Replicate()]))

    def forward(self, tokens: Tensor) -> Tensor:
        logits = DTensor.from_local(super().forward(tokens), self.mesh, [Shard(0)])
        return (logits * self.gain).to_local()


def fsdp2_replicate_setup(rank: int) -> Setup:
    torch.manual_seed(0)
    model = GainNet(init_device_mesh("cpu", (WORLD_SIZE,)))
    for module in (model.embed, model.norm, model.conv, model.hidden, model.head):
        fully_shard(module)
    return Setup(model, list(model.named_parameters()), data_parallel(model, rank, WORLD_SIZE))


class TPNet(nn.Module):
    """Embedding (row-wise: vocab rows split), LayerNorm (SequenceParallel: its grads come out Partial),
    a column-wise Linear (rows split), a row-wise Linear (columns split: AGC units span ranks) and a plain
    head (whole, replicated)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 1, 8)  # FSDP2 + TP needs dim 0 to split evenly over 4 ranks
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 8)
        self.down = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        nn.init.zeros_(self.up.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.norm(self.embed(tokens))
        return self.head(self.down(torch.tanh(self.up(x))).mean(1))


def tensor_parallel(model: TPNet, mesh: Any) -> TPNet:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "up": ColwiseParallel(input_layouts=Shard(1)),
        "down": RowwiseParallel(),
    }
    return parallelize_module(model, mesh, plan)


def tp_setup(rank: int) -> Setup:
    torch.manual_seed(0)
    model = tensor_parallel(TPNet(), init_device_mesh("cpu", (WORLD_SIZE,)))
    backward = data_parallel(model, 0, 1)  # every TP rank sees the whole batch
    return Setup(model, list(model.named_parameters()), backward)


STAGES = (("embed", "norm", "conv"), ("hidden", "head"))


def pipeline_setup(rank: int) -> Setup:
    """Two pipeline stages, one per rank: every rank runs the whole model on the whole batch (the grads a
    pipeline schedule would give), and clips only its stage's parameters, with ``process_group``."""
    model = make_net()
    named = [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in STAGES[rank]]
    group = dist.group.WORLD
    return Setup(named, named, data_parallel(model, 0, 1), {"process_group": group}, stages=group)


for _name, _make in {
    "ddp": ddp_setup,
    "fsdp2": fsdp2_setup,
    "fsdp1-orig": fsdp1_orig_setup,
    "fsdp1-flat": fsdp1_flat_setup,
    "fsdp2-replicate-partial-grads": fsdp2_replicate_setup,
    "tp-sequence-parallel": tp_setup,
    "pipeline-2-stages": pipeline_setup,
}.items():
    _skip = {"fsdp1-orig": ("adaptive",), "fsdp1-flat": ("adaptive", "adagc")}.get(_name, ())
    # DDP (a NaN put into one replica only) and FSDP1 flat: see their skip/error cases above
    _nonfinite = _name not in ("ddp", "fsdp1-flat")
    CASES[f"{_name}-every-type"] = partial(check_types, _make, skip=_skip, nonfinite=_nonfinite)


# ---- 2x2 meshes on 4 ranks --------------------------------------------------------------------------


def fsdp2_tp_setup(rank: int) -> Setup:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = tensor_parallel(TPNet(), mesh["tp"])
    for module in (model.embed, model.norm, model.up, model.down, model.head, model):
        fully_shard(module, mesh=mesh["dp"])
    return Setup(model, list(model.named_parameters()), data_parallel(model, mesh.get_local_rank("dp"), 2))


def hsdp_setup(rank: int) -> Setup:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    model = make_net()
    for module in (model.hidden, model.head, model):
        fully_shard(module, mesh=mesh)
    return Setup(model, list(model.named_parameters()), data_parallel(model, rank, 4))


def pipeline_fsdp2_setup(rank: int) -> Setup:
    """Two pipeline stages of two FSDP2 ranks each (a (pp, dp) mesh); each stage shards its modules over
    its dp ranks and clips them with ``process_group`` the pp group."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_local_rank("pp")
    model = make_net()
    for name in STAGES[stage]:
        fully_shard(getattr(model, name), mesh=mesh["dp"])
    named = [(n, p) for n, p in model.named_parameters() if n.split(".")[0] in STAGES[stage]]
    group = mesh.get_group("pp")
    backward = data_parallel(model, mesh.get_local_rank("dp"), 2)
    return Setup(named, named, backward, {"process_group": group}, stages=group)


for _name, _make in {
    "fsdp2-tp-2d-mesh": fsdp2_tp_setup,
    "hsdp": hsdp_setup,
    "pipeline-fsdp2-2x2": pipeline_fsdp2_setup,
}.items():
    CASES[f"{_name}-every-type"] = partial(check_types, _make)
    FOUR_RANKS.add(f"{_name}-every-type")
if TORCH_2_7:
    LIMITS["hsdp-every-type"] = (
        "torch 2.7's FSDP2 all-reduces HSDP grads across replicas with ReduceOp.AVG, which gloo lacks "
        "(torch 2.13 runs it)"
    )


# ---- running the cases ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


COLLECTIVE_TIMEOUT = timedelta(seconds=30)


def _start_group(store: dist.Store, generation: str, rank: int, world_size: int) -> None:
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(generation, store),
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def _rank_main(
    rank: int, port: int, names: list[str], out_dir: str, extra_cases: str | None, world_size: int
) -> None:
    """Run every case on this rank. After a case that failed on any rank (a rank may have left the others
    waiting in a collective until it timed out), all ranks start a fresh process group, so one failure does
    not spoil the cases after it. The ranks tell each other how a case went through the store."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    if extra_cases is not None:
        __import__(extra_cases)  # registers its cases in CASES
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=3 * COLLECTIVE_TIMEOUT)
    _start_group(store, "start", rank, world_size)
    outcomes: dict[str, str | None] = {}
    for name in names:
        try:
            CASES[name](rank)
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
        store.set(f"{name}/{rank}", "passed" if outcomes[name] is None else "failed")
        if any(store.get(f"{name}/{other}") == b"failed" for other in range(world_size)):
            dist.destroy_process_group()
            _start_group(store, f"after {name}", rank, world_size)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


def run_cases(
    names: list[str], extra_cases: str | None = None, timeout: float = 600.0, world_size: int = WORLD_SIZE
) -> dict[str, list[str | None]]:
    """Run ``names`` on ``world_size`` spawned ranks; per case, each rank's traceback (``None`` where it
    passed).

    ``extra_cases`` names a module that each rank imports first to register more cases.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _rank_main,
            (free_port(), names, out_dir, extra_cases, world_size),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the ranks did not finish within {timeout:.0f} s")
        results = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world_size)]
    return {name: [result[name] for result in results] for name in names}
