"""LogDeduplicator as a plain object, on a fake clock (seconds given to each call).

Covers: the first line of a key prints at once; repeats from 3 other sources inside the
window are held and print once, after it, as "[repeated 3x across cluster]" with the
latest source, the hint on the first summary only; lines differing only in numbers are
one key, lines of numbers only are never held; different lines are not merged; one
source repeating itself prints every time, but once a second source printed the key
the first source's repeats are held too; one held line prints as it was; a window that
held nothing forgets its key, one that summarised keeps folding for one more window;
`feed` ends windows itself, before the new line; `drain` returns what is held; allow and
skip regexes; the off switch; refusals (time going back, bad regex, negative window);
and, as a property over random feeds and flushes, that no line is lost or made up and
none is held past a window after the last one.
"""

from __future__ import annotations

import collections
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kt.core.errors import ConfigError
from kt.core.logdedup import HINT, LogDeduplicator, canonicalise

A, B, C, D, E = "(W pid=1)", "(W pid=2)", "(W pid=3)", "(W pid=4)", "(W pid=5)"


def _repeated(printed: str, n: int, *, hint: bool = False) -> str:
    return f"{printed} [repeated {n}x across cluster]" + (HINT if hint else "")


def test_first_line_prints_at_once_and_holds_nothing() -> None:
    d = LogDeduplicator(window=5.0)
    assert d.feed(A, "hello", 0.0) == [f"{A} hello"]
    assert d.next_deadline() is None  # nothing held: no timer needed
    d.validate()


def test_three_other_sources_in_the_window_print_one_summary_after_it() -> None:
    d = LogDeduplicator(window=5.0)
    assert d.feed(A, "hello", 0.0) == [f"{A} hello"]
    assert d.feed(B, "hello", 1.0) == []
    assert d.feed(C, "hello", 2.0) == []
    assert d.feed(D, "hello", 3.0) == []
    d.validate()
    assert d.next_deadline() == 5.0
    assert d.flush(4.99) == []
    assert d.flush(5.0) == [_repeated(f"{D} hello", 3, hint=True)]  # the latest source
    d.validate()


def test_the_hint_goes_with_the_first_summary_only() -> None:
    d = LogDeduplicator(window=5.0)
    for src in (A, B, C):
        d.feed(src, "one", 0.0)
        d.feed(src, "two", 0.0)
    assert d.flush(5.0) == [_repeated(f"{C} one", 2, hint=True), _repeated(f"{C} two", 2)]


def test_lines_differing_only_in_numbers_are_one_key() -> None:
    assert canonicalise("step 12 loss 0.25") == canonicalise("step 3 loss 1e-4") == "step loss"
    assert canonicalise("rank3  ready  at 0x1f") == "ready at"  # a word with a digit goes
    d = LogDeduplicator(window=5.0)
    assert d.feed(A, "step 1 loss 0.5", 0.0) == [f"{A} step 1 loss 0.5"]
    assert d.feed(B, "step 1 loss 0.25", 0.1) == []
    assert d.feed(C, "step 1 loss 0.125", 0.2) == []
    assert d.flush(5.0) == [_repeated(f"{C} step 1 loss 0.125", 2, hint=True)]


def test_lines_of_numbers_only_are_never_held() -> None:
    d = LogDeduplicator(window=5.0)
    outs = [d.feed(src, str(i), 0.0) for i, src in enumerate((A, B, C, B))]
    assert outs == [[f"{A} 0"], [f"{B} 1"], [f"{C} 2"], [f"{B} 3"]]
    assert d.next_deadline() is None and d.drain() == []


def test_different_lines_are_not_merged() -> None:
    d = LogDeduplicator(window=5.0)
    assert d.feed(A, "hello", 0.0) == [f"{A} hello"]
    assert d.feed(B, "goodbye", 0.0) == [f"{B} goodbye"]
    assert d.feed(C, "hello there", 0.0) == [f"{C} hello there"]
    assert d.next_deadline() is None and d.flush(10.0) == []


def test_one_source_repeating_itself_prints_every_time() -> None:
    d = LogDeduplicator(window=5.0)
    assert [d.feed(A, f"tick {i}", i * 0.1) for i in range(5)] == [
        [f"{A} tick {i}"] for i in range(5)
    ]
    assert d.next_deadline() is None


def test_once_a_second_source_printed_it_the_first_sources_repeats_are_held_too() -> None:
    d = LogDeduplicator(window=5.0)
    assert d.feed(A, "hello", 0.0) == [f"{A} hello"]
    assert d.feed(B, "hello", 1.0) == []
    assert d.feed(A, "hello", 2.0) == []  # as Ray: the key is now "across the cluster"
    assert d.flush(5.0) == [_repeated(f"{A} hello", 2, hint=True)]


def test_one_held_line_prints_as_it_was() -> None:
    d = LogDeduplicator(window=5.0)
    d.feed(A, "hello 1", 0.0)
    assert d.feed(B, "hello 2", 1.0) == []
    assert d.flush(5.0) == [f"{B} hello 2"]  # no "[repeated 1x ...]"
    assert d.next_deadline() is None


def test_after_a_window_that_held_nothing_the_line_prints_at_once_again() -> None:
    d = LogDeduplicator(window=5.0)
    d.feed(A, "hello", 0.0)
    assert d.flush(5.0) == []
    assert d.feed(B, "hello", 6.0) == [f"{B} hello"]  # a first occurrence again
    assert d.feed(A, "hello", 12.0) == [f"{A} hello"]  # ended by feed itself, no flush


