"""Read pickles opcode by opcode (never executing them): the globals they name, the storages they declare.

The scan runs a small stack machine over :func:`pickletools.genops`: literal values
(strings, numbers, tuples) are tracked, everything else is an opaque placeholder.
That is enough to resolve ``STACK_GLOBAL`` and torch's persistent ids
``('storage', torch.FloatStorage, key, location, numel)``, which the torch reader
checks against the file before ``torch.load`` allocates anything.

Both passes (the opcode scan and the faster inert unpickler of :func:`storage_records`) also
refuse what no unpickler may see (:class:`PickleRefused`): tuples nested or shared so that
hashing them would crash or never end (:class:`TupleBudget`), and calls of allow-listed
constructors that allocate memory the file does not hold (:func:`refused_call`).
"""

from __future__ import annotations

import copyreg
import io
import pickle
import pickletools
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from ..dangers import DANGERS, UNRESOLVED_STACK_GLOBAL, danger_of, dangerous_globals  # the table, re-exported

__all__ = [
    "DANGERS",
    "MAX_SCAN_BYTES",
    "MAX_TUPLE_DEPTH",
    "MAX_TUPLE_WORK",
    "PickleRefused",
    "PickleScan",
    "TupleBudget",
    "StorageRecord",
    "checkpoint_globals",
    "danger_of",
    "dangerous_globals",
    "pickle_globals",
    "refused_globals",
    "scan_pickles",
    "storage_records",
]

#: At most this many bytes of one file or zip member are scanned (the pickled part of a
#: legacy torch file comes first; raw storage bytes follow and need no scanning).
MAX_SCAN_BYTES = 64 * 1024 * 1024

#: Tuples may nest at most this deep: hashing a tuple (as a dict key) recurses in C once per level,
#: and a pickle 200 KB long can nest them 100,000 deep (a segfault in any unpickler).
MAX_TUPLE_DEPTH = 100
#: Hashing one tuple may visit at most this many elements, repeats of a shared tuple counted each
#: time (a pickle can build ``t = (t, t)`` a hundred times: 2**100 elements to hash).
MAX_TUPLE_WORK = 10_000_000


class PickleRefused(ValueError):
    """A pickle that no unpickler may see: it would crash, hang or allocate what the file does not hold."""


class TupleBudget:
    """Depth and hashing work of the tuples an unpickler builds, checked as each one is built.

    Each tuple's depth and work (elements its hash would visit) follow from its items', so
    the check costs one look-up per item. The tuples are kept alive so that their ids stay theirs.
    """

    __slots__ = ("known",)

    def __init__(self) -> None:
        self.known: dict[int, tuple[tuple[Any, ...], int, int]] = {}

    def check(self, t: tuple[Any, ...]) -> None:
        depth, work, known = 1, len(t), self.known
        for item in t:
            if type(item) is tuple and item:
                entry = known.get(id(item))
                if entry is None:  # not known: flat
                    work += len(item)
                    depth = max(depth, 2)
                else:
                    work += entry[2]
                    depth = max(depth, entry[1] + 1)
        if depth == 1:
            return  # flat (shapes, strides, storage ids): its default entry is exact, nothing to keep
        if depth > MAX_TUPLE_DEPTH:
            raise PickleRefused(
                f"the pickle nests tuples more than {MAX_TUPLE_DEPTH} deep (crafted: hashing them would crash)"
            )
        if work > MAX_TUPLE_WORK:
            raise PickleRefused(
                f"the pickle builds a tuple whose hash would visit more than {MAX_TUPLE_WORK} elements "
                "(shared tuples nested in each other: crafted, hashing it would never end)"
            )
        self.known[id(t)] = (t, depth, work)


#: Allow-listed globals that allocate memory the file does not hold when a pickle calls them:
#: legacy tensor constructors (``torch.Tensor(2, 2)``: uninitialised values) and storages
#: (``torch.FloatStorage(n)``). torch.save never calls them: storages come by persistent id.
def _allocates(name: str) -> bool:
    module, _, short = name.rpartition(".")
    if module in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse", "torch._tensor", "torch.storage"):
        return short.endswith(("Tensor", "Storage"))
    return False


