"""Memory cgroups: a pod's memory limit and its OOM-kill count, on cgroup v1 and v2.

A container runtime gives each Kubernetes pod a memory cgroup whose limit is the pod's
memory limit; the kernel OOM-kills a process that goes over, and the pod's supervisor
reports it (`ActorDiedError(oom=True)`). The local backend does the same where the
machine lets it: `create` makes a child of kt's own memory cgroup with the limit, and the
supervisor moves itself into it (`join`) before it starts any worker. Where kt may not
make one (no permission; cgroup v2 without the memory controller delegated), `create`
returns None and the limit is not enforced.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def own_memory_cgroup(proc_cgroup: str = "/proc/self/cgroup") -> Path | None:
    """The directory of this process's memory cgroup (v1's memory hierarchy, else v2)."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    unified = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return ROOT / "memory" / path.lstrip("/")
        if controllers == "":
            unified = path
    if unified is None:
        return None
    for base in (ROOT, ROOT / "unified"):
        if (base / "cgroup.controllers").exists():
            return base / unified.lstrip("/")
    return None


def _v2(path: Path) -> bool:
    return (path / "cgroup.controllers").exists()


def create(name: str, limit_bytes: int) -> Path | None:
    """A child memory cgroup of this process's, limited to `limit_bytes`; None if not allowed."""
    parent = own_memory_cgroup()
    if parent is None or limit_bytes <= 0:
        return None
    path = parent / name
    try:
        path.mkdir(exist_ok=True)
        if _v2(path):
            (path / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: there is no swap to use
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError:
        remove(path, wait=0)
        return None
    return path


def join(path: str | Path) -> None:
    """Move this process into the cgroup at `path` (its children are born there)."""
    (Path(path) / "cgroup.procs").write_text(str(os.getpid()))


def remove(path: Path, wait: float = 2.0) -> None:
    """Delete the cgroup once the processes in it are gone (best effort)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)


def oom_kills(path: Path | None = None) -> int:
    """How many processes the kernel OOM-killed in the cgroup (this process's by default)."""
    path = path or own_memory_cgroup()
    if path is None:
        return 0
    name = "memory.events" if _v2(path) else "memory.oom_control"
    try:
        for line in (path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def available_memory(path: Path | None = None, meminfo: str = "/proc/meminfo") -> int:
    """Bytes this process's pod may still fill: the machine's MemAvailable, or less when
    its memory cgroup (the pod's) has a limit (less its working set, as the kubelet counts
    it: usage without inactive file pages)."""
    available = _meminfo_available(meminfo)
    path = path or own_memory_cgroup()
    if path is None:
        return available
    v2 = _v2(path)
    names = (
        ("memory.max", "memory.current")
        if v2
        else ("memory.limit_in_bytes", "memory.usage_in_bytes")
    )
    try:
        limit_text = (path / names[0]).read_text().strip()
        usage = int((path / names[1]).read_text())
        stat = dict(line.split(" ", 1) for line in (path / "memory.stat").read_text().splitlines())
    except (OSError, ValueError):
        return available
    if limit_text == "max" or int(limit_text) >= 2**60:
        return available
    inactive = int(stat.get("inactive_file" if v2 else "total_inactive_file", "0"))
    return max(0, min(available, int(limit_text) - (usage - inactive)))


def _meminfo_available(meminfo: str) -> int:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 2**62  # not known here: no limit of its own
