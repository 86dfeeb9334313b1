"""An ActorDiedError carries the last 20 lines the actor printed before it died.

Behaviours covered: an actor prints 30 lines and exits; the call in flight and the next
call both fail with ActorDiedError whose `last_lines` are lines 10 to 29, shown in its
message; an actor that printed nothing has none.
"""

from __future__ import annotations

import os

import pytest

import kt

pytestmark = pytest.mark.timeout(120)


class Chatty:
    def talk_and_die(self, n: int) -> None:
        for i in range(n):
            print(f"line {i}", flush=True)
        os._exit(3)

    def die(self) -> None:
        os._exit(4)


def test_the_last_lines_come_with_the_death(pool: kt.Compute) -> None:
    chatty = kt.cls(Chatty).options(compute=pool, cpus=0).remote()
    with pytest.raises(kt.ActorDiedError) as in_flight:
        chatty.talk_and_die(30)
    expected = tuple(f"line {i}" for i in range(10, 30))
    assert in_flight.value.exit_code == 3
    assert in_flight.value.last_lines == expected
    assert "its last output:\n    line 10\n" in str(in_flight.value)
    with pytest.raises(kt.ActorDiedError) as later:
        chatty.die()
    assert later.value.last_lines == expected
    quiet = kt.cls(Chatty).options(compute=pool, cpus=0).remote()
    with pytest.raises(kt.ActorDiedError) as silent:
        quiet.die()
    assert silent.value.last_lines == () and "last output" not in str(silent.value)
