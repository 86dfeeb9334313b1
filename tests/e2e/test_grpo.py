"""The GRPO example on kt (examples/rl_grpo), smoke task, fixed seed.

Covers: with two rollout actors, the reward fan-out and a 2-rank DDP trainer, mean
reward rises by at least 0.5 within 150 steps, in under 3 minutes, and the run stops at
the first step where it has (`stop_at_gain`); after the last
weight sync every rollout actor holds exactly the trainer's weights, and the two
trainer ranks hold the same weights. Both weight syncs: a collective group's broadcast,
and the data store (`kt.put` by rank 0, `kt.get(key, into=...)` in the rollouts).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rl_grpo"
sys.path.insert(0, str(EXAMPLE))

from pipeline import RunConfig, run_pipeline, teardown  # noqa: E402


@pytest.mark.timeout(400)
@pytest.mark.parametrize("weight_sync", ["collective", "store"])
def test_grpo_reverse_learns_and_rollouts_hold_the_trainers_weights(weight_sync: str) -> None:
    cfg = RunConfig(
        task="reverse", steps=150, seed=0, rollouts=2, stop_at_gain=0.5, weight_sync=weight_sync
    )
    start = time.monotonic()
    run = run_pipeline(cfg)  # pods, actors, trainer group, collective group, training
    elapsed = time.monotonic() - start
    try:
        assert run.reward_gain() >= 0.5, run.history.reward
        rewards = run.history.reward  # it stopped at the first step that reached the gain
        assert len(rewards) < cfg.steps, "it ran every step: stop_at_gain never fired"
        assert sum(rewards[-6:-1]) / 5 - sum(rewards[:5]) / 5 < 0.5, "it ran on past the gain"
        assert elapsed < 180, run.split_line()
        trainer, workers = run.parts["trainer"], run.parts["workers"]
        ranks = trainer.flat_weights()
        assert torch.equal(ranks[0], ranks[1])
        for worker in workers:
            assert torch.equal(worker.flat_weights(), ranks[0])
        # and the check can fail: one more trainer step, no sync
        trainer.step(_batch(run, cfg))
        assert not torch.equal(workers[0].flat_weights(), trainer.rank(0).flat_weights())
    finally:
        teardown(run)


def _batch(run: object, cfg: RunConfig) -> tuple[object, ...]:
    from grpo import make_batch
    from tasks import get_task

    task = get_task(cfg.task)
    prompts = task.sample_prompts(4, torch.Generator().manual_seed(1))
    completions = task.answer(prompts).repeat_interleave(cfg.hp.group, dim=0)
    completions[::2] = (completions[::2] + 1) % 10  # half wrong: a non-zero advantage
    logprobs = torch.full(completions.shape, -1.0)
    rewards = task.reward(prompts.repeat_interleave(cfg.hp.group, dim=0), completions)
    return make_batch(prompts, completions, logprobs, rewards, cfg.hp.group).as_tuple()
