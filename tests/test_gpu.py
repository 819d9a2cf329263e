"""Every GPU path against its CPU counterpart, and the GPU check script (bench/gpu_check.py) in its CPU mode.

The CUDA tests (names with "cuda") are skipped where torch sees no GPU; on a GPU machine they run on a Ray
started with the GPUs (``gpu_ray``), and ``python bench/gpu_check.py`` runs them before its timings.

Tolerances, and why:
- canonicalization: the same permutations, so the same canonical weights, bit for bit (the similarity matrices
  are float64 on both sides; their rounding never changes an assignment of these models).
- PCA (24 models, d = 84,994, k = 6 kept eigenvalues spanning a factor of 9), float32 products: eigenvalues
  to 1e-6 relative, components and latents to 1e-5 of their largest value (each float32 engine is within
  about 2e-7 of a float64 fit here: float32 carries 7 digits, blocks are summed in float64). bfloat16 inputs
  (8 significant bits, products in float32): eigenvalues and latents to 1e-3, components to 1e-2 (measured
  on the CPU with the same rounding: 1.5e-5, 2.3e-5 and 2.5e-3).
- flow training: the same seeds give the same initial net and the same noise draws (from CPU generators) on
  both; the GPU's float32 sums in another order make the runs drift apart, and dropout is off (its masks
  come from the device's generator). The held-out losses agree to 1 %, and samples from the same source
  noise to 2 % of their spread (on the CPU, latents moved by 1e-6 of themselves moved this flow's samples
  by 2e-7 of their spread: training here does not amplify rounding).
- scoring: float32 on both; a test example whose two top logits lie within rounding may flip, so accuracies
  and disagreements agree to two examples of the test split, similarities (IoUs of wrong sets) to three;
  weight distances (float64 matching) to 1e-6.
- Serve: the same seed gives the same source noise; the ODE solve in float32 on the GPU agrees to 1e-4.
"""
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import family_examples, random_flat_zoo, random_state

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not CUDA, reason="no GPU")

FLOW_LOSS_RTOL, FLOW_SAMPLE_RTOL = 0.01, 0.02
# (eigenvalues, components, latents): relative tolerances of the GPU's PCA against NumPy's (see the top)
PCA_TOLERANCE = {"float32": (1e-6, 1e-5, 1e-5), "bfloat16": (1e-3, 1e-2, 1e-3)}


