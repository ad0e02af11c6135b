"""Keras (.keras, .weights.h5, legacy .h5) and Flax msgpack readers, checked against the frameworks' own outputs.

Files are written by the real libraries in the tests (Keras 3 on its torch backend, flax.linen);
each is loaded into an equivalent torch model, whose output must match the framework's within 1e-5.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

import torchgraft as tg
from torchgraft.cli import main as cli_main
from torchgraft.errors import CheckpointError

h5py = pytest.importorskip("h5py", reason="the Keras reader needs h5py (pip install 'torchgraft[keras]')")
msgpack = pytest.importorskip("msgpack", reason="the Flax reader needs msgpack (pip install 'torchgraft[flax]')")

TOL = 1e-5


# Keras -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"  # tensorflow is not needed (nor installed)
    keras = pytest.importorskip("keras", reason="Keras 3 is needed to write the Keras test files")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported with the {keras.backend.backend()!r} backend; these tests need 'torch'")
    return keras


def _keras_cnn(keras, names: dict[str, str] | None = None):
    names = names or {}
    inp = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name=names.get("conv"))(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same")(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(5, name=names.get("dense"))(x)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        weights = [rng.standard_normal(w.shape).astype("float32") * 0.5 for w in layer.get_weights()]
        if isinstance(layer, keras.layers.BatchNormalization):
            weights[3] = np.abs(weights[3]) + 0.5  # moving variance
        if weights:
            layer.set_weights(weights)
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)  # optimizer slots in the files, to be skipped
    return model


class TorchCNN(nn.Module):
    """The Keras CNN in torch: NCHW inside, Keras's channels-last flatten before the Dense layer."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 4, 3, padding=1)  # Keras padding="same", stride 1
        self.batch_normalization = nn.BatchNorm2d(4, eps=1e-3)  # Keras's epsilon
        self.depthwise_conv2d = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.dense = nn.Linear(6 * 6 * 8, 5)

    def forward(self, x_nhwc):
        x = self.depthwise_conv2d(self.batch_normalization(self.conv2d(x_nhwc.permute(0, 3, 1, 2))))
        return self.dense(x.permute(0, 2, 3, 1).flatten(1))


def _keras2_h5(model, path) -> None:
    """A legacy tf.keras 2 ``save_weights("x.h5")`` file, written with h5py in its documented layout
    (``layer_names``, per-layer ``weight_names`` with ``:0`` suffixes, ``depthwise_kernel``)."""
    names = {"DepthwiseConv2D": ["depthwise_kernel", "bias"]}
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        for layer in model.layers:
            g = f.create_group(layer.name)
            weights = layer.get_weights()
            var_names = names.get(type(layer).__name__) or [w.path.split("/")[-1] for w in layer.weights]
            wnames = [f"{layer.name}/{v}:0" for v in var_names[: len(weights)]]
            g.attrs["weight_names"] = np.array([w.encode() for w in wnames])
            for wname, value in zip(wnames, weights):
                g.create_dataset(wname, data=value)


@pytest.fixture(scope="module")
def keras_files(keras, tmp_path_factory):
    d = tmp_path_factory.mktemp("keras")
    model = _keras_cnn(keras)
    model.save(d / "cnn.keras")
    model.save_weights(d / "cnn.weights.h5")
    model.save(d / "cnn.h5")  # Keras 3 still writes the legacy HDF5 layout (with a deprecation warning)
    _keras2_h5(model, d / "cnn_keras2.h5")
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    return d, x, expected


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("cnn.keras", "keras"),
        ("cnn.weights.h5", "keras-weights-h5"),
        ("cnn.h5", "keras-legacy-h5"),
        ("cnn_keras2.h5", "keras-legacy-h5"),
    ],
)
def test_keras_files_load_into_torch_and_match_keras(keras_files, name, fmt):
    d, x, expected = keras_files
    with tg.open(d / name) as src:
        assert src.format == fmt
        assert {n for n in src if not n.startswith("batch_normalization.running")} == {
            n for n, _ in TorchCNN().named_parameters()
        }
        assert src["depthwise_conv2d.weight"].shape == (8, 1, 3, 3)
    model = TorchCNN().eval()
    report = tg.load(model, d / name, strict=True)
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)


