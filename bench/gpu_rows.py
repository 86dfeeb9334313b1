"""kt's GPU bench rows (kt only, on a machine with an NVIDIA GPU; not in the default set):

- ``cuda_into``: a 1 GiB state dict of CUDA tensors put by one actor and got into
  another's (`kt.get(key, into=)`), by the direct path (the default for CUDA tensors:
  CUDA IPC when the two share a GPU, NCCL point to point when each has its own) and
  through the store's host copy (`transport="store"`); medians of 3, and whether each
  direct get was direct.
- ``cuda_bcast``: the same state dict broadcast between two actors through
  `collective_group`: NCCL (each on a GPU of its own: machines with 2 or more) and gloo,
  the CPU path (the tensors cross the host); medians of 3.

    python -m bench --no-ray --reps 1 --rows cuda_into cuda_bcast    (tools/gpu_check.sh)
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid
from typing import Any

import kt

GIB_TENSORS = 16  # 16 float32 tensors of 64 MiB


class CudaSide:
    """An actor holding a 1 GiB CUDA state dict."""

    def __init__(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        n = 2**30 // 4 // GIB_TENSORS
        self.sd = {f"layer{i}": torch.randn(n, device="cuda") for i in range(GIB_TENSORS)}

    def put(self, key: str, transport: str | None) -> float:
        import torch

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        kt.put(key, self.sd, transport=transport)
        return time.perf_counter() - t0

    def get_into(self, key: str) -> float:
        import torch

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        kt.get(key, into=self.sd, timeout=300)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def broadcast(self, group: str) -> float:
        import torch

        from kt.distributed import broadcast_state_dict

        torch.cuda.synchronize()
        t0 = time.perf_counter()
        broadcast_state_dict(self.sd, group=group)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def checksum(self) -> list[int]:
        """Each tensor's bits summed as int32 (exact)."""
        import torch

        return [int(t.view(torch.int32).sum(dtype=torch.int64)) for t in self.sd.values()]

    def counts(self) -> dict[str, int]:
        from kt.actors import direct

        return dataclasses.asdict(direct.counts)


def _devices() -> int:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here: the GPU rows run on a GPU machine")
    return torch.cuda.device_count()


def _pair(gpus: float, count: int, tag: str) -> list[Any]:
    name = f"bench-{tag}-{uuid.uuid4().hex[:4]}"
    pool = kt.Compute(cpus=2, gpus=count, replicas=1, backend="local", name=name)
    side = kt.cls(CudaSide).options(compute=pool, cpus=0, gpus=gpus)
    return [side.remote(1), side.remote(2)]


def row_cuda_into() -> dict[str, float]:
    count = _devices()
    out: dict[str, float] = {}
    layouts = [("shared", 0.5)] + ([("apart", 1.0)] if count >= 2 else [])
    for where, gpus in layouts:
        src, dst = _pair(gpus, count, f"into-{where}")
        for transport in (None, "store"):
            label = "direct" if transport is None else "store"
            puts, gets = [], []
            before = dst.counts()
            for i in range(3):
                key = f"bench/cuda/{where}/{label}/{i}"
                puts.append(src.put(key, transport))
                gets.append(dst.get_into(key))
                assert dst.checksum() == src.checksum(), f"cuda_into {where} {label}: wrong values"
                kt.rm(key)
            after = dst.counts()
            out[f"{where}_{label}_get_s"] = statistics.median(gets)
            out[f"{where}_{label}_put_s"] = statistics.median(puts)
            if transport is None:
                out[f"{where}_direct_gets"] = after["received"] - before["received"]
        for actor in (src, dst):
            kt.kill(actor)
    return out


def row_cuda_bcast() -> dict[str, float]:
    from kt.distributed import collective_group

    count = _devices()
    out: dict[str, float] = {}
    backends = [("gloo", 0.5)] + ([("nccl", 1.0)] if count >= 2 else [])
    for backend, gpus in backends:
        src, dst = _pair(gpus, count, f"bcast-{backend}")
        group = collective_group([src, dst], backend=backend)
        times = []
        for _ in range(3):
            refs = [a.broadcast.remote(group.name) for a in (src, dst)]
            times.append(max(kt.get(refs, timeout=300)))
            assert dst.checksum() == src.checksum(), f"cuda_bcast {backend}: wrong values"
        out[f"{backend}_s"] = statistics.median(times)
        group.destroy()
        for actor in (src, dst):
            kt.kill(actor)
    return out
