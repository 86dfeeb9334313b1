"""Typed handles and functions, checked by mypy with kt's plugin (issue 11).

Behaviour covered: on a small typed user program, mypy with `plugins = kt.mypy_plugin`
reports exactly the errors it should -- a method called with the wrong argument type,
a method's Ref assigned to the wrong Ref type, a method the class does not have, a
deployed function called wrongly or its result mistyped -- and accepts the correct
calls (a sync method's Ref[int], an async method's Ref[str], a deployed function's
int, an SPMD group left untyped).
"""

from __future__ import annotations

import pathlib
import re
import textwrap

import pytest
from mypy import api

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROGRAM = textwrap.dedent(
    """
    import kt


    class Counter:
        def incr(self, k: int) -> int:
            return k

        async def name(self) -> str:
            return "c"


    def square(x: int) -> int:
        return x * x


    c = kt.cls(Counter).remote()
    ok: kt.Ref[int] = c.incr.remote(1)
    named: kt.Ref[str] = c.name.remote()
    c.incr.remote("x")  # E: arg-type
    wrong: kt.Ref[str] = c.incr.remote(2)  # E: assignment
    c.nope.remote()  # E: misc
    f = kt.fn(square).to(kt.Compute(cpus=1))
    y: int = f(3)
    r: kt.Ref[int] = f.remote(4)
    f("four")  # E: arg-type
    z: str = f(5)  # E: assignment
    group = kt.fn(square).to(kt.Compute(cpus=1).distribute("pytorch", workers=2))
    per_rank = group(6)
    """
)


@pytest.mark.timeout(300)
def test_mypy_with_the_plugin_finds_exactly_the_wrong_calls(tmp_path: pathlib.Path) -> None:
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nplugins = kt.mypy_plugin\nfollow_imports = silent\n"
        f"ignore_missing_imports = True\nmypy_path = {ROOT}\n"
    )
    out, err, _ = api.run(
        ["--config-file", str(config), "--cache-dir", str(tmp_path / "cache"), str(program)]
    )
    found = sorted(
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"program\.py:(\d+): error: .*\[([a-z-]+)\]", out)
    )
    expected = sorted(
        (n, line.split("# E: ")[1].strip())
        for n, line in enumerate(PROGRAM.splitlines(), 1)
        if "# E: " in line
    )
    assert found == expected, out + err
    assert '"Counter" has no method "nope"' in out
