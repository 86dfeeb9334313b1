"""The agent actor: kt's stand-in for torchrun's per-node agent, one per attempt.

Who calls it: `kt.distributed.group.SpmdGroup`. A light (`cpus=0`) actor pinned to pod 0
of the group's pool reserves MASTER_PORT on that pod and, for `distribute("pytorch")`,
hosts the attempt's TCPStore on it: the *agent store* that torchrun's ranks find through
TORCHELASTIC_USE_AGENT_STORE=True, so `init_process_group("gloo")` (env://) makes every
rank a store client exactly as under torchrun.

Theory of operation: the port is bound here first (a plain socket, no torch) so the ranks
can be created at once with MASTER_PORT in their environment; the same socket is then
handed to TCPStore (`master_listen_fd`), so no other process can take the port in
between. Ranks that connect before the store listens simply retry, as TCPStore clients
do. For `distribute("spmd")` (JAX and others) the port is released instead, for rank 0's
own coordinator to bind.
"""

from __future__ import annotations

import logging
import socket
from datetime import timedelta
from typing import Any

logger = logging.getLogger(__name__)


class RankAgent:
    """Holds the attempt's MASTER_PORT and, for torch, its store.

    Set against a rank: a rank runs user code; the agent runs none and lives exactly as
    long as one attempt of the group.
    """

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._store: Any = None

    def reserve_port(self, host: str) -> int:
        """Bind a free port on this pod's address and keep it bound."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        self._sock = sock
        port: int = sock.getsockname()[1]
        return port

    def release_port(self) -> None:
        """Give the port up (for a rank 0 that binds it itself)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def serve_store(self, host: str, world_size: int, timeout: float) -> int:
        """Host the attempt's TCPStore on the reserved port; returns the port.

        Raises:
            ImportError: torch is not installed on the pod.
        """
        import torch.distributed as dist

        sock = self._sock
        if sock is None:
            raise RuntimeError("serve_store before reserve_port")
        port: int = sock.getsockname()[1]
        self._store = dist.TCPStore(
            host,
            port,
            world_size,
            True,
            timedelta(seconds=timeout),
            wait_for_workers=False,
            master_listen_fd=sock.fileno(),
        )
        sock.detach()  # the store owns the descriptor now; do not close it twice
        self._sock = None
        logger.info("agent store for %d ranks on %s:%d", world_size, host, port)
        return port

    def ping(self) -> None:
        return None
