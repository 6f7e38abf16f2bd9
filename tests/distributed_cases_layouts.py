"""Distributed cases: every clipping type on every parallel set-up, against float64 clipping of the gathered
whole grads, over steps whose statistics carry over, then every non-finite mode.

The settings (:data:`SETTINGS`) cover the stateless rules ('norm', 'value', 'adaptive', the clipped flag),
the stateful ones ('quantile', 'zscore', 'adagc') and spike skipping (``skip_spikes``); the set-ups are DDP,
FSDP1 (both kinds), FSDP2 (also with a Partial grad), tensor parallelism with sequence parallelism and two
pipeline stages on 2 ranks, and FSDP2 + TP, HSDP and pipeline x FSDP2 on 2x2 meshes on 4 ranks.
Each case is named ``<set-up>-every-type``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from distributed_common import (
    CASES,
    FOUR_RANKS,
    LIMITS,
    TORCH_2_7,
    VOCAB,
    WORLD_SIZE,
    ShardedNet,
    backward,
    full_weights,
    gather,
    global_batch,
    local,
    make_net,
    nonfinite_errors_on_every_rank,
    stats_tensor,
    wrap,
)
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from gradclip_algo import ClipStats, GradientClipper
from gradclip_algo.nonfinite import texts_from_every_rank
from gradclip_algo.parameters import unwrapped_name

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


def data_parallel(model: nn.Module, rank: int, ranks: int) -> Callable[[int, float], None]:
    """Backward on rows ``rank::ranks`` of each global batch."""
    return lambda step, scale: backward(model, *global_batch_scaled(step, slice(rank, None, ranks)), scale)


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
