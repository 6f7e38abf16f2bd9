"""Skipping the optimizer step when the global grad norm spikes (as OLMo-core's skip-step optimizers do).

With ``skip_spikes=k`` (any clipping type), a step whose global L2 grad norm ``n`` satisfies
``n > mean + k·std`` over the last ``spike_window`` recorded norms is skipped: every grad is set to
``None``, so ``optimizer.step()`` leaves weights and optimizer state untouched, and ``ClipStats.skipped``
is ``True``. The mean and the sample standard deviation (ddof 1) are those of the window *before* this
step; steps are judged once it holds at least ``max(2, spike_window // 2)`` norms. A non-finite norm is
always a spike. Every finite norm enters the window, skipped or not, so that a lasting rise of the norm
(a new learning-rate phase) is learnt instead of skipping every step from then on.

Setting grads to ``None`` is a host-side decision: this costs one host sync per step (and one pass over
the grads for the norm). The window is part of ``GradientClipper.state_dict()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.device_state import update_unless_
from gradclip_algo.norm_history import empty_history, mean_and_std, record_

SPIKE_WINDOW = 128  # OLMo-core's rolling interval; its sigma factor is 6


def init_spike_state(device: torch.device | str, window: int) -> dict[str, Tensor]:
    return empty_history(window, device)


def is_spike_(norm: Tensor, state: dict[str, Tensor], limit: float) -> Tensor:
    """Whether ``norm`` is a spike against the window (0-d bool tensor); then records ``norm`` in it."""
    mean, std, count = mean_and_std(state)
    judged = count >= max(2, state["norms"].numel() // 2)
    spike = (judged & (norm > mean + limit * std)) | ~torch.isfinite(norm)
    record_(state, norm)
    return spike


def judge_spike_(norm: Tensor, state: dict[str, Tensor], limit: float, skip: Tensor | None) -> Tensor:
    """:func:`is_spike_`, except that a step already skipped (the 0-d bool device flag ``skip``: its grads
    were non-finite) leaves the window as it was. No host sync."""
    return update_unless_(state, skip, lambda: is_spike_(norm, state, limit))
