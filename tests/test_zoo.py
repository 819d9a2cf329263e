"""Zoos made fast: many small models per Ray task, trained in lockstep, each as if it were trained alone."""
import numpy as np
import pandas as pd
import pytest
import torch

from dwf_ray.accuracy import accuracy
from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.config import ZooConfig
from dwf_ray.data import dataset_for
from dwf_ray.zoo import models_per_task, train_classifier, train_zoo
from dwf_ray.zoo.lockstep import chunk_metrics, train_lockstep

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MLP = {"family": "mlp", "args": {"in_dim": 64, "hidden": [16, 16], "out_dim": 10}}
CNN1D = {"family": "cnn1d", "args": {"in_length": 40, "channels": [6, 6, 6], "kernels": [5, 3, 3],
                                     "strides": [2, 2, 2], "n_classes": 10}}
RESIDUAL_MLP = {"family": "mlp", "args": {"in_dim": 40, "hidden": [16, 16], "out_dim": 10, "residual": True}}
CASES = {"mlp-digits": ZooConfig(arch=MLP, epochs=3),
         "residual-mlp-mnist1d": ZooConfig(arch=RESIDUAL_MLP, dataset="mnist1d",
                                           dataset_args={"num_train": 600, "num_test": 300}, epochs=2,
                                           batch_size=50, lr_schedule="constant"),
         "cnn1d-mnist1d": ZooConfig(
    arch=CNN1D, dataset="mnist1d", dataset_args={"num_train": 600, "num_test": 300}, epochs=2, batch_size=50,
    lr_schedule="constant")}


