"""Train a tiny transformer with GRPO on kt: `make demo` runs this on the local backend.

    python examples/rl_grpo/train.py --task sort --steps 600 --rollouts 2 --seed 0

Prints a progress bar with mean reward and greedy exact-match on fresh prompts, writes
a PNG of both curves, and ends with the wall time split into rollout, reward, train and
sync, and what of it kt added. The backend comes from KT_BACKEND (or a kubeconfig), so
the same script runs on a cluster.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from local_loop import Hyper
from pipeline import RunConfig, run_pipeline, teardown
from plot import write_curves
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def parse(argv: list[str] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="sort", choices=["sort", "reverse"])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--group", type=int, default=Hyper.group, help="completions per prompt")
    ap.add_argument("--prompts", type=int, default=Hyper.prompts, help="prompts per step")
    ap.add_argument("--rollouts", type=int, default=2, help="rollout actors")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=Hyper.lr)
    ap.add_argument("--no-overlap", action="store_true", help="no rollout/train overlap")
    ap.add_argument(
        "--weight-sync",
        default="collective",
        choices=["collective", "store"],
        help="broadcast in a collective group, or kt.put / kt.get(into=) via the data store",
    )
    ap.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where the policies run"
    )
    ap.add_argument("--stop-at", type=float, default=None, help="stop at this exact-match")
    ap.add_argument("--min-exact", type=float, default=None, help="exit 1 below this")
    ap.add_argument("--max-overhead", type=float, default=None, help="exit 1 above this")
    ap.add_argument("--plot", default=str(Path(__file__).parent / "out" / "grpo_curves.png"))
    a = ap.parse_args(argv)
    hp = dataclasses.replace(Hyper(), prompts=a.prompts, group=a.group, lr=a.lr)
    cfg = RunConfig(
        task=a.task,
        steps=a.steps,
        seed=a.seed,
        rollouts=a.rollouts,
        overlap=not a.no_overlap,
        hp=hp,
        stop_at_exact=a.stop_at,
        weight_sync=a.weight_sync,
        device=a.device,
    )
    return cfg, a


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse(argv)
    start = time.perf_counter()
    bar = Progress(
        TextColumn("[bold]GRPO {task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]:.3f}  exact-match {task.fields[exact]:.3f}"),
        TimeElapsedColumn(),
    )
    with bar:
        job = bar.add_task("train", total=cfg.steps, name=cfg.task, reward=0.0, exact=0.0)

        def progress(step: int, reward: float, exact: float | None) -> None:
            fields = {"reward": reward} if exact is None else {"reward": reward, "exact": exact}
            bar.update(job, completed=step, **fields)

        run = run_pipeline(cfg, progress)
    history = run.history
    final = history.evals[-1][1]
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    write_curves(args.plot, history.step, history.reward, [(s, e) for s, e, _ in history.evals])
    print(f"plot: {args.plot}")
    print(
        f"{cfg.task}: {history.step[-1]} steps, greedy exact-match on fresh prompts {final:.3f}, "
        f"total {time.perf_counter() - start:.0f}s including pod start"
    )
    print(run.split_line())
    teardown(run)
    failed = []
    if args.min_exact is not None and final < args.min_exact:
        failed.append(f"exact-match {final:.3f} < {args.min_exact}")
    overhead = run.overhead_fraction
    if args.max_overhead is not None and overhead > args.max_overhead:
        failed.append(f"kt overhead {overhead:.1%} > {args.max_overhead:.0%}")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
