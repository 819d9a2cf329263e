"""The public Model Zoos (Schürholt et al., NeurIPS 2022) import as their authors publish them: a Ray Tune
experiment folder built here in that layout (small CNNs trained briefly on the bundled digits at 28x28, mixed
dropout, broken models of every kind the authors' loader drops, the experiment's dataset.pt), imported without
--arch, through every stage, and exported back into folders that a reader written from the authors' layout loads."""
import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from dwf_ray.archs import ArchSpec, build_model
from dwf_ray.weights import CheckpointError, load_model_state
from tests.conftest import dwf
from tests.presets import SMOKE

N_MODELS, EPOCHS = 24, 3
NAN, NO_CHECKPOINT, TRUNCATED, FAILED, OLD_RAY, SHORT_NAME = 3, 5, 7, 9, 11, 13
BROKEN = {NAN: "non-finite", NO_CHECKPOINT: f"no checkpoint for epoch {EPOCHS}",
          TRUNCATED: "no complete row", FAILED: "trial failed"}
ARCH = ArchSpec("mz-cnn", {"in_channels": 1, "activation": "leakyrelu"})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class AuthorsCNN(nn.Module):
    """The zoos' CNN as their def_net.py lays it out (written here from that layout, independent of dwf_ray): one
    module_list; a Dropout takes an index only when dropout > 0."""

    def __init__(self, channels_in: int, nlin: str, dropout: float):
        super().__init__()
        act = {"leakyrelu": nn.LeakyReLU, "tanh": nn.Tanh}[nlin]

        def drop():
            return [nn.Dropout(dropout)] if dropout > 0 else []
        self.module_list = nn.ModuleList([
            nn.Conv2d(channels_in, 8, 5), nn.MaxPool2d(2, 2), act(), *drop(),
            nn.Conv2d(8, 6, 5), nn.MaxPool2d(2, 2), act(), *drop(),
            nn.Conv2d(6, 4, 2), act(), nn.Flatten(), nn.Linear(36, 20), act(), *drop(), nn.Linear(20, 10)])

    def forward(self, x):
        for layer in self.module_list:
            x = layer(x)
        return x


