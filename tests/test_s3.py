"""S3 problems a user can act on (moto's server on loopback). The whole pipeline on an S3 root, as a Ray job:
tests/test_jobs.py."""
import json

import pytest

from dwf_ray.weights import load_model_state
from tests.presets import SMOKE


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
    from concurrent.futures import ThreadPoolExecutor
    bucket, locked = s3_server(), s3_server()
    boto3.client("s3").put_bucket_policy(Bucket=locked, Policy=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Principal": "*", "Action": "s3:*",
         "Resource": [f"arn:aws:s3:::{locked}", f"arn:aws:s3:::{locked}/*"]}]}))
    calls = [   # independent commands, run side by side
        (("zoo", "--preset", SMOKE, "--root", "s3://no-such-bucket-dwf/runs/x"), None),
        (("canon", "--root", f"s3://{bucket}/runs/never-made"), None),
        (("zoo", "import", f"s3://{bucket}/zoos/none/", "--arch",
          '{"family": "mlp", "args": {"in_dim": 64, "hidden": [32], "out_dim": 10}}', "--root", str(tmp_path / "imp")),
         None),
        (("zoo", "--preset", SMOKE, "--root", f"s3://{locked}/runs/x"), None),
        (("zoo", "--preset", SMOKE, "--root", f"s3://{bucket}/runs/y"), {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}),
    ]
    with ThreadPoolExecutor(len(calls)) as pool:
        missing, no_root, no_zoo, denied, silent = (one_error_line(r) for r in pool.map(
            lambda call: dwf_subprocess(*call[0], env=call[1]), calls))
    assert "bucket 'no-such-bucket-dwf'" in missing and "does not exist" in missing and "check" in missing
    assert f"s3://{bucket}/runs/never-made" in no_root and "no config.json" in no_root
    assert f"s3://{bucket}/zoos/none/" in no_zoo
    assert f"bucket '{locked}'" in denied and "access denied" in denied and "bucket policy" in denied
    assert "http://127.0.0.1:9 does not answer" in silent and f"bucket '{bucket}'" in silent
