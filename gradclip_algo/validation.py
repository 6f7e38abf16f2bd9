"""Checks of user-given settings; every error names the field, the bad value and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor


def check_positive_number(field: str, value: Any, *, allow_inf: bool = False) -> float:
    """``value`` as a float if it is a real number > 0 (finite unless ``allow_inf``), else ``ValueError``."""
    allowed = "a number > 0" + ("" if allow_inf else " and finite")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected {allowed}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not number > 0 or (math.isinf(number) and not allow_inf):
        raise ValueError(f"{field}: expected {allowed}, got {value!r}")
    return number


def check_in_interval(
    field: str, value: Any, low: float, high: float, *, include_high: bool = False
) -> float:
    """``value`` as a float if ``low < value < high`` (``≤ high`` with ``include_high``), else ``ValueError``."""
    allowed = f"a number in ({low:g}, {high:g}{']' if include_high else ')'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected {allowed}, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not (low < number < high or (include_high and number == high)):
        raise ValueError(f"{field}: expected {allowed}, got {value!r}")
    return number


def check_int(field: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an integer in ``[minimum, maximum]`` (bools refused), else ``ValueError``."""
    too_large = maximum is not None and isinstance(value, int) and value > maximum
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_large:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{field}: expected an integer {bound}, got {value!r}")
    return value


def check_choice(field: str, value: Any, allowed: Collection[str]) -> str:
    """``value`` if it is one of ``allowed``, else ``ValueError`` listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{field}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_bool(field: str, value: Any) -> bool:
    """``value`` if it is a bool, else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}: expected true or false, got {value!r}")
    return value


def check_known_options(clipping_type: str, given: Collection[str], known: Collection[str]) -> None:
    """``TypeError`` naming any option that ``clipping_type`` does not take."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise TypeError(
            f"clipping_type={clipping_type!r} got unknown option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(sorted(known)) or 'none'}"
        )


def check_state_tensor(
    field: str, value: Any, dtype: torch.dtype, ndim: int, shape: tuple[int, ...] | None = None
) -> Tensor:
    """``value`` if it is a ``dtype`` tensor with ``ndim`` dims (and ``shape``, if given), else ``ValueError``."""
    want = f"a {dtype} tensor of shape {shape}" if shape is not None else f"a {ndim}-D {dtype} tensor"
    if not isinstance(value, Tensor):
        raise ValueError(f"{field}: expected {want}, got {value!r} ({type(value).__name__})")
    if value.dtype != dtype or value.ndim != ndim or (shape is not None and tuple(value.shape) != shape):
        raise ValueError(
            f"{field}: expected {want}, got a {value.dtype} tensor of shape {tuple(value.shape)}"
        )
    return value
