"""The supervisor: one per pod. Accepts callers, hosts actors, relays calls.

Who runs it: `python -m kt.supervisor` (the pod's command). Theory of operation:

- A caller's TCP connection is a `Peer`. Its first frame must be HELLO with the pool's
  token, compared in constant time; until then every other frame closes the connection
  and nothing is unpickled (the supervisor never unpickles payloads at all).
- Each actor lives in its own worker process, reached over a Unix socket. A CALL is
  relayed to the actor's process as-is, with the frame's `route` field set to the
  caller's peer id; the worker echoes `route` in its RESULT, which is relayed back to
  that peer. No per-call dictionary of request ids is needed to route replies.
- The supervisor does remember which calls are in flight per actor, so that when the
  process dies each caller gets an ActorDiedError naming the exit code or signal.
- Borrowed Refs (`kt.core.ref`): a WAIT is relayed to the link of the Ref's owner -- an
  actor's own caller link (its *home*, the connection whose HELLO names the actor) or
  the caller on the route the WAIT names -- and the answer (a RESULT from that link) back
  to the asker. The supervisor remembers the WAITs each owner link has not answered, so
  that when it closes every asker gets an OwnerDiedError.
- Frames are dispatched through one handlers dict built in `__init__`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hmac
import logging
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from kt.core import gpus, protocol, serialization, shm
from kt.core.channel import BIG_FRAME, PRE_AUTH_MAX_FRAME, FrameChannel
from kt.core.config import config
from kt.core.errors import (
    ActorDiedError,
    ActorNotFoundError,
    ConfigError,
    DeathCause,
    ImageError,
    OwnerDiedError,
    SyncError,
    SyncSourceFailed,
    check_move,
)
from kt.core.liveness import pid_alive
from kt.core.protocol import FLAGS_OFFSET, ROUTE_OFFSET, FrameFlag, FrameKind
from kt.supervisor.datastore import FANOUT, DataService
from kt.supervisor.fetch import FetchError, fetch
from kt.supervisor.image import ImageCache
from kt.supervisor.metrics import MethodStats, PodStats
from kt.supervisor.processes import ExitInfo, ProcessManager, WorkerProcess
from kt.supervisor.store import Store, SyncRefused

logger = logging.getLogger(__name__)
_ROUTE = struct.Struct("<I")
# Plain ints on the hot path: enum member lookups and IntFlag's & are Python code.
_SHM_OK = int(FrameFlag.SHM_OK)
_RESULT = int(FrameKind.RESULT)
_ERROR = int(FrameFlag.ERROR)
HELLO_FIELDS = frozenset({"v", "token", "caller", "host", "actor"})
CALL_FIELDS = frozenset({"a", "m"})  # checked once per distinct header (then cached)
_WAIT = int(FrameKind.WAIT)
_REQ_MASK = (1 << 64) - 1

Handler = Callable[["Peer", int, memoryview, memoryview], None]
"""handler(peer, req_id, header, frame): one per frame kind, in Supervisor.handlers."""


class ActorState(str, enum.Enum):
    """STARTING -> ALIVE -> DEAD; STARTING -> DEAD (init failed or process died). Every
    change goes through `ActorRecord.move` and its table."""

    STARTING = "starting"
    ALIVE = "alive"
    DEAD = "dead"


_STARTING = ActorState.STARTING
_ACTOR_MOVES = {
    (ActorState.STARTING, ActorState.ALIVE),
    (ActorState.STARTING, ActorState.DEAD),
    (ActorState.ALIVE, ActorState.DEAD),
    (ActorState.DEAD, ActorState.DEAD),  # a kill, then its process's exit: one death
}


@dataclass
class ActorRecord:
    """An actor hosted on this pod and the worker process that holds it."""

    id: str
    name: str
    cls_name: str
    owner: int
    namespace: str = ""
    methods: dict[str, int] = field(default_factory=dict)
    named: bool = False
    worker: WorkerProcess | None = None
    backlog: list[bytes | bytearray | memoryview] = field(default_factory=list)
    state: ActorState = ActorState.STARTING
    inflight: dict[int, tuple[MethodStats, float]] = field(default_factory=dict)
    """(route << 64 | req_id) -> the call's method counters and when it was relayed."""
    death: ActorDiedError | None = None
    calls: int = 0
    home: int | None = None
    """Route of the actor process's own caller link: WAITs for its lent Refs go there."""
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    """The last lines it printed: its ActorDiedError carries them."""

    def send(self, frame: bytes | bytearray | memoryview) -> None:
        if self.worker is not None:
            self.worker.send(frame)
        else:
            self.backlog.append(frame)

    def move(self, to: ActorState, death: ActorDiedError | None = None) -> None:
        """The one place an actor's state changes; DEAD keeps the first death recorded.

        Raises:
            InvalidTransition: the table has no such move.
        """
        check_move(_ACTOR_MOVES, f"actor {self.id}", self.state, to)
        self.state = to
        if to is ActorState.DEAD and self.death is None:
            self.death = death

    def bind(self, worker: WorkerProcess) -> None:
        self.worker = worker
        for frame in self.backlog:
            worker.send(frame)
        self.backlog.clear()


