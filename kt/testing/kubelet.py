"""The test cluster's kubelet: runs the pods bound to its nodes as local processes.

Who runs it: `kt.testing.cluster`, and tests. A client of the API server only (its REST
API, `kt.testing.rest`), so it would run unchanged against a real kube-apiserver. What
it does, per node it registers (a Node object with capacity and a Ready condition):

- watches pods (list, then watch from the list's resourceVersion; a 410 lists again);
- runs each bound pod's one container as a process group: `command` + `args` (with
  `$(VAR)` expanded from its env), the pod's
  env (values, fieldRefs, secret/configMap keys, envFrom), on a loopback address of its
  own (`127.1.x.y`, the pod's IP), with the Kubernetes service variables set;
- **volumes without a mount namespace**: each volume of the pod lives under the pod's
  directory, at `$KT_MOUNT_ROOT` + its mountPath (secret and configMap files, emptyDir,
  a directory per PersistentVolumeClaim, and the service-account token (from the
  TokenRequest API, for the pod's serviceAccountName), ca.crt and namespace that a
  kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount);
  a program that reads a mounted file prefixes KT_MOUNT_ROOT ("" on a real node);
- **images**: there is no container runtime, so an image is "pulled" when its registry
  resolves; a registry under the reserved `.invalid` domain does not, and the pod waits
  in ErrImagePull / ImagePullBackOff as on a real node. What an image holds is its
  `python`: the cluster's own (first on PATH), or for an image named in `images` the
  interpreter given there (so a test can run an image without kt);
- reports status: phase, podIP, hostIP, startTime, conditions (PodScheduled,
  Initialized, ContainersReady, Ready from the readiness probe: `httpGet` or
  `tcpSocket`, probed every
  0.1 s until it first passes, then every periodSeconds), containerStatuses (running, or
  terminated with exitCode and reason Completed, Error or OOMKilled);
- **memory limits**: the container's processes are summed (RSS) every 0.1 s; over
  `limits.memory` the whole container is SIGKILLed and reported OOMKilled, exit 137, as
  the kernel's OOM killer does for a container's cgroup;
- **graceful deletion**: a pod given a deletionTimestamp gets SIGTERM, SIGKILL after its
  grace period, and is then deleted with grace period 0; a pod deleted outright is killed;
- **GPUs, as the NVIDIA device plugin and container runtime give them**: a node with
  `NodeShape.gpus` advertises them as `nvidia.com/gpu`; a container whose limits ask for
  n gets n of its node's devices no other running container holds, named in
  `NVIDIA_VISIBLE_DEVICES` (as GPU UUIDs), given back when it ends (there are no device
  files: a process sees the variable, not a GPU);
- **logs**: what a container writes goes to a file per pod, served (as a real kubelet
  does on its port) at `/containerLogs/<namespace>/<pod>/<container>[?follow=true]`; the
  node's `status.daemonEndpoints.kubeletEndpoint.Port` says where, and the API server
  proxies `pods/<name>/log` there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import logging
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from aiohttp import web

from kt.testing.rest import Gone, Rest
from kt.testing.scheduler import quantity

logger = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
OOM_EXIT = 137
GPU = "nvidia.com/gpu"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _expand(arg: str, env: dict[str, str]) -> str:
    """`$(VAR)` in a command or argument is the container's VAR, as a kubelet expands it
    (left as written when VAR is not set; `$$` is a literal `$`)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _REFERENCE.sub(one, arg)


@dataclass(frozen=True)
class NodeShape:
    """What each node offers the scheduler."""

    cpus: float = 4
    memory: str = "8Gi"
    labels: dict[str, str] = field(default_factory=dict)
    gpus: int = 0  # nvidia.com/gpu


@dataclass
class PodRun:
    """One pod this kubelet runs: its lifecycle is one task (`Kubelet._run`)."""

    uid: str
    namespace: str
    name: str
    node: str
    ip: str
    pod: dict[str, Any]
    root: Path = Path()
    deleting: asyncio.Event = field(default_factory=asyncio.Event)
    gone: bool = False  # deleted from the API server: nothing left to report
    pgid: int | None = None
    gpus: list[int] = field(default_factory=list)  # its node's devices it holds
    task: asyncio.Task[None] | None = None


