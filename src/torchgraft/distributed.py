"""Loading across processes: one Plan on every rank, executed with ``torch.distributed.checkpoint``.

``torchgraft.distributed.load(model, source)`` is :func:`torchgraft.load` for a model that lives
on several ranks (FSDP2 ``fully_shard`` with DTensor parameters, tensor-parallel DTensors, or a
plain model replicated on every rank). Run the same script on every rank (``torchrun``):

1. **Plan once.** Rank 0 makes the :class:`~torchgraft.Plan` (renames, base-model prefix, ignore
   patterns, adapters) from names and shapes, or takes the one passed in, and broadcasts it;
   every rank checks that it holds the same model and sees the same checkpoint.
2. **Read only your slices.** Each planned entry becomes a key of a DCP state dict under the
   checkpoint's own name, its value an empty tensor laid out like the model's (a DTensor with
   the same mesh and placements, or a plain tensor). ``torch.distributed.checkpoint.load`` plans
   the reads (``create_local_plan`` / ``create_global_plan``) and the storage reader fetches
   exactly the chunks each rank owns: :class:`SourceStorageReader` slices safetensors files with
   ``safe_open(...).get_slice`` (single files and ``*.index.json`` shards) and narrows
   memory-mapped torch files; :class:`DCPStorageReader` reads DCP checkpoints.
3. **Adapt and initialise identically everywhere.** Entries with an adapter (or a ``(1,) -> ()``
   reshape) are read whole on every rank, adapted, and each rank keeps its slice
   (``distribute_tensor(..., src_data_rank=None)``: no communication). Modules that miss weights
   are initialised as full tensors on the CPU under one random state shared by all ranks (rank
   0's, or ``seed=``), in the same order as :func:`torchgraft.load`, then sliced the same way:
   every rank ends with the values a single-process load would give.
4. **Commit.** Nothing in the model changes until every rank has read, adapted and initialised
   without error; then a meta-device model is materialised (``to_empty``) and the values are
   copied in. The :class:`DistributedLoadReport` is the same on every rank (``bytes_read`` lists
   what each rank read).

Without an initialised process group the same call runs as a single process (DCP's ``no_dist``).

Layouts that cannot be loaded this way fail before anything is read, with what to do instead:
FSDP1 ``FullyShardedDataParallel`` (flat parameters), DeepSpeed ZeRO-3 partitions, legacy
``ShardedTensor``, DTensors with ``Partial`` placements, and ranks holding different models
(pipeline stages).

Conversion: :func:`convert_to_dcp` writes any checkpoint :func:`torchgraft.open` reads as a DCP
checkpoint; :func:`convert_from_dcp` writes a DCP checkpoint as safetensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.futures import Future

from .apply import _count_nonfinite, _modules_to_initialise, _run_adapter
from .errors import CheckpointError, LoadError
from .initialize import initialise_module
from .keys import split_key
from .plan import Plan
from .plan import plan as make_plan
from .report import LoadReport
from .sources import Source
from .sources import open as open_source
from .sources.dcp_reader import read_dcp_metadata, storage_key
from .sources.safetensors_reader import read_header
from .target import TargetView

if TYPE_CHECKING:
    from .policy import AdaptSpec
    from .rules import RuleSpec

__all__ = [
    "DCPConvertResult",
    "DCPStorageReader",
    "DistributedLoadReport",
    "SourceStorageReader",
    "convert_from_dcp",
    "convert_to_dcp",
    "load",
    "read_dcp_tensor",
    "storage_reader_for",
]

logger = logging.getLogger("torchgraft")

_SAFETENSORS_FORMATS = ("safetensors", "sharded-safetensors")
#: Formats whose tensors are memory-mapped (or already in memory): narrowing one touches only its slice.
#: Any other format (a legacy torch pickle) is read whole, and counted whole, once per tensor.
_MAPPED_FORMATS = (*_SAFETENSORS_FORMATS, "torch-zip", "state-dict")


# ---------------------------------------------------------------------------
# The report


@dataclass
class DistributedLoadReport(LoadReport):
    """A :class:`~torchgraft.LoadReport` with what each rank read; identical on every rank.

    Attributes:
        world_size: ranks that took part.
        bytes_read: tensor bytes each rank copied out of the checkpoint, by rank.
        sharded: model entries loaded as DTensor shards (each rank read only its slices).
        seconds: the slowest rank's time.

    Example:
        >>> report = torchgraft.distributed.load(model, "all-MiniLM-L6-v2/")  # on 2 ranks
        >>> report.world_size, report.bytes_read
        (2, [45134848, 45134848])
    """

    world_size: int = 1
    bytes_read: list[int] = field(default_factory=list)
    sharded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.update(world_size=self.world_size, bytes_read=list(self.bytes_read), sharded=list(self.sharded))
        return d

    def distributed_line(self) -> str:
        per_rank = ", ".join(f"rank {r}: {_mb(b)}" for r, b in enumerate(self.bytes_read))
        return f"{self.world_size} ranks, {len(self.sharded)} entries sharded; bytes read per rank: {per_rank}"

    def __str__(self) -> str:
        return super().__str__() + self.distributed_line() + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# ---------------------------------------------------------------------------
# Ranks: the few collectives torchgraft itself makes (plan broadcast, agreement, stats)


class _Ranks:
    """The process group, or a world of one when torch.distributed is not initialised."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        if group is not None and not self.active:
            raise LoadError(
                "process_group was given but torch.distributed is not initialised",
                ["call torch.distributed.init_process_group() first (torchrun sets the environment)"],
            )
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.size = dist.get_world_size(group) if self.active else 1

    def broadcast(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; if it fails anywhere, raise on every rank (no rank is left waiting)."""
        try:
            result, error = fn(), None
        except Exception as e:  # noqa: BLE001 - re-raised below, on this rank and on the others
            result, error = None, e
        errors = self.gather(None if error is None else _pack(error))
        if error is not None:
            raise error
        for rank, packed in enumerate(errors):
            if packed is not None:
                raise _unpack(packed, rank)
        return result


def _pack(error: BaseException) -> tuple[Any, ...]:
    """An exception as (class, args, attributes), rebuilt on other ranks without calling ``__init__``."""
    try:
        packed = (type(error), error.args, {k: v for k, v in vars(error).items() if k != "__notes__"})
        pickle.loads(pickle.dumps(packed))
        return packed
    except Exception:  # noqa: BLE001 - anything that does not survive pickling travels as text
        return (RuntimeError, (f"{type(error).__name__}: {error}",), {})


def _unpack(packed: tuple[Any, ...], rank: int) -> BaseException:
    cls, args, attrs = packed
    error = cls.__new__(cls)
    BaseException.__init__(error, *args)
    error.__dict__.update(attrs)
    if hasattr(error, "add_note"):
        error.add_note(f"(raised on rank {rank}; re-raised on every rank so that none waits in a collective)")
    return error


# ---------------------------------------------------------------------------
# DCP storage readers


class SourceStorageReader(StorageReader):
    """A DCP ``StorageReader`` over any torchgraft :class:`~torchgraft.Source`.

    Metadata comes from the source's names, shapes and dtypes (one chunk per tensor, no bytes
    read). ``read_data`` serves each read item (a rank's slice of a tensor): safetensors files
    (single or ``*.index.json`` shards) are sliced with ``safe_open(...).get_slice``, so only
    the requested rows are read; other formats load the (memory-mapped) tensor and narrow it.
    Unlike DCP's ``HuggingFaceStorageReader`` it reads exactly the files the source names (a
    single file, the shards of an index) rather than every ``*.safetensors`` in a directory.

    Attributes:
        bytes_read: tensor bytes this reader read from the checkpoint: the slices it served
            for memory-mapped formats (safetensors, torch zip), whole tensors for formats that
            cannot be read in part (legacy torch pickles).

    Example:
        >>> reader = SourceStorageReader(tg.open("all-MiniLM-L6-v2/"))
        >>> dcp.load({"pooler.dense.bias": torch.empty(384)}, storage_reader=reader, no_dist=True)
        >>> reader.bytes_read
        1536
    """

    def __init__(self, source: Source) -> None:
        super().__init__()
        self.source = source
        self.bytes_read = 0
        self._file_of = _safetensors_files(source)
        self._read_whole: set[str] = set()

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        tensors: dict[str, TensorStorageMetadata] = {}
        storage: dict[MetadataIndex, str] = {}
        for name, ref in self.source.items():
            zeros = torch.Size([0] * len(ref.shape))
            tensors[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=_torch_dtype(ref.dtype)),
                size=torch.Size(ref.shape),
                chunks=[ChunkStorageMetadata(offsets=zeros, sizes=torch.Size(ref.shape))],
            )
            storage[MetadataIndex(name, zeros)] = name
        return Metadata(state_dict_metadata=tensors, storage_data=storage, storage_meta=StorageMeta())  # type: ignore[arg-type]

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str | None, list[ReadItem]] = {}
        for item in plan.items:
            by_file.setdefault(self._file_of.get(item.storage_index.fqn), []).append(item)
        for file, items in by_file.items():
            if file is None:
                mapped = self.source.format in _MAPPED_FORMATS
                for item in items:
                    name = item.storage_index.fqn
                    tensor = self._load(name)
                    if not mapped and name not in self._read_whole:
                        self._read_whole.add(name)
                        self.bytes_read += tensor.numel() * tensor.element_size()
                    self._deliver(item, _narrow(tensor, item), planner, count=mapped)
                continue
            from safetensors import safe_open

            try:
                handle = safe_open(file, framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - the library's error types vary by version
                raise CheckpointError(
                    file,
                    f"cannot open for slicing: {e}",
                    format="safetensors",
                    hint="re-download or re-convert the file",
                ) from None
            for item in items:
                name = item.storage_index.fqn
                try:
                    if not item.lengths:  # a 0-d tensor has nothing to slice
                        piece = handle.get_tensor(name)
                    else:
                        slices = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
                        piece = handle.get_slice(name)[slices]
                except Exception as e:  # noqa: BLE001 - as above, one CheckpointError naming the tensor
                    raise CheckpointError(
                        file, f"reading a slice of {name!r} failed: {e}", format="safetensors"
                    ) from None
                self._deliver(item, piece, planner)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _load(self, name: str) -> torch.Tensor:
        try:
            return self.source[name].load()
        except KeyError:
            raise CheckpointError(
                self.source.path, f"{name!r} is not in the checkpoint", format=self.source.format
            ) from None

    def _deliver(self, item: ReadItem, piece: torch.Tensor, planner: LoadPlanner, *, count: bool = True) -> None:
        target = planner.resolve_tensor(item).detach()
        if tuple(target.shape) != tuple(piece.shape):
            raise CheckpointError(
                self.source.path,
                f"{item.storage_index.fqn!r}: read {list(piece.shape)}, needed {list(target.shape)}",
                format=self.source.format,
                hint="the checkpoint changed while loading",
            )
        target.copy_(piece)
        if count:
            self.bytes_read += piece.numel() * piece.element_size()
        planner.commit_tensor(item, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False


class DCPStorageReader(FileSystemReader):
    """DCP's ``FileSystemReader`` with a safe ``.metadata`` read and a byte count.

    DCP unpickles ``.metadata`` with a plain ``pickle.load``; this reader goes through
    :func:`torchgraft.sources.dcp_reader.read_dcp_metadata` (DCP classes only) instead.

    Attributes:
        bytes_read: bytes of the ``.distcp`` chunks read so far.
    """

    def __init__(self, path: str | os.PathLike[str], *, metadata: Metadata | None = None) -> None:
        super().__init__(path)
        self._metadata = metadata
        self.bytes_read = 0

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = read_dcp_metadata(Path(os.fspath(self.path)))
        md = self._metadata
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return md

    def _slice_file(self, file: Any, sinfo: Any) -> Any:
        self.bytes_read += int(getattr(sinfo, "length", 0) or 0)
        return super()._slice_file(file, sinfo)


def storage_reader_for(source: Source) -> tuple[StorageReader, Callable[[str], str]]:
    """The DCP storage reader for a source, and how a source name becomes its DCP key.

    Returns:
        ``(reader, key)``: :class:`DCPStorageReader` for DCP checkpoints (keys carry the
        container path), :class:`SourceStorageReader` for everything else (keys are the names).
    """
    if source.format == "dcp":
        assert source.path is not None
        return DCPStorageReader(source.path), lambda name: storage_key(source, name)
    return SourceStorageReader(source), lambda name: name


def read_dcp_tensor(path: str | os.PathLike[str], fqn: str, *, metadata: Metadata | None = None) -> torch.Tensor:
    """Read one whole tensor of a DCP checkpoint in this process (all its chunks).

    Args:
        path: the checkpoint directory.
        fqn: the tensor's DCP key (``"model.embeddings.word_embeddings.weight"``).
        metadata: the checkpoint's metadata, when already read.

    Returns:
        The tensor, on the CPU.

    Raises:
        CheckpointError: the key is not a tensor of the checkpoint, or a chunk cannot be read.
    """
    reader = DCPStorageReader(path, metadata=metadata)
    md = reader.read_metadata()
    info = md.state_dict_metadata.get(fqn)
    if not isinstance(info, TensorStorageMetadata):
        raise CheckpointError(path, f"{fqn!r} is not a tensor of this DCP checkpoint", format="dcp")
    tensor = torch.empty(tuple(info.size), dtype=info.properties.dtype)
    try:
        _dcp_call(dcp.load, {fqn: tensor}, storage_reader=reader, no_dist=True)
    except CheckpointException as e:
        raise _checkpoint_error(e, str(path), "dcp") from None
    return tensor


def _dcp_call(fn: Callable[..., None], state: dict[str, Any], **kwargs: Any) -> None:
    """``dcp.load`` / ``dcp.save`` without DCP's warning that ``no_dist`` means a single process (we know)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state, **kwargs)


