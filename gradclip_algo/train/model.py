"""The adding-problem RNN as a Composer model: MSE loss for training, an MSE metric for evaluation."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from composer.models import ComposerModel
from torch import Tensor
from torchmetrics import MeanSquaredError, Metric

from gradclip_algo.train.adding_problem import AddingRNN

Batch = tuple[Tensor, Tensor]


class AddingProblemModel(ComposerModel):
    """:class:`~gradclip_algo.train.adding_problem.AddingRNN` with ``loss = mean((ŷ - y)²)``.

    Evaluation reports ``MeanSquaredError`` over the whole evaluation set.
    """

    def __init__(self, hidden_size: int, recurrent_init_gain: float) -> None:
        super().__init__()
        self.net = AddingRNN(hidden_size, recurrent_init_gain)
        self.eval_mse = MeanSquaredError()

    def forward(self, batch: Batch) -> Tensor:
        inputs, _ = batch
        return self.net(inputs)

    def loss(self, outputs: Tensor, batch: Batch, *args: Any, **kwargs: Any) -> Tensor:
        _, targets = batch
        return F.mse_loss(outputs, targets)

    def eval_forward(self, batch: Batch, outputs: Tensor | None = None) -> Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else {"MeanSquaredError": self.eval_mse}

    def update_metric(self, batch: Batch, outputs: Tensor, metric: Metric) -> None:
        _, targets = batch
        metric.update(outputs, targets)
