"""GRPO on kt: rollout actors, a reward function, a 2-rank DDP trainer, weight broadcast.

The pieces are laid out the way a real GRPO pipeline is, each a kt part:

- `RolloutWorker` (kt.cls, `--rollouts` of them): a policy copy that samples G
  completions for each of its prompts;
- `score` (kt.fn): the verifiable reward, fanned out over the rollout chunks with
  `asyncio.gather`;
- `Trainer` (kt.cls on `Compute.distribute("pytorch", workers=2)`): an SPMD group of two
  ranks, gloo DDP; each rank takes half of the batch, DDP averages the gradients;
- weight sync after every step, two ways (`weight_sync=`): "collective" (the default),
  `kt.distributed.collective_group([trainer.rank(0), *rollouts])` made once and a
  broadcast of the policy's state dict; or "store", trainer rank 0 `kt.put`s it under a
  versioned key and each rollout `kt.get(key, into=...)`s it into its own tensors, in
  place (the version before is removed);
- one step of overlap (`overlap=True`): rollouts for step k+1 (with weights k) run while
  the trainer does step k; the sync follows when both are done.

With `device="cuda"` the policies live on GPUs: each rollout actor asks for a share of
one (`gpus=1 / (rollouts + 1)`) and each trainer rank's pod for one device, so on a
one-GPU machine everything shares it; the trainer stays gloo DDP (NCCL cannot put two
ranks on one device). The collective sync crosses the host (gloo); the store sync goes
GPU to GPU (the data store's direct path: CUDA IPC on a shared GPU, NCCL between two).

Nothing here names a backend: the pools come from `KT_BACKEND` / `backend=`.
Every actor method reports the seconds it computed, so the driver can tell compute
from what kt adds (calls, serialization, placement, sync).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from grpo import Batch, make_batch, update
from local_loop import History, Hyper
from model import Policy, PolicyConfig, get_flat_state
from tasks import eval_prompts, get_task, greedy_exact_match

import kt
from kt.distributed import collective_group


def _policy(task_name: str, model: dict[str, Any], seed: int, device: str) -> Policy:
    """The same initial weights everywhere: one seed, one config (made on the CPU, then
    moved, so a GPU run starts from the CPU run's weights)."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    cfg = dataclasses.replace(PolicyConfig.for_task(get_task(task_name)), **model)
    return Policy(cfg).to(device)


class RolloutWorker:
    """Samples completions with its copy of the policy (updated in place by `load`)."""

    def __init__(
        self, task_name: str, model: dict[str, Any], seed: int, index: int, device: str = "cpu"
    ) -> None:
        self.task = get_task(task_name)
        self.device = device
        self.policy = _policy(task_name, model, seed, device)
        self.gen = torch.Generator(device=device).manual_seed(seed * 1000 + 10_000 + index)
        self.version = 0

    def load(self, key: str, version: int) -> None:
        """The trainer's weights of `version`, from the data store into this policy."""
        kt.get(key, into=self.policy.state_dict())
        self.version = version

    def synced(self, version: int) -> None:
        """A broadcast gave this policy the weights of `version`."""
        self.version = version

    def sample(self, prompts: torch.Tensor, group: int) -> dict[str, Any]:
        """Completions, with the version of the weights that made them (every sync sent
        before this call by the same driver has run: its calls run in order)."""
        t = time.perf_counter()
        completions, old_logprobs = self.policy.sample(prompts.to(self.device), group, self.gen)
        return {
            "completions": completions.cpu(),
            "old_logprobs": old_logprobs.cpu(),
            "version": self.version,
            "seconds": time.perf_counter() - t,
        }

    def exact_match(self, prompts: torch.Tensor) -> float:
        def greedy(p: torch.Tensor) -> torch.Tensor:
            return self.policy.greedy(p.to(self.device)).cpu()

        return greedy_exact_match(self.task, greedy, prompts)

    def flat_weights(self) -> torch.Tensor:
        return get_flat_state(self.policy).cpu()


def score(task_name: str, prompts: torch.Tensor, completions: torch.Tensor, group: int) -> Any:
    """Rewards of one chunk of rollouts, and the seconds it took."""
    t = time.perf_counter()
    rewards = get_task(task_name).reward(prompts.repeat_interleave(group, dim=0), completions)
    return rewards, time.perf_counter() - t


class Trainer:
    """One rank of the DDP trainer; `policy` is the bare module whose weights are synced."""

    def __init__(
        self,
        task_name: str,
        model: dict[str, Any],
        seed: int,
        hp: Hyper,
        steps: int,
        device: str = "cpu",
    ) -> None:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self.device = device
        self.policy = _policy(task_name, model, seed, device)
        dist.init_process_group("gloo")  # the environment is torchrun's, set by kt
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.ddp = DistributedDataParallel(self.policy)
        self.hp = hp
        self.opt = torch.optim.Adam(self.policy.parameters(), lr=hp.lr)
        last = max(steps - 1, 1)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda i: 1.0 - (1.0 - hp.lr_end) * min(i / last, 1.0)
        )

    def step(self, batch: tuple[torch.Tensor, ...]) -> dict[str, float]:
        t = time.perf_counter()
        shard = Batch(*(t.to(self.device) for t in batch)).shard(self.rank, self.world)
        stats = update(
            self.ddp, self.opt, shard, clip_eps=self.hp.clip_eps, inner_steps=self.hp.inner_steps
        )
        self.sched.step()
        return {**stats, "seconds": time.perf_counter() - t}

    def publish(self, key: str) -> None:
        """Put this rank's weights (rank 0's, DDP keeps every rank's equal) in the store."""
        kt.put(key, self.policy.state_dict())  # CUDA tensors go GPU to GPU to the rollouts

    def flat_weights(self) -> torch.Tensor:
        return get_flat_state(self.policy).cpu()


