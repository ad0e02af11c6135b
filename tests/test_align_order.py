"""Issue 14 item 5: alignment by execution order (``align=True, example_inputs=...``).

The model registers its block's modules in another order than it runs them (``bn2``, ``conv_dw``,
``bn1``, ``conv_pw``; run as ``conv_dw``, ``bn1``, ``conv_pw``, ``bn2``). The checkpoint comes from
another codebase's module code for the same network: plain ``nn.Sequential`` blocks, registered (and
so saved) in the order they run. The oracle is torch's ``load_state_dict`` with the true mapping,
written out in the test.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchgraft as tg
from torchgraft.align.trace import trace_order
from torchgraft.errors import PlanError

CHANNELS, BLOCKS = 8, 3


class Block(nn.Module):
    """A depthwise-separable block whose modules are registered out of the order they run in."""

    def __init__(self, c: int):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(c)
        self.conv_dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv_pw = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv_dw(x)))
        return torch.relu(self.bn2(self.conv_pw(x)))


class Net(nn.Module):
    """The model: the head registered first, the stem last, blocks registered out of order."""

    def __init__(self, c: int = CHANNELS, n: int = BLOCKS, aux: bool = False):
        super().__init__()
        self.head = nn.Linear(c, 5)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(n)])
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        if aux:
            self.aux = nn.Linear(c, 7)  # registered, never run by forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)))


class OtherNet(nn.Module):
    """The same network as another codebase writes it: everything registered in the order it runs."""

    def __init__(self, c: int = CHANNELS, n: int = BLOCKS):
        super().__init__()
        blocks = [
            nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
                nn.Conv2d(c, c, 1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(),
            )
            for _ in range(n)
        ]
        self.features = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *blocks)
        self.classifier = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def true_mapping(model_keys) -> dict[str, str]:
    """Model key -> checkpoint key, written out by hand: what alignment must find."""
    where = {"conv_dw": 0, "bn1": 1, "conv_pw": 3, "bn2": 4}
    out = {}
    for k in model_keys:
        if m := re.fullmatch(r"blocks\.(\d+)\.(\w+)\.(\w+)", k):
            out[k] = f"features.{int(m[1]) + 1}.{where[m[2]]}.{m[3]}"
        elif k.startswith("stem."):
            out[k] = "features.0." + k.removeprefix("stem.")
        elif k.startswith("head."):
            out[k] = "classifier." + k.removeprefix("head.")
    return out


@pytest.fixture(scope="module")
def other() -> OtherNet:
    torch.manual_seed(0)
    net = OtherNet().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # every BatchNorm distinct, so a misplaced one shows in the output
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return net


@pytest.fixture(scope="module", params=["pth", "safetensors"])
def checkpoint(request, other, tmp_path_factory) -> str:
    """The other codebase's file: a torch file keeps its (execution) order; safetensors sorts its keys."""
    sd = OrderedDict((k, v.detach().clone()) for k, v in other.state_dict().items())
    path = tmp_path_factory.mktemp("ckpt") / f"other.{request.param}"
    if request.param == "pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(other) -> Net:
    """The oracle: torch's load_state_dict with the true mapping."""
    net = Net().eval()
    sd = other.state_dict()
    net.load_state_dict({k: sd[v] for k, v in true_mapping(net.state_dict()).items()}, strict=True)
    return net


# ---------------------------------------------------------------------------
# The acceptance: with example inputs everything aligns; without, ambiguity and no misplacement


def test_registration_order_differs_from_execution_order():
    model = Net()
    order, how = trace_order(model, torch.zeros(1, 3, 8, 8))
    assert list(model.blocks[0]._modules) == ["bn2", "conv_dw", "bn1", "conv_pw"]
    assert [m for m in order.ran if m.startswith("blocks.0.")] == [
        "blocks.0.conv_dw",
        "blocks.0.bn1",
        "blocks.0.conv_pw",
        "blocks.0.bn2",
    ]
    assert order.ran.index("stem") < order.ran.index("blocks") < order.ran.index("head")
    assert order.not_run == [] and how == "example inputs"
    assert order.sort(["head.weight", "blocks.0.bn2.weight", "blocks.0.conv_dw.weight", "stem.weight"]) == [
        "stem.weight",
        "blocks.0.conv_dw.weight",
        "blocks.0.bn2.weight",
        "head.weight",
    ]


