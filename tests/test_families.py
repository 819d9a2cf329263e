"""Datasets (generated text, torchvision folders, Parquet text), the family presets and their full-size shapes."""
import gzip
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from dwf_ray import store
from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.config import EvalConfig, ZooConfig
from dwf_ray.data import dataset_for, input_shape, load_dataset
from dwf_ray.data.folders import read_idx
from dwf_ray.data.text import SYNTH_VOCAB_SIZE, build_tokenizer, encode, synth_reviews
from dwf_ray.presets import FULL_SIZE, preset
from dwf_ray.weights import WeightLayout
from dwf_ray.zoo import check_arch_fits_data
from tests.presets import smoke_bert


# -- the generated text task and the tokenizer ---------------------------------------------------------
def test_text_synth_is_seeded_tokenized_and_balanced():
    a, b = load_dataset("text-synth"), load_dataset("text-synth", args_json=json.dumps({"seed": 1}))
    assert a.input_shape == (20,) and a.n_classes == 2 and a.vocab_size == SYNTH_VOCAB_SIZE == 107
    assert len(a.train) == 3600 and len(a.val) == 1200 and len(a.test) == 1200
    x = a.train.x
    assert x.dtype == torch.int64 and (x[:, 0] == 2).all()            # [CLS] first
    assert x.min() >= 0 and x.max() < a.vocab_size
    pads = x == 0
    assert (pads[:, 1:].int() >= pads[:, :-1].int()).all()             # padding only at the end
    assert 0.4 < float(a.train.y.float().mean()) < 0.6
    again = load_dataset.__wrapped__("text-synth")
    assert torch.equal(again.train.x, a.train.x) and torch.equal(again.test.y, a.test.y)
    assert not torch.equal(b.train.x, a.train.x)


def test_text_synth_labels_follow_the_text_up_to_the_stated_noise():
    texts, clean = synth_reviews(4000, seed=3, label_noise=0.0)
    same_texts, noisy = synth_reviews(4000, seed=3, label_noise=0.1)
    assert (texts == same_texts).all()
    assert 0.08 < (clean != noisy).mean() < 0.12
    # negation flips a clause; the clause after "but" decides
    for text, label in zip(texts, clean):
        words = text.split()
        if words[0] == "the" and " but " not in text and " and " not in text and "although" not in text:
            negated = bool({"not", "never", "hardly"} & set(words))
            positive = words[-1] in {"good", "great", "excellent", "tasty", "friendly", "lovely", "fresh", "amazing",
                                     "perfect", "nice", "pleasant", "superb", "delightful", "wonderful", "clean",
                                     "cozy", "generous", "fair", "quick", "charming"}
            assert label == int(positive != negated), text


def test_word_tokenizer_pads_truncates_and_maps_unknown_words(tmp_path):
    tok = build_tokenizer(["The soup was cold", "the soup was GOOD , not cold"], vocab_size=100, max_len=6)
    ids = encode(tok, ["the soup was cold", "THE SOUP was purple and cold and good"])
    vocab = tok.get_vocab()
    assert ids.shape == (2, 6) and ids.dtype == np.int64
    assert ids[0].tolist() == [2, vocab["the"], vocab["soup"], vocab["was"], vocab["cold"], 0]
    assert ids[1].tolist()[:5] == [2, vocab["the"], vocab["soup"], vocab["was"], 1]   # "purple": [UNK], then cut
    # a saved tokenizer file (e.g. a WordPiece vocabulary) is used as given
    (tmp_path / "tok.json").write_text(tok.to_str())
    given = load_dataset("text-synth", args_json=json.dumps({"n": 300}))
    with_file = load_dataset("text-synth", args_json=json.dumps({"n": 300, "tokenizer": str(tmp_path / "tok.json"),
                                                                  "max_len": 6}))
    assert with_file.vocab_size == tok.get_vocab_size() and with_file.train.x.shape[1] == 6
    assert (with_file.train.x == 1).any() and not (given.train.x == 1).any()    # words unknown to the file


def test_unknown_dataset_or_argument_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
        dataset_for(ZooConfig(dataset="cifar11"))
    with pytest.raises(ValueError, match=r"has no arguments \['max_lenn'\]"):
        dataset_for(ZooConfig(dataset="text-synth", dataset_args={"max_lenn": 3}))
    with pytest.raises(ValueError, match="set zoo.data_root"):
        dataset_for(ZooConfig(dataset="cifar10"))


