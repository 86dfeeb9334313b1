"""A pod's GPUs: which devices it has, and which of them an actor or rank is given.

Who calls it: `kt.supervisor.server.Supervisor` discovers its pod's devices once at start
(`discover`) and keeps a `GpuTable` of who holds them; the worker process of an actor is
given its devices through `CUDA_VISIBLE_DEVICES` before its class is unpickled
(`visible_devices`); `kt.gpu_ids()` reads them back (`KT_GPU_IDS`).

Discovery never imports torch (importing it here would cost a second and pin CUDA state
in the supervisor). In order: `KT_GPUS` (a count, `4`, or a list of ids, `0,2`: an
override, so the assignment is tested where no GPU exists); the NVIDIA container
runtime's `NVIDIA_VISIBLE_DEVICES`, as the Kubernetes device plugin sets it (the
container sees those devices numbered from 0; `all` asks NVML how many); then
`CUDA_VISIBLE_DEVICES` (the devices this process may use, by their ids); then NVML
through nvidia-ml-py where it is installed, else the NVIDIA driver's list under /proc.
Nothing found: no GPUs.

Shares. A device is held in shares of 1: `gpus=k` (an integer) takes k whole free
devices; `0 < gpus < 1` takes that share of one device, packed onto the fullest device
it fits so that whole devices stay free. Fractional actors on one device share its
memory and compute with no isolation: each sees the whole device, as under Ray.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from kt.core.errors import ConfigError

EPSILON = 1e-9
NONE_VALUES = ("", "none", "void", "NoDevFiles")
IDS_ENV = "KT_GPU_IDS"
"""The ids of an actor's own devices, as its pod names them (`gpu_ids`)."""


def gpu_ids(environ: Mapping[str, str] | None = None) -> list[int | str]:
    """Inside an actor or rank: the ids of the devices it was given (ints where the pod
    numbers them, as `CUDA_VISIBLE_DEVICES` does; UUIDs stay str); [] when none."""
    text = (os.environ if environ is None else environ).get(IDS_ENV, "")
    return [int(i) if i.isdigit() else i for i in _ids(text)]


def _nvml_count(proc: str = "/proc/driver/nvidia/gpus") -> int | None:
    """Devices NVML sees (nvidia-ml-py, where installed), else those the NVIDIA driver
    lists under /proc; None where neither is there."""
    try:
        import pynvml
    except ImportError:
        try:
            return len(os.listdir(proc))
        except OSError:
            return None
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml.NVMLError and friends: no driver, no device
        return None