def test_example_inputs_align_every_entry_and_outputs_equal_the_oracle(checkpoint, other, reference, images):
    model = Net().eval()
    p = tg.plan(model, checkpoint, align=True, example_inputs=images)
    expected = true_mapping(model.state_dict())
    assert p.missing == [] and p.unexpected == [] and p.ambiguous == [] and p.mismatched == []
    assert {t: a["source"] for t, a in p.aligned.items()} == expected
    n_units = 2 + 4 * BLOCKS
    assert f"aligned in execution order, traced with example inputs: {n_units} modules ran, 0 did not" in p.notes
    bn2 = p.aligned["blocks.1.bn2.running_var"]["reason"]
    assert "in execution order" in bn2, bn2

    report = tg.load(model, checkpoint, align=True, example_inputs=images, strict=True)
    assert len(report.aligned) == len(expected) and report.missing == [] and report.ambiguous == []
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(images), other(images), rtol=1e-5, atol=1e-5)


def test_without_example_inputs_ambiguity_is_reported_and_nothing_is_misplaced(checkpoint):
    model = Net()
    p = tg.plan(model, checkpoint, align=True)
    expected = true_mapping(model.state_dict())
    assert p.ambiguous, "registration order puts bn2 first: it must not be trusted to tell bn1 from bn2"
    wrong = {t: a["source"] for t, a in p.aligned.items() if expected[t] != a["source"]}
    assert wrong == {}
    left = {t for a in p.ambiguous for t in a["targets"]}
    assert left and all(".bn" in t for t in left), left
    assert set(p.aligned) | left | {k for k in expected if k.endswith("num_batches_tracked")} >= set(expected)
    assert not any("execution order" in n for n in p.notes)


def test_meta_built_model_traces_and_loads(checkpoint, reference, images):
    with torch.device("meta"):
        model = Net().eval()
    p = tg.plan(model, checkpoint, align=True, example_inputs=(images,))
    assert p.missing == [] and p.ambiguous == [] and len(p.aligned) == len(true_mapping(model.state_dict()))
    assert all(t.is_meta for t in model.state_dict().values())  # planning materialised nothing

    report = tg.load(model, checkpoint, align=True, example_inputs=[images])
    assert report.missing == [] and report.ambiguous == []
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# The user's model is not touched


def test_planning_leaves_the_model_unchanged(checkpoint, images):
    model = Net(aux=True).train()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {k: id(v) for k, v in model.named_parameters()}
    rng = torch.random.get_rng_state()
    tg.plan(model, checkpoint, align=True, example_inputs=images)
    assert {k: id(v) for k, v in model.named_parameters()} == params
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k]), k  # running stats untouched by the forward
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_lazy_modules_are_traced_and_stay_lazy():
    from torch.nn.parameter import is_lazy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5), nn.LazyBatchNorm1d())
    order, _ = trace_order(model, torch.zeros(2, 3, 8, 8))
    assert order.ran == ["", "0", "1", "2", "3"] and order.not_run == []
    assert is_lazy(model[2].weight) and is_lazy(model[3].running_mean)  # the copy was materialised, not the model


def test_a_failing_forward_leaves_the_model_unchanged(images):
    model = Net()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="forward failed on the meta device"):
        tg.plan(model, OtherNet().state_dict(), align=True, example_inputs=torch.zeros(1, 5, 16, 16))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------------
# Forms of example_inputs, modules that do not run


