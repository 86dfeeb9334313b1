"""requirements.lock agrees with pyproject.toml, and the venv under test is the lock.

Behaviours covered:
- every requirement of pyproject.toml (build system, dependencies, the locked extras) is
  in the lock, at a version its range admits (a range edited without `make lock` fails);
- the lock is closed and minimal: each locked package's own requirements are locked at
  admitted versions, and each locked package is needed by pyproject.toml;
- every locked package has a hash (so `pip install --require-hashes` checks it), in
  bench/ray.lock too, which pins the Ray version the benchmark names;
- the interpreter running the tests has exactly the locked versions installed.

`make test-latest` skips this module on purpose: its venv holds the newest releases.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import sys
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from bench.ray_venv import LOCK as RAY_LOCK
from bench.ray_venv import RAY_VERSION

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("dev", "torch", "examples", "k8s")
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def _lock(path: pathlib.Path = ROOT / "requirements.lock") -> dict[str, tuple[Version, int]]:
    """Name -> (pinned version, number of hashes)."""
    pins: dict[str, tuple[Version, int]] = {}
    name = ""
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            pins[name] = (Version(match.group(2)), 0)
        elif line.strip().startswith("--hash=sha256:") and name:
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
    return pins


def _applies(req: Requirement, extras: tuple[str, ...] = ("",)) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate({**env, "extra": extra}) for extra in extras)


def _top_level() -> list[Requirement]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    # the build backend too: make installs kt with --no-build-isolation
    reqs = [Requirement(r) for r in pyproject["build-system"]["requires"]]
    reqs += [Requirement(r) for r in project["dependencies"]]
    for extra in LOCKED_EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if _applies(r)]


def _requirements_of(name: str, extras: set[str]) -> list[Requirement]:
    wanted = ("", *sorted(extras))
    reqs = importlib.metadata.requires(name) or []
    return [r for r in map(Requirement, reqs) if _applies(r, wanted)]


def test_pyproject_ranges_admit_the_locked_versions() -> None:
    pins = _lock()
    for req in _top_level():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is in pyproject.toml but not in the lock: run make lock"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"the lock pins {name}=={version}, outside pyproject.toml's {req}: run make lock"
        )


def test_every_locked_package_has_a_hash() -> None:
    for path in (ROOT / "requirements.lock", RAY_LOCK):
        missing = [name for name, (_, hashes) in _lock(path).items() if hashes == 0]
        assert not missing, f"{path.name}: no --hash for {missing}: run make lock"


def test_the_ray_lock_pins_the_benchmarked_ray() -> None:
    assert _lock(RAY_LOCK)["ray"][0] == Version(RAY_VERSION), "run make lock"
    assert f"ray=={RAY_VERSION}" in (ROOT / "bench" / "ray.in").read_text().split()


def test_the_lock_is_closed_and_minimal() -> None:
    pins = _lock()
    needed: dict[str, set[str]] = {}
    todo = [(canonicalize_name(r.name), set(r.extras)) for r in _top_level()]
    while todo:
        name, extras = todo.pop()
        if name in needed and extras <= needed[name]:
            continue
        needed.setdefault(name, set()).update(extras)
        for req in _requirements_of(name, needed[name]):
            dep = canonicalize_name(req.name)
            assert dep in pins, f"{name} needs {req}, which the lock lacks: run make lock"
            assert req.specifier.contains(pins[dep][0], prereleases=True), (
                f"{name} needs {req}; the lock pins {pins[dep][0]}: run make lock"
            )
            todo.append((dep, set(req.extras)))
    unneeded = set(pins) - set(needed)
    assert not unneeded, f"the lock pins {sorted(unneeded)}, which nothing needs: run make lock"


def test_the_venv_is_the_lock() -> None:
    assert sys.prefix != sys.base_prefix, "the tests run outside a venv"
    for name, (version, _) in _lock().items():
        installed = Version(importlib.metadata.version(name))
        assert installed == version, (
            f"{name} {installed} is installed, the lock says {version}: run make install"
        )
