"""A Composer run stopped and resumed from its checkpoint ends with the same weights, bit for bit, as the
uninterrupted run: the clipping statistics travel in the checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.composer
pytest.importorskip("composer")

import torch  # noqa: E402
from composer import Trainer  # noqa: E402
from composer.loggers import InMemoryLogger  # noqa: E402
from composer.models import ComposerClassifier  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from gradclip_algo import GradClipAlgo  # noqa: E402

BATCH = 4
NUM_BATCHES = 12
STOP = 5  # the first run stops (and saves) after this many batches

CASES = {
    "zscore": ("zscore", math.inf, {"warmup_steps": 2}),
    "quantile": ("quantile", 5.0, {"percentile": 50, "window": 4}),
    "adagc+skip_spikes": ("adagc", 2.0, {"warmup_steps": 2, "skip_spikes": 1.5, "spike_window": 4}),
}


def make_model() -> ComposerClassifier:
    torch.manual_seed(0)
    return ComposerClassifier(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)), num_classes=3)


def make_loader() -> DataLoader:
    """Fixed batches; batches 6 and 9 are 30x larger (grad-norm spikes after the restart)."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(NUM_BATCHES, BATCH, 5, generator=gen)
    inputs[6] *= 30.0
    inputs[9] *= 30.0
    targets = torch.randint(0, 3, (NUM_BATCHES * BATCH,), generator=gen)
    return DataLoader(TensorDataset(inputs.reshape(-1, 5), targets), batch_size=BATCH, shuffle=False)


def train(case: str, batches: int, **trainer_args: Any) -> tuple[list[torch.Tensor], GradClipAlgo]:
    clipping_type, threshold, options = CASES[case]
    algorithm = GradClipAlgo(clipping_type, threshold, **options)
    model = make_model()
    trainer = Trainer(
        model=model,
        train_dataloader=make_loader(),
        max_duration=f"{batches}ba",
        optimizers=torch.optim.Adam(model.parameters(), lr=0.05),
        algorithms=[algorithm],
        progress_bar=False,
        log_to_console=False,
        device="cpu",
        seed=0,
        **trainer_args,
    )
    trainer.fit()
    weights = [p.detach().clone() for p in model.parameters()]
    trainer.close()
    return weights, algorithm


def stop_and_resume(case: str, folder: Path, **resume_args: Any) -> tuple[list[torch.Tensor], GradClipAlgo]:
    train(case, STOP, save_folder=str(folder), save_interval=f"{STOP}ba")
    checkpoint = folder / f"ep0-ba{STOP}-rank0.pt"
    assert checkpoint.exists(), sorted(p.name for p in folder.iterdir())
    return train(case, NUM_BATCHES, load_path=str(checkpoint), **resume_args)


@pytest.mark.filterwarnings("ignore:InMemoryLogger is not in the state_dict")
@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_ends_bitwise_equal(case: str, tmp_path: Path) -> None:
    uninterrupted, straight = train(case, NUM_BATCHES)
    logged = InMemoryLogger()
    resumed, restarted = stop_and_resume(case, tmp_path, loggers=[logged])
    after_restart = [value for _, value in logged.data["gradient_clipping/clipped_fraction"]]
    assert len(after_restart) == NUM_BATCHES - STOP and sum(v > 0 for v in after_restart) >= 2
    for got, want in zip(resumed, uninterrupted, strict=True):
        assert torch.equal(got, want)
    for part, state in straight.clipper.state_dict().items():
        for key, value in state.items():
            assert torch.equal(restarted.clipper.state_dict()[part][key].nan_to_num(), value.nan_to_num())


def test_the_statistics_matter_resuming_without_them_diverges(tmp_path: Path) -> None:
    """The same restart with the algorithm's state left out of the load ends elsewhere."""
    uninterrupted, _ = train("zscore", NUM_BATCHES)
    resumed, restarted = stop_and_resume("zscore", tmp_path, load_ignore_keys=["state/algorithms"])
    assert any(not torch.equal(got, want) for got, want in zip(resumed, uninterrupted, strict=True))
    assert restarted.clipper.state_dict()["rule"]["step"].item() == NUM_BATCHES - STOP
