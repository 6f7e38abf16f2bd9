"""Distributed cases: non-finite grads on one rank. ``nonfinite='skip'`` skips the step on every rank
(weights and Adam state untouched), 'error' raises the same error naming the parameter on every rank,
'zero' repairs one rank's shard; on every layout (DDP, FSDP1, FSDP2).

The unit tests: tests/test_nonfinite.py; every non-finite mode on every parallel set-up is in
tests/distributed_cases_layouts.py.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from distributed_common import (
    CASES,
    LAYOUTS,
    WORLD_SIZE,
    assert_close_by_name,
    assert_same_on_every_rank,
    backward,
    full_weights,
    gather,
    global_batch,
    local,
    local_grads,
    make_net,
    nonfinite_errors_on_every_rank,
    rank_backward,
    stats_tensor,
    wrap,
)
from torch import Tensor, nn

from gradclip_algo import GradientClipper


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
