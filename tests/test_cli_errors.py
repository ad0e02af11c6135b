"""Command-line error paths and option parsing, in-process (``main([...])``): fast, one interpreter.

The real entry point in a subprocess is covered by tests/test_cli.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys

import pytest
import torch
from torch import nn

import torchgraft as tg
from tests.conftest import TinyNet
from torchgraft.cli import COMMANDS, EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE, main
from torchgraft.cli.graft_cmd import _plan_options, adapt_option
from torchgraft.cli.model_spec import ModelSpecError, build_model, config_dir, looks_like_model_spec, parse_kv


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    path = tmp_path / "tiny.safetensors"
    tg.convert(model.state_dict(), path)
    return path, model


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module the command line can name: tgtest_models:tiny / :not_a_model / :broken / :meta_hostile / VALUE."""
    (tmp_path / "tgtest_models.py").write_text(
        "import torch\n"
        "from tests.conftest import TinyNet\n"
        "def tiny(num_classes=4, in_channels=3):\n"
        "    return TinyNet(in_channels=in_channels, num_classes=num_classes)\n"
        "def not_a_model():\n"
        "    return 42\n"
        "def broken():\n"
        "    raise RuntimeError('no GPU here')\n"
        "def meta_hostile():\n"
        "    m = TinyNet()\n"
        "    m.scale = float(torch.ones(1).sum().item())  # needs real values\n"
        "    return m\n"
        "VALUE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield "tgtest_models"
    sys.modules.pop("tgtest_models", None)


# exit codes and one-line errors ---------------------------------------------------------


def test_no_command_prints_help_and_exits_2(capsys):
    code, out, _ = run(capsys)
    assert code == EXIT_USAGE and "usage: torchgraft" in out


def test_every_command_has_help_with_an_example(capsys):
    for name, cmd in COMMANDS.items():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        out, _ = capsys.readouterr()
        assert e.value.code == 0
        assert "example:" in out and cmd.example in out, name


def test_inspect_filter_that_matches_nothing_exits_1(capsys, tiny_ckpt):
    path, _ = tiny_ckpt
    code, out, err = run(capsys, "inspect", path, "--filter", "encoder.*", "--json")
    assert code == EXIT_PROBLEMS
    assert json.loads(out)["tensors"] == 0
    assert "no tensor name matches 'encoder.*'" in err


def test_inspect_prefix_filter_selects_a_subtree(capsys, tiny_ckpt):
    path, _ = tiny_ckpt
    code, out, _ = run(capsys, "inspect", path, "--filter", "bn")
    assert code == EXIT_OK
    assert "tensors: 5 " in out and "head" not in out and "conv" not in out


def test_unreadable_input_is_one_line_exit_2(capsys, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, not a checkpoint")
    code, out, err = run(capsys, "inspect", bad)
    assert code == EXIT_USAGE and out == ""
    assert err.startswith(f"torchgraft: error: Cannot load '{bad}'") and "Try: " in err
    assert len(err.strip().splitlines()) == 1


def test_debug_re_raises(capsys, tmp_path):
    with pytest.raises(tg.CheckpointError, match="no such file"):
        main(["inspect", str(tmp_path / "missing.pt"), "--debug"])
    with pytest.raises(tg.CheckpointError, match="no such file"):
        main(["--debug", "inspect", str(tmp_path / "missing.pt")])


def test_unexpected_errors_are_one_line_with_a_debug_hint(capsys, monkeypatch, tiny_ckpt):
    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setitem(COMMANDS, "inspect", dataclasses.replace(COMMANDS["inspect"], run=boom))
    code, _, err = run(capsys, "inspect", tiny_ckpt[0])
    assert code == EXIT_PROBLEMS
    assert (
        err.strip()
        == "torchgraft: error: RuntimeError: something broke. second line (run with --debug for the traceback)"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "int3"], "unknown dtype 'int3'; use one of bf16"),
        (["--max-shard-size", "lots"], "cannot read the size 'lots'"),
        (["--max-shard-size", "0"], "must be positive"),
    ],
)
def test_convert_usage_errors_exit_2_before_reading(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "convert", tmp_path / "absent.pt", tmp_path / "out.safetensors", *argv)
    assert code == EXIT_USAGE and message in err
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_destination_must_be_safetensors(capsys, tiny_ckpt, tmp_path):
    code, _, err = run(capsys, "convert", tiny_ckpt[0], tmp_path / "out.bin")
    assert code == EXIT_USAGE and "must be a directory or a file name ending in .safetensors" in err


def test_convert_force_replaces(capsys, tiny_ckpt, tmp_path):
    out = tmp_path / "copy.safetensors"
    out.write_bytes(b"old")
    code, _, err = run(capsys, "convert", tiny_ckpt[0], out)
    assert code == EXIT_USAGE and "exists; pass --force" in err and out.read_bytes() == b"old"
    code, stdout, _ = run(capsys, "convert", tiny_ckpt[0], out, "--force", "--dtype", "bf16")
    assert code == EXIT_OK and "as bfloat16" in stdout
    assert tg.open(out)["conv.weight"].dtype == "bfloat16"
    assert tg.open(out)["bn.num_batches_tracked"].dtype == "int64"  # integers keep their dtype


