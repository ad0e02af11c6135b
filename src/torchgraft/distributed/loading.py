"""``torchgraft.distributed.load``: plan once, read each rank's slices, adapt and initialise alike, commit."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from ..errors import CheckpointError, LoadError, PlanError
from ..plan import Plan
from ..planner import IgnorePatterns, PlanOptions, build_plan
from ..report import LoadReport
from ..sources import Source
from ..sources import open as open_source
from ..sources.dcp_storage import checkpoint_error, dcp_call
from ..staging import ModuleGroups, live, nonfinite_error, strict_error
from ..target import TargetView
from .commit import commit, compute, gather_nonfinite
from .layouts import check_layout, default_device, empty_like, model_name, unwrap
from .ranks import Ranks, SharedRandom, pack_error, unpack_error
from .storage import storage_reader_for, torch_dtype

if TYPE_CHECKING:
    from ..policy import AdaptSpec
    from ..rules import RuleSpec

__all__ = ["DistributedLoadReport", "load"]

logger = logging.getLogger("torchgraft")


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


def load(
    model: nn.Module,
    source: str | os.PathLike[str] | Source | Mapping[str, Any],
    *,
    plan: Plan | None = None,
    process_group: dist.ProcessGroup | None = None,
    strict: bool = False,
    rules: RuleSpec | None = None,
    prefix: str | None = None,
    ignore_missing: IgnorePatterns = (),
    ignore_unexpected: IgnorePatterns = (),
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
    ranks = Ranks(process_group)
    model = unwrap(model)
    options = PlanOptions(rules=rules, prefix=prefix, ignore_missing=ignore_missing,
                          ignore_unexpected=ignore_unexpected, adapt=adapt, align=align)  # fmt: skip

    def opener() -> Source:
        return open_source(source, allow_globals=allow_globals)

    the_plan, rng, opened = _shared_plan(ranks, model, opener, plan, options)
    if transformed := the_plan.transformed:  # refused before any read: never a silent difference
        raise PlanError(
            f"torchgraft.distributed.load does not run transforms yet ({len(transformed)} entries, e.g. "
            f"{next(iter(transformed))!r} = {next(iter(transformed.values()))}). Convert the checkpoint once in one "
            "process (tg.load, then tg.convert(model.state_dict(), ...)) and load that file here."
        )
    if the_plan.handed:  # this executor runs no module's own loading code: what the plan hands to it stays unused
        the_plan.unexpected += [k for k in the_plan.handed if k not in the_plan.unexpected]
    src, view = _same_everywhere(ranks, model, opener, opened)
    if not_run := _loading_code_not_run(view, src):
        the_plan.notes.append(not_run)
        if ranks.rank == 0:
            logger.warning("%s", not_run)
    try:
        if strict and the_plan.problems():
            raise strict_error(src, the_plan.model, the_plan)
        where = torch.device(device) if device is not None else default_device(model)
        groups = ModuleGroups.of(view, the_plan)
        staged, whole, bytes_read = _read(ranks, the_plan, view, src, where)
        adapted, initial, methods = ranks.agree(
            lambda: compute(model, view, the_plan, groups, src, whole, where, SharedRandom(rng, seed), init_missing)
        )
        merged = {**staged, **adapted}
        loaded = {name: merged[name] for name in the_plan.entries if name in merged}  # in model order
        nonfinite = gather_nonfinite(ranks, loaded) if check_finite else {}
        if nonfinite and check_finite == "error":
            raise nonfinite_error(src, nonfinite)
        ranks.agree(lambda: commit(view, the_plan, initial, loaded, where))
    finally:
        if not isinstance(source, Source):
            src.close()  # tensors already copied stay valid

    stats = ranks.gather((bytes_read, time.perf_counter() - started))
    report = DistributedLoadReport.from_plan(
        the_plan, model=model, source=src, initialised=methods, dtype=None, seconds=max(s for _, s in stats)
    )
    report.model = the_plan.model or model_name(model)
    report.world_size = ranks.size
    report.bytes_read = [b for b, _ in stats]
    report.sharded = [n for n in the_plan.entries if isinstance(loaded.get(n), DTensor)]
    report.nonfinite = nonfinite
    if ranks.rank == 0:
        report.log(logger)
    return report  # type: ignore[return-value]


def _shared_plan(
    ranks: Ranks, model: nn.Module, opener: Callable[[], Source], plan: Plan | None, options: PlanOptions
) -> tuple[Plan, bytes, Source | None]:
    """Rank 0 plans (or checks the given plan) and broadcasts it with its random state; errors reach every rank."""
    payload: dict[str, Any] = {}
    opened: Source | None = None
    if ranks.rank == 0:
        try:
            check_layout(model)
            opened = opener()
            if plan is None:
                made = build_plan(model, TargetView.of(model), opened, options)
                made.model = model_name(model)
            else:
                plan.check_fits(TargetView.of(model), opened)
                made = plan
            payload = {"plan": made.to_dict(), "rng": torch.get_rng_state().numpy().tobytes()}
        except Exception as e:
            ranks.broadcast({"error": pack_error(e)})  # the other ranks raise it too
            raise
    shared = ranks.broadcast(payload)
    if "error" in shared:
        raise unpack_error(shared["error"], 0)
    return Plan.from_dict(shared["plan"]), shared["rng"], opened


def _same_everywhere(
    ranks: Ranks, model: nn.Module, opener: Callable[[], Source], opened: Source | None
) -> tuple[Source, TargetView]:
    """Every rank: a layout DCP can load into, the same model, the same checkpoint."""

    def check() -> tuple[Source, TargetView, tuple[str, str]]:
        check_layout(model)
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
    ranks: Ranks, plan: Plan, view: TargetView, src: Source, device: torch.device
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
                staged[name] = state[key_of(e.source)] = empty_like(live(view, name), device)
            else:
                shape, dtype = tuple(e.source_shape or ()), torch_dtype(e.source_dtype or e.dtype)
                whole[name] = state[key_of(e.source)] = torch.empty(shape, dtype=dtype)

    ranks.agree(allocate)  # out of memory on one rank must not leave the others inside dcp.load
    try:
        dcp_call(dcp.load, state, storage_reader=reader, process_group=ranks.group, no_dist=not ranks.active)
    except CheckpointException as e:
        raise checkpoint_error(e, src.path, src.format) from None
    return staged, whole, int(getattr(reader, "bytes_read", 0))



def _loading_code_not_run(view: TargetView, src: Source) -> str:
    """Plain words for what :func:`torchgraft.load` would run here and this executor does not, or ``""``.

    This executor writes tensors into the sharded model itself; it runs no module's own loading
    code (a custom ``_load_from_state_dict``, load hooks other than torch.distributed's own) and
    sets no extra state, so a model that relies on them is told so instead of silently differing.
    """
    from torch.nn.modules.batchnorm import _NormBase

    stock = (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)

    def own_hooks(module: nn.Module) -> bool:
        hooks = [*module._load_state_dict_pre_hooks.values(), *module._load_state_dict_post_hooks.values()]
        own = [getattr(h, "hook", h) for h in hooks]
        return any(not getattr(h, "__module__", "").startswith("torch.distributed") for h in own)

    modules = [
        p or "(root)"
        for p, m in view.modules.items()
        if type(m)._load_from_state_dict not in stock or own_hooks(m)
    ]
    parts = []
    if modules:
        more = " ..." if len(modules) > 6 else ""
        parts.append(f"run the loading code of its modules' own ({', '.join(modules[:6])}{more})")
    if src.extra_state:
        parts.append(f"call set_extra_state with the checkpoint's extra state ({', '.join(list(src.extra_state)[:6])})")
    if not parts:
        return ""
    return (
        "torchgraft.distributed.load writes tensors into the sharded model itself; it does not "
        + ", nor ".join(parts)
        + ". Load the model with torchgraft.load before sharding it if it needs them."
    )
