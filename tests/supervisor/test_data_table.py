"""The data store's decisions and buffers, without pods: where a value goes, the broadcast
tree's shape, puts and replicas in a pod's table, raw chunk framing, state dicts copied in
place, pieces of a put, and the memory a pod may still fill."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kt.actors.datastore import _pieces, copy_into
from kt.core import cgroup, serialization, shm
from kt.core.channel import FrameChannel
from kt.core.errors import StateDictMismatchError, ValueGoneError
from kt.supervisor.data import MARGIN, DataTable, EntryState, Medium, choose_medium, route
from kt.supervisor.pull import ValueGone, replicate

MIB = 2**20


def test_a_value_goes_to_shm_when_it_fits_else_memory_else_nowhere() -> None:
    assert choose_medium(MIB, shm_free=1024 * MIB, memory_free=1024 * MIB) is Medium.SHM
    assert choose_medium(MIB, shm_free=MIB, memory_free=1024 * MIB) is Medium.MEMORY
    assert choose_medium(MIB, shm_free=None, memory_free=1024 * MIB) is Medium.MEMORY
    # /dev/shm pages are memory: a roomy /dev/shm does not help a full pod
    assert choose_medium(MIB, shm_free=1024 * MIB, memory_free=MARGIN) is None


def test_the_tree_is_a_heap_in_arrival_order_and_skips_dead_nodes() -> None:
    nodes = [""]  # the origin
    sources = [route(nodes, set(), f"pod{i}", 2) for i in range(1, 8)]
    assert sources == ["", "", "pod1", "pod1", "pod2", "pod2", "pod3"]
    assert sum(s == "" for s in sources) == 2  # the origin serves `fanout` pods
    assert route(nodes, set(), "pod4", 2) == "pod1"  # asked again: the same parent
    assert route(nodes, {"pod1"}, "pod4", 2) == ""  # its parent is dead: the origin
    assert route(nodes, {"pod3"}, "pod7", 2) == "pod1"  # the nearest live ancestor
    chain = [""]
    assert [route(chain, set(), f"p{i}", 1) for i in range(1, 4)] == ["", "p1", "p2"]


def _table() -> DataTable:
    return DataTable("pod-a", shm.host_key())


def test_a_put_is_invisible_until_sealed_and_replaces_the_old_value() -> None:
    async def main() -> None:
        table = _table()
        put_id, _ = table.reserve("k", 11)
        table.write(put_id, 0, memoryview(b"hello world"))
        assert table.origin("k") is None and table.listing("") == {}
        with pytest.raises(ValueError, match="outside the value"):
            table.write(put_id, 5, memoryview(b"too long now"))
        sealed = table.seal(put_id, "", "token")
        assert table.origin("k") is sealed and table.listing("") == {"k": 11}
        assert bytes(sealed.view) == b"hello world"
        second, _ = table.reserve("k", 3)
        table.seal(second, "", "token")
        assert sealed.state is EntryState.GONE
        assert table.held("k", sealed.vid) is None  # a getter of the old value re-locates
        table.close()

    asyncio.run(main())


@pytest.mark.skipif(shm.host_key() is None, reason="no /dev/shm on this machine")
def test_a_dropped_file_is_reused_only_when_nobody_reads_it() -> None:
    async def main() -> None:
        table = _table()
        first_id, first = table.reserve("a", 1000)
        table.write(first_id, 0, memoryview(b"x" * 1000))
        table.seal(first_id, "", "token")
        name = first.file
        assert name is not None
        reader = shm.open_for_reading(name)  # a getter maps it and keeps the view
        assert bytes(shm.value_view(reader, first.vid, 1000)) == b"x" * 1000
        table.remove("a")
        await asyncio.sleep(0)  # pooled after this turn of the loop
        assert [n for n, _ in table.pool] == [name]
        _, second = table.reserve("b", 900)
        assert second.file != name  # read: not reused
        del reader
        _, third = table.reserve("c", 800)
        assert third.file == name  # nobody reads it now: reused, pages and all
        late = shm.open_for_reading(name)  # a getter that located "a" before it was removed
        with pytest.raises(FileNotFoundError, match="no longer holds"):
            shm.value_view(late, first.vid, 1000)
        _, big = table.reserve("d", 3000)  # too large for what is pooled: a new file
        assert big.file not in (name, second.file)
        table.close()
        assert not os.path.exists(os.path.join(shm.SHM_DIR, name))

    asyncio.run(main())


def test_replicas_answer_only_for_their_value_and_are_not_listed() -> None:
    async def main() -> None:
        table = _table()
        replica = table.replica("k", 4, "vid-1")
        assert table.held("k", "vid-1") is replica and table.held("k", "vid-2") is None
        assert table.origin("k") is None and table.listing("") == {}
        waiter = asyncio.ensure_future(replica.wait_for(4, 10))
        await asyncio.sleep(0)
        replica.have = 4
        replica.advanced()
        await waiter
        failing = asyncio.ensure_future(table.replica("j", 4, "vid-3").wait_for(4, 10))
        await asyncio.sleep(0)
        assert table.remove("j") is False  # a replica: this pod was not its origin
        with pytest.raises(ValueGoneError, match="replaced or removed"):
            await failing
        stalled = table.replica("s", 4, "vid-4")
        with pytest.raises(TimeoutError):  # no byte for the timeout: the waiter gives up
            await stalled.wait_for(4, 0.05)
        table.close()

    asyncio.run(main())


def test_a_late_replica_of_another_value_leaves_the_pods_own_value() -> None:
    async def main() -> None:
        table = _table()
        put_id, _ = table.reserve("k", 5)
        table.write(put_id, 0, memoryview(b"mine!"))
        own = table.seal(put_id, "", "token")
        late = table.replica("k", 3, "an-older-put-elsewhere")
        assert table.origin("k") is own and table.held("k", own.vid) is own
        assert table.held("k", late.vid) is late and table.listing("") == {"k": 5}
        newer = table.replica("k", 3, "a-newer-put-elsewhere")
        assert late.state is EntryState.GONE and table.held("k", newer.vid) is newer
        assert table.remove("k") is True and newer.state is EntryState.GONE
        table.close()

    asyncio.run(main())


def test_a_put_of_a_connection_that_closed_is_dropped() -> None:
    async def main() -> None:
        table = _table()
        mine, entry = table.reserve("k", 10, owner=7)
        theirs, _ = table.reserve("j", 10, owner=8)
        table.abandon_owner(7)
        assert set(table.pending) == {theirs} and entry.state is EntryState.GONE
        with pytest.raises(LookupError, match="is reserved"):
            table.seal(mine, "", "token")
        with pytest.raises(ValueError, match="-1 bytes"):
            table.reserve("k", -1)
        table.close()

    asyncio.run(main())


def test_a_replica_dropped_before_its_pull_ends_stops_it() -> None:
    async def main() -> None:
        table = _table()
        entry = table.replica("k", 4, "vid")
        table.drop_replica(entry)
        pull = replicate(
            entry, ("127.0.0.1", 9), "t", node="n", node_token="t", caller="c", counted=print
        )
        with pytest.raises(ValueGone):  # at once: the origin (port 9, discard) is not asked
            await asyncio.wait_for(pull, 5)
        table.close()

    asyncio.run(main())


@pytest.mark.skipif(shm.host_key() is None, reason="no /dev/shm on this machine")
def test_a_file_whose_bytes_are_still_queued_to_send_is_not_reused() -> None:
    """The event loop queues views of a value's file without copying: a reader that
    reads slowly must get the bytes that were queued, not the next value's."""

    async def main() -> None:
        table = _table()
        size = 32 * MIB
        put_id, entry = table.reserve("k", size)
        table.write(put_id, 0, memoryview(b"\x01" * size))
        table.seal(put_id, "", "token")
        name = entry.file
        ours, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        channel = FrameChannel(lambda *args: None)
        await loop.connect_accepted_socket(lambda: channel, ours)
        channel.send(entry.view)  # far more than the socket takes: the rest is queued
        entry.sent_on(channel)
        await asyncio.sleep(0.05)
        assert channel.writing
        table.remove("k")  # freed while being sent: not pooled
        assert name not in [n for n, _ in table.pool]
        put_id, other = table.reserve("j", size)  # a new file, not the one being sent
        assert other.file != name
        other.view[:] = b"\x02" * size
        received = bytearray()
        theirs.setblocking(False)
        while len(received) < size:
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        assert received == b"\x01" * size
        await asyncio.sleep(0.05)
        assert not channel.writing
        channel.close()
        theirs.close()
        table.close()

    asyncio.run(main())


