"""``apply_gradient_clipping``: the one call between ``loss.backward()`` and ``optimizer.step()``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Literal

from torch.optim import Optimizer

from gradclip_algo.clipper import GradientClipper
from gradclip_algo.parameters import Parameters
from gradclip_algo.stats import ClipStats


def apply_gradient_clipping(
    parameters: Parameters,
    clipping_type: str,
    clipping_threshold: float,
    *,
    with_stats: bool | Literal["clipped"] = True,
    fold_into: Optimizer | Sequence[Optimizer] | None = None,
    **options: Any,
) -> ClipStats | None:
    """Clip the gradients of ``parameters`` in place; call it between ``backward()`` and ``step()``.

    Args:
        parameters: an ``nn.Module``, one tensor, an iterable of tensors, or ``(name, tensor)`` pairs
            such as ``model.named_parameters()``. Grads that are ``None`` are skipped.
        clipping_type: ``'norm'``, ``'value'`` or ``'adaptive'`` (the stateful types need a
            :class:`~gradclip_algo.GradientClipper` kept across steps).
        clipping_threshold: λ > 0: the max norm, the max absolute value, or AGC's clipping factor.
        **options: ``norm_type`` (norm; p > 0 or inf, default 2), ``eps`` (adaptive; weight-norm floor,
            default 1e-3), ``exclude`` (glob patterns on parameter names and/or predicates
            ``(name, param) -> bool``; needs names), ``nonfinite`` (one of ``NONFINITE_MODES``,
            default ``'propagate'``), ``error_if_nonfinite`` (as in torch: same as ``nonfinite='error'``),
            ``process_group`` (the group of pipeline stages the parameters are split across; see
            :class:`~gradclip_algo.GradientClipper`).

        with_stats: ``False`` returns ``None`` and skips the statistics where they cost extra passes
            ('value' needs two norms and a count besides its clamp; 'norm' and 'adaptive' get theirs
            from the clipping itself). A step that ``nonfinite='skip'`` skips still returns its
            ``ClipStats``. ``'clipped'``: only whether anything was clipped, where that is cheaper ('value':
            ``clipped_fraction`` 1.0 or 0.0, NaN norms; see :meth:`GradientClipper.__call__`).
        fold_into: the optimizer (or optimizers) that steps these parameters next. Where it is one of
            torch's fused optimizers (``fused=True``) and steps exactly the clipped parameters, ``'norm'``
            hands its factor to that ``step()`` as ``grad_scale`` instead of rescaling the grads, and a
            ``nonfinite='skip'`` skip becomes its ``found_inf`` (no host sync); ``.grad`` then holds the
            unclipped grads until ``step()``. Otherwise the grads are rescaled, with a warning (see
            :mod:`gradclip_algo.folding`).

    Returns:
        :class:`ClipStats` with 0-d device tensors. No host sync happens unless ``nonfinite`` is
        ``'error'`` or ``'skip'`` (one sync each call to decide; none for a folded skip).

    Plain arguments (strings, numbers, booleans, ``None``; no ``exclude`` or ``fold_into``) are validated
    once: a later call with equal arguments of the same types reuses that set-up (it holds no statistics),
    and gives the same warnings as a first call.

    Raises:
        TypeError, ValueError: for a bad argument, naming it, its value and what is allowed, before any
            grad changes.
    """
    key = _plain_key(clipping_type, clipping_threshold, options) if fold_into is None else None
    if key is not None:
        clipper = _clipper_of(key)
        clipper._warned.clear()  # its once-per-clipper warnings come at every call, as from a new clipper
    else:
        clipper = GradientClipper(clipping_type, clipping_threshold, fold_into=fold_into, **options)
    if clipper.stateful:
        raise ValueError(
            f"clipping_type={clipping_type!r} with these options keeps statistics across steps, which a "
            f"single call cannot: create clipper = GradientClipper({clipping_type!r}, ...) once and call "
            "clipper(model) every step"
        )
    return clipper(parameters, with_stats=with_stats)


PLAIN = (str, int, float, bool, type(None))
"""The argument types whose clipper :func:`apply_gradient_clipping` keeps for the next call with equal
arguments: immutable values. A clipper holds no statistics there, so a kept one clips as a new one would."""


def _plain_key(clipping_type: Any, threshold: Any, options: dict[str, Any]) -> tuple[Any, ...] | None:
    """The arguments as a key, each value with its type (``1`` and ``True`` differ), or ``None`` where one
    is not :data:`PLAIN` or ``exclude`` is set (an exclusion remembers which patterns matched)."""
    if "exclude" in options or type(clipping_type) not in PLAIN or type(threshold) not in PLAIN:
        return None
    key: list[Any] = [clipping_type, type(threshold), threshold]
    for name in sorted(options):
        value = options[name]
        if type(value) not in PLAIN:
            return None
        key += (name, type(value), value)
    return tuple(key)


@functools.lru_cache(maxsize=64)
def _clipper_of(key: tuple[Any, ...]) -> GradientClipper:
    """The clipper of a :func:`_plain_key`, built (and validated) once."""
    clipping_type, _, threshold = key[:3]
    options = {key[i]: key[i + 2] for i in range(3, len(key), 3)}
    return GradientClipper(clipping_type, threshold, **options)