def digits_28() -> dict:
    """The bundled digits resized to 28x28 and standardised, split as a zoo's dataset.pt holds them."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = F.interpolate(torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8), size=28, mode="bilinear")
    x, y = (x - x.mean()) / x.std(), torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    part = {"trainset": order[:1200], "valset": order[1200:1400], "testset": order[1400:]}
    return {k: TensorDataset(x[i], y[i]) for k, i in part.items()} | {"dataset_seed": 0}


def _accuracy(model, ds: TensorDataset) -> float:
    with torch.no_grad():
        return float((model.eval()(ds.tensors[0]).argmax(1) == ds.tensors[1]).float().mean())


def _train_one(folder: Path, params: dict, data: dict, old_ray: bool) -> None:
    """What a zoo trial leaves: checkpoints at every epoch, result.json lines, progress.csv."""
    torch.manual_seed(params["seed"])
    model = AuthorsCNN(1, params["model::nlin"], params["model::dropout"])
    opt = torch.optim.Adam(model.parameters(), lr=params["optim::lr"])
    g = torch.Generator().manual_seed(params["seed"])
    (x, y), lines = data["trainset"].tensors, []
    for epoch in range(EPOCHS + 1):
        for _ in range(10 if epoch else 0):
            idx = torch.randint(0, len(y), (32,), generator=g)
            loss = F.cross_entropy(model.train()(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_acc = _accuracy(model, TensorDataset(x[:300], y[:300])) if epoch else -999
        lines.append({"training_iteration": epoch, "trial_id": folder.name[18:23], "train_acc": train_acc,
                      "train_loss": -999 if not epoch else loss.item(), "test_acc": _accuracy(model, data["testset"]),
                      "test_loss": 1.0, "done": epoch == EPOCHS})
        ckpt = folder / (f"checkpoint_{epoch}" if old_ray else f"checkpoint_{epoch:06d}")
        ckpt.mkdir(parents=True)
        torch.save(model.state_dict(), ckpt / "checkpoints")
        torch.save(opt.state_dict(), ckpt / "optimizer")
    (folder / "params.json").write_text(json.dumps(params))
    (folder / "result.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "progress.csv").write_text("training_iteration,test_acc\n" +
                                         "".join(f"{r['training_iteration']},{r['test_acc']}\n" for r in lines))


def _params(i: int) -> dict:
    return {"seed": 1000 + i, "model::type": "CNN", "model::channels_in": 1, "model::nlin": "leakyrelu",
            "model::dropout": 0.1 if i % 2 else 0.0, "model::init_type": "kaiming_uniform",
            "optim::optimizer": "adam", "optim::lr": 3e-3 if i % 3 else 1e-2, "optim::wd": 0.0,
            "training::batchsize": 64, "training::epochs_train": EPOCHS, "cuda": False}


def _break(folders: list[Path]) -> None:
    """One model of every kind the authors' loader drops."""
    last = f"checkpoint_{EPOCHS:06d}"
    state = torch.load(folders[NAN] / last / "checkpoints")
    state["module_list.4.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, folders[NAN] / last / "checkpoints")
    shutil.rmtree(folders[NO_CHECKPOINT] / last)
    text = (folders[TRUNCATED] / "result.json").read_text()
    (folders[TRUNCATED] / "result.json").write_text(text[:-40])
    (folders[FAILED] / "error.txt").write_text("Traceback: the trial died\n")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    """A Model Zoo folder in the authors' layout (Ray Tune's experiment folder)."""
    root = tmp_path_factory.mktemp("modelzoo") / "mnist_like_zoo"
    root.mkdir()
    data = digits_28()
    torch.save(data, root / "dataset.pt")
    (root / "config.json").write_text(json.dumps({"model::type": "CNN", "training::epochs_train": EPOCHS}))
    (root / "readme.md").write_text("a small zoo in the Model Zoos layout\n")
    (root / "experiment_state-2022-01-01_00-00-00.json").write_text("{}")
    folders = []
    for i in range(N_MODELS):
        p = _params(i)
        name = (f"NN_tune_trainable_{i:05x}_{i}_model::dropout={p['model::dropout']},seed={p['seed']}"
                f"_2022-01-01_00-00-{i:02d}")
        folders.append(root / (name[:36] if i == SHORT_NAME else name))
        folders[-1].mkdir()
        _train_one(folders[-1], p, data, old_ray=i == OLD_RAY)
    _break(folders)
    return root


def folders_of(zoo: Path) -> list[Path]:
    return sorted(p for p in zoo.iterdir() if p.is_dir())


def test_scan_reads_params_not_folder_names_and_picks_the_last_epoch(zoo):
    from dwf_ray.zoo.modelzoo import scan_zoo
    arch, epoch, rows = scan_zoo(str(zoo), None)
    assert arch == ARCH and epoch == EPOCHS and len(rows) == N_MODELS
    by_seed = {r["seed"]: r for r in rows.to_dict("records")}
    assert set(by_seed) == {1000 + i for i in range(N_MODELS)}   # the cut-short name included
    assert json.loads(by_seed[1000 + SHORT_NAME]["hparams"])["optim::lr"] == _params(SHORT_NAME)["optim::lr"]
    assert by_seed[1000 + OLD_RAY]["source_uri"].endswith(f"checkpoint_{EPOCHS}/checkpoints")
    for i in (NO_CHECKPOINT, FAILED):
        row = by_seed[1000 + i]
        assert BROKEN[i] in row["scan_error"] and row["folder"] in row["scan_error"]


def test_epoch_picks_that_checkpoint_and_its_result_row(zoo):
    from dwf_ray.zoo.modelzoo import epoch_result, scan_zoo
    _, epoch, rows = scan_zoo(str(zoo), 1)
    by_seed = {r["seed"]: r for r in rows.to_dict("records")}
    assert epoch == 1 and by_seed[1000 + NO_CHECKPOINT]["scan_error"] == ""
    assert by_seed[1000 + OLD_RAY]["source_uri"].endswith("checkpoint_1/checkpoints")
    truncated = by_seed[1000 + TRUNCATED]["folder"]
    assert epoch_result(truncated, 1)["train_acc"] > 0
    with pytest.raises(CheckpointError, match="no complete row for training_iteration 3"):
        epoch_result(truncated, EPOCHS)


def test_layers_are_read_from_the_keys_present_with_and_without_dropout(zoo):
    """Dropout models keep their weights at module_list 0, 4, 8, 11, 14: they import as the same function."""
    from dwf_ray.weights import to_module
    from dwf_ray.zoo.modelzoo import read_zoo_state
    x = digits_28()["testset"].tensors[0][:32]
    for i in (0, 1):    # without and with dropout
        folder = folders_of(zoo)[i]
        params = json.loads((folder / "params.json").read_text())
        authors = AuthorsCNN(1, "leakyrelu", params["model::dropout"])
        ckpt = folder / f"checkpoint_{EPOCHS:06d}" / "checkpoints"
        authors.load_state_dict(torch.load(ckpt), strict=True)
        state = read_zoo_state(str(ckpt), ARCH, None)
        with torch.no_grad():
            np.testing.assert_allclose(to_module(ARCH, state)(x).numpy(), authors.eval()(x).numpy(), rtol=1e-5)
    with pytest.raises(CheckpointError, match="above the threshold"):
        read_zoo_state(str(ckpt), ARCH, 1e-3)


def test_a_resnet18_zoo_model_is_the_resnet18_family_with_the_cifar_stem(tmp_path):
    """The zoos' Resnet18: torchvision's, conv1 a 3x3 stride-1 conv, no max-pool (written here from that layout)."""
    import torchvision
    from dwf_ray.weights import to_module
    from dwf_ray.zoo.modelzoo import arch_from_params, read_zoo_state
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=10)
    theirs.conv1, theirs.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(theirs.state_dict(), tmp_path / "checkpoints")
    arch = arch_from_params({"model::type": "Resnet18", "model::channels_in": 3, "model::o_dim": 10,
                             "model::nlin": "relu", "model::dropout": 0.0})
    assert arch == ArchSpec("resnet18", {"num_classes": 10, "in_channels": 3, "cifar_stem": True})
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ours = to_module(arch, read_zoo_state(str(tmp_path / "checkpoints"), arch, None))(x)
        np.testing.assert_allclose(ours.numpy(), theirs.eval()(x).numpy(), rtol=1e-4, atol=1e-5)


