"""`K8sProvider`: pools as Kubernetes Pods, through kubernetes_asyncio.

Who calls it: the scheduler (`kt.actors.scheduler.Pool`) and `kt` (the CLI), through the
provider interface. The objects come from `kt.k8s.manifests`; this module applies them,
and reads what the cluster says back:

- **config**: `KUBECONFIG` (or ~/.kube/config) when there is one, else the in-cluster
  service account (`KUBERNETES_SERVICE_HOST` and the mounted token; under the test
  cluster's process kubelet the mount lives at `$KT_MOUNT_ROOT` + its path). The
  namespace: `Compute.namespace`, else `KT_NAMESPACE`, else the kubeconfig context's,
  else the pod's own, else "default".
- **readiness and loss from watches** (with resourceVersion; a 410 lists again), never
  from polling. `pod_state` is the pure reading of a pod object: Ready -> READY; a phase
  Failed/Succeeded or a deletionTimestamp -> LOST (or FAILED if it was never ready),
  with the reason (OOMKilled and the limit, Evicted and the kubelet's message).
- **why a pod does not start** (`launch_problem`): Unschedulable -> PlacementError
  quoting the scheduler's message; an image that cannot be pulled -> PlacementError
  naming it; a container that ends before it is ready -> LaunchError with its reason.
- the pool's token lives in its Secret; `read_token` reads it through the API, so RBAC
  decides who may run code on the pods.

Foreign errors (ApiException, aiohttp's) are translated here into kt's.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
from collections.abc import AsyncGenerator, AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

from kt.core import dial
from kt.core.compute import Compute
from kt.core.config import config as kt_config
from kt.core.errors import (
    AuthError,
    ConfigError,
    KtError,
    LaunchError,
    PlacementError,
    PodLostError,
)
from kt.core.provider import SUPERVISOR_PORT, Pod, PodEvent, PodSpec, PodState, Provider
from kt.k8s import manifests
from kt.k8s.portforward import PortForward

logger = logging.getLogger("kt.k8s")
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
PULL_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONFIG_FAILURES = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")
SELECTOR = "app.kubernetes.io/managed-by=kt"
WATCH_S = 60  # each watch request's timeoutSeconds; the next one goes on from its version
# the longest an API request waits for the server's next bytes: kube-apiserver ends any
# request but a watch or a stream after its --request-timeout, 60 s by default (webhooks
# included), so a longer silence is a server that stalled or a connection half open
REQUEST_S = 60.0
CONNECT_S = 10.0  # ... and for its connection (TCP and the TLS handshake)


class _BoundedClient(client.ApiClient):
    """kubernetes_asyncio waits for ever by default (its `aiohttp.ClientTimeout()` bounds
    nothing), so a stalled or half-open API server would hang the driver. A request that
    names no bound of its own (watches do) gets CONNECT_S and REQUEST_S, and then fails
    with aiohttp's ServerTimeoutError, a ClientError: "the API server did not answer"."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("_request_timeout") is None:
            bound = aiohttp.ClientTimeout(sock_connect=CONNECT_S, sock_read=REQUEST_S)
            kwargs["_request_timeout"] = bound
        return super().request(*args, **kwargs)


# -- the pure readings ----------------------------------------------------------------------
def _condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def _limit(pod: dict[str, Any]) -> str:
    containers = pod.get("spec", {}).get("containers") or [{}]
    memory = (containers[0].get("resources", {}).get("limits") or {}).get("memory")
    return f" (memory limit {memory})" if memory else ""


def ended_reason(pod: dict[str, Any]) -> tuple[str, bool]:
    """Why a pod's container ended, and whether it was the OOM killer."""
    status = pod.get("status", {})
    if status.get("reason") == "Evicted":
        return f"Evicted: {status.get('message', 'the node was short of resources')}", False
    for cs in status.get("containerStatuses") or []:
        for state in (cs.get("state") or {}, cs.get("lastState") or {}):
            term = state.get("terminated")
            if term:
                reason = term.get("reason") or "Error"
                code = term.get("exitCode")
                if reason == "OOMKilled":
                    return f"OOMKilled{_limit(pod)}, exit code {code}", True
                msg = f": {term['message']}" if term.get("message") else ""
                name = cs.get("name", "")
                return f"container {name} ended ({reason}, exit code {code}){msg}", False
    return f"phase {status.get('phase', 'unknown')}", False


