"""The data store moving large values: broadcast trees, shared memory, state dicts in place.

Behaviours covered (local backend, the tree and the lost holder also on the k8s one, the
test cluster; pods given different KT_SHM_DOMAINs share no memory,
as pods on different hosts of a cluster do, while the processes of one pod still do):
- a 100 MiB array put by an actor and got by 8 actors on 4 such pods: every copy equal;
  each other pod pulls it once for its two getters; the source pod sent it fewer than 3
  times (its own getters map its file), a replica served the rest (the tree);
- the same on one host's pods: every getter maps the holder's file, nothing is sent;
- a removed value's file is reused for the next (its pages already there) once the
  getters that mapped it let go, however they located it;
- a trainer rank's state dict got with into= lands in rollout actors' own tensors in
  place (same storage before and after); a mismatching one is refused naming the key,
  and nothing is copied;
- the pod holding a value dies: a getter gets PodLostError naming the key and the pod;
- a value larger than the holder pod's memory is refused before anything is stored, and
  the pod keeps serving.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import uuid
from typing import Any

import numpy as np
import pytest

import kt
from tests.sync.status import pod_status

pytestmark = pytest.mark.timeout(240)
MIB = 2**20


class Node:
    def put(self, key: str, value: Any) -> None:
        kt.put(key, value)

    def put_array(self, key: str, mib: int, seed: int) -> str:
        array = np.random.default_rng(seed).integers(0, 255, mib * MIB, dtype=np.uint8)
        kt.put(key, {"array": array, "seed": seed})
        return hashlib.sha256(array).hexdigest()

    def get_digest(self, key: str) -> tuple[str, str]:
        value = kt.get(key, timeout=60)
        return os.environ["KT_POD"], hashlib.sha256(value["array"]).hexdigest()

    def pod(self) -> str:
        return os.environ["KT_POD"]


def _pools(
    count: int, *, apart: bool, memory: str | None = None, backend: str = "local"
) -> list[Any]:
    """`count` one-pod pools; `apart`: each its own shared-memory domain."""
    tag = uuid.uuid4().hex[:6]
    pools = []
    for i in range(count):
        env = {"KT_SHM_DOMAIN": f"{tag}-{i}"} if apart else {}
        name = f"bcast-{tag}-{i}"
        spec = kt.Compute(cpus=1, replicas=1, name=name, env=env, memory=memory, backend=backend)
        pools.append(spec)
    return pools


def _spread(pools: list[Any], per_pod: int) -> list[Any]:
    N = kt.cls(Node)
    return [N.options(compute=c, cpus=0).remote() for c in pools for _ in range(per_pod)]


def test_a_100mib_value_reaches_8_actors_on_4_pods_through_a_tree(backend: str) -> None:
    pools = _pools(4, apart=True, backend=backend)
    source = kt.cls(Node).options(compute=pools[0], cpus=0).remote()
    getters = _spread(pools, 2)
    key = f"tree/{uuid.uuid4().hex[:6]}"
    digest = source.put_array(key, 100, seed=1)
    size = kt.ls(key)[key]
    got = kt.get([g.get_digest.remote(key) for g in getters], timeout=180)
    assert all(d == digest for _, d in got) and len({p for p, _ in got}) == 4

    status = [pod_status(g)["data"] for g in getters[::2]]  # one per pod, source first
    assert status[0]["bytes_sent"] < 3 * size, status
    assert [s["bytes_pulled"] for s in status[1:]] == [size] * 3, status  # once per pod
    assert sum(s["bytes_to_pods"] for s in status[1:]) == 3 * size - status[0]["bytes_sent"]
    assert status[0]["replicas"] == 0 and all(s["replicas"] == 1 for s in status[1:])
    for handle in [source, *getters]:
        kt.kill(handle)


def test_getters_on_the_holders_host_map_its_file() -> None:
    compute = kt.Compute(cpus=1, replicas=4, name=f"bcast-host-{uuid.uuid4().hex[:6]}")
    N = kt.cls(Node).options(compute=compute, placement="spread", cpus=0)
    source = N.remote()
    getters = [N.remote() for _ in range(8)]
    key = f"host/{uuid.uuid4().hex[:6]}"
    digest = source.put_array(key, 100, seed=2)
    got = kt.get([g.get_digest.remote(key) for g in getters], timeout=120)
    assert all(d == digest for _, d in got) and len({p for p, _ in got}) >= 2
    here = kt.get(key)  # the driver shares the host too
    assert hashlib.sha256(here["array"]).hexdigest() == digest
    sent = [pod_status(g)["data"] for g in [source, *getters]]
    assert all(s["bytes_sent"] == 0 and s["bytes_pulled"] == 0 for s in sent), sent
    for handle in [source, *getters]:
        kt.kill(handle)


def test_a_removed_values_file_is_reused_once_its_getters_let_go() -> None:
    compute = kt.Compute(cpus=1, replicas=3, name=f"bcast-reuse-{uuid.uuid4().hex[:6]}")
    N = kt.cls(Node).options(compute=compute, placement="spread", cpus=0)
    holder, *getters = [N.remote() for _ in range(3)]
    assert len({holder.pod(), *(g.pod() for g in getters)}) == 3
    array = np.ones(8 * MIB, dtype=np.uint8)
    for i in range(4):  # each getter also asks its own pod first, which has no such key
        key = f"reuse/{uuid.uuid4().hex[:6]}/{i}"
        holder.put.remote(key, {"array": array}).result(60)
        assert {d for _, d in kt.get([g.get_digest.remote(key) for g in getters])} == {
            hashlib.sha256(array).hexdigest()
        }
        kt.rm(key)
    data = pod_status(holder)["data"]
    assert data["files_made"] == 1 and data["files_pooled"] == 1, data
    for handle in [holder, *getters]:
        kt.kill(handle)


class Trainer:
    def __init__(self) -> None:
        import torch

        torch.manual_seed(int(os.environ["RANK"]))
        self.model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))

    def publish(self, key: str) -> dict[str, list[float]]:
        if os.environ["RANK"] == "0":
            kt.put(key, self.model.state_dict())
        return {k: v.flatten()[:4].tolist() for k, v in self.model.state_dict().items()}


class Rollout:
    def __init__(self) -> None:
        import torch

        self.model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))

    def pull(self, key: str) -> tuple[bool, dict[str, list[float]]]:
        before = {k: v.data_ptr() for k, v in self.model.state_dict().items()}
        state = self.model.state_dict()
        assert kt.get(key, into=state) is state
        after = {k: v.data_ptr() for k, v in self.model.state_dict().items()}
        values = {k: v.flatten()[:4].tolist() for k, v in self.model.state_dict().items()}
        return before == after, values

    def pull_wrong(self, key: str) -> tuple[str, bool]:
        import torch

        state = {"0.weight": torch.zeros(32, 64), "0.bias": torch.zeros(3)}
        state.update({"1.weight": torch.zeros(4, 32), "1.bias": torch.zeros(4)})
        try:
            kt.get(key, into=state)
        except kt.StateDictMismatchError as exc:
            return str(exc), bool(state["0.weight"].abs().sum() == 0)
        return "", False


def test_a_trainer_ranks_state_dict_lands_in_rollouts_tensors_in_place() -> None:
    tag = uuid.uuid4().hex[:6]
    compute = kt.Compute(cpus=2, name=f"tr-{tag}").distribute("pytorch", procs_per_worker=2)
    trainer = kt.cls(Trainer).to(compute)
    R = kt.cls(Rollout)
    rollouts = [R.options(compute=c, cpus=0).remote() for c in _pools(2, apart=True)]
    key = f"weights/{tag}/v1"
    published = trainer.publish(key)[0]
    for same_storage, values in kt.get([r.pull.remote(key) for r in rollouts], timeout=120):
        assert same_storage
        assert values == published
    message, untouched = rollouts[0].pull_wrong(key)
    assert "'0.bias'" in message and "shape (32,) is stored, into has (3,)" in message
    assert untouched
    trainer.teardown()
    for handle in rollouts:
        kt.kill(handle)


def test_the_holders_pod_dying_fails_getters_naming_key_and_pod(backend: str) -> None:
    (pool,) = _pools(1, apart=False, backend=backend)
    holder = kt.cls(Node).options(compute=pool, cpus=0).remote()
    key = f"lost/{uuid.uuid4().hex[:6]}"
    holder.put_array(key, 1, seed=3)
    assert kt.get(key)["seed"] == 3
    pod = holder.pod()
    os.kill(pod_status(holder)["pid"], signal.SIGKILL)
    began = time.monotonic()
    with pytest.raises(kt.PodLostError) as lost:
        kt.get(key)
    assert key in str(lost.value) and pod in str(lost.value)
    assert time.monotonic() - began < 30


def test_a_value_larger_than_the_pods_memory_is_refused_whole() -> None:
    (pool,) = _pools(1, apart=False, memory="256Mi")
    holder = kt.cls(Node).options(compute=pool, cpus=0).remote()
    assert holder.pod()
    key = f"big/{uuid.uuid4().hex[:6]}"
    with pytest.raises(kt.DataTooLargeError, match=rf"{key}.*does not fit on pod") as refused:
        kt.put(key, np.zeros(300 * MIB, dtype=np.uint8))
    assert "kt.Compute(memory=" in str(refused.value)
    assert key not in kt.ls("big/")
    holder.put_array(key, 8, seed=4)  # the pod still serves, and takes what fits
    assert kt.get(key)["seed"] == 4
    kt.kill(holder)
