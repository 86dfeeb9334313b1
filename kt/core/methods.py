"""How a method runs, decided once from its definition by caller and worker alike."""

from __future__ import annotations

import enum
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

RUN_METHOD = "__kt_run__"
"""Runs a registered hook, `hook(instance, *args)`, in an actor's process
(`ActorHandle.run_hook`). The frame names the hook; the actor runs nothing else."""

_HOOKS: dict[str, Callable[..., Any]] = {}


def actor_hook(fn: F) -> F:
    """Register `fn(instance, ...)` as runnable inside any actor by kt's own layers.

    kt.distributed joins actors into process groups this way. A hook is named
    "module:qualname" and must live in a kt module, so a caller can run only these
    functions through RUN_METHOD, never one it sends.
    """
    name = f"{fn.__module__}:{fn.__qualname__}"
    if not fn.__module__.startswith("kt.") or "<locals>" in name:
        raise ValueError(f"{name}: an actor hook is a module-level function of kt")
    _HOOKS[name] = fn
    fn.__kt_hook__ = name  # type: ignore[attr-defined]
    return fn


def hook_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__kt_hook__", None)
    if name is None:
        raise ValueError(f"{fn!r} is not an actor hook (decorate it with @actor_hook)")
    return str(name)


def resolve_hook(name: str) -> Callable[..., Any]:
    """The hook registered under `name`, importing its kt module.

    Raises:
        LookupError: no kt hook has that name.
    """
    module = name.partition(":")[0]
    if module.startswith("kt.") and name not in _HOOKS:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    fn = _HOOKS.get(name)
    if fn is None:
        raise LookupError(f"{name!r} is not a kt actor hook: RUN_METHOD runs only those")
    return fn


class MethodKind(enum.IntEnum):
    SYNC = 0
    ASYNC = 1
    GEN = 2
    ASYNC_GEN = 3

    @property
    def streams(self) -> bool:
        return self in (MethodKind.GEN, MethodKind.ASYNC_GEN)


def method_kind(fn: Callable[..., Any]) -> MethodKind:
    if inspect.isasyncgenfunction(fn):
        return MethodKind.ASYNC_GEN
    if inspect.isgeneratorfunction(fn):
        return MethodKind.GEN
    if inspect.iscoroutinefunction(fn):
        return MethodKind.ASYNC
    return MethodKind.SYNC


def public_methods(cls: type) -> dict[str, MethodKind]:
    """The methods a handle exposes: every public callable, plus `__call__`."""
    out: dict[str, MethodKind] = {}
    for name in dir(cls):
        if name.startswith("_") and name != "__call__":
            continue
        attr = inspect.getattr_static(cls, name, None)
        if isinstance(attr, staticmethod | classmethod):
            attr = attr.__func__
        if callable(attr) and not isinstance(attr, type):
            out[name] = method_kind(attr)
    return out


@dataclass(frozen=True)
class Arity:
    """What arguments a method takes, checked before a call is sent (`refusal`). A call
    with positional arguments only costs two comparisons; one with keywords, or one that
    does not fit, pays for `inspect.Signature.bind`, whose error becomes the message."""

    signature: inspect.Signature
    min_positional: int  # without keywords, fewer do not fit (more than any: keywords needed)
    max_positional: int  # -1: it takes *args

    def refusal(self, label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why these arguments do not fit, or None when they do."""
        n = len(args)
        if not kwargs and self.min_positional <= n and not 0 <= self.max_positional < n:
            return None
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            return f"{label}{self.signature}: {exc}"
        return None


def arity(fn: Callable[..., Any], bound: bool) -> Arity | None:
    """`fn`'s Arity (`bound`: its first parameter is the instance or class, which a
    caller does not pass); None when it has no signature Python can read."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = inspect.Parameter
    params = list(signature.parameters.values())
    if bound and params and params[0].kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
        params = params[1:]
    params = [p.replace(annotation=p.empty) for p in params]  # the message reads as a call
    signature = signature.replace(parameters=params, return_annotation=signature.empty)
    positional = [
        p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    required = sum(p.default is p.empty for p in positional)
    if any(p.kind is kinds.KEYWORD_ONLY and p.default is p.empty for p in params):
        required = 1 << 30  # a required keyword-only parameter: only bind can say
    var_positional = any(p.kind is kinds.VAR_POSITIONAL for p in params)
    return Arity(signature, required, -1 if var_positional else len(positional))


CALL_ARITY = "__kt_call_arity__"
"""A class attribute: the Arity of `__call__`, when the class only wraps another callable
(kt.fn's functions)."""


def public_arities(cls: type) -> dict[str, Arity]:
    """The Arity of each method `public_methods` lists, where Python can read one."""
    out: dict[str, Arity] = {}
    for name in public_methods(cls):
        if name == "__call__" and CALL_ARITY in vars(cls):
            if vars(cls)[CALL_ARITY] is not None:
                out[name] = vars(cls)[CALL_ARITY]
            continue
        attr = inspect.getattr_static(cls, name, None)
        bound = not isinstance(attr, staticmethod)
        if isinstance(attr, staticmethod | classmethod):
            attr = attr.__func__
        found = arity(attr, bound) if callable(attr) else None
        if found is not None:
            out[name] = found
    return out
