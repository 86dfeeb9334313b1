"""The data store's first slice: kt.put / kt.get / kt.ls / kt.rm of Python values.

Behaviours covered (on both backends, the k8s one on the test cluster, but the last):
- an actor puts an 8 MiB array and a dict; an actor on another pod and the driver get
  them equal; kt.ls lists keys by prefix with their sizes, from the driver and from an
  actor; the value is held by the putter's pod, not the driver;
- kt.rm removes a key everywhere; kt.get of a key no pod holds raises kt.DataKeyError
  (also a KeyError) naming the nearest keys; kt.rm of it too;
- kt.get(key, timeout=...) waits for a key put later, and raises GetTimeoutError when
  none comes;
- from the driver, kt.put keeps the value on a pod of its latest pool, and refuses,
  saying what to do, when it has none; keys must be non-empty strs;
- a directory (nested, an empty file, an executable, a link) put by an actor is written
  by an actor on another pod with the same bytes and modes; a single file from the
  driver lands inside a dest directory; getting files without dest=, dest= for a plain
  value, or a missing path are refused saying what to do;
- a value put with lifetime="detached" by a driver that has exited is got by another
  (the namespace's store pod holds it), while its plain value went with its pool;
- (local) into= on the holder's host fills every kind of target right and in place:
  contiguous tensors and arrays read from the file straight into them, a transposed
  target, bfloat16, a 0-d tensor, small tensors and a plain value;
- (local) a put from the driver right after it made an actor waits for the actor's pod.
"""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import numpy as np
import pytest

import kt
from kt.core.provider import get_provider

pytestmark = pytest.mark.timeout(180)


class Holder:
    def put(self, key: str, value: Any) -> None:
        kt.put(key, value)

    def get(self, key: str, timeout: float | None = None) -> Any:
        return kt.get(key, timeout=timeout)

    def ls(self, prefix: str) -> dict[str, int]:
        return kt.ls(prefix)

    def pod(self) -> str:
        import os

        return os.environ["KT_POD"]

    def get_files(self, key: str, dest: str) -> tuple[str, dict[str, tuple[str, int]]]:
        return kt.get(key, dest=dest), _listing(dest)

    def put_files(self, key: str, path: str) -> None:
        kt.put(key, path)


def _listing(root: str) -> dict[str, tuple[str, int]]:
    """Every file under `root` (or `root` itself): relative path -> (sha256, mode)."""
    import hashlib
    import os

    if os.path.isfile(root):
        with open(root, "rb") as f:
            return {".": (hashlib.sha256(f.read()).hexdigest(), os.stat(root).st_mode & 0o777)}
    out = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            out[os.path.relpath(path, root)] = (digest, os.stat(path).st_mode & 0o777)
    return out


@pytest.fixture(scope="module", params=["local", "k8s"])
def holders(request: pytest.FixtureRequest) -> Any:
    if request.param == "k8s":
        request.getfixturevalue("k8s_cluster")
    name = f"store-{uuid.uuid4().hex[:6]}"
    compute = kt.Compute(cpus=1, replicas=2, backend=request.param, name=name)
    H = kt.cls(Holder).options(compute=compute, placement="spread")
    a, b = H.remote(), H.remote()
    assert a.pod() != b.pod()
    yield a, b, request.param
    kt.kill(a)
    kt.kill(b)


def test_a_value_put_by_an_actor_is_got_elsewhere(holders: Any) -> None:
    a, b, _ = holders
    prefix = f"w{uuid.uuid4().hex[:6]}/"
    array = np.random.default_rng(0).standard_normal(1 << 20)  # 8 MiB
    a.put(prefix + "v1", {"weights": array, "step": 1})
    a.put(prefix + "v2", {"weights": array * 2, "step": 2})
    got = b.get(prefix + "v2")
    assert got["step"] == 2 and np.array_equal(got["weights"], array * 2)
    here = kt.get(prefix + "v1")
    assert here["step"] == 1 and np.array_equal(here["weights"], array)
    listed = kt.ls(prefix)
    assert list(listed) == [prefix + "v1", prefix + "v2"]
    assert all(size > array.nbytes for size in listed.values())
    assert b.ls(prefix) == listed

    kt.rm(prefix + "v1")
    assert list(kt.ls(prefix)) == [prefix + "v2"]
    with pytest.raises(kt.DataKeyError, match=rf"'{prefix}v1'; nearest: '{prefix}v2'") as info:
        kt.get(prefix + "v1")
    assert isinstance(info.value, KeyError)
    assert info.value.nearest[0] == prefix + "v2"  # others' keys may follow: pods are shared
    with pytest.raises(kt.DataKeyError):
        kt.rm(prefix + "v1")


