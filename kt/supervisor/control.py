"""The pod's control HTTP app on uvicorn: /healthz, /status, /metrics.

Off the hot path: calls never touch HTTP. `/healthz` is open (it is the readiness
probe); `/status` needs the pool's token as a Bearer token since it names actors.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from kt.supervisor.server import Supervisor

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def make_app(supervisor: Supervisor) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    actors = Gauge("kt_actors", "actors hosted on this pod", ["state"], registry=registry)
    calls = Gauge("kt_actor_calls", "calls relayed to this pod's actors", registry=registry)
    callers = Gauge("kt_callers", "connected callers", registry=registry)

    async def respond(send: Send, status: int, body: bytes, ctype: bytes) -> None:
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", ctype)]}
        )
        await send({"type": "http.response.body", "body": body})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/healthz":
            await respond(send, 200, b"ok", b"text/plain")
        elif path == "/metrics":
            status = supervisor.status()
            for state in ("starting", "alive", "dead"):
                actors.labels(state).set(sum(a["state"] == state for a in status["actors"]))
            calls.set(sum(a["calls"] for a in status["actors"]))
            callers.set(status["callers"])
            await respond(send, 200, generate_latest(registry), b"text/plain; version=0.0.4")
        elif path == "/status":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, b"Bearer " + supervisor.token):
                await respond(
                    send, 401, b'{"error": "missing or wrong token"}', b"application/json"
                )
                return
            await respond(send, 200, orjson.dumps(supervisor.status()), b"application/json")
        else:
            await respond(send, 404, b'{"error": "not found"}', b"application/json")

    return app


async def serve_control(supervisor: Supervisor, host: str, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(
        make_app(supervisor),
        host=host,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
    )
    await uvicorn.Server(config).serve()
