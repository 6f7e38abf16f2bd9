"""Typed, validated options of a clipping rule: a frozen dataclass whose fields check themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Check = Callable[[str, Any], Any]
"""``check(field_name, value) -> value``: the value, converted, or an error naming the field and value."""


def option(default: Any, check: Check) -> Any:
    """A field of a :class:`RuleOptions` dataclass with its default and its check."""
    return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True)
class RuleOptions:
    """Base of every rule's options. Each field is checked when the options are made, so a bad value
    raises before any grad is touched. ``stats_norm_type`` is the p of the norm the rule reports as
    ``ClipStats.grad_norm`` (2 unless the rule says otherwise)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            checked = field.metadata["check"](field.name, getattr(self, field.name))
            object.__setattr__(self, field.name, checked)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @property
    def stats_norm_type(self) -> float:
        return 2.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NoOptions(RuleOptions):
    """The options of a rule that takes none."""