def test_diff_usage_errors(capsys, tiny_ckpt, tmp_path):
    path = tiny_ckpt[0]
    code, _, err = run(capsys, "diff", path, path, "--arg", "x=1")
    assert code == EXIT_USAGE and "neither A nor B is one" in err
    code, _, err = run(capsys, "diff", path, path, "--plot", tmp_path / "plot.svg")
    assert code == EXIT_USAGE and "name it *.png" in err


def test_diff_checkpoint_against_a_model_spec(capsys, tiny_ckpt, factory_module):
    path, _ = tiny_ckpt
    code, out, _ = run(capsys, "diff", path, f"{factory_module}:tiny", "--arg", "num_classes=7", "--json")
    assert code == EXIT_PROBLEMS
    d = json.loads(out)
    assert sorted(d["shape_changed"], key=lambda x: x["name"]) == [
        {"name": "head.bias", "a": [4], "b": [7]},
        {"name": "head.weight", "a": [4, 8], "b": [7, 8]},
    ]
    assert d["b"].startswith("model TinyNet")


def test_plan_strict_and_json(capsys, tiny_ckpt, factory_module):
    path, _ = tiny_ckpt
    code, out, _ = run(capsys, "plan", path, "--model", f"{factory_module}:tiny", "--json")
    assert code == EXIT_OK and json.loads(out)["summary"]["loaded"] == 8  # conv, bn x5, head x2
    code, out, _ = run(capsys, "plan", path, "--model", f"{factory_module}:tiny", "--arg", "num_classes=2", "--strict")
    assert code == EXIT_PROBLEMS and "head" in out


