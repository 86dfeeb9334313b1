"""kt.Image steps on real pods: run once, cached step by step, in the pool's own venv.

Behaviours covered:
- a pip step installs a small package from the registry into the pool's virtual
  environment: the actor imports it from there, the driver's environment lacks it;
- set_env reaches the actor; a copy step's file is in the pod's image files;
- a second `.to()` with the same image runs no step again; with a changed set_env, only
  the steps after it run again (counted by run_bash steps appending to files);
- each step's output reaches the caller's terminal as it runs, prefixed with the pod;
- a failing step fails `.to()` with kt.ImageError naming the step, its exit code and its
  last lines of output; steps that outlast the driver's bound fail it with an ImageError
  saying so;
- set_env, run_bash and copy steps, and a failing step, the same way on both backends;
  a run_bash step ends when its command exits, even if a process it started in the
  background still holds its output open.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import time
import uuid
from typing import Any

import pytest

import kt

pytestmark = pytest.mark.timeout(300)


class Probe:
    def package_file(self) -> str:
        import termcolor

        return str(termcolor.__file__)

    def env(self, name: str) -> str | None:
        return os.environ.get(name)

    def read(self, rel: str) -> str:
        return pathlib.Path(os.environ["KT_IMAGE_FILES"], rel).read_text()


def _image(before: pathlib.Path, after: pathlib.Path, value: str, note: pathlib.Path) -> kt.Image:
    return (
        kt.Image()
        .pip_install(["termcolor"])
        .run_bash(f"echo ran >> {before}")
        .copy(str(note), "/data/note.txt")
        .set_env(KT_TEST_VALUE=value)
        .run_bash(f"echo ran >> {after}")
    )


def _runs(path: pathlib.Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_image_steps_run_once_and_again_from_the_changed_step(
    tmp_path: pathlib.Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert importlib.util.find_spec("termcolor") is None, (
        "the driver's environment must lack termcolor"
    )
    before, after, note = tmp_path / "before", tmp_path / "after", tmp_path / "note.txt"
    note.write_text("copied")
    name = f"image-{uuid.uuid4().hex[:6]}"

    first = kt.cls(Probe).to(
        kt.Compute(
            cpus=1, replicas=1, name=name, backend="local", image=_image(before, after, "1", note)
        )
    )
    assert "/image/venvs/" in first.package_file()
    assert first.env("KT_TEST_VALUE") == "1"
    assert first.read("data/note.txt") == "copied"
    assert (_runs(before), _runs(after)) == (1, 1)
    assert importlib.util.find_spec("termcolor") is None  # still: the pool's venv, not ours
    out, deadline = "", time.monotonic() + 10  # kt's output thread writes it
    while "image step 1 of 5" not in out and time.monotonic() < deadline:
        shown = capfd.readouterr()
        out += shown.out + shown.err
        time.sleep(0.05)
    assert "(image pod=" in out and "image step 1 of 5 (pip_install(['termcolor']))" in out

    same = kt.cls(Probe).to(
        kt.Compute(
            cpus=1, replicas=1, name=name, backend="local", image=_image(before, after, "1", note)
        )
    )
    assert same is first and (_runs(before), _runs(after)) == (1, 1)

    changed = kt.cls(Probe).to(
        kt.Compute(
            cpus=1, replicas=1, name=name, backend="local", image=_image(before, after, "2", note)
        )
    )
    assert changed.env("KT_TEST_VALUE") == "2"
    assert (_runs(before), _runs(after)) == (1, 2)  # only the steps after the change
    changed.teardown()


def test_steps_run_on_both_backends(tmp_path: pathlib.Path, backend: str) -> None:
    note = tmp_path / "note.txt"
    note.write_text("from the driver")
    image = (
        kt.Image()
        .set_env(KT_TEST_VALUE="on the pod")
        .run_bash("sleep 600 & echo built > built.txt")  # its child holds the output open
        .copy(str(note), "data/note.txt")
    )
    compute = kt.Compute(
        cpus=1, replicas=1, name=f"image-{uuid.uuid4().hex[:6]}", backend=backend, image=image
    )
    svc = kt.cls(Probe).to(compute)
    try:
        assert svc.env("KT_TEST_VALUE") == "on the pod"
        assert svc.read("built.txt") == "built\n"
        assert svc.read("data/note.txt") == "from the driver"
    finally:
        svc.teardown()


def test_a_failing_step_fails_to_with_its_exit_code_and_output(
    tmp_path: pathlib.Path, backend: str
) -> None:
    image = kt.Image().set_env(A="1").run_bash("echo preparing; echo broken >&2; exit 3")
    compute = kt.Compute(
        cpus=1, replicas=1, name=f"image-{uuid.uuid4().hex[:6]}", backend=backend, image=image
    )
    with pytest.raises(kt.ImageError) as info:
        kt.cls(Probe).to(compute)
    error = info.value
    assert error.exit_code == 3
    assert "2 of 2" in error.step and "run_bash" in error.step
    assert "broken" in error.output and "preparing" in error.output
    assert "exit code 3" in str(error)


def test_steps_that_outlast_their_bound_fail_to_with_an_image_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kt.actors import imaging

    monkeypatch.setattr(imaging, "TIMEOUT_S", 2.0)
    image = kt.Image().run_bash("sleep 30")
    compute = kt.Compute(
        cpus=1, replicas=1, name=f"image-{uuid.uuid4().hex[:6]}", backend="local", image=image
    )
    began = time.monotonic()
    with pytest.raises(kt.ImageError, match=r"1 to 1 \(not finished within 2 s\)"):
        kt.cls(Probe).to(compute)
    assert time.monotonic() - began < 25


class Imports:
    def has(self, module: str) -> bool:
        return importlib.util.find_spec(module) is not None


def test_images_that_differ_in_a_pip_step_never_share_a_venv() -> None:
    name = f"image-{uuid.uuid4().hex[:6]}"
    with_termcolor = kt.Image().pip_install(["termcolor"])
    with_toml = kt.Image().pip_install(["toml"])

    def deploy(image: kt.Image) -> Any:
        return kt.cls(Imports).to(
            kt.Compute(cpus=1, replicas=1, name=name, backend="local", image=image)
        )

    a = deploy(with_termcolor)
    assert a.has("termcolor") and not a.has("toml")
    b = deploy(with_toml)
    assert b.has("toml") and not b.has("termcolor")
    again = deploy(with_termcolor)  # back to the first image: its venv as it was
    assert again.has("termcolor") and not again.has("toml")
    again.teardown()
