"""Devices given to actors and ranks on pods without a real GPU: local pods whose GPUs
are faked by KT_GPUS, and test-cluster pods given `nvidia.com/gpu` by its kubelet as the
NVIDIA device plugin does (NVIDIA_VISIBLE_DEVICES), so discovery from the plugin's
variable runs too. The assignment is the same code a GPU pod runs.

Behaviours covered (the first three on both backends):
- four gpus=1 actors on a pod with KT_GPUS=4 see four distinct CUDA_VISIBLE_DEVICES,
  which kt.gpu_ids() returns; a fifth that may wait 2 s fails saying the gpus are held;
  a fifth that waits gets the device of the one killed;
- two gpus=0.5 actors share one device, and a third goes to the other;
- a 1x2 SPMD group on a pod with KT_GPUS=2 gives rank LOCAL_RANK=i device i, each seeing
  both devices with its own at cuda:<LOCAL_RANK>, as under torchrun;
- /status lists the pod's devices and who holds them.
"""

from __future__ import annotations

import os
import uuid

import pytest

import kt
from tests.sync.status import pod_status

pytestmark = pytest.mark.timeout(180)


class Seer:
    def devices(self) -> tuple[str, list[int | str]]:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"), kt.gpu_ids()


class Rank:
    def devices(self) -> tuple[str, str, list[int | str]]:
        return os.environ["LOCAL_RANK"], os.environ["CUDA_VISIBLE_DEVICES"], kt.gpu_ids()


def _pool(gpus: int, backend: str = "local") -> kt.Compute:
    name = f"gpus-{uuid.uuid4().hex[:6]}"
    env = {"KT_GPUS": str(gpus)} if backend == "local" else {}  # k8s: the kubelet's devices
    return kt.Compute(cpus=1, gpus=gpus, env=env, name=name, backend=backend)


def test_four_actors_get_four_devices_and_a_fifth_waits_for_a_freed_one(backend: str) -> None:
    One = kt.cls(Seer).options(compute=_pool(4, backend), cpus=0, gpus=1)
    actors = [One.remote() for _ in range(4)]
    seen = kt.get([a.devices.remote() for a in actors], timeout=120)
    assert sorted(v for v, _ in seen) == ["0", "1", "2", "3"], seen
    assert all(ids == [int(v)] for v, ids in seen), seen
    held = pod_status(actors[0])["gpus"]
    assert held["devices"] == ["0", "1", "2", "3"] and len(held["held"]) == 4, held
    impatient = One.options(placement_timeout=2).remote()
    with pytest.raises(kt.KtError, match=r"4 of 4 gpus held"):
        impatient.devices()
    fifth = One.remote()
    freed = seen[2][0]
    kt.kill(actors[2])
    assert fifth.devices.remote().result(timeout=60) == (freed, [int(freed)])
    for a in [*actors, fifth]:
        kt.kill(a)


def test_two_half_gpu_actors_share_one_device(backend: str) -> None:
    Half = kt.cls(Seer).options(compute=_pool(2, backend), cpus=0, gpus=0.5)
    first, second, third = (Half.remote() for _ in range(3))
    a, b, c = kt.get([h.devices.remote() for h in (first, second, third)], timeout=120)
    assert a == b and a[0] in ("0", "1"), (a, b)
    assert c[0] != a[0], (a, c)  # the first device is full: the third goes to the other
    for h in (first, second, third):
        kt.kill(h)


def test_an_spmd_group_gives_each_rank_the_device_of_its_local_rank(backend: str) -> None:
    compute = _pool(2, backend).distribute("spmd", workers=1, procs_per_worker=2)
    ranks = kt.cls(Rank).to(compute)
    try:
        assert sorted(ranks.devices()) == [("0", "0,1", [0]), ("1", "0,1", [1])]
    finally:
        ranks.teardown()


def test_an_actor_asking_more_than_a_pod_has_is_refused_at_once() -> None:
    with pytest.raises(kt.PlacementError, match=r"2 gpus > 1"):
        kt.cls(Seer).options(compute=_pool(1), cpus=0, gpus=2).remote().devices()
    with pytest.raises(kt.ConfigError, match="whole number"):
        kt.cls(Seer).options(gpus=1.5)