@dataclass(frozen=True)
class RunConfig:
    task: str = "sort"
    steps: int = 400
    seed: int = 0
    rollouts: int = 2
    overlap: bool = True
    hp: Hyper = field(default_factory=Hyper)
    backend: str | None = None
    stop_at_exact: float | None = None  # stop once greedy exact-match reaches this
    stop_at_gain: float | None = None  # stop once the 5-step mean reward rose this much
    weight_sync: str = "collective"  # or "store": kt.put / kt.get(into=)
    device: str = "cpu"  # or "cuda": policies on GPUs (see the module's docstring)


@dataclass
class Run:
    """What a run leaves: curves, the time split, and the live parts (for checks)."""

    history: History
    wall_s: float = 0.0
    compute_s: dict[str, float] = field(default_factory=dict)
    sync_s: float = 0.0
    eval_s: float = 0.0
    parts: dict[str, Any] = field(default_factory=dict)

    def reward_gain(self, window: int = 5) -> float:
        """How much the mean reward of the last `window` steps rose over the first ones."""
        r = self.history.reward
        if len(r) < 2 * window:
            return 0.0
        return sum(r[-window:]) / window - sum(r[:window]) / window

    @property
    def overhead_s(self) -> float:
        """Step time not spent computing: kt's calls, serialization and the weight sync."""
        return max(0.0, self.wall_s - self.eval_s - self.compute_s.get("critical", 0.0))

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_s / max(self.wall_s - self.eval_s, 1e-9)

    def split_line(self) -> str:
        c = self.compute_s
        steps = self.wall_s - self.eval_s
        return (
            f"wall {self.wall_s:.1f}s = rollout {c.get('rollout', 0):.1f}s"
            f"{' (overlapped with train)' if c.get('overlapped') else ''}, "
            f"reward {c.get('reward', 0):.1f}s, train {c.get('train', 0):.1f}s, "
            f"sync {self.sync_s:.1f}s, eval {self.eval_s:.1f}s; "
            f"kt overhead (calls + sync) {self.overhead_s:.1f}s = "
            f"{100 * self.overhead_fraction:.1f}% of step time ({steps:.1f}s)"
        )


Progress = Callable[[int, float, float | None], None]