def _ids(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def discover(
    environ: Mapping[str, str], nvml: Callable[[], int | None] = _nvml_count
) -> tuple[str, ...]:
    """The ids of the devices this pod may hand out, as `CUDA_VISIBLE_DEVICES` names them.

    Raises:
        ConfigError: `KT_GPUS` is neither a count nor a list of ids.
    """
    override = environ.get("KT_GPUS")
    if override is not None:
        text = override.strip()
        if text.isdigit():
            return tuple(str(i) for i in range(int(text)))
        ids = _ids(text)
        if not ids and text not in NONE_VALUES:
            raise ConfigError(f"KT_GPUS={override!r}: give a count (4) or device ids (0,2)")
        return ids
    plugin = environ.get("NVIDIA_VISIBLE_DEVICES")
    if plugin is not None:
        if plugin.strip() in NONE_VALUES:
            return ()
        if plugin.strip() == "all":
            count = nvml()
            return tuple(str(i) for i in range(count or 0))
        return tuple(str(i) for i in range(len(_ids(plugin))))  # renumbered from 0 inside
    cuda = environ.get("CUDA_VISIBLE_DEVICES")
    if cuda is not None:
        return () if cuda.strip() in NONE_VALUES or cuda.strip() == "-1" else _ids(cuda)
    return tuple(str(i) for i in range(nvml() or 0))


def check_amount(gpus: float) -> float:
    """A valid request: 0, a whole number of devices, or a share of one.

    Raises:
        ConfigError: negative, or more than one device but not whole (1.5).
    """
    if not isinstance(gpus, int | float) or isinstance(gpus, bool) or not math.isfinite(gpus):
        raise ConfigError(f"gpus={gpus!r}: give a number of devices (1, 2) or a share (0.5)")
    if gpus < 0:
        raise ConfigError(f"gpus={gpus} is negative")
    if gpus > 1 and abs(gpus - round(gpus)) > EPSILON:
        raise ConfigError(
            f"gpus={gpus}: more than one device must be a whole number (2, not 1.5); "
            "a share (0 < gpus < 1) packs actors onto one device"
        )
    return float(gpus)


def pick(used: Sequence[float], amount: float, prefer: int | None = None) -> tuple[int, ...] | None:
    """Which devices (indexes into `used`, each device's held share) a request of `amount`
    takes: whole free devices (the `prefer`red one first, when free), or for a share the
    fullest device it still fits on. None: it does not fit now."""
    if amount <= EPSILON:
        return ()
    if amount < 1 - EPSILON:
        fits = [i for i, u in enumerate(used) if u + amount <= 1 + EPSILON]
        if not fits:
            return None
        if prefer is not None and prefer in fits:
            return (prefer,)
        return (max(fits, key=lambda i: (used[i], -i)),)
    need = round(amount)
    free = [i for i, u in enumerate(used) if u <= EPSILON]
    if prefer is not None and prefer in free:
        free.remove(prefer)
        free.insert(0, prefer)
    return tuple(free[:need]) if len(free) >= need else None


def visible_devices(
    devices: Sequence[str], mine: Sequence[int], local_rank: int | None
) -> tuple[str, ...]:
    """`CUDA_VISIBLE_DEVICES` for a process given devices `mine` (indexes into `devices`).

    An actor sees only its own. An SPMD rank sees every device of its pod, as under
    torchrun, ordered so that `cuda:<LOCAL_RANK>` is its own (its first one; the rest of
    its own follow, then the others): a script that does `torch.cuda.set_device(
    LOCAL_RANK)` runs unmodified, and never lands on a device another process holds.
    """
    own = [devices[i] for i in mine]
    if local_rank is None or not own:
        return tuple(own)
    others = [d for i, d in enumerate(devices) if i not in mine]
    rest = own[1:] + others
    position = min(local_rank, len(rest))
    return (*rest[:position], own[0], *rest[position:])


@dataclass
class GpuTable:
    """A pod's devices and the shares live actors hold of them."""

    devices: tuple[str, ...]
    held: dict[str, tuple[tuple[int, ...], float]] = field(default_factory=dict)
    """actor id -> (device indexes, share of each)."""

    def used(self, leaving: Collection[str] = ()) -> list[float]:
        """Each device's held share (not counting the actors `leaving`)."""
        out = [0.0] * len(self.devices)
        for actor, (indexes, share) in self.held.items():
            if actor not in leaving:
                for i in indexes:
                    out[i] += share
        return out

    def fits_once_gone(self, amount: float, leaving: Collection[str]) -> bool:
        """`amount` does not fit now, and will once the actors `leaving` have exited."""
        return pick(self.used(), amount) is None and pick(self.used(leaving), amount) is not None

    def take(self, actor: str, amount: float, prefer: int | None = None) -> tuple[int, ...]:
        """Devices for `actor` (given back by `give_back`).

        Raises:
            ConfigError: the pod does not have them free; says what it has and holds.
        """
        self.give_back(actor)  # a restart here: what it held is free again
        amount = check_amount(amount)
        picked = pick(self.used(), amount, prefer)
        if picked is None:
            raise ConfigError(f"gpus={amount:g} does not fit: {self.describe()}")
        if picked:
            self.held[actor] = (picked, min(amount, 1.0))
        return picked

    def give_back(self, actor: str) -> None:
        self.held.pop(actor, None)

    def holdings(self) -> dict[str, list[str]]:
        """actor id -> the ids of the devices it holds."""
        return {a: [self.devices[i] for i in d] for a, (d, _) in self.held.items()}

    def describe(self) -> str:
        """The pod's devices and their held shares, in words."""
        if not self.devices:
            return (
                "this pod has no GPUs (none in KT_GPUS, NVIDIA_VISIBLE_DEVICES, "
                "CUDA_VISIBLE_DEVICES or NVML). A local pod has this machine's GPUs; to "
                "try gpus= without one, fake them: Compute(env={'KT_GPUS': '2'})"
            )
        shares = ", ".join(
            f"{d}: {u:g} held" for d, u in zip(self.devices, self.used(), strict=True)
        )
        return f"this pod has {len(self.devices)} GPU(s) ({shares})"