# -- datasets in torchvision's on-disk formats, tiny real files ---------------------------------------
def write_cifar10(root, n_per_batch: int = 20, seed: int = 0) -> dict:
    """A tiny CIFAR-10 in torchvision's layout: cifar-10-batches-py/data_batch_1..5, test_batch (pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n_per_batch) % 10]
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels, "batch_label": name}))
        batches[name] = (data, labels)
    return batches


def test_cifar10_folder_loader(tmp_path):
    batches = write_cifar10(tmp_path)
    cfg = ZooConfig(dataset="cifar10", data_root=str(tmp_path))
    d = dataset_for(cfg)
    assert d.input_shape == (3, 32, 32) == input_shape(cfg) and d.n_classes == 10
    assert len(d.train) == 90 and len(d.val) == 10 and len(d.test) == 20       # val: 10 % of the train set
    assert torch.bincount(d.val.y).tolist() == [1] * 10                         # stratified
    assert d.train.x.mean((0, 2, 3)).abs().max() < 1e-4                         # per-channel standardised
    assert (d.train.x.std((0, 2, 3)) - 1).abs().max() < 1e-2
    # the official test batch, in file order, through the same affine map per channel
    raw = torch.from_numpy(batches["test_batch"][0].reshape(-1, 3, 32, 32).astype(np.float32))
    corr = np.corrcoef(raw[:, 1].flatten(), d.test.x[:, 1].flatten())[0, 1]
    assert corr > 0.9999 and d.test.y.tolist() == batches["test_batch"][1]
    # the data_root may also be the batches folder itself; classes relabelled
    sub = dataset_for(ZooConfig(dataset="cifar10", data_root=str(tmp_path / "cifar-10-batches-py"), classes=[3, 5]))
    assert sub.n_classes == 2 and set(sub.test.y.tolist()) == {0, 1} and len(sub.test) == 4


def test_cifar10_missing_or_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py"):
        dataset_for(ZooConfig(dataset="cifar10", data_root=str(tmp_path / "nothing")))
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10 python batch"):
        load_dataset("cifar10", data_root=str(tmp_path))


def test_cifar10_from_s3_is_cached_locally(tmp_path, s3_server, monkeypatch):
    monkeypatch.setenv("DWF_DATA_CACHE", str(tmp_path / "cache"))
    write_cifar10(tmp_path / "src")
    bucket = s3_server()
    for f in sorted((tmp_path / "src" / "cifar-10-batches-py").iterdir()):
        store.write_bytes(f"s3://{bucket}/datasets/cifar-10-batches-py/{f.name}", f.read_bytes())
    remote = load_dataset("cifar10", data_root=f"s3://{bucket}/datasets")
    local = load_dataset("cifar10", data_root=str(tmp_path / "src"))
    assert torch.equal(remote.train.x, local.train.x) and torch.equal(remote.test.y, local.test.y)
    assert len(list((tmp_path / "cache").iterdir())) == 6


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_mnist_idx_loader_plain_and_gzipped(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, test_x = rng.integers(0, 256, (100, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    (raw / "train-images-idx3-ubyte").write_bytes(_idx(train_x))
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(100) % 10)))
    (raw / "t10k-images-idx3-ubyte").write_bytes(_idx(test_x))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.arange(10)))
    assert (read_idx(str(raw / "t10k-images-idx3-ubyte")) == test_x).all()
    d = dataset_for(ZooConfig(dataset="mnist", data_root=str(tmp_path)))
    assert d.input_shape == (1, 28, 28) and len(d.train) == 90 and len(d.val) == 10 and d.test.y.tolist() == list(range(10))
    with pytest.raises(ValueError, match="the val split is empty"):
        load_dataset("mnist", data_root=str(tmp_path), args_json=json.dumps({"val_fraction": 0.01}))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.arange(9)))
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: 10 images but 9 labels"):
        load_dataset("mnist", data_root=str(tmp_path))


def test_stl10_binary_loader_reads_column_major_images(tmp_path):
    from dwf_ray.data.folders import load_stl10
    rng = np.random.default_rng(0)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for s, n in (("train", 100), ("test", 10))}
    for s, x in images.items():
        (folder / f"{s}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())    # STL-10 stores columns first
        (folder / f"{s}_y.bin").write_bytes((np.arange(len(x)) % 10 + 1).astype(np.uint8).tobytes())
    (train_x, train_y), (test_x, test_y) = load_stl10(str(tmp_path))
    assert (train_x == images["train"]).all() and (test_x == images["test"]).all()
    assert train_y.min() == 0 and train_y.max() == 9
    d = dataset_for(ZooConfig(dataset="stl10", data_root=str(tmp_path)))
    assert d.input_shape == (3, 96, 96) and len(d.test) == 10


def test_text_parquet_loader(tmp_path):
    train = pd.DataFrame({"text": ["great food", "awful service", "great staff", "awful food"] * 10,
                          "label": ["pos", "neg", "pos", "neg"] * 10})
    test = pd.DataFrame({"text": ["great purple food", "awful"], "label": ["pos", "neg"]})
    store.write_table(str(tmp_path / "data" / "train-00000-of-00001.parquet"), train)
    store.write_table(str(tmp_path / "data" / "test-00000-of-00001.parquet"), test)
    cfg = ZooConfig(dataset="text-parquet", data_root=str(tmp_path), dataset_args={"max_len": 5})
    d = dataset_for(cfg)
    assert d.input_shape == (5,) == input_shape(cfg) and d.n_classes == 2
    assert len(d.train) == 36 and len(d.val) == 4 and d.test.y.tolist() == [1, 0]   # labels: sorted names
    assert d.vocab_size == 4 + 5 and d.test.x[0].tolist()[2] == 1                    # "purple" unseen: [UNK]
    bad = tmp_path / "bad"
    store.write_table(str(bad / "train.parquet"), train.rename(columns={"text": "review"}))
    store.write_table(str(bad / "test.parquet"), test)
    with pytest.raises(ValueError, match=r"train.parquet: missing column\(s\) \['text'\]"):
        load_dataset("text-parquet", data_root=str(bad))
    with pytest.raises(FileNotFoundError, match="no test Parquet file"):
        load_dataset("text-parquet", data_root=str(tmp_path / "data" / "train-00000-of-00001.parquet"))


# -- presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["digits-cnn", "digits-resnet", "digits-vit", "text-bert", "smoke-bert"])
def test_family_presets_fit_their_bundled_data(name):
    cfg = smoke_bert() if name == "smoke-bert" else preset(name)
    check_arch_fits_data(ArchSpec.parse(cfg.zoo.arch), cfg.zoo)
    assert dataset_for(cfg.zoo).input_shape == input_shape(cfg.zoo)


def test_a_model_that_does_not_fit_the_data_is_refused_before_training():
    cfg = preset("text-bert").zoo
    small_vocab = {**cfg.arch, "args": {**cfg.arch["args"], "vocab_size": 50}}
    with pytest.raises(ValueError, match="the tokenizer has 107 tokens but the model's vocab_size is 50"):
        check_arch_fits_data(ArchSpec.parse(small_vocab), cfg)
    cfg = preset("digits-cnn").zoo
    with pytest.raises(ValueError, match="does not take inputs of shape"):
        check_arch_fits_data(ArchSpec.parse(cfg.arch), cfg.model_copy(update={"image": False}))


EXPECTED_PARAMS = {"cifar10-resnet18": 11_173_962,        # torchvision resnet18, CIFAR stem, 10 classes
                   "cifar10-vit-small": 21_342_346,       # ViT-S/4 at 32x32, 10 classes
                   "yelp-bert-base": 109_482_240 + 768 * 5 + 5}   # bert-base-uncased + a 5-class head


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_preset_models_line_up_with_the_pipeline(name):
    cfg = preset(name)
    arch = ArchSpec.parse(cfg.zoo.arch)
    torch.manual_seed(0)
    model = build_model(arch).eval()
    layout = WeightLayout.from_arch(arch)
    assert layout.size == sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    flat = layout.flatten(state)
    back = layout.unflatten(flat)
    assert all(np.array_equal(back[e.name], state[e.name]) for e in layout.entries)
    shape = input_shape(cfg.zoo)
    if cfg.zoo.dataset.startswith("text"):
        x = torch.randint(1, arch.args["vocab_size"], (2, *shape))
        x[1, shape[0] // 2:] = 0                                   # padding
    else:
        x = torch.randn(2, *shape)
    n_classes = arch.args.get("num_classes", arch.args.get("num_labels"))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, n_classes)
    # the permutation spec covers the real tensors with consistent sizes: a random permutation keeps the function
    spec = permutation_spec(arch)
    sizes = spec.sizes(state)
    assert sizes and all(n > 1 for n in sizes.values())
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in apply_permutation(spec, random_permutation(spec, state, 0), state).items()},
                          strict=False)
    with torch.no_grad():
        assert torch.allclose(model(x), out, atol=1e-4, rtol=1e-4)


def test_scoring_recalibrates_batchnorm_of_flat_models():
    """A CNN's flat vector has no BatchNorm statistics: scoring re-estimates them on train data."""
    from dwf_ray.accuracy import accuracy
    from dwf_ray.eval.scoring import score_flat
    from dwf_ray.weights import to_module
    from dwf_ray.zoo import train_classifier
    torch.set_num_threads(1)
    cfg = preset("digits-cnn").zoo.model_copy(update={"epochs": 3})
    arch = ArchSpec.parse(cfg.arch)
    torch.manual_seed(0)
    model = train_classifier(build_model(arch), cfg, seed=0)
    data = dataset_for(cfg)
    trained = accuracy(model, data.test)
    layout = WeightLayout.from_arch(arch)
    flat = layout.flatten({k: v.detach().numpy() for k, v in model.named_parameters()})
    default_stats = accuracy(to_module(arch, layout.unflatten(flat)), data.test)   # running mean 0, var 1
    acc, wrong, logits, preds = score_flat(arch.to_json(), cfg.model_dump_json(), EvalConfig().model_dump_json(), flat[None])
    assert trained > 0.8 and abs(acc[0] - trained) < 0.03 and acc[0] > default_stats + 0.05
    assert wrong.shape == (1, len(data.test)) and logits.shape == (1, 256, 10)
    assert ((preds[0] != data.test.y.numpy()) == wrong[0]).all()