def load_gpu_check():
    """bench/gpu_check.py as a module (bench/ is a folder of scripts, not a package)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)   # its dataclasses look it up there
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


@pytest.fixture(scope="module")
def gpu_ray():
    """Ray with this machine's GPUs: the running one if a test module already started it (it must have a GPU),
    else one started here with a few CPUs and every GPU, shut down after the module."""
    import ray
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=min(8, os.cpu_count() or 1), num_gpus=torch.cuda.device_count(),
                 object_store_memory=1 << 30, include_dashboard=False)
    assert ray.cluster_resources().get("GPU", 0) >= 1, "Ray is running without a GPU on a machine that has one"
    yield ray
    if started:
        ray.shutdown()


def gpus_held(ray, at_least: float, wait_s: float = 10.0) -> bool:
    """Whether ``at_least`` GPUs of the cluster are held by something (Ray's accounting lags a little)."""
    total = ray.cluster_resources().get("GPU", 0)
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if total - ray.available_resources().get("GPU", 0) >= at_least - 1e-9:
            return True
        time.sleep(0.2)
    return False


def structured_zoo(folder: Path, arch, n: int, scales: list[float], seed: int = 0) -> tuple[list[str], list[str]]:
    """n checkpoints: a shared mean, len(scales) strong directions whose spreads over the models have exactly
    these relative sizes (centred orthonormal coefficients), and noise."""
    from dwf_ray.weights import WeightLayout, save_checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    layout = WeightLayout.from_arch(arch)
    rng = np.random.default_rng(seed)
    d = layout.size
    coef = rng.normal(size=(n, len(scales)))
    coef = np.linalg.qr(coef - coef.mean(0))[0] * np.sqrt(n)
    signal = (coef * scales) @ rng.normal(size=(len(scales), d))
    x = (0.05 * rng.normal(size=d) + 0.02 * (signal + 0.1 * rng.normal(size=(n, d)))).astype(np.float32)
    uris = [str(folder / f"m{i:03d}.safetensors") for i in range(n)]
    for uri, row in zip(uris, x):
        save_checkpoint(uri, layout.unflatten(row), arch)
    return uris, [f"m{i:03d}" for i in range(n)]


# -- canonicalization -------------------------------------------------------------------------------------------
def permuted_zoo(folder: Path, arch, n: int) -> pd.DataFrame:
    """A zoo manifest: model 0 and n - 1 randomly permuted, noisy copies of it (matching has work to do)."""
    from dwf_ray.archs import permutation_spec
    from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
    from dwf_ray.weights import save_checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    spec = permutation_spec(arch).without_residual()
    ref = random_state(arch, 0)
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        state = ref if i == 0 else {
            k: (v + 0.1 * v.std() * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in apply_permutation(spec, random_permutation(spec, ref, seed=i), ref).items()}
        uri = str(folder / f"m{i:03d}.safetensors")
        save_checkpoint(uri, state, arch)
        rows.append({"model_id": f"m{i:03d}", "uri": uri, "arch": arch.to_json(), "status": "ok", "error": ""})
    return pd.DataFrame(rows)


@cuda
def test_cuda_task_device_is_cuda_only_in_tasks_given_a_gpu(gpu_ray):
    from dwf_ray.runtime import task_device
    probe = gpu_ray.remote(task_device)
    assert gpu_ray.get(probe.options(num_gpus=0.5).remote()) == "cuda"
    assert gpu_ray.get(probe.options(num_gpus=0).remote()) == "cpu"


@cuda
@pytest.mark.parametrize("family", ["resnet18-cifar", "vit"])
def test_cuda_canon_actors_on_a_gpu_find_the_cpu_permutations(gpu_ray, tmp_path, family):
    from dwf_ray.canon.job import canonicalize_manifest
    from dwf_ray.config import CanonConfig
    from dwf_ray.weights import load_model_state
    arch = family_examples()[family]
    man = permuted_zoo(tmp_path / "zoo", arch, 6)
    on_cpu = canonicalize_manifest(man, CanonConfig(), str(tmp_path / "cpu"))
    on_gpu = canonicalize_manifest(man, CanonConfig(actor_gpus=1.0), str(tmp_path / "gpu"))
    assert (on_cpu["status"] == "ok").all() and (on_gpu["status"] == "ok").all(), on_gpu["error"].tolist()
    for a, b in zip(on_cpu.itertuples(), on_gpu.itertuples()):
        state_cpu, _ = load_model_state(a.canon_uri, arch)
        state_gpu, _ = load_model_state(b.canon_uri, arch)
        for k in state_cpu:
            np.testing.assert_array_equal(state_gpu[k], state_cpu[k], err_msg=f"{a.model_id} {k}")
        assert b.dist_after == a.dist_after
    moved = on_gpu[on_gpu["model_id"] != "m000"]
    assert (moved["dist_after"] < 0.5 * moved["dist_before"]).all()      # the permutations were undone


# -- PCA --------------------------------------------------------------------------------------------------------
PCA_ARCH = {"family": "mlp", "args": {"in_dim": 64, "hidden": [256, 256], "out_dim": 10}}   # d = 84,994
PCA_K = 6


@pytest.fixture(scope="module")
def pca_zoo(tmp_path_factory):
    from dwf_ray.archs import ArchSpec
    arch = ArchSpec.parse(PCA_ARCH)
    uris, ids = structured_zoo(tmp_path_factory.mktemp("pca_zoo"), arch, 24, [3.0, 2.5, 2.0, 1.6, 1.3, 1.0])
    return uris, ids, arch


def basis(model) -> np.ndarray:
    return np.concatenate([s.basis for s in model.shards])


@cuda
@pytest.mark.parametrize("input_dtype", ["float32", "bfloat16"])
def test_cuda_torch_pca_engine_on_gpu_shards_matches_numpy(gpu_ray, pca_zoo, tmp_path, input_dtype):
    from dwf_ray.config import PCAConfig
    from dwf_ray.pca.model import PCAModel
    from dwf_ray.pca.shards import fit_distributed_pca
    from dwf_ray.weights import WeightLayout
    uris, ids, arch = pca_zoo
    layout = WeightLayout.from_arch(arch)
    exact = fit_distributed_pca(uris, ids, layout, PCAConfig(k=PCA_K, n_shards=2), str(tmp_path / "numpy"))
    held = []
    got = fit_distributed_pca(uris, ids, layout, PCAConfig(k=PCA_K, n_shards=2, shard_gpus=0.5,
                                                           input_dtype=input_dtype), str(tmp_path / "gpu"),
                              on_stage=lambda stage, actors: held.append(gpus_held(gpu_ray, 1.0)))
    assert exact["engine"] == "numpy" and got["engine"] == "torch" and got["input_dtype"] == input_dtype
    assert held == [True, True]                       # both shard actors hold their half GPU in each pass
    eigen_rtol, component_tol, latent_tol = PCA_TOLERANCE[input_dtype]
    np.testing.assert_allclose(got["eigenvalues"], exact["eigenvalues"], rtol=eigen_rtol)
    b_exact, b_got = basis(PCAModel.load(str(tmp_path / "numpy"))), basis(PCAModel.load(str(tmp_path / "gpu")))
    np.testing.assert_array_equal(b_got[:, 0], b_exact[:, 0])       # the mean: the same float64 sums on the host
    np.testing.assert_allclose(b_got[:, 1:], b_exact[:, 1:],       # one sign convention on both
                               atol=component_tol * np.abs(b_exact[:, 1:]).max())
    z_exact = PCAModel.load_latents(str(tmp_path / "numpy"))
    np.testing.assert_allclose(PCAModel.load_latents(str(tmp_path / "gpu")), z_exact,
                               atol=latent_tol * np.abs(z_exact).max())


# -- flow training, sampling and Serve over one small run root ----------------------------------------------------
FLOW = {"hidden": 128, "depth": 2, "time_dim": 32, "dropout": 0.0, "lr": 1e-3, "steps": 400, "eval_every": 100,
        "warmup_steps": 20, "batch_size": 32, "num_workers": 1, "seed": 3}


@pytest.fixture(scope="module")
def gpu_run(gpu_ray, tmp_path_factory):
    """A run root (config.json, pca/, flow/) whose flow trained on one GPU worker, and the same flow trained on
    one CPU worker under cpu_flow/: (root, GPU training info, CPU training info)."""
    from dwf_ray import store
    from dwf_ray.archs import ArchSpec
    from dwf_ray.config import FlowConfig, PCAConfig, RunConfig
    from dwf_ray.flow.train import train_flow
    from dwf_ray.pca.model import PCAModel
    from dwf_ray.pca.shards import fit_distributed_pca
    from dwf_ray.weights import WeightLayout
    root = tmp_path_factory.mktemp("gpu_run")
    cfg = RunConfig()
    arch = ArchSpec.parse(cfg.zoo.arch)
    uris, ids = structured_zoo(root / "zoo", arch, 64, [3.0, 2.0, 1.5, 1.0])
    fit_distributed_pca(uris, ids, WeightLayout.from_arch(arch), PCAConfig(k=4, n_shards=1), str(root / "pca"))
    store.write_json(str(root / "config.json"), cfg.model_dump())
    z = PCAModel.load_latents(str(root / "pca"))
    on_gpu = train_flow(z, FlowConfig(**FLOW, use_gpu=True), str(root / "flow"))
    on_cpu = train_flow(z, FlowConfig(**FLOW, use_gpu=False), str(root / "cpu_flow"))
    return root, on_gpu, on_cpu


def nearest_distance(samples: np.ndarray, zoo: np.ndarray) -> float:
    """Mean distance from each sample to its nearest zoo latent."""
    return float(np.sqrt(((samples[:, None] - zoo[None]) ** 2).sum(-1)).min(1).mean())


@cuda
def test_cuda_flow_trained_on_a_gpu_worker_samples_like_the_cpu_one(gpu_run):
    from dwf_ray.archs import ArchSpec
    from dwf_ray.config import RunConfig
    from dwf_ray.flow.checkpoint import load_flow
    from dwf_ray.pca.model import PCAModel
    from dwf_ray.sample.generator import Decoder, Generator
    root, on_gpu, on_cpu = gpu_run
    assert on_gpu["best_heldout_loss"] == pytest.approx(on_cpu["best_heldout_loss"], rel=FLOW_LOSS_RTOL)
    assert [h["step"] for h in on_gpu["history"]] == [100, 200, 300, 400]
    pca, arch = PCAModel.load(str(root / "pca")), ArchSpec.parse(RunConfig().zoo.arch)
    samples = {}
    for name, folder, device in (("gpu", "flow", "cuda"), ("cpu", "cpu_flow", "cpu")):
        net, scaler, cfg = load_flow(str(root / folder / "model.pt"))
        samples[name] = Generator(net, cfg, [Decoder(scaler, pca, arch)], device=device).latents(512, seed=5)
    a, b = samples["gpu"], samples["cpu"]
    spread = np.linalg.norm(b - b.mean(0), axis=1).mean()
    assert np.median(np.linalg.norm(a - b, axis=1)) < FLOW_SAMPLE_RTOL * spread     # same noise, same place
    zoo = PCAModel.load_latents(str(root / "pca"))
    assert nearest_distance(a, zoo) == pytest.approx(nearest_distance(b, zoo), rel=FLOW_SAMPLE_RTOL)


@cuda
def test_cuda_serve_replica_with_a_gpu_answers_like_the_cpu_replica(gpu_ray, gpu_run):
    from ray import serve
    from dwf_ray.serve.app import make_app
    from dwf_ray.serve.client import SampleClient
    from dwf_ray.serve.config import ServeConfig
    root = str(gpu_run[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run_many([serve.RunTarget(make_app(root, ServeConfig(num_gpus=0.5)), name="gpu", route_prefix="/gpu"),
                        serve.RunTarget(make_app(root, ServeConfig()), name="cpu", route_prefix="/cpu")])
        assert gpus_held(gpu_ray, 0.5)
        url = f"http://127.0.0.1:{port}"
        with SampleClient(f"{url}/gpu", read_timeout_s=120) as g, SampleClient(f"{url}/cpu", read_timeout_s=120) as c:
            on_gpu, on_cpu = g.sample(4, seed=11), c.sample(4, seed=11)
    finally:
        serve.shutdown()
    assert len(on_gpu) == len(on_cpu) == 4
    for a, b in zip(on_gpu, on_cpu):
        assert a.keys() == b.keys()
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4 * np.abs(b[k]).max(), err_msg=k)


# -- scoring ------------------------------------------------------------------------------------------------------
@cuda
def test_cuda_scoring_on_gpu_tasks_equals_cpu_scoring(gpu_ray):
    from dwf_ray.archs import ArchSpec
    from dwf_ray.config import RunConfig
    from dwf_ray.data import dataset_for
    from dwf_ray.eval.judge import ZooJudge
    base = RunConfig().with_values({"eval.chunk_models": 4})
    arch = ArchSpec.parse(base.zoo.arch)
    flat = random_flat_zoo(arch, 20)
    results = {}
    for gpus in (0.0, 0.25):           # eval.num_gpus: each scoring and matching task on a quarter GPU
        judge = ZooJudge(arch, base.with_values({"eval.num_gpus": gpus}), flat[:12])
        results[gpus] = (judge.result, judge(flat[12:]))
    one = 1 / len(dataset_for(base.zoo).test.y)
    for on_cpu, on_gpu in zip(results[0.0], results[0.25]):
        np.testing.assert_allclose(on_gpu.acc, on_cpu.acc, atol=2 * one)
        np.testing.assert_allclose(on_gpu.disagreement, on_cpu.disagreement, atol=2 * one)
        np.testing.assert_allclose(on_gpu.similarity, on_cpu.similarity, atol=3 * one)
        np.testing.assert_allclose(on_gpu.weight_dist, on_cpu.weight_dist, rtol=1e-6)


# -- the generation bench's device-held decoder, and the GPU check script -------------------------------------
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda)])
def test_device_basis_decodes_like_the_pca_model(device):
    """The bench's bfloat16 decoder against PCAModel.decode over the same (rounded) components: the only
    difference is the latents' rounding to bfloat16, at most 2^-8 of each term of [1, z] @ basis."""
    gpu_check = load_gpu_check()
    k, d = 9, 5000
    basis = gpu_check.DeviceBasis.synthetic(k, d, device, seed=3)
    assert basis.basis.device.type == device
    assert basis.basis.dtype == (torch.bfloat16 if device == "cuda" else torch.float32)
    model = basis.pca_model(d)
    z = np.random.default_rng(0).normal(size=(4, k)).astype(np.float32)
    got, exact = basis.decode(z), model.decode(z)
    assert got.shape == (4, d) and got.dtype == np.float32
    z1 = np.hstack([np.ones((4, 1), dtype=np.float32), z])
    bound = 2.0 ** -7 * (np.abs(z1) @ np.abs(model.shards[0].basis.T))
    assert (np.abs(got - exact) <= bound).all()
    assert not np.array_equal(got, exact)        # the latents really are rounded


