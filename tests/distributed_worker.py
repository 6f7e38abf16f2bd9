"""Two CPU ranks (gloo) run the cases of tests/test_distributed.py, all in one spawn.

Each case builds a model, wraps it (DDP, FSDP1 with and without ``use_orig_params``, FSDP2), trains it on
its rank's half of a global batch and checks the result against a single-process reference that sees the
whole batch. Cases do their collectives first and their local asserts last, so a failing assert leaves the
ranks in step for the next case. :func:`run_cases` returns, per case, each rank's traceback or ``None``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
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
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
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
    gathered = [torch.empty_like(tensor) for _ in range(WORLD_SIZE)]
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


@case("fsdp2-hybrid-mesh-refused")
def check_hybrid_mesh_refused(rank: int) -> None:
    """HSDP's placements (replicate x shard on a 2-D mesh) are refused, naming them and what works."""
    mesh = init_device_mesh("cpu", (1, WORLD_SIZE), mesh_dim_names=("replicate", "shard"))
    param = nn.Parameter(distribute_tensor(torch.ones(4, 3), mesh, [Replicate(), Shard(0)]))
    param.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate(), Shard(0)])
    try:
        GradientClipper("norm", 0.1)([param])
    except ValueError as err:
        message = str(err)
    else:
        message = ""
    assert "placements (Replicate(), Shard(dim=0)) on a 2-D mesh are not supported" in message
    assert "use FSDP2 (fully_shard) on a 1-D mesh" in message


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


# ---- running the cases ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


COLLECTIVE_TIMEOUT = timedelta(seconds=30)


def _start_group(store: dist.Store, generation: str, rank: int) -> None:
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(generation, store),
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=COLLECTIVE_TIMEOUT,
    )


def _rank_main(rank: int, port: int, names: list[str], out_dir: str, extra_cases: str | None) -> None:
    """Run every case on this rank. After a case that failed on any rank (a rank may have left the others
    waiting in a collective until it timed out), all ranks start a fresh process group, so one failure does
    not spoil the cases after it. The ranks tell each other how a case went through the store."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
        NODE_RANK="0",
    )
    torch.set_num_threads(1)
    if extra_cases is not None:
        __import__(extra_cases)  # registers its cases in CASES
    store = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, is_master=rank == 0, timeout=3 * COLLECTIVE_TIMEOUT)
    _start_group(store, "start", rank)
    outcomes: dict[str, str | None] = {}
    for name in names:
        try:
            CASES[name](rank)
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
        store.set(f"{name}/{rank}", "passed" if outcomes[name] is None else "failed")
        if any(store.get(f"{name}/{other}") == b"failed" for other in range(WORLD_SIZE)):
            dist.destroy_process_group()
            _start_group(store, f"after {name}", rank)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
    dist.destroy_process_group()


def run_cases(
    names: list[str], extra_cases: str | None = None, timeout: float = 600.0
) -> dict[str, list[str | None]]:
    """Run ``names`` on 2 spawned ranks; per case, each rank's traceback (``None`` where it passed).

    ``extra_cases`` names a module that each rank imports first to register more cases.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _rank_main,
            (free_port(), names, out_dir, extra_cases),
            nprocs=WORLD_SIZE,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"the ranks did not finish within {timeout:.0f} s")
        results = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    return {name: [result[name] for result in results] for name in names}
