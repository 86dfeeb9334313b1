"""Shared-memory segments: data arrives intact as views, a segment is reused only once
its receiver has dropped every view, and names outside kt's are refused."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from kt.core import serialization, shm


def test_round_trip_through_a_segment_is_a_view() -> None:
    arena = shm.ShmArena()
    arr = np.arange(2 * 2**20, dtype=np.uint8)
    parts = serialization.dumps(arr, arena)
    assert not any(isinstance(p, memoryview) and p.nbytes >= 2**20 for p in parts)
    out = serialization.loads(b"".join(parts))
    assert np.array_equal(out, arr)


def test_buffers_copied_on_the_copy_threads_arrive_whole() -> None:
    arena = shm.ShmArena()
    rng = np.random.default_rng(7)
    sizes = (9 * 2**20 + 3, 2**20 + 1, 17 * 2**20 + 5)  # 27 MiB in all: threaded pieces
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    out = serialization.loads(b"".join(serialization.dumps(arrays, arena)))
    assert [a.nbytes for a in out] == list(sizes)
    assert all(np.array_equal(a, b) for a, b in zip(out, arrays, strict=True))


def test_segment_is_reused_only_after_the_receiver_drops_it() -> None:
    arena = shm.ShmArena()
    first = serialization.loads(b"".join(serialization.dumps(np.full(2**21, 1, np.uint8), arena)))
    second = serialization.loads(b"".join(serialization.dumps(np.full(2**21, 2, np.uint8), arena)))
    assert len(arena._segments) == 2  # the first is still held: not overwritten
    assert int(first[0]) == 1 and int(second[0]) == 2
    del first
    gc.collect()
    third = serialization.loads(b"".join(serialization.dumps(np.full(2**21, 3, np.uint8), arena)))
    assert len(arena._segments) == 2  # the first one's segment came back
    assert int(second[0]) == 2 and int(third[0]) == 3


def test_unclaimed_segment_is_not_reused() -> None:
    arena = shm.ShmArena()
    serialization.dumps(np.zeros(2**21, np.uint8), arena)  # never received
    serialization.dumps(np.zeros(2**21, np.uint8), arena)
    assert len(arena._segments) == 2


def test_foreign_names_are_refused() -> None:
    with pytest.raises(ValueError):
        shm.attach("../etc/passwd", [64], [1])


def test_kt_shm_0_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert shm.host_key() is not None
    monkeypatch.setenv("KT_SHM", "0")
    assert shm.host_key() is None


@pytest.mark.parametrize("size", [3 * 2**20 + 5, 40 * 2**20 + 7])  # alone, then threaded
def test_write_at_and_read_into_copy_every_byte(size: int) -> None:
    name, owner = shm.new_file(size + 100)
    try:
        source = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        head = np.arange(11, dtype=np.uint8)
        mapping = shm.open_for_writing(name)
        shm.write_at(mapping, 50, [memoryview(head), memoryview(source)])
        mapping.close()
        assert bytes(owner[50:61]) == bytes(head)
        assert bytes(owner[61 : 61 + size]) == source.tobytes()
        reader = shm.open_for_reading(name)
        out = np.zeros(size, np.uint8)
        small = bytearray(11)
        shm.read_into(reader, [(50, memoryview(small)), (61, memoryview(out))])
        assert bytes(small) == bytes(head) and np.array_equal(out, source)
        with pytest.raises(OSError, match="ended"):
            shm.read_into(reader, [(61, memoryview(np.zeros(size + 100, np.uint8)))])
        reader.close()
    finally:
        owner.close()
        shm.unlink(name)


def test_write_at_refuses_what_does_not_fit() -> None:
    name, owner = shm.new_file(100)
    try:
        with pytest.raises(ValueError, match="do not fit"):
            shm.write_at(owner, 90, [memoryview(b"x" * 11)])
        shm.write_at(owner, 90, [memoryview(b"y" * 10)])
        assert bytes(owner[90:100]) == b"y" * 10
    finally:
        owner.close()
        shm.unlink(name)
