"""The `kt` command against a live local pool: list, status, logs (and --tail), teardown,
version;
`kt config` says which backend and connections it would use, and why."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil

import kt
from kt.actors.driver import get_driver
from kt.local.provider import kt_home


class Talker:
    def talk(self, text: str) -> str:
        print(text)
        return text


def _kt(*args: str, code: int = 0, columns: int = 200) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "kt.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COLUMNS=str(columns)),
    )
    assert out.returncode == code, out.stdout + out.stderr
    return out.stdout


def test_kt_config_says_what_it_chose_and_why(tmp_path: object) -> None:
    env = dict(os.environ, COLUMNS="200", KUBECONFIG=f"{tmp_path}/none", KT_GATEWAY="gw:7180")
    env.pop("KT_BACKEND", None)
    env.pop("KUBERNETES_SERVICE_HOST", None)
    out = subprocess.run(
        [sys.executable, "-m", "kt.cli", "config"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "local" in out.stdout and f"no kubeconfig at {tmp_path}/none" in out.stdout
    assert "through the gateway gw:7180" in out.stdout


def test_cli_sees_and_tears_down_a_pool() -> None:
    compute = kt.Compute(cpus=1, replicas=1, backend="local")
    t = kt.cls(Talker).options(compute=compute).remote()
    assert t.talk("written to the pod log") == "written to the pod log"
    pool = get_driver().pool_name(compute, False)
    assert pool in _kt("list")
    status = _kt("status", pool)
    assert "Talker" in status and "alive" in status
    (pod,) = get_driver().pools[pool].slots
    assert pod.pod.name in _kt("status", pool, columns=60)  # never cut short
    assert "written to the pod log" in _kt("logs", pool)
    for i in range(5):
        t.talk(f"numbered line {i}")
    deadline = time.monotonic() + 10
    while "numbered line 4" not in _kt("logs", pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    tail = _kt("logs", pool, "--tail", "2")
    assert "numbered line 4" in tail and "numbered line 3" in tail, tail
    assert "numbered line 2" not in tail and "written to the pod log" not in tail, tail
    pod_file = kt_home() / "local" / pool / f"{pod.pod.name}.json"
    supervisor = psutil.Process(json.loads(pod_file.read_text())["pid"])
    group = [supervisor, *supervisor.children(recursive=True)]  # zygote, workers
    assert len(group) >= 3
    assert "deleted 1 pod(s)" in _kt("teardown", pool)
    _, alive = psutil.wait_procs(group, timeout=10)
    assert not alive, f"still running after teardown: {alive}"
    assert pool not in _kt("list")
    assert "no pool named" in _kt("teardown", pool, code=1)
    assert _kt("version").startswith("kt ")


ORPHAN = r"""
import os, signal, sys, kt
class Talker:
    def talk(self, text):
        return text
compute = kt.Compute(cpus=1, replicas=1, backend="local", name=sys.argv[1])
print(kt.cls(Talker).options(compute=compute).remote().talk("up"), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no teardown: the pod follows its driver, records stay
"""


def test_a_pool_whose_pods_are_all_gone_is_shown_so_and_torn_down(tmp_path: object) -> None:
    import pathlib
    import uuid

    pool = f"orphan-{uuid.uuid4().hex[:6]}"
    script = pathlib.Path(str(tmp_path)) / "orphan.py"
    script.write_text(ORPHAN)
    done = subprocess.run(
        [sys.executable, str(script), pool], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == -9 and done.stdout.strip() == "up", done.stderr

    def row() -> str:
        return next((line for line in _kt("list").splitlines() if pool in line), "")

    deadline = time.monotonic() + 60
    while "gone: no pod runs" not in row() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "gone: no pod runs" in row(), _kt("list")
    assert "deleted 1 pod(s)" in _kt("teardown", pool)
    assert pool not in _kt("list")
