"""AutoClip: clip by norm at a percentile of the grad norms seen so far.

Seetharaman, Wichern, Pardo and Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
Networks" (arXiv 2007.14469).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.norm_history import check_history, empty_history, record_, recorded
from gradclip_algo.options import RuleOptions, option
from gradclip_algo.rules.norm import to_norm
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_in_interval, check_int

MAX_WINDOW = 1 << 24  # torch.nanquantile's largest input


@dataclass(frozen=True)
class QuantileOptions(RuleOptions):
    """``percentile``: p in (0, 100] (default 10, the paper's); ``window``: how many recent norms the
    percentile is taken over, 2 to 2^24 (default 1000)."""

    percentile: float = option(10.0, partial(check_in_interval, low=0.0, high=100.0, include_high=True))
    window: int = option(1000, partial(check_int, minimum=2, maximum=MAX_WINDOW))


def init(options: QuantileOptions, device: torch.device | str) -> dict[str, Tensor]:
    """The last ``window`` finite global norms and how many were recorded (see
    :mod:`~gradclip_algo.norm_history`)."""
    return empty_history(options.window, device)


def check_state(state: dict[str, Tensor], options: QuantileOptions) -> None:
    """``ValueError`` unless ``state`` is a history that :func:`update` can continue from."""
    check_history("state.rule", state)


def update(shards: Shards, max_norm: float, options: QuantileOptions, state: dict[str, Tensor]) -> ClipStats:
    """Clip by global L2 norm to ``τ_t = min(P_p(h_{t-w+1}, …, h_t), λ)``, with the coefficient
    ``min(1, τ_t / (‖G_t‖ + 1e-6))``.

    ``h_t = ‖G_t‖`` is this step's norm: as in the paper it enters the history *before* the percentile is
    taken, so a norm is clipped only when it exceeds the p-th percentile of the last ``window`` norms
    including itself. ``P_p`` interpolates linearly between order statistics (``numpy.percentile``'s
    default, as the paper's code uses). λ (``clipping_threshold``) is a ceiling on every step; ``inf``
    gives the paper's rule. The paper keeps the whole history; the window bounds memory and the sort, and
    lets the threshold follow the norm's drift over a long run. Non-finite norms are not recorded.
    """
    norm = shards.global_norm(2.0)
    record_(state, norm)
    norms = torch.where(recorded(state), state["norms"], math.nan)
    percentile_norm = torch.nanquantile(norms, options.percentile / 100.0)
    # NaN while no finite norm was ever recorded: then only the ceiling applies
    threshold = torch.nan_to_num(percentile_norm, nan=float("inf")).clamp(max=max_norm)
    return to_norm(norm, threshold)
