"""`python -m kt.testing.cluster` as a program: it serves, and it stops what it started.

Behaviours covered:
- once it writes its kubeconfig, kubectl (an independent client) sees its nodes and can
  run a pod on it, which becomes Running;
- on SIGTERM it stops: the pod's process is gone and the kubeconfig removed;
- its loop (API server, scheduler and kubelet share one) blocked for longer than STALL_S
  is reported once, with the stack of what blocks it.
"""

from __future__ import annotations

import asyncio
import json
import time

import psutil
import pytest

from kt.testing import cluster
from kt.testing.cluster import running
from tests.k8s.kubectl import kubectl

pytestmark = pytest.mark.timeout(120)


def test_the_cluster_serves_kubectl_and_stops_its_pods() -> None:
    with running(nodes=2, cpus_per_node=2) as kubeconfig:
        nodes = json.loads(kubectl("1.33", kubeconfig, "get", "nodes", "-o", "json"))
        assert [n["metadata"]["name"] for n in nodes["items"]] == ["node-1", "node-2"]
        marker = f"kt-cluster-test-{time.monotonic_ns()}"
        kubectl(
            "1.27",
            kubeconfig,
            "run",
            "sleeper",
            "--image=busybox",
            "--restart=Never",
            "--command",
            "--",
            "python",
            "-c",
            "import time; time.sleep(300)",
            marker,
        )
        deadline = time.monotonic() + 30
        phase = ""
        while phase != "Running" and time.monotonic() < deadline:
            pod = json.loads(kubectl("1.33", kubeconfig, "get", "pod", "sleeper", "-o", "json"))
            phase = pod["status"].get("phase", "")
            time.sleep(0.1)
        assert phase == "Running"
        procs = [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
        assert len(procs) == 1
    assert not kubeconfig.exists()
    assert not procs[0].is_running() or procs[0].status() == psutil.STATUS_ZOMBIE


def test_a_blocked_loop_is_reported_with_what_blocks_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cluster, "STALL_S", 0.4)

    def blocks_the_loop() -> None:
        time.sleep(1.5)

    async def main() -> None:
        cluster._watch_the_loop(asyncio.get_running_loop())
        await asyncio.sleep(0.5)  # turning: nothing to say
        assert "has not turned" not in capsys.readouterr().out
        blocks_the_loop()
        await asyncio.sleep(0.5)

    asyncio.run(main())
    said = capsys.readouterr().out
    assert said.count("the cluster's loop has not turned for") == 1, said
    assert "in blocks_the_loop" in said and "time.sleep(1.5)" in said, said
