"""A plain PyTorch loop with the functional API: Adam, lr 1e-3, gradient clipping at 2.0.

    python examples/plain_pytorch.py [--steps N]

Trains the vanilla tanh RNN on the adding problem and prints what clipping did every few steps.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from torch import nn
from torch.utils.data import DataLoader

from gradclip_algo import apply_gradient_clipping
from gradclip_algo.train.adding_problem import AddingRNN, adding_problem


def main(steps: int = 300, batch_size: int = 64) -> float:
    """Train for ``steps``; return the largest grad norm the optimizer was given (≤ 2.0 by construction)."""
    torch.manual_seed(0)
    data = adding_problem(steps * batch_size, sequence_length=10, generator=torch.Generator().manual_seed(0))
    model = AddingRNN(hidden_size=32, recurrent_init_gain=1.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    largest = 0.0
    for step, (inputs, targets) in enumerate(itertools.islice(DataLoader(data, batch_size), steps), start=1):
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        stats = apply_gradient_clipping(model.parameters(), clipping_type="norm", clipping_threshold=2.0)
        optimizer.step()
        largest = max(largest, stats.clipped_grad_norm.item())  # .item() syncs: fine once a step on CPU
        if step % max(1, steps // 5) == 0:
            print(
                f"step {step:4d}  loss {loss.item():.4f}  grad norm {stats.grad_norm.item():8.3f} "
                f"-> {stats.clipped_grad_norm.item():.3f}  clipped {stats.clipped_fraction.item() > 0}"
            )
    print(f"largest grad norm given to the optimizer: {largest:.4f} (threshold 2.0)")
    return largest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
