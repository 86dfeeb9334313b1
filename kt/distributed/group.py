"""SPMD groups: N workers x M long-lived rank actors with torchrun's contract.

Who calls it: `kt.fn(f).to(c)` and `kt.cls(C).to(c)` when `c = compute.distribute(...)`,
through the factory `kt.distributed` registers with `kt.actors.api.register_spmd`.

Theory of operation: an *attempt* is one incarnation of the group: an agent actor on pod
0 (`kt.distributed.agent`: MASTER_PORT and the agent store) and N*M rank actors, rank r
pinned to pod r // M with torchrun's environment (`kt.distributed.env`). Rank processes
live across calls, so a second call re-imports and re-rendezvouses nothing. Calls wait
at a gate while an attempt starts or recovers, then fan out (`kt.distributed.fanout`).
A failed call goes to the group's lifecycle thread, which picks the root cause, raises it
naming the rank, and lets the pure policy (`kt.distributed.state`) resume, restart
(kill every rank, start attempt N+1 with TORCHELASTIC_RESTART_COUNT=N+1) or fail.

The group's state is `GroupState` alone: RUNNING is the open gate (calls go straight to
the ranks), FAILED and STOPPED carry the error every call raises, and every change goes
through `_move`, which checks the table, sends or fails the calls that waited, and wakes
whoever waits for the group, all under the one state lock. Lifecycle work (placing,
killing, recovering) is queued to the group's one lifecycle thread and done there in
order, never on kt's event-loop thread (killing and placing actors block) and never two
at once. A rank that dies between calls is noticed by the next call, which fails and
restarts the group.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kt.actors.api import RemoteClass, cls, kill
from kt.core.compute import Compute
from kt.core.config import config
from kt.core.errors import ActorDiedError, ConfigError, GroupFailedError, KtError, seconds
from kt.core.ref import Ref
from kt.core.sync import resolve_root
from kt.distributed import env as envs
from kt.distributed import rendezvous
from kt.distributed.agent import RankAgent
from kt.distributed.fanout import FanOut, GroupMethod, RankView
from kt.distributed.state import Decision, GroupState, check_transition, decide, root_cause

if TYPE_CHECKING:
    from kt.actors.handle import ActorHandle

logger = logging.getLogger(__name__)
STORE_TIMEOUT_S = 1800.0  # the agent store's own wait timeout; torchrun's default
GRACE_S = 2.0  # after a rank raised: how long its peers may take to finish the call
SETTLE_S = 0.25  # after a rank raised: how long a peer's death may take to be reported


@dataclass
class Attempt:
    """One incarnation of the group: its agent and ranks (restart_count = number)."""

    number: int
    agent: ActorHandle
    ranks: list[ActorHandle] = field(default_factory=list)


class SpmdGroup:
    """Every rank of an SPMD group, called as one; results come back ordered by rank.

    Set against `kt.Service`: a service balances each call onto one replica; a group runs
    each call on every rank (or the ranks `rank()`/`ranks()` pick) and restarts as a unit.
    """

    def __init__(
        self,
        remote_cls: RemoteClass[Any],
        compute: Compute,
        init_args: tuple[Any, ...] = (),
        init_kwargs: dict[str, Any] | None = None,
        *,
        max_restarts: int | None = None,
        grace: float = GRACE_S,
        settle: float = SETTLE_S,
    ) -> None:
        dist = compute.distribution
        if dist is None:
            raise ConfigError("an SPMD group needs compute.distribute(...)")
        opts = remote_cls.actor_options
        self._name = remote_cls.__name__
        self._kind = dist.kind
        self.max_restarts = opts.max_restarts if max_restarts is None else max_restarts
        if self.max_restarts < 0:
            raise ConfigError(f"max_restarts={self.max_restarts} is negative")
        self._run_id = str(uuid.uuid4())
        self._grace, self._settle = grace, settle
        self._specs = envs.rank_specs(dist.workers, dist.procs_per_worker)
        self.world_size = len(self._specs)
        self._compute = compute
        self._remote_cls = remote_cls
        self._init = (init_args, dict(init_kwargs or {}))
        self._methods = remote_cls.methods
        # The caller's project, found now: ranks are placed from the lifecycle thread,
        # whose stack has no user frames to find it from.
        root = resolve_root(opts.sync_dir) if config.sync else None
        self._sync_dir: str | bool = str(root) if root is not None else False
        self._lock = threading.Condition()  # state, attempt, error, waiting; woken on moves
        self._state = GroupState.STARTING
        self._attempt: Attempt | None = None  # current attempt, None before the first
        self._error: BaseException | None = None  # what calls raise: set iff FAILED/STOPPED
        self._waiting: list[Callable[[Attempt | BaseException], None]] = []
        self._ops: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lifecycle = threading.Thread(
            target=self._serve_ops, name=f"kt-spmd-{self._name}", daemon=True
        )
        self._lifecycle.start()
        self._do(self._start, 0)

    def __repr__(self) -> str:
        return f"<kt.distributed.SpmdGroup {self._name} x{self.world_size} {self._state.value}>"

    # Public names are few and plain, because every other attribute is a method of the
    # user's class (`group.step`); `method(name)` reaches one these names hide.
    @property
    def group_state(self) -> GroupState:
        return self._state

    # -- calling ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> GroupMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return GroupMethod(self, name, range(self.world_size), False)

    def remote(self, *args: Any, **kwargs: Any) -> Ref[list[Any]]:
        return self._call("__call__", range(self.world_size), args, kwargs, single=False)

    def __call__(self, *args: Any, **kwargs: Any) -> list[Any]:
        result: list[Any] = self.remote(*args, **kwargs).result()
        return result

    def method(self, name: str) -> GroupMethod:
        """`group.method("rank")`: the user's method of that name, on every rank."""
        return GroupMethod(self, name, range(self.world_size), False)

    def rank(self, i: int) -> RankView:
        return RankView(self, [i], single=True)

    def ranks(self, ranks: Sequence[int]) -> RankView:
        return RankView(self, list(ranks), single=False)

    @property
    def restart_count(self) -> int:
        attempt = self._attempt
        return 0 if attempt is None else attempt.number

    def _check_method(self, method: str) -> None:
        kind = self._methods.get(method)
        if kind is None:
            raise AttributeError(f"{self._name} has no method {method!r}")
        if kind.streams:
            raise ConfigError(
                f"{self._name}.{method} is a generator: SPMD groups gather one result per "
                "rank; return a list instead"
            )

    def _call(
        self,
        method: str,
        ranks: Sequence[int],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        single: bool,
    ) -> Ref[Any]:
        self._check_method(method)
        call = FanOut(ranks, f"{self._name}.{method}", single=single, on_failure=self._failed)

        def go(attempt: Attempt | BaseException) -> None:
            if isinstance(attempt, BaseException):
                call.out.set_exception(attempt)
                return
            call.attempt = attempt
            call.send(attempt.ranks, method, args, kwargs)

        with self._lock:
            if self._error is not None:
                go(self._error)
            elif self._state is GroupState.RUNNING and self._attempt is not None:
                go(self._attempt)
            else:
                self._waiting.append(go)  # sent in order by the move to RUNNING
        return call.out

    def _handle_of(self, rank: int, timeout: float | None) -> ActorHandle:
        with self._lock:
            running = lambda: self._state is GroupState.RUNNING or self._error is not None  # noqa: E731
            if not self._lock.wait_for(running, timeout):
                raise KtError(
                    f"SPMD group {self._name} was not running within {seconds(timeout or 0)}"
                )
            if self._error is not None:
                raise self._error
            assert self._attempt is not None
            return self._attempt.ranks[rank]

    # -- lifecycle ---------------------------------------------------------------------------
    def _do(self, op: Callable[..., None], *args: Any) -> None:
        """Queue `op(*args)` for the lifecycle thread (from any thread)."""
        self._ops.put(lambda: op(*args))

    def _serve_ops(self) -> None:
        """The lifecycle thread: one operation at a time, in order; None ends it after
        killing what the group still has."""
        while (op := self._ops.get()) is not None:
            try:
                op()
            except Exception:  # a bug: keep serving, so teardown still works
                logger.exception("group %s: a lifecycle operation failed", self._name)
        attempt = self._attempt
        if attempt is not None:
            self._kill(attempt)

    def _move(self, finish: GroupState, error: BaseException | None = None) -> None:
        """The one place the state changes (lock held). RUNNING sends the calls that
        waited, in order; FAILED and STOPPED fail them with `error`, which later calls
        raise at once."""
        check_transition(f"SPMD group {self._name}", self._state, finish)
        logger.debug("group %s: %s -> %s", self._name, self._state.value, finish.value)
        self._state = finish
        over = finish in (GroupState.FAILED, GroupState.STOPPED)
        assert over == (error is not None), (finish, error)
        self._error = error
        if finish is GroupState.RUNNING or over:
            waiting, self._waiting = self._waiting, []
            for go in waiting:
                go(error if error is not None else self._current())
        self._lock.notify_all()

    def _current(self) -> Attempt:
        assert self._attempt is not None
        return self._attempt

    def _start(self, number: int) -> None:
        """Lifecycle thread: launch attempt `number` and run it (or fail the group)."""
        try:
            attempt = self._launch(number)
        except BaseException as exc:
            logger.error("group %s: attempt %d could not start: %s", self._name, number, exc)
            with self._lock:
                if self._state is not GroupState.STOPPED:
                    self._move(GroupState.FAILED, exc)
            return
        with self._lock:
            stopped = self._state is GroupState.STOPPED
            self._attempt = attempt
            if not stopped:
                self._move(GroupState.RUNNING)
        if stopped:
            self._kill(attempt)

    def _launch(self, number: int) -> Attempt:
        """Place the agent and every rank of attempt `number` (all of them, or none)."""
        c = self._compute
        timeout = c.launch_timeout + config.placement_timeout  # pods may have to start
        opts = self._remote_cls.actor_options
        agent_cls = cls(RankAgent).options(compute=c, cpus=0, sync_dir=False)
        agents = [agent_cls.options(pod=w).remote() for w in range(len(self._pod_range()))]
        attempt = Attempt(number, agents[0])
        try:
            hosts = [a.wait_placed(timeout)[0] for a in agents]
            port = agents[0].reserve_port.remote(hosts[0]).result(timeout)
            for extra in agents[1:]:  # they only told us their pod's address
                _kill_quietly(extra)
            if self._kind == "pytorch":
                store = agents[0].serve_store.remote(hosts[0], self.world_size, STORE_TIMEOUT_S)
                store.on_done(lambda ref: self._store_done(attempt, ref))
            else:  # rank 0's own coordinator binds MASTER_PORT
                agents[0].release_port.remote().result(timeout)
            user_env = dict(opts.env or {})
            pod_env = {**c.env, **user_env}
            dist = c.distribution
            assert dist is not None
            per_rank = {"cpus": c.cpu_count / dist.procs_per_worker}
            if c.gpus:
                per_rank["gpus"] = c.gpus // dist.procs_per_worker
            for spec in self._specs:
                rank_env = envs.torchrun_env(
                    spec,
                    master_addr=hosts[0],
                    master_port=port,
                    run_id=self._run_id,
                    restart_count=number,
                    max_restarts=self.max_restarts,
                    pod_ips=hosts,
                    use_agent_store=self._kind == "pytorch",
                    error_file=envs.error_file(self._run_id, number, spec.rank),
                    pod_env=pod_env,
                )
                rank_cls = self._remote_cls.options(
                    compute=c,
                    pod=spec.group_rank,
                    env={**user_env, **rank_env},
                    name=None,
                    get_if_exists=False,
                    max_restarts=0,  # the group restarts, not the rank
                    sync_dir=self._sync_dir,
                    **per_rank,
                )
                attempt.ranks.append(rank_cls.remote(*self._init[0], **self._init[1]))
            for handle in attempt.ranks:  # gang: a rank that cannot be placed fails them all
                handle.wait_placed(timeout)
            if self._kind == "pytorch":  # before any call: each init meets a clean store
                hooks = [h.run_hook(rendezvous.install) for h in attempt.ranks]
                if not all(hook.result(timeout) for hook in hooks):
                    logger.warning("torch has no env:// hook: a second init may hang")
        except BaseException:
            self._kill(attempt)
            for extra in agents[1:]:
                _kill_quietly(extra)
            raise
        logger.info(
            "group %s: attempt %d placed: %d ranks on %d pods, master %s:%d",
            self._name,
            number,
            self.world_size,
            len(hosts),
            hosts[0],
            port,
        )
        return attempt

    def _pod_range(self) -> range:
        dist = self._compute.distribution
        assert dist is not None
        return range(dist.workers)

    def _store_done(self, attempt: Attempt, ref: Ref[int]) -> None:
        exc = None if ref.cancelled() else ref.exception()
        if exc is None:
            return
        if isinstance(exc, ImportError):
            exc = ConfigError(
                f"distribute('pytorch') needs torch on the pods ({exc}): install kt[torch] "
                "into the image, or use distribute('spmd')"
            )
        self._do(self._store_failed, attempt, exc)

    def _store_failed(self, attempt: Attempt, exc: BaseException) -> None:
        """Lifecycle thread: the agent store of `attempt` ended. That matters only while
        the attempt serves (its own kill, a restart or a teardown ends it too)."""
        with self._lock:
            serving = (GroupState.RUNNING, GroupState.RECOVERING)
            if self._attempt is not attempt or self._state not in serving:
                return
            logger.error("group %s: the agent store failed: %s", self._name, exc)
            self._move(GroupState.FAILED, exc)
        self._kill(attempt)

    def _kill(self, attempt: Attempt) -> None:
        for handle in [*attempt.ranks, attempt.agent]:
            _kill_quietly(handle)

    def teardown(self) -> None:
        """Kill every rank and the agent; later calls raise. Safe to call twice.

        Waits for the lifecycle operation in progress (a start lets its placement finish,
        then kills what it made)."""
        with self._lock:
            if self._state is GroupState.STOPPED:
                return
            self._move(GroupState.STOPPED, KtError(f"SPMD group {self._name} was torn down"))
        self._ops.put(None)
        if threading.current_thread() is not self._lifecycle:
            self._lifecycle.join()

    # -- failures --------------------------------------------------------------------------
    def _failed(self, call: FanOut) -> None:
        """First failed rank of `call` (any thread): close the gate, recover in background."""
        attempt: Attempt = call.attempt
        with self._lock:
            late = attempt is not self._attempt or self._state is not GroupState.RUNNING
            if not late:
                self._move(GroupState.RECOVERING)
        if late:  # another call already brought this attempt down: report this one as is
            failure, exc = call.snapshot()[0]
            note = "the group was already stopping after another failed call"
            call.out.set_exception(self._worded(failure.rank, exc, attempt, note))
            return
        self._do(self._recover, call)

    def _recover(self, call: FanOut) -> None:
        """Lifecycle thread: wait for the rest of the failed call, then let the policy
        decide."""
        attempt: Attempt = call.attempt
        start = time.monotonic()
        if not call.snapshot()[0][0].died:  # a death may be on its way: let it arrive
            while time.monotonic() - start < self._settle and not call.finished.is_set():
                if any(f.died for f, _ in call.snapshot()):
                    break
                time.sleep(0.01)
        failures = call.snapshot()
        cause = root_cause([f for f, _ in failures])
        exc = next(e for f, e in failures if f is cause)
        left = self.max_restarts - attempt.number
        if cause.died:
            if left > 0:
                note = f"the group restarts as attempt {attempt.number + 1} ({left - 1} of "
                note += f"{self.max_restarts} restarts left after it)"
            else:
                note = f"no restarts left (max_restarts={self.max_restarts}): group failed"
        else:
            note = f"ranks still running after {self._grace:g} s are stopped, as torchrun does"
        call.out.set_exception(self._worded(cause.rank, exc, attempt, note))
        if not cause.died:
            call.finished.wait(max(0.0, self._grace - (time.monotonic() - start)))
            failures = call.snapshot()
            if any(f.died for f, _ in failures):  # a rank died meanwhile: that is the cause
                cause = root_cause([f for f, _ in failures])
                exc = next(e for f, e in failures if f is cause)
        decision = decide(cause=cause, all_finished=call.finished.is_set(), restarts_left=left)
        self._carry_out(decision, attempt, cause.rank, exc)

    def _carry_out(
        self, decision: Decision, attempt: Attempt, rank: int, exc: BaseException
    ) -> None:
        """Lifecycle thread: resume, restart or fail after rank `rank` raised `exc`."""
        with self._lock:
            if self._state is not GroupState.RECOVERING or self._attempt is not attempt:
                return  # stopped meanwhile, or its store failed first
            if decision is Decision.RESUME:
                self._move(GroupState.RUNNING)
                return
            if decision is Decision.RESTART:
                self._move(GroupState.STARTING)
            else:
                self._move(GroupState.FAILED, self._group_failed(attempt, rank, exc))
        self._kill(attempt)
        if decision is Decision.RESTART:
            logger.warning(
                "group %s: rank %d failed (%s); restarting as attempt %d (%d/%d restarts left)",
                self._name,
                rank,
                str(exc)[:256],
                attempt.number + 1,
                self.max_restarts - attempt.number - 1,
                self.max_restarts,
            )
            self._start(attempt.number + 1)
            return
        logger.error("group %s: rank %d failed and no restarts are left", self._name, rank)

    def _group_failed(self, attempt: Attempt, rank: int, exc: BaseException) -> GroupFailedError:
        """What every later call raises once rank `rank`'s failure used the last restart."""
        if isinstance(exc, ActorDiedError):
            pod = exc.pod
        else:
            address = attempt.ranks[rank].address if rank < len(attempt.ranks) else None
            pod = f"{address[0]}:{address[1]}" if address else "unknown"
        return GroupFailedError(
            self._name,
            rank,
            pod,
            f"failed ({str(exc)[:256]}) and no restarts were left "
            f"(max_restarts={self.max_restarts})",
        )

    def _worded(self, rank: int, exc: BaseException, attempt: Attempt, note: str) -> BaseException:
        """`exc` naming the rank: a new ActorDiedError for a death, else `exc` with a note."""
        where = f"rank {rank} of SPMD group {self._name} (attempt {attempt.number})"
        if isinstance(exc, ActorDiedError):
            why = f": {exc.reason}" if exc.reason else ""
            worded = ActorDiedError(
                exc.actor,
                exc.pod,
                exit_code=exc.exit_code,
                signal=exc.signal,
                oom=exc.oom,
                reason=f"{where}{why}; {note}",
            )
            worded.__cause__ = exc
            return worded
        exc.add_note(f"raised on {where}; {note}")
        return exc


def _kill_quietly(handle: ActorHandle) -> None:
    """kt.kill, for teardown: an actor that never got placed has nothing to kill."""
    try:
        kill(handle)
    except KtError as exc:
        logger.debug("kill %r: %s", handle, exc)
