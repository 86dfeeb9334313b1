"""Turn kt and Ray benchmark runs into a comparison: medians, speedups, targets, table, plot.

Speedup is "how many times better kt is" (> 1: kt is better), whatever the metric's direction:
``ray / kt`` for lower-is-better metrics (latencies, seconds, MiB), ``kt / ray`` for throughput.

Also a script, run by ``python -m bench`` under kt's venv (matplotlib is in its lock):

    python bench/report.py --plot bench/results/latest.json bench/results/ratios.png

Module level imports only the standard library, so plotting needs nothing from kt; rich and
matplotlib are imported inside the functions that use them.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
Runs = list[dict[str, Any]]


@dataclass(frozen=True)
class Metric:
    key: str  # "row.field"
    label: str
    unit: str
    higher_is_better: bool

    @property
    def row(self) -> str:
        return self.key.split(".", 1)[0]


METRICS: tuple[Metric, ...] = (
    Metric("init.seconds", "init (start + first call)", "s", False),
    Metric("rtt.median_us", "rtt median", "us", False),
    Metric("rtt.p99_us", "rtt p99", "us", False),
    Metric("async_1to1.calls_per_s", "async 1->1", "calls/s", True),
    Metric("fanout.calls_per_s", "fanout 1->4", "calls/s", True),
    Metric("nn.calls_per_s", "n->n 4x4", "calls/s", True),
    Metric("actor_start.median_ms", "actor start", "ms", False),
    Metric("place100.seconds", "place 100 actors", "s", False),
    Metric("arg10m_oneway.median_ms", "10 MiB arg one-way", "ms", False),
    Metric("arg10m_rt.median_ms", "10 MiB arg round trip", "ms", False),
    Metric("arg100m_oneway.median_ms", "100 MiB arg one-way", "ms", False),
    Metric("arg100m_rt.median_ms", "100 MiB arg round trip", "ms", False),
    Metric("reload.edit_ms", "edit -> .to() -> new result", "ms", False),
    Metric("reload.unchanged_ms", ".to() with nothing changed", "ms", False),
    Metric("sync16.driver_copies", "sync to 16 pods: copies from driver", "x", False),
    Metric("sync16.seconds", "sync to 16 pods: .to() until all ran", "s", False),
    Metric("k8s.pool4_s", "k8s test cluster: 4-pod pool .to() -> first calls", "s", False),
    Metric("k8s.rtt_ratio", "k8s test cluster: rtt / local rtt", "x", False),
    Metric("k8s.gateway_added_us", "k8s: rtt through the gateway - direct", "us", False),
    Metric("soak.calls_per_s", "soak: 1M calls, 4 callers -> 100 actors", "calls/s", True),
    Metric("soak.lost_or_wrong", "soak: results lost, duplicated or crossed", "calls", False),
    Metric("soak.extra_executions", "soak: executions - calls", "calls", False),
    Metric("soak.driver_growth_pct", "soak: driver RSS growth 200k -> 1M", "%", False),
    Metric("soak.supervisor_growth_pct", "soak: supervisor RSS growth 200k -> 1M", "%", False),
    Metric("actors1000.create_ms_per_actor", "1000 light actors: create + call", "ms/actor", False),
    Metric("actors1000.uss_mib_per_actor", "1000 light actors: memory (USS)", "MiB/actor", False),
    Metric("actors1000.supervisor_kib_per_actor", "1000 actors: supervisor", "KiB/actor", False),
    Metric("actors1000.kill_all_s", "1000 light actors: kill all", "s", False),
    Metric("data100.median_ms", "100 MiB put, got by 8 actors", "ms", False),
    Metric("bcast1g.median_s", "1 GiB put, got on 16 local pods", "s", False),
    Metric("sd_into.median_ms", "384 MiB state dict put, into= in an actor", "ms", False),
    Metric("tree.one_hop_s", "256 MiB to 1 pod apart (no shared memory)", "s", False),
    Metric("tree.eight_pods_s", "256 MiB to 8 pods apart, broadcast tree", "s", False),
    Metric("tree.source_copies", "256 MiB to 8 pods apart: copies the source sent", "x", False),
    Metric("cuda_into.shared_direct_get_s", "1 GiB CUDA into=, one GPU: IPC", "s", False),
    Metric("cuda_into.shared_store_get_s", "1 GiB CUDA into=, one GPU: host copy", "s", False),
    Metric("cuda_into.shared_direct_put_s", "1 GiB CUDA put (kept on the GPU too)", "s", False),
    Metric("cuda_into.shared_store_put_s", "1 GiB CUDA put (host copy only)", "s", False),
    Metric("cuda_into.apart_direct_get_s", "1 GiB CUDA into=, two GPUs: NCCL", "s", False),
    Metric("cuda_into.apart_store_get_s", "1 GiB CUDA into=, two GPUs: host copy", "s", False),
    Metric("cuda_bcast.nccl_s", "1 GiB CUDA broadcast, NCCL (two GPUs)", "s", False),
    Metric("cuda_bcast.gloo_s", "1 GiB CUDA broadcast, gloo (CPU path)", "s", False),
    Metric("memory.total_mib", "memory (runtime+driver)", "MiB", False),
    Metric("memory.runtime_mib", "memory runtime", "MiB", False),
    Metric("memory.driver_mib", "memory driver", "MiB", False),
    # The anchor of this row is torchrun, not Ray: a torchrun relaunch of the same step.
    Metric("spmd.second_call_ms", "SPMD 2x2 2nd call (vs torchrun relaunch)", "ms", False),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}

# Speedup kt must reach over Ray, per metric.
SPEEDUP_TARGETS: dict[str, float] = {
    "rtt.median_us": 4.0,
    "fanout.calls_per_s": 10.0,
    "actor_start.median_ms": 10.0,
    "arg10m_oneway.median_ms": 3.0,
    "memory.total_mib": 3.0,
    "spmd.second_call_ms": 100.0,
    "data100.median_ms": 1.0,  # faster than Ray (issue 16)
    "bcast1g.median_s": 1.0,
    "sd_into.median_ms": 1.0,
}
# Absolute bounds for kt alone: (op, bound), op "<=" or ">=".
ABSOLUTE_TARGETS: dict[str, tuple[str, float]] = {
    "rtt.median_us": ("<=", 150.0),
    "fanout.calls_per_s": (">=", 25_000.0),
    "actor_start.median_ms": ("<=", 50.0),
    "arg10m_oneway.median_ms": ("<=", 6.0),
    "spmd.second_call_ms": ("<=", 100.0),
    "reload.edit_ms": ("<=", 1000.0),
    "reload.unchanged_ms": ("<=", 50.0),
    "sync16.driver_copies": ("<=", 1.0),
    "k8s.rtt_ratio": ("<=", 1.2),  # the same hot path as the local backend
    "k8s.gateway_added_us": ("<=", 100.0),
    "soak.lost_or_wrong": ("<=", 0.0),
    "tree.source_copies": ("<=", 3.0),
    "soak.extra_executions": ("<=", 0.0),
    "soak.driver_growth_pct": ("<=", 5.0),
    "soak.supervisor_growth_pct": ("<=", 5.0),
}


def metric_value(run: dict[str, Any], key: str) -> float | None:
    """One metric out of one side's JSON; ``memory.total_mib`` is runtime + driver."""
    row, field = key.split(".", 1)
    res = run.get(row)
    if not isinstance(res, dict):
        return None
    if key == "memory.total_mib":
        try:
            return float(res["runtime_mib"]) + float(res["driver_mib"])
        except (KeyError, TypeError, ValueError):
            return None
    value = res.get(field)
    return float(value) if isinstance(value, int | float) else None


