"""``GradientClipper``: a validated clipping set-up, with the statistics of stateful rules."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gradclip_algo.distributed import local_shards
from gradclip_algo.nonfinite import NONFINITE_MODES, NonFiniteGradError, first_nonfinite, zero_nonfinite_
from gradclip_algo.norms import global_norm
from gradclip_algo.parameters import Parameters, exclusion_filter, params_with_grads
from gradclip_algo.rules import CLIPPING_TYPES, RULES
from gradclip_algo.stats import ClipStats
from gradclip_algo.validation import check_bool, check_choice, check_known_options, check_positive_number

COMMON_OPTIONS = ("exclude", "nonfinite", "error_if_nonfinite")


class GradientClipper:
    """Validate a clipping set-up once, then call it every step between ``backward()`` and ``step()``.

    ``GradientClipper(clipping_type, clipping_threshold, **options)`` takes the arguments of
    :func:`~gradclip_algo.apply_gradient_clipping`; every bad value raises here, naming the field, the value
    and what is allowed. Stateful rules keep their statistics (tensors on the grads' device) in the
    clipper; ``state_dict()`` / ``load_state_dict()`` carry them through checkpoints.
    """

    def __init__(self, clipping_type: str, clipping_threshold: float, **options: Any) -> None:
        check_choice("clipping_type", clipping_type, CLIPPING_TYPES)
        self.clipping_type = clipping_type
        self.clipping_threshold = check_positive_number("clipping_threshold", clipping_threshold)
        self.rule = RULES[clipping_type]
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
        self.state: dict[str, Any] | None = None

    def __call__(self, parameters: Parameters) -> ClipStats:
        """Clip the grads of ``parameters`` in place and return what was done."""
        named = params_with_grads(parameters, self.exclude)
        if not named:
            return ClipStats.empty()
        grads = [param.grad for _, param in named]
        if self.nonfinite == "zero":
            zero_nonfinite_(grads)
        elif self.nonfinite in ("error", "skip"):
            norm = global_norm(grads, 2.0, grads[0].device)
            if not bool(torch.isfinite(norm)):  # the sync these modes ask for
                if self.nonfinite == "error":
                    name = first_nonfinite(named)
                    raise NonFiniteGradError(f"non-finite gradient (inf or NaN) in {name}", name)
                for _, param in named:
                    param.grad = None
                return ClipStats.skipped_step(norm)
        shards = local_shards(
            [param for _, param in named], parameters if isinstance(parameters, nn.Module) else None
        )
        if not self.rule.stateful:
            return self.rule.clip(shards, self.clipping_threshold, **self.rule_options)
        if self.state is None:
            self.state = self.rule.init_state(shards.device, **self.rule_options)
        return self.rule.clip(shards, self.clipping_threshold, self.state, **self.rule_options)

    def state_dict(self) -> dict[str, Any]:
        """The rule's statistics (tensors and plain values); empty for stateless rules."""
        return {} if self.state is None else dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state) if state else None

    def __repr__(self) -> str:
        options = {**self.rule_options}
        if self.exclude is not None:
            options["exclude"] = self.exclude
        if self.nonfinite != "propagate":
            options["nonfinite"] = self.nonfinite
        settings = "".join(f", {name}={value!r}" for name, value in options.items())
        return (
            f"{type(self).__name__}(clipping_type={self.clipping_type!r}, "
            f"clipping_threshold={self.clipping_threshold!r}{settings})"
        )
