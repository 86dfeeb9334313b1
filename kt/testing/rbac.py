"""RBAC for the test cluster's API server: who may do what, decided as Kubernetes does.

Pure functions over the server's objects (Roles, ClusterRoles, RoleBindings,
ClusterRoleBindings of rbac.authorization.k8s.io/v1). A request is allowed when a
RoleBinding in its namespace, or any ClusterRoleBinding, binds a subject matching the
user (a ServiceAccount `system:serviceaccount:<ns>:<name>`, a User, or a Group the user
is in) to a role with a rule whose apiGroups, resources (`pods`, `pods/log`, `*`),
verbs and resourceNames (when given) cover it. Nothing is allowed otherwise (RBAC only
adds). The forbidden message is kube-apiserver's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

SA_PREFIX = "system:serviceaccount:"


@dataclass(frozen=True)
class Request:
    user: str
    verb: str  # get list watch create update patch delete
    group: str  # "" for core
    resource: str  # "pods", or "pods/log" for a subresource
    namespace: str  # "" at the cluster scope
    name: str = ""


def groups_of(user: str) -> set[str]:
    if user.startswith(SA_PREFIX):
        namespace = user[len(SA_PREFIX) :].split(":", 1)[0]
        return {
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        }
    return {"system:authenticated"}


def _subject_matches(subject: dict[str, Any], user: str, namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or namespace
        return user == f"{SA_PREFIX}{ns}:{subject.get('name')}"
    if kind == "User":
        return user == subject.get("name")
    if kind == "Group":
        return subject.get("name") in groups_of(user)
    return False


def _covers(values: Iterable[str] | None, wanted: str) -> bool:
    values = list(values or [])
    return "*" in values or wanted in values


def _rule_allows(rule: dict[str, Any], req: Request) -> bool:
    if not _covers(rule.get("verbs"), req.verb):
        return False
    if not _covers(rule.get("apiGroups"), req.group):
        return False
    if not _covers(rule.get("resources"), req.resource):
        return False
    names = rule.get("resourceNames")
    return not names or req.name in names


def allowed(req: Request, objects: dict[tuple[str, str, str], dict[str, Any]]) -> bool:
    """Whether the bindings and roles among `objects` (the store's, keyed by (resource,
    namespace, name)) allow the request."""

    def role(kind: str, name: str, namespace: str) -> dict[str, Any] | None:
        if kind == "ClusterRole":
            return objects.get(("clusterroles", "", name))
        return objects.get(("roles", namespace, name))

    for (resource, ns, _), binding in objects.items():
        if resource == "rolebindings":
            if not req.namespace or ns != req.namespace:
                continue
        elif resource != "clusterrolebindings":
            continue
        if not any(_subject_matches(s, req.user, ns) for s in binding.get("subjects") or []):
            continue
        ref = binding.get("roleRef") or {}
        found = role(ref.get("kind", ""), ref.get("name", ""), ns)
        if found and any(_rule_allows(rule, req) for rule in found.get("rules") or []):
            return True
    return False


def forbidden(req: Request) -> str:
    """kube-apiserver's words for a denied request."""
    resource = req.resource.partition("/")[0]
    what = f'{resource} "{req.name}"' if req.name else resource
    where = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
    return (
        f'{what} is forbidden: User "{req.user}" cannot {req.verb} resource "{req.resource}" '
        f'in API group "{req.group}" {where}'
    )