class TorchSeq(nn.Module):
    """Keras Embedding -> Conv1D('same') -> LayerNormalization -> Dense, in torch (Conv1d wants (B, C, L))."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(10, 6)
        self.conv1d = nn.Conv1d(6, 4, 3, padding=1)
        self.layer_normalization = nn.LayerNorm(4, eps=1e-3)  # Keras's epsilon
        self.dense = nn.Linear(4, 3)

    def forward(self, ids):
        x = self.conv1d(self.embedding(ids).transpose(1, 2)).transpose(1, 2)
        return self.dense(self.layer_normalization(x))


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5", ".h5"])
def test_keras_sequence_model_conv1d_layernorm_embedding(keras, tmp_path, suffix):
    model = keras.Sequential(
        [
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(10, 6, name="embedding"),  # named as Keras 3 names their groups,
            keras.layers.Conv1D(4, 3, padding="same", name="conv1d"),  # so that the legacy file (which keeps
            keras.layers.LayerNormalization(name="layer_normalization"),  # the layers' own names) agrees
            keras.layers.Dense(3, name="dense"),
        ]
    )
    rng = np.random.default_rng(5)
    for layer in model.layers:
        layer.set_weights([rng.standard_normal(w.shape).astype("float32") for w in layer.get_weights()])
    ids = np.array([[1, 2, 3, 9, 0], [4, 4, 8, 7, 6]], dtype="int32")
    expected = keras.ops.convert_to_numpy(model(ids, training=False))
    path = tmp_path / f"seq{suffix}"
    model.save_weights(path) if suffix == ".weights.h5" else model.save(path)
    torch_model = TorchSeq().eval()
    tg.load(torch_model, path, strict=True)
    with torch.no_grad():
        out = torch_model(torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)


def test_keras_conversions_and_optimizer_slots_are_reported(keras, keras_files):
    d, _, _ = keras_files
    with tg.open(d / "cnn.keras") as src:
        conv = src.conversions
        assert "Dense 'kernel'" in conv["dense.weight"] and "[288, 5] -> [5, 288]" in conv["dense.weight"]
        assert "Conv2D" in conv["conv2d.weight"] and "[3, 3, 3, 4] -> [4, 3, 3, 3]" in conv["conv2d.weight"]
        assert "[3, 3, 4, 2] -> [8, 1, 3, 3]" in conv["depthwise_conv2d.weight"]
        assert "'moving_variance'" in conv["batch_normalization.running_var"]
        assert "conv2d.bias" not in conv  # unchanged entries are not listed
        assert src.skipped and all(k.startswith("optimizer/") for k in src.skipped)
        assert all("optimizer" in v for v in src.skipped.values())
        assert src.metadata["keras_version"] == keras.__version__
    with tg.open(d / "cnn.h5") as src:
        assert src.skipped and all(k.startswith("optimizer_weights/") for k in src.skipped)
        assert src.metadata["backend"] == "torch"


def test_keras_tensors_equal_across_the_four_files(keras_files):
    d, _, _ = keras_files
    files = ["cnn.keras", "cnn.weights.h5", "cnn.h5", "cnn_keras2.h5"]
    loaded = [{n: r.load() for n, r in tg.open(d / f).items()} for f in files]
    for other in loaded[1:]:
        assert other.keys() == loaded[0].keys()
        for n, t in loaded[0].items():
            assert torch.equal(other[n], t), n


def test_keras_open_reads_no_tensor_bytes(keras_files, monkeypatch):
    d, _, _ = keras_files
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key: reads.append(self.name) or original(self, key))
    for name in ("cnn.keras", "cnn.weights.h5", "cnn.h5"):
        with tg.open(d / name) as src:
            assert sum(r.nbytes for r in src.values()) > 0
            assert reads == []
            src["dense.weight"].load()
            assert len(reads) == 1
            reads.clear()


def test_keras_layer_config_decides_variable_names(keras, tmp_path):
    # Keras 3 stores variables by position; BatchNormalization(scale=False) has no gamma. The .keras
    # archive's config says so; a lone .weights.h5 has no config, so its positions are kept as they are
    inp = keras.Input((4,))
    out = keras.layers.BatchNormalization(scale=False, name="bn")(keras.layers.Dense(3, name="head")(inp))
    model = keras.Model(inp, out)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "w.weights.h5")
    with tg.open(tmp_path / "m.keras") as src:  # Keras 3 names groups by class: "head" is stored as "dense"
        assert sorted(src) == [
            "batch_normalization.bias", "batch_normalization.running_mean", "batch_normalization.running_var",
            "dense.bias", "dense.weight",
        ]  # fmt: skip
    with tg.open(tmp_path / "w.weights.h5") as src:
        assert {n for n in src if n.startswith("batch_normalization")} == {
            f"batch_normalization.vars.{i}" for i in range(3)
        }
        assert not any(n.startswith("batch_normalization") for n in src.conversions)
    model.save(tmp_path / "m.h5")  # the legacy layout keeps the layers' own names and variable names
    with tg.open(tmp_path / "m.h5") as src:
        assert sorted(src) == ["bn.bias", "bn.running_mean", "bn.running_var", "head.bias", "head.weight"]


def test_keras_inspect_cli_shows_format_tensors_dtypes(keras_files, capsys):
    d, _, _ = keras_files
    assert cli_main(["inspect", str(d / "cnn.keras")]) == 0
    out = capsys.readouterr().out
    assert "cnn.keras (keras)" in out and "tensors: 10" in out and "dtypes: float32" in out
    assert "weight  [5, 288] float32" in out


def test_scan_reports_keras_lambda_layers_as_code_never_run(keras, tmp_path):
    inp = keras.Input((4,))
    out = keras.layers.Dense(2)(keras.layers.Lambda(lambda t: t * 2, name="double")(inp))
    keras.Model(inp, out).save(tmp_path / "lam.keras")
    report = tg.scan(tmp_path / "lam.keras")
    note = report.files[0].note
    assert report.verdict == "safe"
    assert "1 Lambda layer(s) (double)" in note and "never runs it" in note
    assert report.files[0].format == "keras"


def _keras_zip(path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> None:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _weights_bytes(tmp_path) -> bytes:
    with h5py.File(tmp_path / "inner.h5", "w") as f:
        f.create_dataset("layers/dense/vars/0", data=np.ones((3, 2), "float32"))
        f.create_dataset("layers/dense/vars/1", data=np.ones(2, "float32"))
    return (tmp_path / "inner.h5").read_bytes()


@pytest.mark.parametrize(
    ("members", "match"),
    [
        ({"config.json": b"{}", "../model.weights.h5": b"x", "model.weights.h5": None}, r"unsafe path '\.\./model"),
        ({"config.json": b"{}", "model.weights.json": b"{}"}, r"no model\.weights\.h5 \(sharded"),
        ({"config.json": b"{not json", "model.weights.h5": None}, r"config\.json is not valid JSON"),
        ({"config.json": b"{}", "model.weights.h5": b"not hdf5 at all"}, r"not a readable HDF5 file"),
    ],
)
def test_keras_archive_sanity(tmp_path, members, match):
    inner = _weights_bytes(tmp_path)
    _keras_zip(tmp_path / "bad.keras", {k: inner if v is None else v for k, v in members.items()})
    with pytest.raises(CheckpointError, match=match):
        tg.open(tmp_path / "bad.keras")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_keras_archive_is_read_in_place(tmp_path, compression):
    inner = _weights_bytes(tmp_path)
    _keras_zip(tmp_path / "ok.keras", {"config.json": b"{}", "model.weights.h5": inner}, compression)
    with tg.open(tmp_path / "ok.keras") as src:
        assert torch.equal(src["dense.weight"].load(), torch.ones(2, 3))  # auto-named "dense": a Dense kernel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inner.h5", "ok.keras"]  # nothing extracted


def test_keras_nested_models(keras, tmp_path):
    block = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="inner"), keras.layers.BatchNormalization(name="norm")],
        name="block",
    )
    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(block(inp)))
    model.save(tmp_path / "n.keras")
    model.save(tmp_path / "n.h5")
    kernel = torch.from_numpy(block.layers[0].get_weights()[0]).T
    with tg.open(tmp_path / "n.keras") as src:  # Keras 3: groups named by class within each model
        assert torch.equal(src["sequential.dense.weight"].load(), kernel)
        assert src["dense.weight"].shape == (2, 3) and "sequential.batch_normalization.running_var" in src
    with tg.open(tmp_path / "n.h5") as src:  # legacy: the layers' own names
        assert torch.equal(src["block.inner.weight"].load(), kernel)
        assert src["head.weight"].shape == (2, 3) and "block.norm.running_var" in src


def test_keras_h5_links_into_other_files_are_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_dataset("secret", data=np.arange(4, dtype="float32"))
    with h5py.File(tmp_path / "link.weights.h5", "w") as f:
        f.create_group("layers/dense/vars")
        f["layers/dense/vars/0"] = h5py.ExternalLink(str(tmp_path / "other.h5"), "secret")
    with pytest.raises(CheckpointError, match=r"/layers/dense/vars/0 is an HDF5 ExternalLink"):
        tg.open(tmp_path / "link.weights.h5")
    (tmp_path / "raw.bin").write_bytes(np.arange(4, dtype="float32").tobytes())
    with h5py.File(tmp_path / "ext.weights.h5", "w") as f:
        f.create_dataset(
            "layers/dense/vars/0", shape=(4,), dtype="float32", external=[(str(tmp_path / "raw.bin"), 0, 16)]
        )
    with pytest.raises(CheckpointError, match=r"keeps its data in other files"):
        tg.open(tmp_path / "ext.weights.h5")


def test_keras_h5_errors(tmp_path):
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("x", data=np.ones(3))
    with pytest.raises(CheckpointError, match=r"not in a Keras layout"):
        tg.open(tmp_path / "plain.h5")
    assert tg.scan(tmp_path).files[0].format == "hdf5"  # a directory scan does not stop at a non-Keras .h5
    with h5py.File(tmp_path / "fill.weights.h5", "w") as f:  # declared, never written: a fill-value bomb
        f.create_dataset("layers/dense/vars/0", shape=(1 << 20, 1 << 10), dtype="float32", chunks=(1024, 1024))
        f.create_dataset("layers/dense/vars/1", data=np.ones(1 << 10, "float32"))
    with tg.open(tmp_path / "fill.weights.h5") as src:
        assert src["dense.weight"].shape == (1 << 10, 1 << 20)
        with pytest.raises(CheckpointError, match=r"declares 4294967296 bytes but stores only 0"):
            src["dense.weight"].load()
    with h5py.File(tmp_path / "names.weights.h5", "w") as f:
        f.create_dataset("layers/dense/vars/kernel", data=np.ones(3))
    with pytest.raises(CheckpointError, match=r"not numbered variables"):
        tg.open(tmp_path / "names.weights.h5")
    with h5py.File(tmp_path / "escape.h5", "w") as f:
        f.attrs["layer_names"] = np.array([b"dense"])
        f.create_group("dense").attrs["weight_names"] = np.array([b"../x/kernel:0"])
    with pytest.raises(CheckpointError, match=r"names a weight '\.\./x/kernel:0' outside its group"):
        tg.open(tmp_path / "escape.h5")


def test_keras_compressed_datasets_load_but_sparse_giants_are_refused(tmp_path):
    with h5py.File(tmp_path / "gz.weights.h5", "w") as f:  # zeros compress about 1000x: still a real tensor
        f.create_dataset("layers/dense/vars/0", data=np.zeros((512, 512), "float32"), compression="gzip")
        f.create_dataset("layers/dense/vars/1", data=np.zeros(512, "float32"))
        big = f.create_dataset("layers/dense_1/vars/0", shape=(1 << 20, 1 << 10), dtype="float32", chunks=(64, 1024))
        big[:64] = 1.0  # one chunk of 65536 written, 4 GiB declared
        f.create_dataset("layers/dense_1/vars/1", data=np.zeros(1 << 10, "float32"))
    with tg.open(tmp_path / "gz.weights.h5") as src:
        assert torch.equal(src["dense.weight"].load(), torch.zeros(512, 512))
        with pytest.raises(CheckpointError, match=r"dense_1/vars/0 declares 4294967296 bytes but stores only 262144"):
            src["dense_1.weight"].load()


def test_keras_big_endian_datasets_are_swapped(tmp_path):
    kernel = np.arange(6, dtype=">f4").reshape(3, 2)
    with h5py.File(tmp_path / "be.weights.h5", "w") as f:
        f.create_dataset("layers/dense/vars/0", data=kernel)
        f.create_dataset("layers/dense/vars/1", data=np.ones(2, ">f8"))
    with tg.open(tmp_path / "be.weights.h5") as src:
        assert torch.equal(src["dense.weight"].load(), torch.arange(6.0).reshape(3, 2).T)
        assert src["dense.bias"].dtype == "float64" and torch.equal(src["dense.bias"].load(), torch.ones(2).double())


def test_keras_truncated_file(tmp_path):
    inner = _weights_bytes(tmp_path)
    (tmp_path / "cut.weights.h5").write_bytes(inner[: len(inner) // 2])
    with pytest.raises(CheckpointError, match=r"keras-weights-h5"), tg.open(tmp_path / "cut.weights.h5") as src:
        for ref in src.values():
            ref.load()


def test_keras_without_h5py_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "w.weights.h5").write_bytes(_weights_bytes(tmp_path))
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(CheckpointError, match=r"needs the .h5py. package.*\n.*pip install 'torchgraft\[keras\]'"):
        tg.open(tmp_path / "w.weights.h5")


# Flax --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flax():
    flax = pytest.importorskip("flax", reason="flax (and jax) write the Flax test files: pip install flax")
    importlib.import_module("flax.linen")
    importlib.import_module("flax.serialization")
    return flax


def _flax_models(flax):
    fnn = flax.linen

    class FlaxCNN(fnn.Module):
        @fnn.compact
        def __call__(self, x):  # NHWC
            x = fnn.Conv(4, (3, 3), padding="SAME")(x)
            x = fnn.BatchNorm(use_running_average=True)(x)
            x = fnn.Conv(8, (3, 3), padding="SAME", feature_group_count=4)(x)  # depthwise, multiplier 2
            x = fnn.relu(x)
            return fnn.Dense(5)(x.reshape((x.shape[0], -1)))

    class FlaxMLP(fnn.Module):
        @fnn.compact
        def __call__(self, ids):
            x = fnn.LayerNorm()(fnn.Embed(10, 6)(ids))
            x = fnn.relu(fnn.Dense(7)(x))  # Dense_0: linen names modules in the order they are built
            return fnn.Dense(3)(x)

    return FlaxCNN(), FlaxMLP()


class TorchFlaxCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.Conv_0 = nn.Conv2d(3, 4, 3, padding=1)
        self.BatchNorm_0 = nn.BatchNorm2d(4, eps=1e-5)  # flax's default epsilon
        self.Conv_1 = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.Dense_0 = nn.Linear(6 * 6 * 8, 5)

    def forward(self, x_nhwc):
        x = torch.relu(self.Conv_1(self.BatchNorm_0(self.Conv_0(x_nhwc.permute(0, 3, 1, 2)))))
        return self.Dense_0(x.permute(0, 2, 3, 1).flatten(1))  # flax flattens channels-last


class TorchFlaxMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.Embed_0 = nn.Embedding(10, 6)
        self.LayerNorm_0 = nn.LayerNorm(6, eps=1e-6)  # flax's default epsilon
        self.Dense_0 = nn.Linear(6, 7)
        self.Dense_1 = nn.Linear(7, 3)

    def forward(self, ids):
        return self.Dense_1(torch.relu(self.Dense_0(self.LayerNorm_0(self.Embed_0(ids)))))


def _randomised(variables, seed: int):
    """Every leaf replaced by random values (variances positive), so no default can pass by chance."""
    rng = np.random.default_rng(seed)

    def walk(tree, path):
        if isinstance(tree, dict):
            return {k: walk(v, (*path, k)) for k, v in tree.items()}
        value = rng.standard_normal(np.shape(tree)).astype("float32") * 0.5
        return np.abs(value) + 0.5 if path[-1] == "var" else value

    return walk(dict(variables), ())


def test_flax_cnn_loads_into_torch_and_matches_flax(flax, tmp_path):
    import jax
    import jax.numpy as jnp

    cnn, _ = _flax_models(flax)
    x = np.random.default_rng(2).standard_normal((2, 6, 6, 3)).astype("float32")
    variables = _randomised(cnn.init(jax.random.PRNGKey(0), jnp.asarray(x)), 3)
    expected = np.asarray(cnn.apply(variables, jnp.asarray(x)))
    (tmp_path / "cnn.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    with tg.open(tmp_path / "cnn.msgpack") as src:
        assert src.format == "flax-msgpack"
        assert src["Conv_0.weight"].shape == (4, 3, 3, 3) and src["Conv_1.weight"].shape == (8, 1, 3, 3)
        assert "[3, 3, 3, 4] -> [4, 3, 3, 3]" in src.conversions["Conv_0.weight"]
        assert "[288, 5] -> [5, 288]" in src.conversions["Dense_0.weight"]
        assert "params/BatchNorm_0/scale" in src.conversions["BatchNorm_0.weight"]
        assert "batch_stats/BatchNorm_0/var" in src.conversions["BatchNorm_0.running_var"]
    model = TorchFlaxCNN().eval()
    report = tg.load(model, tmp_path / "cnn.msgpack", strict=True)
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)


def test_flax_mlp_loads_into_torch_and_matches_flax(flax, tmp_path):
    import jax
    import jax.numpy as jnp

    _, mlp = _flax_models(flax)
    ids = np.array([[1, 4, 9], [0, 2, 2]], dtype="int32")
    variables = _randomised(mlp.init(jax.random.PRNGKey(0), jnp.asarray(ids)), 4)
    expected = np.asarray(mlp.apply(variables, jnp.asarray(ids)))
    (tmp_path / "mlp.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    model = TorchFlaxMLP().eval()
    tg.load(model, tmp_path / "mlp.msgpack", strict=True)
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(out, expected, atol=TOL, rtol=0)
    with tg.open(tmp_path / "mlp.msgpack") as src:
        assert "renamed to 'weight'" in src.conversions["Embed_0.weight"]
        assert src["Embed_0.weight"].shape == (10, 6)


def test_flax_conv1d_kernels_are_converted_under_conv_modules_only(flax, tmp_path):
    import jax
    import jax.numpy as jnp

    fnn = flax.linen

    class Seq(fnn.Module):
        @fnn.compact
        def __call__(self, x):  # (B, L, C)
            x = fnn.Conv(4, (3,), padding="SAME")(x)
            return fnn.DenseGeneral((2, 3))(x)  # a 3-D kernel (4, 2, 3) with no torch layout

    x = np.random.default_rng(6).standard_normal((2, 7, 5)).astype("float32")
    variables = _randomised(Seq().init(jax.random.PRNGKey(0), jnp.asarray(x)), 7)
    expected = np.asarray(Seq().apply(variables, jnp.asarray(x)))
    (tmp_path / "seq.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    with tg.open(tmp_path / "seq.msgpack") as src:
        assert src["Conv_0.weight"].shape == (4, 5, 3)
        assert src["DenseGeneral_0.weight"].shape == (4, 2, 3)
        assert "left as stored" in src.conversions["DenseGeneral_0.weight"]
        conv = nn.Conv1d(5, 4, 3, padding=1)
        tg.load(conv, {k.removeprefix("Conv_0."): v.load() for k, v in src.items() if k.startswith("Conv_0.")})
        kernel, bias = src["DenseGeneral_0.weight"].load(), src["DenseGeneral_0.bias"].load()
    with torch.no_grad():
        h = conv(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2)
        out = torch.einsum("blc,cij->blij", h, kernel) + bias
    np.testing.assert_allclose(out.numpy(), expected, atol=TOL, rtol=0)


def test_flax_chunked_arrays_and_train_state(flax, tmp_path, monkeypatch):
    # flax splits arrays above MAX_CHUNK_SIZE into chunks; make that tiny to write a chunked file for real
    monkeypatch.setattr(flax.serialization, "MAX_CHUNK_SIZE", 64)
    kernel = np.arange(20 * 10, dtype="float32").reshape(20, 10)
    state = {
        "step": 7,
        "params": {"Dense_0": {"kernel": kernel, "bias": np.ones(10, "float32")}},
        "opt_state": {"0": {"mu": {"Dense_0": {"kernel": np.zeros((20, 10), "float32")}}}},
    }
    data = flax.serialization.msgpack_serialize(state)
    assert b"__msgpack_chunked_array__" in data
    (tmp_path / "state.msgpack").write_bytes(data)
    with tg.open(tmp_path / "state.msgpack") as src:
        assert sorted(src) == ["Dense_0.bias", "Dense_0.weight"]
        assert torch.equal(src["Dense_0.weight"].load(), torch.from_numpy(kernel).T)
        assert src.skipped["step"] == "flax collection 'step' (int, not a model weight)"
        assert "optimizer state" in src.skipped["opt_state/0/mu/Dense_0/kernel"]


def _ext_array(shape, dtype: str, data: bytes) -> msgpack.ExtType:
    return msgpack.ExtType(1, msgpack.packb((list(shape), dtype, data), use_bin_type=True))


def test_flax_reader_needs_no_flax(tmp_path, monkeypatch):
    # written with plain msgpack in flax's format; reading must not import flax or jax
    monkeypatch.setitem(sys.modules, "flax", None)
    monkeypatch.setitem(sys.modules, "jax", None)
    tree = {
        "params": {"Conv_0": {"kernel": _ext_array((1, 1, 2, 3), "float32", np.arange(6, dtype="float32").tobytes())}}
    }
    (tmp_path / "m.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))
    with tg.open(tmp_path / "m.msgpack") as src:
        expected = torch.arange(6, dtype=torch.float32).reshape(1, 1, 2, 3).permute(3, 2, 0, 1)
        assert torch.equal(src["Conv_0.weight"].load(), expected)


def test_flax_bfloat16_and_scalars(tmp_path):
    values = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    tree = {
        "w": _ext_array((3,), "bfloat16", values.view(torch.int16).numpy().tobytes()),
        "s": msgpack.ExtType(3, msgpack.packb(([], "int32", np.int32(4).tobytes()), use_bin_type=True)),
        "c": msgpack.ExtType(2, msgpack.packb((1.0, 2.0))),
    }
    (tmp_path / "b.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))
    with tg.open(tmp_path / "b.msgpack") as src:
        assert src["w"].dtype == "bfloat16" and torch.equal(src["w"].load(), values)
        assert src["s"].shape == () and src["s"].load().item() == 4
        assert src.skipped == {"c": "complex"}


def test_flax_bool_arrays_are_valid_bools(tmp_path):
    (tmp_path / "b.msgpack").write_bytes(msgpack.packb({"m": _ext_array((3,), "bool", b"\x00\x01\x07")}))
    with tg.open(tmp_path / "b.msgpack") as src:
        assert src["m"].load().tolist() == [False, True, True]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (lambda: msgpack.packb({"a": msgpack.ExtType(9, b"xx")}), r"unknown msgpack extension type 9"),
        (
            lambda: msgpack.packb({"a": _ext_array((1 << 40,), "float32", b"\0" * 8)}),
            r"needs 4398046511104 bytes but holds 8",
        ),
        (lambda: msgpack.packb({"a": _ext_array((2,), "object", b"\0" * 16)}), r"unsupported dtype 'object'"),
        (lambda: msgpack.packb({"a": _ext_array((-1,), "float32", b"")}), r"invalid shape \[-1\]"),
        (lambda: msgpack.packb({"a": msgpack.ExtType(1, b"\x93\x91\x01")}), r"array extension is not valid msgpack"),
        (lambda: msgpack.packb([1, 2]), r"holds a msgpack list, not a dict"),
        (lambda: b"\x81\xa1a\xdd\xff\xff\xff\xff", r"not a valid msgpack file"),  # 4G-element array declared
        (lambda: b"\x81\xa1a\xc6\x7f\xff\xff\xff", r"not a valid msgpack file"),  # 2 GiB bin declared
        (lambda: b"\x81\xa1a" + b"\x81\xa1a" * 5000 + b"\xc0", r"nested too deeply"),
        (lambda: msgpack.packb({"a": {"b": 1}})[:-1], r"not a valid msgpack file"),  # truncated
    ],
)
def test_flax_hostile_inputs(tmp_path, payload, match):
    (tmp_path / "bad.msgpack").write_bytes(payload())
    with pytest.raises(CheckpointError, match=match):
        tg.open(tmp_path / "bad.msgpack", format="flax")


def test_flax_without_msgpack_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "m.msgpack").write_bytes(msgpack.packb({"a": 1}))
    monkeypatch.setitem(sys.modules, "msgpack", None)
    with pytest.raises(CheckpointError, match=r"needs the .msgpack. package.*\n.*pip install 'torchgraft\[flax\]'"):
        tg.open(tmp_path / "m.msgpack")


def test_flax_inspect_and_scan(tmp_path, capsys):
    tree = {"params": {"Dense_0": {"kernel": _ext_array((2, 3), "float16", b"\0" * 12)}}}
    (tmp_path / "m.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))
    assert cli_main(["inspect", str(tmp_path / "m.msgpack")]) == 0
    out = capsys.readouterr().out
    assert "(flax-msgpack)" in out and "tensors: 1" in out and "dtypes: float16" in out and "weight  [3, 2]" in out
    report = tg.scan(tmp_path / "m.msgpack")
    assert report.verdict == "safe" and "data only" in report.files[0].note


def test_msgpack_files_with_other_extensions_are_not_sniffed_as_flax(tmp_path):
    (tmp_path / "m.bin").write_bytes(msgpack.packb({"a": 1}))  # 0x81: not a pickle either
    with pytest.raises(CheckpointError):
        tg.open(tmp_path / "m.bin")
    assert tg.open(tmp_path / "m.bin", format="flax").skipped == {"a": "int"}


# Fuzzing: every mutation of a valid file opens and loads, or raises CheckpointError -------------------

_FUZZ_CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
import torchgraft as tg
out = {}
for path in sys.argv[1:]:
    try:
        with tg.open(path) as src:
            for ref in src.values():
                ref.load()
        out[path] = "ok"
    except tg.CheckpointError:
        out[path] = "error"
    except BaseException as e:
        out[path] = f"escaped {type(e).__name__}: {str(e)[:300]}"
print(json.dumps(out))
"""


