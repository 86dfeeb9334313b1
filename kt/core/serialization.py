"""Arguments and results as bytes: cloudpickle protocol 5 with out-of-band buffers.

Payload layout (little-endian), the `payload` of a frame:

    nbuf   u32          number of out-of-band buffers
    lens   u64 * (1 + nbuf)   length of the pickle stream, then of each buffer
    pickle bytes
    buffers, back to back

or, when the buffers went through shared memory (kt.core.shm), nbuf has its top bit
set and the buffers are replaced by a descriptor: after the pickle stream comes orjson
`{"seg": name, "offs": [...]}` (lens still gives each buffer's length).

Large buffers (numpy arrays, tensors, bytes over 64 KiB) travel as separate parts, so
a 100 MiB array is handed to the socket without being copied into one big bytes object,
and on the receiving side is rebuilt as a view on the receive buffer.

Values made only of builtin scalars take the stdlib pickler (same bytes, ~5x faster);
anything else goes through cloudpickle so that `__main__` code travels by value.

CPU torch tensors travel as numpy arrays (rebuilt with `torch.from_numpy`): torch's own
pickling costs ~400 us a tensor against ~13 us, and the array's buffer goes out of band
like any other. Tensors that share storage arrive as separate copies (the same tensor
object twice is still one); dtypes numpy lacks (bfloat16) and non-CPU tensors take
torch's own path.

Code pickled by value (functions and classes of `__main__`, notebooks, closures) keeps
its real `co_filename` and carries the source lines it spans; unpickling puts them in
the receiving process's `linecache`, so a remote traceback shows the user's file, line
and source even on a pod that has no copy of the file. cloudpickle itself (3.1.3 and
later) would rename the file `<dynamic-code>`.
"""

from __future__ import annotations

import asyncio
import dis
import io
import linecache
import pickle
import struct
import types
from collections.abc import Sequence
from typing import Any

import cloudpickle
import orjson

from kt.core.errors import KtError, RemoteError, SerializationError
from kt.core.ref import PendingRefError
from kt.core.shm import SHM_THRESHOLD, ShmArena, attach

OOB_THRESHOLD = 64 * 1024
_U32 = struct.Struct("<I")
_NO_OOB = struct.Struct("<IQ")
_SHM_BIT = 0x80000000
_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})

Parts = list[bytes | memoryview]


def _plain(value: Any, depth: int = 0) -> bool:
    """Only builtin scalars in small tuples, lists and str-keyed dicts (on every call: loops,
    not generators, which cost more than the check itself)."""
    t = type(value)
    if t in _SCALARS:
        return True
    if depth > 2:
        return False
    if t is tuple or t is list:
        if len(value) > 16:
            return False
        for v in value:
            if type(v) not in _SCALARS and not _plain(v, depth + 1):
                return False
        return True
    if t is dict:
        if len(value) > 16:
            return False
        for k, v in value.items():
            if type(k) is not str or (type(v) not in _SCALARS and not _plain(v, depth + 1)):
                return False
        return True
    return False


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, plus plain CPU tensors as numpy arrays and code that keeps its source."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._spans: dict[str, list[tuple[int, int]]] = {}  # source lines already carried

    def reducer_override(self, obj: Any) -> Any:
        t = type(obj)
        if t is types.CodeType:
            return self._reduce_code(obj)
        if t.__name__ == "Tensor" and t.__module__ == "torch":
            reduced = _reduce_tensor(obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)

    def _reduce_code(self, code: types.CodeType) -> tuple[Any, ...]:
        """The constructor's arguments, real file name included, and the lines it spans.

        A nested function's lines usually lie inside its parent's, carried just before.
        """
        first = code.co_firstlineno
        last = max((line for _, _, line in code.co_lines() if line is not None), default=first)
        spans = self._spans.setdefault(code.co_filename, [])
        lines: list[str] = []
        if not any(a <= first and last <= b for a, b in spans):
            lines = linecache.getlines(code.co_filename)[first - 1 : last]
            spans.append((first, last))
        args = (
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_nlocals,
            code.co_stacksize,
            code.co_flags,
            code.co_code,
            code.co_consts,
            code.co_names,
            code.co_varnames,
            code.co_filename,
            code.co_name,
            code.co_qualname,
            first,
            code.co_linetable,
            code.co_exceptiontable,
            code.co_freevars,
            code.co_cellvars,
        )
        return _load_code, (args, lines)


