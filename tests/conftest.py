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


# -- one small example of every architecture family, and helpers for the family contracts -----------------
def family_examples() -> dict:
    """name -> ArchSpec: at least one small model of every registered family."""
    from dwf_ray.archs import ArchSpec
    return {
        "mlp": ArchSpec("mlp", {"in_dim": 64, "hidden": [32, 32], "out_dim": 10}),
        "mlp-deep-tanh": ArchSpec("mlp", {"in_dim": 8, "hidden": [16, 12, 20], "out_dim": 4, "activation": "tanh"}),
        "mlp-residual": ArchSpec("mlp", {"in_dim": 8, "hidden": [16, 16, 16], "out_dim": 4, "residual": True}),
        "cnn": ArchSpec("cnn", {"in_channels": 1, "image_size": 8, "channels": [16, 32], "n_classes": 10}),
        "cnn-nopool": ArchSpec("cnn", {"in_channels": 3, "image_size": 8, "channels": [8, 12, 16], "n_classes": 5,
                                       "pool": False}),
        "cnn1d": ArchSpec("cnn1d", {"in_length": 40, "channels": [6, 5, 4], "kernels": [5, 3, 3], "strides": [2, 2, 2],
                                    "n_classes": 10}),
        "resnet18-cifar": ArchSpec("resnet18", {"num_classes": 10, "cifar_stem": True, "width": 8}),
        "resnet18-imagenet-stem": ArchSpec("resnet18", {"num_classes": 10, "in_channels": 1, "width": 8}),
        "resnet20": ArchSpec("resnet20", {"num_classes": 10, "width": 8}),
        "vit": ArchSpec("vit", {"image_size": 8, "patch_size": 2, "num_layers": 2, "num_heads": 4, "hidden_dim": 32,
                                "mlp_dim": 64, "num_classes": 10, "in_channels": 1}),
        "bert": ArchSpec("bert", {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 16,
                                  "num_labels": 3}),
        "mz-cnn": ArchSpec("mz-cnn", {"in_channels": 1, "image_size": 28, "activation": "leakyrelu"}),
        "mz-cnn-dropout-rgb": ArchSpec("mz-cnn", {"in_channels": 3, "image_size": 28, "activation": "tanh",
                                                  "dropout": 0.2}),
        "mz-cnn3": ArchSpec("mz-cnn3", {"in_channels": 3, "image_size": 32, "activation": "gelu"}),
    }


def random_state(arch, seed: int) -> dict:
    """Every floating tensor of an initialised model, with BatchNorm affine and running statistics random and
    noise on constant-initialised tensors (zero biases, LayerNorms), so that each must follow its channel."""
    import torch
    from dwf_ray.archs import build_model
    torch.manual_seed(seed)
    model = build_model(arch)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(0.1 * torch.randn_like(p))
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def example_inputs(arch, n: int = 16, seed: int = 123):
    """A seeded batch the model takes: features, images, or token ids with padding."""
    import torch
    g = torch.Generator().manual_seed(seed)
    if arch.family == "mlp":
        return torch.randn(n, arch.args["in_dim"], generator=g)
    if arch.family == "cnn1d":
        return torch.randn(n, arch.args["in_length"], generator=g)
    if arch.family == "bert":
        ids = torch.randint(1, arch.args["vocab_size"], (n, 12), generator=g)
        for row, length in enumerate(torch.randint(3, 13, (n,), generator=g).tolist()):
            ids[row, length:] = 0  # padding
        return ids
    size = arch.args.get("image_size", 16)
    return torch.randn(n, arch.args.get("in_channels", 3), size, size, generator=g)


def outputs(arch, state: dict):
    import torch
    from dwf_ray.weights import to_module
    with torch.no_grad():
        return to_module(arch, state)(example_inputs(arch)).numpy()


def assert_same_function(arch, a: dict, b: dict) -> None:
    import numpy as np
    out_a, out_b = outputs(arch, a), outputs(arch, b)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-4, atol=1e-4 * np.abs(out_a).max())


def random_flat_zoo(arch, n: int):
    """(n, d) flat parameters of freshly initialised models of ``arch`` (seeds 0..n-1), no training."""
    import numpy as np
    import torch
    from dwf_ray.archs import build_model
    from dwf_ray.weights import WeightLayout
    layout = WeightLayout.from_arch(arch)
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(layout.flatten({k: v.detach().numpy() for k, v in build_model(arch).named_parameters()}))
    return np.stack(out)
