"""On a machine with an NVIDIA GPU (`make test-gpu`; skipped elsewhere, with the reason):
devices found without KT_GPUS, NCCL in a group and between actors, CUDA state dicts.

Behaviours covered:
- a local pod finds the machine's devices itself; a gpus=1 actor sees one CUDA device,
  kt.gpu_ids() names it, and two gpus=0.5 actors both allocate on one device;
- a 1x1 SPMD group's rank runs init_process_group("nccl") unmodified and all-reduces a
  CUDA tensor on cuda:<LOCAL_RANK>;
- two actors with a GPU each (machines with 2 or more) broadcast a CUDA state dict
  through collective_group(..., backend="nccl"): bit-identical, in place, on the device;
- kt.get(key, into=) fills CUDA tensors in place, GPU to GPU from the putting actor:
  over NCCL when each has a device of its own (machines with 2 or more), through CUDA
  IPC when they share one (NCCL cannot pair two processes on one device);
- the GRPO example with device="cuda" (rollouts sharing the GPU, the trainer ranks on it)
  reaches greedy exact-match >= 0.8 on the sort task, with either weight sync (the
  store's goes GPU to GPU).
"""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

import kt
from kt.distributed import collective_group

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


def _pool(cpus: int = 2) -> kt.Compute:
    import torch

    count = torch.cuda.device_count()
    return kt.Compute(cpus=cpus, gpus=count, name=f"cuda-{uuid.uuid4().hex[:6]}")


class Device:
    def __init__(self) -> None:
        import torch

        torch.manual_seed(int(os.environ.get("SEED", "0")))
        self.state = {
            "w": torch.randn(1024, 1024, device="cuda"),
            "b": torch.randn(7, device="cuda", dtype=torch.bfloat16),
        }

    def seen(self) -> tuple[int, list[int | str], str]:
        import torch

        return torch.cuda.device_count(), kt.gpu_ids(), torch.cuda.get_device_name(0)

    def allocate(self, mib: int) -> int:
        import torch

        block = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
        return int(block.numel())

    def digest(self) -> dict[str, tuple[str, int]]:
        """Each tensor's sha256 of its bytes, and its storage pointer."""
        import torch

        out = {}
        for k, v in self.state.items():
            raw = v.contiguous().view(-1).view(torch.uint8).cpu().numpy()
            out[k] = (hashlib.sha256(raw).hexdigest(), v.data_ptr())
        return out

    def broadcast(self, group: str) -> None:
        from kt.distributed import broadcast_state_dict

        broadcast_state_dict(self.state, group=group)

    def put(self, key: str) -> None:
        kt.put(key, self.state)  # CUDA tensors: held here too, for NCCL

    def get_into(self, key: str) -> dict[str, int]:
        import dataclasses

        from kt.actors import direct

        kt.get(key, into=self.state, timeout=60)
        return dataclasses.asdict(direct.counts)


def all_reduce() -> tuple[str, float]:
    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    x = torch.full((1024,), float(dist.get_rank() + 1), device=f"cuda:{local}")
    dist.all_reduce(x)
    dist.destroy_process_group()
    return str(x.device), float(x[0].item())


def test_actors_are_given_the_machines_devices() -> None:
    pool = _pool()
    one = kt.cls(Device).options(compute=pool, cpus=0, gpus=1).remote()
    count, ids, name = one.seen()
    assert count == 1 and ids == [0], (count, ids, name)
    halves = [kt.cls(Device).options(compute=pool, cpus=0, gpus=0.5).remote() for _ in range(2)]
    assert kt.get([h.allocate.remote(256) for h in halves], timeout=120) == [256 * 2**20] * 2
    for a in [one, *halves]:
        kt.kill(a)


def test_an_unmodified_nccl_script_all_reduces_in_a_1x1_group() -> None:
    compute = _pool().distribute("pytorch", workers=1, procs_per_worker=1)
    group = kt.fn(all_reduce).to(compute)
    try:
        assert group() == [("cuda:0", 1.0)]
    finally:
        group.teardown()


def test_a_cuda_state_dict_broadcasts_through_nccl_bit_identical() -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL puts each member on a device of its own: this machine has one GPU")
    pool = _pool()
    D = kt.cls(Device).options(compute=pool, cpus=0, gpus=1)
    src, dst = D.options(env={"SEED": "1"}).remote(), D.options(env={"SEED": "2"}).remote()
    before = dst.digest()
    group = collective_group([src, dst], backend="nccl")
    group.broadcast_state_dict("state")
    after = dst.digest()
    assert {k: d for k, (d, _) in after.items()} == {k: d for k, (d, _) in src.digest().items()}
    assert {k: p for k, (_, p) in after.items()} == {k: p for k, (_, p) in before.items()}
    for a in (src, dst):
        kt.kill(a)


def _store_round(gpus: float) -> dict[str, int]:
    """A CUDA state dict put by one actor and got into another's; the getter's counts."""
    pool = _pool()
    D = kt.cls(Device).options(compute=pool, cpus=0, gpus=gpus)
    src, dst = D.options(env={"SEED": "1"}).remote(), D.options(env={"SEED": "2"}).remote()
    key = f"cuda/{uuid.uuid4().hex[:6]}"
    src.put(key)
    before = dst.digest()
    counts = dst.get_into(key)
    after = dst.digest()
    assert {k: d for k, (d, _) in after.items()} == {k: d for k, (d, _) in src.digest().items()}
    assert {k: p for k, (_, p) in after.items()} == {k: p for k, (_, p) in before.items()}
    kt.rm(key)
    for a in (src, dst):
        kt.kill(a)
    return counts


def test_the_data_store_fills_cuda_tensors_on_a_shared_gpu_through_cuda_ipc() -> None:
    counts = _store_round(0.5)  # one device: NCCL cannot pair them; CUDA IPC does
    assert (counts["received"], counts["ipc"], counts["fallbacks"]) == (1, 1, 0), counts


def test_the_data_store_sends_cuda_tensors_gpu_to_gpu_over_nccl() -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("NCCL pairs two processes on two devices: this machine has one GPU")
    counts = _store_round(1)
    assert counts["received"] == 1 and counts["fallbacks"] == 0, counts


@pytest.mark.parametrize("sync", ["collective", "store"])
def test_the_grpo_example_learns_on_the_gpu(sync: str) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "rl_grpo"))
    from pipeline import RunConfig, run_pipeline, teardown

    cfg = RunConfig(
        task="sort", steps=400, seed=0, device="cuda", stop_at_exact=0.8, weight_sync=sync
    )
    run = run_pipeline(cfg)
    try:
        exact = run.history.evals[-1][1]
        print(run.split_line())
        assert exact >= 0.8, run.history.evals[-5:]
    finally:
        teardown(run)