def _load_code(args: tuple[Any, ...], lines: list[str]) -> types.CodeType:
    """Rebuild a code object pickled by value, first making its source known here."""
    code = types.CodeType(*args)
    if lines:
        remember_source(code.co_filename, code.co_firstlineno, lines)
    return code


def remember_source(filename: str, first: int, lines: list[str]) -> None:
    """Put `lines` (from line `first` on) into this process's linecache for `filename`.

    The entry has no mtime, so `linecache.checkcache` keeps it even when no such file
    exists here; lines not carried stay blank. What was carried wins over a file on
    this host: it is the code that runs.
    """
    entry = linecache.cache.get(filename)
    known = list(
        entry[2] if entry is not None and len(entry) == 4 else linecache.getlines(filename)
    )
    end = first - 1 + len(lines)
    if len(known) < end:
        known.extend(["\n"] * (end - len(known)))
    known[first - 1 : end] = lines
    linecache.cache[filename] = (sum(map(len, known)), None, known, filename)


def _reduce_tensor(tensor: Any) -> tuple[Any, ...] | None:
    if tensor.device.type != "cpu" or tensor.layout.__repr__() != "torch.strided":
        return None
    if tensor.is_quantized or tensor.is_conj() or tensor.is_neg():
        return None
    try:
        array = tensor.detach().numpy()
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16)
        return None
    return (_tensor_from_numpy, (array, tensor.requires_grad))


def _tensor_from_numpy(array: Any, requires_grad: bool) -> Any:
    import torch

    if not array.flags.writeable:  # torch tensors are writable; never alias read-only memory
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor.requires_grad_() if requires_grad else tensor


def dumps(value: Any, shm: ShmArena | None = None) -> Parts:
    """Serialize to a list of parts whose concatenation is the payload.

    With an arena (the receiver shares this host), large buffers go through it.

    Raises:
        Exception: whatever the pickler raised; callers turn it into SerializationError.
    """
    buffers: list[pickle.PickleBuffer] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < OOB_THRESHOLD:
            return True  # small: serialize in band
        buffers.append(buf)
        return False

    if _plain(value):
        main = pickle.dumps(value, protocol=5)
    else:
        out = io.BytesIO()
        _Pickler(out, protocol=5, buffer_callback=keep).dump(value)
        main = out.getvalue()
    if not buffers:
        head = _NO_OOB.pack(0, len(main))
        return [head + main] if len(main) < OOB_THRESHOLD else [head, main]
    raws = [b.raw() for b in buffers]
    sizes = [r.nbytes for r in raws]
    if shm is not None and sum(sizes) >= SHM_THRESHOLD:
        name, offsets = shm.write(raws)
        head = struct.pack(f"<I{len(raws) + 1}Q", _SHM_BIT | len(raws), len(main), *sizes)
        return [head, main, orjson.dumps({"seg": name, "offs": offsets})]
    head = struct.pack(f"<I{len(raws) + 1}Q", len(raws), len(main), *sizes)
    return [head, main, *raws]


def dumps_bytes(value: Any) -> bytes:
    parts = dumps(value)
    return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)


def loads(payload: bytes | bytearray | memoryview) -> Any:
    """Rebuild a value; out-of-band buffers become views on `payload` (no copy)."""
    view = memoryview(payload)
    (nbuf,) = _U32.unpack_from(view, 0)
    in_shm = bool(nbuf & _SHM_BIT)
    nbuf &= ~_SHM_BIT
    lens = struct.unpack_from(f"<{nbuf + 1}Q", view, 4)
    pos = 4 + 8 * (nbuf + 1)
    main = view[pos : pos + lens[0]]
    pos += lens[0]
    if not nbuf:
        return pickle.loads(main)
    if in_shm:
        where = orjson.loads(view[pos:])
        return pickle.loads(main, buffers=attach(where["seg"], where["offs"], list(lens[1:])))
    bufs = []
    for n in lens[1:]:
        bufs.append(view[pos : pos + n])
        pos += n
    return pickle.loads(main, buffers=bufs)


