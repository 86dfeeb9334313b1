"""SPMD bench: a kt group's second call against torchrun's whole relaunch, in one run.

    .venv/bin/python bench/spmd_side.py [--calls N]

Issue 4 asks for the second call of a 2 x 2 group in under 100 ms, shown beside what
torchrun costs for the same step: every torchrun job is a relaunch (new processes, torch
imported again, a new rendezvous), while a kt group keeps its rank processes. The tiny
job is the same on both sides: `init_process_group("gloo")` (once, on kt) and one
all_reduce of a 4-float tensor. Prints one JSON object on the last line of stdout:

    {"spmd_second_call": {"median_ms", "p99_ms", "calls"},
     "spmd_first_call": {"seconds"}, "torchrun_relaunch": {"seconds"}}
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import kt

TINY_JOB = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(4)
dist.all_reduce(t)
assert t[0].item() == dist.get_world_size()
dist.destroy_process_group()
"""


def step() -> float:
    """The same tiny job as TINY_JOB, with the rendezvous done once per process."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    t = torch.ones(4)
    dist.all_reduce(t)
    return float(t[0].item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def torchrun_relaunch() -> float:
    """Seconds for one `torchrun --nnodes=1 --nproc_per_node=4` of the tiny job."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "tiny.py"
        script.write_text(TINY_JOB)
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1"]
        cmd += ["--nproc_per_node=4", f"--master_port={_free_port()}", str(script)]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
        return time.perf_counter() - t0


def kt_group(calls: int) -> tuple[float, list[float]]:
    """Seconds to the first call's result (pods, imports, rendezvous), then each call's ms."""
    compute = kt.Compute(cpus=2, backend="local").distribute(
        "pytorch", workers=2, procs_per_worker=2
    )
    t0 = time.perf_counter()
    group = kt.fn(step).to(compute)
    try:
        assert group.remote().result(timeout=300) == [4.0] * 4
        first = time.perf_counter() - t0
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            group()
            times.append((time.perf_counter() - t) * 1000)
    finally:
        group.teardown()
    return first, times


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    first, times = kt_group(args.calls)
    relaunch = torchrun_relaunch()  # after kt: its processes must not share the cores
    times.sort()
    result = {
        "spmd_second_call": {
            "median_ms": statistics.median(times),
            "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
            "calls": len(times),
        },
        "spmd_first_call": {"seconds": first},
        "torchrun_relaunch": {"seconds": relaunch},
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
