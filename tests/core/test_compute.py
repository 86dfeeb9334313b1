"""Quantities are parsed once at the API edge; bad specs are refused with the fix."""

from __future__ import annotations

import pytest

import kt
from kt.core.compute import parse_cpus, parse_duration, parse_memory


def test_quantities() -> None:
    assert parse_cpus("500m") == 0.5 and parse_cpus(2) == 2.0
    assert parse_memory("2Gi") == 2 * 2**30 and parse_memory("512M") == 512 * 10**6
    assert parse_duration("30m") == 1800 and parse_duration(45) == 45.0


def test_bad_specs_say_what_to_do() -> None:
    with pytest.raises(kt.ConfigError, match="500m"):
        kt.Compute(cpus="lots")
    with pytest.raises(kt.ConfigError, match="either replicas"):
        kt.Compute(replicas=2, max_replicas=3)
    with pytest.raises(kt.ConfigError, match="backend"):
        kt.Compute(backend="mesos")
    with pytest.raises(kt.ConfigError, match="2Gi"):
        kt.Compute(memory="two gigs")


def test_replica_range_and_pool_names() -> None:
    assert kt.Compute(replicas=3).replica_range == (3, 3)
    assert kt.Compute(min_replicas=1, max_replicas=4).replica_range == (1, 4)
    assert kt.Compute(cpus=2).pool_name() == kt.Compute(cpus=2).pool_name()
    assert kt.Compute(cpus=2).pool_name() != kt.Compute(cpus=3).pool_name()
    assert kt.Compute(name="rollout").pool_name() == "rollout"


def test_backend_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    from kt.core.provider import get_provider, resolve_backend

    monkeypatch.delenv("KT_BACKEND", raising=False)
    monkeypatch.setenv("KUBECONFIG", "/nonexistent/kubeconfig")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert resolve_backend(None) == "local"
    assert resolve_backend("k8s") == "k8s"
    monkeypatch.setenv("KT_BACKEND", "nomad")
    with pytest.raises(kt.ConfigError, match="KT_BACKEND"):
        resolve_backend(None)
    with pytest.raises(kt.ConfigError, match="unknown backend"):
        get_provider("nomad")


def test_every_memory_unit_is_kubernetes_own() -> None:
    """The suffixes and factors of Kubernetes quantities, each one (a wrong factor for a
    unit no other test uses would pass unnoticed; "Ki" was refused until this test)."""
    expected = {
        "3": 3,
        "3k": 3_000,
        "3M": 3_000_000,
        "3G": 3 * 10**9,
        "3T": 3 * 10**12,
        "3Ki": 3 * 1024,
        "3Mi": 3 * 1024**2,
        "3Gi": 3 * 1024**3,
        "3Ti": 3 * 1024**4,
        "3P": 3 * 10**15,
        "3Pi": 3 * 1024**5,
        "1.5Gi": 3 * 512 * 1024**2,
    }
    assert {q: parse_memory(q) for q in expected} == expected
    for bad in ("3ki", "3KI", "3 bytes", "Gi"):  # "3ki" used to raise KeyError
        with pytest.raises(kt.ConfigError, match="not a quantity"):
            parse_memory(bad)


def test_a_registered_backend_must_name_a_provider_class() -> None:
    from kt.core.provider import get_provider, register_backend

    with pytest.raises(kt.ConfigError, match="not 'module:Class'"):
        register_backend("broken", "kt.local.provider")
    register_backend("not-a-provider", "kt.core.compute:Compute")
    with pytest.raises(kt.ConfigError, match="not a kt Provider class"):
        get_provider("not-a-provider")
    register_backend("missing", "kt.no_such_module:P")
    with pytest.raises(kt.ConfigError, match="not available"):
        get_provider("missing")
