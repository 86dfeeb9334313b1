"""Remote tracebacks show the user's file, line and source for code pickled by value.

Behaviours covered:
- a function, a class and a closure defined in `__main__` of a script run as a program:
  the caller's traceback names the script's real path and line and shows the source
  line, even after the script file is deleted (so the pod could not read it, as on a
  cluster), and also when the exception is left uncaught;
- code from a notebook cell (source only in the driver's linecache, no file anywhere).

A class defined inside a test (by value too) is in test_actors.py's RemoteError test.
"""

from __future__ import annotations

import linecache
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import kt

SCRIPT = textwrap.dedent(
    """
    import os
    import traceback

    import kt


    def parse(text):
        return int(text)  # parse's line


    class Parser:
        def parse(self, text):
            return int(text)  # Parser.parse's line


    def make_adder(base):
        def add_parsed(text):
            return base + int(text)  # add_parsed's line

        return add_parsed


    pool = kt.Compute(cpus=2, replicas=1, backend="local")
    f = kt.fn(parse).to(pool)
    p = kt.cls(Parser).options(compute=pool, cpus=0).remote()
    c = kt.fn(make_adder(1)).to(pool)
    os.unlink(__file__)  # from here on no process can read the script from disk

    for name, call in (("method", lambda: p.parse("x2")), ("closure", lambda: c("x3"))):
        try:
            call()
        except ValueError as exc:
            print("---", name)
            traceback.print_exception(exc, file=__import__("sys").stdout)
    f("x1")  # uncaught: Python prints the traceback and exits 1
    """
)


def _line_of(marker: str) -> int:
    return next(i for i, line in enumerate(SCRIPT.splitlines(), 1) if marker in line)


@pytest.mark.timeout(120)
def test_main_script_tracebacks_name_the_script_and_show_its_source(
    tmp_path: pathlib.Path,
) -> None:
    script = tmp_path / "user_job.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=tmp_path,
        env=dict(os.environ),
    )
    assert out.returncode == 1, out.stderr[-3000:]
    assert not script.exists()
    method, closure = out.stdout.split("--- closure")
    cases = [
        (method, "Parser.parse's line", "in parse"),
        (closure, "add_parsed's line", "in add_parsed"),
        (out.stderr, "parse's line", "in parse"),
    ]
    for text, marker, func in cases:
        where = f'File "{script}", line {_line_of(marker)}, {func}'
        assert where in text, f"{where!r} not in:\n{text}"
        assert f"int(text)  # {marker}" in text, text
        assert "<dynamic-code>" not in text
    assert "ValueError: invalid literal for int() with base 10: 'x1'" in out.stderr


def test_notebook_cell_tracebacks_show_the_cell_source(pool: kt.Compute) -> None:
    # How ipykernel runs a cell: compiled under a made-up file name that exists only
    # as an entry in the kernel's linecache.
    filename = f"/tmp/ipykernel_{os.getpid()}/{id(pool)}.py"
    source = "def cell_fn(x):\n    y = x * 2\n    return 10 / (y - y)\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, object] = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    remote = kt.fn(namespace["cell_fn"]).to(pool)  # type: ignore[arg-type]
    try:
        with pytest.raises(ZeroDivisionError) as info:
            remote(3)
    finally:
        remote.teardown()
    remote_tb = str(info.value.__cause__)
    assert f'File "{filename}", line 3, in cell_fn' in remote_tb, remote_tb
    assert "return 10 / (y - y)" in remote_tb