def pod_state(pod: dict[str, Any], was_ready: bool) -> tuple[PodState, str, bool]:
    """(state, reason, oom) of a pod object; `was_ready`: kt saw it READY before."""
    meta, status = pod["metadata"], pod.get("status", {})
    gone = PodState.LOST if was_ready else PodState.FAILED
    if status.get("phase") in ("Failed", "Succeeded"):
        reason, oom = ended_reason(pod)
        return gone, reason, oom
    if meta.get("deletionTimestamp"):
        return gone, "it is being deleted (by kt teardown, kubectl or another client)", False
    ready = _condition(pod, "Ready")
    if ready is not None and ready.get("status") == "True" and status.get("podIP"):
        return PodState.READY, "", False
    return PodState.PENDING, "", False


def launch_problem(pod: dict[str, Any], image: str) -> Exception | None:
    """The error a pod that is not ready yet will end in, or None while it may start."""
    name, pool = pod["metadata"]["name"], _pool_of(pod)
    scheduled = _condition(pod, "PodScheduled")
    preempting = bool(pod.get("status", {}).get("nominatedNodeName"))  # room is being made
    if (
        not preempting
        and scheduled
        and (scheduled.get("status"), scheduled.get("reason"))
        == (
            "False",
            "Unschedulable",
        )
    ):
        return PlacementError(
            f"pod {name} of pool {pool} cannot be scheduled (FailedScheduling): "
            f"{scheduled.get('message', '')} Ask for less (cpus, memory, gpus), or use nodes "
            "that have it (a node_selector or tolerations may exclude them)."
        )
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in CONFIG_FAILURES:  # e.g. a Secret named in `secrets` is missing
            return LaunchError(pool, name, f"{waiting['reason']}: {waiting.get('message', '')}")
        if waiting.get("reason") in PULL_FAILURES:
            return PlacementError(
                f"pod {name} of pool {pool}: image {image!r} cannot be pulled "
                f"({waiting['reason']}: {waiting.get('message', '')}). Check the image name "
                "and that the cluster can reach its registry (imagePullSecrets)."
            )
    state, reason, _ = pod_state(pod, was_ready=False)
    if state is PodState.FAILED:
        return LaunchError(pool, name, reason)
    return None


def _pool_of(pod: dict[str, Any]) -> str:
    meta = pod["metadata"]
    return str(
        (meta.get("annotations") or {}).get(manifests.POOL_ANNOTATION)
        or (meta.get("labels") or {}).get(manifests.POOL_LABEL, "")
    )


def _as_pod(obj: dict[str, Any], state: PodState, reason: str = "", oom: bool = False) -> Pod:
    ip = obj.get("status", {}).get("podIP") or ""
    return Pod(obj["metadata"]["name"], _pool_of(obj), ip, SUPERVISOR_PORT, state, reason, oom)


def _mounted(path: str) -> str:
    """A mounted file's path (the test cluster's kubelet has no mount namespace)."""
    return os.environ.get("KT_MOUNT_ROOT", "") + path


def _kt_version() -> str:
    try:
        return metadata.version("kt-runtime")
    except metadata.PackageNotFoundError:
        return "0.1.0"


