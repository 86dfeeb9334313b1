"""A random sample of a cosmic-ray session, and its score.

``python tools/mutate_sample.py sample SESSION N [SEED]`` keeps N pending mutants, chosen
at random (seeded), and marks the others skipped, so that ``cosmic-ray exec`` runs only
the sample: the whole default scope is thousands of mutants, each surviving one paying for
the whole test command. ``python tools/mutate_sample.py score SESSION`` prints the share
of run mutants that a test killed (a mutant that breaks the import or times out counts as
killed, as cosmic-ray counts it), skipped ones left out, with a 95 % interval.

Run with the cosmic-ray venv's interpreter (`make mutate` does).
"""

from __future__ import annotations

import math
import random
import sys

from cosmic_ray.work_db import WorkDB, use_db
from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

SKIPPED = WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not in the sample")


def sample(session: str, n: int, seed: int) -> None:
    with use_db(session, WorkDB.Mode.open) as db:
        pending = sorted(db.pending_work_items, key=lambda item: item.job_id)
        keep = {item.job_id for item in random.Random(seed).sample(pending, min(n, len(pending)))}
        db.set_multiple_results(
            [item.job_id for item in pending if item.job_id not in keep], SKIPPED
        )
        print(f"sample: {len(keep)} of {len(pending)} pending mutants (seed {seed})")


def score(session: str) -> None:
    killed = survived = 0
    with use_db(session, WorkDB.Mode.open) as db:
        for _, result in db.results:
            if result.worker_outcome is WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome is TestOutcome.SURVIVED:
                survived += 1
            else:
                killed += 1
        left = db.num_work_items - db.num_results
    run = killed + survived
    if not run:
        print("no mutant run yet")
        return
    p = killed / run
    half = 1.96 * math.sqrt(p * (1 - p) / run)
    print(
        f"killed {killed} of {run} mutants run: {100 * p:.1f} % "
        f"(95 % interval {100 * max(0, p - half):.0f}-{100 * min(1, p + half):.0f} %); "
        f"{left} still pending"
    )


if __name__ == "__main__":
    if sys.argv[1] == "sample":
        sample(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
    else:
        score(sys.argv[2])
