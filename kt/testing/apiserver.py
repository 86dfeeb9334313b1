"""The test cluster's API server: the Kubernetes REST protocol for what kt and kubectl use.

Who runs it: `kt.testing.cluster`, with the process kubelet and the scheduler, each a
client of this server only; and tests. Served with aiohttp over TLS
(a CA made for the cluster, `make_tls`: kubectl sends its token only over TLS); state
in memory.

What it speaks (core v1 only): discovery (`/version`, `/api`, `/api/v1`, `/apis`); pods
(with `status`, `binding`, and `log` proxied to the pod's kubelet), services, secrets,
configmaps, events, namespaces, nodes; create, get, list, replace (409 Conflict on a
stale resourceVersion), merge patch (`application/merge-patch+json`, and strategic merge
patch treated as a merge patch: enough for maps, which is what kt patches), delete; a
resourceVersion on every object and list; `labelSelector` (=, ==, !=, in, notin, exists,
!exists) and `fieldSelector` (metadata.name, metadata.namespace, spec.nodeName,
status.phase); watches (one JSON event per line, BOOKMARKs, 410 Gone for a version older
than the kept history); bearer tokens; `Status` bodies with Kubernetes' codes and
reasons; ownerReference cascade on delete; graceful deletion of pods bound to a node
(deletionTimestamp, then removal when the kubelet deletes it with grace period 0).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import hmac
import itertools
import logging
import re
import ssl
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from kt.testing import rbac

logger = logging.getLogger(__name__)

CHANNEL_V4 = "v4.channel.k8s.io"  # the streaming subprotocol: one channel byte per message
HISTORY = 2000  # watch events kept; an older resourceVersion gets 410 Gone
BOOKMARK_S = 5.0  # a watch that asked for bookmarks gets one after this long without events
UNREAD_S = 30.0  # a watch whose client has read nothing for this long is closed
GIT_VERSION = "v1.33.0"


@dataclass(frozen=True)
class Resource:
    name: str
    kind: str
    namespaced: bool
    short: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    group: str = ""  # "" is the core group (/api/v1)

    @property
    def api_version(self) -> str:
        return f"{self.group}/v1" if self.group else "v1"


RBAC = "rbac.authorization.k8s.io"
NETWORKING = "networking.k8s.io"  # NetworkPolicies are stored, not enforced
RESOURCES = {
    r.name: r
    for r in (
        Resource("pods", "Pod", True, ("po",), ("status", "binding", "log", "portforward")),
        Resource("services", "Service", True, ("svc",), ("status",)),
        Resource("secrets", "Secret", True),
        Resource("configmaps", "ConfigMap", True, ("cm",)),
        Resource("events", "Event", True, ("ev",)),
        Resource("namespaces", "Namespace", False, ("ns",), ("status",)),
        Resource("nodes", "Node", False, ("no",), ("status",)),
        Resource("serviceaccounts", "ServiceAccount", True, ("sa",), ("token",)),
        Resource("roles", "Role", True, (), (), RBAC),
        Resource("rolebindings", "RoleBinding", True, (), (), RBAC),
        Resource("clusterroles", "ClusterRole", False, (), (), RBAC),
        Resource("clusterrolebindings", "ClusterRoleBinding", False, (), (), RBAC),
        Resource("networkpolicies", "NetworkPolicy", True, ("netpol",), (), NETWORKING),
    )
}
GROUPS = (RBAC, NETWORKING)  # the API groups besides the core one
VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def status_body(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


# -- selectors --------------------------------------------------------------------------
_SET = re.compile(r"^\s*([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def label_match(selector: str, labels: dict[str, str]) -> bool:
    """Kubernetes' label selector grammar (equality- and set-based)."""
    for term in _split(selector):
        term = term.strip()
        if not term:
            continue
        m = _SET.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",")}
            inside = key in labels and labels[key] in values
            if inside != (op == "in"):
                return False
        elif "!=" in term:
            key, value = (x.strip() for x in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part, {}) if isinstance(value, dict) else {}
    return "" if value == {} or value is None else str(value)


