"""Each rank's environment is torchrun's, key for key.

Behaviours covered:
- a 2 x 2 group's ranks get exactly the variables a real two-node torchrun (static
  rendezvous, 2 procs per node) adds, with the same values, except run ids, ports,
  addresses and the error file's path; kt's own KT_* variables aside;
- KT_POD_IPS lists every worker pod's address, MASTER_ADDR is pod 0's, and ranks of one
  worker share a pod;
- RANK = GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK (`rank_specs`), and OMP_NUM_THREADS
  is filled in only when unset and more than one process runs per worker (`torchrun_env`).
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest

import kt
from kt.distributed.env import RankSpec, rank_specs, torchrun_env
from tests.distributed import envdump
from tests.distributed.torchrun import finish, free_port, launcher_env, torchrun

pytest.importorskip("torch")

# Values that differ between any two launches, of torchrun as of kt.
VARYING = {"MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"}


def _kt_runtime_var(key: str) -> bool:
    """Set by kt's worker processes or pytest, not by the SPMD layer."""
    return key.startswith(("KT_", "PYTEST_")) or key == "PYTHONUNBUFFERED"


def _torchrun_envs(outdir: pathlib.Path) -> dict[int, dict[str, str]]:
    base = launcher_env()
    env = dict(base, BASE_ENV_JSON=json.dumps(base))
    port = str(free_port())
    procs = [
        torchrun(
            [
                "--nnodes=2",
                f"--node_rank={node}",
                "--nproc_per_node=2",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                envdump.__file__,
                str(outdir),
            ],
            env,
        )
        for node in (0, 1)
    ]
    for proc in procs:
        finish(proc)
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in outdir.glob("rank*.json")}


@pytest.mark.timeout(120)
def test_rank_env_matches_torchrun_key_for_key(tmp_path: pathlib.Path) -> None:
    compute = kt.Compute(cpus=2, backend="local").distribute(
        "pytorch", workers=2, procs_per_worker=2
    )
    group = kt.fn(envdump.added).to(compute)
    try:
        base = dict(os.environ)
        ours = dict(enumerate(group.remote(base).result(timeout=90)))
    finally:
        group.teardown()
    theirs = _torchrun_envs(tmp_path)
    assert sorted(theirs) == sorted(ours) == [0, 1, 2, 3]
    for rank in range(4):
        mine = {k: v for k, v in ours[rank].items() if not _kt_runtime_var(k)}
        assert sorted(mine) == sorted(theirs[rank]), f"rank {rank}"
        for key in sorted(set(theirs[rank]) - VARYING):
            assert mine[key] == theirs[rank][key], f"rank {rank}: {key}"
    pods = ours[0]["KT_POD_IPS"].split(",")
    assert len(pods) == 2 and ours[0]["MASTER_ADDR"] == pods[0]
    assert len({ours[r]["MASTER_PORT"] for r in range(4)}) == 1
    assert ours[0]["KT_POD"] == ours[1]["KT_POD"] != ours[2]["KT_POD"] == ours[3]["KT_POD"]


def test_rank_specs_follow_torchrun_numbering() -> None:
    specs = rank_specs(3, 2)
    assert [s.rank for s in specs] == list(range(6))
    for s in specs:
        assert s.rank == s.group_rank * s.local_world_size + s.local_rank
        assert (s.world_size, s.local_world_size, s.group_world_size) == (6, 2, 3)


def _env(procs: int, pod_env: dict[str, str]) -> dict[str, str]:
    spec = RankSpec(0, 0, 0, procs, procs, 1)
    return torchrun_env(
        spec,
        master_addr="10.0.0.1",
        master_port=1234,
        run_id="r",
        restart_count=2,
        max_restarts=3,
        pod_ips=["10.0.0.1"],
        use_agent_store=True,
        error_file="/tmp/e.json",
        pod_env=pod_env,
    )


def test_omp_threads_default_only_when_unset_and_several_procs() -> None:
    assert _env(2, {})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in _env(1, {})
    assert _env(2, {"OMP_NUM_THREADS": "4"})["OMP_NUM_THREADS"] == "4"
    env = _env(2, {})
    assert env["TORCHELASTIC_RESTART_COUNT"] == "2" and env["TORCHELASTIC_MAX_RESTARTS"] == "3"