class Peer:
    """The supervisor's end of one caller's connection."""

    def __init__(self, supervisor: Supervisor, route: int) -> None:
        self.supervisor = supervisor
        self.route = route
        self.caller = ""
        self.actor = ""  # set when this is an actor's home link
        self.authenticated = False
        self.same_host = False
        self.channel = FrameChannel(
            self._on_frame, self._on_lost, max_frame=PRE_AUTH_MAX_FRAME, on_refuse=self._refused
        )

    def _refused(self, why: str) -> None:
        """The channel refused what this caller sent: say why in a last frame."""
        self.channel.send(
            protocol.encode(FrameKind.REFUSED, 0, {"error": "protocol", "message": why})
        )

    @property
    def address(self) -> str:
        """Where the connection comes from (through a gateway: the gateway)."""
        transport = self.channel.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        return str(peer[0]) if peer else ""

    def _on_frame(
        self,
        kind: int,
        flags: int,
        route: int,
        req_id: int,
        header: memoryview,
        payload: memoryview,
        frame: memoryview,
    ) -> None:
        if not self.authenticated:
            self.supervisor.authenticate(self, kind, header)
            return
        self.supervisor.stats.bytes_in += len(frame)
        handler = self.supervisor.handlers.get(kind)
        if handler is None:
            self.channel.refuse(f"unknown frame kind {kind} from {self.caller}")
            return
        handler(self, req_id, header, frame)

    def _on_lost(self, exc: Exception | None) -> None:
        self.supervisor.peer_lost(self)


