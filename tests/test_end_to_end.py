"""The whole pipeline through the ``dwf`` CLI on a real local Ray, and bad input handling."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from dwf_ray.cli import app
from dwf_ray.weights import load_model_state, save_checkpoint

from tests.conftest import dwf
from tests.presets import SMOKE


def test_run_produces_every_artefact(smoke_run):
    root, out = smoke_run
    zoo = pd.read_parquet(root / "zoo" / "manifest.parquet")
    assert len(zoo) == 12 and (zoo["status"] == "ok").all()
    assert {"model_id", "uri", "arch", "dataset", "seed", "n_params", "sha256", "train_acc", "val_acc",
            "test_acc", "status", "error"} <= set(zoo.columns)
    assert zoo["seed"].nunique() == 12 and (zoo["val_acc"] > 0.8).all()
    canon = pd.read_parquet(root / "canonical" / "manifest.parquet")
    assert len(canon) == 12 and (canon["dist_after"] <= canon["dist_before"] + 1e-6).all()
    assert (canon["dist_after"] < canon["dist_before"]).sum() >= 10   # all but the reference move closer
    meta = json.loads((root / "pca" / "meta.json").read_text())
    assert meta["k"] == 11 and meta["n"] == 12 and len(meta["shards"]) == 2
    assert (root / "pca" / "latents.npy").exists() and (root / "flow" / "model.pt").exists()
    samples = pd.read_parquet(root / "samples" / "manifest.parquet")
    assert len(samples) == 8
    state, arch = load_model_state(samples["uri"].iloc[0])
    assert arch.family == "mlp" and state["net.0.weight"].shape == (32, 64)
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    assert metrics["accuracy"]["zoo"]["n"] == 12 and metrics["accuracy"]["generated"]["n"] == 8
    assert metrics["accuracy"]["generated"]["mean"] > 50, "generated models are no better than chance"
    methods = {p["method"] for p in metrics["tradeoff"]}
    assert methods == {"generator", "noise", "layer noise", "average", "interpolation", "gaussian",
                       "generator (no canon)"}
    assert metrics["zoo"]["func_novelty"] == pytest.approx(1.0)   # the zoo against the rest of the zoo
    op = metrics["operating_point"]
    assert 0 < op["func_novelty"] and set(op["baselines_at"]) == methods - {"generator", "generator (no canon)"}
    assert op["margin"] == pytest.approx(op["acc"] - max(op["baselines_at"].values()))
    per_model = metrics["model_accuracy"]   # every scored model's test accuracy, per set
    assert len(per_model["zoo"]) == 12 and len(per_model["generated"]) == 8
    assert np.mean(per_model["generated"]) == pytest.approx(metrics["accuracy"]["generated"]["mean"], abs=1e-3)
    for p in metrics["tradeoff"]:   # each mean has its standard error, each margin the error of the difference
        n = len(per_model[p["key"]])
        assert p["se"] == pytest.approx(np.std(per_model[p["key"]], ddof=1) / np.sqrt(n), abs=1e-3)
        if p["method"].startswith("generator"):
            assert p["margin_se"] >= p["se"]
    assert {"zoo", "canon", "pca", "flow", "sample", "flow (no canon)"} <= set(metrics["timings"])
    for png in ("accuracy.png", "tradeoff.png", "tradeoff_weight.png"):
        assert (root / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (root / "report" / "report.md").read_text()
    assert "| zoo | 12 |" in report and "| generated | 8 |" in report
    assert "| models | n | mean acc % |" in out          # the table is printed at the end


def test_rerun_skips_completed_stages_and_stage_commands_work(smoke_run):
    root, _ = smoke_run
    config_mtime = (root / "config.json").stat().st_mtime_ns
    out = dwf("run", "--preset", SMOKE, "--root", str(root))
    for stage in ("zoo", "canon", "pca", "flow", "sample", "eval"):
        assert f"[{stage}] complete" in out and "skipped" in out
    assert (root / "config.json").stat().st_mtime_ns == config_mtime   # a finished root is left untouched
    before = (root / "samples" / "manifest.parquet").read_bytes()
    out = dwf("sample", "--root", str(root), "--restart-from", "sample")
    assert "[sample] done" in out
    assert (root / "samples" / "manifest.parquet").read_bytes() == before   # seeded: same models
    out = dwf("eval", "--root", str(root))
    assert "[eval] running" in out and "| generated |" in out


def test_changed_config_on_existing_root_is_a_clear_error(smoke_run):
    root, _ = smoke_run
    result = CliRunner().invoke(app, ["run", "--preset", SMOKE, "--root", str(root), "--set", "sample.n=3"])
    assert result.exit_code != 0 and "different config" in result.output


def copy_zoo(src, root) -> pd.DataFrame:
    """A new run root holding a copy of ``src``'s config and zoo (its manifest pointing at the copies)."""
    shutil.copytree(src / "zoo", root / "zoo")
    shutil.copy(src / "config.json", root / "config.json")
    zoo = pd.read_parquet(root / "zoo" / "manifest.parquet")
    zoo["uri"] = [str(root / "zoo" / f"{m}.safetensors") for m in zoo["model_id"]]
    zoo.to_parquet(root / "zoo" / "manifest.parquet")
    return zoo


