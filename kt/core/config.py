"""Driver-wide settings users may change: `kt.config.default_compute` and friends."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kt.core.compute import Compute


def _machine_sized() -> Compute:
    """The default pool: pods the size of this machine, up to a few of them."""
    return Compute(cpus=os.cpu_count() or 1, min_replicas=0, max_replicas=3)


@dataclass
class Config:
    default_compute: Compute = field(default_factory=_machine_sized)
    placement_timeout: float = 60.0
    stream_logs: bool = True
    idle_timeout: float = 60.0
    sync: bool = field(default_factory=lambda: os.environ.get("KT_SYNC", "1") != "0")
    """Bring the caller's project to the pods (`kt.core.sync`); KT_SYNC=0 turns it off."""
    sync_max_files: int = 200_000
    """A project with more files is refused (raise it, or list what to skip in .ktignore)."""
    sync_max_bytes: int = 5 * 2**30
    """A project larger than this is refused."""
    sync_fanout: int = 4
    """How many pods one pod that holds a version serves at once (`kt.actors.push`)."""
    gateway: str | None = field(default_factory=lambda: os.environ.get("KT_GATEWAY") or None)
    """"host:port" of a kt gateway (kt.k8s.gateway): every connection to a pod goes through
    it, for a driver outside the cluster that cannot reach pod addresses (KT_GATEWAY)."""
    metrics_port: int = field(default_factory=lambda: int(os.environ.get("KT_METRICS_PORT", "0")))
    """When set, the driver serves its scheduler's metrics (pools, pods starting, waiting
    placements) on 127.0.0.1:metrics_port/metrics (KT_METRICS_PORT)."""
    heartbeat_timeout: float = field(
        default_factory=lambda: float(os.environ.get("KT_HEARTBEAT_TIMEOUT", "5"))
    )
    """Seconds a link with calls waiting may hear nothing from its pod (PINGs go every
    second) before its calls fail with PodLostError (KT_HEARTBEAT_TIMEOUT)."""
    dedup_logs: bool = field(default_factory=lambda: os.environ.get("KT_DEDUP_LOGS", "1") != "0")
    """A line many actors print within dedup_logs_window shows once, then once more as
    "... [repeated Nx across cluster]" (`kt.core.logdedup`); KT_DEDUP_LOGS=0 turns it off."""
    dedup_logs_window: float = field(
        default_factory=lambda: float(os.environ.get("KT_DEDUP_LOGS_WINDOW_S", "5"))
    )
    """Seconds repeats of a line are gathered before their summary prints
    (KT_DEDUP_LOGS_WINDOW_S)."""
    dedup_logs_allow: str | None = field(
        default_factory=lambda: os.environ.get("KT_DEDUP_LOGS_ALLOW_REGEX") or None
    )
    """Lines this regex finds are never folded (KT_DEDUP_LOGS_ALLOW_REGEX)."""
    dedup_logs_skip: str | None = field(
        default_factory=lambda: os.environ.get("KT_DEDUP_LOGS_SKIP_REGEX") or None
    )
    """Lines this regex finds are not printed at all (KT_DEDUP_LOGS_SKIP_REGEX)."""
    max_frame_bytes: int = field(
        default_factory=lambda: int(os.environ.get("KT_MAX_FRAME_BYTES", str(2**31)))
    )
    """The longest frame a connection accepts once authenticated (KT_MAX_FRAME_BYTES); a
    longer length prefix closes it without allocating. Before a HELLO is accepted the cap
    is 16 KiB."""
    service_account: str | None = field(
        default_factory=lambda: os.environ.get("KT_SERVICE_ACCOUNT") or None
    )
    """The service account of Kubernetes pools whose Compute names none (KT_SERVICE_ACCOUNT;
    the chart's is "kt-pod"). A pod's own is set in its environment, so pools made inside a
    pod run as it too."""


config = Config()
