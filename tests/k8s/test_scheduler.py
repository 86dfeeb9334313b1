"""The test cluster's scheduler: the pure fit, and binding through the API server.

Behaviours covered:
- a pod goes to a node whose free resources (allocatable minus the requests of pods
  bound there) cover its requests, whose labels match its nodeSelector, and whose
  NoSchedule taints it tolerates; otherwise the message counts each reason as
  kube-scheduler words it;
- against the API server: fitting pods are bound (spec.nodeName), the one that fits no
  node gets PodScheduled=False/Unschedulable and a FailedScheduling event quoting
  "0/2 nodes are available: 2 Insufficient cpu.".
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kt.testing import apiserver
from kt.testing.scheduler import Scheduler, fit, quantity
from tests.distributed.torchrun import free_port

pytestmark = pytest.mark.timeout(60)


def _node(
    name: str, cpu: str, labels: dict[str, str] | None = None, taints: Any = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints or []},
        "status": {"allocatable": {"cpu": cpu, "memory": "8Gi"}},
    }


def _pod(name: str, cpu: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "c", "image": "i", "resources": {"requests": {"cpu": cpu}}}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [container], **spec},
    }


def test_quantities() -> None:
    assert quantity("1500m") == 1.5 and quantity("2Gi") == 2 * 2**30 and quantity(4) == 4


def test_fit_counts_resources_selectors_and_taints() -> None:
    gpu_taint = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    nodes = [_node("a", "2", {"zone": "x"}), _node("b", "4", {"zone": "y"}, gpu_taint)]
    busy = [dict(_pod("old", "1500m"), spec={**_pod("old", "1500m")["spec"], "nodeName": "a"})]
    assert fit(_pod("p", "500m"), nodes, busy) == ("a", "")
    assert fit(_pod("p", "1"), nodes, busy) == (
        None,
        "0/2 nodes are available: 1 Insufficient cpu, "
        "1 node(s) had untolerated taint {nvidia.com/gpu: present}.",
    )
    tolerant = _pod("p", "3", tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    assert fit(tolerant, nodes, busy) == ("b", "")
    pinned = _pod("p", "100m", nodeSelector={"zone": "z"})
    assert fit(pinned, nodes, []) == (
        None,
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.",
    )


def test_the_scheduler_binds_what_fits_and_says_why_for_the_rest() -> None:
    async def main() -> None:
        port, token = free_port(), "t"
        tls = apiserver.make_tls()
        runner, server = await apiserver.serve("127.0.0.1", port, token, tls)
        store = server.store
        for node in (_node("n1", "2"), _node("n2", "2")):
            await store.create(apiserver.RESOURCES["nodes"], "", node)
        for pod in (_pod("small", "1"), _pod("also", "2"), _pod("huge", "8")):
            await store.create(apiserver.RESOURCES["pods"], "default", pod)
        scheduler = Scheduler(f"https://127.0.0.1:{port}", token, tls.ca_pem)
        running = asyncio.get_running_loop().create_task(scheduler.run())
        pods = apiserver.RESOURCES["pods"]
        try:
            for _ in range(100):
                huge = store.get(pods, "default", "huge")
                conditions = huge.get("status", {}).get("conditions") or []
                if conditions and all(
                    store.get(pods, "default", n)["spec"].get("nodeName") for n in ("small", "also")
                ):
                    break
                await asyncio.sleep(0.05)
            nodes = {store.get(pods, "default", n)["spec"]["nodeName"] for n in ("small", "also")}
            assert nodes == {"n1", "n2"}  # 1 + 2 cpus do not fit one 2-cpu node
            (condition,) = store.get(pods, "default", "huge")["status"]["conditions"]
            message = "0/2 nodes are available: 2 Insufficient cpu."
            assert (condition["reason"], condition["message"]) == ("Unschedulable", message)
            events = [o for (r, _, _), o in store.objects.items() if r == "events"]
            assert [(e["reason"], e["message"]) for e in events] == [("FailedScheduling", message)]
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await runner.cleanup()

    asyncio.run(main())
