"""Payloads: scalars and code round-trip; large buffers travel out of band, without a copy
on either side; a failing argument or attribute is named."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kt.core import serialization
from kt.core.errors import SerializationError


def test_round_trip_plain_and_code() -> None:
    for value in [1, "s", (1, 2.5, None), {"a": [1, 2]}, lambda x: x + 1]:
        out = serialization.loads(serialization.dumps_bytes(value))
        if callable(value):
            assert out(1) == 2
        else:
            assert out == value


def test_100mib_array_is_not_copied_into_one_bytes_object() -> None:
    arr = np.arange(100 * 2**20, dtype=np.uint8)
    parts = serialization.dumps(arr)
    big = [p for p in parts if isinstance(p, memoryview)]
    assert len(big) == 1 and big[0].nbytes == arr.nbytes
    assert np.shares_memory(np.frombuffer(big[0], dtype=np.uint8), arr)
    assert sum(len(p) for p in parts if isinstance(p, bytes)) < 4096
    # receiving side: the array is a view on the receive buffer
    payload = bytearray(b"".join(parts))
    out = serialization.loads(memoryview(payload))
    assert np.array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(payload, dtype=np.uint8))


def test_failing_argument_is_named() -> None:
    class Box:
        def __init__(self) -> None:
            self.fine = [1, 2]
            self.lock = threading.Lock()

    with pytest.raises(SerializationError) as info:
        serialization.dumps_call((1, Box()), {}, "A.m")
    assert info.value.path == "argument 1.lock"
    with pytest.raises(SerializationError) as info:
        serialization.dumps_call((), {"x": [threading.Lock()]}, "A.m")
    assert info.value.path == "argument 'x'[0]"


def test_exception_round_trip_keeps_type_and_traceback() -> None:
    payload = serialization.dumps_exception(KeyError("k"), "A.m on pod p", "Traceback: here")
    exc = serialization.loads_exception(payload)
    assert isinstance(exc, KeyError) and exc.args == ("k",)
    assert "Traceback: here" in str(exc.__cause__)


def test_cpu_tensors_travel_as_arrays_and_come_back_equal() -> None:
    torch = pytest.importorskip("torch")
    tied = torch.randn(4)
    values = [
        torch.randn(3, 4),
        torch.randn(3, 4)[:, 1:],  # a non-contiguous view
        torch.arange(10) > 4,
        torch.randn(2, requires_grad=True),
        torch.randn(4).to(torch.bfloat16),  # numpy has no bfloat16: torch's own path
        torch.zeros(0),
    ]
    for value in values:
        out = serialization.loads(serialization.dumps_bytes(value))
        assert type(out) is torch.Tensor and out.dtype == value.dtype
        assert out.requires_grad == value.requires_grad
        assert torch.equal(out.detach(), value.detach())
    pair = serialization.loads(serialization.dumps_bytes({"a": tied, "b": tied}))
    assert pair["a"] is pair["b"]  # the same tensor twice stays one tensor
    big = torch.arange(2**20, dtype=torch.float32)  # 4 MiB: out of band, as an array
    parts = serialization.dumps(big)
    assert any(isinstance(p, memoryview) and p.nbytes == 4 * 2**20 for p in parts)
    assert torch.equal(serialization.loads(b"".join(parts)), big)
