"""The run config of ``gradclip-train``: one YAML file plus ``key=value`` overrides, checked field by field.

Every key is checked before anything is built: an unknown key is named with the keys its block allows, a
bad value is named with its field, the value and what is allowed. The ``algorithms:`` block is llm-foundry's
and is checked by :func:`gradclip_algo.config.build_algorithms`; the optimizer's ``options`` are checked by
the torch optimizer they go to. Both happen before a run folder is made.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradclip_algo.config import algorithms_block
from gradclip_algo.validation import check_batches, check_bool, check_choice, check_positive_number

Check = Callable[[str, Any], Any]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
TASKS = ("adding_problem", "language_model")
TEXTS = ("pydoc_topics",)
DURATION_PATTERN = re.compile(r"^([1-9][0-9]*)(ba|ep)$")


class RunConfigError(ValueError):
    """A config that cannot start a run. The message is one line that names the problem."""


def _check_int(field_name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RunConfigError(f"{field_name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _int_at_least(minimum: int) -> Check:
    return lambda field_name, value: _check_int(field_name, value, minimum)


def _config_error(check: Callable[..., Any], *args: Any) -> Callable[[str, Any], Any]:
    """``check(field_name, value, *args)``, its ``ValueError`` raised as a one-line ``RunConfigError``."""

    def checked(field_name: str, value: Any) -> Any:
        try:
            return check(field_name, value, *args)
        except ValueError as err:
            raise RunConfigError(str(err)) from err

    return checked


_positive_number = _config_error(check_positive_number)
_optimizer_name = _config_error(check_choice, OPTIMIZERS)
_schedule_name = _config_error(check_choice, SCHEDULES)
_task_name = _config_error(check_choice, TASKS)
_text_name = _config_error(check_choice, TEXTS)
_flag = _config_error(check_bool)
_batches = _config_error(check_batches, 1)


def _fraction(field_name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise RunConfigError(f"{field_name}: expected a number in (0, 1), got {value!r}")
    return float(value)


def _run_name(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or value in (".", "..") or "/" in value or "\\" in value:
        raise RunConfigError(f"{field_name}: expected a folder name (no '/'), got {value!r}")
    return value


def _folder(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise RunConfigError(f"{field_name}: expected a folder path, got {value!r}")
    return value


def _duration(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not DURATION_PATTERN.match(value):
        raise RunConfigError(
            f"{field_name}: expected a count > 0 followed by 'ba' (optimizer steps) or 'ep' (epochs), "
            f"e.g. 2000ba, got {value!r}"
        )
    return value


def _optional_positive_int(field_name: str, value: Any) -> int | None:
    return None if value is None else _check_int(field_name, value, 1)


def _mapping(field_name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise RunConfigError(f"{field_name}: expected a mapping of keys to values, got {value!r}")
    return dict(value)


def _optional_mapping(field_name: str, value: Any) -> dict[str, Any]:
    return {} if value is None else _mapping(field_name, value)


def _algorithms(field_name: str, value: Any) -> dict[str, Any]:
    """The ``algorithms:`` block: a mapping, ``None`` (none), or a preset's name or a YAML file's path,
    read into its block (so ``config.yaml`` records the settings themselves)."""
    if isinstance(value, str):
        try:
            value = algorithms_block(value)
        except ValueError as err:
            raise RunConfigError(f"{field_name}: {err}") from err
    return _optional_mapping(field_name, value)


def setting(default: Any, check: Check) -> Any:
    """A config field with its default (``MISSING`` for a required one) and its check."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"check": check})
    return field(default=default, metadata={"check": check})


def block(schema: type, by_task: Mapping[str, type] | None = None) -> Any:
    """A nested block of settings, itself a config dataclass; absent, it takes all its defaults.

    ``by_task`` maps each ``task.name`` to the block's schema for that task (``schema`` is the default's).
    """
    metadata = {"block": schema} if by_task is None else {"block": schema, "by_task": by_task}
    return field(default_factory=schema, metadata=metadata)