def field_match(selector: str, obj: dict[str, Any]) -> bool:
    for term in _split(selector):
        term = term.strip()
        if not term:
            continue
        negate = "!=" in term
        key, value = (x.strip() for x in re.split(r"!=|==|=", term, maxsplit=1))
        if (_field(obj, key) == value) == negate:
            return False
    return True


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# -- state ------------------------------------------------------------------------------
@dataclass
class Store:
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    history: deque[tuple[int, str, str, dict[str, Any]]] = field(
        default_factory=lambda: deque(maxlen=HISTORY)
    )
    versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    # set, then replaced, on every change: a watch waits on it without a lock, so a watch
    # blocked writing to a client that stopped reading holds up nothing else
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    rv: int = 0

    def _bump(self) -> int:
        self.rv = next(self.versions)
        return self.rv

    def _record(self, kind: str, resource: str, obj: dict[str, Any]) -> None:
        self.history.append((int(obj["metadata"]["resourceVersion"]), kind, resource, obj))
        self.changed.set()
        self.changed = asyncio.Event()

    def oldest(self) -> int:
        return self.history[0][0] if self.history else self.rv

    async def create(self, res: Resource, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{res.kind} is invalid: metadata.name: Required value")
        key = (res.name, ns if res.namespaced else "", name)
        if key in self.objects:
            raise ApiError(409, "AlreadyExists", f'{res.name} "{name}" already exists')
        if res.namespaced and ("namespaces", "", ns) not in self.objects:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
        body["apiVersion"], body["kind"] = res.api_version, res.kind
        if res.namespaced:
            meta["namespace"] = ns
        meta.update(
            uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=str(self._bump())
        )
        if res.name == "pods":
            body.setdefault("status", {}).setdefault("phase", "Pending")
        if res.name == "namespaces":
            body.setdefault("status", {})["phase"] = "Active"
        self.objects[key] = body
        self._record("ADDED", res.name, body)
        if res.name == "namespaces":  # as the service-account controller does
            default = {"metadata": {"name": "default"}}
            await self.create(RESOURCES["serviceaccounts"], name, default)
        return body

    def get(self, res: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.get((res.name, ns if res.namespaced else "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.name} "{name}" not found')
        return obj

    async def replace(
        self, res: Resource, ns: str, name: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        old = self.get(res, ns, name)
        sent = body.get("metadata", {}).get("resourceVersion")
        if sent and sent != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {res.name} "{name}": the object has been '
                "modified; please apply your changes to the latest version and try again",
            )
        meta = body.setdefault("metadata", {})
        for keep in ("uid", "creationTimestamp", "namespace", "name"):
            if keep in old["metadata"]:
                meta[keep] = old["metadata"][keep]
        body["apiVersion"], body["kind"] = res.api_version, res.kind
        meta["resourceVersion"] = str(self._bump())
        self.objects[(res.name, ns if res.namespaced else "", name)] = body
        self._record("MODIFIED", res.name, body)
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and res.name != "pods":
            await self.remove(res, ns, name)
        return body

    async def remove(self, res: Resource, ns: str, name: str) -> dict[str, Any]:
        obj = self.objects.pop((res.name, ns if res.namespaced else "", name), None)
        if obj is None:
            raise ApiError(404, "NotFound", f'{res.name} "{name}" not found')
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self._bump())
        self._record("DELETED", res.name, obj)
        uid = obj["metadata"]["uid"]
        for (rname, rns, rn), dependent in list(self.objects.items()):  # the GC's cascade
            refs = dependent["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                await self.delete(RESOURCES[rname], rns, rn, grace=None)
        return obj

    async def delete(self, res: Resource, ns: str, name: str, grace: int | None) -> dict[str, Any]:
        obj = self.get(res, ns, name)
        bound = res.name == "pods" and obj.get("spec", {}).get("nodeName")
        if bound and grace != 0:  # graceful: the kubelet stops it, then deletes it with 0
            if obj["metadata"].get("deletionTimestamp"):
                return obj
            obj = copy.deepcopy(obj)
            obj["metadata"]["deletionTimestamp"] = _now()
            obj["metadata"]["deletionGracePeriodSeconds"] = 30 if grace is None else grace
            return await self.replace(res, ns, name, obj)
        return await self.remove(res, ns, name)


# -- the server ---------------------------------------------------------------------------
ADMIN = "kubernetes-admin"  # the user of the server's own token: allowed everything
USER = web.RequestKey("user", str)  # who made a request


class ApiServer:
    """`app()` for aiohttp. `token` is the administrator's bearer token; service accounts
    get theirs from the TokenRequest API (`serviceaccounts/<name>/token`), and what they
    may do is decided by RBAC (`kt.testing.rbac`) from the Roles and bindings stored."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.store = Store()
        self.expired = 0  # watches answered 410 Gone
        self.tokens: dict[str, str] = {token: ADMIN}  # bearer token -> user

    async def setup(self) -> None:
        for ns in ("default", "kube-system"):
            await self.store.create(RESOURCES["namespaces"], "", {"metadata": {"name": ns}})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors])
        app.router.add_get("/version", self.version)
        app.router.add_get("/api", self.api_versions)
        app.router.add_get("/api/v1", self.api_resources)
        app.router.add_get("/apis", self.api_groups)
        app.router.add_get("/apis/", self.api_groups)
        app.router.add_route("*", "/api/v1/namespaces/{ns}/{resource}", self.collection)
        app.router.add_route("*", "/api/v1/namespaces/{ns}/{resource}/{name}", self.item)
        app.router.add_route("*", "/api/v1/namespaces/{ns}/{resource}/{name}/{sub}", self.item)
        app.router.add_route("*", "/api/v1/{resource}", self.collection)
        app.router.add_route("*", "/api/v1/{resource}/{name}", self.item)
        app.router.add_route("*", "/api/v1/{resource}/{name}/{sub}", self.item)
        app.router.add_get("/apis/{group}/v1", self.api_resources)
        group = "/apis/{group}/v1"
        app.router.add_route("*", group + "/namespaces/{ns}/{resource}", self.collection)
        app.router.add_route("*", group + "/namespaces/{ns}/{resource}/{name}", self.item)
        app.router.add_route("*", group + "/{resource}", self.collection)
        app.router.add_route("*", group + "/{resource}/{name}", self.item)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        user = self._user(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        if user is None:
            return _json(status_body(401, "Unauthorized", "Unauthorized"), 401)
        request[USER] = user
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as exc:
            return _json(status_body(exc.code, exc.reason, exc.message), exc.code)
        except (orjson.JSONDecodeError, ValueError, KeyError, TypeError) as exc:
            return _json(status_body(400, "BadRequest", f"bad request: {exc}"), 400)

    def _user(self, token: str) -> str | None:
        given = token.encode()
        for known, user in self.tokens.items():  # every one compared: no early exit
            if hmac.compare_digest(given, known.encode()):
                return user
        return None

    def _authorize(
        self, request: web.Request, res: Resource, ns: str, name: str = "", verb: str = ""
    ) -> None:
        """403, in kube-apiserver's words, unless RBAC allows the request's user `verb`
        (default: the request's own)."""
        user = request[USER]
        if user == ADMIN:
            return
        sub = request.match_info.get("sub")
        method = request.method
        if not verb and method == "GET":
            watching = str(request.query.get("watch", "")).lower() in ("1", "true")
            verb = "get" if name else ("watch" if watching else "list")
        elif not verb:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(
                method, method.lower()
            )
        resource = f"{res.name}/{sub}" if sub else res.name
        req = rbac.Request(user, verb, res.group, resource, ns, name)
        if not rbac.allowed(req, self.store.objects):
            raise ApiError(403, "Forbidden", rbac.forbidden(req))

    async def _token_request(self, ns: str, name: str) -> web.Response:
        """TokenRequest: a bearer token for a service account (what a kubelet mounts)."""
        self.store.get(RESOURCES["serviceaccounts"], ns, name)  # 404 when it does not exist
        token = base64.urlsafe_b64encode(uuid.uuid4().bytes + uuid.uuid4().bytes).decode()
        self.tokens[token.rstrip("=")] = f"{rbac.SA_PREFIX}{ns}:{name}"
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"audiences": []},
            "status": {"token": token.rstrip("="), "expirationTimestamp": "2099-01-01T00:00:00Z"},
        }
        return _json(body, 201)

    # -- discovery -------------------------------------------------------------------------
    async def version(self, request: web.Request) -> web.Response:
        return _json(
            {"major": "1", "minor": "33", "gitVersion": GIT_VERSION, "platform": "linux/amd64"}
        )

    async def api_versions(self, request: web.Request) -> web.Response:
        return _json({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})

    async def api_groups(self, request: web.Request) -> web.Response:
        groups = []
        for name in GROUPS:
            version = {"groupVersion": f"{name}/v1", "version": "v1"}
            groups.append({"name": name, "versions": [version], "preferredVersion": version})
        return _json({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})

    async def api_resources(self, request: web.Request) -> web.Response:
        group = request.match_info.get("group", "")
        if group not in ("", *GROUPS):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        items = []
        for res in RESOURCES.values():
            if res.group != group:
                continue
            items.append(
                {
                    "name": res.name,
                    "singularName": res.kind.lower(),
                    "namespaced": res.namespaced,
                    "kind": res.kind,
                    "verbs": VERBS,
                    "shortNames": list(res.short),
                }
            )
            for sub in res.subresources:
                verbs = {
                    "binding": ["create"],
                    "log": ["get"],
                    "token": ["create"],
                    "portforward": ["create", "get"],
                }.get(sub, ["get", "patch", "update"])
                kind = {
                    "binding": "Binding",
                    "log": "Pod",
                    "token": "TokenRequest",
                    "portforward": "PodPortForwardOptions",
                }.get(sub, res.kind)
                items.append(
                    {
                        "name": f"{res.name}/{sub}",
                        "singularName": "",
                        "namespaced": res.namespaced,
                        "kind": kind,
                        "verbs": verbs,
                    }
                )
        version = f"{group}/v1" if group else "v1"
        return _json({"kind": "APIResourceList", "groupVersion": version, "resources": items})

    # -- objects -----------------------------------------------------------------------------
    def _resource(self, request: web.Request) -> tuple[Resource, str]:
        res = RESOURCES.get(request.match_info["resource"])
        if res is None or res.group != request.match_info.get("group", ""):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        ns = request.match_info.get("ns", "")
        if res.namespaced != bool(ns) and not (res.namespaced and request.method == "GET"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return res, ns

    async def collection(self, request: web.Request) -> web.StreamResponse:
        res, ns = self._resource(request)
        self._authorize(request, res, ns)
        if request.method == "POST":
            body = orjson.loads(await request.read())
            return _json(await self.store.create(res, ns, body), 201)
        if request.method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed here")
        query = request.query
        if str(query.get("watch", "")).lower() in ("1", "true"):
            return await self._watch(request, res, ns)
        items = self._select(res, ns, query)
        return _json(
            {
                "kind": f"{res.kind}List",
                "apiVersion": res.api_version,
                "metadata": {"resourceVersion": str(self.store.rv)},
                "items": items,
            }
        )

    def _select(self, res: Resource, ns: str, query: Any) -> list[dict[str, Any]]:
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        out = []
        for (rname, rns, _), obj in sorted(self.store.objects.items()):
            if rname != res.name or (ns and rns != ns):
                continue
            if labels and not label_match(labels, obj["metadata"].get("labels") or {}):
                continue
            if fields and not field_match(fields, obj):
                continue
            out.append(obj)
        return out

    async def _watch(self, request: web.Request, res: Resource, ns: str) -> web.StreamResponse:
        query = request.query
        since = int(query.get("resourceVersion") or self.store.rv)
        labels, fields = query.get("labelSelector", ""), query.get("fieldSelector", "")
        timeout = float(query.get("timeoutSeconds") or 1800)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        if since < self.store.oldest() - 1:
            gone = status_body(
                410, "Expired", f"too old resource version: {since} ({self.store.oldest()})"
            )
            await self._send(request, response, {"type": "ERROR", "object": gone})
            self.expired += 1
            return response
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        bookmarks = str(query.get("allowWatchBookmarks", "")).lower() in ("1", "true")
        sent = since
        while loop.time() < deadline:
            if sent < self.store.oldest() - 1:  # fell behind what is kept: say so, skip none
                gone = status_body(410, "Expired", f"too old resource version: {sent}")
                await self._send(request, response, {"type": "ERROR", "object": gone})
                self.expired += 1
                return response
            seen = list(self.store.history)
            for rv, kind, rname, obj in seen:
                if rv <= sent or rname != res.name:
                    continue
                sent = rv
                if ns and obj["metadata"].get("namespace") != ns:
                    continue
                if labels and not label_match(labels, obj["metadata"].get("labels") or {}):
                    continue
                if fields and not field_match(fields, obj):
                    continue
                if not await self._send(request, response, {"type": kind, "object": obj}):
                    return response
            if seen:  # past what was filtered out; not past what came while writing
                sent = max(sent, seen[-1][0])
            if self.store.history and self.store.history[-1][0] > sent:
                continue
            changed = self.store.changed  # no await since the check: no change is missed
            try:
                await asyncio.wait_for(changed.wait(), min(BOOKMARK_S, deadline - loop.time()))
            except TimeoutError:
                if bookmarks:
                    mark = {
                        "kind": res.kind,
                        "apiVersion": res.api_version,
                        "metadata": {"resourceVersion": str(sent)},
                    }
                    if not await self._send(
                        request, response, {"type": "BOOKMARK", "object": mark}
                    ):
                        return response
        return response

    async def _send(
        self, request: web.Request, response: web.StreamResponse, event: dict[str, Any]
    ) -> bool:
        """One event to a watch; False (the connection closed) when its client has not read
        for UNREAD_S, as kube-apiserver closes a watcher that falls behind."""
        try:
            async with asyncio.timeout(UNREAD_S):  # a timer, not a task: this is every event
                await response.write(orjson.dumps(event) + b"\n")
            return True
        except TimeoutError:
            logger.warning(
                "apiserver: closing the watch %s of %s: its client took in nothing for %g s",
                request.path_qs,
                request.remote,
                UNREAD_S,
            )
            if request.transport is not None:
                request.transport.abort()
            return False

    async def item(self, request: web.Request) -> web.StreamResponse:
        res, ns = self._resource(request)
        name, sub = request.match_info["name"], request.match_info.get("sub")
        self._authorize(request, res, ns, name)
        store = self.store
        if sub == "token" and res.name == "serviceaccounts" and request.method == "POST":
            return await self._token_request(ns, name)
        if sub == "log" and res.name == "pods" and request.method == "GET":
            return await self._pod_log(request, ns, name)
        if sub == "portforward" and res.name == "pods" and request.method == "GET":
            # a websocket upgrade is a GET; newer kube-apiservers also require create
            self._authorize(request, res, ns, name, verb="create")
            return await self._port_forward(request, ns, name)
        if sub == "binding" and res.name == "pods" and request.method == "POST":
            body = orjson.loads(await request.read())
            pod = copy.deepcopy(store.get(res, ns, name))
            if pod["spec"].get("nodeName"):
                raise ApiError(409, "Conflict", f"pod {name} is already assigned to a node")
            pod["spec"]["nodeName"] = body["target"]["name"]
            conditions = pod.setdefault("status", {}).setdefault("conditions", [])
            conditions[:] = [c for c in conditions if c.get("type") != "PodScheduled"]
            conditions.append(
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": _now()}
            )
            await store.replace(res, ns, name, pod)
            return _json(status_body(201, "", "bound") | {"status": "Success"}, 201)
        if sub not in (None, "status"):
            raise ApiError(404, "NotFound", f"no subresource {sub}")
        if request.method == "GET":
            return _json(store.get(res, ns, name))
        if request.method == "DELETE":
            raw = await request.read()
            options = orjson.loads(raw) if raw else {}
            grace = request.query.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
            return _json(await store.delete(res, ns, name, None if grace is None else int(grace)))
        body = orjson.loads(await request.read())
        old = store.get(res, ns, name)
        if request.method == "PATCH":
            kind = request.content_type
            if kind not in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {kind}")
            body = merge_patch(copy.deepcopy(old), body)
            body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        elif request.method != "PUT":
            raise ApiError(405, "MethodNotAllowed", f"{request.method} is not allowed here")
        if sub == "status":  # only the status changes
            body = {**copy.deepcopy(old), "status": body.get("status", {})}
            body["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        elif res.name == "pods":
            body["status"] = old.get("status", {})  # status only through /status
        return _json(await store.replace(res, ns, name, body))

    async def _pod_log(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        """`pods/<name>/log`, proxied to the kubelet of the pod's node, as kube-apiserver
        does (the node's InternalIP and daemonEndpoints.kubeletEndpoint.Port)."""
        pod = self.store.get(RESOURCES["pods"], ns, name)
        node_name = pod.get("spec", {}).get("nodeName")
        if not node_name:
            raise ApiError(400, "BadRequest", f'pod "{name}" is not scheduled to a node yet')
        node = self.store.get(RESOURCES["nodes"], "", node_name).get("status", {})
        port = node.get("daemonEndpoints", {}).get("kubeletEndpoint", {}).get("Port")
        address = next(
            (a["address"] for a in node.get("addresses", []) if a.get("type") == "InternalIP"),
            None,
        )
        if not port or not address:
            raise ApiError(503, "ServiceUnavailable", f"node {node_name} serves no logs")
        containers = [c["name"] for c in pod["spec"].get("containers", [])]
        container = request.query.get("container") or (containers[0] if containers else "")
        if container not in containers:
            raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {name}")
        follow = request.query.get("follow", "false")
        tail = request.query.get("tailLines", "")
        url = f"http://{address}:{port}/containerLogs/{ns}/{name}/{container}?follow={follow}"
        url += f"&tailLines={tail}" if tail else ""
        reply = web.StreamResponse(headers={"Content-Type": "text/plain"})
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as upstream:
            if upstream.status == 404:
                raise ApiError(404, "NotFound", await upstream.text())
            await reply.prepare(request)
            async for chunk in upstream.content.iter_any():
                await reply.write(chunk)
        await reply.write_eof()
        return reply

    async def _port_forward(self, request: web.Request, ns: str, name: str) -> web.StreamResponse:
        """`pods/<name>/portforward` over a websocket (subprotocol v4.channel.k8s.io), one
        port: channel 0 carries data, channel 1 errors, and each first sends the port (two
        bytes, little-endian). kube-apiserver hands the stream to the pod's kubelet, which
        connects to the port inside the pod's network namespace; the test cluster's pods
        have host addresses, so this server connects to podIP:port itself."""
        pod = self.store.get(RESOURCES["pods"], ns, name)
        ports = [p for v in request.query.getall("ports", []) for p in v.split(",") if p]
        if len(ports) != 1 or not ports[0].isdigit() or not 0 < int(ports[0]) < 65536:
            raise ApiError(400, "BadRequest", 'query parameter "ports" must name one port')
        port, status = int(ports[0]), pod.get("status", {})
        if status.get("phase") != "Running" or not status.get("podIP"):
            raise ApiError(400, "BadRequest", f"pod {name} is not running")
        ws = web.WebSocketResponse(protocols=(CHANNEL_V4,))
        if ws.can_prepare(request).protocol != CHANNEL_V4:
            raise ApiError(400, "BadRequest", f"upgrade to a websocket with {CHANNEL_V4}")
        await ws.prepare(request)
        prefix = port.to_bytes(2, "little")
        await ws.send_bytes(b"\x00" + prefix)
        await ws.send_bytes(b"\x01" + prefix)
        try:
            reader, writer = await asyncio.open_connection(status["podIP"], port)
        except OSError as exc:
            said = f"error forwarding port {port} to pod {name}: {exc}"
            await ws.send_bytes(b"\x01" + said.encode())
            await ws.close()
            return ws

        async def down() -> None:
            while chunk := await reader.read(1 << 16):
                await ws.send_bytes(b"\x00" + chunk)
            await ws.close()

        sending = asyncio.ensure_future(down())
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY and msg.data[:1] == b"\x00":
                    writer.write(msg.data[1:])
                    await writer.drain()
        except OSError:
            pass  # the pod went away: the websocket ends
        finally:
            sending.cancel()
            writer.close()
        return ws


@dataclass(frozen=True)
class Tls:
    """The server's certificate, issued by a CA made for this cluster (clients trust
    `ca_pem`); kubectl sends a bearer token only over TLS."""

    ca_pem: bytes
    context: ssl.SSLContext


def make_tls(hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Tls:
    import trustme  # a test CA: the test cluster's own, never a real one

    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*hosts).configure_cert(context)
    return Tls(ca.cert_pem.bytes(), context)


def kubeconfig(url: str, token: str, ca_pem: bytes) -> dict[str, Any]:
    """A kubeconfig for this server (kubectl, kubernetes_asyncio's loader)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kt-test",
                "cluster": {
                    "server": url,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": "kt-test", "user": {"token": token}}],
        "contexts": [{"name": "kt-test", "context": {"cluster": "kt-test", "user": "kt-test"}}],
        "current-context": "kt-test",
    }


async def serve(
    host: str, port: int, token: str, tls: Tls | None = None
) -> tuple[web.AppRunner, ApiServer]:
    """Start serving (https with `tls`); returns the runner (`await runner.cleanup()`
    stops it) and the server (its store, for tests)."""
    server = ApiServer(token)
    await server.setup()
    # a watch whose client went away ends at once; stopping waits for no open watch
    runner = web.AppRunner(server.app(), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context if tls else None)
    await site.start()
    return runner, server
