"""A tiny from-scratch transformer policy (~100k parameters, no downloaded weights).

The sequence is `prompt SEP completion`: the logits at SEP predict the first completion token,
the logits at completion token i predict token i+1. Attention is prefix-LM: prompt positions
see the whole prompt (a sort needs to compare every digit with every other one), completion
positions see the prompt and the completion so far. Sequences are at most a dozen tokens, so
sampling re-runs the full forward at each step instead of keeping a KV cache: simpler, and on
one CPU thread the cost is the same.

Rollouts use `sample` / `greedy` on the bare module; the trainer calls `token_logprobs`, which
only uses `model(tokens)`, so it works unchanged on a `DistributedDataParallel` wrapper.
Weights travel as one flat float32 tensor (`get_flat_state` / `set_flat_state`), the shape a
collective broadcast wants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tasks import ALPHABET, Task
from torch import nn

SEP = ALPHABET  # input-only token; the head predicts the ALPHABET digits alone


@dataclass(frozen=True)
class PolicyConfig:
    prompt_len: int
    completion_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256

    @classmethod
    def for_task(cls, task: Task) -> PolicyConfig:
        return cls(prompt_len=task.prompt_len, completion_len=task.completion_len)


class Block(nn.Module):
    """Pre-norm transformer block (attention + MLP), the standard stable choice."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class Policy(nn.Module):
    """Decoder over `prompt SEP completion[:-1]`; returns digit logits at every position."""

    def __init__(self, cfg: PolicyConfig) -> None:
        super().__init__()
        self.cfg = cfg
        seq = cfg.prompt_len + cfg.completion_len
        self.tok = nn.Embedding(ALPHABET + 1, cfg.d_model)
        self.pos = nn.Embedding(seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, ALPHABET)
        mask = torch.ones(seq, seq).tril().bool()
        mask[: cfg.prompt_len, : cfg.prompt_len] = True  # prefix-LM: the prompt sees itself
        self.register_buffer("mask", mask, persistent=False)  # not part of the synced state
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        x = self.tok(tokens) + self.pos.weight[:t]
        mask = self.mask[:t, :t]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def _decode(
        self, prompts: torch.Tensor, gen: torch.Generator | None, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq = torch.cat([prompts, torch.full_like(prompts[:, :1], SEP)], dim=1)
        picks, logps = [], []
        for _ in range(self.cfg.completion_len):
            logp = F.log_softmax(self(seq)[:, -1] / temperature, dim=-1)
            if gen is None:
                tok = logp.argmax(dim=-1, keepdim=True)
            else:
                tok = torch.multinomial(logp.exp(), 1, generator=gen)
            picks.append(tok)
            logps.append(logp.gather(1, tok))
            seq = torch.cat([seq, tok], dim=1)
        return torch.cat(picks, dim=1), torch.cat(logps, dim=1)

    def sample(
        self, prompts: torch.Tensor, group: int, gen: torch.Generator, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`group` completions per prompt: (completions, old log-probs), both [P*group, C].

        Rows are grouped prompt-major (rows g*group .. g*group+group-1 share prompt g), the
        layout `grpo.advantages` expects.
        """
        return self._decode(prompts.repeat_interleave(group, dim=0), gen, temperature)

    def greedy(self, prompts: torch.Tensor) -> torch.Tensor:
        """Argmax completions, [P, C]: the policy's answer, used for exact-match evaluation."""
        return self._decode(prompts, None, 1.0)[0]


def token_logprobs(
    model: nn.Module, prompts: torch.Tensor, completions: torch.Tensor
) -> torch.Tensor:
    """Log-prob of each completion token under `model`, [B, C], with gradients.

    `model` may be a `Policy` or a DDP wrapper around one: only `model(tokens)` is called,
    so DDP sees the forward and all-reduces the gradients in backward.
    """
    sep = torch.full_like(prompts[:, :1], SEP)
    tokens = torch.cat([prompts, sep, completions[:, :-1]], dim=1)
    logits = model(tokens)[:, prompts.shape[1] :]
    return F.log_softmax(logits, dim=-1).gather(2, completions.unsqueeze(2)).squeeze(2)


def get_flat_state(model: nn.Module) -> torch.Tensor:
    """All weights as one contiguous float32 vector (a copy), for a single broadcast."""
    return torch.cat([t.detach().reshape(-1).float() for t in model.state_dict().values()])


@torch.no_grad()
def set_flat_state(model: nn.Module, flat: torch.Tensor) -> None:
    """Load a vector made by `get_flat_state` on a model of the same config, in place."""
    offset = 0
    for t in model.state_dict().values():
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat state has {flat.numel()} values, model needs {offset}")
