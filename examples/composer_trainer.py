"""A Composer ``Trainer`` with ``algorithms=[GradClipAlgo(...)]``, logging what clipping did.

python examples/composer_trainer.py [--steps N]
"""

from __future__ import annotations

import argparse

import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch.utils.data import DataLoader

from gradclip_algo import GradClipAlgo
from gradclip_algo.train.adding_problem import adding_problem
from gradclip_algo.train.model import AddingProblemModel


def main(steps: int = 300, batch_size: int = 64) -> InMemoryLogger:
    """Train for ``steps`` with AGC on every layer but the readout; return the logged metrics."""
    torch.manual_seed(0)
    data = adding_problem(steps * batch_size, sequence_length=10, generator=torch.Generator().manual_seed(0))
    clipping = GradClipAlgo("adaptive", 0.08, log_interval=max(1, steps // 5), exclude="net.readout.*")
    metrics = InMemoryLogger()
    model = AddingProblemModel(hidden_size=32, recurrent_init_gain=1.0)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=batch_size),
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
        max_duration=f"{steps}ba",
        algorithms=[clipping],
        loggers=[metrics],
        progress_bar=False,
    )
    trainer.fit()
    for timestamp, value in metrics.data["gradient_clipping/clipped_fraction"]:
        print(f"batch {timestamp.batch.value:4d}: {value:.0%} of the AGC units clipped")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
