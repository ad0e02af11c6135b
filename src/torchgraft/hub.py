"""``hf:org/name[@revision]`` paths: a Hugging Face repository, resolved by ``huggingface_hub``.

The repository is looked up in the local cache first (``HF_HOME``, ``HF_HUB_CACHE``); only when it
is not there and the network is allowed (``HF_HUB_OFFLINE`` unset) are its weights downloaded,
safetensors preferred. ``huggingface_hub`` is an optional extra: ``pip install 'torchgraft[hub]'``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError
from .messages import first_line

__all__ = ["HF_SCHEME", "HubSpec", "is_hub_path", "local_path", "parse_hub_path", "resolve_hub_path"]

HF_SCHEME = "hf:"
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
#: A revision is a branch or tag name (``main``, ``v1.0``, ``refs/pr/1``) or a commit hash: never a path.
_REVISION = re.compile(r"^[A-Za-z0-9_][\w.-]*(?:/[A-Za-z0-9_][\w.-]*)*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: A refs file holds one commit hash; anything longer is not one.
_MAX_REF_BYTES = 256
#: Files fetched when a repository is downloaded (never the whole repository).
_SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json"]
_TORCH_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.json"]
_INSTALL_HINT = "pip install 'torchgraft[hub]'  (huggingface_hub reads the Hugging Face cache)"


@dataclass(frozen=True)
class HubSpec:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{HF_SCHEME}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_path(path: object) -> bool:
    """True for strings that start with ``hf:``."""
    return isinstance(path, str) and path.startswith(HF_SCHEME)


def parse_hub_path(path: str) -> HubSpec:
    """``"hf:org/name@v1.0"`` -> ``HubSpec("org/name", "v1.0")``.

    Raises:
        CheckpointError: the text after ``hf:`` is not a repository id.
    """
    body = path.removeprefix(HF_SCHEME)
    repo_id, sep, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or (sep and not revision):
        raise CheckpointError(
            path,
            f"{body!r} is not a Hugging Face repository id",
            format="hf",
            hint="write hf:org/name or hf:org/name@revision (a branch, tag or commit)",
        )
    if revision and (len(revision) > 256 or not _REVISION.match(revision) or ".." in revision.split("/")):
        raise CheckpointError(
            path,
            f"the revision {revision[:80]!r} is not a branch, tag or commit name",
            format="hf",
            hint="a revision names a branch or tag (main, v1.0, refs/pr/1) or a commit hash; never a path",
        )
    return HubSpec(repo_id, revision or None)


def resolve_hub_path(path: str) -> Path:
    """The local snapshot directory of ``hf:org/name[@revision]``, from the cache or downloaded.

    Returns:
        The directory that holds the repository's files at that revision.

    Raises:
        CheckpointError: ``huggingface_hub`` is not installed, the id is invalid, or the
            repository is not in the cache and cannot be downloaded (offline, not found, gated).

    Example:
        >>> resolve_hub_path("hf:sentence-transformers/all-MiniLM-L6-v2")
        PosixPath('~/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/c9745ed1...')
    """
    spec = parse_hub_path(path)
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(path, "huggingface_hub is not installed", format="hf", hint=_INSTALL_HINT) from None
    try:
        commit = _cached_commit(spec, path)
        snapshot = huggingface_hub.snapshot_download(
            spec.repo_id, revision=commit or spec.revision, local_files_only=True
        )
        return _inside_cache(Path(snapshot), spec, path)
    except CheckpointError:
        raise
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # noqa: BLE001 - invalid revision names and the like, as one CheckpointError
        raise CheckpointError(path, f"{type(e).__name__}: {first_line(e)}", format="hf", hint=_cache_hint()) from None
    if _offline():
        raise CheckpointError(
            path,
            f"{spec.repo_id}{'@' + spec.revision if spec.revision else ''} is not in the Hugging Face cache "
            f"({_cache_dir()}) and HF_HUB_OFFLINE is set",
            format="hf",
            hint=_cache_hint(),
        )
    return _download(spec, path)


def _repo_folder(spec: HubSpec) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + spec.repo_id.replace("/", "--"))


def _cached_commit(spec: HubSpec, path: str) -> str | None:
    """The commit a branch or tag points at in the cache (``refs/<name>``), read only from a small regular file."""
    revision = spec.revision or "main"
    if _COMMIT.match(revision):
        return revision
    ref = _repo_folder(spec) / "refs" / revision
    try:
        info = os.lstat(ref)
    except OSError:
        return None  # not cached: huggingface_hub says so
    import stat

    def bad(reason: str) -> CheckpointError:
        return CheckpointError(path, reason, format="hf", hint="the Hugging Face cache is damaged: download it again")

    if not stat.S_ISREG(info.st_mode) or info.st_size > _MAX_REF_BYTES:
        raise bad(f"the cache's refs/{revision} is not a small regular file")
    text = ref.read_text(encoding="ascii", errors="replace").strip()
    if not _COMMIT.match(text):
        raise bad(f"the cache's refs/{revision} holds {text[:60]!r}, not a commit hash")
    return text


def _inside_cache(snapshot: Path, spec: HubSpec, path: str) -> Path:
    """The snapshot folder, refused unless it is a directory inside the repository's own cache folder."""
    folder = (_repo_folder(spec) / "snapshots").resolve()
    resolved = snapshot.resolve()
    if resolved.parent != folder or not resolved.is_dir():
        raise CheckpointError(
            path,
            f"the revision resolves to {str(snapshot)[:200]!r}, not a snapshot folder of {spec.repo_id} in the cache",
            format="hf",
            hint="a revision names a branch, tag or commit in the cache; the cache may be damaged",
        )
    return snapshot


def local_path(path: str | os.PathLike[str]) -> Path:
    """``hf:`` paths resolved to their snapshot directory; other paths returned as a ``Path``."""
    if is_hub_path(path):
        return resolve_hub_path(str(path))
    return Path(path).expanduser()


def _download(spec: HubSpec, path: str) -> Path:  # pragma: no cover - needs a network
    import huggingface_hub

    reason = _unreachable()  # without a network huggingface_hub retries for ~25 s: fail at once instead
    if reason:
        raise CheckpointError(
            path,
            f"{spec} is not in the Hugging Face cache ({_cache_dir()}) and the hub cannot be reached ({reason})",
            format="hf",
            hint="set HF_HUB_OFFLINE=1 to use the cache only, set HF_HOME to the cache that holds the repository, "
            "or download it where a network exists (hf download org/name)",
        )
    try:
        files = huggingface_hub.list_repo_files(spec.repo_id, revision=spec.revision)
        patterns = _SAFETENSORS_PATTERNS if any(f.endswith(".safetensors") for f in files) else _TORCH_PATTERNS
        return Path(huggingface_hub.snapshot_download(spec.repo_id, revision=spec.revision, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors, as one CheckpointError
        raise CheckpointError(
            path,
            f"downloading failed: {type(e).__name__}: {first_line(e)}",
            format="hf",
            hint="check the repository id and revision, log in for gated repositories (hf auth login), "
            "or pass a local directory",
        ) from None


def _unreachable(timeout: float = 1.5) -> str | None:
    """Why the hub's endpoint cannot be reached within ``timeout`` seconds (DNS and TCP), or ``None`` when it can."""
    import socket
    import threading
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host}: {e.strerror or e}")

    worker = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(timeout)
    return result[0] if result else f"{host}: no answer in {timeout:g} s"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover
        return "the Hugging Face cache"


def _cache_hint() -> str:
    return "download it where a network exists (hf download org/name), or set HF_HOME to the cache that holds it"