# -- a transformer family end to end ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_bert_run(tmp_path_factory, ray_session):
    from dwf_ray.pipeline import Pipeline
    root = tmp_path_factory.mktemp("runs") / "smoke-bert"
    Pipeline(str(root), smoke_bert(), log=lambda *a: None).run()
    return root


def test_bert_family_runs_end_to_end(smoke_bert_run):
    """Token inputs, TransFusion canonicalization, scoring and the report for tiny BERTs."""
    from dwf_ray.weights import load_model_state
    root = smoke_bert_run
    zoo = pd.read_parquet(root / "zoo" / "manifest.parquet")
    assert len(zoo) == 6 and (zoo["status"] == "ok").all() and zoo["test_acc"].mean() > 0.58   # chance: ~0.51
    canon = pd.read_parquet(root / "canonical" / "manifest.parquet")
    assert (canon["dist_after"] <= canon["dist_before"] + 1e-6).all()
    assert (canon["dist_after"] < canon["dist_before"] - 1e-3).sum() == 5      # every model but the reference moved
    samples = pd.read_parquet(root / "samples" / "manifest.parquet")
    state, arch = load_model_state(samples["uri"].iloc[0])
    assert arch.family == "bert" and state["bert.embeddings.word_embeddings.weight"].shape == (107, 16)
    m = json.loads((root / "report" / "metrics.json").read_text())
    assert m["model"]["family"] == "bert" and m["model"]["dataset"] == "text-synth"
    # canonicalized models compute the same function: eval scores the canonical zoo as it was trained
    assert m["accuracy"]["zoo"]["mean"] == pytest.approx(zoo["test_acc"].mean() * 100, abs=0.1)
    assert m["accuracy"]["generated"]["n"] == 6
    assert {p["method"] for p in m["tradeoff"]} == {"generator", "noise", "layer noise", "average", "interpolation",
                                                    "gaussian"}
    for p in m["tradeoff"]:   # generator points carry their margin over the best baseline at equal novelty
        assert ("margin" in p) == (p["method"] == "generator")
    op = m["operating_point"]
    assert op["accepted"] == ("T=1" in op["passing_settings"])
    assert {"zoo", "canon", "pca", "flow", "sample"} <= set(m["timings"])
    assert "`bert` (4,610 parameters) on `text-synth`" in (root / "report" / "report.md").read_text()


