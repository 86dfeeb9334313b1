"""The Kubernetes objects of a pool (pure functions; no cluster needed).

Behaviours covered:
- for a Compute with every option set, the owner ConfigMap, the token Secret, the
  headless Service and a Pod validate (strictly: no unknown fields) against the
  Kubernetes 1.30 and 1.37 schemas with kubernetes-validate;
- every Compute field lands where a Kubernetes user expects it: requests, memory and
  GPU limits, custom resources, node selector, tolerations, labels, annotations, env,
  secrets as envFrom and as files, volumes, priority class, service account, image;
- every object but the owner names the owner in ownerReferences and carries the pool,
  driver and managed-by labels; the pod is restartPolicy Never, non-root, no privilege
  escalation, seccomp RuntimeDefault, with a readiness probe on /healthz;
- names are DNS-1123 labels; a bad secrets or volumes entry is refused with the form.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import kubernetes_validate
import pytest

import kt
from kt.core.provider import PodSpec
from kt.k8s import manifests

UID = "6c1d2f5e-1111-4a4a-9f9f-0123456789ab"
COMPUTE = kt.Compute(
    cpus="1500m",
    memory="2Gi",
    gpus=1,
    replicas=2,
    image=kt.Image("ghcr.io/example/train:1.0").pip_install(["numpy"]),
    name="trainer-pool",
    namespace="ml",
    labels={"team": "rl"},
    annotations={"example.com/owner": "alice"},
    env={"FOO": "1"},
    secrets=["hf-token", "tls:/etc/tls"],
    volumes=["datasets:/data", "emptyDir:/scratch"],
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    priority_class="high",
    service_account="kt-runner",
    inactivity_ttl="30m",
    backend="local",
    resources={"example.com/fpga": 2},
)
SPEC = PodSpec(
    pool="trainer-pool",
    name="trainer-pool-a1b2c3",
    cpus=1.5,
    memory=2 * 2**30,
    gpus=1,
    token="s3cret",
    env={"KT_EXTRA": "x"},
    inactivity_ttl=1800.0,
    image="ghcr.io/example/train:1.0",
    namespace="ml",
)


def _objects() -> dict[str, dict[str, Any]]:
    return {
        "owner": manifests.owner("trainer-pool", "ml", "driver-4242", record="{}"),
        "secret": manifests.token_secret("trainer-pool", "ml", "driver-4242", "s3cret", UID),
        "service": manifests.service("trainer-pool", "ml", "driver-4242", UID),
        "pod": manifests.pod(
            SPEC, COMPUTE, namespace="ml", driver="driver-4242", owner_uid=UID, kt_version="0.1.0"
        ),
    }


def _child_owner() -> dict[str, Any]:
    """The owner of a pool made from a pod of trainer-pool."""
    parent = ("kt-trainer-pool", UID)
    return manifests.owner("rollout", "ml", "driver-4242", record="{}", parent=parent)


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_every_object_validates_strictly(version: str) -> None:
    rbac = {
        "role": manifests.driver_role("ml"),
        "role binding": manifests.role_binding("ml", "kt-runner"),
    }
    for kind, body in {**_objects(), "child owner": _child_owner(), **rbac}.items():
        try:
            kubernetes_validate.validate(body, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{kind} is invalid for Kubernetes {version}: {exc}") from exc


def test_an_invalid_object_is_caught_by_the_validator() -> None:
    broken = _objects()["pod"]
    broken["spec"]["containers"][0]["resources"]["requests"]["cpu"] = {"not": "a quantity"}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def test_every_compute_field_lands_where_kubernetes_users_expect_it() -> None:
    body = _objects()["pod"]
    spec = body["spec"]
    (container,) = spec["containers"]
    assert container["image"] == "ghcr.io/example/train:1.0"
    resources = container["resources"]
    assert resources["requests"] == {
        "cpu": "1500m",
        "memory": "2Gi",
        "nvidia.com/gpu": "1",
        "example.com/fpga": "2",
    }
    assert resources["limits"] == {
        "memory": "2Gi",
        "nvidia.com/gpu": "1",
        "example.com/fpga": "2",
    }
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["priorityClassName"] == "high"
    assert spec["serviceAccountName"] == "kt-runner"
    assert body["metadata"]["labels"]["team"] == "rl"
    assert body["metadata"]["annotations"] == {
        "example.com/owner": "alice",
        "kt.dev/pool-name": "trainer-pool",  # the exact name; the label is its DNS form
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["FOO"] == "1" and env["KT_EXTRA"] == "x" and env["KT_INACTIVITY_TTL"] == "1800"
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes[mounts["/etc/tls"]]["secret"] == {"secretName": "tls"}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"] == {"claimName": "datasets"}
    assert volumes[mounts["/scratch"]]["emptyDir"] == {}
    token = volumes[mounts[manifests.TOKEN_DIR]]["secret"]["secretName"]
    assert token == manifests.token_secret_name("trainer-pool")
    assert env["KT_TOKEN_FILE"] == f"{manifests.TOKEN_DIR}/token"
    assert env["KT_BACKEND"] == "k8s"  # an idle supervisor deletes its pod through the API
    secret = _objects()["secret"]
    assert secret["metadata"]["name"] == token
    assert base64.b64decode(secret["data"]["token"]) == b"s3cret"


def test_ownership_labels_and_the_pods_safety() -> None:
    objects = _objects()
    for kind, body in objects.items():
        meta = body["metadata"]
        assert meta["labels"]["kt.dev/pool"] == "trainer-pool"
        assert meta["labels"]["kt.dev/driver"] == "driver-4242"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kt"
        assert meta["namespace"] == "ml"
        if kind == "owner":
            assert "ownerReferences" not in meta
            (ref,) = _child_owner()["metadata"]["ownerReferences"]  # a child pool's belongs
            assert (ref["kind"], ref["name"], ref["uid"]) == ("ConfigMap", "kt-trainer-pool", UID)
        else:
            (ref,) = meta["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"]) == ("ConfigMap", "kt-trainer-pool", UID)
    service = objects["service"]["spec"]
    assert service["clusterIP"] == "None" and service["selector"] == {"kt.dev/pool": "trainer-pool"}
    pod = objects["pod"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == objects["service"]["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 7171}
    assert "kt-runtime[k8s]==0.1.0" in container["command"][-1]
    assert container["command"][-1].endswith("exec python -m kt.supervisor")


def test_names_are_dns_labels_and_bad_entries_are_refused() -> None:
    for raw in ("Trainer_Pool", "x" * 100, "--a..b--", "ÜBER pool"):
        label = manifests.dns_label(raw)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", label) and len(label) <= 63, label
    assert manifests.dns_label("x" * 100) != manifests.dns_label("x" * 99)
    bad_secret = kt.Compute(secrets=[":/etc"], backend="local")
    with pytest.raises(kt.ConfigError, match="name:/path"):
        manifests.pod(SPEC, bad_secret, namespace="ml", driver="d", owner_uid=UID, kt_version="0")
    bad_volume = kt.Compute(volumes=["datasets"], backend="local")
    with pytest.raises(kt.ConfigError, match="claim-name:/mount/path"):
        manifests.pod(SPEC, bad_volume, namespace="ml", driver="d", owner_uid=UID, kt_version="0")
