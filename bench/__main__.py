"""kt vs Ray benchmark: ``python -m bench [--reps N] [--rows ROW...] [--no-ray]``.

Each repetition runs ``bench/kt_side.py`` (this interpreter) and ``bench/ray_side.py`` (the
Ray venv's, made on first use by ``bench.ray_venv``) as fresh subprocesses, alternating which
goes first; then ``bench.report`` prints the medians and speedups, writes
``bench/results/latest.json`` and renders ``bench/results/ratios.png`` with matplotlib from
kt's locked venv. ``place100`` (about 40 s on Ray), ``sync16``, ``soak`` (1M calls) and
``actors1000`` run in the first repetition only. The GPU rows (``cuda_into``, ``cuda_bcast``:
``bench/gpu_rows.py``) run only when named, on a GPU machine (``tools/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.ray_venv import ensure_ray_python

BENCH_DIR = Path(__file__).resolve().parent
ROWS = (
    "init",
    "memory",
    "rtt",
    "async_1to1",
    "fanout",
    "nn",
    "actor_start",
    "place100",
    "arg10m_oneway",
    "arg10m_rt",
    "arg100m_oneway",
    "arg100m_rt",
    "reload",
    "sync16",
    "k8s",
    "soak",
    "actors1000",
    "data100",
    "bcast1g",
    "sd_into",
    "tree",
)
ONCE = ("place100", "sync16", "soak", "actors1000")  # slow: first repetition only
GPU_ROWS = ("cuda_into", "cuda_bcast")  # on a GPU machine, asked for by name (bench/gpu_rows.py)
# No Ray counterpart: an absolute target only.
KT_ONLY = ("reload", "sync16", "k8s", "soak", "actors1000", "tree", *GPU_ROWS)
SPMD = "spmd"  # kt's SPMD group against torchrun (bench/spmd_side.py), once per run
TIMEOUT_S = {"kt": 600.0, "ray": 900.0, "spmd": 300.0}


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_side(side: str, python: str, rows: list[str]) -> dict[str, Any]:
    """Run one side's script in a fresh process; its JSON, or ``{"_errors": ...}``."""
    script = BENCH_DIR / f"{side}_side.py"
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as home:
        if side in ("kt", "spmd"):
            env["KT_HOME"] = home  # no state left in ~/.kt
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [python, str(script), *rows],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                timeout=TIMEOUT_S[side],
                check=False,
            )
        except subprocess.TimeoutExpired:
            _log(f"{side}: timed out after {TIMEOUT_S[side]:.0f} s")
            return {"_errors": {"_process": f"timed out after {TIMEOUT_S[side]:.0f} s"}}
        _log(f"{side}: {time.perf_counter() - t0:.1f} s, exit code {proc.returncode}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    try:
        result = json.loads(lines[-1])
        assert isinstance(result, dict)
    except (IndexError, ValueError, AssertionError):
        tail = "\n".join(lines[-5:])
        return {"_errors": {"_process": f"exit code {proc.returncode}, no JSON: {tail!r}"}}
    if proc.returncode != 0:
        result.setdefault("_errors", {})["_process"] = f"exit code {proc.returncode}"
    return result


def run_spmd() -> dict[str, Any]:
    """kt's 2x2 group second call, and torchrun's relaunch of the same step (as the anchor)."""
    _log("spmd: kt group second call vs torchrun relaunch")
    result = run_side("spmd", sys.executable, [])
    if "spmd_second_call" not in result:
        return {"_errors": result.get("_errors", {"spmd": "no result"})}
    return {
        "kt": {"second_call_ms": result["spmd_second_call"]["median_ms"]},
        "torchrun": {"second_call_ms": 1000.0 * result["torchrun_relaunch"]["seconds"]},
    }


def render_plot(latest: Path, png: Path) -> None:
    cmd = [sys.executable, str(BENCH_DIR / "report.py"), "--plot", str(latest), str(png)]
    if subprocess.run(cmd, check=False).returncode != 0:
        _log("plotting failed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--reps", type=int, default=3, help="repetitions per side (default 3)")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=(*ROWS, SPMD, *GPU_ROWS),
        default=[*ROWS, SPMD],
        metavar="ROW",
    )
    parser.add_argument("--no-ray", action="store_true", help="run the kt side only")
    args = parser.parse_args(argv)

    ray_python = None if args.no_ray else ensure_ray_python()
    kt_runs: list[dict[str, Any]] = []
    ray_runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if SPMD in args.rows:
        spmd = run_spmd()
        kt_runs.append({"spmd": spmd.get("kt", {}), "_errors": spmd.get("_errors", {})})
        ray_runs.append({"spmd": spmd.get("torchrun", {})})
    for rep in range(args.reps):
        rows = [r for r in args.rows if r != SPMD and (rep == 0 or r not in ONCE)]
        sides = ["kt", "ray"] if rep % 2 == 0 else ["ray", "kt"]
        for side in sides:
            if side == "ray" and ray_python is None:
                continue
            _log(f"rep {rep + 1}/{args.reps}: {side} {' '.join(rows)}")  # ray skips KT_ONLY
            python = sys.executable if side == "kt" else str(ray_python)
            wanted = rows if side == "kt" else [r for r in rows if r not in KT_ONLY]
            if wanted:
                (kt_runs if side == "kt" else ray_runs).append(run_side(side, python, wanted))
    _log(f"all runs: {time.perf_counter() - t0:.0f} s")

    report.build(
        kt_runs,
        ray_runs,
        ray_python=None if ray_python is None else str(ray_python),
        extra={
            "reps": args.reps,
            "rows": args.rows,
            "run_seconds": round(time.perf_counter() - t0, 1),
        },
    )
    latest = report.RESULTS_DIR / "latest.json"
    _log(f"wrote {latest}")
    if ray_python is not None:
        render_plot(latest, report.RESULTS_DIR / "ratios.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
