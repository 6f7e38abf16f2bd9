"""The clipping rules, one module each, and the registry that maps ``clipping_type`` to a rule.

A rule takes the local grads (:class:`~gradclip_algo.distributed.Shards`, whose sums it reduces over
ranks through the ``Shards`` methods), the threshold λ and its options (a
:class:`~gradclip_algo.options.RuleOptions` dataclass) and returns :class:`~gradclip_algo.stats.ClipStats`.
A rule that clips by one factor for every grad (norm, quantile, zscore) returns that factor as
``ClipStats.coefficient`` and leaves the grads to its caller, which multiplies them or folds the factor into
the optimizer's step (:mod:`gradclip_algo.folding`); the others clip the grads in place. The two forms:

- a stateless rule is one function, ``clip(shards, λ, options)``;
- a stateful rule is ``init(options, device) -> state`` and ``update(shards, λ, options, state)``, its
  state a dict of tensors that ``update`` changes in place, with ``check_state(state, options)`` to
  validate a loaded one.

What ``clipping_threshold`` (λ) means per type: the max global norm (norm), the max absolute value (value),
AGC's clipping factor (adaptive); for the statistics-driven types it is the absolute global-norm threshold
of their papers, and may be ``inf``: a ceiling on every step that the statistics can only lower
(quantile, zscore; the only limit during zscore's warm-up), or λ_abs of adagc's warm-up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from gradclip_algo.distributed import Shards
from gradclip_algo.options import NoOptions, RuleOptions
from gradclip_algo.rules import adagc, quantile, zscore
from gradclip_algo.rules.adaptive import AdaptiveOptions, adaptive_clip
from gradclip_algo.rules.norm import NormOptions, clip_by_norm
from gradclip_algo.rules.value import clamp_grads_, clamp_grads_flagging_, clip_by_value
from gradclip_algo.stats import ClipStats

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """A clipping rule: ``clip`` for a stateless one, ``init``/``update``/``check_state`` for a stateful one.

    ``clip_without_stats``: what a rule whose statistics cost extra passes does when none are asked for;
    ``clip_flagging``: the same, returning only whether it clipped anything (a 0-d bool device tensor).
    ``one_factor``: the rule clips by one factor for every grad, returned as ``ClipStats.coefficient``.
    """

    options: type[RuleOptions]
    clip: Callable[[Shards, float, Any], ClipStats] | None = None
    init: Callable[[Any, torch.device | str], State] | None = None
    update: Callable[[Shards, float, Any, State], ClipStats] | None = None
    check_state: Callable[[State, Any], None] | None = None
    threshold_may_be_inf: bool = False
    clip_without_stats: Callable[[Shards, float], None] | None = None
    clip_flagging: Callable[[Shards, float], torch.Tensor] | None = None
    one_factor: bool = False

    @classmethod
    def stateful(cls, module: ModuleType, options: type[RuleOptions], one_factor: bool = False) -> Rule:
        """The rule of a module defining ``init``, ``update`` and ``check_state``; λ may be ``inf``."""
        return cls(
            options,
            init=module.init,
            update=module.update,
            check_state=module.check_state,
            threshold_may_be_inf=True,
            one_factor=one_factor,
        )


RULES: Mapping[str, Rule] = {
    "norm": Rule(NormOptions, clip=clip_by_norm, one_factor=True),
    "value": Rule(
        NoOptions, clip=clip_by_value, clip_without_stats=clamp_grads_, clip_flagging=clamp_grads_flagging_
    ),
    "adaptive": Rule(AdaptiveOptions, clip=adaptive_clip),
    "quantile": Rule.stateful(quantile, quantile.QuantileOptions, one_factor=True),
    "zscore": Rule.stateful(zscore, zscore.ZScoreOptions, one_factor=True),
    "adagc": Rule.stateful(adagc, adagc.AdaGCOptions),
}
CLIPPING_TYPES = tuple(RULES)


def option_names() -> tuple[str, ...]:
    """Every rule's option names, each once, sorted."""
    return tuple(sorted({name for rule in RULES.values() for name in rule.options.names()}))
