"""Ranks: the few collectives torchgraft itself makes (plan broadcast, agreement, stats); one random state."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LoadError

__all__ = ["Ranks", "SharedRandom", "pack_error", "unpack_error"]


class Ranks:
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
        errors = self.gather(None if error is None else pack_error(error))
        if error is not None:
            raise error
        for rank, packed in enumerate(errors):
            if packed is not None:
                raise unpack_error(packed, rank)
        return result


def pack_error(error: BaseException) -> tuple[Any, ...]:
    """An exception as (class, args, attributes), rebuilt on other ranks without calling ``__init__``."""
    try:
        packed = (type(error), error.args, {k: v for k, v in vars(error).items() if k != "__notes__"})
        pickle.loads(pickle.dumps(packed))
        return packed
    except Exception:  # noqa: BLE001 - anything that does not survive pickling travels as text
        return (RuntimeError, (f"{type(error).__name__}: {error}",), {})


def unpack_error(packed: tuple[Any, ...], rank: int) -> BaseException:
    """The exception :func:`pack_error` packed on ``rank``, with a note saying where it was raised."""
    cls, args, attrs = packed
    error = cls.__new__(cls)
    BaseException.__init__(error, *args)
    error.__dict__.update(attrs)
    if hasattr(error, "add_note"):
        error.add_note(f"(raised on rank {rank}; re-raised on every rank so that none waits in a collective)")
    return error


@dataclass(frozen=True)
class SharedRandom:
    """Rank 0's CPU random state (or ``seed``), so that adapters and initialisers draw the same values everywhere."""

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

