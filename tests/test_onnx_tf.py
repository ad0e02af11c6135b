"""ONNX and TensorFlow checkpoints: Spotify's basic-pitch model, shipped as ONNX and as a TF SavedModel.

The oracle is onnxruntime, run in the test on the same ONNX file: a torch re-implementation of
the model (written from the ONNX graph, below) is loaded from the ONNX initializers and, separately,
from the SavedModel's ``variables/``; both must reproduce onnxruntime's outputs, and the tensors the
two formats share must be equal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchgraft as tg
from torchgraft.errors import CheckpointError

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'torchgraft[onnx]')")
pytest.importorskip("google_crc32c", reason="the tf extra is not installed (pip install 'torchgraft[tf]')")


def _basic_pitch_models() -> Path:
    spec = importlib.util.find_spec("basic_pitch")  # not imported: its __init__ probes for TensorFlow and warns
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the test asset package basic-pitch is not installed (pip install --no-deps basic-pitch)")
    root = Path(next(iter(spec.submodule_search_locations))) / "saved_models" / "icassp_2022"
    if not (root / "nmp.onnx").is_file() or not (root / "nmp" / "variables" / "variables.index").is_file():
        pytest.skip(f"basic-pitch is installed but its ONNX / SavedModel files are missing under {root}")
    return root


@pytest.fixture(scope="module")
def models() -> Path:
    return _basic_pitch_models()


# ---------------------------------------------------------------------------
# basic-pitch in torch, read off the ONNX graph (tf2onnx 1.15 export of the Keras model)

N_SAMPLES = 43844  # the model's fixed input length (2 s of 22050 Hz audio, minus overlap)
N_OCTAVES = 9
N_BINS = 309  # CQT bins kept (of 9 octaves x 36 bins, the highest 309)
HARMONICS = (-36, 0, 36, 57, 72, 84, 93, 101)  # bin shifts of 0.5, 1, 2, 3, ..., 7 times the pitch (36 bins/octave)


class CQT(nn.Module):
    """nnAudio-style constant-Q transform: per octave one strided complex conv, then a 2x low-pass downsample."""

    def __init__(self) -> None:
        super().__init__()
        self.imag = nn.Conv2d(1, 36, (1, 256), bias=True)  # the exporter shares this zero bias with `real`
        self.real = nn.Conv2d(1, 36, (1, 256), bias=False)
        self.lowpass = nn.Conv2d(1, 1, (1, 256), stride=(1, 2), bias=True)
        self.bin_scale = _Scale((N_BINS, 1, 1))  # sqrt of the kernels' lengths

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 1, T]
        octaves = []
        signal = x
        for o in range(N_OCTAVES):
            stride = 256 >> o
            padded = F.pad(signal, (128, 128), mode="reflect")[:, :, None, :]  # [B, 1, 1, T + 256]
            real = F.conv2d(padded, self.real.weight, self.imag.bias, stride=(1, stride))
            imag = -F.conv2d(padded, self.imag.weight, self.imag.bias, stride=(1, stride))
            pair = torch.stack([real[:, :, 0].transpose(1, 2), imag[:, :, 0].transpose(1, 2)], dim=-1)  # [B, 172, 36, 2]
            octaves.append(pair)
            if o < N_OCTAVES - 1:
                down = F.pad(signal, (127, 127))[:, :, None, :]
                signal = self.lowpass(down)[:, :, 0]
        cqt = torch.cat(octaves[::-1], dim=2)[:, :, -N_BINS:]  # lowest octave first: [B, 172, 309, 2]
        cqt = cqt.transpose(1, 2) * self.bin_scale.weight  # [B, 309, 172, 2]
        return torch.sqrt((cqt * cqt).sum(-1)).transpose(1, 2)  # magnitude [B, 172, 309]


class _Scale(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(shape))


class _Affine(nn.Module):
    """What a 1-channel BatchNorm becomes once folded: x * weight + bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class BasicPitch(nn.Module):
    """Spotify's basic-pitch (ICASSP 2022) in torch. ``fused=True``: its BatchNorms folded away, as in the ONNX file."""

    def __init__(self, *, fused: bool) -> None:
        super().__init__()
        self.cqt = CQT()
        self.bn = _Affine(1) if fused else nn.BatchNorm2d(1, eps=1e-3)
        self.conv2d_4 = nn.Conv2d(8, 32, 5, stride=(1, 3), padding=(2, 1))  # onset branch
        self.bn3 = nn.Identity() if fused else nn.BatchNorm2d(32, eps=1e-3)
        self.conv2d_1 = nn.Conv2d(8, 8, (3, 39), padding=(1, 19))  # contour branch
        self.bn2 = nn.Identity() if fused else nn.BatchNorm2d(8, eps=1e-3)
        self.contours = nn.Conv2d(8, 1, 5, padding=2)
        self.conv2d_2 = nn.Conv2d(1, 32, 7, stride=(1, 3), padding=(3, 2))  # note branch
        self.conv2d_3 = nn.Conv2d(32, 1, (7, 3), padding=(3, 1))
        self.conv2d_5 = nn.Conv2d(33, 1, 3, padding=1)

    def forward(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mag = self.cqt(audio.reshape(-1, 1, N_SAMPLES))
        db = 10 * (torch.log(mag * mag + 1e-10) * 0.4342944622039795)
        db = db - db.amin(dim=(1, 2), keepdim=True)
        top = db.amax(dim=(1, 2), keepdim=True)
        db = torch.where(top == 0, torch.zeros_like(db), db / top)
        x = self.bn(db[:, None])  # [B, 1, 172, 309]
        shifted = [F.pad(x[..., max(h, 0) : x.shape[-1] + min(h, 0)], (max(-h, 0), max(h, 0))) for h in HARMONICS]
        x = torch.cat(shifted, dim=1)[..., :264]  # harmonic stack: [B, 8, 172, 264]
        contours = torch.sigmoid(self.contours(F.relu(self.bn2(self.conv2d_1(x)))))
        notes = torch.sigmoid(self.conv2d_3(F.relu(self.conv2d_2(contours))))
        onset_features = F.relu(self.bn3(self.conv2d_4(x)))
        onsets = torch.sigmoid(self.conv2d_5(torch.cat([notes, onset_features], dim=1)))
        return onsets[:, 0], notes[:, 0], contours[:, 0]


#: The Keras layers behind the SavedModel's ``layer_with_weights-N`` (read off the ONNX node names).
TF_RULES = {
    "layer_with_weights.0": "bn",
    "layer_with_weights.1": "conv2d_1",
    "layer_with_weights.2": "bn2",
    "layer_with_weights.3": "contours",
    "layer_with_weights.4": "conv2d_2",
    "layer_with_weights.5": "conv2d_4",
    "layer_with_weights.6": "bn3",
    "layer_with_weights.7": "conv2d_3",
    "layer_with_weights.8": "conv2d_5",
}


def _audio() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(N_SAMPLES) / 22050
    tones = sum(torch.sin(2 * torch.pi * f * t) * a for f, a in ((220.0, 0.4), (329.6, 0.3), (440.0, 0.2)))
    return (tones + 0.1 * torch.randn(N_SAMPLES, generator=g)).reshape(1, N_SAMPLES, 1).float()


def _onnxruntime(path: Path, audio: torch.Tensor) -> dict[str, torch.Tensor]:
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (test extra) is needed for the oracle")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = session.run(None, {name: audio.numpy()})
    return {o.name: torch.from_numpy(v) for o, v in zip(session.get_outputs(), outs)}


def _load_onnx(path: Path) -> tuple[BasicPitch, tg.LoadReport]:
    model = BasicPitch(fused=True).eval()
    report = tg.load(
        model,
        path,
        align=True,
        rules={"mul_3.b": "bn.weight", "add_1.b": "bn.bias"},  # the 1-channel BatchNorm, folded into Mul + Add
    )
    return model, report


def _load_tf(path: Path) -> tuple[BasicPitch, tg.LoadReport]:
    model = BasicPitch(fused=False).eval()
    report = tg.load(model, path, rules=TF_RULES, ignore_missing=["cqt.*"])
    return model, report


# ---------------------------------------------------------------------------
# The real model, both formats


def test_onnx_load_matches_onnxruntime(models):
    model, report = _load_onnx(models / "nmp.onnx")
    assert report.missing == [] and report.mismatched == []
    # every model entry came from the graph: 18 by structure (op, slot, shape, order), 2 by the rules
    assert len(report.aligned) == 18 and len(report.loaded) == 20
    assert report.aligned["conv2d_1.weight"]["source"] == "conv_4.weight"  # the contour branch's 3x39 conv
    assert report.aligned["cqt.real.weight"]["source"] == "conv_1.weight"
    # scalars of the dB scaling (log10, 1e-10, 10, div_no_nan's 0) and a concat constant: the model computes them
    assert sorted(report.unexpected) == ["add_0.b", "concat_0.inputs", "equal_0.b", "mul_1.b", "mul_2.b"]
    audio = _audio()
    expected = _onnxruntime(models / "nmp.onnx", audio)
    with torch.no_grad():
        onsets, notes, contours = model(audio)
    torch.testing.assert_close(onsets, expected["StatefulPartitionedCall:2"], rtol=0, atol=1e-4)
    torch.testing.assert_close(notes, expected["StatefulPartitionedCall:1"], rtol=0, atol=1e-4)
    torch.testing.assert_close(contours, expected["StatefulPartitionedCall:0"], rtol=0, atol=1e-4)


def test_savedmodel_load_matches_onnxruntime_and_the_onnx_tensors(models):
    fused, _ = _load_onnx(models / "nmp.onnx")
    model, report = _load_tf(models / "nmp")
    assert report.mismatched == [] and report.unexpected == []
    # the CQT kernels are computed by the Keras layer, not variables: only the ONNX graph holds them
    cqt = sorted(k for k in model.state_dict() if k.startswith("cqt."))
    assert report.missing == [] and sorted(k for k in report.ignored if k.startswith("cqt.")) == cqt
    assert len(report.loaded) == 24
    # cross-format equality: convolutions without a BatchNorm after them are the same numbers in both files
    onnx_sd, tf_sd = fused.state_dict(), model.state_dict()
    for name in ("contours", "conv2d_2", "conv2d_3", "conv2d_5"):
        for attr in ("weight", "bias"):
            assert torch.equal(tf_sd[f"{name}.{attr}"], onnx_sd[f"{name}.{attr}"]), f"{name}.{attr}"
    # ... and where tf2onnx folded BatchNorm into the conv (or, for the 1-channel one, into Mul + Add), folding
    # the SavedModel's conv + BatchNorm by hand gives the ONNX numbers
    for conv, bn in (("conv2d_1", model.bn2), ("conv2d_4", model.bn3)):
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        c = getattr(model, conv)
        torch.testing.assert_close(c.weight * scale[:, None, None, None], onnx_sd[f"{conv}.weight"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((c.bias - bn.running_mean) * scale + bn.bias, onnx_sd[f"{conv}.bias"], rtol=1e-5, atol=1e-6)
    scale = model.bn.weight / torch.sqrt(model.bn.running_var + model.bn.eps)
    torch.testing.assert_close(scale, onnx_sd["bn.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.bn.bias - model.bn.running_mean * scale, onnx_sd["bn.bias"], rtol=1e-5, atol=1e-6)
    # the TF-loaded model (with the graph's CQT constants) computes what onnxruntime computes
    with torch.no_grad():
        for k in cqt:
            model.get_parameter(k).copy_(onnx_sd[k])
    audio = _audio()
    expected = _onnxruntime(models / "nmp.onnx", audio)
    with torch.no_grad():
        onsets, notes, contours = model(audio)
    torch.testing.assert_close(onsets, expected["StatefulPartitionedCall:2"], rtol=0, atol=1e-4)
    torch.testing.assert_close(notes, expected["StatefulPartitionedCall:1"], rtol=0, atol=1e-4)
    torch.testing.assert_close(contours, expected["StatefulPartitionedCall:0"], rtol=0, atol=1e-4)


def test_onnx_source_roles_order_and_folded_batchnorm(models):
    from torchgraft.sources.onnx_reader import OnnxSource, batchnorm_entries

    src = tg.open(models / "nmp.onnx")
    assert isinstance(src, OnnxSource) and src.format == "onnx"
    # entries come in execution order, named by their first consumer; the graph's names are kept
    assert list(src)[:5] == ["conv_0.weight", "conv_0.bias", "conv_1.weight", "conv_2.weight", "conv_2.bias"]
    assert src.original_names["conv_6.weight"] == "const_fold_opt__738"
    [use] = src.roles["conv_6.weight"]
    assert (use.op_type, use.slot, use.input) == ("Conv", 1, "W")
    assert use.attributes["kernel_shape"] == [7, 7] and use.attributes["strides"] == [1, 3]
    positions = [src.roles[k][0].position for k in src]
    assert positions == sorted(positions)
    # the CQT's kernels feed a Conv in each of the 9 octaves
    assert [u.op_type for u in src.roles["conv_0.weight"]] == ["Conv"] * 9
    # shape constants are graph structure, listed, not entries
    assert src.skipped["const_fold_opt__683"] == "graph constant: Reshape shape"
    assert not any(k.startswith(("new_shape", "pad_const")) for k in src.original_names.values())
    # BatchNorm folded into the two convs that had one (tf2onnx keeps FusedBatchNormV3 in their names)
    assert src.folded_batchnorm == ["conv_3", "conv_4"]
    assert "running_mean and running_var cannot come from this graph" in src.metadata["batchnorm"]
    assert batchnorm_entries(BasicPitch(fused=False))[:5] == [
        "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"
    ]  # fmt: skip
    assert batchnorm_entries(BasicPitch(fused=True)) == []
    assert src.conversions == {}  # convolutions are stored in torch's layout already
    w = src["conv_6.weight"].load()
    assert w.shape == (32, 1, 7, 7) and w.dtype == torch.float32


def test_savedmodel_names_conversions_and_skipped(models):
    from torchgraft.sources.tf_reader import TFSource

    for path in (models / "nmp", models / "nmp" / "variables" / "variables.index",
                 models / "nmp" / "variables" / "variables.data-00000-of-00001"):  # fmt: skip
        src = tg.open(path)
        assert isinstance(src, TFSource) and src.format == "tf-checkpoint" and len(src) == 24
    assert src["layer_with_weights.1.weight"].shape == (8, 8, 3, 39)  # HWIO (3, 39, 8, 8) -> OIHW
    assert src.conversions["layer_with_weights.1.weight"] == "Conv2D kernel HWIO permuted to torch's OIHW"
    assert src.conversions["layer_with_weights.2.running_var"] == "TF BatchNorm moving_variance renamed to running_var"
    assert src.original_names["layer_with_weights.2.weight"] == "layer_with_weights-2/gamma/.ATTRIBUTES/VARIABLE_VALUE"
    slots = [k for k, why in src.skipped.items() if why == "optimizer slot"]
    assert len(slots) == 2 * 24 - 2 * 3 * 2  # Adam m and v for every trainable variable (not moving mean/var)
    assert src.skipped["optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"] == "optimizer state"
    assert src.skipped["_CHECKPOINTABLE_OBJECT_GRAPH"].startswith("TensorFlow object graph")
    # that the permutation is right is shown by the cross-format test: conv2d_2's SavedModel kernel, permuted,
    # equals the ONNX graph's weight bit for bit