_RAW_MAIN = pickle.dumps(pickle.PickleBuffer(b"."), protocol=5, buffer_callback=lambda _: False)


def raw_parts(data: memoryview) -> Parts:
    """`data` framed as a payload whose `loads` is a memoryview on it (the data store's
    chunks: the bytes travel as they are, one out-of-band buffer)."""
    return [struct.pack("<I2Q", 1, len(_RAW_MAIN), data.nbytes), _RAW_MAIN, data]


def raw_of(payload: memoryview) -> memoryview:
    """The bytes of a `raw_parts` payload, read without unpickling (a supervisor's side).

    Raises:
        ValueError: the payload is not one.
    """
    if payload.nbytes < 20:
        raise ValueError("not a raw payload: too short")
    nbuf, main, size = struct.unpack_from("<I2Q", payload, 0)
    if (
        nbuf != 1
        or bytes(payload[20 : 20 + main]) != _RAW_MAIN
        or 20 + main + size != payload.nbytes
    ):
        raise ValueError("not a raw payload")
    return payload[20 + main :]


def parts_size(parts: Sequence[bytes | memoryview]) -> int:
    return sum(p.nbytes if isinstance(p, memoryview) else len(p) for p in parts)


def dumps_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], what: str, shm: ShmArena | None = None
) -> Parts:
    """Serialize call arguments, naming the argument that failed.

    Raises:
        SerializationError: an argument could not be pickled; `path` names it.
        PendingRefError: a Ref inside the arguments is still pending (outside `lending`).
    """
    try:
        return dumps((args, kwargs), shm)
    except PendingRefError:
        raise
    except Exception as exc:
        for i, arg in enumerate(args):
            path = _find_unpicklable(arg, f"argument {i}")
            if path:
                raise SerializationError(what, path[0], path[1]) from exc
        for key, arg in kwargs.items():
            path = _find_unpicklable(arg, f"argument {key!r}")
            if path:
                raise SerializationError(what, path[0], path[1]) from exc
        raise SerializationError(what, "the arguments", _describe(exc)) from exc


def dumps_value(value: Any, what: str, shm: ShmArena | None = None) -> Parts:
    """Serialize a result or an init spec, naming the attribute that failed.

    Raises:
        SerializationError: the value could not be pickled.
        PendingRefError: a Ref inside the value is still pending (outside `lending`).
    """
    try:
        return dumps(value, shm)
    except PendingRefError:
        raise
    except Exception as exc:
        path = _find_unpicklable(value, "the value")
        if path:
            raise SerializationError(what, path[0], path[1]) from exc
        raise SerializationError(what, "the value", _describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _find_unpicklable(value: Any, path: str, depth: int = 0) -> tuple[str, str] | None:
    """The deepest path below `value` that fails to pickle, with the reason."""
    try:
        cloudpickle.dumps(value, protocol=5)
        return None
    except Exception as exc:
        reason = _describe(exc)
    if depth < 4:
        children: list[tuple[str, Any]] = []
        if isinstance(value, dict):
            children = [(f"{path}[{k!r}]", v) for k, v in list(value.items())[:64]]
        elif isinstance(value, list | tuple | set | frozenset):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(list(value)[:64])]
        elif isinstance(value, types.FunctionType):
            children = _function_parts(value, path)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            children = [(f"{path}.{k}", v) for k, v in list(vars(value).items())[:64]]
        for child_path, child in children:
            found = _find_unpicklable(child, child_path, depth + 1)
            if found:
                return found
    return path, reason


def _function_parts(fn: types.FunctionType, path: str) -> list[tuple[str, Any]]:
    """What cloudpickle takes along with a function pickled by value: its closure's
    variables, the globals its code names, its defaults."""
    cells = zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False)
    parts = [(f"{path}'s closure variable {name!r}", _cell(c)) for name, c in cells]
    parts += [
        (f"{path}'s global {name!r}", fn.__globals__[name])
        for name in sorted(_globals_named(fn.__code__))
        if name in fn.__globals__
    ]
    parts += [(f"{path}'s default {i}", d) for i, d in enumerate(fn.__defaults__ or ())]
    parts += [(f"{path}'s default {k!r}", d) for k, d in (fn.__kwdefaults__ or {}).items()]
    return parts[:64]


