"""`ray job submit` of pipeline stages against a real Ray head started by `ray start`."""
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

from tests.cluster_helpers import stop_group
from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ray_head(tmp_path):
    """A separate Ray head on loopback (`ray start --head --block`); stopping it stops only what it started."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
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
                             "--disable-usage-stats"], env=env, stdout=open(tmp_path / "head.log", "w"),
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
                raise RuntimeError(f"Ray head did not start:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
    yield address, env
    stop_group(proc)      # `ray start --block` may linger a minute after its node stopped: its group is killed
    shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, env: dict, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.time() + 120
    while True:
        out = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address,
                              "--working-dir", str(ROOT), "--", *entrypoint], env=env, capture_output=True, text=True,
                             timeout=300)
        if "No available agent" not in out.stderr + out.stdout or time.time() > deadline:
            return out
        time.sleep(3)


def test_stages_run_as_ray_jobs(ray_head, tmp_path):
    address, env = ray_head
    root = tmp_path / "run"
    for stage, extra in [("zoo", ["--preset", "tests/presets/smoke.json", "--set", "zoo.n_models=4"]), ("canon", [])]:
        out = submit(address, env, ["python", "jobs/run.py", stage, "--root", str(root), *extra])
        assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
        assert f"[{stage}] done" in out.stdout
    canon = pd.read_parquet(root / "canonical" / "manifest.parquet")
    assert len(canon) == 4 and (canon["status"] == "ok").all()
