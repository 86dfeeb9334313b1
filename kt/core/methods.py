"""How a method runs, decided once from its definition by caller and worker alike."""

from __future__ import annotations

import enum
import importlib
import inspect
from collections.abc import Callable
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
