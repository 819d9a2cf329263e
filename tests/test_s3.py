"""The pipeline against a run root on S3 (moto's server on loopback): workers read and write objects there."""
import json

import pytest
import s3fs
from typer.testing import CliRunner

from dwf_ray import store
from dwf_ray.cli import app
from dwf_ray.weights import load_model_state
from tests.presets import SMOKE


def test_whole_run_on_an_s3_root(s3_server, ray_session):
    bucket = s3_server()
    root = f"s3://{bucket}/runs/smoke"
    result = CliRunner().invoke(app, ["run", "--preset", SMOKE, "--root", root, "--set", "eval.compare_no_canon=false",
                                      "--set", "zoo.n_models=6", "--set", "sample.n=4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fs = s3fs.S3FileSystem()
    names = set(fs.find(f"{bucket}/runs/smoke"))
    for key in ("zoo/manifest.parquet", "zoo/m00005.safetensors", "canonical/manifest.parquet", "pca/meta.json",
                "pca/shard_001.safetensors", "flow/model.pt", "samples/manifest.parquet", "report/metrics.json",
                "report/report.md", "report/tradeoff.png"):
        assert f"{bucket}/runs/smoke/{key}" in names, key
    assert any("/flow/ray_train/" in n for n in names), "Ray Train checkpoints were not stored on S3"
    canon = store.read_table(f"{root}/canonical/manifest.parquet")
    assert (canon["status"] == "ok").all() and canon["canon_uri"].str.startswith("s3://").all()
    state, arch = load_model_state(canon["canon_uri"].iloc[1])
    assert state["net.0.weight"].shape == (32, 64)
    metrics = json.loads(fs.cat_file(f"{bucket}/runs/smoke/report/metrics.json"))
    assert metrics["accuracy"]["generated"]["n"] == 4 and metrics["root"] == root


def test_missing_object_on_s3_is_a_clear_error(s3_server):
    from dwf_ray.weights import CheckpointError
    bucket = s3_server()
    with pytest.raises(CheckpointError, match=f"s3://{bucket}/nope.safetensors: checkpoint not found"):
        load_model_state(f"s3://{bucket}/nope.safetensors")
