"""The test cluster's scheduler: binds pending pods to nodes that fit, as kube-scheduler.

Who runs it: `kt.testing.cluster`, and tests. A client of the API server only, over its
REST API (`kt.testing.rest`; kt's own Kubernetes client is not used here, so the fake
keeps kt honest). `fit` is the pure decision: a node fits a pod when its
allocatable resources minus the requests of the pods bound to it cover the pod's
requests, its labels match the pod's nodeSelector, and the pod tolerates its
NoSchedule/NoExecute taints. A pod no node fits gets the condition PodScheduled=False
(reason Unschedulable) and a FailedScheduling event whose message counts the reasons as
kube-scheduler words them ("0/4 nodes are available: 4 Insufficient cpu.").
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections import Counter
from typing import Any

import aiohttp

from kt.testing.rest import Gone, Rest

logger = logging.getLogger(__name__)

_UNITS = {
    "": 1,
    "m": 0.001,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("1500m", "2Gi", "4") as a number."""
    m = _QUANTITY.match(str(value).strip())
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"not a quantity: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def requests_of(pod: dict[str, Any]) -> dict[str, float]:
    total: dict[str, float] = {}
    for container in pod.get("spec", {}).get("containers", []):
        for name, value in (container.get("resources", {}).get("requests") or {}).items():
            total[name] = total.get(name, 0.0) + quantity(value)
    return total


def _tolerates(pod: dict[str, Any], taint: dict[str, Any]) -> bool:
    for tol in pod.get("spec", {}).get("tolerations") or []:
        if tol.get("effect") not in (None, "", taint.get("effect")):
            continue
        if tol.get("operator") == "Exists" and tol.get("key") in (None, "", taint.get("key")):
            return True
        if tol.get("key") == taint.get("key") and tol.get("value") == taint.get("value"):
            return True
    return False


def fit(
    pod: dict[str, Any], nodes: list[dict[str, Any]], bound: list[dict[str, Any]]
) -> tuple[str | None, str]:
    """(the node to bind to, "") or (None, kube-scheduler's message)."""
    wanted = requests_of(pod)
    selector = pod.get("spec", {}).get("nodeSelector") or {}
    reasons: Counter[str] = Counter()
    for node in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        name = node["metadata"]["name"]
        node_labels = node["metadata"].get("labels") or {}
        if any(node_labels.get(k) != v for k, v in selector.items()):
            reasons["node(s) didn't match Pod's node affinity/selector"] += 1
            continue
        taints = [
            t
            for t in node.get("spec", {}).get("taints") or []
            if t.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(pod, t)
        ]
        if taints:
            t = taints[0]
            reasons[f"node(s) had untolerated taint {{{t['key']}: {t.get('value', '')}}}"] += 1
            continue
        allocatable = node.get("status", {}).get("allocatable") or {}
        free = {k: quantity(v) for k, v in allocatable.items()}
        for other in bound:
            if other.get("spec", {}).get("nodeName") == name:
                for r, amount in requests_of(other).items():
                    free[r] = free.get(r, 0.0) - amount
        short = [r for r, amount in wanted.items() if amount > free.get(r, 0) + 1e-9]
        if short:
            for r in short:
                reasons[f"Insufficient {r}"] += 1
            continue
        return name, ""
    listed = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
    return None, f"0/{len(nodes)} nodes are available: {listed}."


class Scheduler:
    """Watches pods; binds each pending one, or says why it cannot."""

    def __init__(self, url: str, token: str, ca_pem: bytes) -> None:
        self.url, self.token, self.ca_pem = url, token, ca_pem
        self._told: dict[str, str] = {}  # pod uid -> the message it was last given

    async def run(self) -> None:
        api = Rest(self.url, self.token, self.ca_pem)
        try:
            while True:
                try:
                    version = await self.schedule(api)
                except aiohttp.ClientError as exc:  # the server dropped a connection: again
                    logger.warning("scheduler: the API server did not answer (%s)", exc)
                    await asyncio.sleep(0.5)
                    continue
                await self._wait_for_change(api, version)
        finally:
            await api.close()

    async def schedule(self, api: Rest) -> str:
        """One pass over the pending pods; returns the pods list's resourceVersion."""
        pods = await api.get("/api/v1/pods")
        nodes = (await api.get("/api/v1/nodes"))["items"]
        bound = [p for p in pods["items"] if p.get("spec", {}).get("nodeName")]
        for pod in pods["items"]:
            meta = pod["metadata"]
            if pod.get("spec", {}).get("nodeName") or meta.get("deletionTimestamp"):
                continue
            node, why = fit(pod, nodes, bound)
            ns, name = meta["namespace"], meta["name"]
            if node is not None:
                body = {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node},
                }
                path = f"/api/v1/namespaces/{ns}/pods/{name}/binding"
                if await api.request("POST", path, body, ok=(404, 409)) is not None:
                    pod["spec"]["nodeName"] = node
                    bound.append(pod)
            elif self._told.get(meta["uid"]) != why:
                self._told[meta["uid"]] = why
                await self._unschedulable(api, pod, why)
        return str(pods["metadata"]["resourceVersion"])

    async def _unschedulable(self, api: Rest, pod: dict[str, Any], why: str) -> None:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": why,
        }
        patch = {"status": {"conditions": [condition]}}
        await api.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", patch, ok=(404,))
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{name}.{uuid.uuid4().hex[:8]}", "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": name,
                "namespace": ns,
                "uid": meta["uid"],
            },
            "reason": "FailedScheduling",
            "message": why,
            "type": "Warning",
            "source": {"component": "default-scheduler"},
        }
        await api.request("POST", f"/api/v1/namespaces/{ns}/events", event, ok=(404,))

    async def _wait_for_change(self, api: Rest, version: str) -> None:
        """Until a pod changes (a watch), or 2 s (nodes are not watched)."""
        try:
            async with asyncio.timeout(2.5):
                async for _ in api.watch("/api/v1/pods", version, timeout=2):
                    return
        except (TimeoutError, Gone, aiohttp.ClientError):
            pass
