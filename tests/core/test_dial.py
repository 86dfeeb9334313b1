"""How a caller reaches a pod through the gateway (kt.core.dial), against a tiny server
that answers as the gateway does.

Behaviours covered:
- KT_GATEWAY / kt.config.gateway must be host:port, else a ConfigError that says so;
- no gateway: through_gateway returns None (dial the pod itself);
- the preamble sent is the protocol's; `ok` gives a socket; `refused: token: ...` is an
  AuthError and any other refusal (`target`, even one whose text says "token") a
  PodLostError; a gateway that does not answer is a PodLostError;
- a pod a provider named with `via` is dialed through that gateway, any other directly;
- the route to a cluster's pods (pure): the configured gateway, else directly inside the
  cluster, else a port-forward to an advertised gateway, else directly.
"""

from __future__ import annotations

import asyncio

import pytest

import kt
from kt.core import dial, protocol
from kt.core.config import config

pytestmark = pytest.mark.timeout(30)


def test_the_gateway_setting_is_host_and_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "gateway", "gw.example:7180")
    assert dial.gateway_address() == ("gw.example", 7180)
    monkeypatch.setattr(config, "gateway", "gw.example")
    with pytest.raises(kt.ConfigError, match="host:port"):
        dial.gateway_address()
    monkeypatch.setattr(config, "gateway", None)
    assert dial.gateway_address() is None
    assert asyncio.run(dial.through_gateway(("10.0.0.1", 7170), "t", 1)) is None


def _answering(answer: bytes, seen: list[bytes]) -> object:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readline())
        if answer:
            writer.write(answer)
            await writer.drain()
            writer.close()
        else:
            await asyncio.sleep(5)  # says nothing

    return handle


@pytest.mark.parametrize(
    ("answer", "error", "text"),
    [
        (b"ok\n", None, ""),
        (b"refused: token: wrong token for pool p\n", kt.AuthError, "wrong token"),
        (b"refused: target: pool tokenizer has no pod there\n", kt.PodLostError, "tokenizer"),
        (b"", kt.PodLostError, "did not answer"),
    ],
)
def test_answers_become_a_socket_or_the_right_error(
    monkeypatch: pytest.MonkeyPatch, answer: bytes, error: type[Exception] | None, text: str
) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        server = await asyncio.start_server(_answering(answer, seen), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setattr(config, "gateway", f"127.0.0.1:{port}")
        try:
            if error is None:
                sock = await dial.through_gateway(("10.0.0.1", 7170), "secret", 2)
                assert sock is not None
                sock.close()
            else:
                with pytest.raises(error, match=text):
                    await dial.through_gateway(("10.0.0.1", 7170), "secret", 0.5)
            assert seen == [protocol.gateway_preamble(("10.0.0.1", 7170), "secret")]
        finally:
            server.close()

    asyncio.run(main())


def test_a_pod_a_provider_reaches_through_a_gateway_is_dialed_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        seen: list[bytes] = []
        server = await asyncio.start_server(_answering(b"ok\n", seen), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setattr(config, "gateway", None)
        monkeypatch.setattr(dial, "_via", {})
        try:
            dial.via(("10.0.0.2", 7170), ("127.0.0.1", port))
            sock = await dial.through_gateway(("10.0.0.2", 7170), "secret", 2)
            assert sock is not None
            sock.close()
            assert seen == [protocol.gateway_preamble(("10.0.0.2", 7170), "secret")]
            assert await dial.through_gateway(("10.0.0.3", 7170), "secret", 2) is None
        finally:
            server.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("configured", "in_cluster", "gateway", "how", "said"),
    [
        ("gw:7180", False, "kt/sel", dial.How.GATEWAY, "through the gateway gw:7180"),
        (None, True, "kt/sel", dial.How.DIRECT, "inside the cluster"),
        (None, False, "kt/sel", dial.How.PORT_FORWARD, "port-forward through the API server"),
        (None, False, None, dial.How.DIRECT, "team-a advertises no kt gateway"),
    ],
)
def test_the_route_to_a_clusters_pods(
    configured: str | None, in_cluster: bool, gateway: str | None, how: dial.How, said: str
) -> None:
    route = dial.choose_route(
        configured=configured, in_cluster=in_cluster, gateway=gateway, namespace="team-a"
    )
    assert route.how is how and said in route.why
