"""The pool's token stays secret, and a local supervisor listens only where it must.

Behaviours covered:
- after calls that succeed, raise, and fail to pickle, the token is in none of: the
  exceptions' messages and tracebacks, `kt status` and `kt logs` output, the pod's log
  file, the driver's log records;
- a local supervisor's listening sockets are on the pod's own loopback address, never
  0.0.0.0 or ::; its control port answers /healthz without the token and /status only
  with it (401 without).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import traceback
import urllib.error
import urllib.request
import uuid

import psutil
import pytest

import kt
from kt.actors.driver import get_driver
from kt.local.provider import kt_home

pytestmark = pytest.mark.timeout(120)


class Talker:
    def say(self, text: str) -> str:
        print(f"said {text}", flush=True)
        return text

    def fail(self) -> None:
        raise ValueError(f"failed with env {sorted(os.environ)}")

    def lock(self) -> threading.Lock:
        return threading.Lock()


def _cli(*args: str) -> str:
    env = dict(os.environ, COLUMNS="300")
    out = subprocess.run(
        [sys.executable, "-m", "kt.cli", *args], capture_output=True, text=True, env=env
    )
    return out.stdout + out.stderr


def test_the_token_appears_nowhere_a_user_or_operator_looks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    compute = kt.Compute(
        cpus=1, replicas=1, backend="local", name=f"secrets-{uuid.uuid4().hex[:6]}"
    )
    talker = kt.cls(Talker).options(compute=compute).remote()
    assert talker.say("hello") == "hello"
    seen: list[str] = []
    for call in (talker.fail, talker.lock):
        try:
            call()
        except Exception as exc:
            seen.append(str(exc))
            seen.append("".join(traceback.format_exception(exc)))
    driver = get_driver()
    name = driver.pool_name(compute, False)
    token = driver.pools[name].token
    assert len(token) >= 16
    seen += [_cli("status", name), _cli("logs", name), caplog.text]
    seen += [p.read_text() for p in (kt_home() / "local" / name).glob("*.log")]
    assert "said hello" in seen[-1]  # the pod's log is one of them
    for text in seen:
        assert token not in text
    driver.runtime.run(driver.pools[name].teardown(), timeout=60)


def test_a_local_supervisor_listens_on_its_own_address_and_guards_its_status(
    pool: kt.Compute,
) -> None:
    talker = kt.cls(Talker).options(compute=pool).remote()
    assert talker.say("x") == "x"
    driver = get_driver()
    name = driver.pool_name(pool, False)
    (slot,) = driver.pools[name].slots
    host, port = slot.pod.address
    record = json.loads((kt_home() / "local" / name / f"{slot.pod.name}.json").read_text())
    supervisor = psutil.Process(record["pid"])
    listening = [c.laddr for c in supervisor.net_connections("inet") if c.status == "LISTEN"]
    assert {a.port for a in listening} >= {port, port + 1}
    assert all(a.ip == host for a in listening), listening
    with urllib.request.urlopen(f"http://{host}:{port + 1}/healthz", timeout=5) as reply:
        assert reply.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{host}:{port + 1}/status", timeout=5)
    assert refused.value.code == 401
    token = driver.pools[name].token
    request = urllib.request.Request(
        f"http://{host}:{port + 1}/status", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert token not in reply.read().decode()