def _globals_named(code: types.CodeType) -> set[str]:
    """The globals `code` and the functions and comprehensions inside it load (not the
    attribute names that share co_names with them)."""
    names = {
        str(i.argval)
        for i in dis.get_instructions(code)
        if i.opname in ("LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _globals_named(const)
    return names


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a variable not bound yet
        return None


class RemoteTraceback(Exception):
    """Carries the remote traceback text as the `__cause__` of a re-raised exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb


def dumps_exception(exc: BaseException, where: str, tb: str) -> bytes:
    """Pack a remote exception so the caller can re-raise it as its own type.

    The exception object travels pickled when it round-trips. When it does not (an
    `__init__` that does not take its `args` back), its class, `args` and attributes
    travel instead, for `loads_exception` to rebuild without calling `__init__`. The
    type name, message and traceback always travel as text, for `RemoteError`.
    """
    kind = type(exc)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    if not isinstance(exc, Exception | asyncio.CancelledError):
        # SystemExit, KeyboardInterrupt, GeneratorExit: re-raised as themselves they would
        # end the caller (and pass `except Exception`); they arrive as RemoteError.
        shown = f"{kind.__name__}({', '.join(map(repr, exc.args))})"
        message = f"the remote code raised {shown}; kt reports it here instead of exiting"
        return dumps_bytes((None, None, type_name, message, tb, where))
    obj = parts = None
    try:
        obj = _pickle(exc)
        pickle.loads(obj)  # an exception whose __init__ args do not round-trip
    except Exception:
        obj = None
        for args, state in ((exc.args, dict(vars(exc))), (tuple(map(str, exc.args)), {})):
            try:
                parts = _pickle((kind, args, state))
                pickle.loads(parts)
                break
            except Exception:
                parts = None
    return dumps_bytes((obj, parts, type_name, str(exc)[:4096], tb, where))


def _pickle(value: Any) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=5).dump(value)
    return out.getvalue()


def loads_exception(payload: bytes | bytearray | memoryview) -> BaseException:
    """Rebuild a remote exception, with the remote traceback and location attached."""
    obj, parts, type_name, message, tb, where = loads(payload)
    if obj is not None:
        try:
            exc: BaseException = pickle.loads(obj)
        except Exception:
            return RemoteError(type_name, message, tb, where)
        if not isinstance(exc, KtError) and tb:
            exc.__cause__ = RemoteTraceback(tb)
            exc.add_note(f"(raised remotely in {where})")
        return exc
    if parts is not None:
        try:
            kind, args, state = pickle.loads(parts)
            return rebuild_as_remote_error(kind, args, state, (type_name, message, tb, where))
        except Exception:
            pass
    return RemoteError(type_name, message, tb, where)


_DUALS: dict[type, type] = {}


def rebuild_as_remote_error(
    kind: type[BaseException],
    args: tuple[Any, ...],
    state: dict[str, Any],
    fields: tuple[str, str, str, str],
) -> BaseException:
    """An instance of both `kind` and RemoteError, built without calling `__init__`.

    Like Ray's `RayTaskError(MyErr)`: `except MyErr` catches it, `except kt.RemoteError`
    too, and it carries the remote traceback. Its `args` and attributes are the remote
    exception's own.

    Raises:
        TypeError: `kind` cannot be combined with RemoteError (a layout conflict).
    """
    dual = _DUALS.get(kind)
    if dual is None:
        dual = type(
            kind.__name__,
            (kind, RemoteError),
            {
                "__module__": kind.__module__,
                "__qualname__": kind.__qualname__,
                "__reduce__": _reduce_dual,
            },
        )
        _DUALS[kind] = dual
    exc = dual.__new__(dual, *args)
    exc.args = args
    exc.__dict__.update(state)
    exc.type_name, exc.message, exc.traceback, exc.where = fields
    return exc


def _reduce_dual(self: Any) -> tuple[Any, ...]:
    state = {k: v for k, v in vars(self).items() if k not in _DUAL_FIELDS}
    fields = (self.type_name, self.message, self.traceback, self.where)
    kind = type(self).__bases__[0]  # the dual is (kind, RemoteError)
    return (rebuild_as_remote_error, (kind, self.args, state, fields))


_DUAL_FIELDS = frozenset({"type_name", "message", "traceback", "where"})
