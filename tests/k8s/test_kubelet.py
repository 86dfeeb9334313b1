"""The test cluster's process kubelet, driven through the API server by kubernetes_asyncio.

Behaviours covered (each a real process started by the kubelet):
- it registers its nodes with capacity and a Ready condition;
- a bound pod's command runs with its env (values, fieldRefs, a Secret key), on a
  loopback IP of its own (status.podIP), its Secret volume and service-account token at
  $KT_MOUNT_ROOT + mountPath; Ready follows the readiness probe;
- a container that exits reports phase Failed, exitCode and reason Error; one that goes
  over its memory limit is killed and reported OOMKilled with exit code 137;
- a graceful delete sends SIGTERM (the program sees it), then removes the pod; the
  process is gone;
- an image whose registry does not resolve waits in ErrImagePull, then ImagePullBackOff;
- a node with GPUs advertises nvidia.com/gpu; containers limited to 2 each get disjoint
  devices in NVIDIA_VISIBLE_DEVICES, as the device plugin names them, and a container
  started after one ended gets the devices it gave back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import pathlib
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import pytest
from kubernetes_asyncio import client

from kt.testing import apiserver
from kt.testing.kubelet import Kubelet, NodeShape
from tests.distributed.torchrun import free_port

pytestmark = pytest.mark.timeout(120)
TOKEN = "kubelet-test"

SERVER = r"""
import http.server, os, signal, sys, time
out = os.environ["OUT"]
def term(*_):
    open(out + ".term", "w").write("TERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
root = os.environ["KT_MOUNT_ROOT"]
facts = [os.environ["POD"], os.environ["IP"], os.environ["SECRET"],
         open(root + "/etc/creds/password").read(),
         open(root + "/var/run/secrets/kubernetes.io/serviceaccount/namespace").read()]
open(out, "w").write("\n".join(facts))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
http.server.HTTPServer((os.environ["IP"], 8080), H).serve_forever()
"""


def _pod(name: str, argv: list[str], **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "python:3.11-slim", "command": argv, **container}
            ],
        },
    }


async def _cluster(
    tmp: pathlib.Path,
    body: Callable[[client.CoreV1Api, Kubelet], Awaitable[None]],
    shape: NodeShape | None = None,
) -> None:
    port = free_port()
    tls = apiserver.make_tls()
    runner, _ = await apiserver.serve("127.0.0.1", port, TOKEN, tls)
    url = f"https://127.0.0.1:{port}"
    kubelet = Kubelet(
        url,
        TOKEN,
        tls.ca_pem,
        workdir=tmp,
        nodes=2,
        shape=shape or NodeShape(cpus=3),
        python_bin=os.path.dirname(sys.executable),
    )
    running = asyncio.ensure_future(kubelet.run())
    conf = client.Configuration(host=url, api_key={"BearerToken": f"Bearer {TOKEN}"})
    ca = tmp / "ca.pem"
    ca.write_bytes(tls.ca_pem)
    conf.ssl_ca_cert = str(ca)
    api_client = client.ApiClient(conf)
    api = client.CoreV1Api(api_client)
    try:
        while len(kubelet.registered) < 2:
            await asyncio.sleep(0.05)
        await body(api, kubelet)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await api_client.close()
        await runner.cleanup()


async def _bind(api: client.CoreV1Api, pod: dict[str, Any], node: str = "node-1") -> None:
    await api.create_namespaced_pod("default", pod)
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod["metadata"]["name"]},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    }
    await api.create_namespaced_pod_binding(
        pod["metadata"]["name"], "default", binding, _preload_content=False
    )


async def _until(
    api: client.CoreV1Api, name: str, check: Callable[[Any], bool], limit: float = 30
) -> Any:
    deadline = asyncio.get_running_loop().time() + limit
    while True:
        pod = await api.read_namespaced_pod(name, "default")
        if check(pod):
            return pod
        assert asyncio.get_running_loop().time() < deadline, pod.status
        await asyncio.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _terminated(pod: Any) -> Any:
    statuses = pod.status.container_statuses or []
    return statuses and statuses[0].state.terminated


def test_nodes_env_volumes_probe_and_graceful_deletion(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "facts"

    async def body(api: client.CoreV1Api, kubelet: Kubelet) -> None:
        nodes = (await api.list_node()).items
        assert [n.metadata.name for n in nodes] == ["node-1", "node-2"]
        assert nodes[0].status.capacity["cpu"] == "3"
        assert nodes[0].status.conditions[0].type == "Ready"
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "creds"},
            "data": {"password": base64.b64encode(b"hunter2").decode()},
        }
        await api.create_namespaced_secret("default", secret)
        pod = _pod(
            "web",
            ["python", "-c", SERVER],
            env=[
                {"name": "OUT", "value": str(out)},
                {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {
                    "name": "SECRET",
                    "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}},
                },
            ],
            volumeMounts=[{"name": "c", "mountPath": "/etc/creds", "readOnly": True}],
            readinessProbe={"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1},
        )
        pod["spec"]["volumes"] = [{"name": "c", "secret": {"secretName": "creds"}}]
        await _bind(api, pod)
        ready = await _until(api, "web", _ready)
        ip = ready.status.pod_ip
        assert ip.startswith("127.1.") and ready.status.phase == "Running"
        assert out.read_text().split("\n") == ["web", ip, "hunter2", "hunter2", "default"]
        # .info, not .cmdline(): another test's process may be a zombie by now
        procs = psutil.process_iter(["cmdline"])
        pids = [p.pid for p in procs if SERVER in (p.info["cmdline"] or [])]
        assert len(pids) == 1
        await api.delete_namespaced_pod("web", "default", grace_period_seconds=10)
        deadline = asyncio.get_running_loop().time() + 20
        while (await api.list_namespaced_pod("default")).items:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert (tmp_path / "facts.term").read_text() == "TERM"
        assert _gone(pids[0])

    asyncio.run(_cluster(tmp_path, body))


def test_exit_codes_oom_and_unpullable_images(tmp_path: pathlib.Path) -> None:
    async def body(api: client.CoreV1Api, kubelet: Kubelet) -> None:
        await _bind(api, _pod("fails", ["python", "-c", "import sys; sys.exit(3)"]))
        hog = "x = bytearray(300 * 2**20); import time; time.sleep(30)"
        await _bind(
            api,
            _pod("hog", ["python", "-c", hog], resources={"limits": {"memory": "100Mi"}}),
            node="node-2",
        )
        await _bind(api, _pod("nope", ["true"], image="registry.invalid/team/app:1"))
        failed = await _until(api, "fails", _terminated)
        assert failed.status.phase == "Failed"
        assert (_terminated(failed).exit_code, _terminated(failed).reason) == (3, "Error")
        oom = await _until(api, "hog", _terminated)
        assert oom.status.phase == "Failed"
        assert (_terminated(oom).exit_code, _terminated(oom).reason) == (137, "OOMKilled")

        def waiting(reason: str) -> Callable[[Any], bool]:
            def check(pod: Any) -> bool:
                statuses = pod.status.container_statuses or []
                state = statuses[0].state.waiting if statuses else None
                return bool(state and state.reason == reason)

            return check

        pulled = await _until(api, "nope", waiting("ErrImagePull"))
        assert "registry.invalid" in pulled.status.container_statuses[0].state.waiting.message
        await _until(api, "nope", waiting("ImagePullBackOff"))
        for name in ("fails", "hog", "nope"):  # finished or waiting: deleted at once
            await api.delete_namespaced_pod(name, "default")
        deadline = asyncio.get_running_loop().time() + 20
        while (await api.list_namespaced_pod("default")).items:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)

    asyncio.run(_cluster(tmp_path, body))


DEVICES = r"""
import os, time
open(os.environ["OUT"], "w").write(os.environ.get("NVIDIA_VISIBLE_DEVICES", "none"))
time.sleep(60)
"""


def test_gpus_are_advertised_and_handed_out_as_the_device_plugin_does(
    tmp_path: pathlib.Path,
) -> None:
    def gpu_pod(name: str) -> dict[str, Any]:
        env = [{"name": "OUT", "value": str(tmp_path / name)}]
        limits = {"resources": {"limits": {"nvidia.com/gpu": "2"}}}
        return _pod(name, [sys.executable, "-c", DEVICES], env=env, **limits)

    async def seen(name: str) -> set[str]:
        path = tmp_path / name
        for _ in range(600):
            if path.exists() and path.read_text():
                return set(path.read_text().split(","))
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} never started")

    async def body(api: client.CoreV1Api, kubelet: Kubelet) -> None:
        node = await api.read_node("node-1")
        assert node.status.capacity["nvidia.com/gpu"] == "4"
        await _bind(api, gpu_pod("g1"))
        await _bind(api, gpu_pod("g2"))
        first, second = await seen("g1"), await seen("g2")
        assert len(first) == len(second) == 2 and not first & second, (first, second)
        assert all(d.startswith("GPU-node-1-") for d in first | second)
        await api.delete_namespaced_pod("g1", "default", grace_period_seconds=0)
        for _ in range(600):  # its container's end gives its devices back
            if not any(r.name == "g1" for r in kubelet.runs.values()):
                break
            await asyncio.sleep(0.05)
        await _bind(api, gpu_pod("g3"))
        assert await seen("g3") == first

    asyncio.run(_cluster(tmp_path, body, NodeShape(cpus=3, gpus=4)))
