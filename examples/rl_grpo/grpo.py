"""The GRPO update: group-normalised advantages and a PPO-style clipped ratio, no KL, no critic.

GRPO replaces a value network with the group: each prompt gets G sampled completions, and a
completion's advantage is how much better its reward is than its siblings',
(r - mean_group) / (std_group + eps). A group whose samples all score the same carries no
signal and gets advantage 0. The ratio new/old policy is clipped to [1 - eps, 1 + eps] so the
few inner steps on one batch cannot move the policy far from the one that sampled it.

Split of work for the distributed trainer: advantages need whole groups, so they are computed
once on the full batch (`make_batch`) before it is cut into per-rank halves (`Batch.shard`).
`update` then only touches its own rows and calls `model(...)` and `optimizer.step()`, so it
runs unmodified on a DDP-wrapped model: every rank averages its loss over its own tokens and
DDP averages the gradients over ranks, which equals the full-batch token mean when the shards
are the same size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from model import token_logprobs
from torch import nn


@dataclass(frozen=True)
class Batch:
    """One step's training data, one row per sampled completion (prompt repeated per row)."""

    prompts: torch.Tensor  # [B, P] long
    completions: torch.Tensor  # [B, C] long
    old_logprobs: torch.Tensor  # [B, C] float, from the policy that sampled
    advantages: torch.Tensor  # [B] float

    def __len__(self) -> int:
        return self.prompts.shape[0]

    def shard(self, rank: int, world: int) -> Batch:
        """Contiguous rows for `rank` of `world`; `len(self)` must divide evenly."""
        if len(self) % world:
            raise ValueError(f"batch of {len(self)} rows does not split over {world} ranks")
        n = len(self) // world
        rows = slice(rank * n, (rank + 1) * n)
        return Batch(*(t[rows] for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.prompts, self.completions, self.old_logprobs, self.advantages


def advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out prompt-major, shape [P*group]."""
    r = rewards.view(-1, group)
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def make_batch(
    prompts: torch.Tensor,
    completions: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    group: int,
) -> Batch:
    """Assemble a batch from one step's rollouts: `prompts` is [P, prompt_len] (one row per
    prompt), the other tensors have P*group rows in the order `Policy.sample` returns."""
    return Batch(
        prompts.repeat_interleave(group, dim=0),
        completions,
        old_logprobs,
        advantages(rewards, group),
    )


def grpo_loss(
    logprobs: torch.Tensor, batch: Batch, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate, averaged over tokens; returns (loss, fraction of tokens clipped)."""
    ratio = torch.exp(logprobs - batch.old_logprobs)
    adv = batch.advantages.unsqueeze(1)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()
    clip_frac = ((ratio - 1.0).abs() > clip_eps).float().mean()
    return loss, clip_frac


def update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    *,
    clip_eps: float = 0.2,
    inner_steps: int = 1,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """`inner_steps` optimizer steps on `batch` (this rank's shard under DDP); returns stats.

    The first inner step has ratio 1 (the batch was sampled by these weights, or by the ones
    one sync behind when rollouts overlap training); later ones are where the clip matters.
    Gradient clipping runs after backward, i.e. after DDP's all-reduce, so every rank clips
    the same gradient and the replicas stay identical.
    """
    model.train()
    stats: dict[str, float] = {}
    for _ in range(inner_steps):
        logprobs = token_logprobs(model, batch.prompts, batch.completions)
        loss, clip_frac = grpo_loss(logprobs, batch, clip_eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        stats = {"loss": loss.item(), "clip_frac": clip_frac.item(), "grad_norm": grad_norm.item()}
    return stats