def test_eval_aligns_unaligned_transformers_with_transfusion():
    """The no-canon samples are aligned in eval: a head- and neuron-permuted BERT lands back on the reference."""
    from dwf_ray.eval.diversity import matched_nearest
    from dwf_ray.canon.align import canonicalize_flat
    arch = ArchSpec.parse(smoke_bert().zoo.arch)
    layout, spec = WeightLayout.from_arch(arch), permutation_spec(arch).without_residual()
    torch.manual_seed(0)
    ref = {k: v.detach().numpy() for k, v in build_model(arch).named_parameters()}
    moved = apply_permutation(spec, random_permutation(spec, ref, seed=1), ref)
    ref_flat, moved_flat = layout.flatten(ref), layout.flatten(moved)
    assert np.linalg.norm(moved_flat - ref_flat) > 1.0
    aligned = canonicalize_flat(arch.to_json(), ref_flat, moved_flat[None])
    assert np.allclose(aligned[0], ref_flat, atol=1e-6)
    other = layout.flatten({k: v.detach().numpy() for k, v in build_model(arch).named_parameters()})
    dist, idx = matched_nearest(arch.to_json(), np.stack([other, ref_flat]), moved_flat[None], np.array([[0, 1]]))
    assert idx[0] == 1 and dist[0] < 1e-5
