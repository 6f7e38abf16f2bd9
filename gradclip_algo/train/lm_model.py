"""The byte-level transformer as a Composer model: next-byte cross-entropy for training and evaluation, and
the mean log-partition of the output logits for evaluation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy
from composer.models import ComposerModel
from torch import Tensor
from torchmetrics import Metric

from gradclip_algo.train.language_model import ByteTransformer
from gradclip_algo.train.text_data import VOCAB_SIZE

Batch = tuple[Tensor, Tensor]
EVAL_METRIC = "LanguageCrossEntropy"
LOG_PARTITION_METRIC = "OutputLogPartition"


class OutputLogPartition(Metric):
    """The mean over positions of ``log Z = logsumexp_v z_v``, ``z`` the output logits of a position.

    ``log Z`` is the offset between the logits and the log-probabilities (``z_v - log p_v = log Z`` for every
    byte ``v``): the cross-entropy does not depend on it, so nothing in the loss holds it in place. It is what
    z-loss (``1e-4 · (log Z)²``) pulls to 0; its drift is the output-logit divergence of Wortsman et al.
    (2023, arXiv 2309.14322).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        log_partition = torch.logsumexp(outputs.detach().to(torch.float64), dim=-1)
        self.total += log_partition.sum()
        self.count += log_partition.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class LanguageModel(ComposerModel):
    """:class:`~gradclip_algo.train.language_model.ByteTransformer` with the mean next-byte cross-entropy
    (nats per byte) as its loss; evaluation reports ``LanguageCrossEntropy`` and ``OutputLogPartition``
    over the evaluation set."""

    def __init__(
        self, context_length: int, d_model: int, n_layers: int, n_heads: int, mlp_ratio: int
    ) -> None:
        super().__init__()
        self.net = ByteTransformer(context_length, d_model, n_layers, n_heads, mlp_ratio)
        self.eval_loss = LanguageCrossEntropy()
        self.eval_log_partition = OutputLogPartition()

    def forward(self, batch: Batch) -> Tensor:
        tokens, _ = batch
        return self.net(tokens)

    def loss(self, outputs: Tensor, batch: Batch, *args: Any, **kwargs: Any) -> Tensor:
        _, targets = batch
        return F.cross_entropy(outputs.reshape(-1, VOCAB_SIZE), targets.reshape(-1))

    def eval_forward(self, batch: Batch, outputs: Tensor | None = None) -> Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            return {}
        return {EVAL_METRIC: self.eval_loss, LOG_PARTITION_METRIC: self.eval_log_partition}

    def update_metric(self, batch: Batch, outputs: Tensor, metric: Metric) -> None:
        _, targets = batch
        metric.update(outputs, targets)
