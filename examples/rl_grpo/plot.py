"""The training plot: mean reward per step above, greedy exact-match on held-out prompts below.

matplotlib (the `examples` extra of the lock), Agg backend, so it runs with no screen.
"""

from __future__ import annotations

from collections.abc import Sequence


def write_curves(
    path: str,
    steps: Sequence[int],
    rewards: Sequence[float],
    evals: Sequence[tuple[int, float]],
    reward_max: float = 2.0,
) -> None:
    """Write a PNG with two panels that share the step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(steps, rewards, color="tab:red", linewidth=1.2, label="mean reward per step")
    top.set_ylim(0, reward_max)
    top.set_ylabel("reward")
    top.set_title("GRPO on kt: training reward and held-out exact match")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    eval_steps, exact = [s for s, _ in evals], [e for _, e in evals]
    label = "greedy exact-match, held-out prompts"
    bottom.plot(eval_steps, exact, color="tab:blue", marker="o", markersize=3, label=label)
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("training step")
    bottom.set_ylabel("exact match")
    bottom.legend(loc="lower right")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
