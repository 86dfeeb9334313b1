"""A port-forward to a pod through the API server, for a driver outside the cluster.

Who uses it: `kt.k8s.provider.K8sProvider`, when no gateway is configured and the chart's
gateway runs in the cluster (`route`). Like `kubectl port-forward`, it listens on a free
port of 127.0.0.1; every connection accepted there is one websocket to
`pods/<name>/portforward?ports=<port>` (kubernetes_asyncio's `WsApiClient`, subprotocol
`v4.channel.k8s.io`), relayed both ways. The channel protocol, one port: each websocket
message starts with a channel byte, 0 for data and 1 for errors (port i of several would
be 2i and 2i+1); the server's first message on each channel is the port number, two
bytes little-endian; text on the error channel ends the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.stream import WsApiClient

logger = logging.getLogger("kt.k8s")
DATA, ERROR = 0, 1
Address = tuple[str, int]


class PortForward:
    """127.0.0.1:<free port> -> `port` of a pod of `namespace` that `pick` names (asked
    again after a connection failed: the pod may be gone), through the API server."""

    def __init__(
        self,
        configuration: client.Configuration,
        namespace: str,
        pick: Callable[[], Awaitable[str]],
        port: int,
    ) -> None:
        self.configuration = configuration
        self.namespace, self.pick, self.port = namespace, pick, port
        self.name: str | None = None  # the pod forwarded to now
        self.failures = 0  # connections that could not be relayed
        self._server: asyncio.Server | None = None
        self._ws: WsApiClient | None = None

    async def start(self) -> Address:
        """Listen; the local address to dial."""
        self._ws = WsApiClient(configuration=self.configuration)
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if self._ws is not None:
            await self._ws.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._ws is not None
        name = self.name
        try:
            if name is None:
                name = self.name = await self.pick()
            api = client.CoreV1Api(self._ws)
            # with a WsApiClient and no preloading: aiohttp's ws_connect, to enter
            opening: Any = await api.connect_get_namespaced_pod_portforward(
                name, self.namespace, ports=self.port, _preload_content=False
            )
            async with opening as ws:
                await _pump(ws, reader, writer)
        except (aiohttp.ClientError, ApiException, OSError, PortForwardFailed, LookupError) as e:
            self.failures += 1
            self.name = None  # pick again next time
            why = str(e)
            if isinstance(e, aiohttp.WSServerHandshakeError) and e.status in (401, 403):
                why = (
                    f"{e.status}: this identity may not open a port-forward to pod {name} "
                    f"(create and get on pods/portforward in namespace {self.namespace}; "
                    "charts/kt grants them to drivers.subjects)"
                )
            logger.warning(
                "kt: port-forward to %s/%s:%d failed: %s", self.namespace, name, self.port, why
            )
        finally:
            writer.close()


class PortForwardFailed(Exception):
    """The API server (or the kubelet) said why on the error channel."""


async def _pump(ws: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Bytes from `reader` out on the data channel; the data channel's bytes to `writer`."""

    async def up() -> None:
        while chunk := await reader.read(1 << 16):
            await ws.send_bytes(bytes([DATA]) + chunk)
        await ws.close()

    sending = asyncio.ensure_future(up())
    unprefixed = {DATA, ERROR}  # channels whose port number has not come yet
    try:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY or not msg.data:
                break
            channel, payload = msg.data[0], msg.data[1:]
            if channel in unprefixed:
                unprefixed.discard(channel)
                payload = payload[2:]
            if channel == DATA and payload:
                writer.write(payload)
                await writer.drain()
            elif channel == ERROR and payload:
                raise PortForwardFailed(payload.decode("utf-8", "replace"))
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sending