class KeywordNet(Net):
    def forward(self, pixels: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return super().forward(pixels) * scale


@pytest.mark.parametrize(
    "inputs",
    [
        pytest.param(lambda x: x, id="tensor"),
        pytest.param(lambda x: (x,), id="tuple"),
        pytest.param(lambda x: [x], id="list"),
        pytest.param(lambda x: {"pixels": x, "scale": 2.0}, id="kwargs"),
        pytest.param(lambda x: {"pixels": x}, id="kwargs-tensor-only"),
    ],
)
def test_forms_of_example_inputs(inputs, other, images):
    model = KeywordNet()
    p = tg.plan(model, other.state_dict(), align=True, example_inputs=inputs(images))
    assert p.missing == [] and p.ambiguous == []
    assert {t: a["source"] for t, a in p.aligned.items()} == true_mapping(model.state_dict())


def test_tensors_the_forward_makes_itself_are_on_meta_too(other, images):
    class MakesTensors(Net):
        def forward(self, x):
            return super().forward(x + torch.ones(x.shape))  # no device given: the default device

    model = MakesTensors()
    p = tg.plan(model, other.state_dict(), align=True, example_inputs=images)
    assert p.missing == [] and p.ambiguous == []
    assert torch.ones(1).device.type == "cpu"  # the default device is back


def test_modules_that_do_not_run_are_counted_and_placed_after_their_parents_run(images):
    model = Net(aux=True)
    order, _ = trace_order(model, images)
    assert order.not_run == ["aux"]
    keys = order.sort(model.state_dict())
    assert keys[-2:] == ["aux.weight", "aux.bias"]  # after every module that ran (its parent is the root)

    class Attention(nn.Module):  # nn.MultiheadAttention reads out_proj's weight without running out_proj
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.after = nn.Linear(8, 8)

        def forward(self, x):
            x = self.norm(x)
            return self.after(self.attn(x, x, x, need_weights=False)[0])

    order, _ = trace_order(Attention(), torch.zeros(1, 4, 8))
    assert order.not_run == ["attn.out_proj"]
    keys = order.sort(Attention().state_dict())
    assert keys.index("attn.in_proj_weight") < keys.index("attn.out_proj.weight") < keys.index("after.weight")

    p = tg.plan(model, OtherNet().state_dict(), align=True, example_inputs=images)
    n_units = 2 + 4 * BLOCKS
    note = next(n for n in p.notes if n.startswith("aligned in execution order"))
    assert f"{n_units} modules ran, 1 did not (aux: kept in registration order" in note
    assert p.missing == ["aux.weight", "aux.bias"] and p.ambiguous == []


# ---------------------------------------------------------------------------
# Parallel branches: a traced order is no excuse for a guess


class MainThenSide(nn.Module):
    """torchvision's Bottleneck: the main path registered first, the projection (``side``) last, flat names."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.side = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32))  # conv3's shapes

    def forward(self, x):
        y = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(self.bn3(self.conv3(y)) + self.side(x))


class SideThenMain(nn.Module):
    """Hugging Face's ResNetBottleNeckLayer: ``shortcut`` registered before the main path, conv + norm grouped."""

    def __init__(self):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.layer = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)),
            nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32)),
        )

    def forward(self, x):
        y = torch.relu(self.layer[1](torch.relu(self.layer[0](x))))
        return torch.relu(self.layer[2](y) + self.shortcut(x))


@pytest.mark.parametrize("container", ["pth", "safetensors"])
@pytest.mark.parametrize("traced", [False, True])
def test_parallel_branches_are_never_swapped(traced, container, tmp_path):
    # SideThenMain's layer.2 and shortcut have the same shapes, as MainThenSide's conv3/bn3 and side; a module
    # that merely sits under the same (root) module as an already paired one says nothing about which is which
    torch.manual_seed(0)
    src = MainThenSide().eval()
    with torch.no_grad():
        for m in src.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
                m.weight.normal_()
    path = tmp_path / f"b.{container}"
    if container == "pth":
        torch.save(src.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = SideThenMain().eval()
    x = torch.randn(2, 8, 8, 8)
    p = tg.plan(model, str(path), align=True, example_inputs=x if traced else None)
    truth = {"layer.2.0.weight": "conv3.weight", "shortcut.0.weight": "side.0.weight",
             "layer.2.1.running_var": "bn3.running_var", "shortcut.1.running_var": "side.1.running_var"}  # fmt: skip
    assert {t: p.aligned[t]["source"] for t in truth if t in p.aligned} == {
        t: s for t, s in truth.items() if t in p.aligned
    }
    if container == "pth":  # the file's order is the other codebase's network order: both orders agree
        assert p.missing == [] and p.ambiguous == []
        tg.load(model, str(path), plan=p)
        with torch.no_grad():
            torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)
    else:  # sorted keys, and no number or name says which branch is which: reported, not guessed
        assert "shortcut.0.weight" in p.missing and "layer.2.0.weight" in p.missing
        amb = next(a for a in p.ambiguous if "shortcut.0.weight" in a["targets"] or "layer.2.0.weight" in a["targets"])
        assert {"conv3.weight", "side.0.weight"} <= set(amb["candidates"])


# ---------------------------------------------------------------------------
# Inputs built from the model's config ("auto")


def _transformers():
    return pytest.importorskip("transformers", reason="transformers is a test extra: pip install -e '.[test]'")