def test_load_refuses_an_existing_out_before_loading(capsys, tiny_ckpt, factory_module, tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    code, _, err = run(capsys, "load", tiny_ckpt[0], "--model", f"{factory_module}:tiny", "--out", out)
    assert code == EXIT_USAGE and "exists; pass --force" in err and out.read_bytes() == b"keep me"
    code, _, _ = run(capsys, "load", tiny_ckpt[0], "--model", f"{factory_module}:tiny", "--out", out, "--force")
    assert code == EXIT_OK
    assert torch.equal(tg.open(out)["conv.weight"].load(), tiny_ckpt[1].conv.weight)


def test_load_plan_with_align_is_a_usage_error(capsys, tiny_ckpt, factory_module, tmp_path):
    code, _, err = run(
        capsys,
        "load",
        tiny_ckpt[0],
        "--model",
        f"{factory_module}:tiny",
        "--plan",
        tmp_path / "p.json",
        "--align",
        "--out",
        tmp_path / "o.safetensors",
    )
    assert code == EXIT_USAGE and "--plan already decides" in err


def test_stale_plan_exits_1(capsys, tiny_ckpt, factory_module, tmp_path):
    plan_path = tmp_path / "plan.json"
    assert run(capsys, "plan", tiny_ckpt[0], "--model", f"{factory_module}:tiny", "--save", plan_path)[0] == EXIT_OK
    code, _, err = run(
        capsys,
        "load",
        tiny_ckpt[0],
        "--model",
        f"{factory_module}:tiny",
        "--arg",
        "in_channels=1",
        "--plan",
        plan_path,
        "--out",
        tmp_path / "o.safetensors",
    )
    assert code == EXIT_PROBLEMS and "stale plan" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_model_spec_errors_exit_2(capsys, tiny_ckpt, factory_module, tmp_path):
    path = tiny_ckpt[0]
    cases = {
        "nosuchmodule_xyz:make": "cannot import 'nosuchmodule_xyz'",
        f"{factory_module}:absent": "has no attribute 'absent'",
        f"{factory_module}:not_a_model": "returned a int, not a torch.nn.Module",
        "transformers:BertForTokenClassification": "needs --config DIR",
    }
    for spec, message in cases.items():
        code, _, err = run(capsys, "plan", path, "--model", spec)
        assert code == EXIT_USAGE and message in err, (spec, err)
        assert len(err.strip().splitlines()) == 1


def test_scan_of_a_non_pickle_exits_2(capsys, tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"XYZW\x00\x00\x00\x03")  # no format of its own (GGUF is scanned now)
    code, _, err = run(capsys, "scan", f)
    assert code == EXIT_USAGE and "not a pickle, a torch zip or a safetensors file" in err


# option parsing -----------------------------------------------------------------------


def test_adapt_option():
    assert adapt_option([]) is None
    assert adapt_option(["auto"]) == "auto"
    assert adapt_option(["features.0.0.weight=luminance", "classifier.*=reinit"]) == {
        "features.0.0.weight": "luminance",
        "classifier.*": "reinit",
    }
    assert adapt_option(["a.*=luminance", "auto"]) == {"a.*": "luminance", "*": "auto"}
    assert adapt_option(['conv.weight={"name": "input_channels", "args": {"method": "sum"}}']) == {
        "conv.weight": {"name": "input_channels", "args": {"method": "sum"}}
    }
    with pytest.raises(ValueError, match="write 'auto' or PATTERN=ADAPTER"):
        adapt_option(["luminance"])
    with pytest.raises(ValueError, match="not valid JSON"):
        adapt_option(["x={bad"])


def _ns(**kw):
    base = {"prefix": None, "ignore_missing": [], "ignore_unexpected": [], "align": False, "adapt": []}
    return argparse.Namespace(**{**base, **kw})


def test_plan_options_pass_align_and_adapt_only_when_given_and_tg_plan_accepts_them():
    assert _plan_options(_ns()) == {"prefix": None, "ignore_missing": [], "ignore_unexpected": []}
    opts = _plan_options(_ns(align=True, adapt=["head.*=reinit"], prefix=""))
    assert opts["align"] is True and opts["adapt"] == {"head.*": "reinit"} and opts["prefix"] == ""
    inspect.signature(tg.plan).bind(None, None, **opts)  # the CLI calls tg.plan with these, no feature probe


def test_parse_kv():
    assert parse_kv(["num_labels=2", "name=tiny", "dims=[1, 2]", "flag=True", "path=a/b"]) == {
        "num_labels": 2,
        "name": "tiny",
        "dims": [1, 2],
        "flag": True,
        "path": "a/b",
    }
    with pytest.raises(ModelSpecError, match="is not key=value"):
        parse_kv(["num_labels"])
    with pytest.raises(ModelSpecError, match="is not key=value"):
        parse_kv(["2x=1"])


def test_looks_like_model_spec(tmp_path, monkeypatch):
    assert looks_like_model_spec("torchvision.models:mobilenet_v2")
    assert looks_like_model_spec("transformers:BertModel")
    assert not looks_like_model_spec("hf:org/name")
    assert not looks_like_model_spec("model.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a:b").write_text("")
    assert not looks_like_model_spec("a:b")  # an existing file wins


# build_model -----------------------------------------------------------------------


def test_build_model_on_meta_and_fallback(factory_module):
    m = build_model(f"{factory_module}:tiny", args={"num_classes": 3})
    assert isinstance(m, nn.Module) and m.head.weight.shape == (3, 8) and m.head.weight.is_meta
    m = build_model(f"{factory_module}:meta_hostile")  # .item() fails on meta: built on the CPU
    assert not m.conv.weight.is_meta
    m = build_model(f"{factory_module}:tiny", meta=False)
    assert not m.conv.weight.is_meta


def test_build_model_errors(factory_module, tmp_path):
    with pytest.raises(ModelSpecError, match="is not package.module:factory"):
        build_model("just_a_name")
    with pytest.raises(ModelSpecError, match="cannot import 'nosuch_pkg_q'"):
        build_model("nosuch_pkg_q:f")
    with pytest.raises(ModelSpecError, match="has no attribute 'nope'"):
        build_model(f"{factory_module}:nope")
    with pytest.raises(ModelSpecError, match="is a int, not a class or function"):
        build_model(f"{factory_module}:VALUE")
    with pytest.raises(ModelSpecError, match="returned a int, not a torch.nn.Module"):
        build_model(f"{factory_module}:not_a_model")
    with pytest.raises(ModelSpecError, match=r"tiny\(colour='red'\) failed: .*check the --arg names"):
        build_model(f"{factory_module}:tiny", args={"colour": "red"})
    with pytest.raises(ModelSpecError, match="broken\\(\\) failed: RuntimeError: no GPU here"):
        build_model(f"{factory_module}:broken")
    with pytest.raises(ModelSpecError, match="--config is for transformers: specs"):
        build_model(f"{factory_module}:tiny", config=tmp_path)


def test_build_transformers_model_from_local_config(minilm_dir, tmp_path):
    pytest.importorskip("transformers")
    m = build_model("transformers:BertForTokenClassification", args={"num_labels": 5}, config=minilm_dir)
    assert type(m).__name__ == "BertForTokenClassification" and m.classifier.weight.shape == (5, 384)
    assert m.classifier.weight.is_meta
    m = build_model("transformers:AutoModel", config=minilm_dir / "config.json")
    assert type(m).__name__ == "BertModel"
    with pytest.raises(ModelSpecError, match="needs --config DIR"):
        build_model("transformers:BertModel")
    with pytest.raises(ModelSpecError, match="transformers has no model class 'BertForEverything'"):
        build_model("transformers:BertForEverything", config=minilm_dir)
    with pytest.raises(ModelSpecError, match="no config.json there"):
        config_dir(tmp_path)


def test_transformers_config_defaults_to_the_source_directory(capsys, minilm_dir):
    pytest.importorskip("transformers")
    code, out, _ = run(capsys, "plan", minilm_dir, "--model", "transformers:BertModel", "--json")
    assert code == EXIT_OK
    plan = json.loads(out)
    assert plan["model"] == "BertModel" and plan["summary"]["missing"] == 0 and plan["summary"]["unexpected"] == 0
    assert plan["summary"]["loaded"] >= 103