@dataclass(frozen=True)
class TaskConfig:
    """The adding problem's sizes (see :mod:`gradclip_algo.train.adding_problem`)."""

    name: str = setting("adding_problem", _task_name)
    sequence_length: int = setting(10, _int_at_least(2))
    train_samples: int = setting(64_000, _int_at_least(1))
    eval_samples: int = setting(1000, _int_at_least(1))
    batch_size: int = setting(64, _int_at_least(1))

    def __post_init__(self) -> None:
        if self.train_samples < self.batch_size:
            raise RunConfigError(
                f"task.train_samples: expected at least task.batch_size={self.batch_size} samples "
                f"(incomplete batches are dropped), got {self.train_samples}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The vanilla tanh RNN: hidden size and the spectral radius ``W_hh`` starts with."""

    hidden_size: int = setting(32, _int_at_least(1))
    recurrent_init_gain: float = setting(1.0, _positive_number)


@dataclass(frozen=True)
class LanguageModelTaskConfig:
    """Next-byte prediction on a text of the standard library (see :mod:`gradclip_algo.train.text_data`).

    Evaluation runs every ``eval_interval`` optimizer steps and at the end, on the first ``eval_windows``
    windows of the held-out last ``eval_fraction`` of the text.
    """

    name: str = setting("language_model", _task_name)
    text: str = setting("pydoc_topics", _text_name)
    context_length: int = setting(64, _int_at_least(2))
    batch_size: int = setting(16, _int_at_least(1))
    eval_fraction: float = setting(0.1, _fraction)
    eval_windows: int = setting(128, _int_at_least(1))
    eval_interval: int = setting(25, _batches)


@dataclass(frozen=True)
class TransformerConfig:
    """The byte-level pre-norm transformer (see :mod:`gradclip_algo.train.language_model`)."""

    d_model: int = setting(64, _int_at_least(1))
    n_layers: int = setting(2, _int_at_least(1))
    n_heads: int = setting(4, _int_at_least(1))
    mlp_ratio: int = setting(4, _int_at_least(1))

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise RunConfigError(
                f"model.d_model: expected a multiple of model.n_heads={self.n_heads}, got {self.d_model}"
            )


TASK_BLOCKS: dict[str, type] = {"adding_problem": TaskConfig, "language_model": LanguageModelTaskConfig}
MODEL_BLOCKS: dict[str, type] = {"adding_problem": ModelConfig, "language_model": TransformerConfig}


@dataclass(frozen=True)
class OptimizerConfig:
    """A torch optimizer (``sgd``, ``adam`` or ``adamw``), its learning rate and its other arguments.

    The learning rate rises linearly over the first ``warmup_steps`` optimizer steps (step k of the warm-up
    at ``k / warmup_steps · lr``), then stays at ``lr`` (``schedule: constant``) or follows the decreasing
    half of a cosine down to 0 at the last step of ``max_duration`` (``schedule: cosine``); see
    :func:`gradclip_algo.train.run.lr_factor`.
    """

    name: str = setting("sgd", _optimizer_name)
    lr: float = setting(0.2, _positive_number)
    options: dict[str, Any] = setting({}, _optional_mapping)
    schedule: str = setting("constant", _schedule_name)
    warmup_steps: int = setting(0, _int_at_least(0))


@dataclass(frozen=True)
class RunConfig:
    """One training run. The run folder is ``<run_folder>/<run_name>``.

    ``stop_on_nonfinite_loss`` (default true) ends the run after the first step whose loss is inf or NaN;
    false trains on to ``max_duration``. ``algorithms`` is llm-foundry's block, or a preset's name or a
    YAML file's path, read into the block.
    """

    run_name: str = setting(MISSING, _run_name)
    run_folder: str = setting("runs", _folder)
    seed: int = setting(0, _int_at_least(0))
    max_duration: str = setting("2000ba", _duration)
    device_train_microbatch_size: int | None = setting(None, _optional_positive_int)
    cpu_threads: int = setting(1, _int_at_least(1))
    stop_on_nonfinite_loss: bool = setting(True, _flag)
    task: TaskConfig | LanguageModelTaskConfig = block(TaskConfig, TASK_BLOCKS)
    model: ModelConfig | TransformerConfig = block(ModelConfig, MODEL_BLOCKS)
    optimizer: OptimizerConfig = block(OptimizerConfig)
    algorithms: dict[str, Any] = setting({}, _algorithms)


def _build(schema: type, values: Any, path: str) -> Any:
    """An instance of ``schema`` (a config dataclass) from ``values``, every key and value checked."""
    where = path or "the config"
    if not isinstance(values, Mapping):
        raise RunConfigError(f"{where}: expected a mapping of keys to values, got {values!r}")
    allowed = [f.name for f in fields(schema)]
    for key in values:
        if key not in allowed:
            name = f"{path}.{key}" if path else str(key)
            raise RunConfigError(f"{name}: unknown key; allowed keys in {where}: {', '.join(allowed)}")
    kwargs = {}
    for spec in fields(schema):
        name = f"{path}.{spec.name}" if path else spec.name
        by_task = spec.metadata.get("by_task")
        if by_task is not None:  # the schema of this block depends on task.name
            task = values.get("task")
            task_name = task.get("name", TASKS[0]) if isinstance(task, Mapping) else TASKS[0]
            kwargs[spec.name] = _build(
                by_task[_task_name("task.name", task_name)], values.get(spec.name, {}), name
            )
        elif spec.name in values:
            value = values[spec.name]
            nested = spec.metadata.get("block")
            kwargs[spec.name] = _build(nested, value, name) if nested else spec.metadata["check"](name, value)
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise RunConfigError(f"{name}: missing; this key is required")
    return schema(**kwargs)


def _one_line(err: Exception) -> str:
    """An error's message on one line: YAML errors with their position, omegaconf errors with their key."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {err.problem}"
    message = " ".join(str(err).split("\n", 1)[0].split())
    key = getattr(err, "full_key", None)
    return f"{message} (at {key})" if key else message


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise RunConfigError(f"{path}: no such config file")
    try:
        loaded = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise RunConfigError(f"{path}: {_one_line(err)}") from err
    if not isinstance(loaded, DictConfig):
        raise RunConfigError(f"{path}: expected a mapping of keys to values at the top level, got a list")
    return loaded


def _read_override(override: str) -> DictConfig:
    key, sep, _ = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise RunConfigError(f"override {override!r}: expected key=value, e.g. optimizer.lr=0.1")
    try:
        return OmegaConf.from_dotlist([override])
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise RunConfigError(f"override {override!r}: {_one_line(err)}") from err


def load_run_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read ``path``, apply ``key=value`` overrides (omegaconf dot-list syntax), resolve, check.

    Raises:
        RunConfigError: for a missing file, a YAML error, a malformed override, an unresolvable
            ``${...}`` interpolation, an unknown key, a missing required key or a bad value.
    """
    path = Path(path)
    merged = _read_yaml(path)
    try:
        for override in overrides:
            parsed = _read_override(override)
            merged = OmegaConf.merge(merged, parsed)
            key = override.partition("=")[0]
            if OmegaConf.select(parsed, key) == {}:  # `key={}` empties the block: merging {} changes nothing
                OmegaConf.update(merged, key, {}, merge=False)
        values = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        raise RunConfigError(f"{path}: {_one_line(err)}") from err
    return _build(RunConfig, values, "")


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The config as plain containers, every default filled in (what ``config.yaml`` records)."""
    return asdict(config)
