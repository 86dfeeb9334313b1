"""RUN_METHOD runs only registered kt hooks, named in the frame (issue 11).

Behaviours covered: `actor_hook` refuses functions outside kt and nested ones;
`resolve_hook` finds a registered hook by name (importing its module) and refuses any
other name, so a caller cannot send a function for an actor to run; kt.distributed's
hooks are registered; and inside a real actor, a name that is not a hook is refused
while a hook runs.
"""

from __future__ import annotations

import pytest

import kt
from kt.core.methods import RUN_METHOD, MethodKind, actor_hook, hook_name, resolve_hook


def test_only_module_level_kt_functions_become_hooks() -> None:
    def local(instance: object) -> None:
        return None

    with pytest.raises(ValueError, match="module-level function of kt"):
        actor_hook(local)
    with pytest.raises(ValueError, match="not an actor hook"):
        hook_name(print)


def test_hooks_resolve_by_name_and_nothing_else_does() -> None:
    from kt.distributed import collective, rendezvous

    assert resolve_hook(hook_name(rendezvous.install)) is rendezvous.install
    assert resolve_hook("kt.distributed.collective:_join") is collective._join
    for name in ("os:system", "builtins:exec", "kt.distributed.collective:logger"):
        with pytest.raises(LookupError, match="not a kt actor hook"):
            resolve_hook(name)


class Box:
    def ping(self) -> int:
        return 1


@pytest.mark.timeout(60)
def test_an_actor_refuses_a_name_that_is_not_a_hook(pool: kt.Compute) -> None:
    from kt.actors.handle import ActorMethod
    from kt.distributed import rendezvous

    box = kt.cls(Box).options(compute=pool, cpus=0).remote()
    run: ActorMethod[..., object] = ActorMethod(box, RUN_METHOD, MethodKind.SYNC)
    with pytest.raises(LookupError, match="not a kt actor hook"):
        run.remote("os:system", "echo hacked").result(timeout=30)
    assert box.run_hook(rendezvous.install).result(timeout=60) in (True, False)
    assert box.ping() == 1
