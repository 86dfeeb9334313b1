"""The Kubernetes objects of a pool, as plain dicts: pure functions, no I/O.

Who calls it: `kt.k8s.provider` (it applies them through kubernetes_asyncio), and
`compute.manifest`-style inspection. Per pool:

- an **owner** ConfigMap `kt-<pool>` holding the pool's record; every other object of
  the pool names it in `ownerReferences`, so `kubectl delete configmap kt-<pool>` (or
  kt teardown) removes the pool through the garbage collector;
- a **token** Secret `kt-<pool>-token`: the pool's call-channel token, mounted into the
  pods (so RBAC on Secrets decides who may run code on them);
- a **headless Service** `kt-<pool>`: stable DNS (`<pod>.kt-<pool>`) for ranks and
  KT_POD_IPS, published before the pods are ready;
- bare **Pods**, one per replica (not a Deployment: kt's scheduler chooses which pod to
  delete), `restartPolicy: Never`, running `python -m kt.supervisor`.

Every object carries `kt.dev/pool`, `kt.dev/driver` and `app.kubernetes.io/managed-by:
kt`. Names are DNS-1123 labels (`dns_label`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import shlex
from typing import Any

from kt.core.compute import Compute, parse_memory
from kt.core.config import config
from kt.core.errors import ConfigError
from kt.core.provider import SUPERVISOR_PORT, PodSpec

MANAGED_BY = {"app.kubernetes.io/managed-by": "kt", "app.kubernetes.io/name": "kt"}
POOL_LABEL = "kt.dev/pool"
POOL_ANNOTATION = "kt.dev/pool-name"  # the exact name (the label is its DNS-1123 form)
DRIVER_LABEL = "kt.dev/driver"
# the chart's gateway pods (charts/kt, "kt.gatewaySelector"): a driver outside the cluster
# opens a port-forward to one of them
GATEWAY_SELECTOR = "app.kubernetes.io/name=kt,app.kubernetes.io/component=gateway"
# where a served namespace advertises its gateway (the chart's; data: namespace, selector,
# port); a dot in the name keeps it apart from every pool's owner ConfigMap
GATEWAY_CONFIGMAP = "kt.gateway"
TOKEN_DIR = "/var/run/secrets/kt"
UID = 1000  # the supervisor runs as this user: never root


def dns_label(name: str, limit: int = 63) -> str:
    """`name` as a DNS-1123 label: lowercase alphanumerics and '-', at most `limit`
    characters (a hash suffix keeps shortened names distinct)."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "kt"
    if len(label) > limit:
        digest = hashlib.sha1(name.encode()).hexdigest()[:6]
        label = f"{label[: limit - 7].rstrip('-')}-{digest}"
    return label


def owner_name(pool: str) -> str:
    return dns_label(f"kt-{pool}")


def service_name(pool: str) -> str:
    return dns_label(f"kt-{pool}")


def token_secret_name(pool: str) -> str:
    return dns_label(f"kt-{pool}-token")


def labels(pool: str, driver: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **(extra or {}),
        **MANAGED_BY,
        POOL_LABEL: dns_label(pool),
        DRIVER_LABEL: dns_label(driver),
    }


def _meta(
    name: str, namespace: str, pool: str, driver: str, owner_uid: str | None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": labels(pool, driver),
    }
    if owner_uid is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": owner_name(pool),
                "uid": owner_uid,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


# What a kt driver does through the API, and so what a pod that makes pools (or deletes
# itself when idle) needs: the least verbs per resource. The chart grants the same.
DRIVER_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pods", ("get", "list", "watch", "create", "delete")),  # pools' pods, an idle pod itself
    ("pods/log", ("get",)),  # kt logs, and why a pod did not start
    ("configmaps", ("get", "create", "delete")),  # a pool's owner
    ("secrets", ("get", "create")),  # a pool's token
    ("services", ("create",)),  # a pool's headless Service
)


