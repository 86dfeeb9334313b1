"""RBAC in the test cluster's API server, driven by kubernetes_asyncio and kubectl.

Behaviours covered:
- Roles, RoleBindings, ClusterRoles and ClusterRoleBindings are served under
  rbac.authorization.k8s.io/v1 (discovery included), and a service account gets a token
  from the TokenRequest API;
- with that token: what its Role covers is allowed (pods in its namespace); pods in
  another namespace, secrets in its own, nodes at the cluster scope are refused with 403
  and kube-apiserver's message naming the user, verb, resource and namespace; a
  ClusterRoleBinding to its group allows nodes; resourceNames limit a rule to names;
- kubectl, with the token, is refused the same way; kt's provider with it raises
  kt.AuthError naming the permission it lacks (reading the pool's Secret, making its
  owner ConfigMap).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.rest import ApiException

import kt
from kt.core.provider import PodSpec
from kt.k8s.provider import K8sProvider
from kt.testing import apiserver, rbac
from tests.k8s import secure_api
from tests.k8s.kubectl import kubectl_path

pytestmark = pytest.mark.timeout(120)
ADMIN = "rbac-admin"
SA = "system:serviceaccount:team-a:runner"


def _pod(name: str) -> dict[str, Any]:
    container = {"name": "c", "image": "i"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [container]},
    }


def _forbidden(verb: str, resource: str, where: str) -> str:
    return (
        f'{resource} is forbidden: User "{SA}" cannot {verb} resource "{resource}" '
        f'in API group "" {where}'
    )


def test_a_service_accounts_token_can_do_what_its_roles_allow_and_nothing_else(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        admin_client, url, ca, runner = await secure_api.start(tmp_path, ADMIN)
        core, auth = client.CoreV1Api(admin_client), client.RbacAuthorizationV1Api(admin_client)
        try:
            groups = await client.ApisApi(admin_client).get_api_versions()
            assert [g.name for g in groups.groups] == [
                "rbac.authorization.k8s.io",
                "networking.k8s.io",
            ]
            for ns in ("team-a", "team-b"):
                await core.create_namespace({"metadata": {"name": ns}})
            await core.create_namespaced_service_account("team-a", {"metadata": {"name": "runner"}})
            rule = {
                "apiGroups": [""],
                "resources": ["pods", "pods/log"],
                "verbs": ["create", "get", "list"],
            }
            await auth.create_namespaced_role(
                "team-a", {"metadata": {"name": "pods"}, "rules": [rule]}
            )
            binding = {
                "metadata": {"name": "runner-pods"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "pods",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": "team-a"}],
            }
            await auth.create_namespaced_role_binding("team-a", binding)
            issued = await core.create_namespaced_service_account_token(
                "runner", "team-a", {"spec": {"audiences": []}}
            )
            token = issued.status.token
            sa_client = secure_api.api_client(url, token, ca)
            sa = client.CoreV1Api(sa_client)
            await sa.create_namespaced_pod("team-a", _pod("allowed"))
            assert [p.metadata.name for p in (await sa.list_namespaced_pod("team-a")).items] == [
                "allowed"
            ]
            refusals = {
                _forbidden("create", "pods", 'in the namespace "team-b"'): sa.create_namespaced_pod(
                    "team-b", _pod("nope")
                ),
                _forbidden("list", "secrets", 'in the namespace "team-a"'): (
                    sa.list_namespaced_secret("team-a")
                ),
                _forbidden("list", "nodes", "at the cluster scope"): sa.list_node(),
            }
            for message, call in refusals.items():
                with pytest.raises(ApiException) as caught:
                    await call
                assert caught.value.status == 403
                body = json.loads(caught.value.body)
                assert (body["reason"], body["message"]) == ("Forbidden", message)
            reader = {
                "metadata": {"name": "node-reader"},
                "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}],
            }
            await auth.create_cluster_role(reader)
            group_binding = {
                "metadata": {"name": "team-a-nodes"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "node-reader",
                },
                "subjects": [{"kind": "Group", "name": "system:serviceaccounts:team-a"}],
            }
            await auth.create_cluster_role_binding(group_binding)
            assert (await sa.list_node()).items == []
            kubeconfig = tmp_path / "kubeconfig"
            kubeconfig.write_text(json.dumps(apiserver.kubeconfig(url, token, ca.read_bytes())))
            done = await asyncio.to_thread(
                subprocess.run,
                [kubectl_path("1.33"), f"--kubeconfig={kubeconfig}", "get", "pods", "-n", "team-b"],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "HOME": str(tmp_path)},
            )
            assert done.returncode == 1 and "Forbidden" in done.stderr and SA in done.stderr
            await sa_client.close()
            # kt, as a driver with this identity, says which permission it lacks
            monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # restored after the test
            provider = K8sProvider()
            with pytest.raises(kt.AuthError, match='cannot get resource "secrets"'):
                await provider.read_token("p")
            spec = PodSpec(pool="p", name="p-1", cpus=1, memory=0, gpus=0, token="t")
            with pytest.raises(kt.AuthError, match='cannot get resource "configmaps"'):
                await provider.create_pods([spec])
            await provider.close()
        finally:
            await admin_client.close()
            await runner.cleanup()

    asyncio.run(main())


def test_resource_names_wildcards_and_other_namespaces() -> None:
    role = {
        "metadata": {"name": "r"},
        "rules": [
            {
                "apiGroups": ["*"],
                "resources": ["secrets"],
                "verbs": ["get"],
                "resourceNames": ["kt-p-token"],
            }
        ],
    }
    bind = {
        "roleRef": {"kind": "Role", "name": "r"},
        "subjects": [{"kind": "ServiceAccount", "name": "gw"}],  # namespace: the binding's
    }
    objects = {("roles", "kt", "r"): role, ("rolebindings", "kt", "b"): bind}
    user = "system:serviceaccount:kt:gw"
    assert rbac.allowed(rbac.Request(user, "get", "", "secrets", "kt", "kt-p-token"), objects)
    assert not rbac.allowed(rbac.Request(user, "get", "", "secrets", "kt", "other"), objects)
    assert not rbac.allowed(rbac.Request(user, "list", "", "secrets", "kt"), objects)
    assert not rbac.allowed(rbac.Request(user, "get", "", "secrets", "ml", "kt-p-token"), objects)
    assert not rbac.allowed(
        rbac.Request("system:serviceaccount:ml:gw", "get", "", "secrets", "kt", "kt-p-token"),
        objects,
    )