def _safetensors_files(source: Source) -> dict[str, str]:
    """Name -> file for safetensors sources (from the headers: no tensor bytes read)."""
    if source.format not in _SAFETENSORS_FORMATS:
        return {}
    out: dict[str, str] = {}
    for file in source.files:
        header, _meta, _start = read_header(file)
        for name in header:
            out.setdefault(name, file)
    return {name: out[name] for name in source if name in out}


def _narrow(tensor: torch.Tensor, item: ReadItem) -> torch.Tensor:
    for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths)):
        tensor = tensor.narrow(dim, offset, length)
    return tensor


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(None, f"dtype {name!r} is not known to this torch", hint="upgrade torch")
    return dtype


def _checkpoint_error(e: CheckpointException, path: str | None, fmt: str) -> BaseException:
    """DCP's CheckpointException -> the first rank's own error (a CheckpointError stays one)."""
    failures = getattr(e, "failures", {}) or {}
    for rank in sorted(failures):
        inner = failures[rank]
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, Exception):
            if hasattr(inner, "add_note"):
                inner.add_note(
                    f"(raised on rank {rank} while torch.distributed.checkpoint read the checkpoint; the model is unchanged)"
                )
            return inner
    return CheckpointError(path, f"torch.distributed.checkpoint failed: {e}", format=fmt)