def driver_role(namespace: str, name: str = "kt-driver") -> dict[str, Any]:
    """A Role with DRIVER_RULES in `namespace`."""
    rules = [
        {"apiGroups": [""], "resources": [resource], "verbs": list(verbs)}
        for resource, verbs in DRIVER_RULES
    ]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY)},
        "rules": rules,
    }


def role_binding(namespace: str, service_account: str, role: str = "kt-driver") -> dict[str, Any]:
    """Binds `role` to a service account of `namespace` (kt's pods run as it)."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": dns_label(f"{role}-{service_account}"),
            "namespace": namespace,
            "labels": dict(MANAGED_BY),
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }


def owner(
    pool: str,
    namespace: str,
    driver: str,
    record: str,
    parent: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The object every other object of the pool belongs to; `record` describes the pool
    (for `kt list` and people reading `kubectl get configmap -o yaml`). `parent` (the
    owner ConfigMap's name and uid of the pool whose pod made this one) makes the pool
    belong to that pool: deleting the parent removes it."""
    meta = _meta(owner_name(pool), namespace, pool, driver, None)
    if parent is not None:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": parent[0],
                "uid": parent[1],
                "blockOwnerDeletion": True,
            }
        ]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"pool": pool, "record": record},
    }


def token_secret(
    pool: str, namespace: str, driver: str, token: str, owner_uid: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _meta(token_secret_name(pool), namespace, pool, driver, owner_uid),
        "data": {"token": base64.b64encode(token.encode()).decode()},
    }


def service(pool: str, namespace: str, driver: str, owner_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(service_name(pool), namespace, pool, driver, owner_uid),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {POOL_LABEL: dns_label(pool)},
            "ports": [
                {"name": "kt", "port": SUPERVISOR_PORT, "targetPort": SUPERVISOR_PORT},
                {"name": "control", "port": SUPERVISOR_PORT + 1, "targetPort": SUPERVISOR_PORT + 1},
            ],
        },
    }


def _quantity_cpus(cpus: float) -> str:
    return f"{round(cpus * 1000)}m"


def quantity_bytes(amount: int) -> str:
    """Bytes as a Kubernetes quantity a person reads: 2Gi, 600Mi, or plain bytes."""
    for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if amount >= size and amount % size == 0:
            return f"{amount // size}{suffix}"
    return str(amount)


