"""`ray job submit` of the whole pipeline (`jobs/run.py`, the `dwf` entry) on an S3 run root, against a real Ray
head started by `ray start`."""
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from dwf_ray.weights import load_model_state
from tests.cluster_helpers import ROOT, ray_start_temp_dir, stop_group, submit_job
from tests.conftest import _free_port

SMOKE = "tests/presets/smoke.json"   # the smoke preset, a file in the job's working dir (this repository)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A separate Ray head on loopback (`ray start --head --block`) for this module's jobs; stopping it stops only
    what it started. It never has S3 settings (AWS_*): a job that needs them brings them in its runtime env."""
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env |= {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}          # the head stops in seconds, not 30
    log_file = tmp_path_factory.mktemp("rayhead") / "head.log"
    picked: set[int] = set()

    def distinct_port() -> int:   # the OS may hand the same free port out twice in a row: Ray refuses that
        while (port := _free_port()) in picked:
            pass
        picked.add(port)
        return port
    dash = distinct_port()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")   # its own session files (short socket paths)
    # every port its own, so that it never collides with the test session's Ray on this machine
    ports = [f"--{name}={distinct_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]
    proc = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", *ports, "--num-cpus=2",
                             f"--temp-dir={temp_dir}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--block",
                             "--disable-usage-stats"], env=env, stdout=open(log_file, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.terminate()
                raise RuntimeError(f"Ray head did not start:\n{log_file.read_text()[-3000:]}")
            time.sleep(1)
    yield address, env
    stop_group(proc)      # `ray start --block` may linger a minute after its node stopped: its group is killed
    shutil.rmtree(temp_dir, ignore_errors=True)


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


def test_whole_pipeline_as_a_ray_job_on_s3(s3_server, ray_head):
    """The whole pipeline as a Ray job with its run root on S3 (moto's server on loopback): every stage's workers
    read and write objects there, Ray Train's checkpoints included. The S3 settings reach the job only through the
    job's runtime env (the head never has them), and nothing of the run is written to local disk."""
    bucket = s3_server()
    settings = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    address, head_env = ray_head
    assert not [k for k in head_env if k.startswith("AWS_")], "the Ray head was started with S3 settings"
    head_temp = ray_start_temp_dir(address)
    runs_before = sorted((ROOT / "runs").iterdir()) if (ROOT / "runs").is_dir() else []
    prefix = "run"
    root = f"s3://{bucket}/{prefix}"

    t0 = time.time()
    # a smaller smoke run: what this test is about is S3 and the job's runtime env (test_end_to_end covers the
    # no-canon sub-run)
    small = {"zoo.n_models": 6, "sample.n": 4, "eval.compare_no_canon": "false", "flow.num_workers": 1}
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
    assert any(k.startswith(f"{prefix}/flow/ray_train/") for k in keys), "Ray Train checkpoints were not on S3"
    metrics = json.loads(read(f"{prefix}/report/metrics.json"))
    assert metrics["root"] == root and metrics["accuracy"]["generated"]["n"] == n_samples
    state, arch = load_model_state(canon["canon_uri"].iloc[1])   # read back here through the loader
    assert arch.family == "mlp" and state["net.0.weight"].shape == (32, 64)

    # nothing of the run on local disk: not in the job's working dir (under the head's temp dir), not in the repo
    assert head_temp.is_dir()
    assert not run_files(head_temp), run_files(head_temp)[:10]
    assert not [d for d in head_temp.rglob("*") if d.is_dir() and d.name in ("runs", "s3:", bucket)]
    runs_after = sorted((ROOT / "runs").iterdir()) if (ROOT / "runs").is_dir() else []
    assert runs_after == runs_before and not (ROOT / "s3:").exists()