def _mutations(data: bytes, count: int, seed: int) -> list[bytes]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(count):
        b = bytearray(data)
        if i % 4 == 0:
            b = b[: rng.randrange(1, len(b))]  # truncated
        else:
            for _ in range(rng.randint(1, 8)):  # bytes overwritten, some with "large" values
                b[rng.randrange(len(b))] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        out.append(bytes(b))
    return out


def _fuzz(tmp_path, data: bytes, suffix: str, count: int, seed: int) -> dict[str, str]:
    import subprocess

    paths = []
    for i, mutated in enumerate(_mutations(data, count, seed)):
        paths.append(str(tmp_path / f"m{i}{suffix}"))
        (tmp_path / f"m{i}{suffix}").write_bytes(mutated)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    run = subprocess.run(
        [sys.executable, "-c", _FUZZ_CHILD, *paths], capture_output=True, text=True, timeout=300, env=env, check=False
    )
    assert run.returncode == 0, f"the reader crashed: rc={run.returncode}\n{run.stderr[-2000:]}"
    return json.loads(run.stdout.splitlines()[-1])


def test_fuzzed_keras_files_raise_checkpoint_error_or_load(tmp_path):
    (tmp_path / "seed").mkdir()
    data = _weights_bytes(tmp_path / "seed")
    results = _fuzz(tmp_path, data, ".weights.h5", 120, seed=15)
    escaped = {p: r for p, r in results.items() if r not in ("ok", "error")}
    assert not escaped, escaped
    assert "error" in results.values()  # the mutations do break files