def test_dataset_pt_is_read_without_running_anything_in_it(zoo, tmp_path):
    from dwf_ray.data import load_dataset
    data = load_dataset("zoo", data_root=str(zoo))
    assert data.input_shape == (1, 28, 28) and data.n_classes == 10
    assert (len(data.train), len(data.val), len(data.test)) == (1200, 200, 397)
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    torch.save({"trainset": argparse.Namespace(x=1)}, crafted / "dataset.pt")
    with pytest.raises(CheckpointError) as err:
        load_dataset("zoo", data_root=str(crafted))
    assert "dataset.pt: refused" in str(err.value) and "argparse.Namespace" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_zoo_on_s3_reads_as_the_local_one(zoo, s3_server):
    """Folder names with "::" (Ray Tune's config keys) included: they are object keys, not chained URLs."""
    import boto3
    from dwf_ray.data import load_dataset
    from dwf_ray.zoo.modelzoo import read_zoo_state, scan_zoo
    bucket = s3_server()
    client = boto3.client("s3")
    for path in zoo.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"zoos/{zoo.name}/{path.relative_to(zoo)}")
    source = f"s3://{bucket}/zoos/{zoo.name}"
    (arch, epoch, remote), (_, _, local) = scan_zoo(source, None), scan_zoo(str(zoo), None)
    assert arch == ARCH and epoch == EPOCHS
    assert remote["seed"].tolist() == local["seed"].tolist() and remote["hparams"].tolist() == local["hparams"].tolist()
    assert [bool(e) for e in remote["scan_error"]] == [bool(e) for e in local["scan_error"]]
    ours = read_zoo_state(remote["source_uri"][1], ARCH, None)
    theirs = read_zoo_state(local["source_uri"][1], ARCH, None)
    assert "::" in remote["source_uri"][1] and all(np.array_equal(ours[k], theirs[k]) for k in theirs)
    assert len(load_dataset("zoo", data_root=source).test) == 397


def test_mixed_architectures_are_refused_naming_the_odd_ones_out(zoo, tmp_path):
    from dwf_ray.cli import app
    mixed = tmp_path / "mixed"
    for folder in folders_of(zoo)[:4]:
        shutil.copytree(folder, mixed / folder.name)
    odd = folders_of(mixed)[2]
    params = json.loads((odd / "params.json").read_text()) | {"model::nlin": "tanh"}
    (odd / "params.json").write_text(json.dumps(params))
    result = CliRunner().invoke(app, ["zoo", "import", str(mixed), "--root", str(tmp_path / "run")])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "mixed architectures" in line and odd.name in line and "activation=tanh" in line
    assert not (tmp_path / "run" / "zoo" / "manifest.parquet").exists()


