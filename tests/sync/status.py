"""The /status of the pod an actor lives on (control HTTP, the pool's token)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import kt


def pod_status(handle: kt.ActorHandle[Any]) -> dict[str, Any]:
    host, port = handle.wait_placed(60)
    request = urllib.request.Request(
        f"http://{host}:{port + 1}/status", headers={"Authorization": f"Bearer {handle._token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        status: dict[str, Any] = json.loads(reply.read())
    return status
