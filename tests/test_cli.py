"""The ``torchgraft`` command, run as users run it: ``python -m torchgraft ...`` in a subprocess.

Subprocesses cost an interpreter start (and torch's import where a command needs it), so each
test here covers one acceptance item end to end; error paths that need no real entry point run
``main([...])`` in-process (tests/test_cli_errors.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import torchgraft as tg

ENTRY_TIMEOUT_S = 300


def run_cli(
    *args: object, cwd: Path | None = None, env: dict[str, str] | None = None, importtime: bool = False
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "torchgraft", *map(str, args)]
    full_env = {**os.environ, "NO_COLOR": "1", **(env or {})}
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, cwd=cwd, env=full_env, timeout=ENTRY_TIMEOUT_S
    )


def imported_modules(importtime_stderr: str, *, full: bool = False) -> set[str]:
    """Top-level names (or with ``full``, the dotted names) of every module `python -X importtime` reports."""
    names = set()
    for line in importtime_stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)\s*$", line)
        if m:
            names.add(m.group(1) if full else m.group(1).split(".")[0])
    return names


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Acceptance 1: inspect --json, without importing torch ------------------------------------


def test_inspect_json_counts_minilm_without_importing_torch(minilm_dir):
    r = run_cli("inspect", minilm_dir / "model.safetensors", "--json", importtime=True)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["format"] == "safetensors"
    assert info["tensors"] == 104
    assert info["parameters"] == 22713728
    assert info["bytes"] == 22713216 * 4 + 512 * 8
    assert len(info["entries"]) == 104
    entry = next(e for e in info["entries"] if e["name"] == "embeddings.word_embeddings.weight")
    assert entry == {"name": "embeddings.word_embeddings.weight", "shape": [30522, 384], "dtype": "float32"}
    modules = imported_modules(r.stderr)
    assert "torchgraft" in modules, "importtime output was not parsed: the check below would prove nothing"
    assert "torch" not in modules
    assert "rich" not in modules  # --json prints no tables
    # other frameworks' readers are imported when such a file is opened, not for a safetensors file
    readers = ("gguf_reader", "onnx_reader", "tf_reader", "keras_reader", "flax_reader")
    full = imported_modules(r.stderr, full=True)
    assert "torchgraft.sources.safetensors_reader" in full
    assert not [m for m in full if m.rpartition(".")[2] in readers]


def test_inspect_tree_collapses_repeated_layers_and_filters(minilm_dir):
    r = run_cli("inspect", minilm_dir, "--depth", "3")
    assert r.returncode == 0, r.stderr
    assert "tensors: 104   values: 22,713,728 (parameters and buffers)" in r.stdout
    assert "{0..5}  (1,774,464 values each, 10,646,784 in all)" in r.stdout
    assert "encoder.layer.0" not in r.stdout and "\x1b[" not in r.stdout  # collapsed; no colour codes when piped

    r = run_cli("inspect", minilm_dir, "--filter", "encoder.layer.5.attention.*", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tensors"] == 10 and info["filter"] == "encoder.layer.5.attention.*"
    assert all(e["name"].startswith("encoder.layer.5.attention.") for e in info["entries"])


# Acceptance 2: convert the legacy MobileNetV2 .pth ----------------------------------------


def test_convert_mobilenet_bit_identical_refuses_overwrite_and_shards(mobilenet_path, tmp_path):
    dst = tmp_path / "mnv2.safetensors"
    r = run_cli("convert", mobilenet_path, dst)
    assert r.returncode == 0, r.stderr
    assert "314 tensors" in r.stdout
    original = torch.load(mobilenet_path, map_location="cpu", weights_only=True)
    back = load_file(dst)
    assert back.keys() == original.keys()
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(dst, "pt") as f:
        assert f.metadata() == {"format": "pt"}

    before = (sha256(dst), dst.stat().st_mtime_ns)
    r = run_cli("convert", mobilenet_path, dst)
    assert r.returncode == 2
    assert r.stderr.startswith("torchgraft: error: ") and str(dst) in r.stderr and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert (sha256(dst), dst.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnv2.safetensors"]  # no temporary file left

    shards = tmp_path / "sharded"
    r = run_cli("convert", mobilenet_path, shards / "model.safetensors", "--max-shard-size", "4MB", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    n = len(result["files"])
    assert n >= 4 and result["index"] == str(shards / "model.safetensors.index.json")  # 14.2 MB in <= 4 MB shards
    assert sorted(p.name for p in shards.iterdir()) == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ] + ["model.safetensors.index.json"]
    weight_map = json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"]
    for f in result["files"]:  # within the limit, or one tensor larger than it (the 1000x1280 classifier)
        held = [k for k, v in weight_map.items() if v == Path(f).name]
        assert Path(f).stat().st_size <= 4_000_000 + 50_000 or len(held) == 1, (f, held)
    for src in (tg.open(shards / "model.safetensors.index.json"), tg.open(shards)):
        assert src.format == "sharded-safetensors" and len(src) == 314
        for name, t in original.items():
            assert torch.equal(src[name].load(), t), name


# Acceptance 3: diff with one tensor changed and one renamed -------------------------------


@pytest.fixture(scope="module")
def edited_minilm(minilm_dir, tmp_path_factory) -> Path:
    sd = load_file(minilm_dir / "model.safetensors")
    sd["encoder.layer.3.output.dense.weight"] = sd["encoder.layer.3.output.dense.weight"] * 1.5
    sd["encoder.layer.2.attention.self.q_proj.weight"] = sd.pop("encoder.layer.2.attention.self.query.weight")
    out = tmp_path_factory.mktemp("edited") / "model.safetensors"
    save_file(sd, out, metadata={"format": "pt"})
    return out


def test_diff_reports_change_and_suggests_rename(minilm_dir, edited_minilm, tmp_path):
    r = run_cli("diff", minilm_dir / "model.safetensors", edited_minilm, "--json", importtime=True)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "torch" not in imported_modules(r.stderr)  # names and shapes only
    d = json.loads(r.stdout)
    assert d["only_a"] == ["encoder.layer.2.attention.self.query.weight"]
    assert d["only_b"] == ["encoder.layer.2.attention.self.q_proj.weight"]
    assert [(x["a"], x["b"]) for x in d["renames"]] == [
        ("encoder.layer.2.attention.self.query.weight", "encoder.layer.2.attention.self.q_proj.weight")
    ]
    assert d["values"] is None  # not read without --values

    png = tmp_path / "change.png"
    r = run_cli("diff", minilm_dir / "model.safetensors", edited_minilm, "--values", "--plot", png)
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert (
        "encoder.layer.2.attention.self.query.weight" in out and "encoder.layer.2.attention.self.q_proj.weight" in out
    )
    assert "values identical" in out  # the renamed tensor kept its values
    assert "values changed: 1 of 104" in out
    changed_row = next(line for line in out.splitlines() if "encoder.layer.3.output.dense.weight" in line)
    assert "0.5" in changed_row  # relative change of x -> 1.5x
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_diff_identical_exits_zero(minilm_dir):
    r = run_cli("diff", minilm_dir, minilm_dir / "model.safetensors")
    assert r.returncode == 0, r.stderr
    assert "no differences" in r.stdout


# Acceptance 4: plan / load with both kinds of model spec -----------------------------------


def test_plan_and_load_with_transformers_spec(minilm_dir, tmp_path):
    pytest.importorskip("transformers")
    plan_path = tmp_path / "plan.json"
    common = ["--model", "transformers:BertForTokenClassification", "--arg", "num_labels=3", "--config", minilm_dir]
    r = run_cli("plan", minilm_dir, *common, "--save", plan_path)
    assert r.returncode == 0, r.stderr
    assert "classifier.{bias,weight}" in r.stdout and "added 'bert.'" in r.stdout
    saved = tg.Plan.load(plan_path)
    assert sorted(saved.missing) == ["classifier.bias", "classifier.weight"]
    assert sorted(saved.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]

    out = tmp_path / "tokcls.safetensors"
    r = run_cli("load", minilm_dir, *common, "--plan", plan_path, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert sorted(result["report"]["missing"]) == ["classifier.bias", "classifier.weight"]
    assert result["written"]["files"] == [str(out)]
    written = load_file(out)
    assert written["classifier.weight"].shape == (3, 384)
    original = load_file(minilm_dir / "model.safetensors")
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(written[f"bert.{name}"], original[name])


FACTORY_MODULE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)


def tiny(num_classes=4):
    return Tiny(num_classes)
"""


