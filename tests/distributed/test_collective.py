"""Collective groups among actors: weight broadcast from a trainer rank to rollout actors.

Behaviours covered:
- `collective_group([trainer.rank(0), *rollouts])` joins rank 0 of a trainer SPMD group
  (already in its own default process group) and three plain actors into a new gloo
  group, without the user's classes knowing;
- `CollectiveGroup.broadcast_state_dict("model")` from the driver leaves every rollout
  with tensors equal to the trainer's (mixed dtypes, odd sizes), updated in place;
- the trainer's default process group keeps working, and its rank 1 is untouched;
- `kt.distributed.broadcast_state_dict(...)` called inside the members does the same;
- an actor can be in several collective groups; a member whose state dict does not
  match raises, and the others are not left hanging: the group stays in step;
- backend="nccl" where a member has no CUDA device (these machines): a ConfigError naming
  the member and the ways out, and the group's name is free again (tests/gpu runs NCCL
  itself where a GPU exists).
"""

from __future__ import annotations

from typing import Any

import pytest

import kt
from kt.distributed import broadcast_state_dict, collective_group

torch = pytest.importorskip("torch")


class Net(torch.nn.Module):  # type: ignore[misc]
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, width)
        self.low = torch.nn.Parameter(torch.randn(3, dtype=torch.bfloat16))
        self.register_buffer("mask", torch.rand(3) > 0.5)  # 3 bytes: alignment matters
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))


def _state(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class Trainer:
    def __init__(self) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        torch.manual_seed(100 + dist.get_rank())
        self.model = Net()

    def state(self) -> dict[str, Any]:
        return _state(self.model)

    def step(self) -> float:
        """Change the weights, and use the default process group."""
        import torch.distributed as dist

        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(0.5)
            self.model.steps += 1
        total = torch.tensor([1.0])
        dist.all_reduce(total)
        return float(total.item())

    def push(self) -> None:
        broadcast_state_dict(self.model.state_dict(), group="weights", src=0)


class Rollout:
    def __init__(self, seed: int, width: int = 3) -> None:
        torch.manual_seed(seed)
        self.model = Net(width)

    def state(self) -> dict[str, Any]:
        return _state(self.model)

    def pull(self, group: str = "weights") -> None:
        broadcast_state_dict(self.model.state_dict(), group=group)

    def push(self, group: str) -> None:
        broadcast_state_dict(self.model.state_dict(), group=group, src=0)

    def pull_wrong(self, group: str) -> None:
        """Receive into a dict whose shapes are not the source's."""
        wrong = dict(self.model.state_dict(), **{"linear.weight": torch.zeros(4, 5)})
        broadcast_state_dict(wrong, group=group)

    def pull_fresh(self, group: str) -> dict[str, Any]:
        """Receive into a new dict instead of a module's own."""
        return broadcast_state_dict(None, group=group)


def _equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(150)
def test_trainer_rank_broadcasts_weights_to_rollout_actors(pool: kt.Compute) -> None:
    compute = kt.Compute(cpus=2, backend="local").distribute("pytorch", procs_per_worker=2)
    trainer = kt.cls(Trainer).to(compute)
    rollouts = [kt.cls(Rollout).options(compute=pool, cpus=0).remote(seed=i) for i in range(3)]
    try:
        rank1_before = trainer.rank(1).state()
        assert not any(_equal(r.state(), trainer.rank(0).state()) for r in rollouts)

        group = collective_group([trainer.rank(0), *rollouts], name="weights")
        assert group.size == 4
        group.broadcast_state_dict("model")
        source = trainer.rank(0).state()
        for r in rollouts:
            assert _equal(r.state(), source)
        assert _equal(trainer.rank(1).state(), rank1_before)
        assert not _equal(rank1_before, source)

        assert trainer.step() == [2.0, 2.0]  # the default process group still works
        kt.get([trainer.rank(0).push.remote(), *[r.pull.remote() for r in rollouts]], timeout=60)
        source = trainer.rank(0).state()
        assert int(source["steps"]) == 1
        for r in rollouts:
            assert _equal(r.state(), source)
        # the same actors, in a second group too
        _mismatched_member_raises_without_hanging_the_others(rollouts)
    finally:
        trainer.teardown()
        for r in rollouts:
            kt.kill(r)


def _mismatched_member_raises_without_hanging_the_others(rollouts: list[kt.ActorHandle]) -> None:
    a, b, c = rollouts
    collective_group(rollouts, name="mixed")
    with pytest.raises(kt.ConfigError, match=r"linear\.weight"):
        kt.get([a.push.remote("mixed"), b.pull.remote("mixed"), c.pull_wrong.remote("mixed")])
    # the mismatched member took part all the same: the group is in step and still works
    _, _, fresh = kt.get(
        [a.push.remote("mixed"), b.pull.remote("mixed"), c.pull_fresh.remote("mixed")],
        timeout=60,
    )
    assert _equal(b.state(), a.state())
    assert _equal(fresh, a.state())


@pytest.mark.timeout(90)
def test_nccl_without_a_cuda_device_is_refused_naming_the_member(pool: kt.Compute) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: tests/gpu runs NCCL here")
    rollouts = [kt.cls(Rollout).options(compute=pool, cpus=0).remote(seed=i) for i in range(2)]
    try:
        with pytest.raises(
            kt.ConfigError,
            match=r"backend='nccl': member \d \(pod .*\) cannot use it: .*backend='gloo'",
        ):
            collective_group(rollouts, backend="nccl", name="no-gpu", timeout=30)
        with pytest.raises(kt.ConfigError, match=r"collective groups support \('gloo', 'nccl'\)"):
            collective_group(rollouts, backend="mpi")
        group = collective_group(rollouts, name="no-gpu")  # the name is free again
        assert group.backend == "gloo"
        kt.get([rollouts[0].push.remote("no-gpu"), rollouts[1].pull.remote("no-gpu")], timeout=60)
        assert _equal(rollouts[1].state(), rollouts[0].state())
    finally:
        for r in rollouts:
            kt.kill(r)
