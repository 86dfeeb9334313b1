"""A fresh rendezvous for every `init_process_group` of a long-lived rank.

torchrun starts a process per rank per attempt, and its agent hosts a new TCPStore for
each attempt, so `init_process_group` always meets an empty store. kt's ranks live across
calls: a function that initialises and destroys its process group in every call (every
torchrun script does) would meet the previous call's keys in the attempt's one store --
gloo then connects to the last call's dead sockets and DDP's first all-gather waits
forever. So kt wraps env:// rendezvous in each rank process of a `"pytorch"` group: the
n-th `init_process_group` of the process sees the agent store under the prefix
`kt/init<n>/`. The ranks of a group initialise in the same order (SPMD), so their n-th
initialisations meet each other and nothing else. A function that initialises once and
keeps its group across calls uses prefix 0 throughout.

torch offers no public way to replace a registered rendezvous handler
(`register_rendezvous_handler` refuses a scheme twice), so `install` swaps the entry in
`torch.distributed.rendezvous._rendezvous_handlers`; `tests/distributed/test_ddp.py`
fails if a torch release changes that.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterator
from typing import Any

from kt.core.methods import actor_hook


@actor_hook
def install(_instance: object = None) -> bool:
    """Wrap env:// rendezvous in this process (once); False when torch has no such hook."""
    from torch.distributed import PrefixStore

    # the module: `torch.distributed.rendezvous` as an attribute is its function
    rendezvous = importlib.import_module("torch.distributed.rendezvous")

    handlers: dict[str, Any] | None = getattr(rendezvous, "_rendezvous_handlers", None)
    if handlers is None or "env" not in handlers:
        return False
    original = handlers["env"]
    if getattr(original, "kt_fresh", False):
        return True
    count = itertools.count()

    def fresh(url: str, **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
        n = next(count)
        store, rank, world_size = next(original(url, **kwargs))
        yield PrefixStore(f"kt/init{n}", store), rank, world_size
        raise RuntimeError("Unable to perform re-rendezvous using env:// method")

    fresh.kt_fresh = True  # type: ignore[attr-defined]
    handlers["env"] = fresh
    return True
