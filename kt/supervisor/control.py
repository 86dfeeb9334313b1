"""The pod's control HTTP app on uvicorn: /healthz, /status, /metrics.

Off the hot path: calls never touch HTTP. `/healthz` is open (it is the readiness
probe); `/status` and `/metrics` need the pool's token as a Bearer token (Prometheus:
`authorization: {credentials_file: ...}` in the scrape config). `/metrics` is made when
scraped from the supervisor's counters (`kt.supervisor.metrics`) and psutil
(`process_usage`, which `Supervisor.status()` calls for each actor's process).
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
            actors = supervisor.status()["actors"]
            return families(supervisor.stats, actors, _processes(actors), len(supervisor.peers))

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


def process_usage(pid: int | None) -> dict[str, Any]:
    """A live process's {"rss": bytes, "cpu": user + system seconds} (psutil), for
    `Supervisor.status()`; both None when there is no process (never started, or ended)."""
    import psutil

    if pid is not None:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times = proc.cpu_times()
                return {"rss": proc.memory_info().rss, "cpu": times.user + times.system}
        except psutil.Error:
            pass  # it just ended
    return {"rss": None, "cpu": None}


def _processes(actors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each live actor process's memory and CPU, from the actors `Supervisor.status()`
    lists (which read them with `process_usage`), for /metrics."""
    return [
        {"cls": a["class"], "actor": a["id"], "rss": a["rss"], "cpu": a["cpu"]}
        for a in actors
        if a["rss"] is not None
    ]


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
