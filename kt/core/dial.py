"""How a caller reaches a pod's supervisor: directly, or through the kt gateway.

Who calls it: the runtime's links (`kt.core.runtime.Link.open`) and the driver's
reachability check. With `kt.config.gateway` set ("host:port", or KT_GATEWAY), every
connection goes to the gateway, which relays it to the pod after the routing preamble
(`kt.core.protocol.gateway_preamble`) and its one-line answer. Without it, a provider may
have found a way in itself (`Route`, `choose_route`): the Kubernetes provider, outside
the cluster, opens a port-forward to the chart's gateway and names the pods reached
through it (`via`); every other pod is dialed at its own address.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from dataclasses import dataclass

from kt.core import protocol
from kt.core.config import config
from kt.core.errors import AuthError, ConfigError, PodLostError

Address = tuple[str, int]
_via: dict[Address, Address] = {}  # pod -> the gateway a provider reaches it through


class How(str, enum.Enum):
    DIRECT = "direct"
    GATEWAY = "gateway"
    PORT_FORWARD = "port-forward"


@dataclass(frozen=True)
class Route:
    """How a provider's pods are reached, and why (`kt config` shows both)."""

    how: How
    why: str


def choose_route(
    *, configured: str | None, in_cluster: bool, gateway: str | None, namespace: str
) -> Route:
    """The way to a cluster's pods: the configured gateway; inside the cluster, the pods'
    own addresses; outside, a port-forward to the gateway the namespace advertises
    (`gateway`: "namespace/pod"), else the pods' addresses (a cluster whose pod network
    this machine reaches, like the test cluster)."""
    if configured:
        return Route(How.GATEWAY, f"through the gateway {configured} (KT_GATEWAY)")
    if in_cluster:
        return Route(How.DIRECT, "inside the cluster: pod addresses are reachable")
    if gateway:
        why = f"outside the cluster: a port-forward through the API server to the gateway {gateway}"
        return Route(How.PORT_FORWARD, why)
    why = (
        f"outside the cluster, and namespace {namespace} advertises no kt gateway (the "
        "chart's ConfigMap kt-gateway): pods are dialed at their addresses"
    )
    return Route(How.DIRECT, why)


def via(pod: Address, gateway: Address) -> None:
    """Connections to `pod` go through `gateway` (a provider's port-forward)."""
    _via[pod] = gateway


def reached_directly(pod: Address) -> bool:
    """Whether this process dials `pod` at its own address (no gateway between): then
    it may dial the pod's other ports too."""
    return not config.gateway and pod not in _via


def gateway_address() -> Address | None:
    """The configured gateway, or None.

    Raises:
        ConfigError: it is not "host:port".
    """
    value = config.gateway
    if not value:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"gateway {value!r}: write it as host:port (kt.config.gateway)")
    return host.strip("[]"), int(port)


async def through_gateway(address: Address, token: str, timeout: float) -> socket.socket | None:
    """A connected socket to `address` through the gateway, its preamble answered; None
    when no gateway is configured (dial the pod itself).

    Raises:
        AuthError: the gateway refused the pool's token.
        PodLostError: the gateway cannot be reached, or refused the target.
    """
    gateway = gateway_address() or _via.get(address)
    if gateway is None:
        return None
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in gateway[0] else socket.AF_INET)
    sock.setblocking(False)
    pod = f"{address[0]}:{address[1]}"
    try:
        await asyncio.wait_for(loop.sock_connect(sock, gateway), timeout)
        await loop.sock_sendall(sock, protocol.gateway_preamble(address, token))
        answer = await asyncio.wait_for(_line(loop, sock), timeout)
    except (TimeoutError, OSError) as exc:
        sock.close()
        why = f"the gateway {gateway[0]}:{gateway[1]} did not answer: {exc or 'timed out'}"
        raise PodLostError(pod, why) from None
    if answer != protocol.GATEWAY_OK:
        sock.close()
        said = answer.decode("utf-8", "replace").strip() or "closed"
        code = said.removeprefix("refused: ").split(":", 1)[0]
        if code == "token":
            raise AuthError(f"the gateway refused the connection to pod {pod}: {said}")
        raise PodLostError(pod, f"the gateway refused it: {said}")
    return sock


async def _line(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The gateway's one-line answer, read byte by byte: nothing after it is consumed."""
    out = bytearray()
    while not out.endswith(b"\n") and len(out) < 1024:
        chunk = await loop.sock_recv(sock, 1)
        if not chunk:
            break
        out += chunk
    return bytes(out)
