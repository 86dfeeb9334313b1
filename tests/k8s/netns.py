"""A program in a network namespace of its own that reaches only the addresses given.

`reaching(addresses, tmp)` yields the argv prefix that runs a program there: `unshare
-rn` (a user and network namespace: only a loopback device, down), then this file, which
brings loopback up, listens on each given host:port (the same as outside) and relays
every connection to a Unix socket; the test process relays each socket to the real
address, and closes every relay still open when the block ends. Nothing else is
reachable: a pod's address (127.1.x.y) leads to an empty loopback there, so a driver
that dials a pod directly gets "connection refused".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fcntl
import pathlib
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

Address = tuple[str, int]
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def _splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    far: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    await asyncio.gather(_pipe(reader, far[1]), _pipe(far[0], writer))


@contextlib.contextmanager
def reaching(addresses: list[Address], tmp: pathlib.Path) -> Iterator[list[str]]:
    """The argv prefix of a program that reaches only `addresses` (relayed while open)."""
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is not on this machine"
    loop = asyncio.new_event_loop()
    servers: list[asyncio.AbstractServer] = []
    relayed: set[asyncio.StreamWriter] = set()  # both ends of each open relay
    routes = []
    for i, address in enumerate(addresses):
        path = tmp / f"reach-{i}.sock"

        async def relay(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to: Address = address
        ) -> None:
            try:
                far = await asyncio.open_connection(*to)
            except OSError:
                writer.close()
                return
            ends = {writer, far[1]}
            relayed.update(ends)
            try:
                await _splice(reader, writer, far)
            finally:
                relayed.difference_update(ends)

        servers.append(loop.run_until_complete(asyncio.start_unix_server(relay, str(path))))
        routes += ["--reach", f"{address[0]}:{address[1]}={path}"]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield [unshare, "-rn", sys.executable, str(pathlib.Path(__file__)), *routes, "--"]
    finally:
        # the program has ended, but its relays may not have seen it yet: a connection left
        # open in a stopped loop is one that nobody reads again (a watch's, say, that the
        # API server would write to until its socket filled)
        async def close() -> None:
            for server in servers:
                server.close()
            for end in relayed:
                end.transport.abort()

        with contextlib.suppress(concurrent.futures.TimeoutError):
            asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()


def _loopback_up() -> None:
    with socket.socket() as s:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s, SIOCGIFFLAGS, request)[:18])[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP))


def main() -> int:
    argv = sys.argv[1:]
    cut = argv.index("--")
    pairs, program = argv[:cut], argv[cut + 1 :]
    routes = [pairs[i + 1].split("=", 1) for i in range(0, len(pairs), 2)]
    _loopback_up()
    loop = asyncio.new_event_loop()
    for where, path in routes:
        host, port = where.rsplit(":", 1)

        async def relay(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter, to: str = path
        ) -> None:
            await _splice(reader, writer, await asyncio.open_unix_connection(to))

        loop.run_until_complete(asyncio.start_server(relay, host, int(port)))
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return subprocess.call(program)


if __name__ == "__main__":
    sys.exit(main())