# ---------------------------------------------------------------------------
# Model layouts


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _model_name(model: nn.Module) -> str:
    """``FSDPBertModel`` -> ``BertModel`` (fully_shard makes a subclass per wrapped class)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return type(model).__name__
    cls = type(model)
    if isinstance(model, FSDPModule):
        for base in cls.__mro__[1:]:
            if not issubclass(base, FSDPModule):
                return base.__name__
    return cls.__name__


def _check_layout(model: nn.Module) -> None:
    """Refuse layouts DCP cannot load into, naming the parameter and what to do instead."""
    problems: list[str] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        FullyShardedDataParallel = ()  # type: ignore[assignment,misc]
    for path, module in model.named_modules():
        if isinstance(module, FullyShardedDataParallel):  # type: ignore[arg-type]
            problems.append(
                f"{path or '(root)'}: FSDP1 FullyShardedDataParallel keeps flat parameters; shard with "
                "torch.distributed.fsdp.fully_shard (FSDP2) instead, or load before wrapping"
            )
            break
    from torch.distributed.tensor import Partial

    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if hasattr(t, "ds_id") or hasattr(t, "ds_numel"):
            problems.append(
                f"{name}: a DeepSpeed ZeRO-3 partition; load before deepspeed.initialize, or use "
                "deepspeed.zero.GatheredParameters"
            )
        elif isinstance(t, DTensor) and any(isinstance(p, Partial) for p in t.placements):
            problems.append(
                f"{name}: a DTensor with a Partial placement {t.placements} holds partial sums, not values; "
                "redistribute it to Shard or Replicate first"
            )
        elif type(t).__name__ == "ShardedTensor":
            problems.append(f"{name}: a legacy ShardedTensor; use DTensor (fully_shard or distribute_tensor)")
        if len(problems) >= 12:
            break
    if problems:
        raise LoadError(
            f"{_model_name(model)} has a layout torchgraft.distributed cannot load into (nothing was read):", problems
        )


def _live(view: TargetView, name: str) -> torch.Tensor:
    module = view.module_of(name)
    attr = split_key(name)[1]
    t = module._parameters.get(attr)
    return t if t is not None else module._buffers[attr]


def _empty_like(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Fresh storage laid out like ``t`` (the same DTensor mesh and placements), on ``device`` if ``t`` is meta."""
    where = device if t.is_meta else t.device
    if isinstance(t, DTensor):
        local = torch.empty(t.to_local().shape, dtype=t.dtype, device=where)
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return torch.empty(t.shape, dtype=t.dtype, device=where)


