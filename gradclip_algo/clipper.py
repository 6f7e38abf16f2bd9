"""``GradientClipper``: a validated clipping set-up, with the statistics of stateful rules."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradclip_algo.distributed import Shards, check_process_group, local_shards
from gradclip_algo.nonfinite import NONFINITE_MODES, nonfinite_error, nonfinite_on_any_rank, zero_nonfinite_
from gradclip_algo.parameters import Parameters, exclusion_filter, named_parameters, params_with_grads
from gradclip_algo.rules import CLIPPING_TYPES, RULES
from gradclip_algo.spikes import (
    SPIKE_WINDOW,
    check_spike_limit,
    check_spike_window,
    init_spike_state,
    is_spike_,
)
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_bool, check_choice, check_known_options, check_positive_number

COMMON_OPTIONS = (
    "exclude",
    "nonfinite",
    "error_if_nonfinite",
    "skip_spikes",
    "spike_window",
    "process_group",
)


class GradientClipper:
    """Validate a clipping set-up once, then call it every step between ``backward()`` and ``step()``.

    ``GradientClipper(clipping_type, clipping_threshold, **options)`` takes the arguments of
    :func:`~gradclip_algo.apply_gradient_clipping`; every bad value raises here, naming the field, the value
    and what is allowed. Stateful rules keep their statistics (tensors on the grads' device) in the
    clipper; ``state_dict()`` / ``load_state_dict()`` carry them through checkpoints.

    ``skip_spikes=k`` (any type; default ``None``: off) skips the step when the global grad norm exceeds
    the mean of the last ``spike_window`` (default 128) norms by more than k standard deviations: every
    grad becomes ``None`` and ``ClipStats.skipped`` is ``True`` (see :mod:`gradclip_algo.spikes`; one host
    sync per step).

    ``process_group`` (Python only; default ``None``): the group of ranks across which the model's
    parameters are split into pipeline stages; norms, statistics and skip decisions are then global
    across the stages (see :mod:`gradclip_algo.distributed`).
    """

    def __init__(self, clipping_type: str, clipping_threshold: float, **options: Any) -> None:
        check_choice("clipping_type", clipping_type, CLIPPING_TYPES)
        self.clipping_type = clipping_type
        self.rule = RULES[clipping_type]
        self.clipping_threshold = check_positive_number(
            "clipping_threshold", clipping_threshold, allow_inf=self.rule.threshold_may_be_inf
        )
        check_known_options(clipping_type, options, (*self.rule.options, *COMMON_OPTIONS))
        self.rule_options = {
            name: validate(name, options.get(name, default))
            for name, (default, validate) in self.rule.options.items()
        }
        nonfinite = check_choice("nonfinite", options.get("nonfinite", "propagate"), NONFINITE_MODES)
        if check_bool("error_if_nonfinite", options.get("error_if_nonfinite", False)):
            if nonfinite not in ("propagate", "error"):
                raise ValueError(f"error_if_nonfinite: True contradicts nonfinite={nonfinite!r}; give one")
            nonfinite = "error"
        self.nonfinite = nonfinite
        self.exclude = options.get("exclude")
        exclusion_filter(self.exclude)  # validates the patterns
        self.skip_spikes = check_spike_limit("skip_spikes", options.get("skip_spikes"))
        self.spike_window = check_spike_window("spike_window", options.get("spike_window", SPIKE_WINDOW))
        self.process_group = check_process_group("process_group", options.get("process_group"))
        self.state: dict[str, Any] | None = None
        self.spike_state: dict[str, Any] | None = None

    @torch.no_grad()
    def __call__(self, parameters: Parameters, with_stats: bool = True) -> ClipStats | None:
        """Clip the grads of ``parameters`` in place and return what was done.

        ``with_stats=False`` returns ``None`` and skips the statistics where they cost extra passes over
        the grads ('value': its norms and clipped count); the clipping itself is the same.
        """
        # a Module's names cost more than the clipping of small tensors: built only for ``exclude`` or errors
        module = parameters if isinstance(parameters, nn.Module) else None
        everything = named_parameters(parameters, names=self.exclude is not None)
        named, grads = params_with_grads(everything, self.exclude, module)
        shards = local_shards([param for _, param in named], module, grads, self.process_group)
        if not shards.grads and shards.group is None:  # a sharded rank without grads still joins reductions
            return ClipStats.empty()
        if self.nonfinite == "zero":
            zero_nonfinite_(shards.grads)
        elif self.nonfinite in ("error", "skip") and nonfinite_on_any_rank(shards.grads, shards.device):
            if self.nonfinite == "error":
                if module is not None:
                    named, _ = params_with_grads(named_parameters(module), self.exclude)
                raise nonfinite_error(named, grads)
            return _skip_step(everything, shards.global_norm(self.rule_options.get("norm_type", 2.0)))
        if self.skip_spikes is not None:
            if self.spike_state is None:
                self.spike_state = init_spike_state(shards.device, self.spike_window)
            _move_to_(self.spike_state, shards.device)
            norm = shards.global_norm(2.0)
            if bool(is_spike_(norm, self.spike_state, self.skip_spikes)):  # the sync skipping needs
                return _skip_step(everything, norm)
        if not with_stats and self.rule.clip_without_stats is not None:
            self.rule.clip_without_stats(shards, self.clipping_threshold, **self.rule_options)
            return None
        stats = self._clip(shards)
        return stats if with_stats else None

    def _clip(self, shards: Shards) -> ClipStats:
        """The rule on ``shards``, with its statistics for a stateful rule (made at the first call)."""
        if not self.rule.stateful:
            return self.rule.clip(shards, self.clipping_threshold, **self.rule_options)
        if self.state is None:
            self.state = self.rule.init_state(shards.device, **self.rule_options)
        _move_to_(self.state, shards.device)
        return self.rule.clip(shards, self.clipping_threshold, self.state, **self.rule_options)

    @property
    def stateful(self) -> bool:
        """Whether the clipper keeps statistics from call to call (a stateful rule, or spike skipping)."""
        return self.rule.stateful or self.skip_spikes is not None

    def state_dict(self) -> dict[str, Any]:
        """``rule``: the rule's statistics, ``spikes``: the spike window; each present once it exists.

        Tensors only (as Composer's ``weights_only`` checkpoint loading needs); empty when stateless.
        """
        parts = {"rule": self.state, "spikes": self.spike_state}
        return {
            name: {key: value.clone() for key, value in part.items()}
            for name, part in parts.items()
            if part is not None
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; tensors move to the grads' device at the next call."""
        unknown = sorted(set(state) - {"rule", "spikes"})
        if unknown:
            raise ValueError(f"state: unknown key(s) {', '.join(unknown)}; allowed: rule, spikes")
        if "rule" in state and not self.rule.stateful:
            raise ValueError(
                f"state: holds the statistics of a stateful clipping type, but clipping_type="
                f"{self.clipping_type!r} keeps none; was the checkpoint written with another clipping_type?"
            )
        if "spikes" in state and self.skip_spikes is None:
            raise ValueError("state: holds a spike window, but skip_spikes is not set")
        fresh_rule = self.rule.init_state("cpu", **self.rule_options) if self.rule.stateful else {}
        self.state = _checked_state("rule", state.get("rule"), fresh_rule)
        fresh_spikes = init_spike_state("cpu", self.spike_window)
        self.spike_state = _checked_state("spikes", state.get("spikes"), fresh_spikes)

    def __repr__(self) -> str:
        options = {**self.rule_options}
        if self.exclude is not None:
            options["exclude"] = self.exclude
        if self.nonfinite != "propagate":
            options["nonfinite"] = self.nonfinite
        if self.skip_spikes is not None:
            options.update(skip_spikes=self.skip_spikes, spike_window=self.spike_window)
        settings = "".join(f", {name}={value!r}" for name, value in options.items())
        return (
            f"{type(self).__name__}(clipping_type={self.clipping_type!r}, "
            f"clipping_threshold={self.clipping_threshold!r}{settings})"
        )


def _checked_state(
    name: str, given: dict[str, Any] | None, fresh: dict[str, Tensor]
) -> dict[str, Tensor] | None:
    """A copy of ``given`` if its tensors match ``fresh`` ones in key, dtype and shape (empty: any shape)."""
    if given is None:
        return None
    if set(given) != set(fresh):
        raise ValueError(
            f"state.{name}: expected keys {', '.join(sorted(fresh))}, got {', '.join(sorted(given)) or 'none'}; "
            "was the checkpoint written with other settings?"
        )
    for key, value in given.items():
        want = fresh[key]
        if (
            not isinstance(value, Tensor)
            or value.dtype != want.dtype
            or (want.numel() and value.shape != want.shape)
        ):
            got = (
                f"a {value.dtype} tensor of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else repr(value)
            )
            raise ValueError(
                f"state.{name}.{key}: expected a {want.dtype} tensor of shape {tuple(want.shape)}, got {got}; "
                "was the checkpoint written with other settings?"
            )
    return {key: value.clone() for key, value in given.items()}


def _skip_step(everything: list[tuple[str | None, Tensor]], norm: Tensor) -> ClipStats:
    """Drop every grad, excluded ones too, so that the whole optimizer step is skipped."""
    for _, param in everything:
        param.grad = None
    return ClipStats.skipped_step(norm)


def _move_to_(state: dict[str, Tensor], device: torch.device) -> None:
    """Move the tensors of ``state`` to ``device`` where they are elsewhere (e.g. just loaded on the CPU)."""
    for key, value in state.items():
        if value.device != device:
            state[key] = value.to(device)
