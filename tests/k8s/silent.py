"""An API server that takes connections, completes TLS and never answers (stalled, or
half-open): `silent_api_server(tmp)` yields a kubeconfig for it and the connections it
holds, served from a thread of its own, all closed on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import threading
from collections.abc import Iterator

from kt.testing import apiserver


@contextlib.contextmanager
def silent_api_server(
    tmp: pathlib.Path,
) -> Iterator[tuple[pathlib.Path, list[asyncio.StreamWriter]]]:
    tls = apiserver.make_tls()
    loop = asyncio.new_event_loop()
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # TLS done, requests read by nobody, never an answer

    server = loop.run_until_complete(asyncio.start_server(silent, "127.0.0.1", 0, ssl=tls.context))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        kubeconfig = tmp / "kubeconfig"
        kubeconfig.write_text(json.dumps(apiserver.kubeconfig(url, "t", tls.ca_pem)))
        yield kubeconfig, held
    finally:

        async def close() -> None:
            server.close()
            for writer in held:
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
