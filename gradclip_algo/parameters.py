"""Turn what a user passes as ``parameters`` into the parameters whose grads get clipped.

Every check on the user's input runs here, before any grad changes: the kind of ``parameters``, each
grad's layout, dtype and device, and the ``exclude`` patterns.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from gradclip_algo.validation import shown

Predicate = Callable[[str, Tensor], bool]
Exclude = str | Predicate | Sequence[str | Predicate] | None
Parameters = nn.Module | Tensor | Iterable[Tensor] | Iterable[tuple[str, Tensor]]

FLOATING = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
"""The grad dtypes that can be clipped."""
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""Name segments that FSDP1, activation checkpointing and ``torch.compile`` insert."""
WRAPPER_PREFIX = "module."
"""The prefix of names seen through ``DistributedDataParallel`` (and of a Composer model's own module)."""


def unwrapped_name(name: str) -> str:
    """``name`` without the segments that FSDP1, checkpoint and compile wrappers insert."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name


def name_variants(name: str) -> tuple[str, ...]:
    """``name`` and, where it differs, the name without wrapper segments and a leading ``module.``: the
    names an ``exclude`` glob is matched against."""
    bare = unwrapped_name(name)
    stripped = bare.removeprefix(WRAPPER_PREFIX)
    return tuple(dict.fromkeys((name, bare, stripped)))


Named = tuple[tuple[str, ...], Tensor]
"""``(names, param)``: a parameter and every name it has (tied weights have several; bare tensors none)."""


def _module_parameters(module: nn.Module) -> list[Named]:
    """``list(module.parameters())``, in its order, each without names (none are built). Modules are told
    apart by ``id``: some (torchmetrics' metrics, held by Composer models) define a costly ``__hash__``."""
    found: list[Named] = []
    seen_modules: set[int] = set()
    seen_params: set[int] = set()
    stack: list[nn.Module | None] = [module]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen_modules:
            continue
        seen_modules.add(id(current))
        for param in current._parameters.values():
            if param is not None and id(param) not in seen_params:
                seen_params.add(id(param))
                found.append(((), param))
        children = list(current._modules.values())
        children.reverse()
        stack += children
    return found


def _unwrapped_module(module: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` and ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def collect(parameters: Parameters, names: bool = True) -> list[Named]:
    """Each distinct tensor of ``parameters`` once, with its names.

    ``parameters``: a Module, one tensor, or an iterable of tensors or ``(name, tensor)`` pairs. Raises
    ``TypeError`` for anything else, naming what was passed, and ``ValueError`` for an iterator that yields
    nothing (one already used up).

    Names (where ``names``), as an ``exclude`` glob sees them, are the same for a module and for its
    ``named_parameters()`` passed unread: every name of a tied tensor (``named_parameters()`` lists a shared
    tensor under its first name only, so the module it came from names the rest), both as the module names
    it and without the segments and prefixes of ``DistributedDataParallel``, ``torch.compile``, FSDP1 and
    activation-checkpoint wrappers. The first name of each tensor is the unwrapped one.
    """
    if isinstance(parameters, nn.Module):
        if not names:
            return _module_parameters(_unwrapped_module(parameters))
        return list(_names_in_module(parameters).values())
    if isinstance(parameters, Tensor):
        return [((), parameters)]
    _check_iterable(parameters)
    source = _named_parameters_source(parameters) if names else None
    found = _from_iterable(parameters)
    if source is None:
        return found
    known = _names_in_module(*source)
    return [(_merged(known.get(id(param), ((), param))[0], given), param) for given, param in found]


def _merged(*names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for group in names for name in group))


def _named_parameters_source(parameters: object) -> tuple[nn.Module, str, bool] | None:
    """The module, ``prefix`` and ``recurse`` of an unread ``module.named_parameters(...)`` generator."""
    if not (
        inspect.isgenerator(parameters)
        and parameters.gi_code is nn.Module.named_parameters.__code__
        and inspect.getgeneratorstate(parameters) == inspect.GEN_CREATED
    ):
        return None
    local = inspect.getgeneratorlocals(parameters)
    module = local.get("self")
    if not isinstance(module, nn.Module):
        return None
    return module, str(local.get("prefix", "")), bool(local.get("recurse", True))


def _names_in_module(module: nn.Module, prefix: str = "", recurse: bool = True) -> dict[int, Named]:
    """Each parameter of ``module`` (by ``id``) with every name it has: unwrapped first (through the
    model inside ``DistributedDataParallel`` and ``torch.compile`` wrappers, without FSDP1 and
    checkpoint segments), then as ``module`` itself names it where that differs."""
    inner = _unwrapped_module(module)
    found: dict[int, Named] = {}
    listings = [(inner, True)] + ([(module, False)] if inner is not module else [])
    for source, unwrap in listings:
        for name, param in source.named_parameters(prefix=prefix, recurse=recurse, remove_duplicate=False):
            names = (unwrapped_name(name), name) if unwrap else (name,)
            known = found.get(id(param), ((), param))[0]
            found[id(param)] = (_merged(known, names), param)
    return found


def _check_iterable(parameters: object) -> None:
    """``TypeError`` for an optimizer, a string or anything that is not iterable, naming what was passed."""
    if isinstance(parameters, torch.optim.Optimizer):
        raise TypeError(
            f"parameters: got an optimizer ({type(parameters).__name__}); pass the model, or "
            "[p for group in optimizer.param_groups for p in group['params']]"
        )
    if isinstance(parameters, (str, bytes)) or not isinstance(parameters, Iterable):
        raise TypeError(
            "parameters: expected an nn.Module, a tensor, or an iterable of tensors or (name, tensor) "
            f"pairs, got {shown(parameters)}"
        )


def _from_iterable(parameters: Iterable[Tensor] | Iterable[tuple[str, Tensor]]) -> list[Named]:
    """Each distinct tensor of an iterable of tensors or ``(name, tensor)`` pairs once, with its names;
    ``TypeError`` for any other item, ``ValueError`` for an iterator that yields nothing."""
    is_iterator = isinstance(parameters, Iterator)
    unique: dict[int, Named] = {}
    for item in parameters:
        name, tensor = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
        if isinstance(item, Mapping) and "params" in item:
            raise TypeError(
                "parameters: got an optimizer's param_groups (dicts with 'params'); pass the model, or "
                "[p for group in optimizer.param_groups for p in group['params']]"
            )
        if not isinstance(tensor, Tensor) or not (name is None or isinstance(name, str)):
            raise TypeError(f"parameters: expected tensors or (name, tensor) pairs, got {shown(item)} in it")
        known = unique.get(id(tensor))
        given = () if name is None else (name,)
        unique[id(tensor)] = ((*known[0], *given) if known else given, tensor)
    if is_iterator and not unique:
        raise ValueError(
            "parameters: the iterator yielded no tensors (a generator such as model.parameters() can be "
            "read only once); pass the model itself or a list"
        )
    return list(unique.values())


def check_exclude(exclude: Exclude) -> list[str | Predicate]:
    """``exclude`` as a list of glob patterns and predicates, or ``TypeError`` naming the bad entry."""
    if exclude is None:
        return []
    rules = [exclude] if isinstance(exclude, str) or callable(exclude) else exclude
    if not isinstance(rules, (list, tuple)):
        raise TypeError(
            "exclude: expected a glob pattern, a callable (name, param) -> bool, or a list of these, "
            f"got {shown(exclude)}"
        )
    for rule in rules:
        if not (isinstance(rule, str) or callable(rule)):
            raise TypeError(
                f"exclude: expected glob patterns or callables (name, param) -> bool, got {shown(rule)} in it"
            )
        if callable(rule):
            _check_predicate(rule)
    return list(rules)


def _check_predicate(rule: Callable[..., object]) -> None:
    """``TypeError`` where ``rule`` cannot be called as ``rule(name, param)`` (callables whose signature
    Python cannot read are taken as they are)."""
    try:
        signature = inspect.signature(rule)
    except (TypeError, ValueError):
        return
    try:
        signature.bind("name", None)
    except TypeError:
        what = getattr(rule, "__qualname__", type(rule).__name__)
        raise TypeError(
            f"exclude: a callable is called as rule(name, param) and returns whether to exclude param; "
            f"{what}{signature} cannot take those two arguments"
        ) from None


def _names_in(module: nn.Module, param: Tensor) -> tuple[str, ...]:
    return next((names for names, candidate in collect(module) if candidate is param), ())


def _grad_error(item: Named, grad: Tensor, module: nn.Module | None) -> Exception:
    """The error for a grad that cannot be clipped (sparse, not floating-point, or on the meta device),
    naming its parameter (looked up in ``module`` where ``item`` carries no name)."""
    names, param = item
    names = names or (_names_in(module, param) if module is not None else ())
    what = names[0] if names else f"a parameter of shape {tuple(param.shape)}"
    if grad.layout is not torch.strided:
        return TypeError(
            f"parameters: gradient of {what} has layout {grad.layout}; only dense (strided) gradients can "
            "be clipped"
        )
    if grad.dtype not in FLOATING:
        return TypeError(
            f"parameters: gradient of {what} has dtype {grad.dtype}; only floating-point gradients "
            "(float16, bfloat16, float32, float64) can be clipped"
        )
    return ValueError(
        f"parameters: {what} is on the meta device and holds no values; materialise the model "
        "(e.g. model.to_empty(device=...)) before clipping"
    )


def with_grads(
    named: list[Named], excluded: Callable[[Named], bool] | None, module: nn.Module | None = None
) -> tuple[list[Named], list[Tensor], list[Tensor]]:
    """The parameters whose ``.grad`` is set and that ``excluded`` does not match (as ``named`` gives them,
    and as tensors), and their grads.

    Every grad is checked first (:func:`_grad_error`), so a bad one raises before any grad changes; its
    error names the parameter, looked up in ``module`` where ``named`` carries no names.
    """
    selected, params, grads = [], [], []
    for item in named:
        if excluded is not None and excluded(item):
            continue
        grad = item[1].grad
        if grad is None:
            continue
        if grad.dtype not in FLOATING or grad.layout is not torch.strided or grad.is_meta:
            raise _grad_error(item, grad, module)
        selected.append(item)
        params.append(item[1])
        grads.append(grad)
    return selected, params, grads


def _model_names(names: tuple[str, ...]) -> list[str]:
    """The names an ``exclude`` predicate is called with: each name without wrapper segments, less a
    ``module.<name>`` alias (what ``DistributedDataParallel`` lists) of a name also present. A predicate
    such as ``name != "head.bias"`` then sees the model's own names, as a glob's variants would not let it."""
    bare = list(dict.fromkeys(unwrapped_name(name) for name in names))
    present = set(bare)
    kept = []
    for name in bare:
        stripped = name.removeprefix(WRAPPER_PREFIX)
        if stripped == name or stripped not in present:
            kept.append(name)
    return kept


class Exclusion:
    """The ``exclude`` patterns and predicates of a clipper, and which patterns ever matched a name."""

    def __init__(self, exclude: Exclude) -> None:
        self.rules = check_exclude(exclude)
        self.matched: set[str] = set()

    def __call__(self, item: Named) -> bool:
        names, param = item
        if not names:
            raise ValueError(
                "exclude: matching parameters by name needs names; pass the nn.Module itself or "
                "model.named_parameters() instead of bare tensors"
            )
        variants = [variant for name in names for variant in name_variants(name)]
        hit = False
        for rule in self.rules:
            if isinstance(rule, str):
                if any(fnmatch.fnmatchcase(variant, rule) for variant in variants):
                    self.matched.add(rule)
                    hit = True
            elif any(bool(rule(name, param)) for name in _model_names(names)):
                hit = True
        return hit

    def unmatched(self) -> list[str]:
        """The glob patterns that matched no name so far."""
        return [rule for rule in self.rules if isinstance(rule, str) and rule not in self.matched]
