"""kt: a Ray-style actor runtime whose cluster is Kubernetes.

Only re-exports; `tests/test_exports.py` keeps `__all__` in sync.
"""

from kt import distributed  # registers SPMD groups
from kt.actors.api import (
    ActorOptions,
    DeployedFunction,
    RemoteClass,
    RemoteFunction,
    Service,
    cls,
    fn,
    get,
    get_actor,
    get_async,
    kill,
    wait,
)
from kt.actors.datastore import ls, put, rm
from kt.actors.driver import shutdown
from kt.actors.handle import ActorHandle, ActorMethod
from kt.core.compute import Compute, Image
from kt.core.config import config
from kt.core.errors import (
    ActorDiedError,
    ActorNotFoundError,
    ArgumentError,
    AuthError,
    CancelledError,
    ConfigError,
    DataKeyError,
    DataTooLargeError,
    DeathCause,
    GetTimeoutError,
    GroupFailedError,
    ImageError,
    KtError,
    LaunchError,
    OwnerDiedError,
    PlacementError,
    PodLostError,
    RemoteError,
    SerializationError,
    ShutdownError,
    StateDictMismatchError,
    SyncError,
)
from kt.core.gpus import gpu_ids
from kt.core.ref import Ref, StreamRef

__version__ = "0.1.0"

__all__ = [
    "ActorDiedError",
    "ActorHandle",
    "ActorMethod",
    "ActorNotFoundError",
    "ActorOptions",
    "ArgumentError",
    "AuthError",
    "CancelledError",
    "Compute",
    "ConfigError",
    "DataKeyError",
    "DataTooLargeError",
    "DeathCause",
    "DeployedFunction",
    "GetTimeoutError",
    "GroupFailedError",
    "Image",
    "ImageError",
    "KtError",
    "LaunchError",
    "OwnerDiedError",
    "PlacementError",
    "PodLostError",
    "Ref",
    "RemoteClass",
    "RemoteError",
    "RemoteFunction",
    "SerializationError",
    "Service",
    "ShutdownError",
    "StateDictMismatchError",
    "StreamRef",
    "SyncError",
    "__version__",
    "cls",
    "config",
    "distributed",
    "fn",
    "get",
    "get_actor",
    "get_async",
    "gpu_ids",
    "kill",
    "ls",
    "put",
    "rm",
    "shutdown",
    "wait",
]