def medians(runs: Runs) -> dict[str, float]:
    """Median of each metric over the runs that have it."""
    out: dict[str, float] = {}
    for m in METRICS:
        values = [v for run in runs if (v := metric_value(run, m.key)) is not None]
        if values:
            out[m.key] = statistics.median(values)
    return out


def speedup(key: str, kt: float | None, ray: float | None) -> float | None:
    """How many times better kt is than Ray on ``key`` (> 1: kt better)."""
    if kt is None or ray is None or kt <= 0 or ray <= 0:
        return None
    return kt / ray if METRIC_BY_KEY[key].higher_is_better else ray / kt


def absolute_ok(key: str, kt: float | None) -> bool | None:
    target = ABSOLUTE_TARGETS.get(key)
    if target is None or kt is None:
        return None
    op, bound = target
    return kt <= bound if op == "<=" else kt >= bound


def compare(kt_runs: Runs, ray_runs: Runs) -> dict[str, Any]:
    """Medians, speedups and target checks for every metric that either side measured."""
    kt_med, ray_med = medians(kt_runs), medians(ray_runs)
    rows: list[dict[str, Any]] = []
    for m in METRICS:
        k, r = kt_med.get(m.key), ray_med.get(m.key)
        if k is None and r is None:
            continue
        s = speedup(m.key, k, r)
        need = SPEEDUP_TARGETS.get(m.key)
        absolute = ABSOLUTE_TARGETS.get(m.key)
        rows.append(
            {
                "metric": m.key,
                "label": m.label,
                "unit": m.unit,
                "higher_is_better": m.higher_is_better,
                "kt": k,
                "ray": r,
                "speedup": s,
                "speedup_target": need,
                "speedup_ok": None if need is None or s is None else s >= need,
                "absolute_target": None if absolute is None else f"{absolute[0]} {absolute[1]:g}",
                "absolute_ok": absolute_ok(m.key, k),
            }
        )
    return {"rows": rows, "kt_medians": kt_med, "ray_medians": ray_med}