def test_get_waits_for_a_key_put_later_and_times_out_when_none_comes(holders: Any) -> None:
    a, b, _ = holders
    key = f"later-{uuid.uuid4().hex[:6]}"
    threading.Timer(1.0, lambda: a.put(key, "arrived")).start()
    started = time.monotonic()
    assert b.get(key, timeout=60) == "arrived"
    assert time.monotonic() - started >= 0.9
    with pytest.raises(kt.GetTimeoutError, match=r"within 0\.5 s"):
        kt.get(f"never-{uuid.uuid4().hex[:6]}", timeout=0.5)


def test_the_driver_puts_on_a_pod_of_its_latest_pool(holders: Any) -> None:
    a, _, backend = holders
    name = f"store-latest-{uuid.uuid4().hex[:6]}"  # made now: the driver's latest pool
    latest = kt.cls(Holder).options(compute=kt.Compute(cpus=1, backend=backend, name=name))
    c = latest.remote()
    try:
        c.pod()  # its pod is up: the pool has a slot to hold the value
        key = f"from-driver-{uuid.uuid4().hex[:6]}"
        kt.put(key, [1, 2, 3])
        assert a.get(key) == c.get(key) == [1, 2, 3]
    finally:
        kt.kill(c)
    for bad in ("", 7):
        with pytest.raises(kt.ConfigError, match="non-empty str"):
            kt.put(bad, 1)  # type: ignore[arg-type]


def test_files_and_directories_travel_with_their_modes(
    holders: Any, tmp_path: pathlib.Path
) -> None:
    a, b, _ = holders
    src = tmp_path / "dataset"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(np.random.default_rng(1).bytes(5 * 2**20))
    (src / "sub" / "deeper" / "empty").write_bytes(b"")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "link.txt").symlink_to(src / "a.txt")  # followed, as cp -r does
    expected = _listing(str(src))
    key = f"files-{uuid.uuid4().hex[:6]}"
    a.put_files(key, str(src))  # an actor's pod holds it; an actor elsewhere writes it
    written, listing = b.get_files(key, str(tmp_path / "out" / "data"))
    assert written == str(tmp_path / "out" / "data") and listing == expected
    assert listing["run.sh"][1] == 0o755 and listing["link.txt"] == listing["a.txt"]

    single = f"file-{uuid.uuid4().hex[:6]}"
    kt.put(single, src / "sub" / "b.bin")  # a Path: files, from the driver
    (tmp_path / "into").mkdir()
    assert kt.get(single, dest=tmp_path / "into") == str(tmp_path / "into" / "b.bin")
    assert _listing(str(tmp_path / "into" / "b.bin"))["."] == expected["sub/b.bin"]

    with pytest.raises(kt.ConfigError, match=r"holds 5 files put from 'dataset': pass dest="):
        kt.get(key)
    kt.put(single + "-plain", "not/a/path/here")  # a str naming no path is a str
    with pytest.raises(kt.ConfigError, match=r"holds a str, not files"):
        kt.get(single + "-plain", dest=tmp_path / "x")
    with pytest.raises(kt.ConfigError, match=r"no such file or directory"):
        kt.put(single, tmp_path / "missing")


DETACHED = """
import kt
pool = kt.Compute(cpus=1, replicas=1, backend="local", name="short-" + KEY[-6:])
h = kt.cls(dict).options(compute=pool, cpus=0).remote()  # a pool of this driver's own
h.keys()
kt.put(KEY + "/kept", {"step": 12}, lifetime="detached")
kt.put(KEY + "/gone", {"step": 1})
print("put", sorted(kt.ls(KEY)), flush=True)
"""


