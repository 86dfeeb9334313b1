"""A pod's GPUs without a GPU: discovery from the environment (no torch, NVML only when
asked), the pure choice of devices for a request, and what each process is shown.

Behaviours covered:
- KT_GPUS (a count or ids) overrides; the device plugin's NVIDIA_VISIBLE_DEVICES counts
  from 0 (`all` asks NVML); CUDA_VISIBLE_DEVICES keeps its ids; else NVML; none: no GPUs;
  a KT_GPUS that is neither is refused naming the fix;
- requests: whole free devices (a preferred one first), shares packed onto the fullest
  device they fit, nothing when they do not fit; 1.5 and negatives refused;
- an actor sees only its own devices; a rank sees all of its pod's with its own at
  `cuda:<LOCAL_RANK>`;
- a table gives back what a dead actor held, and says what it has when a request does
  not fit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kt.core.errors import ConfigError
from kt.core.gpus import GpuTable, check_amount, discover, gpu_ids, pick, visible_devices


def _no_nvml() -> int | None:
    return None


def test_discovery_reads_the_override_the_plugin_cuda_then_nvml() -> None:
    assert discover({"KT_GPUS": "4"}, _no_nvml) == ("0", "1", "2", "3")
    assert discover({"KT_GPUS": "1,3", "CUDA_VISIBLE_DEVICES": "0"}, _no_nvml) == ("1", "3")
    assert discover({"KT_GPUS": "0"}, _no_nvml) == ()
    assert discover({"NVIDIA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}, _no_nvml) == ("0", "1")
    assert discover({"NVIDIA_VISIBLE_DEVICES": "all"}, lambda: 2) == ("0", "1")
    assert discover({"NVIDIA_VISIBLE_DEVICES": "void"}, lambda: 8) == ()
    assert discover({"CUDA_VISIBLE_DEVICES": "2,5"}, lambda: 8) == ("2", "5")
    assert discover({"CUDA_VISIBLE_DEVICES": "-1"}, lambda: 8) == ()
    assert discover({}, lambda: 3) == ("0", "1", "2")
    assert discover({}, _no_nvml) == ()
    with pytest.raises(ConfigError, match=r"KT_GPUS=' ,': give a count \(4\) or device ids"):
        discover({"KT_GPUS": " ,"}, _no_nvml)


def test_without_nvml_the_drivers_proc_listing_counts(tmp_path: Path) -> None:
    from kt.core.gpus import _nvml_count

    if importlib.util.find_spec("pynvml") is not None:
        pytest.skip("nvidia-ml-py is installed here: NVML answers, not /proc")
    (tmp_path / "0000:17:00.0").mkdir()
    (tmp_path / "0000:65:00.0").mkdir()
    assert _nvml_count(str(tmp_path)) == 2  # nvidia-ml-py is not installed here
    assert _nvml_count(str(tmp_path / "absent")) is None


def test_whole_devices_come_free_and_preferred_first_and_shares_pack() -> None:
    assert pick([0, 0, 0, 0], 2) == (0, 1)
    assert pick([0, 0, 0, 0], 1, prefer=2) == (2,)
    assert pick([1, 0, 0.5, 0], 2) == (1, 3)  # a device with a share held is not free
    assert pick([1, 0, 0.5, 0], 3) is None
    assert pick([0, 0.5, 0], 0.5) == (1,)  # the fullest it fits on: whole devices stay free
    assert pick([0.5, 0.75], 0.5) == (0,)
    assert pick([0.75, 0.75], 0.5) is None
    assert pick([], 0) == () and pick([], 1) is None
    for bad, why in [(1.5, "whole number"), (-1, "negative"), (float("nan"), "number")]:
        with pytest.raises(ConfigError, match=why):
            check_amount(bad)
    assert check_amount(0.5) == 0.5 and check_amount(2) == 2.0


@given(st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), max_size=12), st.integers(1, 4))
def test_a_table_never_gives_more_than_a_device_holds(asks: list[float], count: int) -> None:
    table = GpuTable(tuple(str(i) for i in range(count)))
    for n, amount in enumerate(asks):
        try:
            got = table.take(f"a{n}", amount)
        except ConfigError as exc:
            assert "does not fit" in str(exc) and f"{count} GPU(s)" in str(exc)
            continue
        assert len(got) == max(1, round(amount)) and len(set(got)) == len(got)
        assert all(u <= 1 + 1e-9 for u in table.used())
    for n in range(len(asks)):
        table.give_back(f"a{n}")
    assert table.used() == [0.0] * count and table.holdings() == {}


def test_a_restart_gives_back_first_and_a_pod_without_gpus_says_so() -> None:
    table = GpuTable(("0", "1"))
    assert table.take("a", 1) == (0,) and table.take("a", 1) == (0,)  # its own, again
    assert table.take("b", 1) == (1,)
    with pytest.raises(ConfigError, match=r"this pod has 2 GPU\(s\) \(0: 1 held, 1: 1 held\)"):
        table.take("c", 0.5)
    with pytest.raises(ConfigError, match="this pod has no GPUs"):
        GpuTable(()).take("a", 1)


def test_an_actor_sees_its_own_and_a_rank_sees_its_own_at_its_local_rank() -> None:
    devices = ("0", "1", "2", "3")
    assert visible_devices(devices, (2,), None) == ("2",)
    assert visible_devices(devices, (0,), 0) == ("0", "1", "2", "3")
    assert visible_devices(devices, (1,), 1) == ("0", "1", "2", "3")
    assert visible_devices(devices, (3,), 1) == ("0", "3", "1", "2")  # cuda:1 is device 3
    assert visible_devices(("0",), (0,), 1) == ("0",)  # no second device: its own only
    assert gpu_ids({"KT_GPU_IDS": "1,GPU-ab"}) == [1, "GPU-ab"] and gpu_ids({}) == []