def errors_of(runs: Runs) -> list[str]:
    """``row: message`` for every row a run reported as failed (its ``_errors`` key)."""
    out: list[str] = []
    for i, run in enumerate(runs):
        for row, msg in (run.get("_errors") or {}).items():
            out.append(f"rep {i}: {row}: {msg}")
    return out


def machine_info(ray_python: str | None = None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ray_python": ray_python,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "calls/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else ("[green]yes[/]" if ok else "[red]NO[/]")


def print_table(comparison: dict[str, Any], title: str = "kt vs Ray") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("unit")
    table.add_column("kt", justify="right")
    table.add_column("ray", justify="right")
    table.add_column("speedup", justify="right")
    table.add_column("need", justify="right")
    table.add_column("ok", justify="center")
    table.add_column("kt abs. target", justify="right")
    table.add_column("ok", justify="center")
    for r in comparison["rows"]:
        s = r["speedup"]
        need = r["speedup_target"]
        table.add_row(
            r["label"],
            r["unit"],
            _fmt(r["kt"], r["unit"]),
            _fmt(r["ray"], r["unit"]),
            "-" if s is None else f"{s:.2f}x",
            "" if need is None else f"{need:g}x",
            _mark(r["speedup_ok"]),
            r["absolute_target"] or "",
            _mark(r["absolute_ok"]),
        )
    console = Console(width=None if sys.stdout.isatty() else 132)  # no squeezing into 80 columns
    console.print(table)
    console.print("speedup = how many times better kt is than Ray (> 1: kt better)")


def build(
    kt_runs: Runs,
    ray_runs: Runs,
    *,
    out_dir: Path = RESULTS_DIR,
    ray_python: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare, print the table and any row errors, write ``latest.json``; return its content."""
    comparison = compare(kt_runs, ray_runs)
    report = {
        "machine": machine_info(ray_python),
        "speedup_definition": "ray/kt for lower-is-better metrics, kt/ray for throughput; "
        "> 1 means kt is better",
        "speedup_targets": SPEEDUP_TARGETS,
        "absolute_targets": {k: f"{op} {v:g}" for k, (op, v) in ABSOLUTE_TARGETS.items()},
        "comparison": comparison["rows"],
        "medians": {"kt": comparison["kt_medians"], "ray": comparison["ray_medians"]},
        "runs": {"kt": kt_runs, "ray": ray_runs},
        "errors": {"kt": errors_of(kt_runs), "ray": errors_of(ray_runs)},
        **(extra or {}),
    }
    print_table(comparison, title=f"kt vs Ray ({len(kt_runs)} kt / {len(ray_runs)} ray runs)")
    for side in ("kt", "ray"):
        for line in report["errors"][side]:
            print(f"[bench] {side} failed: {line}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def plot(report_path: Path, png_path: Path) -> None:
    """Bar chart of the speedups (log scale), a line at 1x and a marker at each target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.loads(report_path.read_text())
    rows = [r for r in report["comparison"] if r.get("speedup")]
    if not rows:
        print(f"[report] no speedups in {report_path}: nothing to plot", file=sys.stderr)
        return
    labels = [r["label"] for r in rows]
    values = [r["speedup"] for r in rows]
    colors = []
    for r in rows:
        if r.get("speedup_ok") is False:
            colors.append("tab:red")
        elif r["speedup"] >= 1:
            colors.append("tab:green")
        else:
            colors.append("tab:orange")
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.6))
    y = list(range(len(rows)))
    ax.barh(y, values, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    targets = [(i, r["speedup_target"]) for i, r in enumerate(rows) if r.get("speedup_target")]
    if targets:
        ax.scatter(
            [t for _, t in targets],
            [i for i, _ in targets],
            marker="|",
            s=400,
            color="black",
            linewidths=2.5,
            zorder=3,
            label="target",
        )
        ax.legend(loc="lower right")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2g}x", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of kt over Ray (log scale; > 1: kt better)")
    machine = report.get("machine", {})
    ax.set_title(
        f"kt vs Ray {machine.get('date', '')} ({machine.get('cpu_count', '?')} cpus, "
        f"python {machine.get('python', '?')})",
        fontsize=10,
    )
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=120)
    print(f"[report] wrote {png_path}", file=sys.stderr)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "--plot":
        plot(Path(argv[1]), Path(argv[2]))
        return 0
    if len(argv) == 1 and argv[0] != "--plot":  # re-print the table of a saved report
        report = json.loads(Path(argv[0]).read_text())
        print_table({"rows": report["comparison"]})
        return 0
    print("usage: report.py --plot REPORT.json OUT.png | report.py REPORT.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
