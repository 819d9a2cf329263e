"""Data is never code: every file the project reads from a user is parsed by a reader that cannot run it.

Each test feeds a loader a crafted file (real files in tmp dirs): a pickle whose ``__reduce__`` would create a
marker file, or a file of odd types. Nothing may run (the marker never exists) and the error is one line naming
the file. See docs/security.md for the list of inputs.
"""
import gzip
import io
import json
import os
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch


class RunsCode:
    """Unpickled by a loader that runs code, it calls ``open(marker, "w")``: the marker file then exists."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload(marker, protocol: int = pickle.DEFAULT_PROTOCOL) -> bytes:
    return pickle.dumps({"data": RunsCode(marker), "labels": [0]}, protocol=protocol)


def assert_one_line_naming(exc: BaseException, path, *words: str) -> None:
    text = str(exc)
    assert len(text.splitlines()) == 1 and str(path) in text, text
    assert all(w in text for w in words), text


# -- CIFAR-10 python batches ------------------------------------------------------------------------------
def _s(raw: bytes) -> bytes:
    """A Python 2 byte string in a protocol-2 pickle (SHORT_BINSTRING or BINSTRING)."""
    return b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw


def py2_cifar_batch(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A batch opcode for opcode as the published CIFAR-10/100 python files hold it (Python 2 cPickle,
    protocol 2): a dict of byte strings, a uint8 array through numpy.core.multiarray._reconstruct, int lists."""
    rows, cols = data.shape
    dtype = (b"cnumpy\ndtype\n" + _s(b"u1") + b"K\x00K\x01\x87R(K\x03" + _s(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _s(b"b") + b"\x87R(K\x01"
             + b"M" + struct.pack("<H", rows) + b"M" + struct.pack("<H", cols) + b"\x86" + dtype + b"\x89"
             + _s(data.tobytes()) + b"tb")
    ints = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    names = b"](" + b"".join(_s(f"img_{i}.png".encode()) for i in range(rows)) + b"e"
    return (b"\x80\x02}(" + _s(b"batch_label") + _s(b"training batch 1 of 5") + _s(label_key) + ints
            + _s(b"data") + array + _s(b"filenames") + names + b"u.")


def write_cifar_folder(root, batch=lambda name, data, labels: pickle.dumps({"data": data, "labels": labels})):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data, labels = rng.integers(0, 256, (10, 3072), dtype=np.uint8), list(range(10))
        (folder / name).write_bytes(batch(name, data, labels))
        written[name] = data, labels
    return folder, written


def test_dwf_zoo_refuses_a_cifar_batch_that_would_run_code(tmp_path):
    """The issue's case: `dwf zoo --preset cifar10-resnet18 --set zoo.data_root=...` on a crafted batch."""
    marker = tmp_path / "marker"
    folder, _ = write_cifar_folder(tmp_path / "data")
    (folder / "data_batch_2").write_bytes(payload(marker))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "dwf_ray.cli", "zoo", "--preset", "cifar10-resnet18", "--set",
                           f"zoo.data_root={tmp_path / 'data'}", "--root", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert not marker.exists(), "the pickle's payload ran"
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dwf: error:"), proc.stderr
    assert str(folder / "data_batch_2") in lines[0] and "io.open" in lines[0], lines[0]
    assert not (tmp_path / "run" / "zoo" / "_SUCCESS").exists()


@pytest.mark.parametrize("layout", ["python2", "protocol2", "protocol4", "protocol5", "bytes-keys"])
def test_cifar_batches_as_they_are_published_or_rewritten_still_load(tmp_path, layout):
    from dwf_ray.data.folders import load_cifar10

    def batch(name, data, labels):
        if layout == "python2":
            return py2_cifar_batch(data, labels)
        if layout == "bytes-keys":
            return pickle.dumps({b"data": data, b"labels": labels, b"filenames": [b"a.png"]}, protocol=2)
        return pickle.dumps({"data": data, "labels": labels, "batch_label": name}, protocol=int(layout[-1]))

    _, written = write_cifar_folder(tmp_path, batch)
    (train_x, train_y), (test_x, test_y) = load_cifar10(str(tmp_path))
    assert np.array_equal(train_x[:10].reshape(10, -1), written["data_batch_1"][0])
    assert np.array_equal(test_x.reshape(10, -1), written["test_batch"][0]) and test_y.tolist() == list(range(10))


def test_cifar100_fine_and_coarse_labels_read_through_the_same_unpickler(tmp_path):
    from dwf_ray.data.folders import load_pickled_batch
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = load_pickled_batch(py2_cifar_batch(data, [7, 99], b"fine_labels"), "train")
    assert np.array_equal(batch["data"], data) and batch["fine_labels"] == [7, 99]
    assert batch["filenames"] == ["img_0.png", "img_1.png"]


@pytest.mark.parametrize("crafted, asked", [
    (lambda m: payload(m, 0), "io.open"),
    (lambda m: payload(m, 2), "io.open"),
    (lambda m: payload(m, 5), "io.open"),
    (lambda m: f"cos\nsystem\n(S'touch {m}'\ntR.".encode(), "os.system"),            # protocol 0, by hand
    (lambda m: pickle.dumps({"data": np.array([RunsCode(m)], dtype=object)}), "io.open"),   # in an array
    (lambda m: pickle.dumps({"data": pickle.loads}), "_pickle.loads"),
])
def test_cifar_pickles_asking_for_anything_else_are_refused_naming_file_and_global(tmp_path, crafted, asked):
    from dwf_ray.data.folders import load_cifar10
    marker = tmp_path / "marker"
    folder, _ = write_cifar_folder(tmp_path)
    (folder / "test_batch").write_bytes(crafted(marker))
    with pytest.raises(PermissionError) as info:
        load_cifar10(str(tmp_path))
    assert not marker.exists()
    assert isinstance(info.value, ValueError)
    assert_one_line_naming(info.value, folder / "test_batch", f"global {asked}")


def test_malformed_cifar_batches_are_one_line_naming_the_file(tmp_path):
    from dwf_ray.data.folders import load_cifar10
    folder, _ = write_cifar_folder(tmp_path)
    for raw, words in [(b"\x80\x02}q\x00(", "EOFError"), (pickle.dumps([1, 2]), "a pickled list"),
                       (pickle.dumps({"data": "x" * 10, "labels": [1]}), "not a CIFAR-10 python batch"),
                       (pickle.dumps({"labels": [1]}), "KeyError")]:
        (folder / "data_batch_1").write_bytes(raw)
        with pytest.raises(ValueError) as info:
            load_cifar10(str(tmp_path))
        assert_one_line_naming(info.value, folder / "data_batch_1", words)


# -- the other dataset files ------------------------------------------------------------------------------
def test_mnist_idx_and_stl10_binary_files_are_read_as_bytes_only(tmp_path):
    from dwf_ray.data.folders import load_mnist, load_stl10
    marker = tmp_path / "marker"
    raw = payload(marker)
    mnist = tmp_path / "MNIST" / "raw"
    mnist.mkdir(parents=True)
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"]:
        (mnist / f"{name}.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError) as info:
        load_mnist(str(tmp_path))
    assert_one_line_naming(info.value, mnist / "train-images-idx3-ubyte.gz", "not an IDX file")
    for cut in (b"\x1f\x8b" + raw, gzip.compress(raw)[:-9], gzip.compress(raw)[:12] + raw):
        (mnist / "train-images-idx3-ubyte.gz").write_bytes(cut)
        with pytest.raises(ValueError) as info:
            load_mnist(str(tmp_path))
        assert_one_line_naming(info.value, mnist / "train-images-idx3-ubyte.gz", "not a readable gzip file")
    stl = tmp_path / "stl10_binary"
    stl.mkdir()
    for name in ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]:
        (stl / name).write_bytes(raw)
    with pytest.raises(ValueError) as info:
        load_stl10(str(tmp_path))
    assert_one_line_naming(info.value, stl / "train_X.bin", "3x96x96")
    assert not marker.exists()


def _parquet_with_pickled_extension_type(path, marker) -> None:
    """A Parquet file whose text column declares pyarrow's old pickle-based extension type, the payload in its
    metadata: a reader that deserialised it (pyarrow < 14.0.1) would run the payload."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    field = pa.field("text", pa.string(), metadata={b"ARROW:extension:name": b"arrow.py_extension_type",
                                                    b"ARROW:extension:metadata": pickle.dumps(RunsCode(marker))})
    table = pa.table({"text": ["good soup", "cold soup"], "label": [1, 0]})
    pq.write_table(table.cast(pa.schema([field, pa.field("label", pa.int64())])), path)


def test_parquet_text_files_and_manifests_never_unpickle(tmp_path):
    from dwf_ray import store
    from dwf_ray.data.text import read_parquet_texts
    marker = tmp_path / "marker"
    crafted = tmp_path / "train.parquet"
    _parquet_with_pickled_extension_type(crafted, marker)
    texts, labels = read_parquet_texts([str(crafted)])
    assert texts.tolist() == ["good soup", "cold soup"] and labels.tolist() == [1, 0]
    assert store.read_table(str(crafted))["label"].tolist() == [1, 0]     # how every manifest is read
    (tmp_path / "test.parquet").write_bytes(payload(marker))
    with pytest.raises(ValueError) as info:
        read_parquet_texts([str(tmp_path / "test.parquet")])
    assert_one_line_naming(info.value, tmp_path / "test.parquet", "not a readable Parquet file")
    assert not marker.exists()


@pytest.mark.parametrize("content", [
    lambda m: payload(m),
    lambda m: json.dumps({"version": "1.0", "model": 5}).encode(),
    lambda m: json.dumps({"model": {"type": "WordLevel", "vocab": {"[PAD]": "zero"}, "unk_token": 1}}).encode(),
    lambda m: json.dumps([1, 2, 3]).encode(),
])
def test_tokenizer_files_of_odd_types_are_one_line_naming_the_file(tmp_path, content):
    from dwf_ray.data.text import load_tokenizer
    marker = tmp_path / "marker"
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content(marker))
    with pytest.raises(ValueError) as info:
        load_tokenizer(str(path), 16)
    assert_one_line_naming(info.value, path, "not a tokenizers JSON file")
    assert not marker.exists()


# -- checkpoints ------------------------------------------------------------------------------------------
def test_torch_state_dicts_with_a_pickled_object_are_refused_naming_the_global(tmp_path):
    from dwf_ray.weights import CheckpointError, load_checkpoint
    from dwf_ray.zoo.formats import scan
    marker = tmp_path / "marker"
    hf = tmp_path / "src" / "bert-a"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
    crafted = {"plain.pt": {"w": torch.zeros(2), "hook": RunsCode(marker)},
               "wrapped.pth": {"state_dict": {"w": torch.zeros(2)}, "extra": RunsCode(marker)}}
    for name, obj in crafted.items():
        torch.save(obj, tmp_path / "src" / name)
    torch.save({"w": torch.zeros(2), "hook": RunsCode(marker)}, hf / "pytorch_model.bin")
    found = scan(str(tmp_path / "src"), infer=False)
    assert sorted(f.name for f in found) == ["bert-a", "plain.pt", "wrapped.pth"]
    for f in found:
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(f.uri)
        assert_one_line_naming(info.value, f.uri, "refused", "io.open", "nothing in it was run")
    assert not marker.exists()


def _safetensors(header) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 16


@pytest.mark.parametrize("header, words", [
    ([1, 2], "a JSON list"),
    ({"__metadata__": {"arch": {"family": "mlp"}}}, "__metadata__ must map names to strings"),
    ({"__metadata__": ["x"]}, "__metadata__ must map names to strings"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": "0-8"}}, "data_offsets"),
    ({"w": 5}, "data_offsets"),
])
def test_safetensors_headers_of_odd_types_are_one_line_naming_the_file(tmp_path, header, words):
    from dwf_ray.weights import CheckpointError, load_checkpoint, read_header
    path = tmp_path / "odd.safetensors"
    path.write_bytes(_safetensors(header))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path))
    assert_one_line_naming(info.value, path, words)
    if not isinstance(header, list) and "w" not in header:
        with pytest.raises(CheckpointError, match="must map names to strings"):
            read_header(str(path))


def test_arch_metadata_and_hf_configs_of_odd_types_are_one_line_naming_the_file(tmp_path):
    from safetensors.numpy import save
    from dwf_ray.weights import CheckpointError, load_model_state
    from dwf_ray.zoo.formats import FormatError, infer_arch, scan
    for arch in ['"mlp"', '{"family": "mlp", "args": [1, 2]}', "[]", "not json"]:
        path = tmp_path / "m.safetensors"
        path.write_bytes(save({"w": np.zeros(2, np.float32)}, metadata={"arch": arch}))
        with pytest.raises(CheckpointError) as info:
            load_model_state(str(path))
        assert_one_line_naming(info.value, path, "ArchSpec in its metadata")
    hf = tmp_path / "hf" / "model"
    hf.mkdir(parents=True)
    (hf / "model.safetensors").write_bytes(save({"w": np.zeros(2, np.float32)}))
    for config in [{"model_type": ["bert"]}, {"model_type": {"a": 1}}, {"model_type": None}]:
        (hf / "config.json").write_text(json.dumps(config))
        with pytest.raises(FormatError) as info:
            infer_arch(str(tmp_path / "hf"))
        assert_one_line_naming(info.value, hf / "config.json", "is not supported")
    for config in ["[1]", '"bert"', "{not json"]:
        (hf / "config.json").write_text(config)
        found = scan(str(tmp_path / "hf"))
        assert len(found) == 1 and found[0].arch is None
        assert_one_line_naming(found[0].error, hf / "config.json", "unreadable config.json")


# -- configs and run roots --------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ['[1, 2]', '{"base": 5}', '{"set": [1]}', '{"set": {"zoo.n_models": "many"}}',
                                  '{"base": "preset.json"}', '"digits-mlp"'])
def test_preset_files_of_odd_types_are_one_line_naming_the_file(tmp_path, spec):
    from dwf_ray.presets import preset
    path = tmp_path / "preset.json"
    path.write_text(spec)
    with pytest.raises(ValueError) as info:
        preset(str(path))
    assert_one_line_naming(info.value, path)


def test_a_run_root_on_s3_whose_flow_checkpoint_would_run_code_is_refused(tmp_path, s3_server):
    """A run root served or evaluated from S3: its flow checkpoint and manifests are data too."""
    from dwf_ray import store
    from dwf_ray.sample.generator import Generator
    marker = tmp_path / "marker"
    root = f"s3://{s3_server()}/runs/crafted"
    buf = io.BytesIO()
    torch.save({"ema": {}, "config": RunsCode(marker), "dim": 2}, buf)
    store.write_bytes(store.join(root, "flow", "model.pt"), buf.getvalue())
    _parquet_with_pickled_extension_type(tmp_path / "manifest.parquet", marker)
    store.write_bytes(store.join(root, "samples", "manifest.parquet"), (tmp_path / "manifest.parquet").read_bytes())
    with pytest.raises(Exception, match="io.open"):
        Generator.load(root)
    assert store.read_table(store.join(root, "samples", "manifest.parquet"))["label"].tolist() == [1, 0]
    assert not marker.exists()
