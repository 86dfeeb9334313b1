"""The pod's control HTTP app on uvicorn: /healthz, /status, /metrics.

Off the hot path: calls never touch HTTP. `/healthz` is open (it is the readiness
probe); `/status` and `/metrics` need the pool's token as a Bearer token (Prometheus:
`authorization: {credentials_file: ...}` in the scrape config). `/metrics` is made when
scraped from the supervisor's counters (`kt.supervisor.metrics`) and psutil.
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
    from prometheus_client import CollectorRegistry, generate_latest

    from kt.supervisor.metrics import families

    class PodCollector:
        def collect(self) -> Any:
            status = supervisor.status()
            return families(
                supervisor.stats, status["actors"], _processes(supervisor), len(supervisor.peers)
            )

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PodCollector())

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
            return
        if path not in ("/metrics", "/status"):
            await respond(send, 404, b'{"error": "not found"}', b"application/json")
            return
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(auth, b"Bearer " + supervisor.token):
            await respond(send, 401, b'{"error": "missing or wrong token"}', b"application/json")
        elif path == "/metrics":
            await respond(send, 200, generate_latest(registry), b"text/plain; version=0.0.4")
        else:
            await respond(send, 200, orjson.dumps(supervisor.status()), b"application/json")

    return app


def _processes(supervisor: Supervisor) -> list[dict[str, Any]]:
    """Each live actor process's memory and CPU (psutil), for /metrics."""
    import psutil

    out = []
    for rec in supervisor.actors.values():
        if rec.worker is None or rec.state.value == "dead":
            continue
        try:
            proc = psutil.Process(rec.worker.pid)
            with proc.oneshot():
                times = proc.cpu_times()
                out.append(
                    {
                        "cls": rec.cls_name,
                        "actor": rec.id,
                        "rss": proc.memory_info().rss,
                        "cpu": times.user + times.system,
                    }
                )
        except psutil.Error:
            continue  # it just ended
    return out


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