def alone(cfg: ZooConfig, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return train_classifier(build_model(ArchSpec.parse(cfg.arch)), cfg, seed)


@pytest.mark.parametrize("name", list(CASES))
def test_a_model_trained_in_a_chunk_equals_the_same_seed_trained_alone(name):
    cfg = CASES[name]
    arch, data = ArchSpec.parse(cfg.arch), dataset_for(cfg)
    seeds = [5, 9, 2]
    chunk = train_lockstep(arch, cfg, seeds, data)
    assert chunk.diverged == [None, None, None]
    metrics = chunk_metrics(arch, chunk.states, data)
    for j, seed in enumerate(seeds):
        model = alone(cfg, seed)
        for key, value in model.state_dict().items():
            np.testing.assert_allclose(chunk.states[j][key], value.numpy(), atol=2e-5, rtol=1e-4, err_msg=key)
        assert metrics[j]["test_acc"] == pytest.approx(accuracy(model, data.test), abs=1e-6)
    # different seeds: different initialisations and data orders, so different models
    first = next(iter(chunk.states[0]))
    assert not np.allclose(chunk.states[0][first], chunk.states[1][first])


def test_a_model_that_diverges_in_a_chunk_does_not_take_its_chunk_mates_with_it():
    cfg = CASES["mlp-digits"]
    arch, data = ArchSpec.parse(cfg.arch), dataset_for(cfg)
    models = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        models.append(build_model(arch))
    with torch.no_grad():
        models[1].net[0].weight[0, 0] = float("nan")     # seed 2 diverges at its first step
    chunk = train_lockstep(arch, cfg, [1, 2, 3], data, init=models)
    assert chunk.diverged == [None, 0, None]
    clean = train_lockstep(arch, cfg, [1, 3], data)
    for mine, theirs in zip((chunk.states[0], chunk.states[2]), clean.states):
        for key in theirs:
            np.testing.assert_allclose(mine[key], theirs[key], atol=1e-6, err_msg=key)


def test_train_zoo_in_chunks_writes_one_checkpoint_and_row_per_model_and_reuses_written_ones(ray_session, tmp_path):
    from dwf_ray.weights import load_checkpoint
    cfg = ZooConfig(arch=MLP, n_models=7, models_per_task=3, epochs=2, seed0=40)
    man = train_zoo(cfg, str(tmp_path))
    assert list(man["model_id"]) == [f"m{i:05d}" for i in range(7)] and (man["status"] == "ok").all()
    assert list(man["seed"]) == list(range(40, 47))
    state, meta = load_checkpoint(man.loc[4, "uri"])
    assert meta["seed"] == "44"
    ref = alone(cfg, 44).state_dict()
    for key in ref:
        np.testing.assert_allclose(state[key], ref[key].numpy(), atol=2e-5, rtol=1e-4)
    # a rerun finds every checkpoint written and trains nothing (same rows, same files)
    before = {u: (tmp_path / u.rsplit("/", 1)[-1]).stat().st_mtime_ns for u in man["uri"]}
    again = train_zoo(cfg, str(tmp_path))
    pd.testing.assert_frame_equal(again, man)
    assert before == {u: (tmp_path / u.rsplit("/", 1)[-1]).stat().st_mtime_ns for u in again["uri"]}


def test_models_per_task_defaults_to_chunks_only_for_families_that_train_in_lockstep():
    assert models_per_task(ZooConfig(arch=MLP, n_models=10_000), cpus=2) == 256
    assert models_per_task(ZooConfig(arch=MLP, n_models=40), cpus=2) == 10      # at least 2 tasks per CPU
    cnn = {"family": "cnn", "args": {"in_channels": 1, "image_size": 8, "channels": [4], "n_classes": 10}}
    assert models_per_task(ZooConfig(arch=cnn, n_models=100, image=True), cpus=2) == 1
    with pytest.raises(ValueError, match=r"zoo.models_per_task=8: family 'cnn' cannot be trained in lockstep"):
        models_per_task(ZooConfig(arch=cnn, n_models=100, image=True, models_per_task=8), cpus=2)


def test_mnist1d_is_built_offline_by_its_own_generator_and_leaves_global_random_state_alone():
    import json
    import random

    from mnist1d.data import get_dataset_args, make_dataset
    from dwf_ray.data import load_dataset
    np.random.seed(3)
    random.seed(3)
    before = np.random.get_state()[1].copy(), random.getstate()
    data = load_dataset("mnist1d", args_json=json.dumps({"num_train": 4000, "num_test": 1000}))
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    # the standard split: the package's published arguments (5,000 signals, seed 42), its first 4,000 for training
    # and validation (10 % per class, stratified)
    published = make_dataset(get_dataset_args())
    assert data.input_shape == (40,) and data.n_classes == 10
    assert len(data.train) + len(data.val) == 4000 and abs(len(data.val) - 400) <= 5 and len(data.test) == 1000
    np.testing.assert_allclose(np.sort(data.test.x.numpy(), axis=0), np.sort(published["x_test"], axis=0), atol=1e-6)
    train_val = np.concatenate([data.train.x.numpy(), data.val.x.numpy()])
    np.testing.assert_allclose(np.sort(train_val, axis=0), np.sort(published["x"], axis=0), atol=1e-6)
    # the default draws 10,000 test signals from the same generator, every class about equally often
    big = load_dataset("mnist1d")
    assert len(big.test) == 10_000 and np.bincount(big.test.y.numpy()).min() > 900


@pytest.mark.parametrize("args,message", [({"num_test": 0}, "num_test=0 is out of range"),
                                          ({"num_train": "many"}, "num_train='many' is out of range"),
                                          ({"val_fraction": 1.5}, "val_fraction=1.5 is out of range"),
                                          ({"length": 3}, "has no arguments ['length']")])
def test_a_bad_mnist1d_argument_is_one_line_and_exit_2_before_any_work(tmp_path, args, message):
    import json
    import subprocess
    import sys
    root = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dwf_ray.cli", "zoo", "--preset", "mnist1d-mlp", "--root", str(root),
                           "--set", f"zoo.dataset_args={json.dumps(args)}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not root.exists()


def test_mnist1d_is_cached_as_plain_arrays_and_a_bad_cache_file_is_made_again(tmp_path, monkeypatch):
    from dwf_ray.data import mnist1d_signals
    monkeypatch.setenv("DWF_CACHE_DIR", str(tmp_path))
    (train, test) = mnist1d_signals(200, 100, 7)
    cached = tmp_path / "mnist1d-300-7.npz"
    assert cached.exists()
    cached.write_bytes(b"not an npz")
    (train2, test2) = mnist1d_signals(200, 100, 7)
    np.testing.assert_array_equal(train2[0], train[0])
    np.testing.assert_array_equal(test2[1], test[1])
    with np.load(cached, allow_pickle=False) as f:      # written again, as plain arrays
        assert f["x"].shape == (300, 40)


def test_a_zoo_too_large_for_the_pca_memory_budget_is_one_line_and_exit_2_before_any_work(tmp_path):
    import subprocess
    import sys
    root = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "dwf_ray.cli", "zoo", "--preset", "digits-mlp", "--root", str(root),
                           "--set", "zoo.n_models=20000", "--set", "pca.side=gram",
                           "--set", "pca.memory_budget_bytes=2000000000"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "zoo.n_models=20000" in lines[0] and "pca.memory_budget_bytes" in lines[0], proc.stderr
    assert not root.exists()
