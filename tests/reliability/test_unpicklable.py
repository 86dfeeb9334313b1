"""Arguments and results that cannot be pickled (a local pool's actor).

Behaviours covered:
- a lock, a socket, a generator, a lambda whose closure holds a lock, and a lock deep in
  a dict: kt.SerializationError before anything is sent, naming the argument's path
  down to the culprit (for a function: its closure variable), the method, and the fix;
- a result holding the same things fails that call only, with the path inside the value;
  the actor keeps its state (its counter goes on from where it was).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

import kt

pytestmark = pytest.mark.timeout(120)


class Keeper:
    def __init__(self) -> None:
        self.n = 0

    def incr(self, _: Any = None) -> int:
        self.n += 1
        return self.n

    def bad(self, what: str) -> Any:
        self.n += 1
        lock = threading.Lock()
        return {
            "lock": lambda: {"ok": 1, "held": [lock]},
            "generator": lambda: (i for i in range(3)),
            "socket": lambda: socket.socket(),
            "closure": lambda: lambda: lock,
        }[what]()


@pytest.fixture(scope="module")
def keeper(pool: kt.Compute) -> Any:
    handle = kt.cls(Keeper).options(compute=pool).remote()
    yield handle
    kt.kill(handle)


LOCK = threading.Lock()
lock = threading.Lock()  # a global that only shares its name with an attribute below
GENERATOR = (i for i in range(2))


class Plain:
    lock = 1


@pytest.mark.parametrize(
    ("argument", "path", "what"),
    [
        (threading.Lock(), "argument 0", "'_thread.lock'"),
        (socket.socket(), "argument 0", "'socket'"),
        ((i for i in range(2)), "argument 0", "'generator'"),
        (lambda: LOCK, "argument 0's global 'LOCK'", "'_thread.lock'"),
        ({"a": [1, {"b": threading.Lock()}]}, "argument 0['a'][1]['b']", "'_thread.lock'"),
    ],
    ids=["lock", "socket", "generator", "function-global", "nested"],
)
def test_an_unpicklable_argument_is_named_before_sending(
    keeper: Any, argument: Any, path: str, what: str
) -> None:
    before = keeper.incr()
    with pytest.raises(kt.SerializationError) as info:
        keeper.incr.remote(argument)
    message = str(info.value)
    assert f"could not pickle {path} of Keeper.incr" in message
    assert f"cannot pickle {what} object" in message and "Pass a picklable value" in message
    assert keeper.incr() == before + 1  # nothing was sent: no call ran


def test_a_closure_is_searched_by_variable_name(keeper: Any) -> None:
    held = threading.Lock()
    with pytest.raises(kt.SerializationError, match="argument 0's closure variable 'held'"):
        keeper.incr.remote(lambda: held)


def test_only_the_globals_a_function_loads_are_suspects(keeper: Any) -> None:
    """`Plain.lock` is an attribute: the module's global `lock` is not what fails."""
    with pytest.raises(kt.SerializationError) as info:
        keeper.incr.remote(lambda: (Plain.lock, [x for x in GENERATOR]))
    assert "argument 0's global 'GENERATOR'" in str(info.value)
    assert "'generator'" in str(info.value)


@pytest.mark.parametrize(
    ("what", "path"),
    [
        ("lock", "the value['held'][0]"),
        ("generator", "the value"),
        ("socket", "the value"),
        ("closure", "the value's closure variable 'lock'"),
    ],
)
def test_an_unpicklable_result_fails_that_call_only(keeper: Any, what: str, path: str) -> None:
    before = keeper.incr()
    with pytest.raises(kt.SerializationError) as info:
        keeper.bad(what)
    assert f"could not pickle {path} of Keeper.bad" in str(info.value)
    assert keeper.incr() == before + 2  # the failed call ran; the actor kept its state
