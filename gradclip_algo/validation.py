"""Checks of user-given settings; every error names the field, the bad value and what is allowed."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

SHOWN_CHARS = 80
"""The longest a value's ``repr`` gets in an error message before it is cut."""


def shown(value: Any) -> str:
    """A value as an error message shows it: a tensor by dtype, shape and device, an optimizer or a module
    by its class, anything else by its ``repr`` (cut after ``SHOWN_CHARS`` characters), with its type."""
    kind = type(value).__name__
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if isinstance(value, (torch.optim.Optimizer, torch.nn.Module)):
        return f"a {kind}"
    text = repr(value)
    if len(text) > SHOWN_CHARS:
        text = text[: SHOWN_CHARS - 3] + "..."
    return f"{text} ({kind})"


def _real(field: str, value: Any, allowed: str) -> float:
    """``value`` as a float if it is a real number: a Python or NumPy int or float, or a 0-d real tensor on
    the CPU (reading one on another device would wait for it: the error says so). Else ``ValueError``
    naming what it is."""
    if isinstance(value, Tensor):
        return _real_tensor(field, value, allowed)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{field}: expected {allowed}, got {shown(value)}")
    return float(value)


def _real_tensor(field: str, value: Tensor, allowed: str) -> float:
    what = shown(value)
    if value.ndim != 0:
        raise ValueError(f"{field}: expected {allowed}; a tensor must be 0-d, got {what}")
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{field}: expected {allowed}; got {what}, which is not a real number")
    if value.is_meta:
        raise ValueError(f"{field}: expected {allowed}; got {what}, which holds no value")
    if value.device.type != "cpu":
        raise ValueError(
            f"{field}: expected {allowed}; got {what}, whose value cannot be read without waiting for the "
            "device: pass a Python number, or the tensor on the CPU"
        )
    return float(value)


def check_positive_number(field: str, value: Any, *, allow_inf: bool = False) -> float:
    """``value`` as a float if it is a real number > 0 (finite unless ``allow_inf``), else ``ValueError``.

    Real numbers: Python and NumPy ints and floats, and 0-d real tensors on the CPU."""
    allowed = "a number > 0" + ("" if allow_inf else " and finite")
    number = _real(field, value, allowed)
    if not number > 0 or (math.isinf(number) and not allow_inf):
        raise ValueError(f"{field}: expected {allowed}, got {_shown(value, number)}")
    return number


def check_in_interval(
    field: str, value: Any, low: float, high: float, *, include_high: bool = False
) -> float:
    """``value`` as a float if ``low < value < high`` (``≤ high`` with ``include_high``), else ``ValueError``;
    real numbers as for :func:`check_positive_number`."""
    allowed = f"a number in ({low:g}, {high:g}{']' if include_high else ')'}"
    number = _real(field, value, allowed)
    if not (low < number < high or (include_high and number == high)):
        raise ValueError(f"{field}: expected {allowed}, got {_shown(value, number)}")
    return number


def _shown(value: Any, number: float) -> str:
    """A value in an error: as written for Python numbers, else its number and its type."""
    if isinstance(value, (int, float)):
        return repr(value)
    return f"{number!r} (a {type(value).__name__})"


def check_int(field: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer (Python or NumPy; bools refused) in ``[minimum, maximum]``,
    else ``ValueError``."""
    integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    too_large = maximum is not None and integral and value > maximum
    if not integral or value < minimum or too_large:
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{field}: expected an integer {bound}, got {value!r}")
    return int(value)


BATCHES = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*ba\s*$", re.IGNORECASE)
"""A Composer time string in batches: ``'10ba'``, ``'1e3ba'``."""
TIME_STRING = re.compile(r"^\s*[0-9.e+-]+\s*(ep|sp|tok|dur|iter|sec)\s*$", re.IGNORECASE)
"""A Composer time string in another unit (epochs, samples, tokens, a share of the run, ...)."""


def check_batches(field: str, value: Any, minimum: int) -> int:
    """A count of batches (optimizer steps) as an int: an integer, or a Composer time string in batches
    such as ``'10ba'``, at least ``minimum``; else ``ValueError`` (for ``'1ep'`` and other units: only
    batches are allowed)."""
    allowed = f"an integer >= {minimum} or a count of batches such as '10ba'"
    if isinstance(value, str):
        match = BATCHES.match(value)
        if match is None and TIME_STRING.match(value):
            raise ValueError(
                f"{field}: only batches are allowed here (it counts optimizer steps): expected {allowed}, "
                f"got {value!r}"
            )
        number = float(match[1]) if match else math.nan
        if not number.is_integer() or number < minimum:
            raise ValueError(f"{field}: expected {allowed}, got {value!r}")
        return int(number)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{field}: expected {allowed}, got {value!r}")
    return int(value)


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
