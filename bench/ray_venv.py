"""Create (once) the separate virtual environment that the Ray side of the benchmark runs in.

Ray is never imported by ``kt``; the comparison script ``bench/ray_side.py`` runs under the
interpreter returned by :func:`ensure_ray_python`.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

RAY_VERSION = "2.60.0"
VENV_DIR = Path(__file__).resolve().parent / ".venv-ray"
LOCK = Path(__file__).resolve().parent / "ray.lock"  # `make lock` compiles it from ray.in
BASE_PYTHON = "python3.11"


def _log(msg: str) -> None:
    print(f"[ray_venv] {msg}", file=sys.stderr, flush=True)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _has_ray(python: Path) -> bool:
    """True when ``python`` imports ray at exactly :data:`RAY_VERSION` (and numpy)."""
    if not python.exists():
        return False
    check = f"import numpy, ray, sys; sys.exit(0 if ray.__version__ == {RAY_VERSION!r} else 1)"
    proc = subprocess.run(
        [str(python), "-c", check],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return proc.returncode == 0


def _stamp(venv: Path) -> Path:
    return venv / ".lock-sha256"


def _lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()


def ensure_ray_python(venv: Path = VENV_DIR) -> Path:
    """Make sure ``venv`` holds exactly what the lock names; return its python.

    A venv made from another version of the lock is made again from scratch.
    """
    python = _venv_python(venv)
    stamp = _stamp(venv)
    if stamp.exists() and stamp.read_text() == _lock_hash() and _has_ray(python):
        _log(f"ray {RAY_VERSION} from {LOCK.name} already in {venv}")
        return python
    _log(f"creating venv {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True)
    _log(f"installing {LOCK.name} into {venv} (this takes a few minutes)")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(LOCK)],
        check=True,
        stdout=sys.stderr,
    )
    if not _has_ray(python):
        raise RuntimeError(f"ray {RAY_VERSION} still not importable from {python}")
    stamp.write_text(_lock_hash())
    _log("done")
    return python


if __name__ == "__main__":
    print(ensure_ray_python())
