"""A putter's kept mappings: a second write to the same file maps nothing new, and a
mapping goes when its file goes, when it idles, and when room is wanted."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kt.actors import hotmaps
from kt.core import shm


def _mapped_now(name: str) -> bool:
    with open("/proc/self/maps") as maps:
        return any(name in line for line in maps)


@pytest.fixture
def files() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    hotmaps.cool()
    for name in made:
        shm.unlink(name)


def _new(files: list[str], size: int = 2**16) -> str:
    name, mapping = shm.new_file(size)
    mapping.close()
    files.append(name)
    return name


def test_a_second_write_reuses_the_mapping(files: list[str]) -> None:
    name = _new(files)
    before = hotmaps.mapped
    for byte in (b"a", b"b"):
        with hotmaps.writable(name) as mapping:
            mapping[:1] = byte
    assert hotmaps.mapped == before + 1
    assert name in hotmaps.kept() and _mapped_now(name)


def test_a_gone_file_is_dropped_by_sweep_and_a_new_one_is_mapped_anew(
    files: list[str],
) -> None:
    name = _new(files)
    with hotmaps.writable(name) as mapping:
        mapping[:1] = b"a"
    shm.unlink(name)
    hotmaps.sweep()
    assert name not in hotmaps.kept() and not _mapped_now(name)
    with pytest.raises(OSError):
        hotmaps.writable(name)


def test_an_idle_mapping_is_dropped_by_the_timer(
    files: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    hotmaps.cool()
    monkeypatch.setattr(hotmaps, "IDLE_S", 0.2)
    name = _new(files)
    with hotmaps.writable(name) as mapping:
        mapping[:1] = b"a"
    deadline = time.monotonic() + 10
    while name in hotmaps.kept() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert name not in hotmaps.kept() and not _mapped_now(name)


def test_at_most_files_are_kept_and_cool_drops_the_rest(files: list[str]) -> None:
    names = [_new(files) for _ in range(hotmaps.FILES + 2)]
    for name in names:
        with hotmaps.writable(name) as mapping:
            mapping[:1] = b"a"
    kept = hotmaps.kept()
    assert len(kept) == hotmaps.FILES and set(kept) == set(names[-hotmaps.FILES :])
    assert hotmaps.cool() and not hotmaps.kept()
    assert not any(_mapped_now(name) for name in names)
    assert not hotmaps.cool()


def test_a_mapping_in_use_is_not_dropped(files: list[str]) -> None:
    name = _new(files)
    with hotmaps.writable(name) as mapping:
        assert not hotmaps.cool()
        mapping[:1] = b"a"
    assert hotmaps.cool()