@given(st.integers(0, 2**47), st.integers(0, 2**30))
def test_a_value_starts_where_its_largest_buffer_keeps_its_page_offset(
    address: int, position: int
) -> None:
    start = shm.value_start(address, position)
    assert shm.VALUE_OFFSET <= start < shm.VALUE_OFFSET + shm.VALUE_SLACK
    assert (start + position) % 4096 == address % 4096


@pytest.mark.skipif(shm.host_key() is None, reason="no /dev/shm on this machine")
def test_a_putter_that_writes_the_file_chooses_where_the_value_starts() -> None:
    async def main() -> None:
        table = _table()
        put_id, entry = table.reserve("k", 5)
        with pytest.raises(ValueError, match="cannot start at byte"):
            table.seal(put_id, "", "token", start=shm.VALUE_OFFSET + shm.VALUE_SLACK + 1)
        assert put_id in table.pending  # refused: still reserved, its putter abandons it
        start = shm.VALUE_OFFSET + 1000
        entry.buffer[start : start + 5] = b"hello"
        sealed = table.seal(put_id, "", "token", start=start)
        assert bytes(sealed.view) == b"hello"
        assert entry.file is not None
        reader = shm.open_for_reading(entry.file)
        assert bytes(shm.value_view(reader, sealed.fid, 5)) == b"hello"
        del reader
        table.close()

    asyncio.run(main())