def test_after_a_summary_the_key_folds_for_one_more_window_then_prints_at_once() -> None:
    d = LogDeduplicator(window=5.0)
    for src in (A, B, C):
        d.feed(src, "hello", 0.0)
    assert d.flush(5.0) == [_repeated(f"{C} hello", 2, hint=True)]
    assert d.feed(D, "hello", 6.0) == []  # still repeating across the cluster: held
    assert d.next_deadline() == 10.0
    assert d.flush(10.0) == [f"{D} hello"]
    assert d.feed(E, "hello", 11.0) == [f"{E} hello"]
    d.validate()


def test_feed_ends_windows_that_ended_before_the_new_line() -> None:
    d = LogDeduplicator(window=5.0)
    for src in (A, B, C, D):
        d.feed(src, "hello", 0.0)
    assert d.feed(E, "other", 7.0) == [_repeated(f"{D} hello", 3, hint=True), f"{E} other"]


def test_drain_returns_everything_held_at_once() -> None:
    d = LogDeduplicator(window=60.0)
    for src in (A, B, C, D):
        d.feed(src, "hello", 0.0)
        d.feed(src, f"bye {src}", 0.0)
    d.feed(A, "lonely", 0.0)
    d.feed(A, "pair", 0.0)
    d.feed(B, "pair", 0.0)
    assert d.drain() == [
        _repeated(f"{D} hello", 3, hint=True),
        _repeated(f"{D} bye {D}", 3),  # "(W pid=4)" holds a digit: one key for all
        f"{B} pair",
    ]
    assert d.next_deadline() is None and d.drain() == [] and d.flush(100.0) == []
    d.validate()


def test_allow_regex_lines_are_never_held_and_skip_regex_lines_never_print() -> None:
    d = LogDeduplicator(window=5.0, allow=r"^KEEP", skip=r"noise|KEEP")
    assert [d.feed(src, "KEEP me", 0.0) for src in (A, B)] == [[f"{A} KEEP me"], [f"{B} KEEP me"]]
    assert [d.feed(src, "some noise", 0.0) for src in (A, B)] == [[], []]
    assert d.drain() == []


def test_off_prints_every_line_and_holds_nothing() -> None:
    d = LogDeduplicator(window=5.0, enabled=False, skip="hello")
    assert [d.feed(src, "hello", 0.0) for src in (A, B, C, D)] == [
        [f"{src} hello"] for src in (A, B, C, D)
    ]
    assert d.next_deadline() is None and d.flush(10.0) == [] and d.drain() == []


def test_misuse_is_refused() -> None:
    d = LogDeduplicator(window=5.0)
    d.feed(A, "hello", 3.0)
    with pytest.raises(ValueError, match="went back"):
        d.feed(A, "hello", 2.0)
    with pytest.raises(ConfigError, match="KT_DEDUP_LOGS_ALLOW_REGEX"):
        LogDeduplicator(allow="(")
    with pytest.raises(ConfigError, match="KT_DEDUP_LOGS_SKIP_REGEX"):
        LogDeduplicator(skip="[")
    with pytest.raises(ConfigError, match="window"):
        LogDeduplicator(window=-1.0)


# -- no line is lost --------------------------------------------------------------------
SUMMARY = re.compile(r"^(?P<printed>.*) \[repeated (?P<n>\d+)x across cluster\]$")
LINES = ["hello", "hello 1", "hello 22", "bye", "7", "", "x1 y", "x2 y", "loss=0.5 ok"]


def _key(printed: str) -> str:
    line = printed.split(" ", 1)[1]
    return canonicalise(line) or f"exact:{line}"


@settings(max_examples=300, deadline=None)
@given(
    window=st.sampled_from([0.0, 0.5, 5.0]),
    steps=st.lists(
        st.tuples(
            st.integers(0, 3),  # source
            st.sampled_from(LINES),
            st.floats(0, 3, allow_nan=False),  # seconds since the previous step
            st.booleans(),  # the timer fires (flush at next_deadline) before this line
        ),
        max_size=60,
    ),
)
def test_every_line_is_printed_or_counted_once_everything_is_flushed(
    window: float, steps: list[tuple[int, str, float, bool]]
) -> None:
    d = LogDeduplicator(window=window)
    fed: list[str] = []
    out: list[str] = []
    now = 0.0
    for source, line, dt, timer in steps:
        now += dt
        deadline = d.next_deadline()
        if timer and deadline is not None and deadline <= now:
            out += d.flush(deadline)
        out += d.feed(f"(S{source})", line, now)
        fed.append(f"(S{source}) {line}")
        d.validate()
    out += d.flush(now + window)  # a window after the last line, nothing is held
    assert d.next_deadline() is None and d.drain() == []
    d.validate()

    counted: collections.Counter[str] = collections.Counter()
    plain: collections.Counter[str] = collections.Counter()
    for text in out:
        text = text.removesuffix(HINT)
        if m := SUMMARY.match(text):
            assert m["printed"] in fed, text  # a summary shows a line that was printed
            assert int(m["n"]) >= 2, text
            counted[_key(m["printed"])] += int(m["n"])
        else:
            plain[text] += 1
            counted[_key(text)] += 1
    assert plain <= collections.Counter(fed), "a line printed more often than fed"
    assert counted == collections.Counter(_key(p) for p in fed), "a line lost or made up"
