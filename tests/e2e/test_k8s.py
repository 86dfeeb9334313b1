"""What only the Kubernetes backend has, on the test cluster (`k8s_cluster`).

Behaviours covered:
- `kubectl delete pod` of an actor's pod: with max_restarts=1 the actor comes back on
  another pod and the next call succeeds; without restarts calls fail with PodLostError
  within 5 s;
- a pod the kubelet marks OOMKilled: its actor is dead with ActorDiedError saying
  OOMKilled and the limit (the call in flight fails as the connection closes);
- more cpus than any node has: PlacementError quoting FailedScheduling within 5 s; an
  image that cannot be pulled: PlacementError naming it; an image without kt, where pip
  cannot install it: LaunchError naming the image and quoting pip;
- `kt teardown`, and deleting the owner with kubectl: no kt object and no process of the
  pool is left; kubectl lists and describes kt's pods;
- `kt list`, `kt status` and `kt logs` on this backend, and `kubectl logs` (the API
  server proxies pods/log to the kubelet); following a pod's log outlasts a quiet spell
  longer than the bound on other API requests (REQUEST_S);
- an actor on a pod makes a pool of its own (the pod's service account) and hands its
  actor back to the driver, which calls it; deleting the first pool removes the second
  (its owner object belongs to the first's); a function on a pod makes a pool, calls it
  and returns the result, and `kt teardown` of the first pool removes the second;
- a Compute with a namespace: its pods, watch and teardown are in that namespace;
- a pool whose driver died (SIGKILL): each pod deletes itself through its service
  account once nobody called it for inactivity_ttl, and the last one the pool's objects;
  a pod whose service account has no Role for it stays, and its log says what RBAC
  refused (the kubelet mounts each pod's own service-account token).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest

import kt
from kt.actors.driver import get_driver
from kt.k8s import provider as provider_module
from tests.conftest import NO_KT_IMAGE, SYSTEM_PYTHON
from tests.k8s.kubectl import kubectl

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("k8s_cluster")]


class Where:
    def pod(self) -> str:
        return os.environ["KT_POD"]

    def supervisor_pid(self) -> int:
        return int(os.environ["KT_SUPERVISOR_PID"])

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return self.pod()

    def say(self, text: str) -> None:
        print(text, flush=True)

    def hog(self, mib: int) -> int:
        block = bytearray(mib * 2**20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page
        time.sleep(10)
        return len(block)


def _compute(**options: object) -> kt.Compute:
    return kt.Compute(backend="k8s", name=f"k8s-{uuid.uuid4().hex[:6]}", **options)  # type: ignore[arg-type]


def _objects(kubeconfig: pathlib.Path, pool: str, namespace: str = "default") -> list[str]:
    listed = kubectl(
        "1.33",
        kubeconfig,
        "get",
        "pods,services,secrets,configmaps",
        "-n",
        namespace,
        "-l",
        f"kt.dev/pool={pool}",
        "-o",
        "json",
    )
    return [f"{i['kind']}/{i['metadata']['name']}" for i in json.loads(listed)["items"]]


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_kubectl_delete_pod_restarts_or_fails_the_actors(k8s_cluster: pathlib.Path) -> None:
    compute = _compute(cpus=2, min_replicas=0, max_replicas=2)
    keep = kt.cls(Where).options(compute=compute, max_restarts=1).remote()
    lose = kt.cls(Where).options(compute=compute, max_restarts=0).remote()
    old = kt.get(keep.pod.remote(), timeout=120)
    assert kt.get(lose.pod.remote(), timeout=60) == old
    in_flight = lose.sleep.remote(30)
    time.sleep(0.5)
    started = time.monotonic()
    kubectl("1.33", k8s_cluster, "delete", "pod", old, "--wait=false")
    with pytest.raises((kt.PodLostError, kt.ActorDiedError)):
        in_flight.result(timeout=30)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 30
    with pytest.raises(kt.ActorDiedError, match="pod was lost"):
        while time.monotonic() < deadline:
            try:
                lose.pod.remote().result(timeout=30)
            except kt.PodLostError:  # sent before the driver learned the pod's fate
                time.sleep(0.1)
    deadline = time.monotonic() + 90
    new = None
    while new is None and time.monotonic() < deadline:
        try:
            new = keep.pod.remote().result(timeout=60)
        except kt.PodLostError:
            time.sleep(0.1)  # a call that raced the loss; the next goes to the new actor
    assert new is not None and new != old


def test_oom_killed_pod_is_an_actor_died_error_saying_so() -> None:
    compute = _compute(cpus=1, memory="600Mi", replicas=1)
    hog = kt.cls(Where).options(compute=compute).remote()
    assert kt.get(hog.pod.remote(), timeout=120)
    with pytest.raises((kt.ActorDiedError, kt.PodLostError)):  # in flight as the pod died
        hog.hog.remote(2000).result(timeout=60)
    deadline = time.monotonic() + 30
    with pytest.raises(kt.ActorDiedError, match="OOMKilled") as caught:
        while time.monotonic() < deadline:
            try:
                hog.pod.remote().result(timeout=30)
            except kt.PodLostError:  # sent before the driver learned why the pod went
                time.sleep(0.1)
    assert "600Mi" in str(caught.value) and caught.value.oom


def test_unschedulable_and_unpullable_pods_fail_placement(k8s_cluster: pathlib.Path) -> None:
    big = kt.cls(Where).options(compute=_compute(cpus=64, replicas=1), cpus=1).remote()
    started = time.monotonic()
    with pytest.raises(kt.PlacementError, match="FailedScheduling") as caught:
        big.pod.remote().result(timeout=60)
    assert time.monotonic() - started < 5
    assert "0/4 nodes are available: 4 Insufficient cpu." in str(caught.value)
    image = kt.Image(base="registry.invalid/team/kt:1")
    nowhere = kt.cls(Where).options(compute=_compute(cpus=1, replicas=1, image=image)).remote()
    with pytest.raises(kt.PlacementError, match=re.escape("registry.invalid/team/kt:1")):
        nowhere.pod.remote().result(timeout=60)


def test_an_image_without_kt_fails_naming_it_and_quoting_pip() -> None:
    assert os.path.exists(SYSTEM_PYTHON), f"the test needs a Python without kt at {SYSTEM_PYTHON}"
    image = kt.Image(base=NO_KT_IMAGE)
    bare = kt.cls(Where).options(compute=_compute(cpus=1, replicas=1, image=image)).remote()
    with pytest.raises(kt.LaunchError) as caught:
        bare.pod.remote().result(timeout=120)
    text = str(caught.value)
    assert f"image {NO_KT_IMAGE} has no kt, and pip could not install kt-runtime[k8s]==" in text
    assert "exit code 3" in text
    pip_said = text.split("its last lines:")[1].split("kt: image")[0]
    assert pip_said.strip(), text  # what pip printed comes before kt's own line


@pytest.mark.parametrize("how", ["kt teardown", "kubectl delete owner"])
def test_teardown_leaves_no_object_and_no_process(k8s_cluster: pathlib.Path, how: str) -> None:
    compute = _compute(cpus=1, replicas=2)
    actors = [kt.cls(Where).options(compute=compute).remote() for _ in range(2)]
    pods = kt.get([a.pod.remote() for a in actors], timeout=120)
    pids = kt.get([a.supervisor_pid.remote() for a in actors], timeout=60)
    pool = compute.name
    assert pool is not None and len(set(pods)) == 2
    assert sorted(_objects(k8s_cluster, pool)) == sorted(
        [f"Pod/{p}" for p in pods]
        + [f"Service/kt-{pool}", f"Secret/kt-{pool}-token", f"ConfigMap/kt-{pool}"]
    )
    described = kubectl("1.27", k8s_cluster, "describe", "pod", pods[0])
    assert "kt.supervisor" in described and "kt.dev/pool" in described
    if how == "kt teardown":
        env = {**os.environ, "KT_BACKEND": "k8s", "KUBECONFIG": str(k8s_cluster)}
        done = subprocess.run(
            [sys.executable, "-c", "from kt.cli import main; main()", "teardown", pool],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "deleted 2 pod(s)" in done.stdout, done.stderr
    else:
        kubectl("1.33", k8s_cluster, "delete", "configmap", f"kt-{pool}")
    deadline = time.monotonic() + 30
    while (_objects(k8s_cluster, pool) or _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _objects(k8s_cluster, pool) == [] and _alive(pids) == []


def _kt(kubeconfig: pathlib.Path, *args: str) -> str:
    env = {**os.environ, "KT_BACKEND": "k8s", "KUBECONFIG": str(kubeconfig), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", "from kt.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"kt {' '.join(args)}: {done.stdout} {done.stderr}"
    return done.stdout


def test_kt_list_status_and_logs_on_this_backend(
    k8s_cluster: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compute = _compute(cpus=1, replicas=1)
    actor = kt.cls(Where).options(compute=compute, name=f"talker-{uuid.uuid4().hex[:4]}").remote()
    pod = kt.get(actor.pod.remote(), timeout=120)
    text = f"hello from {uuid.uuid4().hex[:8]}"
    actor.say(text)
    pool = compute.name
    assert pool is not None
    listed = _kt(k8s_cluster, "list")
    assert pool in listed and "127.1." in listed
    status = _kt(k8s_cluster, "status", pool)
    assert pod in status and "Where" in status and "ready" in status
    deadline = time.monotonic() + 20
    while text not in _kt(k8s_cluster, "logs", pool) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert text in _kt(k8s_cluster, "logs", pool, "--pod", pod)
    assert text in kubectl("1.33", k8s_cluster, "logs", pod)
    last = f"and then {uuid.uuid4().hex[:8]}"
    actor.say(last)
    while last not in _kt(k8s_cluster, "logs", pool) and time.monotonic() < deadline + 20:
        time.sleep(0.2)
    tail = _kt(k8s_cluster, "logs", pool, "--tail", "1")  # tailLines, through the API server
    assert last in tail and text not in tail, tail
    config = _kt(k8s_cluster, "config")
    assert "KT_BACKEND=k8s" in config and "default" in config and "direct" in config

    # follow: a pod quiet for longer than an API request may wait is still followed
    monkeypatch.setattr(provider_module, "REQUEST_S", 2.0)
    later, seen = f"after a quiet spell {uuid.uuid4().hex[:8]}", []

    async def follow() -> None:
        provider = provider_module.K8sProvider()
        try:
            async for text in provider.logs(pool, follow=True):
                seen.append(text)
                if later in "".join(seen):
                    return
        finally:
            await provider.close()

    reader = threading.Thread(target=lambda: asyncio.run(asyncio.wait_for(follow(), 60)))
    reader.start()
    time.sleep(6)  # the stream is open and silent
    actor.say(later)
    reader.join(60)
    assert later in "".join(seen), "".join(seen)[-2000:]


def test_a_pool_in_another_namespace_is_followed_and_torn_down_there(
    k8s_cluster: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    namespace = f"team-{uuid.uuid4().hex[:6]}"
    manifest = tmp_path / "namespace.json"
    manifest.write_text(
        json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    )
    kubectl("1.33", k8s_cluster, "create", "--validate=false", "-f", str(manifest))
    compute = _compute(cpus=1, replicas=1, namespace=namespace)
    where = kt.cls(Where).options(compute=compute, max_restarts=0).remote()
    pod = kt.get(where.pod.remote(), timeout=120)
    assert compute.name is not None
    assert f"Pod/{pod}" in _objects(k8s_cluster, compute.name, namespace)
    assert _objects(k8s_cluster, compute.name) == []  # nothing in the default namespace
    kubectl("1.33", k8s_cluster, "delete", "pod", pod, "-n", namespace, "--wait=false")
    deadline = time.monotonic() + 30
    with pytest.raises(kt.ActorDiedError, match="being deleted"):  # its watch is there too
        while time.monotonic() < deadline:
            try:
                where.pod.remote().result(timeout=30)
            except kt.PodLostError:
                pass  # a call that raced the loss
            time.sleep(0.2)
    driver = get_driver()
    name = driver.pool_name(compute, False)
    driver.runtime.run(driver.pools[name].teardown(), timeout=60)
    assert _objects(k8s_cluster, compute.name, namespace) == []


class Launcher:
    def launch(self, name: str) -> kt.ActorHandle[Where]:
        child = kt.Compute(cpus=1, replicas=1, backend="k8s", name=name)
        where = kt.cls(Where).options(compute=child).remote()
        assert where.pod()  # up and answering from here too
        return where


def test_a_pod_makes_a_pool_and_the_parents_teardown_removes_it(
    k8s_cluster: pathlib.Path,
) -> None:
    parent = _compute(cpus=1, replicas=1)
    child = f"k8s-child-{uuid.uuid4().hex[:6]}"
    launcher = kt.cls(Launcher).options(compute=parent).remote()
    where = kt.get(launcher.launch.remote(child), timeout=120)
    child_pod = where.pod()  # the handle, back in the driver, calls the child pool's pod
    assert child_pod.startswith(child)
    assert f"Pod/{child_pod}" in _objects(k8s_cluster, child)
    assert parent.name is not None
    kubectl("1.33", k8s_cluster, "delete", "configmap", f"kt-{parent.name}", "--wait=false")
    deadline = time.monotonic() + 60
    while _objects(k8s_cluster, child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _objects(k8s_cluster, child) == []


def _square(x: int) -> int:
    return x * x


def _through_a_child_pool(name: str, x: int) -> tuple[int, str]:
    child = kt.fn(_square).to(kt.Compute(cpus=1, replicas=1, backend="k8s", name=name))
    return child(x), os.environ["KT_POD"]


def test_a_function_on_a_pod_makes_a_pool_calls_it_and_returns_the_result(
    k8s_cluster: pathlib.Path,
) -> None:
    parent = _compute(cpus=1, replicas=1)
    child = f"k8s-fnchild-{uuid.uuid4().hex[:6]}"
    outer = kt.fn(_through_a_child_pool).to(parent)
    result, where = outer(child, 7)
    assert result == 49  # computed on the child pool, from the parent's pod
    assert parent.name is not None and where.startswith(parent.name)
    assert any(o.startswith("Pod/") for o in _objects(k8s_cluster, child))
    env = {**os.environ, "KUBECONFIG": str(k8s_cluster), "KT_BACKEND": "k8s"}
    torn = subprocess.run(  # the parent pool's owner goes, and the child pool with it
        [sys.executable, "-m", "kt.cli", "teardown", parent.name],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert torn.returncode == 0, torn.stdout + torn.stderr
    deadline = time.monotonic() + 60
    while _objects(k8s_cluster, child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _objects(k8s_cluster, child) == []


ORPHAN = """
import os, signal, sys, kt
class Where:
    def pod(self):
        return os.environ["KT_POD"]
