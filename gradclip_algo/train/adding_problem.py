"""The adding problem and a vanilla tanh RNN for it (torch only).

Hochreiter and Schmidhuber (1997) posed it; Pascanu, Mikolov and Bengio (2013, "On the difficulty of
training recurrent neural networks") used it to show exploding gradients and clipping by norm.

A sample is a sequence of ``T`` pairs ``(v_t, m_t)`` with ``v_t ~ U[0, 1]`` and markers ``m_t ∈ {0, 1}``:
exactly two are 1, one in the first half of the sequence and one in the second. The target is
``y = Σ_t v_t · m_t``, the sum of the two marked values. ``y`` has mean 1 and variance ``2 · 1/12 = 1/6``, so
always predicting 1 scores an MSE of 1/6 ≈ 0.167: a model below that has learned to add.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

MEAN_PREDICTOR_MSE = 1.0 / 6.0
"""MSE of always predicting the target's mean (1): the variance of a sum of two U[0, 1] values."""

INPUT_SIZE = 2  # (value, marker)


def adding_problem(num_samples: int, sequence_length: int, generator: torch.Generator) -> TensorDataset:
    """``num_samples`` sequences of shape ``(sequence_length, 2)`` and their targets of shape ``(1,)``.

    One marker is drawn uniformly from the first ``sequence_length // 2`` positions, the other from the
    rest; the draws come from ``generator``, so equal seeds give equal data.
    """
    if sequence_length < 2:
        raise ValueError(f"sequence_length: expected an integer >= 2, got {sequence_length!r}")
    half = sequence_length // 2
    values = torch.rand(num_samples, sequence_length, generator=generator)
    first = torch.randint(0, half, (num_samples,), generator=generator)
    second = torch.randint(half, sequence_length, (num_samples,), generator=generator)
    markers = torch.zeros(num_samples, sequence_length)
    rows = torch.arange(num_samples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values * markers).sum(dim=1, keepdim=True)
    return TensorDataset(torch.stack([values, markers], dim=-1), targets)


def train_and_eval_sets(
    train_samples: int, eval_samples: int, sequence_length: int, seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """Disjoint draws of one generator seeded with ``seed``: the training set, then the evaluation set."""
    generator = torch.Generator().manual_seed(seed)
    train = adding_problem(train_samples, sequence_length, generator)
    return train, adding_problem(eval_samples, sequence_length, generator)


class AddingRNN(nn.Module):
    """``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``, ``h_0 = 0``; prediction ``ŷ = w · h_T + b``.

    ``W_hh`` starts orthogonal times ``recurrent_init_gain``, so its spectral radius is that gain: above 1
    the linearised recurrence amplifies, the regime where gradients explode (Pascanu et al. 2013, sec. 2).
    """

    def __init__(self, hidden_size: int, recurrent_init_gain: float = 1.0) -> None:
        super().__init__()
        self.rnn = nn.RNN(INPUT_SIZE, hidden_size, nonlinearity="tanh", batch_first=True)
        self.readout = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=recurrent_init_gain)

    def forward(self, inputs: Tensor) -> Tensor:
        """``(batch, T, 2)`` sequences -> ``(batch, 1)`` predictions from the last hidden state."""
        hidden, _ = self.rnn(inputs)
        return self.readout(hidden[:, -1])
