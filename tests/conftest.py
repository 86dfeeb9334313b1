"""Shared fixtures: a private KT_HOME per test process, local pools shared per module, and
a Kubernetes test cluster per test process for the tests that run on both backends.

Pools are real: supervisor processes on loopback addresses, real actor processes; on the
k8s backend the same supervisors are pods of `python -m kt.testing.cluster`, made through
kubernetes_asyncio.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import pytest

os.environ.setdefault("KT_BACKEND", "local")
os.environ["KT_HOME"] = tempfile.mkdtemp(prefix="kt-test-home-")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "gpu: needs an NVIDIA GPU and a CUDA build of torch (make test-gpu)"
    )


def _no_cuda() -> str:
    """Why the tests marked gpu cannot run here, or '' when they can."""
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device here (torch {torch.__version__}): make test-gpu on a GPU machine"
    return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("gpu")]
    why = _no_cuda() if marked else ""
    for item in marked if why else []:
        item.add_marker(pytest.mark.skip(reason=why))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """A failed test that ran on the test cluster shows the end of the cluster's log: what
    its API server, scheduler and kubelet said (a stalled loop says where it stalled)."""
    report = yield
    on_cluster = "k8s_cluster" in getattr(item, "fixturenames", ()) or "[k8s" in item.nodeid
    if report.failed and on_cluster and CLUSTER_LOG.is_file():
        tail = CLUSTER_LOG.read_text(errors="replace").splitlines()[-200:]
        report.sections.append(("test cluster log (its last 200 lines)", "\n".join(tail)))
    return report


@pytest.fixture(scope="session", autouse=True)
def _teardown_driver() -> Iterator[None]:
    yield
    import kt

    kt.shutdown()
    shutil.rmtree(os.environ["KT_HOME"], ignore_errors=True)  # pod records and logs


@pytest.fixture(scope="module")
def pool() -> object:
    """A one-pod local pool with room for many actors."""
    import kt

    return kt.Compute(cpus=16, replicas=1, backend="local")


CLUSTER_NODES, CLUSTER_CPUS = 4, 16
NO_KT_IMAGE = "kt-test/no-kt:1"  # the cluster runs its pods on a Python without kt
SYSTEM_PYTHON = "/usr/bin/python3"
CLUSTER_LOG = pathlib.Path("/nonexistent")  # this test process's cluster's, once it runs


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[pathlib.Path]:
    """`python -m kt.testing.cluster` (4 nodes of 16 cpus and 4 nvidia.com/gpu) for this
    test process, and KUBECONFIG pointing at it; stopped (every pod's processes with it)
    at the end."""
    from kt.k8s import manifests
    from kt.testing.cluster import running
    from tests.k8s.kubectl import kubectl

    images = {NO_KT_IMAGE: SYSTEM_PYTHON}
    with running(CLUSTER_NODES, CLUSTER_CPUS, gpus_per_node=4, images=images) as kubeconfig:
        global CLUSTER_LOG
        CLUSTER_LOG = kubeconfig.with_name("cluster.log")
        os.environ["KUBECONFIG"] = str(kubeconfig)
        # what a platform team grants kt's pods (the chart's Role): they make pools and
        # delete themselves through their service account, "default" here
        rbac = kubeconfig.with_name("kt-rbac.json")
        objects = [manifests.driver_role("default"), manifests.role_binding("default", "default")]
        rbac.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
        kubectl("1.33", kubeconfig, "create", "--validate=false", "-f", str(rbac))
        yield kubeconfig
        import kt

        kt.shutdown()  # while the cluster still answers: the driver deletes its pools


@pytest.fixture(params=["local", "k8s"])
def backend(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs on both backends (the k8s one on the test cluster)."""
    if request.param == "k8s":
        request.getfixturevalue("k8s_cluster")
    return str(request.param)
