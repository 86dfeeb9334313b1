"""mypy plugin: typed actor handles. Enable it in the program's mypy configuration:

    [tool.mypy]
    plugins = ["kt.mypy_plugin"]

`kt.cls(C).remote()` is an `ActorHandle[C]`; with the plugin, `handle.incr` is an
`ActorMethod` carrying `C.incr`'s parameters (without `self`) and result, so mypy checks
`handle.incr.remote(...)` against them and types it as `Ref[int]` for `def incr(self,
k: int) -> int` (an `async def` method's result is what its coroutine returns); a name
that is not a method of `C` is an error. Without the plugin, `handle.<name>` is an
untyped `ActorMethod`.

Only mypy imports this module (it imports mypy); kt never does.
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.nodes import FuncBase, OverloadedFuncDef
from mypy.plugin import AttributeContext, Plugin
from mypy.types import (
    AnyType,
    CallableType,
    Instance,
    Parameters,
    ProperType,
    Type,
    TypeOfAny,
    get_proper_type,
)

HANDLE = "kt.actors.handle.ActorHandle"
METHOD = "kt.actors.handle.ActorMethod"


def _result(method: CallableType, is_coroutine: bool) -> Type:
    ret = get_proper_type(method.ret_type)
    if is_coroutine and isinstance(ret, Instance) and ret.type.fullname.endswith("Coroutine"):
        return ret.args[-1]
    return ret


def _method_type(ctx: AttributeContext) -> Type:
    handle = get_proper_type(ctx.type)
    if not isinstance(handle, Instance) or not handle.args:
        return ctx.default_attr_type
    target = get_proper_type(handle.args[0])
    if not isinstance(target, Instance):
        return ctx.default_attr_type  # ActorHandle[Any]: untyped
    name = ctx.context.name if hasattr(ctx.context, "name") else ""
    node = target.type.get(name) if name else None
    func = node.node if node is not None else None
    if isinstance(func, OverloadedFuncDef) or not isinstance(func, FuncBase):
        if func is None:
            ctx.api.fail(f'"{target.type.name}" has no method "{name}"', ctx.context)
            return AnyType(TypeOfAny.from_error)
        return ctx.default_attr_type
    signature = get_proper_type(func.type) if func.type is not None else None
    if not isinstance(signature, CallableType):
        return ctx.default_attr_type
    bound = signature.copy_modified(
        arg_types=signature.arg_types[1:],
        arg_kinds=signature.arg_kinds[1:],
        arg_names=signature.arg_names[1:],
    )
    params = Parameters(bound.arg_types, bound.arg_kinds, bound.arg_names)
    result = _result(signature, getattr(func, "is_coroutine", False))
    default = get_proper_type(ctx.default_attr_type)  # ActorMethod[Any, Any], from __getattr__
    if not isinstance(default, Instance) or default.type.fullname != METHOD:
        return ctx.default_attr_type
    method: ProperType = default.copy_modified(args=[params, result])
    return method


class KtPlugin(Plugin):
    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        if fullname.startswith(HANDLE + "."):
            return _method_type
        return None


def plugin(version: str) -> type[Plugin]:
    return KtPlugin