account = sys.argv[2] if len(sys.argv) > 2 else None
compute = kt.Compute(
    cpus=1, replicas=1, backend="k8s", name=sys.argv[1], inactivity_ttl=2, service_account=account
)
print(kt.cls(Where).options(compute=compute).remote().pod(), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no teardown: only the pod's own timer is left
"""


def _orphan(kubeconfig: pathlib.Path, tmp_path: pathlib.Path, pool: str, *args: str) -> str:
    """A driver that makes a pool with inactivity_ttl=2, then dies by SIGKILL; its pod."""
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(
        [sys.executable, str(script), pool, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -9, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_an_idle_pod_without_the_right_stays_and_says_why(
    k8s_cluster: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    manifest = tmp_path / "account.json"
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}}
    manifest.write_text(json.dumps(account))
    kubectl("1.33", k8s_cluster, "create", "--validate=false", "-f", str(manifest))
    pool = f"k8s-norights-{uuid.uuid4().hex[:6]}"
    pod = _orphan(k8s_cluster, tmp_path, pool, "nobody")  # no Role bound to it
    deadline = time.monotonic() + 30
    log = ""
    while "not deleted" not in log and time.monotonic() < deadline:
        time.sleep(0.5)
        log = kubectl("1.33", k8s_cluster, "logs", pod)
    assert 'cannot delete resource "pods"' in log and "nobody" in log
    assert f"Pod/{pod}" in _objects(k8s_cluster, pool)  # it stays (Succeeded), as RBAC says
    kubectl("1.33", k8s_cluster, "delete", "configmap", f"kt-{pool}")


def test_an_idle_pod_deletes_itself_after_its_driver_died(
    k8s_cluster: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    pool = f"k8s-orphan-{uuid.uuid4().hex[:6]}"
    pod = _orphan(k8s_cluster, tmp_path, pool)
    assert f"Pod/{pod}" in _objects(k8s_cluster, pool)
    deadline = time.monotonic() + 30
    while _objects(k8s_cluster, pool) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _objects(k8s_cluster, pool) == []  # the pod, and with the last pod the pool's objects