def _tiny_gpt2():
    transformers = _transformers()
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _tiny_vit():
    transformers = _transformers()
    config = transformers.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)  # fmt: skip
    return transformers.ViTModel(config, add_pooling_layer=False)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    "build, convention",
    [(_tiny_gpt2, "transformers input_ids [1, 8]"), (_tiny_vit, "transformers pixel_values")],
    ids=["input_ids", "pixel_values"],
)
def test_auto_inputs_from_transformers_config(build, convention, device):
    torch.manual_seed(0)
    source = build().state_dict()
    with torch.device(device):
        model = build()
    order, how = trace_order(model, "auto")
    assert convention in how
    held = {k.rpartition(".")[0] for k in model.state_dict()}
    ran, not_run = order.ran_and_not(model.state_dict())
    assert set(ran) | set(not_run) == held
    # a real first module: the embeddings run before every layer
    first_layer = next(i for i, m in enumerate(order.ran) if re.search(r"(^|\.)(h|layer|layers)\.0$", m))
    assert any("embed" in m or m.endswith(".wte") for m in order.ran[:first_layer])

    p = tg.plan(model, source, align=True, example_inputs="auto")
    note = next(n for n in p.notes if n.startswith("aligned in execution order"))
    assert f"traced with an input built from the model's config ({convention}" in note
    assert f"{len(ran)} modules ran, {len(not_run)} did not" in note
    assert p.missing == [] and p.unexpected == []


# ---------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"example_inputs": torch.zeros(1, 3, 8, 8)}, r"pass align=True with it"),
        ({"align": True, "example_inputs": 3}, r"must be a tensor, a tuple or list .* not int"),
        ({"align": True, "example_inputs": "pixels"}, r"must be tensors or 'auto', not the string 'pixels'"),
        ({"align": True, "example_inputs": {1: torch.zeros(1)}}, r"its keys must be strings"),
        ({"align": True, "example_inputs": "auto"}, r"'auto' cannot build an input for Net: .* Pass example_inputs="),
        (
            {"align": True, "example_inputs": torch.zeros(1, 4, 8, 8)},
            (
                r"Net's forward failed on the meta device with example inputs \(RuntimeError: .*channel.*\)\. "
                r"Pass example_inputs= that its forward accepts .* or align without example_inputs"
            ),
        ),
    ],
    ids=["without-align", "wrong-type", "wrong-string", "non-str-keys", "auto-unknown", "wrong-shape"],
)
def test_errors(kwargs, match, other):
    with pytest.raises(PlanError, match=match):
        tg.plan(Net(), other.state_dict(), **kwargs)


def test_forward_that_reads_values_cannot_be_traced(other):
    class ReadsValues(Net):
        def forward(self, x):
            if x.sum().item() > 0:  # data-dependent: no value on meta
                return super().forward(x)
            return super().forward(-x)

    with pytest.raises(PlanError, match=r"forward failed on the meta device .* a forward that reads tensor values"):
        tg.load(ReadsValues(), other.state_dict(), align=True, example_inputs=torch.ones(1, 3, 8, 8))


def test_a_sharded_model_is_not_traced(other):
    from torch.distributed.fsdp import FSDPModule

    class FSDPBlock(FSDPModule, Block):  # the class fully_shard gives a module (no process group needed here)
        pass

    model = Net()
    model.blocks[1].__class__ = FSDPBlock
    with pytest.raises(
        PlanError, match=r"cannot trace Net: it is sharded \(blocks\.1 is an FSDP module.*pass it as plan="
    ):
        tg.plan(model, other.state_dict(), align=True, example_inputs=torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------
# torchgraft.distributed passes it through


def test_distributed_load_in_one_process_aligns_in_execution_order(other, reference, images):
    tgd = pytest.importorskip("torchgraft.distributed")
    model = Net().eval()
    report = tgd.load(model, other.state_dict(), align=True, example_inputs=images)
    assert (
        report.missing == [] and report.ambiguous == [] and len(report.aligned) == len(true_mapping(model.state_dict()))
    )
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_align_function_names_the_model_order_it_was_given():
    from torchgraft.align import align

    targets = [(f"m{i}.weight", (4, 4), "float32", True) for i in range(2)]
    sources = [(f"c{i}.weight", f"c{i}.weight", (4, 4), "float32", True) for i in range(2)]
    by_execution = align(targets, sources, source_ordered=True, model_order="execution")
    assert [(p.target, p.source) for p in by_execution.pairs] == [
        ("m0.weight", "c0.weight"),
        ("m1.weight", "c1.weight"),
    ]
    assert all("in execution order and file order" in p.reason for p in by_execution.pairs)
    by_registration = align(targets, sources, source_ordered=True)
    assert all("in model and file order" in p.reason for p in by_registration.pairs)
    with pytest.raises(ValueError, match="model_order must be 'registration' or 'execution', not 'run'"):
        align(targets, sources, source_ordered=True, model_order="run")  # type: ignore[arg-type]