async def run_async(cfg: RunConfig, progress: Progress | None = None) -> Run:
    hp, task = cfg.hp, get_task(cfg.task)
    if hp.prompts % cfg.rollouts:
        raise ValueError(f"--prompts {hp.prompts} does not split over {cfg.rollouts} rollouts")
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device={cfg.device!r}: 'cpu' or 'cuda'")
    model = dict(hp.model)
    gpus = 1 if cfg.device == "cuda" else 0
    rollout_pool = kt.Compute(cpus=cfg.rollouts, gpus=gpus, replicas=1, backend=cfg.backend)
    trainer_pool = kt.Compute(cpus=1, gpus=gpus, backend=cfg.backend).distribute(
        "pytorch", workers=2
    )
    share = 1 / (cfg.rollouts + 1) if gpus else 0  # a share of the pod's device each
    Rollout = kt.cls(RolloutWorker).options(compute=rollout_pool, gpus=share)
    workers = [
        Rollout.remote(cfg.task, model, cfg.seed, i, cfg.device) for i in range(cfg.rollouts)
    ]
    reward = kt.fn(score).to(rollout_pool)
    trainer = kt.cls(Trainer).to(
        trainer_pool, init_args=(cfg.task, model, cfg.seed, hp, cfg.steps, cfg.device)
    )
    if cfg.weight_sync not in ("collective", "store"):
        raise ValueError(f"weight_sync={cfg.weight_sync!r}: 'collective' or 'store'")
    if cfg.weight_sync == "collective":
        group = await asyncio.to_thread(collective_group, [trainer.rank(0), *workers])
    # every part started before the clock starts (the group's making waited for them too)
    await asyncio.gather(trainer.flat_weights.remote(), *(w.synced.remote(0) for w in workers))
    keys = f"grpo-{os.getpid()}-{time.time_ns()}/policy"  # "store": <keys>/v<step>

    async def sync(step: int) -> None:
        """Every rollout gets the trainer's weights of `step`."""
        if cfg.weight_sync == "collective":
            await asyncio.to_thread(group.broadcast_state_dict, "policy")
            await asyncio.gather(*(w.synced.remote(step) for w in workers))
            return
        await trainer.rank(0).publish.remote(f"{keys}/v{step}")
        loads = [w.load.remote(f"{keys}/v{step}", step) for w in workers]
        old = [asyncio.to_thread(kt.rm, f"{keys}/v{step - 1}")] if step > 1 else []
        await asyncio.gather(*loads, *old)  # the version before goes meanwhile

    held_out = eval_prompts(task, hp.eval_size, cfg.seed)
    unseen = {tuple(p) for p in held_out.tolist()}  # evaluation prompts are never trained on
    prompt_gen = torch.Generator().manual_seed(cfg.seed)
    run = Run(History(), parts={"workers": workers, "trainer": trainer})
    c = run.compute_s = dict.fromkeys(("rollout", "reward", "train", "critical"), 0.0)
    c["overlapped"] = float(cfg.overlap)
    t0 = time.perf_counter()

    def fresh_prompts() -> torch.Tensor:
        prompts = task.sample_prompts(hp.prompts, prompt_gen)
        while True:
            clash = [i for i, p in enumerate(prompts.tolist()) if tuple(p) in unseen]
            if not clash:
                return prompts
            prompts[clash] = task.sample_prompts(len(clash), prompt_gen)

    def launch() -> tuple[torch.Tensor, list[kt.Ref[Any]]]:
        prompts = fresh_prompts()
        chunks = prompts.chunk(cfg.rollouts)
        return prompts, [
            w.sample.remote(ch, hp.group) for w, ch in zip(workers, chunks, strict=True)
        ]

    async def evaluate(step: int) -> float:
        t = time.perf_counter()
        exact = float(await workers[0].exact_match.remote(held_out))
        run.eval_s += time.perf_counter() - t
        run.history.evals.append((step, exact, time.perf_counter() - t0))
        return exact

    await evaluate(0)
    prompts, pending = launch()
    samples = await asyncio.gather(*pending)
    c["critical"] += max(s["seconds"] for s in samples)
    for step in range(1, cfg.steps + 1):
        expected = step - 2 if cfg.overlap and step > 1 else step - 1
        versions = [s["version"] for s in samples]
        if any(v != max(expected, 0) for v in versions):
            raise RuntimeError(f"step {step}: rollouts sampled with weights {versions}")
        completions = torch.cat([s["completions"] for s in samples])
        old_logprobs = torch.cat([s["old_logprobs"] for s in samples])
        chunks = zip(prompts.chunk(cfg.rollouts), [s["completions"] for s in samples], strict=True)
        scored = await asyncio.gather(*(reward.remote(cfg.task, p, o, hp.group) for p, o in chunks))
        rewards = torch.cat([r for r, _ in scored])
        reward_s = max(s for _, s in scored)
        batch = make_batch(prompts, completions, old_logprobs, rewards, hp.group)
        train_ref = trainer.step.remote(batch.as_tuple())
        rollout_s = max(s["seconds"] for s in samples)
        if cfg.overlap and step < cfg.steps:  # rollouts k+1 (weights k-1 -> k) beside train k
            prompts, pending = launch()
            stats, samples = await asyncio.gather(train_ref, asyncio.gather(*pending))
            next_rollout_s = max(s["seconds"] for s in samples)
        else:
            stats, next_rollout_s = await train_ref, 0.0
        train_s = max(s["seconds"] for s in stats)
        t = time.perf_counter()
        await sync(step)
        run.sync_s += time.perf_counter() - t
        if not cfg.overlap and step < cfg.steps:
            prompts, pending = launch()
            samples = await asyncio.gather(*pending)
            next_rollout_s = max(s["seconds"] for s in samples)
        c["rollout"] += rollout_s
        c["reward"] += reward_s
        c["train"] += train_s
        c["critical"] += reward_s + (
            max(train_s, next_rollout_s) if cfg.overlap else train_s + next_rollout_s
        )
        mean_reward = rewards.mean().item()
        run.history.step.append(step)
        run.history.reward.append(mean_reward)
        exact = await evaluate(step) if step % hp.eval_every == 0 or step == cfg.steps else None
        if progress is not None:
            progress(step, mean_reward, exact)
        if exact is not None and cfg.stop_at_exact is not None and exact >= cfg.stop_at_exact:
            break
        if cfg.stop_at_gain is not None and run.reward_gain() >= cfg.stop_at_gain:
            break
    run.wall_s = time.perf_counter() - t0
    return run


def run_pipeline(cfg: RunConfig, progress: Progress | None = None) -> Run:
    """Run GRPO on kt; the pools stay up (call `teardown(run)` or let the driver exit)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return asyncio.run(run_async(cfg, progress))


def teardown(run: Run) -> None:
    run.parts["trainer"].teardown()
    for w in run.parts["workers"]:
        kt.kill(w)
