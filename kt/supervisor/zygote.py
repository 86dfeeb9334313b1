"""The zygote: a process with kt imported that forks worker processes on request.

Why: spawning a Python process and importing kt costs ~100 ms of CPU; a burst of 100
actor creations on a 2-core pod would wait seconds for processes. A fork of this
already-initialised process is ready in a few milliseconds.

Protocol, over a Unix socketpair with the supervisor (one JSON object per line):
    supervisor -> zygote  {"worker": id, "socket": path} with the write end of the
                          worker's stdout pipe attached (SCM_RIGHTS)
    zygote -> supervisor  {"spawned": id, "pid": pid}
                          {"exited": pid, "code": code}   (negative code: killed by signal)
The zygote stays single-threaded and never runs an event loop, so forking it is safe.
It exits when the supervisor closes the socket; workers exit on their own when their
supervisor socket closes.
"""

from __future__ import annotations

import gc
import os
import random
import select
import signal
import socket
import sys

import orjson


def _reap(control: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        event = {"exited": pid, "code": os.waitstatus_to_exitcode(status)}
        try:
            control.sendall(orjson.dumps(event) + b"\n")
        except OSError:  # the supervisor is gone: so is anyone to tell
            return


def _child(control: socket.socket, request: dict[str, object], stdout_fd: int) -> None:
    from kt.supervisor import worker

    control.close()
    os.dup2(stdout_fd, 1)
    os.dup2(stdout_fd, 2)
    os.close(stdout_fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    random.seed()  # do not share the zygote's random state
    worker.run(str(request["socket"]), int(str(request["worker"])))


def serve(control: socket.socket) -> None:
    buffer = b""
    pending_fds: list[int] = []
    while True:
        ready, _, _ = select.select([control], [], [], 0.2)
        _reap(control)
        if not ready:
            continue
        try:
            data, fds, _, _ = socket.recv_fds(control, 65536, 16)
        except OSError:  # the supervisor is gone (reset)
            return
        if not data:
            return  # the supervisor is gone
        buffer += data
        pending_fds.extend(fds)
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            request = orjson.loads(line)
            stdout_fd = pending_fds.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(control, request, stdout_fd)
            os.close(stdout_fd)
            try:
                control.sendall(orjson.dumps({"spawned": request["worker"], "pid": pid}) + b"\n")
            except OSError:  # the supervisor is gone
                return


def main() -> None:
    from kt.supervisor import worker

    worker.extend_sys_path()
    # What every actor needs, imported once here and shared by fork.
    import cloudpickle  # noqa: F401
    import uvloop  # noqa: F401

    import kt.core.runtime  # noqa: F401

    # What is imported so far moves to the collector's permanent generation: a child's
    # collections then never touch (and copy) those pages. Measured with 200 light actors:
    # see the commit that added this.
    gc.freeze()
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