class _Encoded:
    """What ``_codecs.encode(text, "latin1")`` returns in a scan: bytes as long as text of the pickle (protocol 2)."""

    __slots__ = ()


_ENCODED = _Encoded()


def _encoded(value: object) -> bool:
    return value is _ENCODED or getattr(type(value), "inert_name", "") == "_codecs.encode"


def refused_call(name: str, args: object) -> str | None:
    """Why a pickle may not call the global ``name`` with ``args``, or ``None`` when it may."""
    if _allocates(name):
        return f"the pickle calls {name}, which allocates uninitialised memory (values not from the file)"
    if name == "builtins.bytearray" and not (
        isinstance(args, tuple) and (not args or isinstance(args[0], (bytes, bytearray, str)) or _encoded(args[0]))
    ):  # bytearray() and bytearray(data) are what pickle writes; bytearray(n) allocates n bytes
        return "the pickle calls builtins.bytearray with a size, which allocates memory the file does not hold"
    return None

_LITERAL_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "FLOAT", "BINFLOAT",
}  # fmt: skip
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}
_MARK = pickletools.markobject
_SLICE = pickletools.stackslice


class _Opaque:
    """A value the scan does not model (a dict, a list, the result of a call...)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<opaque>"


_OPAQUE = _Opaque()


class _Mark:
    __slots__ = ()


_MARK_ON_STACK = _Mark()


@dataclass(frozen=True)
class _Global:
    name: str


class _Inert:
    """Base of the stand-ins :func:`storage_records` puts in place of every global.

    A stand-in class takes any arguments (``REDUCE``, ``NEWOBJ``), any state (``BUILD``) and
    any items (``SETITEMS``, ``APPENDS``), and keeps nothing; calling an instance does the same.
    """

    __slots__ = ()
    inert_name = ""

    def __new__(cls, *args: object, **kwargs: object) -> _Inert:  # noqa: PYI034 - typing.Self needs 3.11
        return object.__new__(cls)  # (object.__init__ then ignores the arguments too)

    def __call__(self, *args: object, **kwargs: object) -> _Inert:
        return self

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def append(self, value: object) -> None:
        pass

    def extend(self, values: object) -> None:
        pass


_INERT = _Inert()


@dataclass(frozen=True)
class StorageRecord:
    """One storage a torch pickle declares through a persistent id.

    Attributes:
        key: the record name (``data/<key>`` in a zip, the storage key in a legacy file).
        type: the storage class as named in the pickle (``"torch.FloatStorage"``).
        numel: elements declared (bytes = ``numel`` x the type's element size).
        location: the device string saved with it (``"cpu"``, ``"cuda:0"``).
    """

    key: str
    type: str
    numel: int
    location: str


@dataclass
class PickleScan:
    """What :func:`scan_pickles` found.

    Attributes:
        globals: every ``module.name`` referenced (``GLOBAL``, ``STACK_GLOBAL``, ``INST``), in order,
            with Python 2 names mapped as the unpickler maps them (``__builtin__.eval`` -> ``builtins.eval``).
        storages: the storage persistent ids, in order.
        resolved: every persistent id in the ``pickles`` complete pickles was a literal tuple, so
            ``storages`` is complete for them (false too when no pickle ended cleanly).
        pickles: how many complete pickles were read (a legacy torch file holds five).
        problems: why no unpickler may see these bytes (see :class:`PickleRefused`), if anything.
    """

    globals: list[str] = field(default_factory=list)
    storages: list[StorageRecord] = field(default_factory=list)
    resolved: bool = True
    pickles: int = 0
    problems: list[str] = field(default_factory=list)


def _global_name(module: str, name: str) -> str:
    # the unpickler (and torch's weights_only one) map Python 2 names: __builtin__ -> builtins, ...
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return None


def _storage_record(pid: object) -> StorageRecord | None:
    """``('storage', type, key, location, numel[, view])`` -> a record; ``None`` when not literal."""
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and _text(pid[0]) == "storage"):
        return None
    _, stype, key, location, numel = pid[:5]
    if isinstance(stype, type) and issubclass(stype, _Inert) and stype.inert_name:
        stype = _Global(stype.inert_name)
    if not isinstance(stype, _Global) or _text(key) is None or _text(location) is None:
        return None
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        return None
    return StorageRecord(_text(key) or "", stype.name, numel, _text(location) or "")


class _Machine:
    """Stack effects of one pickle; gives up modelling (``ok = False``) at the first surprise."""

    def __init__(self, scan: PickleScan, found: dict[str, None]):
        self.scan, self.found = scan, found
        self.stack: list[object] = []
        self.memo: dict[int, object] = {}
        self.ok = True
        self.tuples = TupleBudget()

    def pop(self) -> object:
        if not self.stack or self.stack[-1] is _MARK_ON_STACK:
            raise IndexError("stack underflow")
        return self.stack.pop()

    def pop_to_mark(self) -> list[object]:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i] is _MARK_ON_STACK:
                items = self.stack[i + 1 :]
                del self.stack[i:]
                return items
        raise IndexError("no MARK on the stack")

    def step(self, op: pickletools.OpcodeInfo, arg: object) -> None:
        name = op.name
        # globals are collected even when the stack can no longer be modelled
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            self.found[_global_name(module, attr)] = None
        if not self.ok:
            if name == "STACK_GLOBAL":
                self.found[UNRESOLVED_STACK_GLOBAL] = None
            return
        try:
            self._step(name, op, arg)
        except PickleRefused as e:
            self.scan.problems.append(str(e))
            self.ok = False
        except (IndexError, KeyError, TypeError):
            self.ok = False
            if name == "STACK_GLOBAL":
                self.found[UNRESOLVED_STACK_GLOBAL] = None

    def _step(self, name: str, op: pickletools.OpcodeInfo, arg: object) -> None:
        push = self.stack.append
        if name == "MARK":
            push(_MARK_ON_STACK)
        elif name in _LITERAL_OPS:
            push(arg)
        elif name in _CONSTANTS:
            push(_CONSTANTS[name])
        elif name == "GLOBAL":
            module, _, attr = str(arg).partition(" ")
            push(_Global(_global_name(module, attr)))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            if isinstance(module, str) and isinstance(attr, str):
                g = f"{module}.{attr}"
            else:
                g = UNRESOLVED_STACK_GLOBAL
            self.found[g] = None
            push(_Global(g))
        elif name == "TUPLE":
            push(tuple(self.pop_to_mark()))
            self.tuples.check(self.stack[-1])  # type: ignore[arg-type]
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            n = int(name[-1])
            items = [self.pop() for _ in range(n)][::-1]
            push(tuple(items))
            self.tuples.check(self.stack[-1])  # type: ignore[arg-type]
        elif name in ("REDUCE", "NEWOBJ"):
            args, func = self.pop(), self.pop()
            if isinstance(func, _Global):
                why = refused_call(func.name, args if isinstance(args, tuple) else None)
                if why:
                    raise PickleRefused(why)
            push(_ENCODED if isinstance(func, _Global) and func.name == "_codecs.encode" else _OPAQUE)
        elif name in _MEMO_PUT:
            self.memo[int(arg)] = self.stack[-1]  # type: ignore[arg-type]
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.stack[-1]
        elif name in _MEMO_GET:
            push(self.memo[int(arg)])  # type: ignore[arg-type]
        elif name == "DUP":
            push(self.stack[-1])
        elif name == "BINPERSID":
            record = _storage_record(self.pop())
            if record is None:
                self.scan.resolved = False
            else:
                self.scan.storages.append(record)
            push(_OPAQUE)
        elif name == "PERSID":  # protocol 0 persistent id: a string the safe loader refuses anyway
            self.scan.resolved = False
            push(_OPAQUE)
        elif name in ("PROTO", "FRAME", "STOP"):
            pass
        else:  # generic stack effect from pickletools' description of the opcode
            before = op.stack_before
            if _MARK in before:
                self.pop_to_mark()
                for _ in range(before.index(_MARK)):
                    self.pop()
            else:
                for _ in before:
                    self.pop()
            for _ in op.stack_after:
                push(_OPAQUE)


def scan_pickles(data: bytes | BinaryIO, *, max_pickles: int = 8) -> PickleScan:
    """Scan up to ``max_pickles`` consecutive pickles in ``data`` (legacy torch files hold five).

    ``data`` is bytes or a seekable binary file, read as a stream (nothing is skipped, whatever
    its size). Never executes anything and never allocates more than ``data`` itself. Stops quietly at
    the first byte sequence that is not a pickle (raw storage bytes follow in legacy files).
    """
    scan = PickleScan()
    found: dict[str, None] = {}
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    for _ in range(max_pickles):
        at = stream.tell()
        if not stream.read(1):
            break
        stream.seek(at)
        machine = _Machine(scan, found)
        finished = False
        try:
            for op, arg, _pos in pickletools.genops(stream):
                machine.step(op, arg)
                if op.name == "STOP":
                    finished = True
                    break
        except Exception:  # noqa: BLE001, S110 - not (or no longer) a pickle: the scan ends here
            pass
        if not finished:  # truncated, or the bytes after the last pickle
            if scan.pickles == 0:
                scan.resolved = False
            break
        scan.pickles += 1
        if not machine.ok:
            scan.resolved = False
    scan.globals = list(found)
    return scan


class _Unresolved(Exception):
    pass


def _tuple_mark(self: Any) -> None:
    t = tuple(self.pop_mark())
    self.append(t)
    if tuple in map(type, t):  # only tuples holding tuples can nest or share: the rest costs one C-level scan
        self.tuples.check(t)


def _tuple1(self: Any) -> None:
    t = (self.stack[-1],)
    self.stack[-1] = t
    if type(t[0]) is tuple:
        self.tuples.check(t)


def _tuple2(self: Any) -> None:
    t = (self.stack[-2], self.stack[-1])
    self.stack[-2:] = [t]
    if type(t[0]) is tuple or type(t[1]) is tuple:
        self.tuples.check(t)


def _tuple3(self: Any) -> None:
    t = (self.stack[-3], self.stack[-2], self.stack[-1])
    self.stack[-3:] = [t]
    if tuple in map(type, t):
        self.tuples.check(t)


def bounded_dispatch(dispatch: dict[int, Any]) -> dict[int, Any]:
    """A pure-Python unpickler's ``dispatch`` table whose tuple opcodes check ``self.tuples``
    (a :class:`TupleBudget`) as each tuple is built, before anything can hash it."""
    out = dict(dispatch)
    for code, load in ((pickle.TUPLE, _tuple_mark), (pickle.TUPLE1, _tuple1), (pickle.TUPLE2, _tuple2),
                       (pickle.TUPLE3, _tuple3)):  # fmt: skip
        out[code[0]] = load
    return out


class _InertCall(_Inert):
    """A stand-in that refuses the calls no unpickler may make (see :func:`refused_call`)."""

    __slots__ = ()

    def __new__(cls, *args: object, **kwargs: object) -> _Inert:  # noqa: PYI034
        why = refused_call(cls.inert_name, args)
        if why:
            raise PickleRefused(why)
        return object.__new__(cls)


def _refuse() -> None:
    raise _Unresolved


class _InertUnpickler(pickle._Unpickler):
    """Python's unpickler with every global replaced by an inert :class:`_Inert` class (nothing is imported).

    The pure-Python unpickler, not the C one: the C unpickler sizes its memo array by the index
    a ``LONG_BINPUT`` names (an edited pickle asking for index 2**30 makes it zero 16 GiB);
    this one keeps the memo in a dict. ``BYTEARRAY8`` (protocol 5, never in torch files) would
    allocate the length it declares, so it is refused.
    """

    dispatch: ClassVar[dict[int, Any]] = bounded_dispatch(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = lambda self: _refuse()

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file, encoding="utf-8")
        self.records: list[StorageRecord] = []
        self.tuples = TupleBudget()

    def find_class(self, module: str, name: str) -> type[_Inert]:
        full = _global_name(module, name)
        base = _InertCall if refused_call(full, None) else _Inert  # only these check their calls
        return type("InertGlobal", (base,), {"__slots__": (), "inert_name": full})

    def persistent_load(self, pid: object) -> _Inert:
        record = _storage_record(pid)
        if record is None:
            raise _Unresolved
        self.records.append(record)
        return _INERT


def storage_records(data: bytes | BinaryIO) -> list[StorageRecord] | None:
    """The storage persistent ids of the first pickle in ``data``, in order, 4x faster than :func:`scan_pickles`.

    ``data`` is bytes or a binary file positioned at the pickle (left just after it).

    The pickle is run by Python's unpickler with every global replaced by an inert stand-in
    class (:class:`_Inert`), so nothing is imported or called, and memory stays bounded by
    ``data`` (see :class:`_InertUnpickler`). Tuples nested too deep or too shared to hash, and
    calls that allocate what the file does not hold, raise :class:`PickleRefused`. Returns ``None`` when
    the pickle is not one (or is damaged), or when a persistent id is not a literal storage
    tuple: use :func:`scan_pickles` (opcode by opcode) instead.
    """
    if copyreg._extension_cache or copyreg._inverted_registry:  # type: ignore[attr-defined]
        # EXT opcodes would fetch registered objects without find_class: not inert any more
        return None
    reader = _InertUnpickler(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    try:
        reader.load()
    except PickleRefused:
        raise
    except Exception:  # noqa: BLE001 - not a plain torch pickle: the caller falls back to the opcode scan
        return None
    return reader.records


def pickle_globals(data: bytes | BinaryIO, *, max_pickles: int = 8) -> list[str]:
    """Every ``module.name`` referenced by GLOBAL / STACK_GLOBAL / INST opcodes.

    Reads up to ``max_pickles`` consecutive pickles (legacy torch files hold several).
    Stops quietly at the first byte sequence that is not a pickle.
    """
    return scan_pickles(data, max_pickles=max_pickles).globals


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """At most ``limit`` bytes of a zip member, whatever size it claims (no zip bomb inflates here)."""
    with zf.open(info) as f:
        return f.read(limit)


def checkpoint_globals(path: str | Path, *, limit: int = MAX_SCAN_BYTES) -> list[str]:
    """Globals referenced by a torch checkpoint: every ``*.pkl`` in a zip, or a legacy pickle stream.

    Reads at most ``limit`` bytes per pickle.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        names: dict[str, None] = {}
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".pkl"):
                    for g in pickle_globals(_read_member(zf, info, limit)):
                        names[g] = None
        return list(names)
    with path.open("rb") as f:
        # the pickled part of a legacy file comes first; storages follow as raw bytes
        return pickle_globals(f.read(limit))


def refused_globals(names: list[str]) -> list[str]:
    """The subset of ``names`` that torch's ``weights_only`` unpickler would refuse."""
    try:
        import torch.serialization as s
        from torch import _weights_only_unpickler as w

        allowed = set(w._get_allowed_globals())
        for obj in s.get_safe_globals():
            if isinstance(obj, tuple):
                allowed.add(obj[1])
            else:
                allowed.add(f"{obj.__module__}.{obj.__qualname__}")
    except Exception:  # noqa: BLE001 - private API moved: report everything, which errs on the safe side
        return list(names)
    return [n for n in names if n not in allowed]