def test_fuzzed_flax_files_raise_checkpoint_error_or_load(tmp_path):
    layer = {"kernel": _ext_array((8, 4), "float32", bytes(128)), "bias": _ext_array((4,), "float16", bytes(8))}
    data = msgpack.packb({"params": {"Dense_0": layer}, "batch_stats": {}, "step": 3}, use_bin_type=True)
    results = _fuzz(tmp_path, data, ".msgpack", 300, seed=15)
    escaped = {p: r for p, r in results.items() if r not in ("ok", "error")}
    assert not escaped, escaped
    assert "error" in results.values()


def test_reader_conversions_are_reported_per_model_entry(tmp_path):
    """What the reader changed to reach torch's layout is in the report, under the model's names."""
    keras = pytest.importorskip("keras")
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2, name="fc")(inputs)
    km = keras.Model(inputs, outputs)
    path = tmp_path / "m.weights.h5"
    km.save_weights(path)
    model = torch.nn.Module()
    model.fc = torch.nn.Linear(3, 2)
    report = tg.load(model, path, align=True)
    assert set(report.converted) == {"fc.weight"} and "transpos" in report.converted["fc.weight"].lower()
    assert report.to_dict()["converted"] == report.converted and "converted by the reader" in str(report)
    assert torch.equal(model.fc.weight, torch.from_numpy(km.get_layer("fc").kernel.numpy().T.copy()))