def registry_resolves(image: str) -> bool:
    """Whether an image can be pulled: its registry is not under `.invalid` (RFC 2606)."""
    first = image.split("/", 1)[0]
    host = first.split(":", 1)[0] if "/" in image else ""
    return not (host == "invalid" or host.endswith(".invalid"))


def field_value(pod: dict[str, Any], path: str) -> str:
    """A fieldRef's value (the paths the downward API offers for env)."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    values = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
    }
    if path.startswith("metadata.labels['") or path.startswith("metadata.annotations['"):
        which, _, key = path.partition("['")
        return str((meta.get(which.split(".")[1]) or {}).get(key.rstrip("']"), ""))
    if path not in values:
        raise ValueError(f"fieldRef {path!r} is not supported")
    return str(values[path])


class Kubelet:
    """Registers `nodes` Node objects and runs the pods bound to them."""

    def __init__(
        self,
        url: str,
        token: str,
        ca_pem: bytes,
        *,
        workdir: Path,
        nodes: int = 1,
        shape: NodeShape | None = None,
        python_bin: str | None = None,
        images: dict[str, str] | None = None,
    ) -> None:
        self.url, self.token, self.ca_pem = url, token, ca_pem
        self.workdir = workdir
        self.shape = shape or NodeShape()
        self.nodes = [f"node-{i + 1}" for i in range(nodes)]
        self.python_bin = python_bin
        self.images = dict(images or {})  # image -> the python it holds
        self.runs: dict[str, PodRun] = {}
        self.registered: list[str] = []
        self.finished: set[str] = set()  # uids whose container ended; kept until deleted
        self._ips: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.logs: dict[tuple[str, str], Path] = {}  # (namespace, pod) -> its container log
        self._log_server: web.AppRunner | None = None
        self.log_port = 0
        self.api: Rest | None = None
        self._gpus_held: dict[str, set[int]] = {node: set() for node in self.nodes}

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        self.api = Rest(self.url, self.token, self.ca_pem)
        try:
            await self._serve_logs()
            for node in self.nodes:
                await self._register(node)
            while True:
                try:
                    version = await self._sync_all()
                    while True:
                        async for event in self.api.watch("/api/v1/pods", version, 60):
                            obj = event["object"]
                            version = obj["metadata"]["resourceVersion"]
                            if event["type"] != "BOOKMARK":
                                self._reconcile(obj, deleted=event["type"] == "DELETED")
                except Gone:
                    continue
                except aiohttp.ClientError as exc:
                    logger.warning("kubelet: the API server did not answer (%s)", exc)
                    await asyncio.sleep(0.5)
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Kill every pod process this kubelet started (the node goes away)."""
        for run in list(self.runs.values()):
            _killpg(run.pgid, signal.SIGKILL)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.runs.clear()
        if self._log_server is not None:
            await self._log_server.cleanup()
            self._log_server = None
        if self.api is not None:
            await self.api.close()
            self.api = None

    async def _register(self, node: str) -> None:
        assert self.api is not None
        capacity = {"cpu": f"{self.shape.cpus:g}", "memory": self.shape.memory, "pods": "110"}
        if self.shape.gpus:
            capacity[GPU] = str(self.shape.gpus)
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node,
                "labels": {"kubernetes.io/hostname": node, **self.shape.labels},
            },
            "spec": {},
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": self.log_port}},
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "lastTransitionTime": _now(),
                    }
                ],
            },
        }
        if await self.api.request("POST", "/api/v1/nodes", body, ok=(409,)) is None:
            await self.api.request("PATCH", f"/api/v1/nodes/{node}/status", body)
        self.registered.append(node)

    async def _sync_all(self) -> str:
        """List every pod, reconcile each, forget the ones gone; the list's version."""
        assert self.api is not None
        pods = await self.api.get("/api/v1/pods")
        seen = set()
        for pod in pods["items"]:
            seen.add(pod["metadata"]["uid"])
            self._reconcile(pod, deleted=False)
        for uid, run in list(self.runs.items()):
            if uid not in seen:
                self._reconcile(run.pod, deleted=True)
        return str(pods["metadata"]["resourceVersion"])

    def _reconcile(self, pod: dict[str, Any], *, deleted: bool) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        run = self.runs.get(uid)
        if run is not None:
            run.pod = pod
            if deleted:
                run.gone = True
            if deleted or meta.get("deletionTimestamp"):
                run.deleting.set()
            return
        if pod.get("spec", {}).get("nodeName") not in self.nodes:
            return
        if deleted:
            self.finished.discard(uid)
            self.logs.pop((meta["namespace"], meta["name"]), None)
            shutil.rmtree(self._root(pod), ignore_errors=True)
        elif meta.get("deletionTimestamp"):  # not running (finished, or never started)
            self._start_task(self._delete_now(meta["namespace"], meta["name"]))
        elif uid not in self.finished and pod.get("status", {}).get("phase") not in (
            "Succeeded",
            "Failed",
        ):
            node = pod["spec"]["nodeName"]
            run = PodRun(uid, meta["namespace"], meta["name"], node, self._new_ip(), pod)
            self.runs[uid] = run
            run.task = self._start_task(self._run(run))
            run.task.add_done_callback(lambda _: self._forget(run))

    def _start_task(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("kubelet: a pod's task failed", exc_info=task.exception())

    def _forget(self, run: PodRun) -> None:
        self.runs.pop(run.uid, None)
        self._ips.discard(run.ip)
        if run.gone:  # deleted while it ran: nothing of it is left to serve
            self.logs.pop((run.namespace, run.name), None)
            shutil.rmtree(run.root, ignore_errors=True)

    def _new_ip(self) -> str:
        while True:
            ip = f"127.1.{random.randint(0, 255)}.{random.randint(1, 254)}"
            if ip not in self._ips:
                self._ips.add(ip)
                return ip

    def _root(self, pod: dict[str, Any]) -> Path:
        meta = pod["metadata"]
        return self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    # -- logs ------------------------------------------------------------------------------
    async def _serve_logs(self) -> None:
        app = web.Application()
        app.router.add_get("/containerLogs/{ns}/{pod}/{container}", self._container_log)
        self._log_server = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._log_server.setup()
        site = web.TCPSite(self._log_server, "127.0.0.1", 0)
        await site.start()
        self.log_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _container_log(self, request: web.Request) -> web.StreamResponse:
        """The container's output so far; with follow=true, then what comes, until the
        container ends."""
        key = (request.match_info["ns"], request.match_info["pod"])
        path = self.logs.get(key)
        if path is None:
            raise web.HTTPNotFound(text=f"no container log for pod {key[1]} on this node")
        follow = request.query.get("follow", "").lower() in ("1", "true")
        reply = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await reply.prepare(request)
        offset = 0
        tail = int(request.query.get("tailLines") or 0)
        if tail > 0:  # start where the last `tail` lines begin
            with contextlib.suppress(FileNotFoundError):
                data = path.read_bytes()
                cut = data.rstrip(b"\n").split(b"\n")[-tail:]
                offset = len(data) - len(b"\n".join(cut)) - (1 if data.endswith(b"\n") else 0)
        while True:
            with contextlib.suppress(FileNotFoundError):
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                    offset = f.tell()
                if data:
                    await reply.write(data)
            running = any(r.namespace == key[0] and r.name == key[1] for r in self.runs.values())
            if not follow or (not running and not data):
                break
            await asyncio.sleep(0.2)
        await reply.write_eof()
        return reply

    # -- one pod ---------------------------------------------------------------------------
    async def _run(self, run: PodRun) -> None:
        """Pull, mount, start, probe, watch memory, report the end, finish deletion."""
        try:
            await self._run_pod(run)
        finally:
            self._gpus_held.get(run.node, set()).difference_update(run.gpus)
            run.gpus = []

    def _give_gpus(self, run: PodRun, container: dict[str, Any], env: dict[str, str]) -> None:
        """The node's devices the container's limits ask for, as the device plugin names
        them (once: a container keeps its devices until it ends)."""
        want = int(quantity((container.get("resources", {}).get("limits") or {}).get(GPU, "0")))
        held = self._gpus_held.setdefault(run.node, set())
        if want and not run.gpus:
            free = [i for i in range(self.shape.gpus) if i not in held]
            run.gpus = free[:want]  # the scheduler counted them: never fewer
            held.update(run.gpus)
        if run.gpus:
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(f"GPU-{run.node}-{i}" for i in run.gpus)

    async def _run_pod(self, run: PodRun) -> None:
        run.root = self._root(run.pod)
        container = run.pod["spec"]["containers"][0]
        started = await self._start(run, container)
        if started is None:  # deleted before it started, or it could not start
            if run.deleting.is_set():
                await self._delete_now(run.namespace, run.name)
            else:
                self.finished.add(run.uid)
            return
        proc, ports = started
        oom = asyncio.Event()
        watchers = [
            asyncio.ensure_future(self._probe(run, container, ports)),
            asyncio.ensure_future(self._memory(run, proc.pid, container, oom)),
        ]
        deleting = asyncio.ensure_future(run.deleting.wait())
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait([exited, deleting], return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():  # graceful deletion: TERM, then KILL after the grace
                grace = 0 if run.gone else run.pod["metadata"].get("deletionGracePeriodSeconds")
                _killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(exited), 30 if grace is None else grace)
                except TimeoutError:
                    pass
            _killpg(proc.pid, signal.SIGKILL)
            code = await exited
        finally:
            for task in (*watchers, deleting):
                task.cancel()
            _killpg(proc.pid, signal.SIGKILL)
        if oom.is_set():
            reason, code = "OOMKilled", OOM_EXIT
        else:
            code = 128 - code if code < 0 else code  # killed by a signal: 128 + its number
            reason = "Completed" if code == 0 else "Error"
        await self._terminated(run, container, code, reason)
        if run.deleting.is_set():
            if not run.gone:
                await self._delete_now(run.namespace, run.name)
        else:
            self.finished.add(run.uid)

    async def _start(
        self, run: PodRun, container: dict[str, Any]
    ) -> tuple[asyncio.subprocess.Process, dict[str, int]] | None:
        image = container.get("image", "")
        pulled = registry_resolves(image)
        backoff = 1.0
        while True:
            if pulled and await self._mount(run, container):
                env = await self._env(run, container)
                if env is not None:
                    break  # else a Secret or ConfigMap it names is missing: try again
            if not pulled:  # each try fails as a pull from an unknown host does, then waits
                registry = image.split("/", 1)[0]
                await self._waiting(
                    run,
                    container,
                    "ErrImagePull",
                    f'failed to pull image "{image}": dial tcp: lookup {registry}: no such host',
                )
                if await self._deleted_within(run, 1.0):
                    return None
                await self._waiting(
                    run, container, "ImagePullBackOff", f'Back-off pulling image "{image}"'
                )
                backoff = min(backoff * 2, 10.0)
            if await self._deleted_within(run, backoff if not pulled else 1.0):
                return None
        argv = [*container.get("command", []), *container.get("args", [])]
        argv = [_expand(arg, env) for arg in argv]
        self.logs[(run.namespace, run.name)] = run.root / "container.log"
        log = open(run.root / "container.log", "ab")
        workdir = run.root / container.get("workingDir", "/").lstrip("/")
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=workdir,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            log.close()
            await self._terminated(run, container, 128, "StartError", str(exc))
            return None
        finally:
            if not log.closed:
                log.close()
        run.pgid = proc.pid
        await self._status(run, container, running=True, ready=False)
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
        return proc, ports

    async def _deleted_within(self, run: PodRun, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.deleting.wait(), seconds)
        return run.deleting.is_set()

    async def _mount(self, run: PodRun, container: dict[str, Any]) -> bool:
        """Write the pod's volumes under its directory; False while a source is missing."""
        assert self.api is not None
        ns = run.namespace
        sources: dict[str, Path] = {}
        for volume in run.pod["spec"].get("volumes", []):
            path = run.root / "volumes" / volume["name"]
            path.mkdir(parents=True, exist_ok=True)
            sources[volume["name"]] = path
            if "secret" in volume or "configMap" in volume:
                secret = "secret" in volume
                name = volume["secret"]["secretName"] if secret else volume["configMap"]["name"]
                kind = "secrets" if secret else "configmaps"
                obj = await self.api.request(
                    "GET", f"/api/v1/namespaces/{ns}/{kind}/{name}", ok=(404,)
                )
                if obj is None:
                    return False
                for key, value in (obj.get("data") or {}).items():
                    data = base64.b64decode(value) if secret else value.encode()
                    (path / key).write_bytes(data)
            elif "persistentVolumeClaim" in volume:
                claim = self.workdir / "claims" / ns / volume["persistentVolumeClaim"]["claimName"]
                claim.mkdir(parents=True, exist_ok=True)
                sources[volume["name"]] = claim
        mounts = list(container.get("volumeMounts", []))
        if run.pod["spec"].get("automountServiceAccountToken", True):
            account = run.pod["spec"].get("serviceAccountName") or "default"
            issued = await self.api.request(  # TokenRequest, as a kubelet's projected volume
                "POST",
                f"/api/v1/namespaces/{ns}/serviceaccounts/{account}/token",
                {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
                ok=(404,),
            )
            if issued is None:  # no such service account (yet)
                return False
            sa = run.root / "volumes" / "kube-api-access"
            sa.mkdir(parents=True, exist_ok=True)
            (sa / "token").write_text(issued["status"]["token"])
            (sa / "ca.crt").write_bytes(self.ca_pem)
            (sa / "namespace").write_text(ns)
            sources["kube-api-access"] = sa
            mounts.append({"name": "kube-api-access", "mountPath": SA_DIR})
        for mount in mounts:
            target = run.root / mount["mountPath"].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(sources[mount["name"]], target_is_directory=True)
        return True

    async def _env(self, run: PodRun, container: dict[str, Any]) -> dict[str, str] | None:
        assert self.api is not None
        ns = run.namespace
        cache: dict[tuple[str, str], dict[str, str] | None] = {}

        async def data(kind: str, name: str) -> dict[str, str] | None:
            if (kind, name) not in cache:
                obj = await self.api.request(  # type: ignore[union-attr]
                    "GET", f"/api/v1/namespaces/{ns}/{kind}/{name}", ok=(404,)
                )
                raw = None if obj is None else obj.get("data") or {}
                if raw is not None and kind == "secrets":
                    raw = {k: base64.b64decode(v).decode() for k, v in raw.items()}
                cache[(kind, name)] = raw
            return cache[(kind, name)]

        host, _, port = self.url.removeprefix("https://").partition(":")
        env = {
            "PATH": os.pathsep.join(
                p for p in (self._bin(container), os.environ.get("PATH", "/usr/bin:/bin")) if p
            ),
            "HOME": str(run.root / "home"),
            "HOSTNAME": run.pod["spec"].get("hostname", run.name),
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port or "443",
            "KT_MOUNT_ROOT": str(run.root),
        }
        (run.root / "home").mkdir(parents=True, exist_ok=True)
        for source in container.get("envFrom", []):
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            values = await data("secrets" if "secretRef" in source else "configmaps", ref["name"])
            if values is None:
                return None
            env.update({source.get("prefix", "") + k: v for k, v in values.items()})
        pod = {**run.pod, "status": {**run.pod.get("status", {}), "podIP": run.ip}}
        pod["status"].setdefault("hostIP", "127.0.0.1")
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
                continue
            ref = var.get("valueFrom", {})
            if "fieldRef" in ref:
                env[var["name"]] = field_value(pod, ref["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in ref or "configMapKeyRef" in ref:
                key_ref = ref.get("secretKeyRef") or ref["configMapKeyRef"]
                kind = "secrets" if "secretKeyRef" in ref else "configmaps"
                values = await data(kind, key_ref["name"])
                if values is None or key_ref["key"] not in values:
                    return None
                env[var["name"]] = values[key_ref["key"]]
        self._give_gpus(run, container, env)
        return env

    def _bin(self, container: dict[str, Any]) -> str | None:
        """The directory whose `python` the container runs: its image's, if named."""
        python = self.images.get(container.get("image", ""))
        if python is None:
            return self.python_bin
        bin_dir = self.workdir / "images" / re.sub(r"[^A-Za-z0-9_.-]", "_", container["image"])
        bin_dir.mkdir(parents=True, exist_ok=True)
        link = bin_dir / "python"
        if not link.is_symlink():
            link.symlink_to(python)
        return str(bin_dir)

    async def _probe(self, run: PodRun, container: dict[str, Any], ports: dict[str, int]) -> None:
        probe = container.get("readinessProbe")
        how = next((k for k in ("httpGet", "tcpSocket") if k in (probe or {})), None)
        if probe is None or how is None:
            await self._status(run, container, running=True, ready=True)
            return
        target = probe[how]
        port = target["port"]
        port = ports.get(port, port) if isinstance(port, str) else port
        url = f"http://{run.ip}:{port}{target.get('path', '/')}"
        period = float(probe.get("periodSeconds", 10))
        threshold = int(probe.get("failureThreshold", 3))
        ready, failures = False, 0
        seconds = float(probe.get("timeoutSeconds", 1))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as http:
            while True:
                try:
                    if how == "tcpSocket":  # connects, and closes without a byte
                        _, writer = await asyncio.wait_for(
                            asyncio.open_connection(run.ip, port), seconds
                        )
                        writer.close()
                        ok = True
                    else:
                        async with http.get(url) as reply:
                            ok = 200 <= reply.status < 400
                except (aiohttp.ClientError, OSError, TimeoutError):
                    ok = False
                failures = 0 if ok else failures + 1
                if ok != ready and (ok or failures >= threshold):
                    ready = ok
                    await self._status(run, container, running=True, ready=ready)
                await asyncio.sleep(period if ready else 0.1)

    async def _memory(
        self, run: PodRun, pid: int, container: dict[str, Any], oom: asyncio.Event
    ) -> None:
        limit = (container.get("resources", {}).get("limits") or {}).get("memory")
        if limit is None:
            return
        cap = quantity(limit)
        while True:
            await asyncio.sleep(0.1)
            if _rss(pid) > cap:
                logger.warning(
                    "kubelet: pod %s over its memory limit %s: OOMKilled", run.name, limit
                )
                oom.set()
                _killpg(pid, signal.SIGKILL)
                return

    # -- status ----------------------------------------------------------------------------
    def _conditions(self, ready: bool, started: bool) -> list[dict[str, Any]]:
        now = _now()
        out = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": now}]
        for kind, value in (("Initialized", started), ("ContainersReady", ready), ("Ready", ready)):
            out.append({"type": kind, "status": str(value), "lastTransitionTime": now})
        return out

    def _base_status(self, run: PodRun) -> dict[str, Any]:
        status = run.pod.get("status", {})
        return {
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": status.get("startTime") or _now(),
        }

    async def _waiting(self, run: PodRun, container: dict[str, Any], reason: str, msg: str) -> None:
        state = {"waiting": {"reason": reason, "message": msg}}
        status = {
            **self._base_status(run),
            "phase": "Pending",
            "conditions": self._conditions(False, True),
            "containerStatuses": [self._container(container, state, ready=False)],
        }
        await self._patch_status(run, status)

    async def _status(
        self, run: PodRun, container: dict[str, Any], *, running: bool, ready: bool
    ) -> None:
        started = run.pod.get("status", {}).get("startTime") or _now()
        state = {"running": {"startedAt": started}}
        status = {
            **self._base_status(run),
            "phase": "Running",
            "podIP": run.ip,
            "podIPs": [{"ip": run.ip}],
            "conditions": self._conditions(ready, True),
            "containerStatuses": [self._container(container, state, ready=ready)],
        }
        await self._patch_status(run, status)

    async def _terminated(
        self, run: PodRun, container: dict[str, Any], code: int, reason: str, msg: str = ""
    ) -> None:
        state = {
            "terminated": {
                "exitCode": code,
                "reason": reason,
                "finishedAt": _now(),
                **({"message": msg} if msg else {}),
            }
        }
        status = {
            **self._base_status(run),
            "phase": "Succeeded" if code == 0 else "Failed",
            "podIP": run.ip,
            "conditions": self._conditions(False, True),
            "containerStatuses": [self._container(container, state, ready=False)],
        }
        await self._patch_status(run, status)

    def _container(
        self, container: dict[str, Any], state: dict[str, Any], *, ready: bool
    ) -> dict[str, Any]:
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": ready,
            "started": "running" in state,
            "restartCount": 0,
            "state": state,
        }

    async def _patch_status(self, run: PodRun, status: dict[str, Any]) -> None:
        if run.gone or self.api is None:
            return
        path = f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status"
        try:
            reply = await self.api.request("PATCH", path, {"status": status}, ok=(404,))
        except aiohttp.ClientError as exc:
            logger.warning("kubelet: status of pod %s not written (%s)", run.name, exc)
            return
        if reply is None:
            run.gone = True
        else:
            run.pod = reply

    async def _delete_now(self, namespace: str, name: str) -> None:
        """Remove a pod whose processes are gone (grace period 0), as the kubelet does."""
        if self.api is None:
            return
        path = f"/api/v1/namespaces/{namespace}/pods/{name}?gracePeriodSeconds=0"
        with contextlib.suppress(aiohttp.ClientError):
            await self.api.request("DELETE", path, ok=(404,))


def _rss(pid: int) -> int:
    """Resident memory of a process and all its descendants."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _killpg(pgid: int | None, sig: int) -> None:
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
