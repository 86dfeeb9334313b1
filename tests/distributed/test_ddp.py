"""DDP through kt gives bit-identical parameters to the same script under torchrun.

Behaviours covered:
- a 2 workers x 2 procs group runs an unmodified `init_process_group("gloo")` DDP script;
- its final parameters equal, with torch.equal, those of `torchrun --standalone
  --nproc_per_node=4` on the same seed (run here as a real subprocess);
- every rank ends with the same parameters, and training moved them;
- the same group called five times (each call initialising and destroying its process
  group, as a torchrun script does) gives the same parameters every time, and so does a
  function that initialises once and keeps its group across calls: each
  `init_process_group` of a long-lived rank meets a clean rendezvous.
"""

from __future__ import annotations

import pathlib

import pytest

import kt
from tests.distributed import ddp_train
from tests.distributed.torchrun import finish, launcher_env, torchrun

torch = pytest.importorskip("torch")


@pytest.mark.timeout(300)
def test_ddp_under_kt_matches_torchrun_bit_for_bit(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "torchrun.pt"
    proc = torchrun(
        [
            "--standalone",  # torchrun binds its own free port: no port picked, then raced for
            "--nproc_per_node=4",
            ddp_train.__file__,
            str(out),
        ],
        launcher_env(),
    )
    compute = kt.Compute(cpus=2, backend="local").distribute(
        "pytorch", workers=2, procs_per_worker=2
    )
    calls = []
    for fn in (ddp_train.train, ddp_train.train_kept):  # one group at a time: the pool fits one
        group = kt.fn(fn).to(compute)
        try:
            calls += [group.remote().result(timeout=120) for _ in range(5)]
        finally:
            group.teardown()
    finish(proc)
    reference = torch.load(out)

    assert len(calls) == 10
    for states in calls:
        assert len(states) == 4
        assert list(reference) == list(states[0])
        for state in states:
            for key, value in reference.items():
                assert torch.equal(state[key], value), key
    torch.manual_seed(0)
    initial = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    assert not torch.equal(initial.state_dict()["0.weight"], reference["0.weight"])
