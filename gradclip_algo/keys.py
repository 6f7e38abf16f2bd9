"""The keys of a ``GradClipAlgo`` entry: one schema for the constructor and for YAML / llm-foundry blocks
(the algorithm's own arguments, every rule's options and the options common to all rules), and the one-line
errors for an unknown or missing key. Needs neither Composer nor omegaconf."""

from __future__ import annotations

import difflib
from collections.abc import Collection
from typing import Any

from gradclip_algo.clipper import COMMON_OPTIONS
from gradclip_algo.rules import option_names

NAME = "GradClipAlgo"
ALGORITHM_KEYS = (
    "clipping_type",
    "clipping_threshold",
    "log_interval",
    "log_layer_norms",
    "fold_into_optimizer",
    "stats_every_step",
)
"""``GradClipAlgo``'s own arguments, in order."""
REQUIRED_KEYS = ("clipping_type", "clipping_threshold")


def allowed_fields() -> tuple[str, ...]:
    """Every key a ``gradclip_algo`` entry may hold: the algorithm's own arguments, every rule's
    options (clipping types added to ``RULES`` are covered) and the options common to all rules."""
    return (*ALGORITHM_KEYS, *sorted({*option_names(), *COMMON_OPTIONS}))


def required_fields() -> tuple[str, ...]:
    """The keys without a default: ``clipping_type`` and ``clipping_threshold``."""
    return REQUIRED_KEYS


class _Required:
    """The default of a required argument, so that a missing one gets a message of our own (llm-foundry
    calls ``GradClipAlgo(**cfg)``, and Python's own message names neither a near-miss key nor the class)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()
"""Default of ``clipping_type`` and ``clipping_threshold``: constructing without them raises ``TypeError``."""


def _closest(key: str, allowed: Collection[str]) -> str | None:
    matches = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return matches[0] if matches else None


def check_keys(given: Collection[str], missing: Collection[str]) -> None:
    """``TypeError`` naming an unknown key (with the closest allowed one) or a missing required key (with the
    unknown key that was probably meant for it); every allowed key is listed."""
    allowed = allowed_fields()
    listing = f"allowed keys: {', '.join(allowed)}"
    unknown = [str(key) for key in given if key not in allowed]
    for name in missing:
        near = [key for key in unknown if _closest(key, [name]) == name]
        if near:
            raise TypeError(
                f"{NAME}: missing required key {name!r}; got {near[0]!r}, which is not a key: did you mean "
                f"{name!r}? {listing}"
            )
    if missing:
        raise TypeError(f"{NAME}: missing required key(s) {', '.join(map(repr, missing))}; {listing}")
    if unknown:
        hints = []
        for key in unknown:
            closest = _closest(key, allowed)
            hints.append(f"{key!r}" + (f" (did you mean {closest!r}?)" if closest else ""))
        raise TypeError(f"{NAME}: unknown key(s) {', '.join(hints)}; {listing}")
