"""The `kt` command: list, status, top, logs, teardown, config, bench, version.

Talks to pools through the provider interface (the backend from KT_BACKEND or the
environment, as the library picks it) and to pods through their control HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table

import kt
from kt import top
from kt.core.dial import Route
from kt.core.errors import ConfigError, KtError
from kt.core.provider import Pod, Provider, explain_backend, get_provider, resolve_backend

console = Console()
T = TypeVar("T")


def _provider(args: argparse.Namespace) -> Provider:
    return get_provider(resolve_backend(args.backend))


def _run(provider: Provider, work: Callable[[], Awaitable[T]]) -> T:
    """One event loop per command: the work, then the provider's clients closed."""

    async def run() -> T:
        try:
            return await work()
        finally:
            await provider.close()

    return asyncio.run(run())


def _status_of(pod: Pod, token: str | None) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://{pod.host}:{pod.port + 1}/status",
        headers={"Authorization": f"Bearer {token or ''}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as reply:
            return dict(json.loads(reply.read()))
    except (OSError, ValueError, http.client.HTTPException) as exc:  # a pod ending mid-reply
        return {"error": str(exc) or type(exc).__name__}


def cmd_list(args: argparse.Namespace) -> int:
    provider = _provider(args)
    pods = _run(provider, provider.list_pods)
    pools: dict[str, list[Pod]] = defaultdict(list)
    for pod in pods:
        pools[pod.pool].append(pod)
    table = Table("pool", "pods", "ready", "addresses", "state")
    table.columns[0].no_wrap = True
    for name, members in sorted(pools.items()):
        ready = sum(p.state.value == "ready" for p in members)
        gone = all(p.state.value in ("lost", "deleted", "failed") for p in members)
        state = f"gone: no pod runs (`kt teardown {name}` removes it)" if gone else "up"
        addresses = ", ".join(p.host for p in members)
        table.add_row(name, str(len(members)), str(ready), addresses, state)
    console.print(table if pools else "no pools")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    provider = _provider(args)

    async def read() -> tuple[list[Pod], str | None]:
        return await provider.list_pods(args.name), await provider.read_token(args.name)

    pods, token = _run(provider, read)
    if not pods:
        console.print(f"no pool named {args.name!r} (see `kt list`)")
        return 1
    table = Table("pod", "state", "actor", "class", "actor state", "pid", "calls")
    table.columns[0].no_wrap = True  # a pod name cut short cannot be passed to `kt logs --pod`
    for pod in pods:
        status = _status_of(pod, token)
        actors = status.get("actors")
        if not isinstance(actors, list) or not actors:
            table.add_row(pod.name, pod.state.value, "-", "-", "-", "-", "-")
            continue
        for actor in actors:
            table.add_row(
                pod.name,
                pod.state.value,
                str(actor["name"]),
                str(actor["class"]),
                str(actor["state"]),
                str(actor["pid"]),
                str(actor["calls"]),
            )
    console.print(table)
    return 0


async def _read_pods(
    provider: Provider, pool: str | None, tokens: dict[str, str | None]
) -> list[top.PodReading]:
    """Each pod's /status (of one pool or of all), read at once; a pool's token is read
    the first time one of its pods is seen."""
    pods = sorted(await provider.list_pods(pool), key=lambda p: (p.pool, p.name))
    for name in sorted({p.pool for p in pods} - tokens.keys()):
        tokens[name] = await provider.read_token(name)
    statuses = await asyncio.gather(
        *(asyncio.to_thread(_status_of, p, tokens[p.pool]) for p in pods)
    )
    return [top.PodReading(p.pool, p.name, s) for p, s in zip(pods, statuses, strict=True)]


@contextlib.contextmanager
def _screen() -> Iterator[Callable[[RenderableType], None]]:
    """Shows each refresh: in place on a terminal; elsewhere (a pipe, a file) one after
    another, since rich's Live writes only its last frame there."""
    if not console.is_terminal or console.is_dumb_terminal:
        yield console.print
        return
    with Live(console=console, auto_refresh=False) as live:
        yield lambda renderable: live.update(renderable, refresh=True)


def _refreshes(count: int | None) -> Iterable[int]:
    """The refreshes after the first: count - 1 of them, or until Ctrl-C."""
    return itertools.count() if count is None else range(count - 1)


async def _watch(provider: Provider, args: argparse.Namespace) -> int:
    tokens: dict[str, str | None] = {}
    before, then = await _read_pods(provider, args.pool, tokens), time.monotonic()
    if not before:
        console.print(top.no_pods(args.pool))
        return 0 if args.pool is None else 1
    with _screen() as show:
        show(top.view(None, before, 0.0, pool=args.pool, interval=args.interval))
        for _ in _refreshes(args.count):
            await asyncio.sleep(args.interval)
            after, now = await _read_pods(provider, args.pool, tokens), time.monotonic()
            show(top.view(before, after, now - then, pool=args.pool, interval=args.interval))
            before, then = after, now
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    if args.interval <= 0 or (args.count is not None and args.count < 1):
        console.print("--interval takes seconds above 0, --count a number of refreshes from 1")
        return 2
    provider = _provider(args)
    try:
        return _run(provider, lambda: _watch(provider, args))
    except KeyboardInterrupt:  # the way out, as in `top`
        return 0


def cmd_logs(args: argparse.Namespace) -> int:
    provider = _provider(args)

    async def follow() -> None:
        async for text in provider.logs(args.name, args.pod, follow=args.follow, tail=args.tail):
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        _run(provider, follow)
    except ConfigError as exc:
        console.print(str(exc))
        return 1
    except KeyboardInterrupt:  # the way out of --follow
        pass
    return 0


def cmd_teardown(args: argparse.Namespace) -> int:
    provider = _provider(args)

    async def run() -> int:
        if not args.all:
            return await provider.delete_pool(args.name)
        pools = sorted({pod.pool for pod in await provider.list_pods()})
        return sum([await provider.delete_pool(pool) for pool in pools])

    if not args.all and not args.name:
        console.print("name a pool, or pass --all")
        return 2
    deleted = _run(provider, run)
    if not deleted and not args.all:
        console.print(f"no pool named {args.name!r} (see `kt list`)")
        return 1
    console.print(f"deleted {deleted} pod(s)")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """What this machine's kt would use, and why."""
    backend, why = explain_backend(args.backend)
    table = Table("setting", "value", "why")
    table.add_row("backend", backend, why)
    provider = _provider(args)

    async def route() -> Route:
        return await provider.route()

    try:
        chosen = _run(provider, route)
        table.add_row("connections to pods", chosen.how.value, chosen.why)
    except KtError as exc:
        table.add_row("connections to pods", "?", f"the cluster did not answer: {exc}")
    if backend == "k8s":

        async def namespace() -> str:
            await provider.list_pods()  # loads the config (and checks the API answers)
            return str(getattr(provider, "_namespace", "default"))

        try:
            table.add_row("namespace", _run(provider, namespace), "kubeconfig context or pod")
        except KtError as exc:
            table.add_row("namespace", "?", f"the cluster did not answer: {exc}")
    console.print(table)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path.cwd()
    if not (root / "bench" / "__main__.py").exists():
        console.print("run `kt bench` from a kt checkout (it runs bench/ against Ray)")
        return 2
    return subprocess.call([sys.executable, "-m", "bench", *args.rest], cwd=root)


def cmd_version(args: argparse.Namespace) -> int:
    print(f"kt {kt.__version__} (python {sys.version.split()[0]}, pid {os.getpid()})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kt", description="kt: actors on Kubernetes")
    parser.add_argument("--backend", choices=["local", "k8s"], default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="pools and their pods").set_defaults(fn=cmd_list)
    p = sub.add_parser("status", help="a pool's pods and actors")
    p.add_argument("name")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("top", help="pods and actors, live: calls/s, RSS, CPU (Ctrl-C stops)")
    p.add_argument("pool", nargs="?", help="one pool (default: every pool)")
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between refreshes (default 1)",
    )
    p.add_argument("--count", type=int, default=None, metavar="N", help="stop after N refreshes")
    p.set_defaults(fn=cmd_top)
    p = sub.add_parser("logs", help="what a pool's pods and actors printed")
    p.add_argument("name")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--pod", default=None)
    p.add_argument("--tail", type=int, default=None, metavar="N", help="each pod's last N lines")
    p.set_defaults(fn=cmd_logs)
    p = sub.add_parser("teardown", help="delete a pool's pods (or every pool's)")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true")
    p.set_defaults(fn=cmd_teardown)
    p = sub.add_parser("bench", help="the benchmark suite against Ray")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    sub.add_parser("config", help="the backend and connections kt would use, and why").set_defaults(
        fn=cmd_config
    )
    sub.add_parser("version").set_defaults(fn=cmd_version)
    args = parser.parse_args(argv)
    return int(args.fn(args))


if __name__ == "__main__":
    raise SystemExit(main())
