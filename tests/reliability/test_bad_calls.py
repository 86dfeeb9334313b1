"""Calls whose arguments do not fit: refused by the caller, before anything is sent.

Behaviours covered:
- too many positional arguments, an unknown keyword, a missing argument, to a method or
  to `__init__`: kt.ArgumentError (a TypeError) naming the class, the method and its
  signature, raised by `.remote()` itself; the actor never sees the call (its count of
  calls does not move) and keeps serving;
- the check (pure) agrees with Python: for generated signatures and calls, `refusal` is
  None exactly when `inspect.Signature.bind` accepts the call.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kt
from kt.core.methods import arity

pytestmark = pytest.mark.timeout(120)


class Tally:
    def __init__(self, start: int, *, step: int = 1) -> None:
        self.n = start
        self.step = step

    def add(self, x: int, y: int = 0) -> int:
        self.n += self.step
        return x + y

    def count(self) -> int:
        return self.n

    def anything(self, *args: Any, **kwargs: Any) -> int:
        return len(args) + len(kwargs)

    @staticmethod
    def pure(a: int, /, b: int) -> int:
        return a + b


def test_arguments_that_do_not_fit_are_refused_before_sending(pool: kt.Compute) -> None:
    with pytest.raises(kt.ArgumentError, match=r"Tally.__init__\(start, \*, step=1\)"):
        kt.cls(Tally).options(compute=pool).remote()
    tally = kt.cls(Tally).options(compute=pool).remote(0)
    assert tally.count() == 0
    for call, said in (
        (lambda: tally.add.remote(1, 2, 3), "too many positional arguments"),
        (lambda: tally.add.remote(1, z=2), "got an unexpected keyword argument 'z'"),
        (lambda: tally.add.remote(), "missing a required argument: 'x'"),
        (lambda: tally.add.remote(1, x=2), "multiple values for argument 'x'"),
        (lambda: tally.pure.remote(a=1, b=2), "'a' parameter is positional only"),
    ):
        with pytest.raises(kt.ArgumentError, match=r"Tally\.\w+\(") as caught:
            call()
        assert said in str(caught.value), caught.value
    assert isinstance(caught.value, TypeError)
    assert tally.count() == 0  # nothing reached the actor
    assert tally.add(1, y=2) == 3 and tally.anything(1, 2, k=3) == 3 and tally.pure(1, b=2) == 3
    assert tally.count() == 1


_KINDS = [
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.KEYWORD_ONLY,
]


@st.composite
def _signatures(draw: st.DrawFn) -> inspect.Signature:
    params: list[inspect.Parameter] = []
    kinds = sorted(draw(st.lists(st.sampled_from(_KINDS), max_size=5)))
    seen_default = False
    for i, kind in enumerate(kinds):
        has_default = draw(st.booleans())
        if kind is not inspect.Parameter.KEYWORD_ONLY:
            has_default = has_default or seen_default  # no required after a default
            seen_default = has_default
        default = 0 if has_default else inspect.Parameter.empty
        params.append(inspect.Parameter(f"p{i}", kind, default=default))
    if draw(st.booleans()):
        where = sum(p.kind is not inspect.Parameter.KEYWORD_ONLY for p in params)
        params.insert(where, inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL))
    if draw(st.booleans()):
        params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


@settings(max_examples=400, deadline=None)
@given(
    _signatures(),
    st.integers(0, 6),
    st.lists(st.sampled_from(["p0", "p1", "p2", "p3", "p4", "zz"]), unique=True, max_size=4),
)
def test_the_check_refuses_exactly_what_python_refuses(
    signature: inspect.Signature, positional: int, keywords: list[str]
) -> None:
    def fn(*args: Any, **kwargs: Any) -> None:
        return None

    fn.__signature__ = signature  # type: ignore[attr-defined]
    checked = arity(fn, bound=False)
    assert checked is not None
    args, kwargs = tuple(range(positional)), dict.fromkeys(keywords, 0)
    try:
        signature.bind(*args, **kwargs)
        fits = True
    except TypeError:
        fits = False
    assert (checked.refusal("f", args, kwargs) is None) == fits


def _scale(x: int, factor: int = 2) -> int:
    return x * factor


def test_a_functions_arguments_are_checked_against_the_function(pool: kt.Compute) -> None:
    scale = kt.fn(_scale).to(pool)
    said = r"_scale.__call__\(x, factor=2\): too many positional"
    with pytest.raises(kt.ArgumentError, match=said):
        scale.remote(1, 2, 3)
    assert scale(3) == 6 and scale(3, factor=3) == 9
