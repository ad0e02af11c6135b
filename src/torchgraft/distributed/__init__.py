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

Modules, by stage: ``ranks`` (the collectives torchgraft makes), ``storage`` (DCP storage readers
over torchgraft sources), ``layouts`` (which model layouts can be loaded, tensors laid out like the
model's), ``loading`` (:func:`load` and :class:`DistributedLoadReport`), ``commit`` (adapt,
initialise and write on every rank), ``conversion`` (to and from DCP directories). What it
shares with :func:`torchgraft.load` is in :mod:`torchgraft.staging`; reading DCP checkpoints is
in :mod:`torchgraft.sources.dcp_storage`.
"""

from __future__ import annotations

from ..sources.dcp_storage import DCPStorageReader, dcp_call, read_dcp_tensor
from .conversion import DCPConvertResult, convert_from_dcp, convert_to_dcp
from .loading import DistributedLoadReport, load
from .storage import SourceStorageReader, storage_reader_for

#: The name this function had here before it moved to :mod:`torchgraft.sources.dcp_storage`.
_dcp_call = dcp_call

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