def test_bad_checkpoints_are_reported_and_the_run_goes_on(smoke_run, tmp_path):
    """Truncated, wrong-shape and NaN checkpoints: each gets a manifest row with its error; the rest go on."""
    src, _ = smoke_run
    root = tmp_path / "bad"
    zoo = copy_zoo(src, root)
    state, arch = load_model_state(zoo["uri"][3])
    path = root / "zoo" / "m00003.safetensors"
    path.write_bytes(path.read_bytes()[:300])
    save_checkpoint(zoo["uri"][5], {**state, "net.2.weight": np.zeros((32, 31), np.float32)}, arch)
    save_checkpoint(zoo["uri"][7], {**state, "net.4.bias": np.full(10, np.nan, np.float32)}, arch)
    out = dwf("canon", "--root", str(root))
    assert "skipped 3 of 12 models" in out
    canon = pd.read_parquet(root / "canonical" / "manifest.parquet")
    assert len(canon) == 12 and (canon["status"] == "ok").sum() == 9
    errors = dict(zip(canon["model_id"], canon["error"]))
    assert "m00003.safetensors" in errors["m00003"] and "truncated" in errors["m00003"]
    assert "m00005.safetensors" in errors["m00005"] and "shape" in errors["m00005"]
    assert "m00007.safetensors" in errors["m00007"] and "non-finite" in errors["m00007"]
    dwf("pca", "--root", str(root))
    meta = json.loads((root / "pca" / "meta.json").read_text())
    assert meta["n"] == 9 and "m00005" not in meta["model_ids"]


def test_an_unusable_reference_fails_canon_naming_it_and_the_same_command_resumes(smoke_run, tmp_path):
    """The reference checkpoint is unreadable (a disk or bucket fault): `dwf canon` stops naming the stage, the
    cause and the file (the `dwf` entry prints it as one line and exits 1: tests/test_cleanup.py), the traceback
    in the run's log, nothing of the stage marked done. Once the file is back, the same command finishes the stage
    without redoing the zoo."""
    from dwf_ray.pipeline import StageFailed
    src, _ = smoke_run
    root = tmp_path / "ref"
    copy_zoo(src, root)
    reference = root / "zoo" / "m00000.safetensors"
    good = reference.read_bytes()
    reference.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(app, ["canon", "--root", str(root)])
    assert isinstance(result.exception, StageFailed), result.output
    message = str(result.exception)
    assert message.startswith("stage canon failed: ValueError: canonicalize: the reference model is unusable"), message
    assert "m00000.safetensors" in message and "logs/dwf.log" in message and "\n" not in message
    assert "the reference model is unusable" in (root / "logs" / "dwf.log").read_text()
    assert not (root / "canonical" / "_SUCCESS").exists()

    reference.write_bytes(good)
    zoo_done = (root / "zoo" / "_SUCCESS").stat().st_mtime_ns
    assert "[canon] done" in dwf("canon", "--root", str(root))
    assert (root / "canonical" / "_SUCCESS").exists()
    assert (root / "zoo" / "_SUCCESS").stat().st_mtime_ns == zoo_done, "the completed zoo stage was redone"


def test_import_a_folder_of_checkpoints_trained_elsewhere(tmp_path, ray_session):
    """`dwf import`: PyTorch state_dict and safetensors files become a zoo; a broken file is kept as an error row."""
    import torch
    from dwf_ray.archs import ArchSpec, build_model
    arch = ArchSpec("mlp", {"in_dim": 64, "hidden": [32, 32], "out_dim": 10})
    src = tmp_path / "elsewhere"
    src.mkdir()
    for i in range(3):
        torch.manual_seed(i)
        torch.save(build_model(arch).state_dict(), src / f"model_{i}.pt")
    save_checkpoint(str(src / "model_3.safetensors"),
                    {k: v.detach().numpy() for k, v in build_model(arch).state_dict().items()}, arch)
    (src / "model_4.pt").write_bytes(b"not a checkpoint")
    root = tmp_path / "imported"
    dwf("import", str(src), "--arch", arch.to_json(), "--root", str(root))
    zoo = pd.read_parquet(root / "zoo" / "manifest.parquet")
    assert len(zoo) == 5 and (zoo["status"] == "ok").sum() == 4
    bad = zoo[zoo["status"] == "error"].iloc[0]
    assert "model_4.pt" in bad["error"] and "unreadable" in bad["error"]
    state, got = load_model_state(zoo[zoo["status"] == "ok"]["uri"].iloc[0])
    assert got == arch and state["net.4.weight"].shape == (10, 32)
