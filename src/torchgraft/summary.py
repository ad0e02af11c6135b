"""What is in a checkpoint: counts, dtypes, bytes, and a module tree with repeated layers collapsed.

Works from names, shapes and dtypes only (no tensor bytes, and no torch import for safetensors).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from .keys import format_ranges, natural_key
from .sources import Source

__all__ = ["TreeNode", "module_tree", "select", "summarize"]


def select(source: Source, pattern: str) -> Source:
    """The entries whose names match a glob (``*.attention.*``, ``encoder.layer.1?.*``).

    A pattern without wildcards selects that name and everything under it
    (``encoder.layer.0`` -> ``encoder.layer.0.*``). The result shares the source's tensors.
    """
    wild = any(c in pattern for c in "*?[")
    under = pattern.rstrip(".") + "."

    def match(name: str) -> bool:
        return fnmatchcase(name, pattern) if wild else (name == pattern or name.startswith(under))

    keep = {n: r for n, r in source.items() if match(n)}
    return Source(
        keep,
        path=source.path,
        format=source.format,
        metadata=source.metadata,
        module_metadata=source.module_metadata,
        container=source.container,
        containers=source.containers,
        skipped={k: v for k, v in source.skipped.items() if match(k)},
        files=source.files,
        conversions={k: v for k, v in source.conversions.items() if k in keep},
    )


def summarize(source: Source) -> dict[str, Any]:
    """A JSON-ready summary: ``format``, ``tensors``, ``parameters``, ``bytes``, ``dtypes``, ``entries``."""
    dtypes: Counter[str] = Counter()
    for ref in source.values():
        dtypes[ref.dtype] += ref.numel
    return {
        "path": source.path,
        "format": source.format,
        "container": source.container,
        "tensors": len(source),
        "parameters": source.parameters,
        "bytes": source.nbytes,
        "dtypes": dict(dtypes),
        "metadata": source.metadata,
        "skipped": source.skipped,
        "conversions": source.conversions,
        "entries": [{"name": n, "shape": list(r.shape), "dtype": r.dtype} for n, r in source.items()],
    }


@dataclass
class TreeNode:
    name: str
    leaf: tuple[tuple[int, ...], str] | None = None  # (shape, dtype) for tensors
    children: dict[str, TreeNode] = field(default_factory=dict)

    def signature(self) -> Any:
        return (self.leaf, tuple((k, c.signature()) for k, c in self.children.items()))

    @property
    def parameters(self) -> int:
        own = 0
        if self.leaf is not None:
            own = 1
            for d in self.leaf[0]:
                own *= d
        return own + sum(c.parameters for c in self.children.values())


def module_tree(source: Source, *, collapse: bool = True) -> TreeNode:
    """Nest dotted names into a tree; with ``collapse``, numbered siblings with identical
    subtrees (names, shapes, dtypes) merge into one node named ``{0..11}``."""
    root = TreeNode("")
    for name in sorted(source, key=natural_key):
        ref = source[name]
        node = root
        for part in name.split("."):
            node = node.children.setdefault(part, TreeNode(part))
        node.leaf = (ref.shape, ref.dtype)
    if collapse:
        _collapse(root)
    return root


def _collapse(node: TreeNode) -> None:
    for child in node.children.values():
        _collapse(child)
    numbered = [k for k in node.children if k.isdigit()]
    if len(numbered) < 2:
        return
    groups: dict[Any, list[str]] = {}
    for k in numbered:
        groups.setdefault(node.children[k].signature(), []).append(k)
    merged: dict[str, TreeNode] = {}
    done: set[str] = set()
    for k in node.children:
        if k in done:
            continue
        if k.isdigit():
            members = groups[node.children[k].signature()]
            done.update(members)
            if len(members) > 1:
                label = "{" + format_ranges(int(m) for m in members) + "}"
                first = node.children[members[0]]
                merged[label] = TreeNode(label, first.leaf, first.children)
                continue
        merged[k] = node.children[k]
    node.children = merged
