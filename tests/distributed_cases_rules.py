"""Distributed cases: 'norm' (p = 1, 2, inf), 'value' and 'adaptive' on every layout (DDP, FSDP1 with and
without ``use_orig_params``, FSDP2) against the single-process reference; AGC and bare parameters refused
under FSDP1; a rank that holds no grad; an empty local shard; a bf16 norm accumulated in fp32.

The rules' unit tests: tests/test_norm_clipping.py, tests/test_value_clipping.py,
tests/test_adaptive_clipping.py, tests/test_precision.py.
"""

from __future__ import annotations

import copy
import math
from functools import partial
from typing import Any

import torch
from distributed_common import (
    CASES,
    GLOBAL_BATCH,
    LAYOUTS,
    WORLD_SIZE,
    assert_close_by_name,
    assert_same_on_every_rank,
    case,
    fsdp2_loss_scale,
    full_grads,
    gather,
    make_net,
    rank_backward,
    reference_clip,
    stats_tensor,
    wrap,
)
from torch import nn
from torch.distributed.fsdp import fully_shard

from gradclip_algo import GradientClipper
from gradclip_algo.parameters import unwrapped_name

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