def _secret_mounts(
    compute: Compute,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(envFrom, volumes, volumeMounts) for `secrets`: "name" is every key as an
    environment variable, "name:/path" the Secret's files at /path."""
    env_from, volumes, mounts = [], [], []
    for item in compute.secrets:
        name, _, path = item.partition(":")
        if not name:
            raise ConfigError(f"secrets entry {item!r}: give a Secret's name, or name:/path")
        if path:
            vol = dns_label(f"secret-{name}")
            volumes.append({"name": vol, "secret": {"secretName": name}})
            mounts.append({"name": vol, "mountPath": path, "readOnly": True})
        else:
            env_from.append({"secretRef": {"name": name}})
    return env_from, volumes, mounts


def _volume_mounts(compute: Compute) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`volumes`: "claim:/path" mounts a PersistentVolumeClaim, "emptyDir:/path" scratch
    space of the pod's own."""
    volumes, mounts = [], []
    for i, item in enumerate(compute.volumes):
        source, _, path = item.partition(":")
        if not source or not path.startswith("/"):
            raise ConfigError(
                f"volumes entry {item!r}: write 'claim-name:/mount/path' or 'emptyDir:/path'"
            )
        vol = dns_label(f"vol-{i}-{source}")
        if source == "emptyDir":
            volumes.append({"name": vol, "emptyDir": {}})
        else:
            volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": source}})
        mounts.append({"name": vol, "mountPath": path})
    return volumes, mounts


NO_KT_EXIT = 3  # the pod's command could not install kt


def command(kt_version: str, image: str) -> list[str]:
    """The container's command: the supervisor, after installing the driver's exact kt
    when the image has none (pip's own output, then kt's line naming the image, go to the
    container's log; the provider quotes its last lines)."""
    pip = f"kt-runtime[k8s]=={kt_version}"  # the k8s extra: idle pods delete themselves
    said = shlex.quote(f"kt: image {image} has no kt, and pip could not install {pip}")
    # the pod's user (uid 1000) may have no home in the image: install under /tmp
    script = (
        'export PYTHONUSERBASE="${PYTHONUSERBASE:-/tmp/kt-user}"; '
        'python -c "import kt" 2>/dev/null || '
        f"HOME=/tmp python -m pip install --user --quiet {shlex.quote(pip)} "
        f"|| {{ echo {said} >&2; exit {NO_KT_EXIT}; }}; "
        "exec python -m kt.supervisor"
    )
    return ["sh", "-c", script]


def pod(
    spec: PodSpec,
    compute: Compute,
    *,
    namespace: str,
    driver: str,
    owner_uid: str,
    kt_version: str,
) -> dict[str, Any]:
    """One pod of the pool, as kt's scheduler asked for it."""
    requests: dict[str, str] = {"cpu": _quantity_cpus(spec.cpus)}
    limits: dict[str, str] = {}
    memory = spec.memory or parse_memory(compute.memory)
    if memory:
        requests["memory"] = limits["memory"] = quantity_bytes(memory)
    if spec.gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.gpus)
    for name, amount in compute.resources.items():
        whole = f"{amount:g}"
        requests[name] = limits[name] = whole  # extended resources: request == limit
    env_from, secret_volumes, secret_mounts = _secret_mounts(compute)
    pvc_volumes, pvc_mounts = _volume_mounts(compute)
    env = [
        {"name": "KT_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KT_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "KT_POOL", "value": spec.pool},
        {"name": "KT_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
        {"name": "KT_BACKEND", "value": "k8s"},  # an idle pod deletes itself through the API
        # pools made inside the pod run as the pod's own service account
        {
            "name": "KT_SERVICE_ACCOUNT",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
        },
        *({"name": k, "value": v} for k, v in sorted({**compute.env, **spec.env}.items())),
    ]
    if spec.inactivity_ttl is not None:
        env.append({"name": "KT_INACTIVITY_TTL", "value": f"{spec.inactivity_ttl:g}"})
    container: dict[str, Any] = {
        "name": "kt",
        "image": spec.image,
        "command": command(kt_version, spec.image),
        "ports": [
            {"name": "kt", "containerPort": SUPERVISOR_PORT},
            {"name": "control", "containerPort": SUPERVISOR_PORT + 1},
        ],
        "env": env,
        "resources": {"requests": requests, **({"limits": limits} if limits else {})},
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": SUPERVISOR_PORT + 1},
            "periodSeconds": 2,
            "failureThreshold": 3,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "kt-token", "mountPath": TOKEN_DIR, "readOnly": True},
            *secret_mounts,
            *pvc_mounts,
        ],
    }
    if env_from:
        container["envFrom"] = env_from
    pool_labels = labels(spec.pool, driver, {**compute.labels, **spec.labels})
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            **_meta(dns_label(spec.name), namespace, spec.pool, driver, owner_uid),
            "labels": pool_labels,
            "annotations": {**compute.annotations, POOL_ANNOTATION: spec.pool},
        },
        "spec": {
            "restartPolicy": "Never",
            "hostname": dns_label(spec.name),
            "subdomain": service_name(spec.pool),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": UID,
                "runAsGroup": UID,
                "fsGroup": UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": [
                {"name": "kt-token", "secret": {"secretName": token_secret_name(spec.pool)}},
                *secret_volumes,
                *pvc_volumes,
            ],
        },
    }
    pod_spec = body["spec"]
    if compute.node_selector:
        pod_spec["nodeSelector"] = dict(compute.node_selector)
    if compute.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in compute.tolerations]
    if compute.priority_class:
        pod_spec["priorityClassName"] = compute.priority_class
    account = compute.service_account or config.service_account
    if account:
        pod_spec["serviceAccountName"] = account
    return body
