"""Image steps on the wire and their cache keys (shared by the driver and the pods).

Who calls it: `kt.actors.imaging` (the driver) turns a `kt.Image` into `wire` steps and
their final key; `kt.supervisor.image` (the pod) runs them. Each step's key is the hash
of the previous key and the step itself, so a step is run again exactly when it or a
step before it changed; a copy step's key includes its file's hash.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import orjson

from kt.core.compute import Image
from kt.core.errors import ConfigError

MAX_COPY = 16 * 2**20


def wire(image: Image) -> list[dict[str, Any]]:
    """The steps as the pod receives them (copy steps carry the file, base64).

    Raises:
        ConfigError: a copy step's file is missing or larger than 16 MiB.
    """
    steps: list[dict[str, Any]] = []
    for step in image.steps:
        item: dict[str, Any] = {"kind": step.kind, "args": list(step.args)}
        if step.kind == "copy":
            path = Path(step.args[0]).expanduser()
            if not path.is_file():
                raise ConfigError(f"Image.copy({step.args[0]!r}, ...): no such file")
            data = path.read_bytes()
            if len(data) > MAX_COPY:
                raise ConfigError(
                    f"Image.copy({step.args[0]!r}, ...): {len(data)} bytes; copy files of "
                    "up to 16 MiB (sync larger data with the project, or the data store)"
                )
            item["sha256"] = hashlib.sha256(data).hexdigest()
            item["data"] = base64.b64encode(data).decode()
        steps.append(item)
    return steps


def keys(steps: list[dict[str, Any]]) -> list[str]:
    """Each step's cache key: the hash of the previous key and the step (sans data)."""
    out: list[str] = []
    key = ""
    for step in steps:
        what = {k: v for k, v in step.items() if k != "data"}
        digest = hashlib.sha256(key.encode() + orjson.dumps(what, option=orjson.OPT_SORT_KEYS))
        key = digest.hexdigest()[:32]
        out.append(key)
    return out
