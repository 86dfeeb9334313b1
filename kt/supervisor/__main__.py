"""`python -m kt.supervisor`: a pod's command. Configured by flags and KT_* variables."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from kt.core import cgroup
from kt.core.provider import SUPERVISOR_PORT, get_provider
from kt.core.runtime import new_event_loop
from kt.supervisor.server import Supervisor


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kt.supervisor")
    host = os.environ.get("KT_HOST") or os.environ.get("KT_POD_IP") or "0.0.0.0"
    parser.add_argument("--host", default=host)
    parser.add_argument("--port", type=int, default=int(os.environ.get("KT_PORT", SUPERVISOR_PORT)))
    parser.add_argument("--pod", default=os.environ.get("KT_POD", os.uname().nodename))
    parser.add_argument("--warm", type=int, default=int(os.environ.get("KT_WARM_WORKERS", "2")))
    parser.add_argument("--no-control", action="store_true", help="do not serve control HTTP")
    args = parser.parse_args()
    token = os.environ.get("KT_TOKEN", "")
    token_file = os.environ.get("KT_TOKEN_FILE")
    if not token and token_file:  # on Kubernetes: the pool's Secret, mounted
        token_file = os.environ.get("KT_MOUNT_ROOT", "") + token_file  # see kt.testing.kubelet
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            parser.error(f"KT_TOKEN_FILE={token_file} cannot be read: {exc}")
    if not token:
        parser.error("KT_TOKEN is not set: a supervisor never runs without a token")
    logging.basicConfig(
        level=os.environ.get("KT_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    limit = os.environ.get("KT_CGROUP")
    if limit:  # the pod's memory cgroup (local backend): join it before any worker starts
        try:
            cgroup.join(limit)
        except OSError as exc:
            logging.getLogger("kt.supervisor").warning("memory limit not enforced: %s", exc)
    ttl = os.environ.get("KT_INACTIVITY_TTL")
    driver = os.environ.get("KT_DRIVER_PID")
    supervisor = Supervisor(
        host=args.host,
        port=args.port,
        token=token,
        pod=args.pod,
        control_port=None if args.no_control else args.port + 1,
        warm=args.warm,
        inactivity_ttl=float(ttl) if ttl else None,
        driver_pid=int(driver) if driver else None,
    )
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, supervisor.stop)
    loop.run_until_complete(supervisor.serve())
    backend = os.environ.get("KT_BACKEND")
    if supervisor.idle_exit and backend:  # on Kubernetes: remove its own pod, not just exit
        try:
            provider = get_provider(backend)
            loop.run_until_complete(asyncio.wait_for(provider.delete_own_pod(args.pod), 30))
        except Exception as exc:  # exiting anyway: the pod stays, Succeeded
            logging.getLogger("kt.supervisor").warning("pod %s not deleted: %s", args.pod, exc)
    if limit:  # leave the pod's cgroup for its parent and remove it (its workers are gone)
        try:
            cgroup.join(Path(limit).parent)
            cgroup.remove(Path(limit))
        except OSError as exc:
            logging.getLogger("kt.supervisor").warning("pod cgroup %s not removed: %s", limit, exc)


if __name__ == "__main__":
    main()
