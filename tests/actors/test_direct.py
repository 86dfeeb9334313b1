"""The direct path's decisions (`kt.actors.direct`), on CPU tensors and meta ones.

Behaviours covered:
- a put's transport: None keeps a CPU state dict in the store only; "gloo" holds CPU
  tensors in an actor, and is refused from the driver (saying where to call it), for a
  value that is not a state dict, and for tensors not all on the CPU; "nccl" is refused
  for CPU tensors naming their devices; an unknown transport names the choices;
- which `into` can receive a held value directly (every value a tensor, one device of
  the held value's kind), and the endpoint text a value's meta carries.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kt.actors import direct
from kt.core.errors import ConfigError

CPU = {"w": torch.zeros(3), "b": torch.ones(2, 2)}


def test_none_keeps_a_cpu_state_dict_in_the_store_and_gloo_holds_it_in_a_worker() -> None:
    assert direct.transport_for(CPU, None, in_worker=True, key="k") == "store"
    assert direct.transport_for(CPU, "store", in_worker=False, key="k") == "store"
    assert direct.transport_for(CPU, "gloo", in_worker=True, key="k") == "gloo"
    assert direct.transport_for([1, 2], None, in_worker=True, key="k") == "store"


@pytest.mark.parametrize(
    ("value", "asked", "in_worker", "why"),
    [
        (CPU, "gloo", False, "call it in an actor or a rank"),
        (
            CPU,
            "nccl",
            True,
            "needs every tensor on a CUDA device (one device); they are on ['cpu']",
        ),
        ({"w": torch.zeros(1), "m": torch.zeros(1, device="meta")}, "gloo", True, "on the CPU"),
        ([torch.zeros(1)], "gloo", True, "must be a dict of str to torch tensors"),
        ({"w": torch.zeros(1), "step": 3}, "gloo", True, "must be a dict of str to torch"),
        ({}, "gloo", True, "must be a dict of str to torch tensors"),
        (CPU, "rdma", True, "choose one of ('store', 'nccl', 'gloo')"),
    ],
)
def test_a_transport_the_value_or_process_cannot_use_is_refused(
    value: object, asked: str, in_worker: bool, why: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        direct.transport_for(value, asked, in_worker=in_worker, key="weights/v1")
    assert why in str(caught.value)
    assert "weights/v1" in str(caught.value) or asked == "rdma"


def test_into_takes_a_held_value_directly_only_when_all_its_tensors_suit() -> None:
    assert direct.takes("gloo", CPU)
    assert not direct.takes("nccl", CPU)  # CPU tensors do not take NCCL's
    assert not direct.takes("gloo", {"w": np.zeros(3)})  # arrays read the store
    assert not direct.takes("gloo", {"w": torch.zeros(1), "n": 1})
    assert not direct.takes("gloo", {"w": torch.zeros(1), "m": torch.zeros(1, device="meta")})
    assert not direct.takes("gloo", {})
    assert direct.device_kind({"m": torch.zeros(1, device="meta")}) == ""
    assert direct.device_kind(CPU) == "cpu"


def test_an_endpoint_names_its_backend_address_and_process() -> None:
    text = direct.endpoint("gloo", "127.0.3.4:5555")
    assert direct.parse_endpoint(text) == ("gloo", "127.0.3.4:5555", direct.PROCESS)
    for bad in ["", "gloo", "tcp@1.2.3.4:5/p", "nccl@nohost/p", "gloo@1.2.3.4:5"]:
        with pytest.raises(ValueError, match="endpoint"):
            direct.parse_endpoint(bad)
