"""The byte-level transformer as a Composer model: next-byte cross-entropy for training and evaluation."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy
from composer.models import ComposerModel
from torch import Tensor
from torchmetrics import Metric

from gradclip_algo.train.language_model import ByteTransformer
from gradclip_algo.train.text_data import VOCAB_SIZE

Batch = tuple[Tensor, Tensor]
EVAL_METRIC = "LanguageCrossEntropy"


class LanguageModel(ComposerModel):
    """:class:`~gradclip_algo.train.language_model.ByteTransformer` with the mean next-byte cross-entropy
    (nats per byte) as its loss; evaluation reports ``LanguageCrossEntropy`` over the evaluation set."""

    def __init__(
        self, context_length: int, d_model: int, n_layers: int, n_heads: int, mlp_ratio: int
    ) -> None:
        super().__init__()
        self.net = ByteTransformer(context_length, d_model, n_layers, n_heads, mlp_ratio)
        self.eval_loss = LanguageCrossEntropy()

    def forward(self, batch: Batch) -> Tensor:
        tokens, _ = batch
        return self.net(tokens)

    def loss(self, outputs: Tensor, batch: Batch, *args: Any, **kwargs: Any) -> Tensor:
        _, targets = batch
        return F.cross_entropy(outputs.reshape(-1, VOCAB_SIZE), targets.reshape(-1))

    def eval_forward(self, batch: Batch, outputs: Tensor | None = None) -> Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else {EVAL_METRIC: self.eval_loss}

    def update_metric(self, batch: Batch, outputs: Tensor, metric: Metric) -> None:
        _, targets = batch
        metric.update(outputs, targets)