def test_plan_and_load_with_module_factory_spec(tmp_path):
    (tmp_path / "tinymodels.py").write_text(FACTORY_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        import tinymodels  # the same class the command line builds
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tinymodels", None)
    torch.manual_seed(0)
    trained = tinymodels.tiny(num_classes=4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "ckpt.pt")

    r = run_cli("plan", "ckpt.pt", "--model", "tinymodels:tiny", "--arg", "num_classes=4", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["summary"]["loaded"] == 9 and plan["summary"]["missing"] == 0 and plan["container"] == "state_dict"

    r = run_cli(
        "load", "ckpt.pt", "--model", "tinymodels:tiny", "--arg", "num_classes=4", "--out", "out/", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert written.keys() == trained.state_dict().keys()
    for k, v in trained.state_dict().items():
        assert torch.equal(written[k], v), k

    r = run_cli(
        "load",
        "ckpt.pt",
        "--model",
        "tinymodels:tiny",
        "--arg",
        "num_classes=2",
        "--strict",
        "--out",
        "x.safetensors",
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert "nothing written" in r.stderr and not (tmp_path / "x.safetensors").exists()


# scan, hf: paths, help -----------------------------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_scan_verdicts_and_exit_codes(mobilenet_path, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Payload(str(marker))}, tmp_path / "evil.pt")
    r = run_cli("scan", tmp_path / "evil.pt")
    assert r.returncode == 1, r.stderr
    assert "posix.system" in r.stdout and "refuses" in r.stdout and "UNSAFE" in r.stdout
    assert not marker.exists()

    r = run_cli("scan", mobilenet_path, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["verdict"] == "safe" and report["refused"] == []
    assert "torch._utils._rebuild_tensor_v2" in report["globals"]


def _hf_cache(home: Path, repo: str, files: dict[str, Path], commit: str = "a" * 40) -> None:
    """A Hugging Face cache in its documented layout: blobs, refs/main, snapshots/<commit> symlinks."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, src in files.items():
        blob = root / "blobs" / hashlib.sha256(src.read_bytes()).hexdigest()
        blob.write_bytes(src.read_bytes())
        (snap / name).symlink_to(os.path.relpath(blob, snap))


def test_hf_paths_resolve_from_the_cache(minilm_dir, tmp_path):
    pytest.importorskip("huggingface_hub")
    home = tmp_path / "hf"
    _hf_cache(
        home,
        "acme/mini",
        {"model.safetensors": minilm_dir / "model.safetensors", "config.json": minilm_dir / "config.json"},
    )
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    r = run_cli("inspect", "hf:acme/mini", "--json", env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["tensors"] == 104 and info["path"].startswith(str(home))

    r = run_cli("inspect", f"hf:acme/mini@{'a' * 40}", "--json", env=env)
    assert r.returncode == 0, r.stderr

    r = run_cli("scan", "hf:acme/absent", env=env)
    assert r.returncode == 2
    assert "acme/absent is not in the Hugging Face cache" in r.stderr and "Traceback" not in r.stderr


def test_help_has_an_example_for_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    from torchgraft.cli import COMMANDS

    assert set(COMMANDS) == {"inspect", "diff", "plan", "load", "convert", "scan", "demo"}
    for cmd in COMMANDS.values():
        assert cmd.example.startswith(f"torchgraft {cmd.name}") and cmd.example in r.stdout
    r = run_cli("convert", "--help")
    assert r.returncode == 0 and "example:" in r.stdout and "--max-shard-size" in r.stdout


def test_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    r = run_cli("inspect", tmp_path / "nope.safetensors")
    assert r.returncode == 2
    assert (
        r.stderr.strip()
        == f"torchgraft: error: Cannot load '{tmp_path / 'nope.safetensors'}': no such file or directory. Try: "
        + r.stderr.split("Try: ")[1].strip()
    )
    r = run_cli("inspect", tmp_path / "nope.safetensors", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr
    r = run_cli("inspect")
    assert r.returncode == 2 and "usage:" in r.stderr
