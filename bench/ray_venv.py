"""Create (once) the separate virtual environment that the Ray side of the benchmark runs in.

Ray is never imported by ``kt``; the comparison script ``bench/ray_side.py`` runs under the
interpreter returned by :func:`ensure_ray_python`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RAY_VERSION = "2.60.0"
VENV_DIR = Path(__file__).resolve().parent / ".venv-ray"
BASE_PYTHON = "python3.11"
PACKAGES = (f"ray=={RAY_VERSION}", "numpy")


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


def ensure_ray_python(venv: Path = VENV_DIR) -> Path:
    """Make sure ``venv`` exists with ray and numpy installed; return its python."""
    python = _venv_python(venv)
    if _has_ray(python):
        _log(f"ray {RAY_VERSION} already present in {venv}")
        return python
    if not python.exists():
        _log(f"creating venv {venv}")
        subprocess.run([BASE_PYTHON, "-m", "venv", str(venv)], check=True)
    _log(f"installing {' '.join(PACKAGES)} into {venv} (this takes a few minutes)")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", *PACKAGES],
        check=True,
        stdout=sys.stderr,
    )
    if not _has_ray(python):
        raise RuntimeError(f"ray {RAY_VERSION} still not importable from {python}")
    _log("done")
    return python


if __name__ == "__main__":
    print(ensure_ray_python())
