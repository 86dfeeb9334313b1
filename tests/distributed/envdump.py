"""Prints what a launcher added to this process's environment (no torch import).

    BASE_ENV_JSON='{...}' torchrun ... envdump.py OUTDIR

The launcher's own environment travels in BASE_ENV_JSON; each rank writes
OUTDIR/rank<RANK>.json with every variable that is new or changed (a file per rank, as
ranks writing to one pipe can interleave). `added()` is the same diff inside a kt rank.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys


def added(base: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if base.get(k) != v and k != "BASE_ENV_JSON"}


if __name__ == "__main__":
    diff = added(json.loads(os.environ["BASE_ENV_JSON"]))
    (pathlib.Path(sys.argv[1]) / f"rank{os.environ['RANK']}.json").write_text(json.dumps(diff))
