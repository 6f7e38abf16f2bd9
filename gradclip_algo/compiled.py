"""Kernels compiled by ``torch.compile`` (Inductor: C++/OpenMP on CPU, Triton on CUDA), and where they run.

A kernel of :mod:`gradclip_algo.kernels` is a plain torch function over tensors. :func:`run` calls its
compiled form where compiled kernels are on for the tensors' device, and otherwise the eager form the caller
gives. The eager form runs when:

- compiled kernels are off: ``GRADCLIP_ALGO_COMPILE=0`` in the environment, or
  ``set_compiled_kernels(False)``;
- they are not on for the device: by default they run on CPU only; ``GRADCLIP_ALGO_COMPILE=cuda`` or
  ``set_compiled_kernels(True, cuda=True)`` adds CUDA; no other device (MPS, XPU, ...) gets them;
- torch.compile is disabled (``TORCHDYNAMO_DISABLE=1``), or the call runs inside the caller's own compiled
  region (``torch.compiler.is_compiling()``): the caller's compiler then traces the eager code;
- the kernel failed to compile once (no working C++ compiler, no Triton, torch's limit of graphs per
  function reached, ...): the first failure warns, and that kernel runs eagerly in this process from then
  on.

Sizes are dynamic (``torch.compile(dynamic=True)``): a kernel compiles once per dtype and device type (on
CPU once more for little work, on one thread), and a new tensor size does not recompile it. Callers pass
dims of at least 2 (torch specialises sizes 0 and 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch

from gradclip_algo.caller import warn_at_caller

ENV_VAR = "GRADCLIP_ALGO_COMPILE"
SETTINGS = {"0": (), "1": ("cpu",), "cuda": ("cpu", "cuda")}
"""``GRADCLIP_ALGO_COMPILE`` values and the device types they compile kernels for (unset: ``1``)."""

Result = TypeVar("Result")


def _from_environment() -> tuple[str, ...]:
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in SETTINGS:
        warn_at_caller(
            f"{ENV_VAR}: expected one of {', '.join(SETTINGS)}, got {value!r}; compiled kernels stay on "
            "for the CPU (the default)"
        )
        return SETTINGS["1"]
    return SETTINGS[value]


_devices = _from_environment()
_compiled: dict[tuple[Callable[..., object], bool], Callable[..., object]] = {}
"""The compiled form of each kernel, parallel (``False``) or on one thread (``True``)."""
_failed: set[Callable[..., object]] = set()


def set_compiled_kernels(enabled: bool, *, cuda: bool = False) -> None:
    """Turn the compiled kernels on (for the CPU, and for CUDA too with ``cuda=True``) or off, for this
    process; the environment variable ``GRADCLIP_ALGO_COMPILE`` (``0``, ``1`` or ``cuda``) sets the default.
    Off, every primitive runs its eager form: the same results, no compile time."""
    global _devices
    if not isinstance(enabled, bool) or not isinstance(cuda, bool):
        raise ValueError(f"set_compiled_kernels: expected true or false, got {enabled!r}, cuda={cuda!r}")
    _devices = (("cpu", "cuda") if cuda else ("cpu",)) if enabled else ()


def compiled_kernel_devices() -> tuple[str, ...]:
    """The device types that compiled kernels run on now (empty: off)."""
    return _devices


def _compiles(kernel: Callable[..., object], device: torch.device) -> bool:
    if device.type not in _devices or kernel in _failed or torch.compiler.is_compiling():
        return False
    return not torch._dynamo.config.disable


def run(
    kernel: Callable[..., Result],
    eager: Callable[..., Result],
    device: torch.device,
    *args: object,
    parallel: bool = True,
) -> Result:
    """``kernel(*args)`` compiled, where compiled kernels run on ``device`` (the tensors' device), else
    ``eager(*args)`` (which must compute the same). A compilation that fails warns once and runs ``eager``.

    ``parallel=False``: on CPU, the kernel compiled to run on one thread (a second graph): for little work,
    where waking a second thread costs more than it saves, and much more on a busy machine.
    """
    if not _compiles(kernel, device):
        return eager(*args)
    serial = not parallel and device.type == "cpu"
    compiled = _compiled.get((kernel, serial))
    if compiled is None:
        options = {"cpp.threads": 1} if serial else None
        compiled = torch.compile(kernel, dynamic=True, fullgraph=True, options=options)
        _compiled[(kernel, serial)] = compiled
    try:
        return compiled(*args)  # type: ignore[return-value]
    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.FailOnRecompileLimitHit) as error:
        _failed.add(kernel)
        reason = str(error).strip().splitlines()[0]
        warn_at_caller(
            f"gradclip_algo: the compiled kernel {kernel.__name__} failed to compile ({reason}); it runs "
            f"eagerly from now on (slower, same results). {ENV_VAR}=0 turns compiled kernels off."
        )
        return eager(*args)
