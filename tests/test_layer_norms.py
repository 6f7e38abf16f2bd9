"""Per-parameter and per-block grad norms: the values, the names, top-k, and the algorithm's logging in a
real Composer ``Trainer`` (pre-clip values, logging steps only)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradclip_algo.layer_norms import block_of, grad_norms_by_name, layer_norm_metrics, norm_metrics
from gradclip_algo.train.language_model import ByteTransformer


def _backward(model: ByteTransformer, seed: int = 0) -> None:
    tokens = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(seed))
    logits = model(tokens)
    nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()


@pytest.mark.parametrize(
    ("name", "block"),
    [
        ("net.layers.3.attn.qkv.weight", "net.layers.3"),
        ("module.0.weight", "module.0"),
        ("net.embed.weight", "net.embed"),
        ("bias", "bias"),
    ],
)
def test_block_of(name: str, block: str) -> None:
    assert block_of(name) == block


def test_norms_are_those_of_each_grad_and_blocks_add_up_squares() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(context_length=8, d_model=16, n_layers=2, n_heads=2)
    model.position.weight.requires_grad_(False)  # no grad: left out
    _backward(model)
    norms = grad_norms_by_name(model)
    expected = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    assert list(norms.names) == list(expected)
    assert "position.weight" not in norms.names
    assert norms.norms.tolist() == pytest.approx(list(expected.values()), rel=1e-6)
    blocks, block_norms = norms.blocks()
    assert blocks == ("embed", "layers.0", "layers.1", "norm", "head")
    layer0 = math.sqrt(sum(v**2 for n, v in expected.items() if n.startswith("layers.0.")))
    assert block_norms[1].item() == pytest.approx(layer0, rel=1e-6)


def test_metrics_name_the_top_k_and_every_block() -> None:
    torch.manual_seed(0)
    model = ByteTransformer(context_length=8, d_model=16, n_layers=2, n_heads=2)
    _backward(model)
    expected = {n: p.grad.norm().item() for n, p in model.named_parameters()}
    top = sorted(expected, key=expected.__getitem__, reverse=True)[:3]
    metrics = layer_norm_metrics(model, top_k=3)
    params = {k.removeprefix("l2_norm/grad/"): v for k, v in metrics.items() if k.startswith("l2_norm/grad/")}
    assert list(params) == top
    assert [params[n] for n in top] == pytest.approx([expected[n] for n in top], rel=1e-6)
    blocks = [k for k in metrics if k.startswith("l2_norm/grad_block/")]
    assert blocks == [
        f"l2_norm/grad_block/{b}" for b in ("embed", "position", "layers.0", "layers.1", "norm", "head")
    ]
    assert len(layer_norm_metrics(model.named_parameters(), top_k=None)) == len(expected) + 6


def test_a_nan_grad_ranks_first_and_no_grads_give_nothing() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    assert norm_metrics(grad_norms_by_name(model), 1) == {}
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    model[1].bias.grad[0] = math.nan
    metrics = layer_norm_metrics(model, top_k=1)
    assert next(iter(metrics)) == "l2_norm/grad/1.bias" and math.isnan(metrics["l2_norm/grad/1.bias"])
    assert metrics["l2_norm/grad_block/0"] == pytest.approx(math.sqrt(6.0))


@pytest.mark.composer
def test_the_algorithm_logs_pre_clip_layer_norms_on_logging_steps_only() -> None:
    pytest.importorskip("composer")
    from composer import Callback, Event, State, Trainer
    from composer.loggers import InMemoryLogger, Logger
    from torch.utils.data import DataLoader

    from gradclip_algo.algorithm import GradClipAlgo
    from gradclip_algo.train.lm_model import LanguageModel
    from gradclip_algo.train.text_data import ByteWindows

    class PreClipNorms(Callback):
        """Per-parameter norms at AFTER_BACKWARD (one microbatch: the whole batch, before clipping), and
        the algorithm's ``last_layer_norms`` object after each step."""

        def __init__(self, algorithm: GradClipAlgo) -> None:
            self.algorithm = algorithm
            self.norms: list[dict[str, float]] = []
            self.seen: list[int | None] = []

        def run_event(self, event: Event, state: State, logger: Logger) -> None:
            if event == Event.AFTER_BACKWARD:
                self.norms.append({n: p.grad.norm().item() for n, p in state.model.named_parameters()})
            elif event == Event.BATCH_END:
                layer = self.algorithm.last_layer_norms
                self.seen.append(None if layer is None else id(layer))

    torch.manual_seed(0)
    model = LanguageModel(context_length=8, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2)
    data = ByteWindows(torch.arange(400) % 251, context_length=8)
    clipping = GradClipAlgo("norm", 0.05, log_interval=2, log_layer_norms=2)  # clips every step
    spy = PreClipNorms(clipping)
    logged = InMemoryLogger()
    Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=4),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_duration="5ba",
        algorithms=[clipping],
        callbacks=[spy],
        loggers=[logged],
        progress_bar=False,
    ).fit()
    # logged at BATCH_END of batches 2 and 4 (Composer's numbering, as OptimizerMonitor's), measured before
    # clipping at the AFTER_TRAIN_BATCH of those batches (spy.norms[step - 1])
    prefix = "gradient_clipping/l2_norm/grad/"
    keys = [k for k in logged.data if k.startswith(prefix)]
    assert 2 <= len(keys) <= 4  # the top 2 of each logged step
    for key in keys:
        name = key.removeprefix(prefix)
        for timestamp, value in logged.data[key]:
            step = timestamp.batch.value
            assert step in (2, 4)
            assert value == pytest.approx(spy.norms[step - 1][name], rel=1e-5)  # before clipping
            assert value > 0.05  # clipping at 0.05 would have cut every norm to at most that
    for step in (2, 4):
        norms = spy.norms[step - 1]
        top = sorted(norms, key=norms.__getitem__, reverse=True)[:2]
        assert {
            k.removeprefix(prefix) for k in keys if step in [t.batch.value for t, _ in logged.data[k]]
        } == set(top)
    block_key = "gradient_clipping/l2_norm/grad_block/net.layers.1"
    assert [t.batch.value for t, _ in logged.data[block_key]] == [2, 4]
    layer1 = math.sqrt(sum(v**2 for n, v in spy.norms[3].items() if n.startswith("net.layers.1.")))
    assert logged.data[block_key][1][1] == pytest.approx(layer1, rel=1e-5)
    # batches 1, 3 and 5 log nothing and measure nothing: the object of the batch before is still there
    assert spy.seen[0] is None and spy.seen[2] == spy.seen[1] and spy.seen[4] == spy.seen[3]
    assert len({seen for seen in spy.seen if seen is not None}) == 2
    assert repr(clipping).endswith("log_interval=2, log_layer_norms=2)")


@pytest.mark.composer
def test_log_layer_norms_is_checked() -> None:
    pytest.importorskip("composer")
    from gradclip_algo.algorithm import GradClipAlgo

    with pytest.raises(ValueError, match="log_layer_norms: expected an integer >= 1, got 0"):
        GradClipAlgo("norm", 1.0, log_layer_norms=0)


@pytest.mark.composer
def test_log_layer_norms_from_an_algorithms_block() -> None:
    pytest.importorskip("composer")
    from gradclip_algo.config import build_algorithms

    block = {"gradclip_algo": {"clipping_type": "norm", "clipping_threshold": 1.0, "log_layer_norms": 3}}
    (algorithm,) = build_algorithms(block)
    assert algorithm.log_layer_norms == 3
    block["gradclip_algo"]["log_layer_norms"] = -1
    with pytest.raises(
        ValueError, match=r"algorithms.gradclip_algo: GradClipAlgo: log_layer_norms: expected an integer >= 1"
    ):
        build_algorithms(block)