class Supervisor:
    """Serves one pod: callers over TCP, actors in worker processes over a Unix socket."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        token: str,
        pod: str,
        control_port: int | None = None,
        warm: int = 2,
        inactivity_ttl: float | None = None,
        driver_pid: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.control_port = control_port
        self.token = token.encode()
        self.pod = pod
        self.inactivity_ttl = inactivity_ttl
        self.driver_pid = driver_pid
        self.started = time.time()
        self.last_activity = time.monotonic()
        self.peers: dict[int, Peer] = {}
        self.actors: dict[str, ActorRecord] = {}
        self._routes: dict[bytes, tuple[ActorRecord, MethodStats]] = {}
        self.stats = PodStats()
        self._by_worker: dict[int, ActorRecord] = {}
        self.host_key = shm.host_key()
        self.gpus = gpus.GpuTable(gpus.discover(os.environ))
        self._device_waiters: dict[str, Callable[[], None]] = {}
        """Actors whose CREATE waits for devices that actors being killed still hold."""
        self._next_route = 1
        self.waits: dict[int, dict[int, tuple[str, str]]] = {}
        """owner route -> (asker route << 64 | req_id) -> (owner, label): WAITs unanswered."""
        self._tmp = tempfile.mkdtemp(prefix="kt-pod-")
        self.socket_path = os.path.join(self._tmp, "workers.sock")
        home = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        self.store = Store(os.path.join(self._tmp, "sync"))
        cache = os.environ.get("KT_IMAGE_CACHE") or os.path.join(self._tmp, "image")
        self.image = ImageCache(cache, pod)
        worker_env = {
            "KT_SUPERVISOR_ADDR": f"{home}:{port}",
            "KT_TOKEN": token,
            "KT_SYNC_ROOT": self.store.root,
            "KT_IMAGE_ROOT": self.image.root,
        }
        self.procs = ProcessManager(self.socket_path, pod=pod, warm=warm, env=worker_env)
        self.stopped = asyncio.Event()
        self.idle_exit = False  # it stopped because nobody called for inactivity_ttl
        self.handlers: dict[int, Handler] = {
            FrameKind.CALL: self.on_call,
            FrameKind.CREATE_ACTOR: self.on_create_actor,
            FrameKind.KILL_ACTOR: self.on_kill_actor,
            FrameKind.CANCEL: self.on_cancel,
            FrameKind.PING: self.on_ping,
            FrameKind.LOOKUP: self.on_lookup,
            FrameKind.WAIT: self.on_wait,
            FrameKind.RESULT: self.on_answer,
            FrameKind.SYNC: self.on_sync,
            FrameKind.IMAGE: self.on_image,
        }
        fanout = int(os.environ.get("KT_DATA_FANOUT", str(FANOUT)))
        self.data = DataService(self, f"{home}:{port}", fanout)
        """The data store's values held by this pod (`kt.put` from its actors), by key."""
        self.handlers[FrameKind.STORE] = self.data.on_frame

    # -- lifecycle -------------------------------------------------------------------
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._tcp = await loop.create_server(self._new_peer, self.host, self.port)
        self._unix = await loop.create_unix_server(
            self._new_worker_link, self.socket_path, backlog=512
        )
        await self.procs.start()
        self.procs.top_up()
        tasks = [loop.create_task(self._watchdog())]
        if self.control_port is not None:
            from kt.supervisor.control import serve_control

            tasks.append(loop.create_task(serve_control(self, self.host, self.control_port)))
        logger.info("pod %s serving on %s:%d", self.pod, self.host, self.port)
        await self.stopped.wait()
        for task in tasks:
            task.cancel()
        self._tcp.close()
        self._unix.close()
        pids = [w.pid for w in self.procs.workers.values() if w.pid is not None]
        if self.procs.zygote_pid is not None:
            pids.append(self.procs.zygote_pid)
        self.procs.close()
        deadline = time.monotonic() + 1.0
        while any(map(pid_alive, pids)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.data.close()
        shm.sweep_dead()  # what the killed workers left in /dev/shm
        shutil.rmtree(self._tmp, ignore_errors=True)

    def stop(self) -> None:
        self.stopped.set()

    async def _watchdog(self) -> None:
        """Exit when the driver process is gone (local) or nobody called for inactivity_ttl."""
        while True:
            await asyncio.sleep(0.5)
            if self.driver_pid is not None and not pid_alive(self.driver_pid):
                logger.info("driver %d exited; pod %s stops", self.driver_pid, self.pod)
                self.stop()
            idle = time.monotonic() - self.last_activity
            callers = any(not p.actor for p in self.peers.values())  # not actors' home links
            if self.inactivity_ttl is not None and not callers and idle > self.inactivity_ttl:
                logger.info("no caller for %.0f s; pod %s stops", idle, self.pod)
                self.idle_exit = True
                self.stop()

    # -- callers ---------------------------------------------------------------------
    def _new_peer(self) -> FrameChannel:
        route = self._next_route
        self._next_route += 1
        peer = Peer(self, route)
        self.peers[route] = peer
        return peer.channel

    def authenticate(self, peer: Peer, kind: int, header: memoryview) -> None:
        """HELLO with the right token and version, or the connection closes unread."""
        try:
            hello = protocol.decode_header(header) if kind == FrameKind.HELLO else {}
        except ValueError:
            hello = {}
        token = str(hello.get("token", "")).encode()
        if kind != FrameKind.HELLO or not hmac.compare_digest(token, self.token):
            logger.warning("refused a connection: %s", "bad token" if hello else "no HELLO")
            self._refuse(peer, "missing or wrong token")
            return
        unknown = sorted(set(hello) - HELLO_FIELDS)
        if unknown:
            self._refuse(peer, f"HELLO has unknown fields {unknown}")
            return
        if hello.get("v") != protocol.VERSION:
            self._refuse(
                peer, f"protocol version {hello.get('v')} != supervisor's {protocol.VERSION}"
            )
            return
        peer.authenticated = True
        peer.channel.max_frame = config.max_frame_bytes
        peer.caller = str(hello.get("caller", ""))
        peer.same_host = self.host_key is not None and hello.get("host") == self.host_key
        rec = self.actors.get(str(hello.get("actor") or ""))
        if rec is not None and rec.state is not ActorState.DEAD:
            peer.actor = rec.id
            rec.home = peer.route
        welcome = {"v": protocol.VERSION, "pod": self.pod, "shm": peer.same_host}
        peer.channel.send(protocol.encode(FrameKind.WELCOME, 0, welcome))

    def _refuse(self, peer: Peer, message: str) -> None:
        peer.channel.send(
            protocol.encode(FrameKind.REFUSED, 0, {"error": "auth", "message": message})
        )
        peer.channel.close()
        peer.channel.closed = True  # drop whatever else this connection already sent

    def peer_lost(self, peer: Peer) -> None:
        self.peers.pop(peer.route, None)
        self.last_activity = time.monotonic()
        self.data.peer_lost(peer.route)
        rec = self.actors.get(peer.actor)
        if rec is not None and rec.home == peer.route:
            rec.home = None
        reason = "its process ended" if peer.actor else "its connection to the pod closed"
        for key, (owner, label) in self.waits.pop(peer.route, {}).items():
            error = OwnerDiedError(label, owner, reason)
            self.reply_error(key >> 64, key & _REQ_MASK, error, self.pod)

    def reply_error(self, route: int, req_id: int, exc: BaseException, where: str) -> None:
        peer = self.peers.get(route)
        if peer is None:
            return
        payload = serialization.dumps_exception(exc, where, "")
        peer.channel.send(
            protocol.encode(FrameKind.RESULT, req_id, b"", payload, flags=FrameFlag.ERROR)
        )

    # -- handlers ----------------------------------------------------------------------
    def on_call(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        key = bytes(header)
        route = self._routes.get(key)
        if route is None:
            call = protocol.decode_header(header)
            if not isinstance(call.get("m"), str) or set(call) - CALL_FIELDS:
                peer.channel.refuse(f"a CALL header must be {{'a', 'm'}}, not {sorted(call)}")
                return
            actor_id = call.get("a", "")
            found = self.actors.get(actor_id)
            if found is None:
                self.reply_error(
                    peer.route, req_id, ActorNotFoundError(actor_id, self.pod), self.pod
                )
                return
            route = self._routes[key] = (found, self.stats.method(found.cls_name, call["m"]))
        if peer.same_host:
            frame[FLAGS_OFFSET] |= _SHM_OK
        self._relay(route[0], peer.route, req_id, frame, route[1])

    def _relay(
        self,
        rec: ActorRecord,
        route: int,
        req_id: int,
        frame: memoryview,
        stats: MethodStats | None = None,
        first: bool = False,
    ) -> None:
        """To the actor's process (`first`: ahead of what waits for it)."""
        stats = stats or self.stats.method(rec.cls_name, "__init__")
        stats.started += 1
        if rec.state is ActorState.DEAD:
            assert rec.death is not None
            stats.done(True, 0.0)
            self.reply_error(route, req_id, rec.death, self.pod)
            return
        rec.inflight[(route << 64) | req_id] = (stats, time.monotonic())
        rec.calls += 1
        _ROUTE.pack_into(frame, ROUTE_OFFSET, route)
        data = frame if len(frame) > BIG_FRAME else bytes(frame)
        if first and rec.worker is None:
            rec.backlog.insert(0, data)
        else:
            rec.send(data)

    def on_create_actor(
        self, peer: Peer, req_id: int, header: memoryview, frame: memoryview
    ) -> None:
        spec = protocol.decode_header(header)
        actor_id = spec["actor"]
        name, namespace = spec.get("name"), spec.get("namespace") or ""
        old = self.actors.get(actor_id)
        if old is not None and old.state is ActorState.DEAD:  # a restart, here
            del self.actors[actor_id]
            self._routes = {k: r for k, r in self._routes.items() if r[0] is not old}
            self.stats.restarts[old.cls_name] = self.stats.restarts.get(old.cls_name, 0) + 1
        clash = actor_id in self.actors or (name and self._named(name, namespace) is not None)
        if clash:
            what = f"named {name!r}" if name else actor_id
            self.reply_error(
                peer.route, req_id, ConfigError(f"an actor {what} already exists"), self.pod
            )
            return
        rec = ActorRecord(
            id=actor_id,
            name=name or actor_id,
            cls_name=spec.get("cls", "Actor"),
            owner=peer.route,
            namespace=namespace,
            methods=dict(spec.get("methods") or {}),
            named=bool(name),
        )
        self.actors[rec.id] = rec
        self._start(rec, spec, peer.route, req_id, header, frame)

    def _start(
        self,
        rec: ActorRecord,
        spec: dict[str, Any],
        route: int,
        req_id: int,
        header: memoryview,
        frame: memoryview,
        parked: bool = False,
    ) -> None:
        """Give the actor its devices, send it its CREATE, and bind it a process. When
        the devices it asks for are held by actors being killed, this waits for one of
        them to exit (the driver frees a killed actor's slot at once; its process may
        hold the device a moment longer): calls that come meanwhile wait behind it."""
        if rec.state is ActorState.DEAD:  # killed while it waited for devices
            self._relay(rec, route, req_id, frame)
            self._actor_exited(rec, ExitInfo(exit_code=None, signal=None, oom=False))
            return
        try:
            frame = self._give_devices(rec, spec, req_id, header, frame)
        except ConfigError as exc:  # the devices it asks for are not free here
            leaving = {a for a in self.gpus.held if a not in self.actors or self.actors[a].death}
            if self.gpus.fits_once_gone(float(spec["gpus"]), leaving):
                head, whole = bytes(header), bytearray(frame)  # the channel reuses its buffer
                self._device_waiters[rec.id] = lambda: self._start(
                    rec, spec, route, req_id, memoryview(head), memoryview(whole), True
                )
                return
            self._relay(rec, route, req_id, frame, first=parked)
            why = ActorDiedError(rec.id, self.pod, reason=str(exc), cause=DeathCause.INIT_FAILED)
            rec.move(ActorState.DEAD, why)
            self._actor_exited(rec, ExitInfo(exit_code=None, signal=None, oom=False))
            return
        self._relay(rec, route, req_id, frame, first=parked)
        asyncio.get_running_loop().create_task(self._bind_worker(rec))

    def _give_devices(
        self,
        rec: ActorRecord,
        spec: dict[str, Any],
        req_id: int,
        header: memoryview,
        frame: memoryview,
    ) -> memoryview:
        """The CREATE frame, with the devices the actor is given in its environment
        (`kt.core.gpus`) when it asks for any.

        Raises:
            ConfigError: they are not free on this pod.
        """
        amount = spec.get("gpus") or 0
        if not amount:
            return frame
        env = dict(spec.get("env") or {})
        local_rank = int(env["LOCAL_RANK"]) if str(env.get("LOCAL_RANK", "")).isdigit() else None
        mine = self.gpus.take(rec.id, float(amount), prefer=local_rank)
        visible = gpus.visible_devices(self.gpus.devices, mine, local_rank)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
        env[gpus.IDS_ENV] = ",".join(self.gpus.devices[i] for i in mine)
        payload = frame[protocol.PREFIX_SIZE + len(header) :]
        head = protocol.orjson_dumps({**spec, "env": env})
        prefix = protocol.encode_prefix(FrameKind.CREATE_ACTOR, req_id, head, len(payload))
        out = bytearray(prefix + head)
        out += payload
        return memoryview(out)

    async def _bind_worker(self, rec: ActorRecord) -> None:
        try:
            worker = await self.procs.acquire()
        except OSError as exc:
            why = ActorDiedError(rec.id, self.pod, reason=str(exc), cause=DeathCause.INIT_FAILED)
            rec.move(ActorState.DEAD, why)
            self._actor_exited(rec, ExitInfo(exit_code=None, signal=None, oom=False))
            return
        worker.label = rec.cls_name
        worker.on_log = lambda w, data: self._forward_log(w, rec, data)
        worker.on_exit = lambda w, info: self._actor_exited(rec, info)
        self._by_worker[worker.id] = rec
        rec.bind(worker)
        if rec.state is ActorState.DEAD:  # killed before it had a process
            worker.kill()

    def on_kill_actor(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        actor_id = protocol.decode_header(header).get("actor", "")
        rec = self.actors.get(actor_id)
        if rec is not None and rec.state is not ActorState.DEAD:
            rec.death = ActorDiedError(
                actor_id, self.pod, reason="it was killed by kt.kill", cause=DeathCause.KILLED
            )
            if rec.worker is not None:
                rec.worker.kill()
            else:
                rec.move(ActorState.DEAD)
                parked = self._device_waiters.pop(actor_id, None)
                if parked is not None:
                    parked()  # it never had a process: it ends now
        peer.channel.send(
            protocol.encode(FrameKind.RESULT, req_id, b"", serialization.dumps_bytes(None))
        )

    def on_cancel(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        actor_id = protocol.decode_header(header).get("a", "")
        rec = self.actors.get(actor_id)
        if rec is not None and rec.state is not ActorState.DEAD:
            _ROUTE.pack_into(frame, ROUTE_OFFSET, peer.route)
            rec.send(bytes(frame))

    def _named(self, name: str, namespace: str) -> ActorRecord | None:
        for rec in self.actors.values():
            if rec.named and rec.name == name and rec.namespace == namespace:
                if rec.state is not ActorState.DEAD:
                    return rec
        return None

    def on_lookup(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        query = protocol.decode_header(header)
        rec = self._named(str(query.get("name")), str(query.get("namespace") or ""))
        found = (
            None if rec is None else {"actor": rec.id, "cls": rec.cls_name, "methods": rec.methods}
        )
        peer.channel.send(
            protocol.encode(FrameKind.RESULT, req_id, b"", serialization.dumps_bytes(found))
        )

    def on_wait(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        self._relay_wait(peer.route, req_id, header, frame)

    def _relay_wait(self, asker: int, req_id: int, header: memoryview, frame: memoryview) -> None:
        """To the owner's link; `asker` is the route that gets the answer."""
        want = protocol.decode_header(header)
        label = str(want.get("l", "a Ref"))
        if "a" in want:
            rec = self.actors.get(str(want["a"]))
            name = rec.cls_name if rec is not None else "gone"
            owner = f"actor {want['a']} ({name}) on pod {self.pod}"
            alive = rec is not None and rec.state is not ActorState.DEAD
            route = rec.home if rec is not None and alive else None
        else:
            route = int(want.get("r", 0))
            owner = f"{self.peers[route].caller if route in self.peers else 'the caller'}"
        target = self.peers.get(route) if route is not None else None
        if target is None:
            self.reply_error(asker, req_id, OwnerDiedError(label, owner, "it is gone"), self.pod)
            return
        self.waits.setdefault(target.route, {})[(asker << 64) | req_id] = (owner, label)
        _ROUTE.pack_into(frame, ROUTE_OFFSET, asker)
        target.channel.send(bytes(frame))

    def on_answer(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        """A RESULT from a caller's link answers a WAIT relayed to it: back to the asker."""
        (asker,) = _ROUTE.unpack_from(frame, ROUTE_OFFSET)
        waits = self.waits.get(peer.route)
        if waits is None or waits.pop((asker << 64) | req_id, None) is None:
            return  # not a WAIT we relayed (or its asker was told the owner is gone)
        target = self.peers.get(asker)
        if target is not None:
            target.channel.send(frame if len(frame) > BIG_FRAME else bytes(frame))

    def on_sync(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        """Code sync (`kt.supervisor.store`): "offer" a manifest, "blobs" sent along,
        "pull" them from another pod, "get" them for a pod that pulls, "commit"."""
        self.last_activity = began = time.monotonic()
        request = protocol.decode_header(header)
        payload = frame[protocol.PREFIX_SIZE + len(header) :]
        try:
            self._sync(peer, req_id, request, payload)
        finally:
            self.stats.sync.add(time.monotonic() - began)

    def _sync(self, peer: Peer, req_id: int, request: dict[str, Any], payload: memoryview) -> None:
        op, version = request.get("op"), str(request.get("v", ""))
        try:
            if op == "pull":
                source = str(request.get("from", ""))
                wanted = [(str(d), int(n)) for d, n in orjson.loads(payload)]
                task = self._pull(peer, req_id, source, wanted)
                asyncio.get_running_loop().create_task(task)
                return
            if op == "get":
                blobs = [(str(d), self.store.read(str(d))) for d in orjson.loads(payload)]
                parts = protocol.join_blobs(blobs)
                size = sum(len(p) for p in parts)
                prefix = protocol.encode_prefix(FrameKind.RESULT, req_id, b"", size)
                peer.channel.send_parts([prefix, *parts])
                return
            answer: Any = None
            if op == "offer":
                answer = self.store.offer(bytes(payload))
            elif op == "blobs":
                for digest, data in protocol.split_blobs(payload):
                    self.store.put(digest, data)
            elif op == "commit":
                path = self.store.commit(version)
                logger.info("synced version %s into %s", version, path)
            else:
                raise SyncRefused(f"unknown sync op {op!r}")
        except (SyncRefused, OSError, ValueError, struct.error) as exc:
            self.reply_error(peer.route, req_id, SyncError(f"pod {self.pod}: {exc}"), self.pod)
            return
        self.answer(peer, req_id, answer)

    def on_image(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        """Run a kt.Image's steps not run yet (`kt.supervisor.image`), output to the caller."""
        self.last_activity = time.monotonic()
        try:
            steps = orjson.loads(frame[protocol.PREFIX_SIZE + len(header) :])
        except orjson.JSONDecodeError as exc:
            self.reply_error(peer.route, req_id, ConfigError(f"bad image steps: {exc}"), self.pod)
            return
        source = {"src": f"(image pod={self.pod})"}

        def log(data: bytes) -> None:
            sys.stdout.write(f"{source['src']} {data.decode('utf-8', 'replace')}")
            peer.channel.send(protocol.encode(FrameKind.LOG, 0, source, data))

        async def prepare() -> None:
            began = time.monotonic()
            try:
                key = await self.image.prepare(steps, log)
            except ImageError as exc:
                self.reply_error(peer.route, req_id, exc, self.pod)
                return
            except Exception as exc:  # steps that are not what the driver sends: this call only
                error = ImageError("?", self.pod, None, f"{type(exc).__name__}: {exc}")
                self.reply_error(peer.route, req_id, error, self.pod)
                return
            finally:
                self.stats.image.add(time.monotonic() - began)
            logger.info("image %s ready", key)
            self.answer(peer, req_id, None)

        asyncio.get_running_loop().create_task(prepare())

    def answer(self, peer: Peer, req_id: int, value: Any) -> None:
        """A pickled answer to a kt process's request."""
        peer.channel.send(
            protocol.encode(FrameKind.RESULT, req_id, b"", serialization.dumps_bytes(value))
        )

    async def _pull(
        self, peer: Peer, req_id: int, source: str, wanted: list[tuple[str, int]]
    ) -> None:
        host, _, port = source.rpartition(":")
        error: SyncError | None = None
        try:
            blobs = fetch((host, int(port)), self.token.decode(), wanted, self.pod)
            async with contextlib.aclosing(blobs):
                async for batch in blobs:
                    for digest, data in batch:
                        self.store.put(digest, data, from_peer=True)
        except (FetchError, ValueError, struct.error, TypeError) as exc:  # the source's fault
            error = SyncSourceFailed(f"pod {self.pod} could not pull from {source}: {exc}")
        except (SyncRefused, OSError) as exc:  # a blob that does not hash, our own disk
            error = SyncError(f"pod {self.pod} could not store what {source} sent: {exc}")
        if error is not None:
            self.reply_error(peer.route, req_id, error, self.pod)
            return
        self.answer(peer, req_id, None)

    def on_ping(self, peer: Peer, req_id: int, header: memoryview, frame: memoryview) -> None:
        self.last_activity = time.monotonic()
        peer.channel.send(protocol.encode(FrameKind.PONG, req_id))

    # -- workers -----------------------------------------------------------------------
    def _new_worker_link(self) -> FrameChannel:
        state: dict[str, int] = {}

        def on_frame(
            kind: int,
            flags: int,
            route: int,
            req_id: int,
            header: memoryview,
            payload: memoryview,
            frame: memoryview,
        ) -> None:
            worker = self.procs.workers.get(state.get("worker_id", -1))
            if worker is None:
                if "worker_id" in state:
                    return  # it has exited: what it still sent has no one to go to
                if kind != FrameKind.HELLO:
                    channel.abort()
                    return
                worker_id = int(protocol.decode_header(header).get("worker", 0))
                if not self.procs.connected(worker_id, channel):
                    channel.abort()
                    return
                state["worker_id"] = worker_id
                return
            self._from_worker(worker, kind, flags, route, req_id, header, frame)

        channel = FrameChannel(on_frame)
        return channel

    def _from_worker(
        self,
        worker: WorkerProcess,
        kind: int,
        flags: int,
        route: int,
        req_id: int,
        header: memoryview,
        frame: memoryview,
    ) -> None:
        rec = self._by_worker.get(worker.id)
        if kind == _RESULT and rec is not None:
            call = rec.inflight.pop((route << 64) | req_id, None)
            if call is not None:
                call[0].done(bool(flags & _ERROR), time.monotonic() - call[1])
            if rec.state is _STARTING:
                self._started(rec, failed=bool(flags & FrameFlag.ERROR), header=header)
        elif kind == _WAIT and rec is not None and rec.home is not None:
            self._relay_wait(rec.home, req_id, header, frame)  # answered on its home link
            return
        peer = self.peers.get(route)
        if peer is not None:
            self.stats.bytes_out += len(frame)
            peer.channel.send(frame if len(frame) > BIG_FRAME else bytes(frame))
        self.last_activity = time.monotonic()

    def _started(self, rec: ActorRecord, *, failed: bool, header: memoryview) -> None:
        assert rec.worker is not None
        if not failed:
            rec.move(ActorState.ALIVE)
            logger.info("actor %s (%s) alive in pid %d", rec.id, rec.cls_name, rec.worker.pid)
            return
        reason = protocol.decode_header(header).get("init_error", "its __init__ raised")
        rec.move(
            ActorState.DEAD,
            ActorDiedError(rec.id, self.pod, reason=reason, cause=DeathCause.INIT_FAILED),
        )
        rec.worker.kill()

    def _actor_exited(self, rec: ActorRecord, info: ExitInfo) -> None:
        if rec.id in self.gpus.held:  # a restart may get other devices
            self.gpus.give_back(rec.id)
            waiters, self._device_waiters = self._device_waiters, {}
            for again in waiters.values():
                asyncio.get_running_loop().call_soon(again)
        exited = ActorDiedError(
            rec.id, self.pod, exit_code=info.exit_code, signal=info.signal, oom=info.oom
        )
        rec.move(ActorState.DEAD, exited)  # a kill or a failed __init__ said why already
        death = rec.death
        assert death is not None
        death.last_lines = tuple(rec.tail)
        shm.sweep_dead()  # a killed worker leaves its /dev/shm segments behind
        logger.info("actor %s (%s) died: %s", rec.id, rec.cls_name, death)
        owner = self.peers.get(rec.owner)
        if owner is not None:  # first, so the owner can restart before calls fail
            event = {
                "actor": rec.id,
                "exit_code": death.exit_code,
                "signal": death.signal,
                "oom": death.oom,
                "reason": death.reason,
                "cause": death.cause.value,
                "lines": list(death.last_lines),
            }
            owner.channel.send(protocol.encode(FrameKind.DIED, 0, event))
        inflight, rec.inflight = rec.inflight, {}
        now = time.monotonic()
        for key, (stats, since) in inflight.items():
            stats.done(True, now - since)
            self.reply_error(key >> 64, key & ((1 << 64) - 1), death, self.pod)

    def _forward_log(self, worker: WorkerProcess, rec: ActorRecord, data: bytes) -> None:
        """Into the pod's own log, and to the caller that created the actor."""
        text = data.decode("utf-8", "replace")
        rec.tail.extend(text.splitlines())
        sys.stdout.write("".join(f"{worker.log_source} {line}\n" for line in text.splitlines()))
        sys.stdout.flush()
        peer = self.peers.get(rec.owner)
        if peer is not None:
            peer.channel.send(protocol.encode(FrameKind.LOG, 0, {"src": worker.log_source}, data))

    def status(self) -> dict[str, Any]:
        """What /status shows (and /metrics counts): the pod, its callers, its actors with
        their process's RSS and CPU seconds (None once it is gone), its processes."""
        from kt.supervisor.control import process_usage  # control imports this module

        def pid(r: ActorRecord) -> int | None:
            if r.worker is None or r.state is ActorState.DEAD:
                return None
            return r.worker.pid

        return {
            "pod": self.pod,
            "uptime_s": round(time.time() - self.started, 3),
            "callers": len(self.peers),
            "peers": [
                {"address": p.address, "caller": p.caller, "actor": p.actor}
                for p in self.peers.values()
            ],
            "actors": [
                {
                    "id": r.id,
                    "name": r.name,
                    "class": r.cls_name,
                    "state": r.state.value,
                    "pid": r.worker.pid if r.worker else None,
                    "calls": r.calls,
                    "inflight": len(r.inflight),
                    **process_usage(pid(r)),
                }
                for r in self.actors.values()
            ],
            "processes": [
                {"pid": w.pid, "state": w.state.value} for w in self.procs.workers.values()
            ],
            "pid": os.getpid(),
            "zygote_pid": self.procs.zygote_pid,
            "sync": {
                "bytes_received": self.store.bytes_received,
                "bytes_from_pods": self.store.bytes_from_pods,
                "blobs_received": self.store.blobs_received,
                "versions": self.store.versions(),
            },
            "image": {"steps_run": self.image.steps_run},
            "data": self.data.status(),
            "gpus": {
                "devices": list(self.gpus.devices),
                "held": {
                    a: [self.gpus.devices[i] for i in d] for a, (d, _) in self.gpus.held.items()
                },
            },
        }