def _check_manifest(zoo: Path, man: pd.DataFrame) -> None:
    """One row per model folder: seeds, hyper-parameters and test_acc at the epoch from the folder's own files;
    the dropped models are error rows naming their folder and why."""
    assert len(man) == N_MODELS and (man["status"] == "ok").sum() == N_MODELS - len(BROKEN)
    folders = folders_of(zoo)
    for i, reason in BROKEN.items():
        row = man[man["seed"] == 1000 + i].iloc[0]
        assert row["status"] == "error" and reason in row["error"] and folders[i].name in row["error"]
    for row in man[man["status"] == "ok"].to_dict("records"):
        folder = Path(row["folder"])
        params = json.loads((folder / "params.json").read_text())
        result = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()][EPOCHS]
        assert row["seed"] == params["seed"] and row["epoch"] == EPOCHS
        assert json.loads(row["hparams"])["optim::lr"] == params["optim::lr"]
        assert row["test_acc"] == pytest.approx(result["test_acc"]) and row["n_params"] == 2464
        state, arch = load_model_state(row["uri"])
        assert arch == ARCH
        theirs = torch.load(Path(row["source_uri"]))
        last = max(int(k.split(".")[1]) for k in theirs)
        np.testing.assert_array_equal(state["module_list.11.weight"], theirs[f"module_list.{last}.weight"].numpy())


def _load_exported(folder: Path, dataset: dict) -> tuple[nn.Module, float]:
    """An exported model read as the authors' tools read a zoo folder: params.json builds the model, the
    checkpoint of the epoch named in result.json is its plain state_dict."""
    params = json.loads((folder / "params.json").read_text())
    result = json.loads((folder / "result.json").read_text().splitlines()[-1])
    assert params["model::type"] == "CNN"
    model = AuthorsCNN(params["model::channels_in"], params["model::nlin"], params["model::dropout"])
    ckpt = folder / f"checkpoint_{result['training_iteration']:06d}" / "checkpoints"
    model.load_state_dict(torch.load(ckpt, weights_only=True), strict=True)
    assert _accuracy(model, dataset["testset"]) == pytest.approx(result["test_acc"])
    return model.eval(), result["test_acc"]


def test_a_downloaded_zoo_goes_through_every_stage_and_exports_back(zoo, tmp_path, ray_session):
    from dwf_ray.zoo.modelzoo import scan_zoo
    root = tmp_path / "run"
    out = dwf("zoo", "import", str(zoo), "--root", str(root), "--preset", SMOKE, "--set", "eval.compare_no_canon=false",
              "--set", "flow.num_workers=1", "--set", "sample.n=6", "--set", "eval.n_baseline=8")
    assert "Model Zoo folder" in out and ARCH.to_json() in out
    _check_manifest(zoo, pd.read_parquet(root / "zoo" / "manifest.parquet"))
    for stage in ("canon", "pca", "flow", "sample", "eval"):
        dwf(stage, "--root", str(root))
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert (root / "report" / "report.md").exists() and metrics
    exported = tmp_path / "exported"
    dwf("export", "--root", str(root), "--format", "modelzoo", "--out", str(exported))
    dataset = torch.load(zoo / "dataset.pt", weights_only=False)   # our own file, written by this test
    samples = pd.read_parquet(root / "samples" / "manifest.parquet")
    samples = samples[samples["status"] == "ok"]
    assert len(folders_of(exported)) == len(samples) == 6
    arch, epoch, again = scan_zoo(str(exported), None)    # a zoo folder again, its dataset.pt beside the models
    assert arch == ARCH and epoch == EPOCHS and len(again) == 6 and not any(again["scan_error"])
    assert (exported / "dataset.pt").read_bytes() == (zoo / "dataset.pt").read_bytes()
    x = dataset["testset"].tensors[0][:64]
    for folder, uri in zip(folders_of(exported), samples.sort_values("model_id")["uri"]):
        model, _ = _load_exported(folder, dataset)
        state, arch = load_model_state(uri)
        ours = build_model(arch)
        ours.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        with torch.no_grad():
            np.testing.assert_allclose(model(x).numpy(), ours.eval()(x).numpy(), rtol=1e-5, atol=1e-6)
