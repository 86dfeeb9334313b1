"""A small DDP training run, identical under torchrun and under kt (see test_ddp.py).

    python -m torch.distributed.run --nnodes=1 --nproc_per_node=4 ddp_train.py OUT.pt

Under kt the same `train` runs once on each rank of a group. Every rank draws its own
synthetic batches from a generator seeded by its global rank, so the result depends only
on the world size and the seed, not on how ranks are laid out over pods.
"""

from __future__ import annotations

import gc
import os
import sys
from typing import Any


def train(steps: int = 25, seed: int = 0, out: str | None = None) -> dict[str, Any]:
    """A torchrun script's shape: init, train, teardown, every call."""
    import torch.distributed as dist

    dist.init_process_group("gloo")  # env:// with torchrun's variables, unmodified
    state, ddp, opt = _fit(steps, seed, out)
    # Teardown in an order no rank can race: every rank past its last collective (the
    # barrier), DDP's reducer (which holds the process group and its gloo work) freed
    # while the interpreter is fully alive, then the group destroyed. Left to
    # interpreter exit, gloo threads can meet a finalizing interpreter and abort the
    # rank: "terminate called without an active exception".
    dist.barrier()
    del ddp, opt
    gc.collect()  # a reducer kept by a reference cycle would keep the group's threads
    dist.destroy_process_group()
    return state


def train_kept(steps: int = 25, seed: int = 0) -> dict[str, Any]:
    """Initialise on the first call only and keep the process group across calls."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    state, ddp, opt = _fit(steps, seed, None)
    dist.barrier()
    del ddp, opt
    return state


def _fit(steps: int, seed: int, out: str | None) -> tuple[dict[str, Any], Any, Any]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank = dist.get_rank()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    data = torch.Generator().manual_seed(seed * 1000 + rank)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=data)
        y = torch.sin(x.sum(dim=1, keepdim=True))
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if out is not None and rank == 0:
        torch.save(state, out)
    return state, ddp, opt


if __name__ == "__main__":
    train(out=sys.argv[1])
    # Saved, and the group destroyed: leave without interpreter finalization, as kt's
    # workers do. A full run once saw a rank abort there all the same ("terminate called
    # without an active exception", SIGABRT, torchrun exit 1) after every step was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
