"""How a method runs, decided once from its definition by caller and worker alike."""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from typing import Any

RUN_METHOD = "__kt_run__"
"""Runs `fn(instance, *args)` inside an actor's process (see ActorHandle._run)."""


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
