"""`kt.__all__` lists exactly the public names `kt/__init__.py` binds, and they import."""

from __future__ import annotations

import kt


def test_all_matches_public_names() -> None:
    public = {n for n in vars(kt) if not n.startswith("_")} - {
        "actors",
        "core",
        "supervisor",
        "local",
        "k8s",  # subpackages bound once something imported them, not exports
        "testing",
        "top",  # kt.top, the pure part of `kt top`: bound once kt.cli imported it
    }
    assert set(kt.__all__) - {"__version__"} == public


def test_every_export_resolves_to_what_its_module_defines() -> None:
    for name in kt.__all__:
        obj = getattr(kt, name)
        if name == "__version__":
            assert isinstance(obj, str) and obj[0].isdigit()
            continue
        home = getattr(obj, "__module__", None)
        if home is None:  # a module object or a plain value, such as kt.config
            continue
        assert home.startswith("kt."), f"kt.{name} comes from {home}, not from kt"


def test_errors_derive_from_kt_error() -> None:
    for name in kt.__all__:
        obj = getattr(kt, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, kt.KtError), name
