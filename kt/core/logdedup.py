"""Folding one line printed by many actors into one line on the caller's terminal.

`LogDeduplicator` decides, for each line a LOG frame brings, what to print now and what
to hold; it owns no clock, timer or stream. `Runtime.print_log` feeds it on the
runtime's loop thread, writes what it returns, and sets a timer for `next_deadline()`.
Switched by `kt.config.dedup_logs` (KT_DEDUP_LOGS) and `dedup_logs_window`.

Theory of operation (Ray's rules, `ray._private.ray_logging.LogDeduplicator` and
docs.ray.io "Configuring Logging" > "Log deduplication"):

- A line's key drops every word holding a digit ("rank 3 ready" and "rank 12 ready"
  share "rank ready"); a line with no word left is never held (ray#45485).
- The first line of a key prints at once and opens a window of `window` seconds.
  Repeats from that one source print too (a loop's lines all show); once a second
  source has printed the key, every repeat in the window is held and counted.
- When the window ends with N > 1 held: one line, the latest held one with its source,
  plus " [repeated Nx across cluster]", and a new window opens for the key. One held:
  printed as it was. None: the key is forgotten, so its next line prints at once.
- A line matching `allow` always prints; one matching `skip` never does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kt.core.errors import ConfigError

_DIGIT = re.compile(r"\d")  # Ray also names 0x-hex words, which hold a digit anyway

HINT = " (kt folds lines repeated across actors; KT_DEDUP_LOGS=0 prints every copy)"
"""Added once, to the first summary, so a reader learns why lines went missing."""


def canonicalise(line: str) -> str:
    """The key lines are folded by: the words of `line` that hold no digit."""
    return " ".join(word for word in line.split() if not _DIGIT.search(word))


@dataclass
class _Pattern:
    opened: float
    """When this key's window began; it ends at opened + window."""
    sources: set[str] = field(default_factory=set)
    held: int = 0
    """Lines of this key not printed, in this window."""
    last: str = ""
    """The latest held line with its source, as the summary prints it."""


class LogDeduplicator:
    """What to print of each actor's line: a `Runtime` prints everything it returns.

    Unlike a logging filter, it may hold a line and return it later, from `flush`,
    folded into a summary; `drain` returns everything held, for the exit.

    Args:
        window: Seconds a key collects repeats before its summary prints.
        enabled: False prints every line as it comes, like no deduplicator.
        allow: A regex: lines it finds are never held.
        skip: A regex: lines it finds are dropped (after `allow`).

    Raises:
        ConfigError: `window` is negative or a regex does not compile.
    """

    def __init__(
        self,
        *,
        window: float = 5.0,
        enabled: bool = True,
        allow: str | None = None,
        skip: str | None = None,
    ) -> None:
        if window < 0:
            raise ConfigError(f"the log dedup window is {window} s; give 0 or more")
        self.window = window
        self.enabled = enabled
        self.allow = _compile(allow, "KT_DEDUP_LOGS_ALLOW_REGEX")
        self.skip = _compile(skip, "KT_DEDUP_LOGS_SKIP_REGEX")
        self._patterns: dict[str, _Pattern] = {}
        """By key, in the order their windows opened (so ends come first to last)."""
        self._holding = 0
        """How many patterns hold a line: with none, no timer is needed."""
        self._hinted = False
        self._now = float("-inf")

    def feed(self, source: str, line: str, now: float) -> list[str]:
        """Take one line `source` printed at `now`; return the lines to print now,
        summaries of windows that ended before it first.

        Raises:
            ValueError: `now` is before a time given earlier.
        """
        printed = f"{source} {line}"
        if not self.enabled:
            return [printed]
        out = self.flush(now)
        if self.allow is not None and self.allow.search(line):
            out.append(printed)
            return out
        if self.skip is not None and self.skip.search(line):
            return out
        key = canonicalise(line)
        pattern = self._patterns.get(key)
        if not key:
            out.append(printed)  # a line of numbers only: the numbers are the news
        elif pattern is None:
            self._patterns[key] = _Pattern(now, {source})
            out.append(printed)
        else:
            pattern.sources.add(source)
            if len(pattern.sources) == 1:
                out.append(printed)  # one source repeating itself is not folded
            else:
                if not pattern.held:
                    self._holding += 1
                pattern.held += 1
                pattern.last = printed
        return out

    def flush(self, now: float) -> list[str]:
        """End the windows that ended by `now`; return what they held, to print now.

        Raises:
            ValueError: `now` is before a time given earlier.
        """
        if now < self._now:
            raise ValueError(f"log dedup time went back from {self._now} to {now}")
        self._now = now
        out: list[str] = []
        while self._patterns:
            key, pattern = next(iter(self._patterns.items()))
            if now < pattern.opened + self.window:
                break
            del self._patterns[key]
            if pattern.held:
                self._holding -= 1
                out.append(self._summary(pattern) if pattern.held > 1 else pattern.last)
            if pattern.held > 1:  # still repeating: go on folding, in a new window
                pattern.opened, pattern.held = now, 0
                self._patterns[key] = pattern
        return out

    def drain(self) -> list[str]:
        """Everything held, summarised as if every window ended now; then forget all."""
        out = [
            self._summary(p) if p.held > 1 else p.last for p in self._patterns.values() if p.held
        ]
        self._patterns.clear()
        self._holding = 0
        return out

    def next_deadline(self) -> float | None:
        """When `flush` next may have something to print, or None while nothing is held."""
        if not self._holding:
            return None
        return next(iter(self._patterns.values())).opened + self.window

    def validate(self) -> None:
        """Assert the invariants (for tests)."""
        opened = [p.opened for p in self._patterns.values()]
        assert opened == sorted(opened), "windows out of order"
        assert self._holding == sum(1 for p in self._patterns.values() if p.held)
        for key, p in self._patterns.items():
            assert key and p.sources, key
            assert not p.held or len(p.sources) > 1, f"{key!r} held from one source"

    def _summary(self, pattern: _Pattern) -> str:
        hint = "" if self._hinted else HINT
        self._hinted = True
        return f"{pattern.last} [repeated {pattern.held}x across cluster]{hint}"


def _compile(pattern: str | None, setting: str) -> re.Pattern[str] | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{setting}={pattern!r} is not a regex ({exc}); fix it") from exc
