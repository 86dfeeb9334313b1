"""`LocalProvider`: pods as local process groups on loopback addresses.

Each pod is `python -m kt.supervisor` in a new session (so deleting it kills every actor
process with it), bound to a random 127.0.x.y address and the supervisor port. State lives
under `$KT_HOME/local/<pool>/` (default `~/.kt`): one JSON file per pod and the pool's
token (mode 0600), so that a second driver can find a detached pool. Where only 127.0.0.1
exists (macOS), pods share it and differ by port instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from kt.core import cgroup
from kt.core.errors import ConfigError, LaunchError
from kt.core.liveness import pid_alive
from kt.core.provider import SUPERVISOR_PORT, Pod, PodEvent, PodSpec, PodState, Provider

logger = logging.getLogger(__name__)


def kt_home() -> Path:
    return Path(os.environ.get("KT_HOME", Path.home() / ".kt"))


def _bindable(host: str, port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, p))
            except OSError:
                return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_address() -> tuple[str, int]:
    """A fresh loopback address with the supervisor port (and the next one) free."""
    for _ in range(64):
        host = f"127.0.{random.randint(1, 254)}.{random.randint(1, 254)}"
        if _bindable(host, SUPERVISOR_PORT):
            return host, SUPERVISOR_PORT
    for _ in range(64):  # no 127.0.x.y on this system: one address, many ports
        port = _free_port()
        if _bindable("127.0.0.1", port):
            return "127.0.0.1", port
    raise OSError("no free loopback address and port for a local pod")


class LocalProvider(Provider):
    """Pods as process groups on this machine."""

    name = "local"

    def __init__(self) -> None:
        self._procs: dict[tuple[str, str], asyncio.subprocess.Process] = {}

    def pool_dir(self, pool: str) -> Path:
        return kt_home() / "local" / pool

    async def create_pods(self, specs: list[PodSpec]) -> list[Pod]:
        return list(await asyncio.gather(*(self._create(spec) for spec in specs)))

    async def _create(self, spec: PodSpec) -> Pod:
        pool_dir = self.pool_dir(spec.pool)
        pool_dir.mkdir(parents=True, exist_ok=True)
        token_file = pool_dir / "token"
        with contextlib.suppress(FileExistsError):
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(spec.token)
        last_error = ""
        limit = cgroup.create(f"kt-{spec.name}", spec.memory)
        for _attempt in range(3):
            host, port = pick_address()
            pod = Pod(spec.name, spec.pool, host, port)
            proc = await self._spawn(spec, pod, pool_dir, limit)
            error = await self._wait_ready(spec, pod, proc)
            if error is None:
                pod.state = PodState.READY
                self._procs[(spec.pool, spec.name)] = proc
                (pool_dir / f"{spec.name}.json").write_text(
                    json.dumps(
                        {
                            "name": pod.name,
                            "pool": pod.pool,
                            "host": host,
                            "port": port,
                            "pid": proc.pid,
                            "detached": spec.detached,
                            "cgroup": str(limit) if limit else None,
                            "created": time.time(),
                        }
                    )
                )
                return pod
            last_error = error
            _killpg(proc.pid)
        if limit is not None:
            await asyncio.to_thread(cgroup.remove, limit)
        raise LaunchError(spec.pool, spec.name, last_error)

    async def _spawn(
        self, spec: PodSpec, pod: Pod, pool_dir: Path, limit: Path | None
    ) -> asyncio.subprocess.Process:
        env = dict(os.environ)
        env.update(spec.env)
        env.update(
            KT_TOKEN=spec.token,
            KT_POD=spec.name,
            KT_POOL=spec.pool,
            KT_BACKEND="local",
            KT_SYS_PATH=os.pathsep.join(p for p in sys.path if p),
            KT_IMAGE_CACHE=str(pool_dir / "image"),  # the pool's pods build its venv once
        )
        if spec.inactivity_ttl is not None:
            env["KT_INACTIVITY_TTL"] = str(spec.inactivity_ttl)
        if not spec.detached:
            env["KT_DRIVER_PID"] = str(os.getpid())
        else:
            env.pop("KT_DRIVER_PID", None)
        env.pop("KT_CGROUP", None)
        if limit is not None:  # the pod's memory limit, as a container runtime sets it
            env["KT_CGROUP"] = str(limit)
        log = open(pool_dir / f"{spec.name}.log", "ab")
        try:
            return await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kt.supervisor",
                "--host",
                pod.host,
                "--port",
                str(pod.port),
                "--pod",
                spec.name,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()

    async def _wait_ready(
        self, spec: PodSpec, pod: Pod, proc: asyncio.subprocess.Process
    ) -> str | None:
        """None once the supervisor accepts TCP connections (the readiness probe)."""
        deadline = time.monotonic() + spec.launch_timeout
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                return f"the supervisor exited with code {proc.returncode} (see its log)"
            try:
                _, writer = await asyncio.open_connection(pod.host, pod.port)
            except OSError:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), 0.02)
                continue
            writer.close()
            return None
        return f"not ready after {spec.launch_timeout} s"

    async def delete_pod(self, pool: str, name: str) -> None:
        path = self.pool_dir(pool) / f"{name}.json"
        proc = self._procs.pop((pool, name), None)
        info = json.loads(path.read_text()) if path.exists() else {}
        pid = proc.pid if proc else info.get("pid")
        if pid is not None and (proc is not None or pid_alive(pid)):  # a gone pod: records only
            _killpg(pid, signal.SIGTERM)
            _killpg(pid, signal.SIGCONT)  # a stopped pod must run to act on SIGTERM
            deadline = time.monotonic() + 2
            while pid_alive(pid) and time.monotonic() < deadline:
                if proc is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(proc.wait()), 0.05)
                else:
                    await asyncio.sleep(0.05)
            _killpg(pid, signal.SIGKILL)
        if info.get("cgroup"):  # once its processes are gone
            await asyncio.to_thread(cgroup.remove, Path(info["cgroup"]))
        path.unlink(missing_ok=True)
        pool_dir = self.pool_dir(pool)
        if pool_dir.exists() and not any(pool_dir.glob("*.json")):
            (pool_dir / "token").unlink(missing_ok=True)

    async def list_pods(self, pool: str | None = None) -> list[Pod]:
        root = kt_home() / "local"
        dirs = [root / pool] if pool else (sorted(root.iterdir()) if root.exists() else [])
        pods = []
        for d in dirs:
            for path in sorted(d.glob("*.json")):
                try:
                    info = json.loads(path.read_text())
                except (OSError, ValueError):
                    continue
                state = PodState.READY if pid_alive(int(info["pid"])) else PodState.LOST
                pods.append(Pod(info["name"], info["pool"], info["host"], info["port"], state))
        return pods

    async def watch_pods(self, pool: str) -> AsyncIterator[PodEvent]:
        """Changes of the pool's pod files and processes, every 0.25 s (the local backend
        has no API server to push them): READY, LOST (its supervisor died) and DELETED
        (its record is gone)."""
        known: dict[str, Pod] = {}
        while True:
            seen = {pod.name: pod for pod in await self.list_pods(pool)}
            for name, pod in seen.items():
                if name not in known or known[name].state != pod.state:
                    yield PodEvent(pod, pod.state)
            for name, pod in known.items():
                if name not in seen:
                    pod.state = PodState.DELETED
                    yield PodEvent(pod, PodState.DELETED)
            known = seen
            await asyncio.sleep(0.25)

    async def logs(
        self, pool: str, pod: str | None = None, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        """The pods' log files (they outlive the pods), read as they grow."""
        pool_dir = self.pool_dir(pool)
        paths = sorted(pool_dir.glob(f"{pod or '*'}.log"))
        if not paths:
            raise ConfigError(f"no logs for pool {pool!r} under {pool_dir} (see `kt list`)")
        positions = {path: 0 for path in paths}
        first = True
        while True:
            for path in paths:
                with open(path, "rb") as f:
                    f.seek(positions[path])
                    data = f.read()
                    positions[path] = f.tell()
                if first and tail is not None:  # what it printed so far: its last lines
                    data = b"".join(data.splitlines(keepends=True)[-tail:] if tail else [])
                if data:
                    yield data.decode("utf-8", "replace")
            if not follow:
                return
            first = False
            await asyncio.sleep(0.5)

    async def read_token(self, pool: str) -> str | None:
        path = self.pool_dir(pool) / "token"
        return path.read_text() if path.exists() else None


def _killpg(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
