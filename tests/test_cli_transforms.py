"""Transforms from the command line: rules files with transforms, recipes, and ``convert --plan --reverse``."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

import torchgraft as tg
from tests.test_cli import run_cli

MODELS = '''
import torch
from torch import nn


class Separate(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.fc = nn.Linear(d, 2 * d)


def separate():
    return Separate()
'''


def test_rules_file_with_transforms_plan_load_and_convert_back(tmp_path):
    (tmp_path / "crossmodels.py").write_text(MODELS)
    torch.manual_seed(0)
    original = {"c_attn.weight": torch.randn(4, 12), "c_attn.bias": torch.randn(12),
                "c_fc.weight": torch.randn(4, 8), "c_fc.bias": torch.randn(8)}  # fmt: skip
    save_file(original, str(tmp_path / "fused.safetensors"))
    rules = {
        "{q,k,v}.weight": tg.split(tg.transpose("c_attn.weight"), dim=0).to_dict(),
        "{q,k,v}.bias": tg.split("c_attn.bias").to_dict(),
        "fc.weight": tg.transpose("c_fc.weight").to_dict(),
        "c_fc.bias": "fc.bias",
    }
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    common = ["fused.safetensors", "--model", "crossmodels:separate", "--rules", "rules.json"]

    r = run_cli("plan", *common, "--strict", "--save", "plan.json", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["summary"]["transformed"] == 7 and shown["summary"]["missing"] == 0 and shown["unexpected"] == []

    r = run_cli("load", *common[:3], "--plan", "plan.json", "--strict", "--out", "out/", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    grafted = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(grafted["k.weight"], original["c_attn.weight"][:, 4:8].T)

    r = run_cli("convert", "out/model.safetensors", "back.safetensors", "--plan", "plan.json", "--reverse", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_usage_errors_name_the_fix(tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    r = run_cli("convert", "x.safetensors", "y.safetensors", "--reverse", cwd=tmp_path)
    assert r.returncode == 2 and "--reverse and --plan PLAN.json go together" in r.stderr
    (tmp_path / "bad.json").write_text(json.dumps({"w": {"op": "exec", "inputs": [{"source": "x"}]}}))
    r = run_cli("plan", "x.safetensors", "--model", "torch.nn:Identity", "--rules", "bad.json", cwd=tmp_path)
    assert r.returncode == 2 and "unknown op" in r.stderr
    r = run_cli("plan", "x.safetensors", "--model", "torch.nn:Identity", "--recipe", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "no recipe 'nope'; known:" in r.stderr
    r = run_cli("plan", "x.safetensors", "--model", "torch.nn:Identity", "--recipe-param", "n=1", cwd=tmp_path)
    assert r.returncode == 2 and "--recipe-param needs --recipe NAME" in r.stderr