# -- the provider ---------------------------------------------------------------------------
class K8sProvider(Provider):
    """Pods of pools on the Kubernetes cluster the environment names."""

    name = "k8s"

    def __init__(self) -> None:
        self._client: tuple[asyncio.AbstractEventLoop, client.ApiClient] | None = None
        self._making: dict[asyncio.AbstractEventLoop, asyncio.Task[client.ApiClient]] = {}
        self._namespace = "default"
        self._in_cluster = False  # configured from a pod's service account
        self._conf: client.Configuration | None = None
        self._pools: dict[str, str] = {}  # pool -> its namespace, when not the default
        self._routes: dict[asyncio.AbstractEventLoop, asyncio.Task[dial.Route]] = {}
        self._forwards: dict[asyncio.AbstractEventLoop, tuple[PortForward, dial.Address]] = {}
        self.driver = manifests.dns_label(f"{socket.gethostname()}-{os.getpid()}")

    async def _api(self) -> client.CoreV1Api:
        """The API of the current event loop (a client is bound to the loop it was made in)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            making = self._making.get(loop)
            if making is None:  # one client per loop, however many ask at once
                making = self._making[loop] = loop.create_task(self._new_client())
            try:
                made = await asyncio.shield(making)
            finally:
                if making.done():
                    self._making.pop(loop, None)
            if self._client is None or self._client[0] is not loop:
                self._client = (loop, made)
        return client.CoreV1Api(self._client[1])

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        forward = self._forwards.pop(loop, None)
        if forward is not None:
            await forward[0].close()
        self._routes.pop(loop, None)
        if self._client is not None and self._client[0] is loop:
            await self._client[1].close()
            self._client = None

    async def _new_client(self) -> client.ApiClient:
        conf = client.Configuration()
        kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
        in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        try:
            if os.path.exists(kubeconfig) or not in_cluster:
                loader = await config.load_kube_config(
                    config_file=kubeconfig, client_configuration=conf, persist_config=False
                )
                context = loader.current_context or {}
                self._namespace = context.get("context", {}).get("namespace", "default")
            else:
                InClusterConfigLoader(
                    token_filename=_mounted(f"{SERVICE_ACCOUNT}/token"),
                    cert_filename=_mounted(f"{SERVICE_ACCOUNT}/ca.crt"),
                ).load_and_set(conf)
                ns_file = Path(_mounted(f"{SERVICE_ACCOUNT}/namespace"))
                self._namespace = ns_file.read_text().strip() if ns_file.exists() else "default"
                self._in_cluster = True
        except (config.ConfigException, OSError, ValueError, KeyError) as exc:
            raise ConfigError(
                f"no Kubernetes cluster configured ({exc}): set KUBECONFIG, or run in a pod"
            ) from exc
        self._namespace = os.environ.get("KT_NAMESPACE") or self._namespace
        self._conf = conf
        return _BoundedClient(conf)

    # -- the way to the pods ----------------------------------------------------------------
    async def route(self) -> dial.Route:
        """How this driver reaches the cluster's pods (decided once per event loop): the
        configured gateway; in a pod, directly; outside, through a port-forward to the
        gateway its namespace advertises (charts/kt's ConfigMap), else directly."""
        loop = asyncio.get_running_loop()
        finding = self._routes.get(loop)
        if finding is None:
            finding = self._routes[loop] = loop.create_task(self._find_route())
        try:
            return await asyncio.shield(finding)
        except BaseException:
            if finding.done():
                self._routes.pop(loop, None)  # a ConfigError: ask again next time
            raise

    async def _find_route(self) -> dial.Route:
        api = await self._api()
        advertised: dict[str, str] = {}
        if not kt_config.gateway and not self._in_cluster:
            try:
                found = await api.read_namespaced_config_map(
                    manifests.GATEWAY_CONFIGMAP, self._namespace
                )
                advertised = dict(found.data or {})
            except ApiException as exc:
                if exc.status not in (403, 404):
                    logger.warning("kt: could not look for a gateway: %s", _api_message(exc))
            except aiohttp.ClientError as exc:
                logger.warning("kt: could not look for a gateway: %s", exc)
        where = advertised.get("namespace", "")
        route = dial.choose_route(
            configured=kt_config.gateway,
            in_cluster=self._in_cluster,
            gateway=f"{where}/{advertised.get('selector', '')}" if where else None,
            namespace=self._namespace,
        )
        if route.how is dial.How.PORT_FORWARD:
            assert self._conf is not None
            selector, port = advertised.get("selector", ""), int(advertised.get("port", "7180"))
            forward = PortForward(
                self._conf, where, lambda: self._gateway_pod(where, selector), port
            )
            self._forwards[asyncio.get_running_loop()] = (forward, await forward.start())
        return route

    async def _gateway_pod(self, namespace: str, selector: str) -> str:
        """A Ready gateway pod's name.

        Raises:
            LookupError: none is Ready.
        """
        api = await self._api()
        found = await api.list_namespaced_pod(namespace, label_selector=selector)
        ready = sorted(
            self._raw(p)["metadata"]["name"]
            for p in found.items
            if (_condition(self._raw(p), "Ready") or {}).get("status") == "True"
        )
        if not ready:
            raise LookupError(f"no Ready kt gateway pod in {namespace} ({selector})")
        return ready[0]

    def _reach(self, pod: Pod) -> Pod:
        """Note a pod's way in: through this loop's port-forward, when there is one."""
        forward = self._forwards.get(asyncio.get_running_loop())
        if forward is not None and pod.host:
            dial.via(pod.address, forward[1])
        return pod

    def open_pool(self, pool: str, namespace: str | None) -> None:
        if namespace:
            self._pools[pool] = namespace

    def _ns(self, pool: str | None = None) -> str:
        """The namespace of a pool (its Compute's, once opened or created), else the
        configured one."""
        return (self._pools.get(pool) if pool else None) or self._namespace

    def _raw(self, obj: Any) -> dict[str, Any]:
        assert self._client is not None
        return dict(self._client[1].sanitize_for_serialization(obj))

    # -- creating ---------------------------------------------------------------------------
    async def create_pods(self, specs: list[PodSpec]) -> list[Pod]:
        await self.route()
        pods = await asyncio.gather(*(self._create(spec) for spec in specs))
        return [self._reach(pod) for pod in pods]

    async def _owner_uid(self, api: client.CoreV1Api, spec: PodSpec, ns: str) -> str:
        """The pool's owner ConfigMap (made if missing), its token Secret and its Service."""
        record = f"pool {spec.pool}, made by kt {_kt_version()} from {self.driver}"
        parent = await self._parent(api, spec.pool, ns)
        body = manifests.owner(spec.pool, ns, self.driver, record, parent)
        name = manifests.owner_name(spec.pool)
        try:
            owner = await api.read_namespaced_config_map(name, ns)
        except ApiException as exc:
            if exc.status != 404:
                raise
            try:
                owner = await api.create_namespaced_config_map(ns, _body(body))
            except ApiException as exc2:
                if exc2.status != 409:
                    raise
                owner = await api.read_namespaced_config_map(name, ns)
        uid = str(owner.metadata.uid)
        secret = manifests.token_secret(spec.pool, ns, self.driver, spec.token, uid)
        service = manifests.service(spec.pool, ns, self.driver, uid)
        for create, obj in (
            (api.create_namespaced_secret, secret),
            (api.create_namespaced_service, service),
        ):
            try:
                await create(ns, _body(obj))
            except ApiException as exc:
                if exc.status != 409:
                    raise
        return uid

    async def _parent(self, api: client.CoreV1Api, pool: str, ns: str) -> tuple[str, str] | None:
        """When kt runs in a pod of a pool (KT_POOL) of this namespace: that pool's owner
        object (name, uid), which a pool made from here belongs to."""
        mine = os.environ.get("KT_POOL")
        if not mine or mine == pool or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            return None
        if ns != self._namespace:  # an owner must live in the same namespace
            return None
        try:
            found = await api.read_namespaced_config_map(manifests.owner_name(mine), ns)
        except ApiException:
            return None
        return str(found.metadata.name), str(found.metadata.uid)

    async def _create(self, spec: PodSpec) -> Pod:
        try:
            api = await self._api()
            if spec.namespace:
                self._pools[spec.pool] = spec.namespace
            ns = self._ns(spec.pool)
            uid = await self._owner_uid(api, spec, ns)
            compute = spec.compute if isinstance(spec.compute, Compute) else Compute()
            body = manifests.pod(
                spec,
                compute,
                namespace=ns,
                driver=self.driver,
                owner_uid=uid,
                kt_version=_kt_version(),
            )
            created = self._raw(await api.create_namespaced_pod(ns, _body(body)))
        except ApiException as exc:
            raise _refused(exc) or LaunchError(spec.pool, spec.name, _api_message(exc)) from exc
        except aiohttp.ClientError as exc:
            raise LaunchError(spec.pool, spec.name, _unanswered(exc)) from exc
        name = created["metadata"]["name"]
        try:
            return await asyncio.wait_for(
                self._until_ready(api, ns, created, spec.image), spec.launch_timeout
            )
        except BaseException as exc:
            with contextlib.suppress(KtError, aiohttp.ClientError):  # the first error is news
                await self._delete(api, ns, name, grace=0)
            if isinstance(exc, aiohttp.ClientError):  # its timeouts are TimeoutErrors too
                raise LaunchError(spec.pool, name, _unanswered(exc)) from exc
            if isinstance(exc, TimeoutError):
                raise LaunchError(
                    spec.pool, name, f"not ready after {spec.launch_timeout:g} s"
                ) from None
            raise

    async def _until_ready(
        self, api: client.CoreV1Api, ns: str, created: dict[str, Any], image: str
    ) -> Pod:
        name = created["metadata"]["name"]
        version = created["metadata"]["resourceVersion"]
        pod = created
        while True:
            state, _, _ = pod_state(pod, was_ready=False)
            if state is PodState.READY:
                return _as_pod(pod, state)
            problem = launch_problem(pod, image)
            if isinstance(problem, LaunchError):  # it ran and ended: say what it printed last
                tail = await self._log_tail(api, ns, name)
                raise LaunchError(problem.pool, name, f"{problem.reason}; image {image}{tail}")
            if problem is not None:
                raise problem
            try:
                async with watch.Watch() as w:
                    async for event in w.stream(
                        api.list_namespaced_pod,
                        ns,
                        field_selector=f"metadata.name={name}",
                        resource_version=version,
                        timeout_seconds=30,
                        _request_timeout=60,  # a half-open stream ends too
                    ):
                        obj = event["raw_object"]
                        version = obj["metadata"]["resourceVersion"]
                        if event["type"] == "DELETED":
                            raise LaunchError(_pool_of(obj), name, "it was deleted while starting")
                        if event["type"] in ("ADDED", "MODIFIED"):
                            pod = obj
                            break
            except ApiException as exc:
                if exc.status != 410:
                    raise LaunchError(_pool_of(pod), name, _api_message(exc)) from exc
                try:
                    pod = self._raw(await api.read_namespaced_pod(name, ns))
                except ApiException as again:
                    why = "it was deleted while starting" if again.status == 404 else ""
                    raise LaunchError(_pool_of(pod), name, why or _api_message(again)) from again
                version = pod["metadata"]["resourceVersion"]

    async def _log_tail(self, api: client.CoreV1Api, ns: str, name: str, lines: int = 20) -> str:
        try:
            text = await api.read_namespaced_pod_log(name, ns, container="kt", tail_lines=lines)
        except (ApiException, aiohttp.ClientError):
            return ""
        body = "\n".join(f"  {line}" for line in str(text).rstrip().splitlines())
        return f"; its last lines:\n{body}" if body else ""

    # -- deleting ---------------------------------------------------------------------------
    async def _delete(self, api: client.CoreV1Api, ns: str, name: str, grace: int) -> None:
        try:
            await api.delete_namespaced_pod(name, ns, grace_period_seconds=grace)
        except ApiException as exc:
            if exc.status != 404:
                raise _refused(exc) or PodLostError(name, _api_message(exc)) from exc
        except aiohttp.ClientError as exc:
            raise PodLostError(name, _unanswered(exc)) from exc

    async def delete_pod(self, pool: str, name: str) -> None:
        api = await self._api()
        ns = self._ns(pool)
        await self._delete(api, ns, name, grace=10)
        await self._until_gone(ns, f"metadata.name={name}", "", 30)

    async def delete_pool(self, pool: str) -> int:
        """Delete the pool's owner object: the cluster's garbage collector removes every
        object that names it (pods, Service, token Secret). Waits for the pods to go."""
        api = await self._api()
        ns = self._ns(pool)
        pods = await self.list_pods(pool)
        try:
            await api.delete_namespaced_config_map(
                manifests.owner_name(pool), ns, propagation_policy="Foreground"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise PodLostError(pool, _api_message(exc)) from exc
            await asyncio.gather(*(self._delete(api, ns, p.name, grace=10) for p in pods))
        except aiohttp.ClientError as exc:
            raise PodLostError(pool, _unanswered(exc)) from exc
        await self._until_gone(ns, "", self._selector(pool), 30)
        return len(pods)

    async def delete_own_pod(self, name: str) -> None:
        """Delete this pod; the last pod of its pool (KT_POOL) removes the pool's objects
        too (its owner; the garbage collector takes the Secret and Service)."""
        api = await self._api()
        await self._delete(api, self._ns(), name, grace=5)
        pool = os.environ.get("KT_POOL")
        if pool:  # this pod is being deleted now: it does not count
            await self.release_pool(pool)
        await self.close()

    async def release_pool(self, pool: str) -> None:
        if not [p for p in await self.list_pods(pool) if p.state is not PodState.LOST]:
            api = await self._api()
            try:
                await api.delete_namespaced_config_map(manifests.owner_name(pool), self._ns(pool))
            except ApiException as exc:
                if exc.status != 404:
                    raise PodLostError(pool, _api_message(exc)) from exc
            except aiohttp.ClientError as exc:
                raise PodLostError(pool, _unanswered(exc)) from exc

    async def _until_gone(self, ns: str, fields: str, labels: str, limit: float) -> None:
        """Until no pod matches, or `limit` seconds; raises PodLostError (or AuthError) when
        the API server cannot tell."""
        left: set[str] = set()
        try:
            async with (
                asyncio.timeout(limit),
                contextlib.aclosing(self.follow(ns, labels, fields)) as changes,
            ):
                async for kind, payload in changes:
                    if kind == "LIST":
                        left = {p["metadata"]["name"] for p in payload}
                    elif kind == "DELETED":
                        left.discard(payload["metadata"]["name"])
                    if not left:
                        return
        except ApiException as exc:
            raise _refused(exc) or PodLostError(fields or labels or ns, _api_message(exc)) from exc
        except aiohttp.ClientError as exc:  # before TimeoutError: its timeouts are both
            raise PodLostError(fields or labels or ns, _unanswered(exc)) from exc
        except TimeoutError:  # `limit`: some are still going; they were asked to
            return

    # -- reading ----------------------------------------------------------------------------
    def _selector(self, pool: str | None) -> str:
        if pool is None:
            return SELECTOR
        return f"{SELECTOR},{manifests.POOL_LABEL}={manifests.dns_label(pool)}"

    async def _list(self, pool: str | None) -> tuple[list[dict[str, Any]], str]:
        api = await self._api()
        try:
            found = await api.list_namespaced_pod(
                self._ns(pool), label_selector=self._selector(pool)
            )
        except ApiException as exc:
            raise _refused(exc) or PodLostError(pool or "(all pools)", _api_message(exc)) from exc
        except aiohttp.ClientError as exc:
            raise PodLostError(pool or "(all pools)", _unanswered(exc)) from exc
        items = [self._raw(p) for p in found.items]
        return [p for p in items if pool is None or _pool_of(p) == pool], str(
            found.metadata.resource_version
        )

    async def list_pods(self, pool: str | None = None) -> list[Pod]:
        await self.route()
        items, _ = await self._list(pool)
        pods = []
        for obj in items:
            state, reason, oom = pod_state(obj, was_ready=True)
            pods.append(self._reach(_as_pod(obj, state, reason, oom)))
        return pods

    async def follow(
        self, namespace: str | None, labels: str, fields: str = ""
    ) -> AsyncGenerator[tuple[str, Any], None]:
        """The pods that match, as plain dicts: ("LIST", [pods]) first, then ("ADDED" |
        "MODIFIED" | "DELETED", pod) as they change, each watch request going on from the
        last version seen; after a 410 (that version is too old) another LIST. `namespace`
        None: every namespace. Raises ApiException (not 410) and aiohttp's errors."""
        api = await self._api()
        scope: tuple[Any, ...] = (namespace,) if namespace else ()
        func = api.list_namespaced_pod if namespace else api.list_pod_for_all_namespaces
        while True:
            found = await func(*scope, label_selector=labels, field_selector=fields)
            version = found.metadata.resource_version
            yield "LIST", [self._raw(p) for p in found.items]
            try:
                while True:
                    async with watch.Watch() as w:
                        async for event in w.stream(
                            func,
                            *scope,
                            label_selector=labels,
                            field_selector=fields,
                            resource_version=version,
                            timeout_seconds=WATCH_S,
                            allow_watch_bookmarks=True,
                            _request_timeout=WATCH_S + 30,  # a half-open stream ends too
                        ):
                            obj = event["raw_object"]
                            version = obj["metadata"]["resourceVersion"]
                            if event["type"] != "BOOKMARK":
                                yield event["type"], obj
            except ApiException as exc:
                if exc.status != 410:
                    raise

    async def watch_pods(self, pool: str) -> AsyncIterator[PodEvent]:
        """The pool's pods as they change (`follow`); after a 410 the new list reports
        what changed meanwhile."""
        known: dict[str, PodState] = {}
        try:
            async with contextlib.aclosing(self.follow(self._ns(pool), self._selector(pool))) as c:
                async for kind, payload in c:
                    if kind == "LIST":
                        items = [o for o in payload if _pool_of(o) == pool]
                        for obj in items:
                            event = self._event(obj, known)
                            if event is not None:
                                yield event
                        seen = {o["metadata"]["name"] for o in items}
                        for name in [n for n in known if n not in seen]:
                            del known[name]
                            gone = Pod(name, pool, "", SUPERVISOR_PORT, PodState.DELETED)
                            yield PodEvent(gone, PodState.DELETED)
                        continue
                    obj = payload
                    if _pool_of(obj) != pool:
                        continue
                    if kind == "DELETED":
                        was = known.pop(obj["metadata"]["name"], None)
                        if was not in (None, PodState.LOST, PodState.FAILED):
                            gone = _as_pod(obj, PodState.DELETED, "it was deleted")
                            yield PodEvent(gone, PodState.DELETED)
                        continue
                    event = self._event(obj, known)
                    if event is not None:
                        yield event
        except ApiException as exc:
            raise _refused(exc) or PodLostError(pool, _api_message(exc)) from exc
        except aiohttp.ClientError as exc:
            raise PodLostError(pool, _unanswered(exc)) from exc
        except TimeoutError as exc:  # a watch request's own bound: the server went quiet
            why = f"the API server ended no watch request within {WATCH_S + 30} s"
            raise PodLostError(pool, why) from exc

    def _event(self, obj: dict[str, Any], known: dict[str, PodState]) -> PodEvent | None:
        name = obj["metadata"]["name"]
        was = known.get(name)
        state, reason, oom = pod_state(obj, was_ready=was is PodState.READY)
        if state == was:
            return None
        known[name] = state
        return PodEvent(_as_pod(obj, state, reason, oom), state)

    async def logs(
        self, pool: str, pod: str | None = None, follow: bool = False, tail: int | None = None
    ) -> AsyncIterator[str]:
        """`pods/<name>/log` of the pool's pods (the kt container), merged as they come."""
        pods = [p for p in await self.list_pods(pool) if pod is None or p.name == pod]
        if not pods:
            which = f"pod {pod!r} of pool {pool!r}" if pod else f"pool {pool!r}"
            raise ConfigError(f"no {which} in namespace {self._ns(pool)} (see `kt list`)")
        api = await self._api()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        async def read(name: str) -> None:
            try:
                options: dict[str, Any] = {"container": "kt", "follow": follow}
                if follow:  # a quiet pod may print nothing for hours: no read bound
                    options["_request_timeout"] = aiohttp.ClientTimeout(sock_connect=CONNECT_S)
                if tail is not None:
                    options["tail_lines"] = tail
                reply: Any = await api.read_namespaced_pod_log(  # unread: the raw response
                    name, self._ns(pool), _preload_content=False, **options
                )
                async for chunk in reply.content.iter_any():
                    await queue.put(chunk.decode("utf-8", "replace"))
            except ApiException as exc:
                await queue.put(f"[kt] no log for pod {name}: {_api_message(exc)}\n")
            except aiohttp.ClientError as exc:
                await queue.put(f"[kt] no log for pod {name}: {_unanswered(exc)}\n")
            finally:
                await queue.put(None)

        readers = [asyncio.ensure_future(read(p.name)) for p in pods]
        try:
            left = len(readers)
            while left:
                text = await queue.get()
                if text is None:
                    left -= 1
                else:
                    yield text
        finally:
            for task in readers:
                task.cancel()

    async def read_token(self, pool: str) -> str | None:
        api = await self._api()
        try:
            secret = await api.read_namespaced_secret(
                manifests.token_secret_name(pool), self._ns(pool)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _refused(exc) or PodLostError(pool, _api_message(exc)) from exc
        except aiohttp.ClientError as exc:
            raise PodLostError(pool, _unanswered(exc)) from exc
        data = (secret.data or {}).get("token")
        return base64.b64decode(data).decode() if data else None


def _unanswered(exc: aiohttp.ClientError) -> str:
    """Why, when the API server could not be reached or did not answer in time."""
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return f"the API server did not answer within {REQUEST_S:g} s"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"the API server could not be reached within {CONNECT_S:g} s"
    return f"the API server did not answer: {exc}"


def _refused(exc: ApiException) -> AuthError | None:
    """The API server's 401/403 as kt.AuthError, naming what was not allowed."""
    if exc.status not in (401, 403):
        return None
    return AuthError(
        f"the Kubernetes API refused this driver: {_api_message(exc)}. Ask for that "
        "permission (a Role granting it, bound to your user or service account)."
    )


def _body(obj: dict[str, Any]) -> Any:
    """A manifest as the client's typed API takes it (it serializes plain dicts as they are)."""
    return obj


def _api_message(exc: ApiException) -> str:
    """The API server's own words (its Status message) for an ApiException."""
    try:
        import orjson

        body = orjson.loads(exc.body or b"{}")
        message = body.get("message") or exc.reason
    except ValueError:
        message = exc.reason
    return f"{message} (HTTP {exc.status})"
