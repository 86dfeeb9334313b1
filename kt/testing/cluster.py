"""`python -m kt.testing.cluster --kubeconfig PATH`: a Kubernetes test cluster on this machine.

What kind gives a laptop, without containers: the API server (`apiserver.py`), a
scheduler (`scheduler.py`) and a process kubelet (`kubelet.py`) with `--nodes` nodes of
`--cpus-per-node` cpus each. The scheduler and the kubelet are clients of the API server
only, through its REST API. Runs in the foreground: once it serves, it writes a
kubeconfig (server URL, CA, bearer token) to PATH and prints "ready"; SIGINT or SIGTERM
stops everything it started (every pod's processes first), and removes PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import orjson

from kt.testing import apiserver
from kt.testing.kubelet import Kubelet, NodeShape
from kt.testing.scheduler import Scheduler


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


STALL_S = 2.0  # the loop not turning for this long is reported, with where it is


def _watch_the_loop(loop: asyncio.AbstractEventLoop) -> None:
    """A thread that prints the loop thread's stack whenever the loop has not turned for
    STALL_S: everything here (API server, scheduler, kubelet) shares one loop, so work
    that blocks it stops the whole cluster, and its log should say where."""
    turned = [time.monotonic()]
    main = threading.get_ident()

    def tick() -> None:
        turned[0] = time.monotonic()
        loop.call_later(STALL_S / 4, tick)

    def watch() -> None:
        said = 0.0
        while not loop.is_closed():
            time.sleep(STALL_S / 2)
            late = time.monotonic() - turned[0]
            if late > STALL_S and turned[0] != said:
                said = turned[0]
                frame = sys._current_frames().get(main)
                where = "".join(traceback.format_stack(frame)) if frame else "(no stack)\n"
                print(
                    f"the cluster's loop has not turned for {late:.1f} s, at:\n{where}",
                    end="",
                    flush=True,
                )

    loop.call_soon(tick)
    threading.Thread(target=watch, name="stall-watch", daemon=True).start()


async def run(args: argparse.Namespace) -> None:
    _watch_the_loop(asyncio.get_running_loop())
    host = "127.0.0.1"
    port = args.port or _free_port(host)
    token = secrets.token_urlsafe(24)
    tls = apiserver.make_tls((host, "localhost"))
    url = f"https://{host}:{port}"
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kt-cluster-"))
    runner, _ = await apiserver.serve(host, port, token, tls)
    shape = NodeShape(cpus=args.cpus_per_node, memory=args.memory_per_node, gpus=args.gpus_per_node)
    kubelet = Kubelet(
        url,
        token,
        tls.ca_pem,
        workdir=workdir,
        nodes=args.nodes,
        shape=shape,
        python_bin=os.path.dirname(sys.executable),
        images=dict(item.split("=", 1) for item in args.image_python),
    )
    scheduler = Scheduler(url, token, tls.ca_pem)
    tasks = [asyncio.ensure_future(kubelet.run()), asyncio.ensure_future(scheduler.run())]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    kubeconfig = Path(args.kubeconfig)
    try:
        await _until_nodes(kubelet, args.nodes)
        partial = kubeconfig.with_name(kubeconfig.name + ".partial")
        partial.write_bytes(orjson.dumps(apiserver.kubeconfig(url, token, tls.ca_pem)))
        partial.chmod(0o600)
        partial.rename(kubeconfig)  # whole, or not there: readers poll for the file
        print(f"ready: {url}, kubeconfig {kubeconfig}", flush=True)
        ended = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([ended, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not ended:
                task.result()  # a part of the cluster failed: say so
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await kubelet.stop()
        await runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            kubeconfig.unlink()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


async def _until_nodes(kubelet: Kubelet, nodes: int) -> None:
    """Until the kubelet has registered its nodes (the scheduler can bind pods)."""
    for _ in range(200):
        if kubelet.api is not None and len(kubelet.registered) >= nodes:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the kubelet did not register its nodes within 10 s")


@contextlib.contextmanager
def running(
    nodes: int = 4,
    cpus_per_node: float = 4,
    *,
    gpus_per_node: int = 0,
    images: dict[str, str] | None = None,
    limit: float = 60,
) -> Iterator[Path]:
    """This program in a subprocess, for tests and benchmarks: yields its kubeconfig's
    path once it serves; stops it (and every pod's processes) on the way out.

    Raises:
        RuntimeError: it did not serve within `limit` seconds (with its output).
    """
    root = Path(tempfile.mkdtemp(prefix="kt-cluster-run-"))
    kubeconfig = root / "kubeconfig"
    argv = [sys.executable, "-m", "kt.testing.cluster", "--kubeconfig", str(kubeconfig)]
    argv += ["--nodes", str(nodes), "--cpus-per-node", f"{cpus_per_node:g}"]
    argv += ["--gpus-per-node", str(gpus_per_node)]
    argv += ["--workdir", str(root / "work")]
    for image, python in (images or {}).items():
        argv += ["--image-python", f"{image}={python}"]
    with open(root / "cluster.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + limit
            while not kubeconfig.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the test cluster did not start: {(root / 'cluster.log').read_text()}"
                    )
                time.sleep(0.05)
            yield kubeconfig
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def gateway(kubeconfig: Path, log: Path, *options: str, limit: float = 30) -> Iterator[str]:
    """`python -m kt.k8s.gateway` for a cluster, on a free loopback port, its output in
    `log`: yields its "host:port" once it accepts connections; stops it on the way out.

    Raises:
        RuntimeError: it did not accept connections within `limit` seconds.
    """
    port = _free_port("127.0.0.1")
    argv = [sys.executable, "-m", "kt.k8s.gateway", "--host", "127.0.0.1", "--port", str(port)]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*argv, *options], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + limit
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the gateway did not start: {log.read_text()}") from None
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m kt.testing.cluster", description=__doc__)
    parser.add_argument("--kubeconfig", required=True, help="where to write the kubeconfig")
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--cpus-per-node", type=float, default=4)
    parser.add_argument("--memory-per-node", default="8Gi")
    parser.add_argument(
        "--gpus-per-node", type=int, default=0, help="nvidia.com/gpu each node advertises"
    )
    parser.add_argument("--port", type=int, default=0, help="API server port (default: free)")
    parser.add_argument("--workdir", help="pods' directories (default: a temporary one)")
    parser.add_argument(
        "--image-python",
        action="append",
        default=[],
        metavar="IMAGE=PYTHON",
        help="pods of IMAGE run this interpreter (default: the cluster's own, with kt)",
    )
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
