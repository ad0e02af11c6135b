"""The lazy, read-only view of a checkpoint that every reader returns."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..keys import layout_fingerprint

if TYPE_CHECKING:  # torch is imported lazily: listing a safetensors file must not pay for it
    import torch

__all__ = ["DTYPE_SIZES", "Source", "TensorRef", "constant_loader", "dtype_name", "require", "valid_module_metadata"]

#: Bytes per element for every dtype name a reader may report (torch's names, without "torch.").
DTYPE_SIZES: dict[str, float] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}  # fmt: skip


def require(module: str, *, path: Any, format: str, reading: str, extra: str, package: str | None = None) -> Any:
    """Import the library a format is read with, or raise the :class:`CheckpointError` that names the extra.

    Readers of other frameworks' files import their library only when such a file is opened.

    Example:
        >>> gguf = require("gguf", path=path, format="gguf", reading="GGUF files", extra="gguf")
    """
    import importlib

    from ..errors import CheckpointError

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(
            path,
            f"reading {reading} needs the {(package or module)!r} package, which is not installed",
            format=format,
            hint=f"pip install 'torchgraft[{extra}]'",
        ) from None


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"float32"``; strings pass through."""
    return str(dtype).removeprefix("torch.")


class TensorRef:
    """One entry of a checkpoint: its shape and dtype now, its values on demand.

    Attributes:
        name, shape, dtype: as stored (dtype as torch names it, without ``"torch."``).
        file: the file that holds the tensor's bytes, where the reader knows it (safetensors:
            each shard's own file), so that a tensor can be read in slices without parsing
            the file's header again; ``None`` otherwise.

    Example:
        >>> ref = tg.open("model.safetensors")["embeddings.word_embeddings.weight"]
        >>> ref.shape, ref.dtype
        ((30522, 384), 'float32')
        >>> tensor = ref.load()          # reads (or maps) the bytes now
    """

    __slots__ = ("_loader", "dtype", "file", "name", "shape")

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: str,
        loader: Callable[[], torch.Tensor],
        *,
        file: str | None = None,
    ):
        self.name = name
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.file = file
        self._loader = loader

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.numel * DTYPE_SIZES.get(self.dtype, 0))

    def load(self) -> torch.Tensor:
        """Return the tensor (CPU; memory-mapped where the format allows)."""
        return self._loader()

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r}, shape={self.shape}, dtype={self.dtype})"


