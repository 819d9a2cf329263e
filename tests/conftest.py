"""Session fixtures: one small local Ray cluster and one moto S3 server on loopback for the whole run."""
import os
import socket

# Before Ray is imported anywhere (see README, "Ray settings").
os.environ.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
                   "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_S3_PORT = _free_port()
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_S3_PORT}"})

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1; yields a fresh bucket name factory."""
    import boto3
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_S3_PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    counter = iter(range(10_000))

    def new_bucket() -> str:
        name = f"dwf-test-{next(counter)}"
        client.create_bucket(Bucket=name)
        return name

    yield new_bucket
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the session (2 CPUs, small object store); S3 settings reach its workers."""
    import ray
    from dwf_ray.runtime import ensure_ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
    ensure_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small nets and matrices run fastest on one torch thread and do not spin on a busy 2-core machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dwf(*args: str) -> str:
    """The `dwf` command in this process; fails the test with its output unless it exits 0."""
    from typer.testing import CliRunner
    from dwf_ray.cli import app
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, ray_session):
    """A finished run root of the smoke preset (every stage), shared by the tests that read one."""
    from tests.presets import SMOKE
    root = tmp_path_factory.mktemp("runs") / "smoke"
    out = dwf("run", "--preset", SMOKE, "--root", str(root))
    return root, out