@pytest.mark.timeout(240)
def test_a_detached_value_outlives_its_driver_and_a_plain_one_does_not() -> None:
    key = f"detached-{uuid.uuid4().hex[:6]}"
    try:
        out = subprocess.run(
            [sys.executable, "-c", DETACHED.replace("KEY", repr(key))],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"put ['{key}/gone', '{key}/kept']" in out.stdout, out.stdout
        deadline = time.monotonic() + 30  # the driver's own pool ends with it
        while key + "/gone" in kt.ls(key) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert kt.get(key + "/kept") == {"step": 12}
        assert list(kt.ls(key)) == [key + "/kept"]
        with pytest.raises(kt.ConfigError, match="lifetime='forever'"):
            kt.put(key, 1, lifetime="forever")
    finally:
        provider = get_provider("local")
        for pod in asyncio.run(provider.list_pods("kt-store-detached")):
            asyncio.run(provider.delete_pod(pod.pool, pod.name))


NO_POOL = """
import kt
try:
    kt.put("k", 1)
except kt.ConfigError as exc:
    print("refused:", exc)
"""


def test_a_driver_without_pods_is_told_what_to_do() -> None:
    out = subprocess.run(
        [sys.executable, "-c", NO_POOL], capture_output=True, text=True, timeout=60
    ).stdout
    assert "refused:" in out and "make an actor" in out, out


class Mixed:
    """A state dict of every kind into= meets: large tensors and arrays (read from the
    value's file straight into the target), a dtype numpy lacks, a transposed target, a
    0-d tensor, small ones (pickled in band) and a plain value."""

    @staticmethod
    def value(seed: int) -> dict[str, Any]:
        import torch

        torch.manual_seed(seed)
        return {
            "big": torch.randn(300_000),
            "bf16": torch.randn(200_000).to(torch.bfloat16),
            "t": torch.randn(700, 500),
            "arr": np.arange(100_000, dtype=np.float64) * seed,
            "ints": torch.arange(50_000, dtype=torch.int32) * seed,
            "scalar": torch.tensor(float(seed)),
            "small": torch.arange(10) * seed,
            "step": seed,
        }

    @staticmethod
    def empty() -> dict[str, Any]:
        import torch

        return {
            "big": torch.zeros(300_000),
            "bf16": torch.zeros(200_000, dtype=torch.bfloat16),
            "t": torch.zeros(500, 700).t(),  # not contiguous: copied, not read
            "arr": np.zeros(100_000),
            "ints": torch.zeros(50_000, dtype=torch.int32),
            "scalar": torch.tensor(0.0),
            "small": torch.zeros(10, dtype=torch.int64),
            "step": 0,
        }

    def put(self, key: str, seed: int) -> None:
        kt.put(key, self.value(seed))

    def get_into(self, key: str) -> tuple[dict[str, str], bool]:
        return _fill(key)


def _digests(sd: dict[str, Any]) -> dict[str, str]:
    import torch

    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.contiguous().reshape(-1).view(torch.uint8).numpy()
        out[k] = hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()
    return out


def _fill(key: str) -> tuple[dict[str, str], bool]:
    """Get `key` into fresh targets: their digests, and whether each stayed in place."""
    into = Mixed.empty()
    places = {k: v.data_ptr() if hasattr(v, "data_ptr") else id(v) for k, v in into.items()}
    places.pop("step")
    assert kt.get(key, into=into, timeout=60) is into
    kept = all(
        (v.data_ptr() if hasattr(v, "data_ptr") else id(v)) == places[k]
        for k, v in into.items()
        if k != "step"
    )
    return _digests(into), kept


def test_into_fills_every_kind_of_target_from_a_file_on_this_host() -> None:
    pool = kt.Compute(cpus=1, replicas=1, backend="local", name=f"mix-{uuid.uuid4().hex[:6]}")
    putter, getter = (kt.cls(Mixed).options(compute=pool, cpus=0).remote() for _ in range(2))
    key = f"mixed/{uuid.uuid4().hex[:6]}"
    for seed in (3, 5):  # the second put replaces the first in a reused file
        putter.put(key, seed)
        want = _digests(Mixed.value(seed))
        assert getter.get_into(key) == (want, True)  # an actor on the holder's pod
        assert _fill(key) == (want, True)  # the driver, on the same host
    kt.rm(key)
    for a in (putter, getter):
        kt.kill(a)


def test_a_put_from_the_driver_waits_for_the_pod_of_an_actor_just_made() -> None:
    """Right after `.remote()` the actor's pool may not exist yet, then its pod starts:
    the driver's put waits for the pod (it used to refuse, "it has none yet", or to send
    the value to the starting pod's empty address)."""
    pool = kt.Compute(cpus=1, replicas=1, backend="local", name=f"early-{uuid.uuid4().hex[:6]}")
    holder = kt.cls(Holder).options(compute=pool, cpus=0).remote()
    key = f"early/{uuid.uuid4().hex[:6]}"
    kt.put(key, {"x": 1})
    assert holder.get(key) == {"x": 1}
    kt.rm(key)
    kt.kill(holder)
