"""Atomic writes: a failure at any step leaves neither a partial file nor a changed original."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torchgraft as tg
from torchgraft import fileio
from torchgraft.fileio import atomic_path, atomic_write_text

ORIGINAL = b"the original, which must survive every failure\n"


def state(directory: Path) -> dict[str, tuple[str, int, int]]:
    """Every file in ``directory``: content hash, mode, modification time."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode & 0o7777, p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
    }


@pytest.fixture
def dest(tmp_path) -> Path:
    path = tmp_path / "out" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(ORIGINAL)
    os.chmod(path, 0o640)
    return path


def test_success_replaces_in_one_rename_and_keeps_the_mode(dest):
    with atomic_path(dest) as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(".model.safetensors.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert dest.read_bytes() == ORIGINAL  # nothing visible before the rename
    assert dest.read_bytes() == b"new"
    assert dest.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"]


def test_new_file_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a" / "plan.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "plan.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("error", [RuntimeError("writer crashed"), KeyboardInterrupt()])
def test_error_in_the_writer(dest, error):
    before = state(dest.parent)
    with pytest.raises(type(error)), atomic_path(dest) as tmp:
        tmp.write_bytes(b"half of the new conte")
        raise error
    assert state(dest.parent) == before


def test_error_in_the_writer_for_a_new_file(tmp_path):
    with pytest.raises(RuntimeError, match="writer crashed"), atomic_path(tmp_path / "new.bin") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("writer crashed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", ["fsync", "replace", "chmod"])
def test_failure_while_committing(dest, monkeypatch, step):
    def fail(*args, **kwargs):
        raise OSError(28, f"No space left on device ({step})")

    monkeypatch.setattr(fileio.os, step, fail)
    before = state(dest.parent)
    with pytest.raises(OSError, match=rf"No space left on device \({step}\)"), atomic_path(dest) as tmp:
        tmp.write_bytes(b"new")
    monkeypatch.undo()
    assert state(dest.parent) == before


def test_no_overwrite_refuses_before_writing(dest):
    before = state(dest.parent)
    with (
        pytest.raises(FileExistsError, match=r"model\.safetensors exists; pass force/overwrite to replace it"),
        atomic_path(dest, overwrite=False),
    ):
        pytest.fail("the writer must not run")
    assert state(dest.parent) == before


def test_no_overwrite_when_the_file_appears_while_writing(tmp_path):
    target = tmp_path / "model.bin"
    with (
        pytest.raises(FileExistsError, match=r"appeared while writing; refusing to replace it"),
        atomic_path(target, overwrite=False) as tmp,
    ):
        tmp.write_bytes(b"ours")
        target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_killed_writer_leaves_the_original(dest):
    """A process killed mid-write cannot clean up, but the destination is never partial."""
    code = textwrap.dedent(
        f"""
        import os
        from torchgraft.fileio import atomic_path
        with atomic_path({str(dest)!r}) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
                f.flush()
                os._exit(9)  # no finally, no cleanup: like SIGKILL
        """
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 9
    assert dest.read_bytes() == ORIGINAL
    leftovers = [p.name for p in dest.parent.iterdir() if p != dest]
    assert len(leftovers) == 1 and leftovers[0].startswith(".model.safetensors.") and leftovers[0].endswith(".tmp")


# Plan.save ------------------------------------------------------------------------------------


@pytest.fixture
def plan():
    model = torch.nn.Linear(2, 2)
    return tg.plan(model, model.state_dict())


def test_plan_save_round_trip(tmp_path, plan):
    path = tmp_path / "plans" / "plan.json"
    plan.save(path)
    assert tg.Plan.load(path).to_dict() == plan.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["plan.json"]


def test_plan_save_failing_mid_write_keeps_the_old_plan(tmp_path, plan, monkeypatch):
    path = tmp_path / "plan.json"
    path.write_text('{"old": true}\n')
    before = state(tmp_path)

    def half_then_fail(self, text, *args, **kwargs):
        with open(self, "w", encoding="utf-8") as f:
            f.write(text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left on device"):
        plan.save(path)
    monkeypatch.undo()
    assert state(tmp_path) == before


def test_plan_save_failing_to_serialise_writes_nothing(tmp_path, plan, monkeypatch):
    path = tmp_path / "plan.json"
    monkeypatch.setattr(type(plan), "to_dict", lambda self: {"bad": object()})
    with pytest.raises(TypeError, match="not JSON serializable"):
        plan.save(path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", r"cannot read plan .*Expecting property name"),
        ("[" * 100_000 + "]" * 100_000, r"cannot read plan"),
        ("[1, 2]", r"is not a torchgraft plan \(a JSON object is expected\)"),
        ('{"torchgraft_plan": 1}', r"not a valid torchgraft plan: the plan has no 'entries'"),
        (
            '{"torchgraft_plan": 1, "entries": [{"target": "w"}]}',
            r"not a valid torchgraft plan: entry 0 lacks 'action'",
        ),
        ('{"torchgraft_plan": 1, "entries": [3]}', r"not a valid torchgraft plan: entry 0 is a int, not an object"),
        ('{"torchgraft_plan": 99, "entries": []}', r"not a torchgraft plan of version 1 \(found 99\)"),
    ],
)
def test_damaged_plan_files_raise_plan_error(tmp_path, text, match):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(tg.PlanError, match=match):
        tg.Plan.load(path)


# Interrupted conversions (issue 17.14) ------------------------------------------------------------------


def _stale(folder, name: str, *, age_s: float = 3600.0):
    import time

    p = folder / name
    p.write_bytes(b"\0" * 64)
    old = time.time() - age_s
    os.utime(p, (old, old))
    return p


def test_convert_removes_stale_temps_of_its_own_names_only(tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "in.safetensors"
    save_file({"w": torch.ones(3)}, src)
    out = tmp_path / "out"
    out.mkdir()
    ours = [
        _stale(out, ".model.safetensors.abcd1234.tmp"),
        _stale(out, ".model-00002-of-00003.safetensors.x_y_z_12.tmp"),
    ]
    foreign = [_stale(out, ".other.safetensors.abcd1234.tmp"), _stale(out, ".model.safetensors.notours.tmp")]
    young = _stale(out, ".model.safetensors.zzzz9999.tmp", age_s=-60)  # newer than the run: another writer's
    tg.convert(src, out)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in foreign) and young.exists()
    assert (out / "model.safetensors").exists()


def test_stale_temp_locked_by_a_running_writer_is_kept(tmp_path):
    import fcntl

    from torchgraft.fileio import remove_stale_temps

    temp = _stale(tmp_path, ".model.safetensors.abcd1234.tmp")
    with open(temp, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # as atomic_path holds it while writing
        assert remove_stale_temps(tmp_path, "model.safetensors", before=float("inf")) == []
        assert temp.exists()
    assert remove_stale_temps(tmp_path, "model.safetensors", before=float("inf")) == [temp]


_SLOW_CONVERT = """
import sys, time, torch, torchgraft as tg
from torchgraft.sources.base import Source, TensorRef
def slow():
    print("writing", flush=True)
    time.sleep(60)
    return torch.ones(4)
# read lazily, inside the write (as safetensors sources are): the temporary file exists while it sleeps
src = Source({"w": TensorRef("w", (4,), "float32", slow)}, path="slow", format="safetensors")
tg.convert(src, sys.argv[1])
"""


def test_sigterm_during_convert_leaves_no_temp_file(tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CONVERT, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        assert child.stdout.readline().strip() == b"writing"  # the temporary file exists now
        assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
        child.send_signal(signal.SIGTERM)
        _out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert b"KeyboardInterrupt" in err
    assert list(out.iterdir()) == []
