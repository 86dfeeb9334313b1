"""charts/kt: rendered and linted by Helm's own SDK, validated, and applied to the test
cluster.

Behaviours covered:
- the chart renders with its defaults and with ci/all-options.yaml (which sets every value
  values.yaml has), `helm lint --strict` finds no warning or error with either, and every
  rendered object validates (kubernetes-validate, strict) against Kubernetes 1.30 and 1.37;
- a misspelt or mistyped value is refused by values.schema.json naming its path;
- the RBAC table of charts/kt/README.md is exactly the rendered Roles (name, namespace,
  resource, verbs), and the pods' Role is kt's own DRIVER_RULES;
- the gateway runs non-root, no privilege escalation, no capabilities, seccomp
  RuntimeDefault, read-only root, serving the chosen namespaces; the NetworkPolicy admits
  kt pods of the served namespaces on every port (torch.distributed links between them),
  and the gateway and extraFrom only on ports 7170/7171;
- on the test cluster (kubectl creates the rendered service accounts, Roles, RoleBindings
  and NetworkPolicy): the kt-pod account's token may do what kt-pod allows in a served
  namespace and gets 403 naming the verb and resource elsewhere; the gateway's may read
  pods and secrets but not make pods; the gateway Deployment's pod runs (its tcpSocket
  probe passes) and relays a caller's HELLO to a kt pool made in a served namespace with
  the kt-pod account, authorized only by the chart's Roles.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import time
import uuid
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.rest import ApiException

import kt
from kt.actors.driver import get_driver
from kt.core import protocol
from kt.core.provider import SUPERVISOR_PORT, get_provider
from kt.k8s import manifests
from tests.charts.chart import ALL_OPTIONS, CHART, all_options, gateway_pod, render
from tests.distributed.torchrun import free_port
from tests.k8s.kubectl import kubectl

pytestmark = pytest.mark.timeout(240)
VALUES = {"defaults": {}, "all-options": all_options()}


def _leaves(values: Any, prefix: str = "") -> set[str]:
    if isinstance(values, dict) and values:
        return set().union(*(_leaves(v, f"{prefix}.{k}".lstrip(".")) for k, v in values.items()))
    return {prefix}


def test_all_options_sets_every_value() -> None:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    given = _leaves(all_options())
    missing = {
        leaf
        for leaf in _leaves(defaults)
        if not any(g == leaf or g.startswith(f"{leaf}.") for g in given)
    }
    assert not missing, f"{ALL_OPTIONS.name} does not set {sorted(missing)}"


@pytest.mark.parametrize("which", VALUES)
def test_the_chart_lints_and_every_object_validates(which: str) -> None:
    report = helm_python.lint(CHART, VALUES[which], strict=True, namespace="kt-system")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report
    objects = render(VALUES[which])
    kinds = sorted({o["kind"] for o in objects})
    expected = ["ConfigMap", "Deployment", "NetworkPolicy", "Role", "RoleBinding", "Service"]
    expected.append("ServiceAccount")
    assert kinds == sorted(expected + (["Ingress"] if which == "all-options" else []))
    for obj in objects:
        for version in ("1.30.0", "1.37.0"):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = f"{obj['kind']}/{obj['metadata']['name']}"
                raise AssertionError(f"{where} is invalid for Kubernetes {version}: {exc}") from exc


def test_a_wrong_value_is_refused_naming_it() -> None:
    for values, said in (
        ({"gateway": {"replicas": "two"}}, "/gateway/replicas"),
        ({"gatway": {}}, "'gatway' not allowed"),
        ({"gateway": {"heartbeatSeconds": 30}}, "/gateway/heartbeatSeconds"),
        ({"namespaces": ["Team_A"]}, "/namespaces/0"),
    ):
        with pytest.raises(helm_python.HelmValuesError, match=re.escape(said)):
            render(values)


def _readme_table() -> set[tuple[str, str, str, tuple[str, ...]]]:
    text = (CHART / "README.md").read_text().split("## RBAC", 1)[1].split("\n## ", 1)[0]
    rows = set()
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not cells[0].startswith("`"):
            continue
        role, where, _, resource, verbs, _ = cells
        verb_list = tuple(sorted(v.strip() for v in verbs.split(",")))
        rows.add((role.strip("`"), where, resource.strip("`"), verb_list))
    return rows


def _rendered_roles(objects: list[Any], served: list[str], release: str) -> set[Any]:
    rows = set()
    for role in (o for o in objects if o["kind"] == "Role"):
        meta = role["metadata"]
        where = "the release's" if meta["namespace"] == release else "each served"
        if meta["namespace"] == release and release in served:
            raise AssertionError("the test's release namespace must not be served")
        for rule in role["rules"]:
            assert rule["apiGroups"] == [""], rule
            for resource in rule["resources"]:
                rows.add((meta["name"], where, resource, tuple(sorted(rule["verbs"]))))
    names = {(o["metadata"]["name"], o["metadata"]["namespace"]) for o in objects}
    for name in ("kt-pod", "kt-driver", "kt-gateway"):  # each served namespace has each
        assert {(name, ns) for ns in served} <= names
    return rows


def test_the_readme_rbac_table_is_the_rendered_roles() -> None:
    values = all_options()  # drivers.subjects set: every Role is rendered
    objects = render(values, namespace="kt-system")
    assert _readme_table() == _rendered_roles(objects, values["namespaces"], "kt-system")
    # the pods' Role is what kt itself asks for (kt.k8s.manifests.DRIVER_RULES)
    (pod_role,) = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == "kt-pod"][
        :1
    ]
    rules = {(r["resources"][0], tuple(r["verbs"])) for r in pod_role["rules"]}
    assert rules == set(manifests.DRIVER_RULES)


def test_the_gateway_runs_locked_down_and_the_policy_admits_only_kt() -> None:
    values = all_options()
    objects = render(values, namespace="kt-system")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    command = container["command"]
    assert command[:3] == ["python", "-m", "kt.k8s.gateway"]
    served = [command[i + 1] for i, arg in enumerate(command) if arg == "--namespace"]
    assert served == values["namespaces"]
    assert deployment["spec"]["replicas"] == 3 and spec["serviceAccountName"] == "kt-gateway"
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    assert sorted(p["metadata"]["namespace"] for p in policies) == values["namespaces"]
    for policy in policies:
        assert policy["spec"]["podSelector"] == {
            "matchLabels": {"app.kubernetes.io/managed-by": "kt"}
        }
        among, outside = policy["spec"]["ingress"]
        # kt pods reach each other on every port (torch.distributed's links and stores)
        (kt_pods,) = among["from"]
        assert "ports" not in among
        assert kt_pods["namespaceSelector"]["matchExpressions"][0]["values"] == served
        assert kt_pods["podSelector"] == {"matchLabels": {"app.kubernetes.io/managed-by": "kt"}}
        assert sorted(p["port"] for p in outside["ports"]) == [SUPERVISOR_PORT, SUPERVISOR_PORT + 1]
        gateway, extra = outside["from"]
        assert gateway["podSelector"]["matchLabels"] == dict(
            pair.split("=") for pair in manifests.GATEWAY_SELECTOR.split(",")
        ) | {"app.kubernetes.io/instance": "kt"}
        assert extra == values["networkPolicy"]["extraFrom"][0]
    # each served namespace advertises where its gateway is (a driver outside reads it)
    adverts = [o for o in objects if o["kind"] == "ConfigMap"]
    assert sorted(a["metadata"]["namespace"] for a in adverts) == values["namespaces"]
    for advert in adverts:
        assert advert["metadata"]["name"] == manifests.GATEWAY_CONFIGMAP
        data = dict(advert["data"])
        selector = set(data.pop("selector").split(","))
        assert data == {"namespace": "kt-system", "port": str(values["gateway"]["port"])}
        assert selector == {*manifests.GATEWAY_SELECTOR.split(","), "app.kubernetes.io/instance=kt"}


# -- on the test cluster -------------------------------------------------------------------
def _list(tmp: pathlib.Path, name: str, objects: list[Any]) -> str:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    return str(path)


def _forbidden(user: str, verb: str, resource: str, namespace: str) -> str:
    return (
        f'{resource} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
        f'in API group "" in the namespace "{namespace}"'
    )


async def _as(kubeconfig: pathlib.Path, account: str, namespace: str) -> client.ApiClient:
    """An API client with a token the TokenRequest API issued for the account."""
    admin = await config.new_client_from_config(str(kubeconfig))
    try:
        core = client.CoreV1Api(admin)
        issued = await core.create_namespaced_service_account_token(
            account, namespace, {"spec": {"audiences": []}}
        )
        conf = admin.configuration
        as_it = client.Configuration(host=conf.host)
        as_it.ssl_ca_cert = conf.ssl_ca_cert
        as_it.api_key = {"BearerToken": f"Bearer {issued.status.token}"}
        return client.ApiClient(as_it)
    finally:
        await admin.close()


async def _refused(call: Any) -> str:
    with pytest.raises(ApiException) as caught:
        await call
    assert caught.value.status == 403
    body = json.loads(caught.value.body)
    assert body["kind"] == "Status" and body["reason"] == "Forbidden"
    return str(body["message"])


def _pending_pod(name: str) -> dict[str, Any]:
    spec = {"containers": [{"name": "c", "image": "i"}], "nodeSelector": {"no-such": "node"}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_the_rendered_rbac_is_enforced_and_the_gateway_pod_serves(
    k8s_cluster: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    release, served, other = f"kt-{tag}", [f"a-{tag}", f"b-{tag}"], f"other-{tag}"
    port = free_port()  # the gateway pod binds the host's port: one free here
    objects = render(
        {"namespaces": served, "gateway": {"replicas": 1, "port": port}}, namespace=release
    )
    namespaces = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
        for ns in (release, *served, other)
    ]
    kubectl(
        "1.33", k8s_cluster, "create", "--validate=false", "-f", _list(tmp_path, "ns", namespaces)
    )
    applied = [
        o
        for o in objects
        if o["kind"] in ("ServiceAccount", "Role", "RoleBinding", "NetworkPolicy", "ConfigMap")
    ]
    kubectl(
        "1.33", k8s_cluster, "create", "--validate=false", "-f", _list(tmp_path, "rbac", applied)
    )
    policies = json.loads(
        kubectl("1.33", k8s_cluster, "get", "networkpolicies", "-n", served[1], "-o", "json")
    )
    assert [p["metadata"]["name"] for p in policies["items"]] == ["kt-pods"]

    async def tokens() -> None:
        pod_api = await _as(k8s_cluster, "kt-pod", served[0])
        gateway_api = await _as(k8s_cluster, "kt-gateway", release)
        pod_user = f"system:serviceaccount:{served[0]}:kt-pod"
        gateway_user = f"system:serviceaccount:{release}:kt-gateway"
        try:
            as_pod, as_gateway = client.CoreV1Api(pod_api), client.CoreV1Api(gateway_api)
            await as_pod.create_namespaced_pod(served[0], _pending_pod("allowed"))
            await as_pod.delete_namespaced_pod("allowed", served[0])
            await as_pod.create_namespaced_config_map(served[0], {"metadata": {"name": "o"}})
            said = await _refused(as_pod.create_namespaced_pod(other, _pending_pod("nope")))
            assert said == _forbidden(pod_user, "create", "pods", other)
            said = await _refused(as_pod.list_namespaced_secret(served[0]))  # get, not list
            assert said == _forbidden(pod_user, "list", "secrets", served[0])
            for ns in served:
                await as_gateway.list_namespaced_pod(ns)
                await _refused(as_gateway.read_namespaced_secret("absent", other))
            said = await _refused(as_gateway.create_namespaced_pod(served[0], _pending_pod("x")))
            assert said == _forbidden(gateway_user, "create", "pods", served[0])
        finally:
            await pod_api.close()
            await gateway_api.close()

    asyncio.run(tokens())

    # the gateway Deployment's pod, as its ReplicaSet would make it, on the cluster
    pod = gateway_pod(objects, f"kt-{tag}-gateway-0")
    kubectl("1.33", k8s_cluster, "create", "--validate=false", "-f", _list(tmp_path, "gw", [pod]))
    try:
        _through_the_gateway_pod(k8s_cluster, pod["metadata"]["name"], release, served[0], port)
    finally:
        kubectl("1.33", k8s_cluster, "delete", "pod", pod["metadata"]["name"], "-n", release)


def _through_the_gateway_pod(
    kubeconfig: pathlib.Path, name: str, release: str, served: str, port: int
) -> None:
    compute = kt.Compute(
        cpus=1, replicas=1, backend="k8s", namespace=served, service_account="kt-pod"
    )
    echo = kt.cls(Echo).options(compute=compute).remote()
    assert echo.ping() == "pong"  # the pool's pods run as kt-pod
    ip = _ready_ip(kubeconfig, name, release)
    driver = get_driver()
    pool = driver.pool_name(compute, False)
    provider = get_provider("k8s")
    (kt_pod,) = driver.runtime.run(provider.list_pods(pool))
    token = driver.runtime.run(provider.read_token(pool))
    assert token is not None
    assert asyncio.run(_hello_through((ip, port), kt_pod.address, token)) == (
        protocol.FrameKind.WELCOME
    )
    driver.runtime.run(driver.pools[pool].teardown(), timeout=60)


class Echo:
    def ping(self) -> str:
        return "pong"


def _ready_ip(kubeconfig: pathlib.Path, name: str, namespace: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pod = json.loads(
            kubectl("1.33", kubeconfig, "get", "pod", name, "-n", namespace, "-o", "json")
        )
        conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
        if conditions.get("Ready") == "True":
            return str(pod["status"]["podIP"])
        time.sleep(0.2)
    raise AssertionError(f"the gateway pod never became ready: {pod['status']}")


async def _hello_through(gateway: tuple[str, int], pod: tuple[str, int], token: str) -> int:
    reader, writer = await asyncio.open_connection(*gateway)
    writer.write(protocol.gateway_preamble(pod, token))
    answer = await asyncio.wait_for(reader.readline(), 30)
    assert answer == protocol.GATEWAY_OK, answer
    hello = {"v": protocol.VERSION, "token": token, "caller": "test", "host": "", "actor": ""}
    writer.write(protocol.encode(protocol.FrameKind.HELLO, 0, hello))
    prefix = await reader.readexactly(protocol.PREFIX_SIZE)
    writer.close()
    return int(protocol.PREFIX.unpack(prefix)[1])
