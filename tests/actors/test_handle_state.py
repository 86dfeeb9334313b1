"""An ActorHandle's lifecycle is one state with a table (issue 11), not five fields.

Behaviours covered, without processes: a handle without an address is PLACING and
keeps calls; HELD clears the address and counts a generation; FAILED is final (the
backlog fails with the error, a later bind is ignored, calls fail at once); the table
refuses a move it does not list.
"""

from __future__ import annotations

import pytest

from kt.actors.handle import ActorHandle, HandleState
from kt.core.errors import ActorDiedError, InvalidTransition
from kt.core.methods import MethodKind
from kt.core.ref import Ref


def _handle(address: tuple[str, int] | None = None) -> ActorHandle[object]:
    return ActorHandle("a1", "C", {"m": MethodKind.SYNC}, address=address, token="t")


def test_a_handle_moves_through_its_table() -> None:
    h = _handle(("127.0.0.9", 1))
    assert h._state is HandleState.BOUND and h.address == ("127.0.0.9", 1)
    h._unbind()
    assert h._state is HandleState.HELD and h.address is None and h._generation == 1
    h._unbind()
    assert h._generation == 2 and not h._placed.is_set()
    kept: Ref[int] = Ref("kept")
    h._submit(7, [b""], kept)  # HELD: it waits in the backlog
    assert not kept.done() and len(h._backlog) == 1
    died = ActorDiedError("a1", "p", reason="test")
    h._fail(died)
    assert h._state is HandleState.FAILED and h._placed.is_set()
    assert kept.exception() is died  # the backlog fails with the error
    h._bind(("127.0.0.9", 2), "t")  # a late bind changes nothing
    assert h._state is HandleState.FAILED and h.address is None
    late: Ref[int] = Ref("late")
    h._submit(8, [b""], late)
    assert late.exception() is died
    with pytest.raises(ActorDiedError):
        h.wait_placed(0)


def test_the_table_refuses_unlisted_moves() -> None:
    h = _handle()
    assert h._state is HandleState.PLACING
    with h._lock, pytest.raises(InvalidTransition, match="from placing to placing"):
        h._move(HandleState.PLACING)
