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


def dwf_subprocess(*args: str, env: dict | None = None):
    """The `dwf` console entry in its own process (its own S3 settings), as a user or a job runs it."""
    import os
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "dwf_ray.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def one_error_line(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dwf: error:") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_s3_problems_a_user_can_act_on_are_one_line_and_exit_2(s3_server, tmp_path):
    """A missing bucket, a missing object, access denied by a bucket policy, and an endpoint that does not
    answer: one line naming the bucket and key and what to check, from the `dwf` entry point."""
    import boto3
    bucket = s3_server()
    line = one_error_line(dwf_subprocess("zoo", "--preset", SMOKE, "--root", "s3://no-such-bucket-dwf/runs/x"))
    assert "bucket 'no-such-bucket-dwf'" in line and "does not exist" in line and "check" in line

    line = one_error_line(dwf_subprocess("canon", "--root", f"s3://{bucket}/runs/never-made"))
    assert f"s3://{bucket}/runs/never-made" in line and "no config.json" in line

    line = one_error_line(dwf_subprocess("zoo", "import", f"s3://{bucket}/zoos/none/", "--arch",
                                         '{"family": "mlp", "args": {"in_dim": 64, "hidden": [32], "out_dim": 10}}',
                                         "--root", str(tmp_path / "imported")))
    assert f"s3://{bucket}/zoos/none/" in line

    locked = s3_server()
    boto3.client("s3").put_bucket_policy(Bucket=locked, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:*",
         "Resource": [f"arn:aws:s3:::{locked}", f"arn:aws:s3:::{locked}/*"]}]}))
    line = one_error_line(dwf_subprocess("zoo", "--preset", SMOKE, "--root", f"s3://{locked}/runs/x"))
    assert f"bucket '{locked}'" in line and "access denied" in line and "bucket policy" in line

    line = one_error_line(dwf_subprocess("zoo", "--preset", SMOKE, "--root", f"s3://{bucket}/runs/y",
                                         env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}))
    assert "http://127.0.0.1:9 does not answer" in line and f"bucket '{bucket}'" in line
