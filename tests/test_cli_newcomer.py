"""Issue 16, a newcomer's first hour: the CLI traps, each through the real entry point (``python -m torchgraft``).

Every test here covers one numbered point of the issue; the oracle is in the test (transformers'
``from_pretrained``, torch's own load, the files on disk).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import torchgraft as tg
from tests.test_cli import run_cli
from torchgraft.demo import assets

BERT_TOKCLS = ["--model", "transformers:BertForTokenClassification"]


def _argv(command: str) -> list[str]:
    """A printed ``torchgraft ...`` command as the arguments after ``torchgraft``."""
    words = shlex.split(command.strip())
    assert words[0] == "torchgraft", command
    return words[1:]


# 5. plan --save prints a load command that works; a stale plan says what changed and the CLI fix ---------------
# 9. load --out DIR writes config.json too: from_pretrained(DIR) is the oracle ------------------------------------


def test_plan_save_hint_runs_verbatim_and_from_pretrained_reads_the_result(minilm_dir, tmp_path):
    from transformers import AutoModelForTokenClassification

    plan_path = tmp_path / "plan.json"
    r = run_cli("plan", minilm_dir, *BERT_TOKCLS, "--arg", "num_labels=5", "--save", plan_path)
    assert r.returncode == 0, r.stderr
    hint = r.stdout.split("execute it with:", 1)[1].strip().splitlines()[0]
    assert "--arg num_labels=5" in hint and f"--plan {plan_path}" in hint
    out = tmp_path / "tokcls"
    r = run_cli(*[f"{out}/" if w == "OUT_DIR/" else w for w in _argv(hint)])
    assert r.returncode == 0, r.stderr
    assert "from_pretrained" in r.stdout

    model = AutoModelForTokenClassification.from_pretrained(out)  # the oracle: transformers reads the folder
    assert type(model).__name__ == "BertForTokenClassification" and model.config.num_labels == 5
    written = load_file(out / "model.safetensors")
    original = load_file(minilm_dir / "model.safetensors")
    state = model.state_dict()
    for name, tensor in original.items():
        if not name.startswith("pooler.") and name != "embeddings.position_ids":  # a non-persistent buffer
            assert torch.equal(state[f"bert.{name}"], tensor), name
    assert torch.equal(state["classifier.weight"], written["classifier.weight"])
    assert state["classifier.weight"].shape == (5, 384)

    # the same command without --arg: a stale plan, with the names and shapes that changed and a command to run
    r = run_cli("load", minilm_dir, *BERT_TOKCLS, "--plan", plan_path, "--out", f"{tmp_path / 'other'}/")
    assert r.returncode == 1
    assert "stale plan" in r.stderr
    assert "classifier.weight [5, 384] -> [2, 384]" in r.stderr
    assert "the plan was made with --model transformers:BertForTokenClassification --arg num_labels=5" in r.stderr
    assert "tg.plan(" not in r.stderr  # a CLI fix, not a Python one
    fix = re.search(r"run: (torchgraft load .*)", r.stderr).group(1)
    assert run_cli(*_argv(fix)).returncode == 0
    assert (tmp_path / "other" / "config.json").is_file()

    # an existing config.json is not replaced without --force
    r = run_cli("load", minilm_dir, *BERT_TOKCLS, "--out", out / "model.safetensors", "--force")
    assert r.returncode == 0, r.stderr  # --force replaces both
    (out / "model.safetensors").unlink()
    r = run_cli("load", minilm_dir, *BERT_TOKCLS, "--out", out)
    assert r.returncode == 2 and "config.json exists; pass --force" in r.stderr
    assert not (out / "model.safetensors").exists()


# 6. --strict lists the problems grouped like the report, and the fix -----------------------------------------------


def test_strict_lists_grouped_problems_and_the_fix(minilm_dir, mobilenet_path, tmp_path):
    r = run_cli("plan", minilm_dir, *BERT_TOKCLS, "--arg", "num_labels=2", "--strict")
    assert r.returncode == 1
    assert "missing (2): classifier.{bias,weight}" in r.stderr
    assert "unused checkpoint entries (2): pooler.dense.{bias,weight}" in r.stderr
    assert "--ignore-missing REGEX" in r.stderr and "--ignore-unexpected REGEX" in r.stderr

    out = tmp_path / "grey.safetensors"
    grey = ["--model", "torchgraft.demo.mobilenet_v2:mobilenet_v2", "--arg", "num_classes=2", "--arg", "in_channels=1"]
    r = run_cli("load", mobilenet_path, *grey, "--strict", "--out", out)
    assert r.returncode == 1
    assert "shape mismatch (3): features.0.0.weight [32, 1, 3, 3] <- features.0.0.weight [32, 3, 3, 3]" in r.stderr
    assert "--adapt auto" in r.stderr and "nothing written" in r.stderr
    assert not out.exists()
    r = run_cli("load", mobilenet_path, *grey, "--strict", "--adapt", "auto", "--out", out)  # the fix it names
    assert r.returncode == 0, r.stderr
    assert out.is_file()


def test_python_strict_shape_mismatch_names_adapt(tiny):
    source = {k: v for k, v in tiny.state_dict().items()}
    source["head.weight"] = torch.zeros(7, source["head.weight"].shape[1])
    source["head.bias"] = torch.zeros(7)
    with pytest.raises(tg.LoadError, match=r"shape mismatch: head\.weight .*adapt='auto' or adapt=\{'head\.weight'"):
        tg.load(tiny, source, strict=True)


# 7. --allow-globals, --check-finite, --version, demo --help / --paths / --link, one scenario's verdict ----------


def test_allow_globals_flag_is_what_the_error_recommends(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": nn.Linear(3, 2).state_dict(), "hparams": argparse.Namespace(lr=0.1)}, path)
    r = run_cli("inspect", path)
    assert r.returncode == 2
    assert "--allow-globals argparse.Namespace" in r.stderr
    r = run_cli("inspect", path, "--allow-globals", "argparse.Namespace", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors"] == 2


def test_check_finite_is_opt_in_on_the_command_line(tmp_path):
    (tmp_path / "nets.py").write_text("from torch import nn\n\ndef lin():\n    return nn.Linear(3, 2)\n")
    weights = {"weight": torch.zeros(2, 3), "bias": torch.tensor([float("nan"), 0.0])}
    save_file(weights, tmp_path / "w.safetensors")
    spec = ["--model", "nets:lin"]
    r = run_cli("load", "w.safetensors", *spec, "--check-finite", "error", "--out", "a.safetensors", cwd=tmp_path)
    assert r.returncode == 1 and "NaN or Inf" in r.stderr and "bias: 1 NaN, 0 Inf" in r.stderr
    assert not (tmp_path / "a.safetensors").exists()
    r = run_cli("load", "w.safetensors", *spec, "--check-finite", "warn", "--out", "b.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "NaN / Inf values" in r.stdout
    r = run_cli("load", "w.safetensors", *spec, "--out", "c.safetensors", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["report"]["nonfinite"] == {}  # the default reads no values
    assert torch.isnan(load_file(tmp_path / "c.safetensors")["bias"][0])


def test_version_demo_help_paths_and_links(minilm_dir, mobilenet_path, tmp_path):
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(f"torchgraft {tg.__version__} (torch ")
    r = run_cli("demo", "--help")
    from torchgraft.demo.scenarios import SCENARIOS

    assert len(SCENARIOS) >= 4
    for name, scenario in SCENARIOS.items():
        assert f"  {name} " in r.stdout and scenario.title in r.stdout
    assert "seed" not in r.stdout  # 4. words a user can interpret

    r = run_cli("demo", "--paths", "--json")
    assert r.returncode == 0, r.stderr
    expected = {"all-MiniLM-L6-v2": str(minilm_dir), "mobilenet_v2-b0353104.pth": str(mobilenet_path)}
    assert json.loads(r.stdout) == expected == {k: str(v) for k, v in assets.paths().items()}
    r = run_cli("demo", "--link", tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "all-MiniLM-L6-v2" / "config.json").is_file()
    assert (tmp_path / "mobilenet_v2-b0353104.pth").resolve() == mobilenet_path.resolve()
    assert assets.link(tmp_path)  # a second time replaces the links
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mobilenet_v2-b0353104.pth").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not a link"):
        assets.link(tmp_path / "x")

    r = run_cli("demo", "nope")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr


def test_one_scenario_says_which_passed(mobilenet_path):
    r = run_cli("demo", "surgery")
    assert r.returncode == 0, r.stdout[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last == "scenario 'surgery' passed"
    assert "seed" not in r.stdout


# 8. inspect: values (parameters and buffers), "each" and the total, --depth N shows N levels ------------------------


def test_inspect_counts_values_and_depth_is_levels(minilm_dir):
    r = run_cli("inspect", minilm_dir, "--depth", "1")
    assert r.returncode == 0, r.stderr
    assert "tensors: 104   values: 22,713,728 (parameters and buffers)" in r.stdout
    tree = r.stdout.split("(root)", 1)[1].strip().splitlines()
    assert tree == [
        "├── embeddings  (11,919,104 values)",
        "├── encoder  (10,646,784 values)",
        "└── pooler  (147,840 values)",
    ]
    assert 11_919_104 + 10_646_784 + 147_840 == 22_713_728
    r = run_cli("inspect", minilm_dir, "--depth", "3")
    assert "{0..5}  (1,774,464 values each, 10,646,784 in all)" in r.stdout
    r = run_cli("inspect", minilm_dir, "--depth", "2")
    assert "layer  (10,646,784 values)" in r.stdout  # a parent of a collapsed run counts every layer


# 10. hf: ids without a network fail at once, naming HF_HUB_OFFLINE and the cache --------------------------------


def test_hf_without_network_fails_at_once_with_a_hint(tmp_path):
    pytest.importorskip("huggingface_hub")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": ""}
    r = run_cli("inspect", "hf:torchgraft-tests/not-cached", env=env)
    assert r.returncode == 2
    assert "the hub cannot be reached" in r.stderr  # the probe answered, not huggingface_hub's retries
    assert "HF_HUB_OFFLINE" in r.stderr and str(tmp_path / "hf") in r.stderr
    r = run_cli("inspect", "hf:torchgraft-tests/not-cached", env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "HF_HUB_OFFLINE is set" in r.stderr


# 11. short reprs; the alignment table once; MiB; diff's headers and counts --------------------------------------


def test_repr_of_plan_and_report_is_short(minilm_dir, minilm_config):
    from transformers import BertForTokenClassification

    with torch.device("meta"):
        model = BertForTokenClassification(minilm_config)
    plan = tg.plan(model, minilm_dir)
    text = repr(plan)
    assert len(text) < 400 and len(str(plan)) > len(text)
    assert f"{plan.summary()['loaded']} loaded" in text and "2 missing" in text
    assert "missing: classifier.weight [2, 384]" in text
    report = tg.load(model, minilm_dir, plan=plan)
    text = repr(report)
    assert len(text) < 400 and text.startswith("<LoadReport ") and f"{len(report.loaded)} loaded" in text
    assert "missing: classifier.weight" in text and "... 1 more" in text


def test_alignment_table_printed_once(mobilenet_path, tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "hfmob.py").write_text(
        textwrap.dedent(
            """
            from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

            def make():
                config = MobileNetV2Config(num_labels=1000, tf_padding=False, layer_norm_eps=1e-5)
                return MobileNetV2ForImageClassification(config)
            """
        )
    )
    for command in (["plan"], ["load", "--out", "out/"]):
        r = run_cli(command[0], mobilenet_path, "--model", "hfmob:make", "--align", *command[1:], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("aligned by structure") == 1, r.stdout
        assert r.stdout.count("model (aligned)") == 1


def test_diff_headers_and_counts_agree(tmp_path):
    a = {f"layer.{i}.weight": torch.zeros(2, 2) for i in range(27)}
    b = {f"layer.{i}.weight": torch.zeros(3, 2) for i in range(27)}
    b["extra.weight"] = torch.zeros(1)
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    r = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert r.returncode == 1
    assert "only in A: 0   only in B: 1   suggested renames: 0   shape changes: 27" in r.stdout
    assert "shape changes (27)" in r.stdout and "only in B (1, renames aside)" in r.stdout
    assert "... and 7 more" in r.stdout
    b2 = {k: v + 1 for k, v in a.items()}
    save_file(b2, tmp_path / "c.safetensors")
    r = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "c.safetensors", "--values")
    assert "bar (largest = 30)" in r.stdout
    assert "changed values (27;" in r.stdout and "... and 7 more" in r.stdout


# 12. suggestions name installed packages; a checkpoint that does not belong is refused ----------------------------


def test_model_spec_examples_are_installed(tmp_path):
    save_file({"w": torch.zeros(1)}, tmp_path / "x.safetensors")
    r = run_cli("plan", tmp_path / "x.safetensors", "--model", "not a spec")
    assert r.returncode == 2
    modules = re.findall(r"--model ([\w.]+):", r.stderr)
    assert modules, r.stderr
    for module in modules:
        if module != "mymodule":  # the user's own file, named as such
            assert module == "transformers" or importlib.util.find_spec(module.split(".")[0]) is not None, module
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" not in r.stderr


def test_checkpoint_that_does_not_belong_is_refused(minilm_dir, tmp_path):
    linear = ["--model", "torch.nn:Linear", "--arg", "in_features=384", "--arg", "out_features=384"]
    r = run_cli("plan", minilm_dir, *linear)
    assert r.returncode == 1
    assert "does not belong to this model: only 2 of its 104 tensors match" in r.stderr
    assert "'pooler.dense.'" in r.stderr
    out = tmp_path / "lin.safetensors"
    r = run_cli("load", minilm_dir, *linear, "--out", out)
    assert r.returncode == 1 and "nothing written" in r.stderr
    assert not out.exists()
    r = run_cli("load", minilm_dir, *linear, "--prefix", "pooler.dense", "--out", out)  # the way it names
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_file(out)["weight"], load_file(minilm_dir / "model.safetensors")["pooler.dense.weight"])


def test_rules_option_renames_and_drops(tmp_path):
    (tmp_path / "nets.py").write_text("from torch import nn\n\ndef lin():\n    return nn.Linear(3, 2)\n")
    save_file({"fc.w": torch.ones(2, 3), "fc.b": torch.ones(2), "junk": torch.zeros(1)}, tmp_path / "w.safetensors")
    (tmp_path / "rules.json").write_text(json.dumps({"fc.b": "bias"}))
    r = run_cli(
        "plan", "w.safetensors", "--model", "nets:lin", "--rules", "fc.w=weight", "--rules", "rules.json",
        "--rules", "junk=", "--strict", "--json", cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["summary"]["loaded"] == 2 and plan["unexpected"] == []
    r = run_cli("plan", "w.safetensors", "--model", "nets:lin", "--rules", "nope.json", cwd=tmp_path)
    assert r.returncode == 2 and "--rules 'nope.json': write OLD=NEW" in r.stderr


# 13. benchmarks/run.py: progress with the time left; the default run leaves the 1.3B size out ----------------
# 1. benchmarks/mapped_alignment.py: what it compares holds (tensors bit-identical, outputs to fp32 rounding) -----


def _bench_module(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_defaults_and_progress_line():
    from rich.console import Console

    run = _bench_module("run")
    assert "bert-1.3b" in run.SIZES and "bert-1.3b" not in run.DEFAULT_SIZES
    assert set(run.DEFAULT_CONTENDERS) >= {"floor", "from_pretrained", "torchgraft", "tg-check"}
    console = Console(file=io.StringIO(), width=200, color_system=None)
    progress = run._Progress(console, total=4)
    progress.done("bert-base safetensors floor (run 1/2)", {"seconds": 0.05})
    progress.done("bert-base safetensors torchgraft (run 1/2)", {"error": "boom"})
    out = console.file.getvalue()
    assert "[1/4] bert-base safetensors floor (run 1/2): 0.050 s" in out and "left" in out
    assert "[2/4] bert-base safetensors torchgraft (run 1/2): error: boom" in out
    assert run._clock(125.4) == "2:05"


def test_mapped_and_aligned_copies_agree_to_fp32_rounding(mobilenet_path):
    from torchgraft.demo.mobilenet_v2 import mobilenet_v2

    bench = _bench_module("mapped_alignment")
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    row = bench.compare("mobilenet", mobilenet_v2, mobilenet_path, {"x": x}, repeats=1)
    assert row["bit_identical"]
    assert row["misaligned_copy"][0] == 0  # the copies are what the allocator aligns
    assert row["max_abs_diff"] <= 8 * row["fp32_eps_at_scale"]  # kernels may sum in another order, no more
