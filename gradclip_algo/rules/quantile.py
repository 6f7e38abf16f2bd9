"""AutoClip: clip by norm at a percentile of the grad norms seen so far.

Seetharaman, Wichern, Pardo and Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
Networks" (arXiv 2007.14469).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradclip_algo.distributed import Shards
from gradclip_algo.norm_history import empty_history, record_
from gradclip_algo.rules.threshold import clip_to_threshold_
from gradclip_algo.stats import ClipStats

QUANTILE_PERCENTILE = 10.0  # the paper's recommended p
QUANTILE_WINDOW = 1000


def init_quantile_state(
    device: torch.device | str, percentile: float = QUANTILE_PERCENTILE, window: int = QUANTILE_WINDOW
) -> dict[str, Tensor]:
    """The last ``window`` finite global norms (NaN where none yet) and how many were recorded."""
    return empty_history(window, device)


def quantile_clip(
    shards: Shards,
    max_norm: float,
    state: dict[str, Tensor],
    percentile: float = QUANTILE_PERCENTILE,
    window: int = QUANTILE_WINDOW,
) -> ClipStats:
    """Clip by global L2 norm to ``τ_t = min(P_p(h_{t-w+1}, …, h_t), λ)``.

    ``h_t = ‖G_t‖`` is this step's norm: as in the paper it enters the history *before* the percentile is
    taken, so the first step is never clipped and a norm is clipped only when it exceeds the p-th
    percentile of the last ``window`` norms including itself. ``P_p`` interpolates linearly between order
    statistics (``numpy.percentile``'s default, as the paper's code uses). λ (``clipping_threshold``) is a
    ceiling on every step; ``inf`` gives the paper's rule. The paper keeps the whole history; the window
    bounds memory and the sort, and lets the threshold follow the norm's drift over a long run. Non-finite
    norms are not recorded. Defaults: p = 10 (the paper's choice), window = 1000.
    """
    norm = shards.global_norm(2.0)
    record_(state, norm)
    percentile_norm = torch.nanquantile(state["norms"], percentile / 100.0)
    # NaN while no finite norm was ever recorded: then only the ceiling applies
    threshold = torch.nan_to_num(percentile_norm, nan=float("inf")).clamp(max=max_norm)
    return clip_to_threshold_(shards, norm, threshold)
