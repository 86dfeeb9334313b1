"""A small client of the Kubernetes REST API, for the test cluster's kubelet and scheduler.

They use the public API only (so they would run against a real kube-apiserver), over
aiohttp: kt's own Kubernetes client (kubernetes_asyncio, in kt/k8s) is not used here, so
the test cluster stays an independent check of it.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


class Gone(Exception):
    """A watch's resourceVersion is older than the server keeps (410): list again."""


class Rest:
    """One aiohttp session to the API server; `await close()` when done."""

    def __init__(self, url: str, token: str, ca_pem: bytes) -> None:
        self.url = url
        context = ssl.create_default_context(cadata=ca_pem.decode())
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context),
            headers={"Authorization": f"Bearer {token}"},
        )

    async def close(self) -> None:
        await self.http.close()

    async def request(
        self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = ()
    ) -> Any:
        """The reply's JSON; raises aiohttp.ClientResponseError for a status >= 400 not
        in `ok` (then None is returned)."""
        headers = MERGE_PATCH if method == "PATCH" else None
        data = None if body is None else orjson.dumps(body)
        async with self.http.request(method, self.url + path, data=data, headers=headers) as r:
            if r.status in ok:
                return None
            r.raise_for_status()
            return orjson.loads(await r.read())

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def watch(
        self, path: str, version: str, timeout: float = 30
    ) -> AsyncIterator[dict[str, Any]]:
        """The watch events of a collection after `version` until the server ends the
        stream (after `timeout`); raises Gone for a 410."""
        sep = "&" if "?" in path else "?"
        query = f"{sep}watch=true&resourceVersion={version}&timeoutSeconds={int(timeout)}"
        client_timeout = aiohttp.ClientTimeout(total=None, sock_read=timeout + 10)
        async with self.http.get(self.url + path + query, timeout=client_timeout) as reply:
            reply.raise_for_status()
            while True:
                line = await reply.content.readline()
                if not line:
                    return
                event = orjson.loads(line)
                if event.get("type") == "ERROR":
                    if event.get("object", {}).get("code") == 410:
                        raise Gone(event["object"].get("message", ""))
                    return
                yield event