def _place(value: torch.Tensor, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A full CPU tensor -> this rank's part of it, laid out like ``like`` (no communication)."""
    where = device if like.is_meta else like.device
    value = value.to(device=where, dtype=like.dtype)
    if isinstance(like, DTensor):
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    return value


def _write(target: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(target, DTensor):
        local = value.to_local() if isinstance(value, DTensor) else value
        target.to_local().copy_(local)
    else:
        target.copy_(value)


def _default_device(model: nn.Module) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        if isinstance(t, DTensor):
            kind = t.device_mesh.device_type
            if kind == "cuda" and torch.cuda.is_available():
                return torch.device("cuda", torch.cuda.current_device())
            return torch.device(kind)
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# load


def load(
    model: nn.Module,
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    *,
    plan: Plan | None = None,
    process_group: dist.ProcessGroup | None = None,
    strict: bool = False,
    rules: RuleSpec | None = None,
    prefix: str | None = None,
    ignore_missing: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    adapt: AdaptSpec | None = None,
    align: bool = False,
    init_missing: bool = True,
    check_finite: Literal["warn", "error", False] | None = False,
    allow_globals: Iterable[str | Any] | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> DistributedLoadReport:
    """Load a checkpoint into a model that lives on several ranks; call it on every rank.

    The same plan runs everywhere (made on rank 0 and broadcast); each rank reads only the
    slices its DTensor shards need, through ``torch.distributed.checkpoint``; replicated
    (plain) tensors are read whole on every rank. Missing modules are initialised to the same
    values on every rank, and the report is identical on every rank.

    Args:
        model: the model on this rank: sharded with FSDP2 ``fully_shard`` (DTensor parameters,
            possibly still on the meta device), holding other DTensors (tensor parallel), or a
            plain replicated model. A ``DistributedDataParallel`` wrapper is unwrapped.
        source: as for :func:`torchgraft.load`: a safetensors file, a sharded folder with
            ``model.safetensors.index.json``, a DCP checkpoint directory, a torch file, an open
            ``Source``... Every rank opens it, so it must be readable on every machine (a shared
            file system, or the same copy on each).
        plan: a plan to execute (from :func:`torchgraft.plan` or :meth:`Plan.load`); rank 0's is
            used (other ranks may pass ``None``) and checked against the model and checkpoint.
        process_group: the ranks taking part (default: the default group). Without an
            initialised ``torch.distributed`` the call runs as a single process.
        strict, rules, prefix, ignore_missing, ignore_unexpected, adapt, align, init_missing,
            allow_globals: as for :func:`torchgraft.load`.
        check_finite: as for :func:`torchgraft.load`; each rank checks the part it holds and
            ``report.nonfinite`` sums the counts over the ranks.
        device: where the tensors of a meta-device model are materialised (default: the
            DTensor mesh's device type, else ``"cpu"``).
        seed: seed for initialising missing modules and random adapters. By default rank 0's
            current CPU random state is used on every rank, so the values equal what
            ``torchgraft.load`` would give on rank 0. No rank's own random state is advanced.

    Returns:
        A :class:`DistributedLoadReport`, equal on every rank; warnings go to the
        ``torchgraft`` logger on rank 0 only.

    Raises:
        CheckpointError: the checkpoint cannot be read on some rank, or ranks see different
            checkpoints (the model is unchanged on every rank).
        ValueError: ``check_finite`` is not ``"warn"``, ``"error"`` or false.
        LoadError: ``strict=True`` and the checkpoint does not fit; ``check_finite="error"`` found
            NaN or Inf (the model is unchanged); a layout this cannot load
            into (FSDP1, DeepSpeed ZeRO-3, ``Partial`` DTensors, ``ShardedTensor``); ranks hold
            different models (pipeline stages); a module's initialiser failed.
        PlanError: ``plan`` was made for another model or checkpoint layout.
        AdapterError: an adapter cannot produce the model's shape.

    Every error is raised on every rank, so no rank is left waiting in a collective. Pass the
    same arguments on every rank (only rank 0's are used for planning).

    Example:
        >>> # torchrun --nproc_per_node 2 train.py
        >>> import torch, torch.distributed as dist
        >>> from torch.distributed.fsdp import fully_shard
        >>> import torchgraft.distributed as tgd
        >>> dist.init_process_group("gloo")
        >>> with torch.device("meta"):
        ...     model = BertForTokenClassification(config)
        >>> for layer in model.bert.encoder.layer:
        ...     fully_shard(layer)
        >>> fully_shard(model)
        >>> report = tgd.load(model, "all-MiniLM-L6-v2/")   # each rank reads about half the bytes
        >>> report.missing, report.bytes_read
        (['classifier.weight', 'classifier.bias'], [45134848, 45134848])
    """
    started = time.perf_counter()
    if check_finite not in ("warn", "error", False, None):
        raise ValueError(f"check_finite must be 'warn', 'error' or False, not {check_finite!r}")
    ranks = _Ranks(process_group)
    model = _unwrap(model)
    options = {"rules": rules, "prefix": prefix, "ignore_missing": ignore_missing,
               "ignore_unexpected": ignore_unexpected, "adapt": adapt, "align": align}  # fmt: skip

    def opener() -> Source:
        return open_source(source, allow_globals=allow_globals)

    the_plan, rng, opened = _shared_plan(ranks, model, opener, plan, options)
    src, view = _same_everywhere(ranks, model, opener, opened)
    try:
        if strict and (problems := the_plan.problems()):
            raise LoadError(f"Checkpoint {src.describe()} does not fit {the_plan.model} (strict=True):", problems)
        where = torch.device(device) if device is not None else _default_device(model)
        staged, whole, bytes_read = _read(ranks, the_plan, view, src, where)
        adapted, initial, methods = ranks.agree(
            lambda: _compute(model, view, the_plan, src, whole, where, _SharedRandom(rng, seed), init_missing)
        )
        merged = {**staged, **adapted}
        loaded = {name: merged[name] for name in the_plan.entries if name in merged}  # in model order
        nonfinite = _nonfinite(ranks, loaded) if check_finite else {}
        if nonfinite and check_finite == "error":
            raise LoadError(
                f"Checkpoint {src.describe()} holds NaN or Inf values (check_finite='error'); the model is unchanged:",
                [f"{name}: {c['nan']} NaN, {c['inf']} Inf" for name, c in nonfinite.items()],
            )
        ranks.agree(lambda: _commit(view, the_plan, initial, loaded, where))
    finally:
        if not isinstance(source, Source):
            src.close()  # tensors already copied stay valid

    stats = ranks.gather((bytes_read, time.perf_counter() - started))
    report = DistributedLoadReport.from_plan(
        the_plan, model=model, source=src, initialised=methods, dtype=None, seconds=max(s for _, s in stats)
    )
    report.model = the_plan.model or _model_name(model)
    report.world_size = ranks.size
    report.bytes_read = [b for b, _ in stats]
    report.sharded = [n for n in the_plan.entries if isinstance(loaded.get(n), DTensor)]
    report.nonfinite = nonfinite
    if ranks.rank == 0:
        report.log(logger)
    return report  # type: ignore[return-value]


def _shared_plan(
    ranks: _Ranks, model: nn.Module, opener: Callable[[], Source], plan: Plan | None, options: dict[str, Any]
) -> tuple[Plan, bytes, Source | None]:
    """Rank 0 plans (or checks the given plan) and broadcasts it with its random state; errors reach every rank."""
    payload: dict[str, Any] = {}
    opened: Source | None = None
    if ranks.rank == 0:
        try:
            _check_layout(model)
            opened = opener()
            if plan is None:
                made = make_plan(model, opened, **options)
                made.model = _model_name(model)
            else:
                plan.check_fits(TargetView.of(model), opened)
                made = plan
            payload = {"plan": made.to_dict(), "rng": torch.get_rng_state().numpy().tobytes()}
        except Exception as e:
            ranks.broadcast({"error": _pack(e)})  # the other ranks raise it too
            raise
    shared = ranks.broadcast(payload)
    if "error" in shared:
        raise _unpack(shared["error"], 0)
    return Plan.from_dict(shared["plan"]), shared["rng"], opened


def _same_everywhere(
    ranks: _Ranks, model: nn.Module, opener: Callable[[], Source], opened: Source | None
) -> tuple[Source, TargetView]:
    """Every rank: a layout DCP can load into, the same model, the same checkpoint."""

    def check() -> tuple[Source, TargetView, tuple[str, str]]:
        _check_layout(model)
        src = opened if opened is not None else opener()
        view = TargetView.of(model)
        return src, view, (view.fingerprint(), src.fingerprint())

    src, view, prints = ranks.agree(check)
    everyone = ranks.gather(prints)
    if len({p[0] for p in everyone}) > 1:
        raise LoadError(
            "The ranks hold different models (names or shapes differ); every rank must pass the same model "
            "(pipeline-parallel stages are not supported: load each stage's own part with torchgraft.load):",
            [f"rank {r}: model fingerprint {p[0]}" for r, p in enumerate(everyone)],
        )
    if len({p[1] for p in everyone}) > 1:
        raise CheckpointError(
            src.path,
            "the ranks see different checkpoints: " + ", ".join(f"rank {r}: {p[1]}" for r, p in enumerate(everyone)),
            format=src.format,
            hint="give every rank the same checkpoint (a shared file system, or identical copies)",
        )
    return src, view


def _read(
    ranks: _Ranks, plan: Plan, view: TargetView, src: Source, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """One DCP load for every planned entry: sharded entries read only this rank's slices.

    Returns:
        ``(staged, whole, bytes_read)``: entries laid out like the model's tensors, entries read
        whole for an adapter (or a ``(1,) -> ()`` reshape), and the bytes this rank read.
    """
    reader, key_of = storage_reader_for(src)
    staged: dict[str, torch.Tensor] = {}
    whole: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}

    def allocate() -> None:
        for name, e in plan.entries.items():
            if not e.loads:
                continue
            assert e.source is not None
            if e.action == "copy" and tuple(e.source_shape or ()) == tuple(e.shape):
                staged[name] = state[key_of(e.source)] = _empty_like(_live(view, name), device)
            else:
                shape, dtype = tuple(e.source_shape or ()), _torch_dtype(e.source_dtype or e.dtype)
                whole[name] = state[key_of(e.source)] = torch.empty(shape, dtype=dtype)

    ranks.agree(allocate)  # out of memory on one rank must not leave the others inside dcp.load
    try:
        _dcp_call(dcp.load, state, storage_reader=reader, process_group=ranks.group, no_dist=not ranks.active)
    except CheckpointException as e:
        raise _checkpoint_error(e, src.path, src.format) from None
    return staged, whole, int(getattr(reader, "bytes_read", 0))


@dataclass(frozen=True)
class _SharedRandom:
    state: bytes
    seed: int | None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        """The CPU random state every rank uses for adapters and initialisation; the caller's is restored."""
        with torch.random.fork_rng(devices=[]):
            if self.seed is not None:
                torch.default_generator.manual_seed(int(self.seed))
            else:
                torch.set_rng_state(torch.frombuffer(bytearray(self.state), dtype=torch.uint8))
            yield


def _compute(
    model: nn.Module,
    view: TargetView,
    plan: Plan,
    src: Source,
    whole: dict[str, torch.Tensor],
    device: torch.device,
    random: _SharedRandom,
    init_missing: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """Adapt, then initialise, on full tensors under the shared random state (as tg.load orders them); keep this rank's part."""
    adapted: dict[str, torch.Tensor] = {}
    with random(), torch.no_grad():
        for name, tensor in whole.items():
            e = plan.entries[name]
            value = _run_adapter(e, tensor, model) if e.action == "adapt" else tensor
            if tuple(value.shape) != tuple(e.shape):
                if e.shape != () or value.numel() != 1:
                    raise LoadError(
                        f"Checkpoint {src.describe()} changed since it was planned:",
                        [f"{e.source!r} has shape {list(value.shape)}, the model's {name!r} needs {list(e.shape)}"],
                    )
                value = value.reshape(())
            adapted[name] = _place(value, _live(view, name), device)
        inits, methods = _initial_values(model, view, plan, init_missing)
    initial = {name: _place(v, _live(view, name), device) for name, v in inits.items()}
    return adapted, initial, methods


def _commit(
    view: TargetView,
    plan: Plan,
    initial: dict[str, torch.Tensor],
    loaded: dict[str, torch.Tensor],
    device: torch.device,
) -> None:
    """Materialise a meta model, write the initial values, then the checkpoint's (local copies only)."""
    with torch.no_grad():
        _materialise(view, device)
        for name, value in initial.items():
            _write(_live(view, name), value)
        for name, e in plan.entries.items():
            if e.action == "default":  # BatchNorm's num_batches_tracked in checkpoints that predate it
                _live(view, name).zero_()
        for name, value in loaded.items():
            _write(_live(view, name), value)


def _nonfinite(ranks: _Ranks, loaded: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """NaN / Inf counts of the loaded values, each element counted once: summed over the ranks' own parts."""
    local: dict[str, dict[str, int]] = {}
    for name, t in loaded.items():
        if not (t.dtype.is_floating_point or t.dtype.is_complex) or not _counts_here(t, ranks.rank):
            continue
        if (counts := _count_nonfinite(t.to_local() if isinstance(t, DTensor) else t)) is not None:
            local[name] = counts
    total: dict[str, dict[str, int]] = {}
    for part in ranks.gather(local):
        for name, counts in part.items():
            into = total.setdefault(name, {"nan": 0, "inf": 0})
            into["nan"] += counts["nan"]
            into["inf"] += counts["inf"]
    return {name: total[name] for name in loaded if name in total}


def _counts_here(t: torch.Tensor, rank: int) -> bool:
    """Whether this rank counts ``t``: a plain (replicated) tensor on rank 0; a DTensor on the first replica."""
    if not isinstance(t, DTensor):
        return rank == 0
    coordinate = t.device_mesh.get_coordinate() or []
    return all(c == 0 for c, p in zip(coordinate, t.placements) if isinstance(p, Replicate))


def _materialise(view: TargetView, device: torch.device) -> None:
    """Give meta tensors storage (``to_empty`` per module, so loaded modules keep their values); re-tie."""
    had_meta = False
    for module in view.modules.values():
        own = [t for t in [*module._parameters.values(), *module._buffers.values()] if t is not None]
        if any(t.is_meta for t in own):
            module.to_empty(device=device, recurse=False)
            had_meta = True
    if had_meta:  # to_empty gives each name its own tensor: tie them again before anything is written
        for name, owner in view.tied.items():
            module, attr = view.module_of(name), split_key(name)[1]
            store = module._parameters if attr in module._parameters else module._buffers
            store[attr] = _live(view, owner)


def _initial_values(
    model: nn.Module, view: TargetView, plan: Plan, init_missing: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Full CPU values for every entry that needs initialising, from the model's own initialisers.

    Each module's own tensors are swapped for plain full-size CPU tensors (zeros where the model
    holds a shard or a meta tensor, a copy otherwise), the initialiser runs as in
    :func:`torchgraft.load`, and the module gets its own tensors back.
    """
    values: dict[str, torch.Tensor] = {}
    methods: dict[str, str] = {}
    for path, names in _modules_to_initialise(view, plan).items():
        module = view.modules[path]
        saved = (dict(module._parameters), dict(module._buffers))
        was_meta = {name: _live(view, name).is_meta for name in names}
        try:
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None:
                        store[key] = _full_start(t)
            methods[path] = initialise_module(model, module) if init_missing else "kept"
            for name in names:
                attr = split_key(name)[1]
                value = module._parameters.get(attr)
                value = value if value is not None else module._buffers[attr]
                if methods[path] == "kept" and not was_meta[name]:
                    continue  # nothing initialised it: the model keeps its values
                values[name] = value.detach()
        finally:
            module._parameters.clear()
            module._parameters.update(saved[0])
            module._buffers.clear()
            module._buffers.update(saved[1])
    return values, methods


def _full_start(t: torch.Tensor) -> torch.Tensor:
    if t.is_meta or isinstance(t, DTensor):
        value = torch.zeros(t.shape, dtype=t.dtype)
    else:
        value = t.detach().to("cpu", copy=True)
    return nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else value


# ---------------------------------------------------------------------------
# Conversion


@dataclass
class DCPConvertResult:
    """What :func:`convert_to_dcp` wrote.

    Attributes:
        source: the checkpoint read.
        dest: the DCP directory written.
        files: the files in it (``.metadata`` and ``__0_0.distcp``).
        tensors: how many tensors were written.
        bytes: total tensor bytes written.
        skipped: non-tensor entries of the source that were left out (name -> type).
    """

    source: str
    dest: str
    files: list[str]
    tensors: int
    bytes: int
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": self.dest,
            "files": list(self.files),
            "tensors": self.tensors,
            "bytes": self.bytes,
            "skipped": dict(self.skipped),
        }


def convert_to_dcp(
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    dest: str | os.PathLike[str],
    *,
    force: bool = False,
    container: str | None = None,
    allow_globals: Iterable[str | Any] | None = None,
) -> DCPConvertResult:
    """Write any checkpoint :func:`torchgraft.open` reads as a ``torch.distributed.checkpoint`` directory.

    Names, dtypes and values are kept as they are (renames and prefixes belong to loading, not
    to conversion). The result loads with ``dcp.load`` or :func:`load` on any number of ranks.
    It runs in this process (``no_dist``) even inside a distributed job: call it on one rank.
    The directory is written under a temporary name next to ``dest`` and renamed into place
    when complete.

    Args:
        source: a path, an open :class:`~torchgraft.Source` or a state dict.
        dest: the directory to create.
        force: replace an existing ``dest``.
        container, allow_globals: as for :func:`torchgraft.open`.

    Returns:
        A :class:`DCPConvertResult`.

    Raises:
        FileExistsError: ``dest`` exists and ``force`` is false (nothing written).
        CheckpointError: the source cannot be read (nothing written).

    Example:
        >>> convert_to_dcp("all-MiniLM-L6-v2/", "minilm-dcp/")
        DCPConvertResult(source='.../model.safetensors', dest='minilm-dcp', files=['.metadata', '__0_0.distcp'], tensors=104, ...)
    """
    from torch.distributed.checkpoint import FileSystemWriter

    dest_path = Path(os.fspath(dest)).expanduser()
    if dest_path.exists() and not force:
        raise FileExistsError(f"{str(dest_path)!r} exists; pass force=True (--force) to replace it")
    src = (
        source if isinstance(source, Source) else open_source(source, container=container, allow_globals=allow_globals)
    )
    state = {name: ref.load() for name, ref in src.items()}
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.", suffix=".tmp", dir=dest_path.parent))
    try:
        _dcp_call(dcp.save, state, storage_writer=FileSystemWriter(tmp, single_file_per_rank=True), no_dist=True)
        _replace_dir(tmp, dest_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DCPConvertResult(
        source=src.path or "state dict",
        dest=str(dest_path),
        files=sorted(p.name for p in dest_path.iterdir()),
        tensors=len(state),
        bytes=sum(t.numel() * t.element_size() for t in state.values()),
        skipped=dict(src.skipped),
    )


def _replace_dir(new: Path, dest: Path) -> None:
    if not dest.exists():
        new.rename(dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    old.rmdir()
    dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def convert_from_dcp(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    container: str | None = None,
) -> Any:
    """Write a DCP checkpoint directory as safetensors (one file, or shards with an index).

    Tensors saved in chunks by several ranks are reassembled; non-tensor entries (optimizer
    step counters, ...) are left out. A thin layer over :func:`torchgraft.convert.convert`.

    Args:
        source: the DCP checkpoint directory.
        dest: the ``.safetensors`` file or directory to write.
        dtype, max_shard_size, force: as for :func:`torchgraft.convert.convert`.
        container: which part of a training checkpoint to write (``"model"``); by default
            the weights are found as :func:`torchgraft.open` finds them.

    Returns:
        The :class:`torchgraft.convert.ConvertResult`.

    Raises:
        CheckpointError: ``source`` is not a readable DCP checkpoint.
        UnsafeCheckpointError: its ``.metadata`` names globals other than DCP's classes.
        FileExistsError: a destination file exists and ``force`` is false.

    Example:
        >>> convert_from_dcp("minilm-dcp/", "minilm-safetensors/")
    """
    from .convert import convert

    src = open_source(source, format="dcp", container=container)
    return convert(src, dest, dtype=dtype, max_shard_size=max_shard_size, force=force)
