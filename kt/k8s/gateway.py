"""The kt gateway: a way into the cluster's call channels for drivers outside it.

`python -m kt.k8s.gateway [--host 0.0.0.0] [--port 7180] [--namespace NS ...]`, run by
the chart as a Deployment behind a Service. A driver with `kt.config.gateway` set opens
one connection per pod it uses and sends the routing preamble (`kt.core.protocol`):
the pod's address and its pool's token. The gateway

- reads the preamble within `preamble_timeout` and at most GATEWAY_PREAMBLE_MAX bytes;
- accepts only a target that is the supervisor port of a live kt pod it knows from its
  own watch of kt's pods (never an arbitrary address: no SSRF); a pod it has not seen
  yet is waited for up to the preamble timeout;
- requires that pool's token (read from the pool's Secret through the API, compared in
  constant time) before it relays a byte;
- answers `ok` and relays bytes unchanged both ways (a full side pauses the other's
  reads: back-pressure), or answers `refused: <code>: <why>` and closes, logging the
  refusal once (a connection closed before its first byte is a health probe: closed,
  not logged); at most 256 connections are being set up at once, each within a
  deadline, and a wrong token costs at most one Secret read per pool every 5 s;
- sends the driver a PONG frame between frames when the pod has sent nothing for
  `heartbeat` seconds, so idle links survive load balancers (the driver ignores it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import logging
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client.rest import ApiException

from kt.core import protocol
from kt.core.errors import ProtocolError
from kt.core.provider import SUPERVISOR_PORT, PodState
from kt.core.runtime import new_event_loop
from kt.k8s import manifests
from kt.k8s.provider import SELECTOR, K8sProvider, _pool_of, _unanswered, pod_state

logger = logging.getLogger("kt.gateway")
LOOKUP_S = 10  # the most one lookup (a pod by its address, a pool's token) may take


@dataclass(frozen=True)
class LivePod:
    namespace: str
    pool: str
    name: str
    ip: str


def _said(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _trouble(exc: BaseException) -> str:
    """What went wrong asking the API server (a lookup's whole bound, LOOKUP_S, is a
    plain TimeoutError)."""
    if isinstance(exc, ApiException):
        return f"the API server said {exc.status} {exc.reason}"
    if isinstance(exc, TimeoutError):
        return f"the API server did not answer within {LOOKUP_S:g} s"
    assert isinstance(exc, aiohttp.ClientError)
    return _unanswered(exc)


class Refused(Exception):
    """Why a connection is not relayed (said to the peer, logged once): `code` is one of
    protocol.GATEWAY_REFUSALS, for the caller to act on; the text is for people."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(why)
        self.code = code


class _Probe(Exception):
    """The connection closed before sending a byte: a TCP health check."""


