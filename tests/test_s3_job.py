"""The whole pipeline as a Ray job (`ray job submit`) on a `ray start` head, with its run root on S3 (moto's
server on loopback). The S3 settings reach the job only through the job's runtime env: the head never has them,
and nothing of the run is written to local disk."""
import io
import json
import os
import time

import pandas as pd
import pytest

from tests.cluster_helpers import ROOT, ray_start_temp_dir, submit_job
from tests.test_jobs import ray_head  # noqa: F401  (the `ray start --head` fixture)

SMOKE = "tests/presets/smoke.json"   # the smoke preset, a file in the job's working dir (this repository)


@pytest.fixture
def s3_job_settings(s3_server, monkeypatch):
    """A fresh bucket and the S3 settings (AWS_*), which are then removed from this process's environment so that
    the Ray head started after this fixture (`ray_head` copies os.environ) never sees them."""
    bucket = s3_server()
    settings = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    for key in settings:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "2")   # the head stops in seconds, not 30
    return bucket, settings


def s3_client(settings: dict):
    import boto3
    return boto3.client("s3", endpoint_url=settings["AWS_ENDPOINT_URL"], region_name=settings["AWS_DEFAULT_REGION"],
                        aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"])


def run_files(folder) -> list:
    """Files a run leaves behind, wherever they are under ``folder`` (a head's temp dir), except the copies of this
    repository's own files in the jobs' working dirs."""
    names = ("config.json", "manifest.parquet", "model.pt", "meta.json", "latents.npy", "metrics.json", "report.md")
    found = []
    for p in folder.rglob("*"):
        if not (p.is_file() and (p.name in names or p.suffix == ".safetensors")):
            continue
        if "working_dir_files" in p.parts:    # .../working_dir_files/_ray_pkg_<hash>/<repo path>
            i = p.parts.index("working_dir_files")
            if (ROOT.joinpath(*p.parts[i + 2:])).exists():
                continue
        found.append(p)
    return found


# The fixture order matters: s3_job_settings clears AWS_* before ray_head starts the head.
def test_whole_pipeline_as_a_ray_job_on_s3(s3_job_settings, ray_head):  # noqa: F811
    bucket, settings = s3_job_settings
    address, head_env = ray_head
    assert not [k for k in head_env if k.startswith("AWS_")], "the Ray head was started with S3 settings"
    head_temp = ray_start_temp_dir(address)
    runs_before = sorted((ROOT / "runs").iterdir()) if (ROOT / "runs").is_dir() else []
    prefix = "run"
    root = f"s3://{bucket}/{prefix}"

    t0 = time.time()
    # a smaller smoke run: what this test is about is S3 and the job's runtime env (test_end_to_end covers the
    # no-canon sub-run)
    small = {"zoo.n_models": 6, "sample.n": 4, "eval.compare_no_canon": "false"}
    sets = [arg for key, value in small.items() for arg in ("--set", f"{key}={value}")]
    out = submit_job(address, head_env, ["python", "jobs/run.py", "run", "--preset", SMOKE, "--root", root, *sets],
                     runtime_env={"env_vars": settings})
    seconds = time.time() - t0
    log = out.stdout + out.stderr
    assert "Failed to merge the Job's runtime env" not in log, (
        "the job's driver passed env vars to ray.init that the job's runtime env already sets "
        "(dwf_ray.runtime.ensure_ray should leave out what RAY_JOB_CONFIG_JSON_ENV_VAR's env_vars hold)")
    assert out.returncode == 0 and "succeeded" in log, log[-6000:]
    assert "[eval] done" in out.stdout, out.stdout[-3000:]
    print(f"\nsmoke pipeline as a Ray job on S3: {seconds:.0f} s")

    s3 = s3_client(settings)
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for o in page.get("Contents", [])}

    def read(key: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()

    def in_bucket(uris) -> list:
        """The URIs that are not objects of this run in the bucket."""
        return [u for u in uris if not (u.startswith(root + "/") and u[len(f"s3://{bucket}/"):] in keys)]

    for key in ("config.json", "zoo/manifest.parquet", "canonical/manifest.parquet", "pca/meta.json",
                "pca/latents.npy", "flow/model.pt", "samples/manifest.parquet", "report/metrics.json",
                "report/report.md"):
        assert f"{prefix}/{key}" in keys, f"{key} is not in the bucket; found {sorted(keys)[:50]}"
    assert [k for k in keys if k.startswith(f"{prefix}/report/") and k.endswith(".png")], "no plots in report/"
    zoo = pd.read_parquet(io.BytesIO(read(f"{prefix}/zoo/manifest.parquet")))
    canon = pd.read_parquet(io.BytesIO(read(f"{prefix}/canonical/manifest.parquet")))
    samples = pd.read_parquet(io.BytesIO(read(f"{prefix}/samples/manifest.parquet")))
    n_models, n_samples = small["zoo.n_models"], small["sample.n"]
    assert len(zoo) == n_models and (zoo["status"] == "ok").all() and not in_bucket(zoo["uri"])
    assert len(canon) == n_models and (canon["status"] == "ok").all() and not in_bucket(canon["canon_uri"])
    assert len(samples) == n_samples and not in_bucket(samples["uri"])
    meta = json.loads(read(f"{prefix}/pca/meta.json"))
    shards = [f"{root}/pca/{s['file']}" for s in meta["shards"]]
    assert shards and not in_bucket(shards)
    metrics = json.loads(read(f"{prefix}/report/metrics.json"))
    assert metrics["root"] == root

    # nothing of the run on local disk: not in the job's working dir (under the head's temp dir), not in the repo
    assert head_temp.is_dir()
    assert not run_files(head_temp), run_files(head_temp)[:10]
    assert not [d for d in head_temp.rglob("*") if d.is_dir() and d.name in ("runs", "s3:", bucket)]
    runs_after = sorted((ROOT / "runs").iterdir()) if (ROOT / "runs").is_dir() else []
    assert runs_after == runs_before and not (ROOT / "s3:").exists()
