"""Image steps, the pod's side: run a kt.Image's steps once, before its actors start.

Who calls it: `kt.supervisor.server.Supervisor`, for an IMAGE frame (`kt.core.protocol`).
Steps run in order as subprocesses of the supervisor, their output streamed to the
caller line by line. A step whose key (`kt.core.image.keys`) has a marker in the cache
is skipped, with the environment it left (a key covers the step and every step before
it). pip steps install into a virtual environment per pip chain (named by the key of
the last pip step, holding the packages of every pip step so far), layered on the pod's
own environment (a .pth file lists its site-packages): the pod's (on the local backend,
the driver's) environment is never touched, and two images share a venv only when
their steps up to the last pip step agree. What the last step leaves -- the environment
and the venv's site-packages -- is written to `images/<key>.json`, which a worker reads
before unpickling its class.

The cache is `KT_IMAGE_CACHE` (the local backend gives every pod of a pool the same
one, so a pool builds its venv once) or the pod's own directory; pods sharing it take
turns (flock).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import hashlib
import json
import os
import shutil
import site
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from kt.core.compute import ImageStep
from kt.core.errors import ImageError
from kt.core.image import keys

TAIL = 20  # lines of a failed step's output in its error
DRAIN_S = 1.0  # after a step's command exits, the longest its output is still read


class ImageCache:
    def __init__(self, root: str, pod: str) -> None:
        self.root = root
        self.pod = pod
        self.steps_run = 0  # steps this supervisor ran (not skipped), for /status
        for sub in ("steps", "images", "files"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)

    def result(self, key: str) -> str:
        return os.path.join(self.root, "images", f"{key}.json")

    def venv(self, key: str) -> str:
        """The venv of the pip steps up to the one whose key this is."""
        return os.path.join(self.root, "venvs", key)

    def _site(self, key: str) -> str:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return os.path.join(self.venv(key), "lib", version, "site-packages")

    async def prepare(self, steps: list[dict[str, Any]], log: Callable[[bytes], None]) -> str:
        """Run what is not cached yet; returns the final key.

        Raises:
            ImageError: a step failed (which, how, its last lines).
        """
        chain = keys(steps)
        final = chain[-1] if chain else "empty"
        lock = os.open(os.path.join(self.root, "lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            await asyncio.get_running_loop().run_in_executor(None, fcntl.flock, lock, fcntl.LOCK_EX)
            if os.path.exists(self.result(final)):
                return final
            env: dict[str, str] = {}
            packages: list[str] = []  # of every pip step so far
            venv: str | None = None  # the key of the last pip step so far
            for number, (step, key) in enumerate(zip(steps, chain, strict=True), start=1):
                if step["kind"] == "pip":
                    packages += [str(a) for a in step["args"]]
                    venv = key
                marker = os.path.join(self.root, "steps", f"{key}.json")
                if os.path.exists(marker):
                    with open(marker) as f:
                        env = json.load(f)
                    continue
                described = ImageStep(str(step["kind"]), tuple(map(str, step["args"])))
                what = f"{number} of {len(steps)} ({described})"
                log(f"image step {what}\n".encode())
                env = await self._run(step, env, what, log, packages, key)
                self.steps_run += 1
                with open(marker, "w") as f:
                    json.dump(env, f)
            outcome = {"env": env, "site": self._site(venv) if venv else None}
            with open(self.result(final) + ".tmp", "w") as f:
                json.dump(outcome, f)
            os.replace(self.result(final) + ".tmp", self.result(final))
            return final
        finally:
            os.close(lock)  # and the flock with it

    async def _run(
        self,
        step: dict[str, Any],
        env: dict[str, str],
        what: str,
        log: Callable[[bytes], None],
        packages: list[str],
        key: str,
    ) -> dict[str, str]:
        kind, args = step["kind"], [str(a) for a in step["args"]]
        if kind == "env":
            return {**env, **dict(zip(args[::2], args[1::2], strict=True))}
        if kind == "copy":
            data = base64.b64decode(step["data"])
            if hashlib.sha256(data).hexdigest() != step["sha256"]:
                raise ImageError(what, self.pod, None, "the file arrived damaged")
            files = os.path.realpath(os.path.join(self.root, "files"))
            dest = os.path.realpath(os.path.join(files, args[1].lstrip("/")))
            if not dest.startswith(files + os.sep):
                raise ImageError(what, self.pod, None, f"{args[1]!r} leaves the image's files")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
            return env
        if kind == "pip":
            # A venv of its own per pip chain (this step's key), with every package of
            # the chain so far: images that differ in a pip step, or before one, never
            # share one (going back to an earlier image finds its venv as it was).
            venv = self.venv(key)
            shutil.rmtree(venv, ignore_errors=True)  # a half-made one from a failed run
            await self._process([sys.executable, "-m", "venv", venv], env, what, log)
            # Layered on the pod's own environment (on the local backend, the driver's,
            # which is often itself a venv, so --system-site-packages would show the
            # wrong one): its site-packages, through a .pth file, so pip counts what is
            # there as installed and the venv holds only what the image adds.
            os.makedirs(self._site(key), exist_ok=True)
            with open(os.path.join(self._site(key), "kt-layer.pth"), "w") as f:
                f.write("".join(f"{p}\n" for p in site.getsitepackages()))
            python = os.path.join(venv, "bin", "python")
            await self._process([python, "-m", "pip", "install", *packages], env, what, log)
            return env
        if kind == "bash":
            await self._process(["bash", "-c", args[0]], env, what, log)
            return env
        raise ImageError(what, self.pod, None, f"unknown step kind {kind!r}")

    async def _process(
        self, argv: list[str], env: dict[str, str], what: str, log: Callable[[bytes], None]
    ) -> None:
        full_env = {**os.environ, **env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        full_env["KT_IMAGE_FILES"] = os.path.join(self.root, "files")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=full_env,
                cwd=os.path.join(self.root, "files"),
            )
        except OSError as exc:
            raise ImageError(what, self.pod, None, f"could not start {argv[0]}: {exc}") from None
        assert proc.stdout is not None
        stdout = proc.stdout
        tail: deque[str] = deque(maxlen=TAIL)

        async def show() -> None:
            while line := await stdout.readline():
                tail.append(line.decode("utf-8", "replace").rstrip("\n"))
                log(line)

        showing = asyncio.ensure_future(show())
        code = await proc.wait()
        try:  # what it printed last; a process it left running (`srv &`) holds the pipe
            await asyncio.wait_for(showing, DRAIN_S)
        except TimeoutError:
            pass  # the step is over: what that process prints from now on is not shown
        if code != 0:
            raise ImageError(what, self.pod, code, "\n".join(tail))
