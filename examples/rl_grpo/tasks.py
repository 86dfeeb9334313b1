"""Tasks with a verifiable reward: the model never sees a label, only a score.

Both tasks share one 10-symbol alphabet (tokens 0..9) so one policy class fits both. The reward
is computed from the prompt alone (sorting / reversing it is the check), which is what makes RL
work here: any completion can be scored exactly, so rewards are cheap and noise-free.

reward = per-position accuracy (in [0, 1]) + 1.0 if the whole completion is right. The
accuracy term gives a dense signal early on; the bonus makes exact answers clearly the best
in their group, which is what greedy exact-match (the metric we report) measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

ALPHABET = 10
EXACT_BONUS = 1.0


@dataclass(frozen=True)
class Task:
    """A prompt distribution plus the function that maps a prompt to its one right answer."""

    name: str
    prompt_len: int
    completion_len: int
    answer: Callable[[torch.Tensor], torch.Tensor]

    def sample_prompts(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """`n` prompts of uniform random digits, shape [n, prompt_len], from a seeded generator."""
        return torch.randint(0, ALPHABET, (n, self.prompt_len), generator=gen)

    def reward(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Per-row reward, shape [n]: position accuracy plus the exact-match bonus."""
        correct = completions == self.answer(prompts)
        accuracy = correct.float().mean(dim=1)
        return accuracy + EXACT_BONUS * correct.all(dim=1).float()

    def exact(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Per-row 1.0 / 0.0: the completion equals the right answer."""
        return (completions == self.answer(prompts)).all(dim=1).float()


def _sort(prompts: torch.Tensor) -> torch.Tensor:
    return torch.sort(prompts, dim=1).values


def _reverse(prompts: torch.Tensor) -> torch.Tensor:
    return torch.flip(prompts, dims=[1])


TASKS: dict[str, Task] = {
    # The main task: from scratch it needs a few thousand rollouts of credit assignment.
    "sort": Task("sort", prompt_len=5, completion_len=5, answer=_sort),
    # The smoke task: a fixed permutation of positions, learnt in a few dozen steps.
    "reverse": Task("reverse", prompt_len=6, completion_len=6, answer=_reverse),
}


def get_task(name: str) -> Task:
    """Look a task up by name (the `--task` flag)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def eval_prompts(task: Task, n: int, seed: int) -> torch.Tensor:
    """A fixed evaluation set drawn from its own generator, apart from the training stream.

    Using the same set at every evaluation keeps the curve comparable from point to point;
    the separate seed keeps it independent of the prompts the policy is trained on.
    """
    gen = torch.Generator().manual_seed(1_000_003 + seed)
    return task.sample_prompts(n, gen)


def greedy_exact_match(
    task: Task, decode: Callable[[torch.Tensor], torch.Tensor], prompts: torch.Tensor
) -> float:
    """Fraction of `prompts` that `decode` (a greedy decoder) answers exactly.

    Takes the decoder as a callable so this module stays free of any model code: the local
    loop passes `policy.greedy`, a rollout actor can pass its own copy.
    """
    return float(task.exact(prompts, decode(prompts)).mean())
