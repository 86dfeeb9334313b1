"""charts/kt rendered with Helm's own Go SDK (helm-python-sdk), as parsed objects."""

from __future__ import annotations

import pathlib
from typing import Any

import helm_python
import yaml

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "kt"
ALL_OPTIONS = CHART / "ci" / "all-options.yaml"


def all_options() -> dict[str, Any]:
    """ci/all-options.yaml: every value set."""
    return dict(yaml.safe_load(ALL_OPTIONS.read_text()))


def render(values: dict[str, Any], name: str = "kt", namespace: str = "kt-system") -> list[Any]:
    """Every object the chart renders for `values`, in template order."""
    rendered = helm_python.Chart.load(CHART).render(values, name=name, namespace=namespace)
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            out += [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def gateway_pod(objects: list[Any], name: str) -> dict[str, Any]:
    """A Pod of the gateway Deployment's template, as its ReplicaSet would make it."""
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    template = deployment["spec"]["template"]
    metadata = {**template["metadata"], "name": name}
    metadata["namespace"] = deployment["metadata"]["namespace"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}