def test_raw_chunks_round_trip_and_anything_else_is_refused() -> None:
    data = memoryview(os.urandom(100_000))
    payload = memoryview(b"".join(bytes(p) for p in serialization.raw_parts(data)))
    assert bytes(serialization.raw_of(payload)) == bytes(data)
    assert bytes(serialization.loads(payload)) == bytes(data)
    for bad in (payload[:10], payload[:-1], memoryview(b"".join(serialization.dumps(b"x" * 99)))):
        with pytest.raises(ValueError, match="not a raw payload"):
            serialization.raw_of(bad)


@given(
    st.lists(st.integers(0, 300), max_size=6),
    st.integers(1, 128),
)
def test_pieces_cover_the_parts_in_order_and_in_bounds(sizes: list[int], size: int) -> None:
    parts = [os.urandom(n) for n in sizes]
    joined = b"".join(parts)
    rebuilt = bytearray()
    for offset, piece in _pieces(parts, size):
        assert offset == len(rebuilt)
        chunk = b"".join(bytes(p) for p in piece)
        assert 0 < len(chunk) <= size
        rebuilt += chunk
    assert bytes(rebuilt) == joined


def test_copy_into_updates_tensors_in_place_after_checking_everything() -> None:
    target = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "a": np.zeros(4), "step": 0}
    pointers = {k: target[k].data_ptr() for k in ("w", "b")}
    source = {"w": torch.ones(2, 3), "b": torch.full((3,), 2.0), "a": np.ones(4), "step": 7}
    copy_into(target, source, "weights/v1")
    assert {k: target[k].data_ptr() for k in ("w", "b")} == pointers
    assert torch.equal(target["w"], source["w"]) and float(target["b"][0]) == 2.0
    assert target["a"].sum() == 4 and target["step"] == 7

    cases = [
        ({**source, "b": torch.zeros(4)}, r"'b' of 'k': shape \(4,\) is stored, into has \(3,\)"),
        ({**source, "w": torch.zeros(2, 3, dtype=torch.float64)}, r"'w' of 'k': dtype"),
        ({k: v for k, v in source.items() if k != "a"}, r"key 'a' is missing from the stored"),
        ({**source, "extra": torch.zeros(1)}, r"key 'extra' is missing from into"),
        ([1, 2], r"'k' holds a list, not a state dict"),
    ]
    fresh = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "a": np.zeros(4), "step": 0}
    for stored, message in cases:
        with pytest.raises(StateDictMismatchError, match=message):
            copy_into(fresh, stored, "k")
        assert float(fresh["w"].sum()) == 0 and fresh["step"] == 0  # nothing was copied


def _cgroup(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp / name).write_text(text)
    return tmp


def test_available_memory_is_the_smaller_of_the_machine_and_the_pods_cgroup(
    tmp_path: Path,
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 4000000 kB\n")
    v2 = tmp_path / "v2"
    v2.mkdir()
    _cgroup(v2, {"cgroup.controllers": "memory", "memory.max": str(512 * MIB)})
    _cgroup(v2, {"memory.current": str(300 * MIB), "memory.stat": f"inactive_file {100 * MIB}"})
    assert cgroup.available_memory(v2, str(meminfo)) == 312 * MIB  # 512 - (300 - 100)
    (v2 / "memory.max").write_text("max")
    assert cgroup.available_memory(v2, str(meminfo)) == 4000000 * 1024
    v1 = tmp_path / "v1"
    v1.mkdir()
    _cgroup(v1, {"memory.limit_in_bytes": str(256 * MIB), "memory.usage_in_bytes": str(56 * MIB)})
    _cgroup(v1, {"memory.stat": "total_inactive_file 0\ncache 0"})
    assert cgroup.available_memory(v1, str(meminfo)) == 200 * MIB