class Source(Mapping[str, TensorRef]):
    """A checkpoint opened lazily: a read-only mapping ``name -> TensorRef``.

    Built by :func:`torchgraft.open`; names, shapes and dtypes are known without
    reading tensor bytes wherever the format allows (safetensors, torch zip).

    Attributes:
        path: file or directory it was opened from (``None`` for an in-memory state dict).
        format: what was read: a reader's name in :data:`torchgraft.sources.READERS` (``"safetensors"``,
            ``"torch-zip"``, ``"torch-legacy"``, ``"dcp"``), ``"sharded-safetensors"`` or ``"sharded-torch"``
            for an index and its shards, ``"state-dict"`` for an in-memory state dict.
        metadata: file-level string metadata (safetensors header ``__metadata__``).
        module_metadata: per-module ``_metadata`` saved by ``torch.save(model.state_dict())``
            (``{"features.0.1": {"version": 2}, ...}``), used by modules' version hooks.
        container: where in the file the state dict was found (``"state_dict"``), or ``""``.
        containers: every candidate state dict the file holds.
        skipped: entries that are not tensors and were left out (name -> type name).
        extra_state: non-tensor ``*._extra_state`` values (what a module's ``get_extra_state``
            returned when it was saved), name -> value; not tensors, so not in the mapping, but
            handed to ``set_extra_state`` on load as ``load_state_dict`` does. Also in ``skipped``.
        conversions: entries the reader changed to torch's layout while reading, name -> what
            it did in plain words (``"Keras Dense kernel [in, out] transposed to [out, in]"``,
            ``"dequantised from Q4_K"``). Formats of other frameworks fill it; torch formats leave it empty.

    Example:
        >>> src = tg.open("checkpoint_dir/")
        >>> len(src), src.format
        (104, 'safetensors')
        >>> src["pooler.dense.weight"].shape
        (384, 384)
    """

    def __init__(
        self,
        entries: Mapping[str, TensorRef],
        *,
        path: str | None,
        format: str,
        metadata: Mapping[str, str] | None = None,
        module_metadata: Mapping[str, Mapping[str, Any]] | None = None,
        container: str = "",
        containers: list[str] | None = None,
        skipped: Mapping[str, str] | None = None,
        files: list[str] | None = None,
        closer: Callable[[], None] | None = None,
        conversions: Mapping[str, str] | None = None,
        extra_state: Mapping[str, Any] | None = None,
    ) -> None:
        self._entries = dict(entries)
        self.path = path
        self.format = format
        self.metadata = dict(metadata or {})
        self.module_metadata = {k: dict(v) for k, v in (module_metadata or {}).items()}
        self.container = container
        self.containers = list(containers or [])
        self.skipped = dict(skipped or {})
        self.files = list(files or ([path] if path else []))
        self.conversions = dict(conversions or {})
        self.extra_state = dict(extra_state or {})
        self._closer = closer

    # Mapping protocol
    def __getitem__(self, name: str) -> TensorRef:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in {self.describe()}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # Summaries
    @property
    def parameters(self) -> int:
        """Total number of elements over all entries."""
        return sum(r.numel for r in self._entries.values())

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._entries.values())

    def describe(self) -> str:
        where = self.path or "in-memory state dict"
        inner = f" [{self.container}]" if self.container else ""
        return f"{where}{inner} ({self.format})"

    def fingerprint(self) -> str:
        """A short hash of names, shapes and dtypes: identifies the layout, not the values."""
        return layout_fingerprint((name, r.shape, r.dtype) for name, r in sorted(self._entries.items()))

    def plan_notes(self, missing: list[str]) -> list[str]:
        """Plain-words notes for a plan whose model entries ``missing`` this source cannot give.

        Readers of other frameworks' files override it (an ONNX graph whose BatchNorm was folded into
        its convolutions holds no BatchNorm entries); torch formats have nothing to add.
        """
        return []

    def close(self) -> None:
        """Release file handles and memory maps (tensors already loaded stay valid)."""
        if self._closer is not None:
            self._closer()
            self._closer = None

    def __enter__(self) -> Source:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Source {self.describe()}: {len(self)} tensors>"

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], *, name: str | None = None) -> Source:
        """Wrap an in-memory state dict (as returned by ``model.state_dict()``)."""
        import torch

        entries: dict[str, TensorRef] = {}
        skipped: dict[str, str] = {}
        extra: dict[str, Any] = {}
        for key, value in state_dict.items():
            if isinstance(value, torch.Tensor):
                entries[key] = TensorRef(key, tuple(value.shape), dtype_name(value.dtype), constant_loader(value))
            else:
                skipped[key] = type(value).__name__
                if is_extra_state(key):
                    extra[key] = value
        meta = valid_module_metadata(getattr(state_dict, "_metadata", None))
        return cls(
            entries, path=name, format="state-dict", module_metadata=meta, skipped=skipped, extra_state=extra
        )


#: The state-dict name torch gives what ``get_extra_state`` returns (``nn.modules.module._EXTRA_STATE_KEY_SUFFIX``).
EXTRA_STATE = "_extra_state"


def is_extra_state(key: str) -> bool:
    """True for a module's ``get_extra_state`` entry (``block._extra_state``)."""
    return key == EXTRA_STATE or key.endswith("." + EXTRA_STATE)


def valid_module_metadata(meta: Any) -> dict[str, dict[str, Any]] | None:
    """A state dict's ``_metadata`` when it has the shape torch writes (module -> {"version": int, ...}), else ``None``.

    Modules' version hooks compare ``version`` with numbers mid-load; a hostile value must be dropped at open.
    """
    if not isinstance(meta, Mapping):
        return None
    for module, info in meta.items():
        if not isinstance(module, str) or not isinstance(info, Mapping):
            return None
        if not all(isinstance(k, str) for k in info):
            return None
        version = info.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            return None
    return {k: dict(v) for k, v in meta.items()}


def constant_loader(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A :class:`TensorRef` loader for a tensor already in memory (a state dict, an eagerly read pickle)."""
    return lambda: t
