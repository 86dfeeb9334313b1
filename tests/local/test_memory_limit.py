"""A local pod's memory limit is enforced as a container runtime enforces a pod's.

Behaviours covered:
- `Compute(memory=...)` puts the pod's supervisor and every actor process in a memory
  cgroup with that limit (checked in /proc/<pid>/cgroup and the cgroup's own limit file);
- an actor that goes over is OOM-killed by the kernel, and its caller gets
  `ActorDiedError` with `oom=True` saying so, while the pod keeps serving;
- deleting the pod (`kt teardown`) removes its cgroup;
- `kt.core.cgroup` reads v1 and v2 `/proc/self/cgroup` layouts.

The limit needs a machine that lets kt make memory cgroups (root, or cgroup v2 with the
memory controller delegated); elsewhere the tests that need one say so and skip.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import pytest

import kt
from kt.actors.driver import get_driver
from kt.core import cgroup

CAN_LIMIT = (probe := cgroup.create(f"kt-probe-{os.getpid()}", 1 << 30)) is not None
if probe is not None:
    cgroup.remove(probe)
needs_cgroups = pytest.mark.skipif(
    not CAN_LIMIT,
    reason="this machine lets kt make no memory cgroup (not root, or no v2 delegation)",
)


class Hog:
    def pid(self) -> int:
        return os.getpid()

    def grow(self, mib: int) -> int:
        chunks = [b"x" * (1 << 20) for _ in range(mib)]  # written, so really resident
        return len(chunks)


def _cgroup_of(pid: int) -> pathlib.Path | None:
    return cgroup.own_memory_cgroup(f"/proc/{pid}/cgroup")


@needs_cgroups
@pytest.mark.timeout(120)
def test_an_actor_over_its_pods_memory_is_oom_killed_and_says_so() -> None:
    compute = kt.Compute(cpus=2, memory="400Mi", replicas=1, backend="local")
    hog = kt.cls(Hog).options(compute=compute, cpus=0).remote()
    pid = hog.pid()
    group = _cgroup_of(pid)
    assert group is not None and group.name.startswith("kt-"), group
    limit_file = "memory.max" if (group / "memory.max").exists() else "memory.limit_in_bytes"
    assert int((group / limit_file).read_text()) == 400 << 20
    assert hog.grow(50) == 50  # within the limit
    with pytest.raises(kt.ActorDiedError) as info:
        hog.grow(2000)
    assert info.value.oom, str(info.value)
    assert "OOM-killed" in str(info.value)
    other = kt.cls(Hog).options(compute=compute, cpus=0).remote()
    assert _cgroup_of(other.pid()) == group  # the pod itself lives on
    kt.kill(other)
    pool = get_driver().pool_name(compute, False)
    done = subprocess.run(
        [sys.executable, "-m", "kt.cli", "teardown", pool],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.monotonic() + 10
    while group.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group.exists(), "the pod's cgroup outlived the pod"


def test_proc_cgroup_layouts(tmp_path: pathlib.Path) -> None:
    v1 = tmp_path / "v1"
    v1.write_text("5:cpu:/\n4:memory:/a/b\n0::/\n")
    assert cgroup.own_memory_cgroup(str(v1)) == cgroup.ROOT / "memory" / "a/b"
    missing = tmp_path / "none"
    assert cgroup.own_memory_cgroup(str(missing)) is None
    assert cgroup.oom_kills(tmp_path) == 0  # no counter file: none counted
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert cgroup.oom_kills(tmp_path) == 3
    (tmp_path / "cgroup.controllers").write_text("memory\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 2\noom_kill 2\n")
    assert cgroup.oom_kills(tmp_path) == 2  # v2 reads memory.events