class Gateway:
    """Relays drivers' call channels to the live kt pods of `namespaces`."""

    def __init__(
        self,
        namespaces: list[str] | None = None,
        *,
        preamble_timeout: float = 5.0,
        heartbeat: float = 15.0,
        source_ip: str | None = None,
    ) -> None:
        self.namespaces = namespaces
        self.preamble_timeout = preamble_timeout
        self.heartbeat = heartbeat
        self.source_ip = source_ip  # the address its connections to pods come from
        self.provider = K8sProvider()
        self.pods: dict[tuple[str, str], LivePod] = {}  # (namespace, name) -> live kt pod
        self.live: dict[str, LivePod] = {}  # pod IP -> the kt pod there
        self.changed = asyncio.Condition()
        self._tokens: dict[tuple[str, str], bytes] = {}
        self._read_at: dict[tuple[str, str], float] = {}  # when each token was last read
        self._looked_up: dict[str, float] = {}  # when each address was last asked for
        self._handshakes = asyncio.Semaphore(256)  # connections being set up at once
        self.relayed = 0
        self.refused = 0
        self.probes = 0

    # -- what is live -------------------------------------------------------------------
    async def watch(self) -> None:
        """Follow kt's pods in each namespace served (or in all): a Ready one is a target,
        until it is not."""
        scopes: list[str | None] = list(self.namespaces) if self.namespaces else [None]
        await asyncio.gather(*(self._follow(ns) for ns in scopes))

    async def _follow(self, namespace: str | None) -> None:
        """One namespace's (None: every namespace's) pods, through the provider's `follow`;
        a watch that ends in an error starts again from a list."""
        while True:
            try:
                async for kind, payload in self.provider.follow(namespace, SELECTOR):
                    pods = dict(self.pods)
                    if kind == "LIST":  # what this watch covers is replaced, the rest kept
                        pods = {k: v for k, v in pods.items() if namespace not in (None, k[0])}
                        for pod in payload:
                            self._note(pod, pods)
                    else:
                        meta = payload["metadata"]
                        pods.pop((meta["namespace"], meta["name"]), None)
                        if kind != "DELETED":
                            self._note(payload, pods)
                    await self._publish(pods)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server went away: list and watch again
                logger.warning("gateway: the pod watch failed (%s); watching again", exc)
                await asyncio.sleep(1.0)

    def _note(self, pod: dict[str, Any], pods: dict[tuple[str, str], LivePod]) -> None:
        state, _, _ = pod_state(pod, was_ready=True)
        ip = pod.get("status", {}).get("podIP")
        if state is PodState.READY and ip:
            meta = pod["metadata"]
            pods[(meta["namespace"], meta["name"])] = LivePod(
                meta["namespace"], _pool_of(pod), meta["name"], ip
            )

    async def _publish(self, pods: dict[tuple[str, str], LivePod]) -> None:
        async with self.changed:
            self.pods = pods
            self.live = {p.ip: p for p in pods.values()}
            self.changed.notify_all()

    async def _target(self, host: str, port: int) -> LivePod:
        """The live kt pod at `host`: from the watch, else (it may not have seen the pod
        yet) asked of the API server once, else waited for until the preamble timeout."""
        if port != SUPERVISOR_PORT:
            raise Refused("target", f"port {port} is not a kt supervisor's ({SUPERVISOR_PORT})")
        if host not in self.live:
            await self._look_up(host)
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: host in self.live), self.preamble_timeout
                )
            except TimeoutError:
                raise Refused("target", f"{host} is not a live kt pod") from None
            return self.live[host]

    async def _look_up(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._looked_up.get(host, -1e9) < 1.0:
            return  # at most once a second per address, whoever asks
        self._looked_up[host] = loop.time()
        api = await self.provider._api()
        at = f"status.podIP={host}"
        try:
            if self.namespaces:  # its Roles cover these namespaces only
                lists = [
                    await api.list_namespaced_pod(
                        ns, label_selector=SELECTOR, field_selector=at, _request_timeout=LOOKUP_S
                    )
                    for ns in self.namespaces
                ]
            else:
                lists = [
                    await api.list_pod_for_all_namespaces(
                        label_selector=SELECTOR, field_selector=at, _request_timeout=LOOKUP_S
                    )
                ]
        except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
            why = f"cannot tell whether {host} is a live kt pod: {_trouble(exc)}"
            raise Refused("internal", why) from None
        pods = dict(self.pods)
        for found in lists:
            for pod in found.items:
                self._note(self.provider._raw(pod), pods)
        await self._publish(pods)

    async def _token(self, pod: LivePod, fresh: bool = False) -> bytes:
        key = (pod.namespace, pod.pool)
        loop = asyncio.get_running_loop()
        if fresh and loop.time() - self._read_at.get(key, -1e9) < 5.0:
            fresh = False  # read again at most every 5 s: a wrong token costs no API call
        if fresh or key not in self._tokens:
            self._read_at[key] = loop.time()
            api = await self.provider._api()
            name = manifests.token_secret_name(pod.pool)
            try:
                secret = await api.read_namespaced_secret(
                    name, pod.namespace, _request_timeout=LOOKUP_S
                )
            except (ApiException, aiohttp.ClientError, TimeoutError) as exc:
                why = f"pool {pod.pool}'s token cannot be read: {_trouble(exc)}"
                raise Refused("internal", why) from None
            self._tokens[key] = base64.b64decode((secret.data or {}).get("token", ""))
        return self._tokens[key]

    async def _check_token(self, pod: LivePod, token: str) -> None:
        given = token.encode()
        known = await self._token(pod)
        if known and hmac.compare_digest(known, given):
            return
        known = await self._token(pod, fresh=True)  # the pool may have been made again
        if known and hmac.compare_digest(known, given):
            return
        raise Refused("token", f"wrong token for pool {pod.pool}")

    # -- one connection -------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        upstream: asyncio.StreamWriter | None = None
        try:
            if self._handshakes.locked():
                raise Refused("internal", "too many connections being set up; try again")
            async with self._handshakes:
                pod_reader, upstream = await asyncio.wait_for(
                    self._handshake(reader), 2 * self.preamble_timeout + 10
                )
            if len(reader._buffer):  # type: ignore[attr-defined]  # sent before `ok`
                raise Refused("preamble", "bytes after the preamble, before ok")
        except _Probe:  # a health check (the chart's tcpSocket probe): not an attack
            self.probes += 1
            writer.close()
            return
        except Exception as exc:
            why = exc if isinstance(exc, Refused) else Refused("internal", _said(exc))
            self.refused += 1
            logger.warning("gateway: refused %s: %s: %s", peer, why.code, why)
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                writer.write(f"refused: {why.code}: {why}"[:512].encode() + b"\n")
                await writer.drain()
            writer.close()
            return
        assert upstream is not None
        try:
            for w in (writer, upstream):
                _keepalive(w)
            writer.write(protocol.GATEWAY_OK)
            await writer.drain()
        except OSError:  # the caller went away during the handshake
            writer.close()
            upstream.close()
            return
        self.relayed += 1
        await self._relay(reader, writer, pod_reader, upstream)

    async def _handshake(
        self, reader: asyncio.StreamReader
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Preamble, target, token, then the connection to the pod."""
        try:
            line = await asyncio.wait_for(_preamble(reader), self.preamble_timeout)
            host, port, token = protocol.parse_gateway_preamble(line)
        except TimeoutError:
            raise Refused("preamble", "no whole preamble in time") from None
        except (ProtocolError, OSError) as exc:
            raise Refused("preamble", str(exc)) from None
        pod = await self._target(host, port)
        await self._check_token(pod, token)
        try:
            local = (self.source_ip, 0) if self.source_ip else None
            return await asyncio.wait_for(
                asyncio.open_connection(host, port, local_addr=local), self.preamble_timeout
            )
        except (TimeoutError, OSError) as exc:
            why = f"pod {pod.name} does not accept connections: {_said(exc)}"
            raise Refused("upstream", why) from None

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pod_reader: asyncio.StreamReader,
        upstream: asyncio.StreamWriter,
    ) -> None:
        """Both transports handed to a pair of pipes: each chunk is written on as it is
        received, with no copy or task in between; a full side pauses the other's reads."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        up, down = _Pipe(done), _Pipe(done, frames=True)
        # what the streams read before the pipes took over (a HELLO sent right after `ok`)
        early = bytes(reader._buffer)  # type: ignore[attr-defined]
        if early:
            upstream.write(early)
        early = bytes(pod_reader._buffer)  # type: ignore[attr-defined]
        if early:
            writer.write(early)
            down._follow(early)
        up.attach(writer.transport, down)  # reads the driver, writes to the pod
        down.attach(upstream.transport, up)  # reads the pod, writes to the driver
        beat = asyncio.ensure_future(down.beat(self.heartbeat))
        try:
            await done
        finally:
            beat.cancel()
            writer.transport.close()
            upstream.transport.close()


class _Pipe(asyncio.Protocol):
    """One direction of a relayed connection. The pod -> driver one (`frames`) follows
    frame lengths, so that a heartbeat PONG goes between two frames, never inside one."""

    def __init__(self, done: asyncio.Future[None], frames: bool = False) -> None:
        self.done = done
        self.frames = frames
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.left = 0  # bytes of the current frame not relayed yet (0: between frames)
        self.prefix = b""  # a length field cut between two reads
        self.quiet = False

    def attach(self, transport: Any, peer: _Pipe) -> None:
        self.transport, self.peer = transport, peer
        transport.set_protocol(self)
        if not transport.is_reading():  # the stream it was may have paused it
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)
        self.quiet = False
        if self.frames:
            self._follow(data)

    def _follow(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.left:
                step = min(self.left, n - i)
                self.left -= step
                i += step
                continue
            need = protocol.LENGTH_SIZE - len(self.prefix)
            self.prefix += data[i : i + need]
            i += need
            if len(self.prefix) == protocol.LENGTH_SIZE:
                self.left = int.from_bytes(self.prefix, "little")
                self.prefix = b""

    def pause_writing(self) -> None:  # our transport is full: stop reading the other side
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close: a half-open call channel is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    async def beat(self, every: float) -> None:
        """A PONG to the driver after `every` seconds in which the pod sent nothing."""
        while True:
            self.quiet = True
            await asyncio.sleep(every)
            if self.quiet and not self.left and not self.prefix and self.peer is not None:
                assert self.peer.transport is not None
                self.peer.transport.write(protocol.PONG_FRAME)


async def _preamble(reader: asyncio.StreamReader) -> bytes:
    """One line of at most GATEWAY_PREAMBLE_MAX bytes, and nothing after it (a driver
    sends its HELLO only once the gateway said ok).

    Raises:
        ProtocolError: longer, cut short, or followed by more bytes.
        _Probe: closed before its first byte.
    """
    cap = protocol.GATEWAY_PREAMBLE_MAX
    line = b""
    while not line.endswith(b"\n"):
        chunk = await reader.read(cap + 1 - len(line))
        if not chunk:
            if not line:
                raise _Probe()
            raise ProtocolError("the connection closed before a whole preamble")
        line += chunk
        if len(line) > cap or (b"\n" in line and not line.endswith(b"\n")):
            raise ProtocolError(f"not a preamble of at most {cap} bytes ending in a newline")
    return line


def _keepalive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def serve(gateway: Gateway, host: str, port: int) -> None:
    server = await asyncio.start_server(gateway.handle, host, port)
    watching = asyncio.ensure_future(gateway.watch())
    logger.info("gateway: serving on %s:%d", host, port)
    try:
        async with server:
            await server.serve_forever()
    finally:
        watching.cancel()
        await gateway.provider.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kt.k8s.gateway", description=__doc__)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=7180)
    parser.add_argument("--namespace", action="append", default=[], help="(default: all)")
    parser.add_argument("--preamble-timeout", type=float, default=5.0)
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds (<= 20)")
    parser.add_argument("--source-ip", default=None, help="bind connections to pods to it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    gateway = Gateway(
        args.namespace or None,
        preamble_timeout=args.preamble_timeout,
        heartbeat=args.heartbeat,
        source_ip=args.source_ip,
    )
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    with contextlib.suppress(KeyboardInterrupt):
        loop.run_until_complete(serve(gateway, args.host, args.port))


if __name__ == "__main__":
    main()
