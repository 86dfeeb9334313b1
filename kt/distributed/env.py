"""Rank layout and the environment torchrun gives each rank: pure functions, no I/O.

Who calls it: `kt.distributed.group.SpmdGroup`, once per rank per attempt, before the
rank's actor is created (the actor process sets this environment before it unpickles
anything, so torch sees it at import). The names and values follow torch 2.13's
`LocalElasticAgent._start_workers` and `torch.distributed.run` (REFERENCES.md, "torchrun's
contract"); `tests/distributed/test_env.py` compares them, key for key, with a real
torchrun run. KT_POD_IPS (every worker pod's address, in group-rank order) is kt's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

ROLE_NAME = "default"
SIGNALS_TO_HANDLE = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


@dataclass(frozen=True)
class RankSpec:
    """Where one rank sits: worker pod `group_rank`, process `local_rank` on it.

    Set against `torch.distributed.elastic`'s `Worker`: a RankSpec is the layout only; the
    actor that runs it (and its restarts) belongs to the group.
    """

    rank: int
    local_rank: int
    group_rank: int
    world_size: int
    local_world_size: int
    group_world_size: int


def rank_specs(workers: int, procs_per_worker: int) -> list[RankSpec]:
    """Every rank of `workers` x `procs_per_worker`, ordered by global rank.

    RANK = GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK, as torchrun assigns it on one role.
    """
    world = workers * procs_per_worker
    return [
        RankSpec(
            rank=w * procs_per_worker + local,
            local_rank=local,
            group_rank=w,
            world_size=world,
            local_world_size=procs_per_worker,
            group_world_size=workers,
        )
        for w in range(workers)
        for local in range(procs_per_worker)
    ]


def torchrun_env(
    spec: RankSpec,
    *,
    master_addr: str,
    master_port: int,
    run_id: str,
    restart_count: int,
    max_restarts: int,
    pod_ips: list[str],
    use_agent_store: bool,
    error_file: str,
    pod_env: Mapping[str, str],
) -> dict[str, str]:
    """The variables torchrun would set for `spec`, plus KT_POD_IPS.

    `pod_env` is what the pod's processes already inherit (the Compute's env and the
    actor's own `env=` option): like torchrun, which passes the launcher's OMP_NUM_THREADS
    and TORCH_NCCL_ASYNC_ERROR_HANDLING through, kt only fills those in when absent.
    """
    env = {
        "RANK": str(spec.rank),
        "LOCAL_RANK": str(spec.local_rank),
        "GROUP_RANK": str(spec.group_rank),
        "ROLE_RANK": str(spec.rank),
        "ROLE_NAME": ROLE_NAME,
        "LOCAL_WORLD_SIZE": str(spec.local_world_size),
        "WORLD_SIZE": str(spec.world_size),
        "GROUP_WORLD_SIZE": str(spec.group_world_size),
        "ROLE_WORLD_SIZE": str(spec.world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": str(restart_count),
        "TORCHELASTIC_MAX_RESTARTS": str(max_restarts),
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": str(use_agent_store),
        "TORCHELASTIC_ERROR_FILE": error_file,
        "TORCHELASTIC_SIGNALS_TO_HANDLE": pod_env.get(
            "TORCHELASTIC_SIGNALS_TO_HANDLE", SIGNALS_TO_HANDLE
        ),
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": pod_env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "KT_POD_IPS": ",".join(pod_ips),
    }
    # torch.distributed.run: one thread per process unless the user chose, when a node
    # runs more than one process (else N processes x all cores oversubscribe the node).
    if "OMP_NUM_THREADS" in pod_env:
        env["OMP_NUM_THREADS"] = pod_env["OMP_NUM_THREADS"]
    elif spec.local_world_size > 1:
        env["OMP_NUM_THREADS"] = "1"
    return env


def error_file(run_id: str, restart_count: int, rank: int) -> str:
    """Where `torch.distributed.elastic`'s `@record` writes a rank's error.

    A flat name in the pod's /tmp, because `@record` opens the file without making its
    directory (torchrun's own layout, attempt_N/LOCAL_RANK/error.json, needs one).
    """
    return f"/tmp/kt-elastic-{run_id}-attempt{restart_count}-rank{rank}-error.json"