def run_script(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_gpu_check_script_runs_every_part_on_the_cpu(tmp_path):
    gpu_check = load_gpu_check()
    proc, report = run_script(tmp_path, "--budget-s", "150")
    parts = report["parts"]
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(gpu_check.PARTS, "ok"), parts
    tests = parts["tests"]
    assert tests["failed"] == 0 and tests["passed"] + tests["skipped"] >= 9
    if not CUDA:
        assert tests["passed"] == 0 and all(c["outcome"] == "skipped" for c in tests["tests"])
    assert all(v["same_permutations"] and v["device_models_per_s"] > 0 and v["cpu_models_per_s"] > 0
               for k, v in parts["canon"].items() if isinstance(v, dict))
    runs = parts["pca"]["runs"]
    assert set(runs) == {"numpy-float32", "torch-float32", "torch-bfloat16"}
    assert runs["torch-float32"]["eigenvalue_max_rel_diff"] < 1e-5
    assert 1e-7 < runs["torch-bfloat16"]["eigenvalue_max_rel_diff"] < 1e-2
    assert all(r["products_s"] > 0 and r["limit_s"] > 0 for r in runs.values())
    assert parts["flow"]["device_steps_per_s"] > 0 and parts["flow"]["cpu_steps_per_s"] > 0
    gen = parts["generate"]
    assert 0 < gen["decode_max_rel_diff"] < 2.0 ** -6
    assert set(gen["batches"]) == {"1", "4"}
    assert all(b["device_seconds_per_model"] > 0 and b["cpu_seconds_per_model"] > 0 for b in gen["batches"].values())
    for name in gpu_check.PARTS:                   # one table, a row per measure
        assert name in proc.stdout
    assert len(report["table"]) >= 12


def test_gpu_check_script_skips_what_does_not_fit_its_budget(tmp_path):
    proc, report = run_script(tmp_path, "--budget-s", "3", "--parts", "limits,canon,pca,flow,generate")
    parts = report["parts"]
    assert parts["limits"]["status"] in ("ok", "stopped")
    for name in ("canon", "pca", "flow", "generate"):
        assert parts[name]["status"] == "skipped" and "s left" in parts[name]["reason"], parts[name]
        assert name in proc.stdout
    assert report["seconds"] < 15
