"""kubectl as an independent client of the test cluster (the versions on these machines)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

KUBECTL_DIR = pathlib.Path("/usr/lib/google-cloud-sdk/bin")


def kubectl_path(version: str) -> str:
    """The kubectl binary of a version; fails (never skips) when it is not installed."""
    path = KUBECTL_DIR / f"kubectl.{version}"
    found = shutil.which(str(path)) or shutil.which(f"kubectl.{version}")
    assert found, f"kubectl {version} is not on this machine (looked in {KUBECTL_DIR} and PATH)"
    return found


def kubectl(version: str, kubeconfig: pathlib.Path | str, *args: str, home: str = "") -> str:
    """Run kubectl against `kubeconfig`; its output (a failure shows kubectl's error)."""
    proc = subprocess.run(
        [kubectl_path(version), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": home or os.environ.get("HOME", "/tmp")},
    )
    assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
    return proc.stdout
