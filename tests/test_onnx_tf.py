"""ONNX and TensorFlow checkpoints: Spotify's basic-pitch model, shipped as ONNX and as a TF SavedModel.

The oracle is onnxruntime, run in the test on the same ONNX file: a torch re-implementation of
the model (written from the ONNX graph, below) is loaded from the ONNX initializers and, separately,
from the SavedModel's ``variables/``; both must reproduce onnxruntime's outputs, and the tensors the
two formats share must be equal.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
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
            pair = torch.stack(
                [real[:, :, 0].transpose(1, 2), imag[:, :, 0].transpose(1, 2)], dim=-1
            )  # [B, 172, 36, 2]
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
    report = tg.load(model, path, align=True, ignore_missing=["cqt.*"])
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
    # Keras layer names (from saved_model.pb): conv2d_* match by name, the BatchNorms and the contour head by structure
    assert sorted(report.aligned) == sorted(
        f"{m}.{a}" for m in ("bn", "bn2", "bn3") for a in ("weight", "bias", "running_mean", "running_var")
    ) + ["contours.bias", "contours.weight"]
    assert report.aligned["bn2.running_var"]["source"] == "batch_normalization_2.running_var"
    assert report.aligned["contours.weight"]["source"] == "contours-reduced.weight"
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
        torch.testing.assert_close(
            c.weight * scale[:, None, None, None], onnx_sd[f"{conv}.weight"], rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            (c.bias - bn.running_mean) * scale + bn.bias, onnx_sd[f"{conv}.bias"], rtol=1e-5, atol=1e-6
        )
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
    # a model that still has its BatchNorms: the plan says plainly which entries this graph cannot give
    plan = tg.plan(BasicPitch(fused=False), src, align=True)
    [note] = [n for n in plan.notes if "cannot come from this ONNX graph" in n]
    assert note.startswith(
        "bn.weight, bn.bias, bn.running_mean, bn.running_var, bn3.weight, bn3.bias, bn3.running_mean"
    )
    assert "folded BatchNorm into conv_3, conv_4" in note
    assert not any("cannot come from" in n for n in tg.plan(BasicPitch(fused=True), src, align=True).notes)
    assert src.conversions == {}  # convolutions are stored in torch's layout already
    w = src["conv_6.weight"].load()
    assert w.shape == (32, 1, 7, 7) and w.dtype == torch.float32


def test_savedmodel_names_conversions_and_skipped(models, tmp_path):
    from torchgraft.sources.tf_reader import TFSource

    for path in (models / "nmp", models / "nmp" / "variables" / "variables.index",
                 models / "nmp" / "variables" / "variables.data-00000-of-00001"):  # fmt: skip
        src = tg.open(path)
        assert isinstance(src, TFSource) and src.format == "tf-checkpoint" and len(src) == 24
    # names: the Keras layers' own (saved_model.pb's object graph), in the order Keras lists its layers
    assert src.metadata["names"] == "Keras layer names from saved_model.pb"
    assert list(src)[:6] == [
        "batch_normalization.bias", "batch_normalization.running_mean", "batch_normalization.running_var",
        "batch_normalization.weight", "conv2d_1.bias", "conv2d_1.weight",
    ]  # fmt: skip
    assert src["conv2d_1.weight"].shape == (8, 8, 3, 39)  # HWIO (3, 39, 8, 8) -> OIHW
    assert src.conversions["conv2d_1.weight"] == "Conv2D kernel HWIO permuted to torch's OIHW"
    assert src.conversions["batch_normalization_2.running_var"] == "TF BatchNorm moving_variance renamed to running_var"
    assert src.original_names["batch_normalization_2.weight"] == "layer_with_weights-2/gamma/.ATTRIBUTES/VARIABLE_VALUE"
    # without saved_model.pb beside variables/, the object graph's own path names
    import shutil

    shutil.copytree(models / "nmp" / "variables", tmp_path / "variables")
    plain = tg.open(tmp_path / "variables" / "variables.index")
    assert plain.metadata["names"] == "object-graph paths" and "layer_with_weights.1.weight" in plain
    assert list(plain)[4:6] == ["layer_with_weights.1.bias", "layer_with_weights.1.weight"]
    # a damaged saved_model.pb costs the names, never the weights (its graphs are not needed, never run)
    (tmp_path / "saved_model.pb").write_bytes(b"\x12\xff\xff\xff\xff\x0f")
    damaged = tg.open(tmp_path)
    assert damaged.metadata["names"].startswith("object-graph paths (saved_model.pb could not be read")
    assert list(damaged) == list(plain)
    slots = [k for k, why in src.skipped.items() if why == "optimizer slot"]
    assert len(slots) == 2 * 24 - 2 * 3 * 2  # Adam m and v for every trainable variable (not moving mean/var)
    assert src.skipped["optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"] == "optimizer state"
    assert src.skipped["_CHECKPOINTABLE_OBJECT_GRAPH"].startswith("TensorFlow object graph")
    # that the permutation is right is shown by the cross-format test: conv2d_2's SavedModel kernel, permuted,
    # equals the ONNX graph's weight bit for bit


# ---------------------------------------------------------------------------
# Small graphs and bundles made in the test


def _mlp_graph(tmp_path: Path, *, external: str | None = None) -> tuple[Path, dict[str, np.ndarray]]:
    """x -> MatMul + Add -> Relu -> Gemm(transB=0) -> Relu -> Gemm(transB=1): three linears, stored three ways."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {
        "w0": rng.standard_normal((5, 7), dtype=np.float32),  # [in, out] for MatMul
        "b0": rng.standard_normal(7, dtype=np.float32),
        "w1": rng.standard_normal((7, 6), dtype=np.float32),  # [in, out] for Gemm transB=0
        "b1": rng.standard_normal(6, dtype=np.float32),
        "w2": rng.standard_normal((3, 6), dtype=np.float32),  # [out, in] for Gemm transB=1
        "b2": rng.standard_normal(3, dtype=np.float32),
    }
    inits = [numpy_helper.from_array(v, name=f"onnx::{k}") for k, v in w.items()]
    nodes = [
        helper.make_node("MatMul", ["x", "onnx::w0"], ["h0"]),
        helper.make_node("Add", ["h0", "onnx::b0"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Gemm", ["h2", "onnx::w1", "onnx::b1"], ["h3"], transB=0),
        helper.make_node("Relu", ["h3"], ["h4"]),
        helper.make_node("Gemm", ["h4", "onnx::w2", "onnx::b2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "mlp.onnx"
    if external is None:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, location=external, size_threshold=0)
    return path, w


def test_onnx_matmul_and_gemm_weights_are_transposed_to_torch_layout(tmp_path):
    path, w = _mlp_graph(tmp_path)
    src = tg.open(path)
    assert list(src) == [
        "linear_0.weight", "linear_0.bias", "linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"
    ]  # fmt: skip
    assert src.conversions == {
        "linear_0.weight": "ONNX MatMul weight [in, out] transposed to torch's [out, in]",
        "linear_1.weight": "ONNX Gemm weight [in, out] transposed to torch's [out, in] (Gemm transB=0)",
    }
    assert src["linear_0.weight"].shape == (7, 5) and src["linear_2.weight"].shape == (3, 6)
    assert torch.equal(src["linear_0.weight"].load(), torch.from_numpy(w["w0"]).T)
    assert torch.equal(src["linear_2.weight"].load(), torch.from_numpy(w["w2"]))
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    report = tg.load(model, src, align=True, strict=True)
    assert report.aligned["2.weight"]["source"] == "linear_1.weight"
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(1))
    ort = pytest.importorskip("onnxruntime")
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    torch.testing.assert_close(model(x).detach(), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter announces its retirement
def test_onnx_torch_export_keeps_state_dict_names(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 6, 6))
    path = tmp_path / "m.onnx"
    try:
        torch.onnx.export(model, (torch.zeros(1, 3, 6, 6),), str(path), dynamo=False, do_constant_folding=False)
    except Exception as e:  # noqa: BLE001 - the exporter's own optional dependencies vary
        pytest.skip(f"torch.onnx.export is not usable here: {e}")
    src = tg.open(path)
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(src)
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    tg.load(fresh, src, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_onnx_external_data_is_read_lazily_inside_the_folder(tmp_path):
    path, w = _mlp_graph(tmp_path, external="mlp.data")
    src = tg.open(path)
    assert src.files == [str(path), str((tmp_path / "mlp.data").resolve())]
    assert torch.equal(src["linear_1.bias"].load(), torch.from_numpy(w["b1"]))


@pytest.mark.parametrize(
    ("location", "match"),
    [
        ("../outside.bin", r"keeps its data in '\.\./outside\.bin', outside"),
        ("/etc/hostname", r"keeps its data in '/etc/hostname', outside"),
        ("link.bin", r"keeps its data in 'link\.bin', which leads to"),
        ("missing.bin", r"external data file 'missing\.bin' of .* does not exist"),
    ],
)
def test_onnx_external_data_outside_the_folder_is_refused(tmp_path, location, match):
    inner = tmp_path / "model"
    inner.mkdir()
    path, _ = _mlp_graph(inner, external="mlp.data")
    (tmp_path / "outside.bin").write_bytes((inner / "mlp.data").read_bytes())
    (inner / "link.bin").symlink_to(tmp_path / "outside.bin")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path))
    with pytest.raises(CheckpointError, match=match):
        tg.open(path)


def test_onnx_damaged_files_are_refused(tmp_path):
    path, _ = _mlp_graph(tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"\(read as onnx\): not a valid ONNX model"):
        tg.open(tmp_path / "cut.onnx")
    model = onnx.load(str(path))
    model.graph.initializer[0].dims[:] = [1 << 40, 1 << 40]
    onnx.save(model, str(tmp_path / "huge.onnx"))
    with pytest.raises(CheckpointError, match=r"has shape \[1099511627776, 1099511627776\] .* but holds 140"):
        tg.open(tmp_path / "huge.onnx")


def test_missing_extras_name_the_extra_to_install(tmp_path, monkeypatch, models):
    import sys

    from torchgraft.sources import tf_reader

    path, _ = _mlp_graph(tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(CheckpointError, match=r"needs the 'onnx' package\n.*torchgraft\[onnx\]"):
        tg.open(path)
    monkeypatch.setitem(sys.modules, "google_crc32c", None)
    with pytest.raises(CheckpointError, match=r"needs the 'google-crc32c' package\n.*torchgraft\[tf\]"):
        tg.open(models / "nmp")
    monkeypatch.setattr(tf_reader, "_messages", {})
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    with pytest.raises(CheckpointError, match=r"needs the 'protobuf' package\n.*torchgraft\[tf\]"):
        tg.open(models / "nmp")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_tf_bundle(prefix: Path, tensors: dict[str, np.ndarray]) -> None:
    """A TensorFlow checkpoint as TF writes it (one shard, float32), from the format's specification, not from torchgraft."""
    import struct

    data = bytearray()
    rows = [(b"", b"\x08\x01")]  # BundleHeaderProto{num_shards: 1}
    for key in sorted(tensors):
        raw = np.ascontiguousarray(tensors[key], dtype="<f4").tobytes()
        dims = b"".join(b"\x12" + _varint(len(d)) + d for d in (b"\x08" + _varint(s) for s in tensors[key].shape))
        entry = b"\x08\x01" + b"\x12" + _varint(len(dims)) + dims  # dtype DT_FLOAT, shape
        entry += (
            b"\x20" + _varint(len(data)) + b"\x28" + _varint(len(raw)) + b"\x35" + struct.pack("<I", _masked_crc(raw))
        )
        rows.append((key.encode(), entry))
        data += raw
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(bytes(data))

    def block(entries: list[tuple[bytes, bytes]]) -> bytes:
        body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
        return body + struct.pack("<II", 0, 1)

    out = bytearray()

    def put(contents: bytes) -> bytes:
        handle = _varint(len(out)) + _varint(len(contents))
        out.extend(contents + b"\x00" + struct.pack("<I", _masked_crc(contents + b"\x00")))
        return handle

    data_handle = put(block(rows))
    meta_handle = put(block([]))
    index_handle = put(block([(rows[-1][0], data_handle)]))
    footer = (meta_handle + index_handle).ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(out) + footer)


def test_tf_kernels_are_converted_to_torch_layout(tmp_path):
    rng = np.random.default_rng(0)
    v = "/.ATTRIBUTES/VARIABLE_VALUE"
    arrays = {
        f"dense/kernel{v}": rng.standard_normal((5, 3)),  # Dense [in, out]
        f"dense/bias{v}": rng.standard_normal(3),
        f"conv1d/kernel{v}": rng.standard_normal((3, 4, 6)),  # Conv1D [W, in, out]
        f"dw/depthwise_kernel{v}": rng.standard_normal((3, 3, 4, 2)),  # DepthwiseConv2D [H, W, in, mult]
        f"layer_with_weights-10/embeddings{v}": rng.standard_normal((9, 2)),
        f"layer_with_weights-2/embeddings{v}": rng.standard_normal((9, 2)),
        f"dense/kernel/.OPTIMIZER_SLOT/optimizer/m{v}": rng.standard_normal((5, 3)),
        f"save_counter{v}": np.zeros(()),
    }
    write_tf_bundle(tmp_path / "ckpt-1", arrays)
    src = tg.open(tmp_path / "ckpt-1.index")
    # keys in network order (layer_with_weights-2 before -10), optimizer slots and the counter listed, not entries
    assert list(src) == [
        "conv1d.weight", "dense.bias", "dense.weight", "dw.depthwise.weight",
        "layer_with_weights.2.weight", "layer_with_weights.10.weight",
    ]  # fmt: skip
    assert src.skipped == {
        f"dense/kernel/.OPTIMIZER_SLOT/optimizer/m{v}": "optimizer slot",
        f"save_counter{v}": "checkpoint save counter",
    }
    k = torch.from_numpy(arrays[f"dense/kernel{v}"]).float()
    assert torch.equal(src["dense.weight"].load(), k.T)
    c = torch.from_numpy(arrays[f"conv1d/kernel{v}"]).float()
    assert torch.equal(src["conv1d.weight"].load(), c.permute(2, 1, 0))
    d = torch.from_numpy(arrays[f"dw/depthwise_kernel{v}"]).float()
    got = src["dw.depthwise.weight"].load()
    assert got.shape == src["dw.depthwise.weight"].shape == (8, 1, 3, 3)
    for i in range(4):  # torch groups=in: output channel i * mult + m filters input channel i
        for m in range(2):
            assert torch.equal(got[i * 2 + m, 0], d[:, :, i, m])
    # a Keras Dense is a torch Linear: same outputs
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    linear = nn.Linear(5, 3)
    tg.load(linear, src, rules={"dense": ""}, ignore_unexpected=[".*"])
    torch.testing.assert_close(linear(x).detach(), x @ k + torch.from_numpy(arrays[f"dense/bias{v}"]).float())
    assert src.conversions["dw.depthwise.weight"].startswith("DepthwiseConv2D kernel [H, W, in, mult]")
    assert src.conversions["layer_with_weights.2.weight"] == "TF Embedding embeddings renamed to weight"


def test_tf_damaged_bundles_are_refused(tmp_path):
    write_tf_bundle(tmp_path / "ok", {"a/kernel/.ATTRIBUTES/VARIABLE_VALUE": np.ones((4, 4))})
    index = (tmp_path / "ok.index").read_bytes()
    data = (tmp_path / "ok.data-00000-of-00001").read_bytes()

    def variant(name: str, index_bytes: bytes, data_bytes: bytes) -> Path:
        (tmp_path / f"{name}.index").write_bytes(index_bytes)
        (tmp_path / f"{name}.data-00000-of-00001").write_bytes(data_bytes)
        return tmp_path / f"{name}.index"

    with pytest.raises(CheckpointError, match=r"does not end with the table magic number"):
        tg.open(variant("cut", index[:-3], data))
    flipped = bytearray(index)
    flipped[5] ^= 0x40
    with pytest.raises(CheckpointError, match=r"data block at byte 0 fails its CRC32C checksum"):
        tg.open(variant("flip", bytes(flipped), data))
    with pytest.raises(CheckpointError, match=r"spans bytes 0\.\.64, outside its 60-byte data shard"):
        tg.open(variant("short", index, data[:60]))
    bad = bytearray(data)
    bad[7] ^= 1
    src = tg.open(variant("rot", index, bytes(bad)))  # names and shapes are fine; the bytes are checked on load
    with pytest.raises(CheckpointError, match=r"fail their CRC32C checksum \(the data file is damaged\)"):
        src["a.weight"].load()
    (tmp_path / "gone.index").write_bytes(index)
    with pytest.raises(
        CheckpointError, match=r"data shard gone\.data-00000-of-00001 named by the index does not exist"
    ):
        tg.open(tmp_path / "gone.index")


# ---------------------------------------------------------------------------
# CLI: inspect and scan


def _cli(capsys, *argv: object) -> tuple[int, str, str]:
    from torchgraft.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_inspect_shows_format_tensors_and_dtypes(models, capsys):
    import json

    code, out, _ = _cli(capsys, "inspect", models / "nmp.onnx", "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "onnx" and info["tensors"] == 25
    assert info["dtypes"] == {"float32": 35740, "int32": 1}
    assert (
        info["metadata"]["producer"] == "tf2onnx 1.15.1 37820d" and "cannot come from" in info["metadata"]["batchnorm"]
    )
    code, out, _ = _cli(capsys, "inspect", models / "nmp", "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "tf-checkpoint" and info["tensors"] == 24
    assert info["dtypes"] == {"float32": 16864}
    code, out, _ = _cli(capsys, "inspect", models / "nmp")
    assert "(tf-checkpoint)" in out and "conv2d_1" in out and "[8, 8, 3, 39] float32" in out


def test_cli_scan_says_what_each_format_can_execute(models, tmp_path, capsys):
    code, out, _ = _cli(capsys, "scan", models / "nmp.onnx")
    assert code == 0 and "the graph is data to torchgraft, never executed" in out
    code, out, _ = _cli(capsys, "scan", models / "nmp")
    assert code == 0 and "a TF bundle holds tensors only, no code" in out
    assert "saved_model.pb holds TF graphs (they can call Python): never read" in out
    path, _ = _mlp_graph(tmp_path, external="mlp.data")
    model = onnx.load(str(path), load_external_data=False)
    for e in model.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../../etc/passwd"
    onnx.save(model, str(path))
    with pytest.raises(CheckpointError, match=r"keeps its data in '\.\./\.\./etc/passwd', outside"):
        tg.scan(path)


def test_onnx_dtypes_raw_and_typed_storage(tmp_path):
    from onnx import TensorProto, helper

    arrays = {
        "f16": (TensorProto.FLOAT16, np.arange(6, dtype=np.float16).reshape(2, 3), True),
        "i64": (TensorProto.INT64, np.arange(6, dtype=np.int64).reshape(2, 3), False),
        "f64": (TensorProto.DOUBLE, np.linspace(0, 1, 6).reshape(3, 2), True),
        "b": (TensorProto.BOOL, np.array([True, False, True]), False),
        "f32": (TensorProto.FLOAT, np.linspace(-1, 1, 4, dtype=np.float32), False),
    }
    inits = [
        helper.make_tensor(k, tp, a.shape, a.tobytes() if raw else a.flatten().tolist(), raw=raw)
        for k, (tp, a, raw) in arrays.items()
    ]
    inits.append(helper.make_tensor("bf16", TensorProto.BFLOAT16, [3], [1.0, 2.0, 3.5]))  # typed: stored as int32
    nodes = [helper.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in inits]
    outputs = [helper.make_tensor_value_info(f"{t.name}_out", t.data_type, None) for t in inits]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [], outputs, inits)), str(tmp_path / "m.onnx"))
    src = tg.open(tmp_path / "m.onnx")
    got = {src.original_names[k]: src[k].load() for k in src}
    for k, (_tp, a, _raw) in arrays.items():
        assert torch.equal(got[k], torch.from_numpy(a)), k
        assert src[next(n for n, o in src.original_names.items() if o == k)].dtype == str(got[k].dtype)[6:]
    assert got["bf16"].dtype == torch.bfloat16 and got["bf16"].tolist() == [1.0, 2.0, 3.5]
