"""The GPU check: the CUDA tests, then every GPU path timed against the CPU in the same run, in one command.

    python bench/gpu_check.py                  # a machine with a CUDA GPU: full shapes, under 8 minutes on an H100
    python bench/gpu_check.py --device cpu     # small shapes on the CPU, the same code (CI runs this)

Parts, in order (``--parts`` picks some):
- tests: ``pytest -k cuda`` over tests/test_gpu.py and tests/test_transfusion.py (skipped there without a GPU).
- limits: what this machine's GPU and CPU reach here: matrix products (float32, bfloat16), device memory
  bandwidth, host-to-device copies; the PCA rows are set against them.
- canon: weight matching (``canonicalize``) of ResNet-18- and ViT-Small-shaped checkpoints, models/s on the
  device against NumPy on the CPU; both must find the same permutations.
- pca: the dual PCA of a ResNet-18-shaped zoo (n = 100, k = 99): a GramShard's Gram pass, eigh and components
  pass with the NumPy engine and the torch engine (float32 and bfloat16 inputs), each against its limit.
- flow: flow-matching training steps/s of the paper's velocity net (``FlowTrainer``) on the device vs the CPU.
- generate: BERT-Base-shaped models (d = 110M) from a synthetic PCA (k = 99) whose components stay on the
  GPU in bfloat16: the Generator's ODE solve on the device, then [1, z] @ basis there, weights copied to the
  host; seconds per model and models per minute against the paper's 21 s. The CPU side is the project's
  Generator and PCAModel.decode on a slice of the columns, scaled to d (components of 110M x 100 float32 do
  not fit a CPU comfortably; the table says so).

A part that would not fit the time left (``--budget-s``) is skipped and recorded as such; one that runs out of
time mid-way stops and is recorded as "stopped". Writes one JSON file (``--out``) and prints one table.
Exit status 1 when a test or a part failed, else 0.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
               "HF_HUB_OFFLINE": "1"}.items():    # before Ray is imported (see README, "Ray settings")
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))          # the other benches of this folder

from canon_speed import derived_models  # noqa: E402
from dwf_ray.archs import ArchSpec, permutation_spec  # noqa: E402
from dwf_ray.canon.matching import canonicalize  # noqa: E402
from dwf_ray.config import FlowConfig  # noqa: E402
from dwf_ray.flow.checkpoint import LatentScaler  # noqa: E402
from dwf_ray.flow.model import build_velocity_net  # noqa: E402
from dwf_ray.flow.trainer import FlowTrainer, noise_generator  # noqa: E402
from dwf_ray.pca.dual import centre_gram, component_weights, oriented, top_eigen  # noqa: E402
from dwf_ray.pca.gram import GramShard, TorchEngine, plan_blocks  # noqa: E402
from dwf_ray.pca.shardfile import Shard  # noqa: E402
from dwf_ray.pca.model import PCAModel  # noqa: E402
from dwf_ray.sample.generator import Decoder, Generator  # noqa: E402
from dwf_ray.weights import WeightLayout  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PAPER_SECONDS_PER_MODEL = 21.0      # DeepWeightFlow: one BERT-Base generated in about 21 s on a GPU
PARTS = ("tests", "limits", "canon", "pca", "flow", "generate")
TEST_FILES = ("tests/test_gpu.py", "tests/test_transfusion.py")
BERT_BASE = ArchSpec("bert", {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                              "num_attention_heads": 12, "intermediate_size": 3072,
                              "max_position_embeddings": 512, "num_labels": 2})
VIT_SMALL = ArchSpec("vit", {"image_size": 32, "patch_size": 4, "num_layers": 6, "num_heads": 3, "hidden_dim": 192,
                             "mlp_dim": 768, "num_classes": 10})     # the DeepWeightFlow code's ViT-Small

# Shapes of each mode: "cuda" the issue's, "cpu" small enough for CI. estimate_s: what a part needs at most
# (it is skipped when less time is left); the tests get what the timed parts do not need.
SHAPES = {
    "cuda": {"canon": {"resnet18": ArchSpec("resnet18", {"num_classes": 10, "cifar_stem": True}),
                       "vit_small": VIT_SMALL},
             "canon_models": 3, "pca_arch": ArchSpec("resnet18", {"num_classes": 10, "cifar_stem": True}),
             "pca_n": 100, "pca_budget": 16 << 30, "flow": FlowConfig.paper(), "flow_seconds": 4.0,
             "gen_arch": BERT_BASE, "gen_k": 99, "gen_batches": (1, 8), "gen_cpu_columns": 8_000_000,
             "gen_flow": FlowConfig.paper(), "gen_steps": 100,
             "limit_size": 8192, "copy_bytes": 1 << 30,
             "estimate_s": {"tests": 230, "limits": 15, "canon": 60, "pca": 60, "flow": 25, "generate": 60}},
    "cpu": {"canon": {"resnet18": ArchSpec("resnet18", {"num_classes": 10, "cifar_stem": True, "width": 4}),
                      "vit_small": ArchSpec("vit", {**VIT_SMALL.args, "num_layers": 1, "hidden_dim": 24,
                                                    "mlp_dim": 48})},
            "canon_models": 2, "pca_arch": ArchSpec("resnet18", {"num_classes": 10, "cifar_stem": True, "width": 4}),
            "pca_n": 100, "pca_budget": 2 << 30, "flow": FlowConfig.paper(hidden=64), "flow_seconds": 0.2,
            # generation: a small MLP's layout (the decode only needs d; a BERT would import transformers)
            "gen_arch": ArchSpec("mlp", {"in_dim": 64, "hidden": [128, 128], "out_dim": 10}),
            "gen_k": 99, "gen_batches": (1, 4), "gen_cpu_columns": 10_000, "limit_size": 512, "copy_bytes": 1 << 26,
            "gen_flow": FlowConfig.paper(hidden=64), "gen_steps": 10,
            "estimate_s": {"tests": 60, "limits": 2, "canon": 8, "pca": 8, "flow": 5, "generate": 8}},
}


class OutOfTime(Exception):
    """The check's budget ran out while a part was running."""


@dataclass
class Clock:
    deadline: float

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, object]:
    """(wall seconds, result) of ``fn()``, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- tests
def run_tests(clock: Clock, timeout_s: float, out_dir: Path) -> dict:
    """``pytest -k cuda`` in its own process group (killed as a whole when it outlasts ``timeout_s``)."""
    xml = out_dir / "gpu_check_tests.xml"
    xml.unlink(missing_ok=True)                     # never read an earlier run's results
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", f"--junitxml={xml}",
           f"--timeout={max(30, int(timeout_s) - 10)}", *TEST_FILES]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, min(timeout_s, clock.left())))
        finished = True
    except (subprocess.TimeoutExpired, OutOfTime):
        _stop_group(proc)
        output, finished = proc.communicate()[0] or "", False
    result = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "output_tail": output[-3000:]}
    if not finished:
        return result | {"status": "stopped", "reason": f"the tests outlasted {timeout_s:.0f} s"}
    result["tests"] = _junit_cases(xml)
    counts = {k: sum(1 for c in result["tests"] if c["outcome"] == k) for k in ("passed", "failed", "skipped")}
    ok = proc.returncode in (0, 5) and counts["failed"] == 0       # 5: nothing collected
    return result | counts | {"status": "ok" if ok else "failed"}


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the test process group (pytest and the Ray it started), SIGKILL after 15 s."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _junit_cases(xml: Path) -> list[dict]:
    if not xml.exists():
        return []
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0)})
    return cases


# ----------------------------------------------------------------------------- limits
def measure_limits(device: str, size: int, nbytes: int) -> dict:
    """Matrix-product rates (float32 and bfloat16, ``size`` cubed) and memory bandwidths (copies of ``nbytes``)
    this run reaches, on the device and on the CPU: the measured ceilings the PCA rows are set against."""
    out = {"cpu_gemm_float32_flops": _gemm_rate("cpu", torch.float32, min(size, 2048)),
           "cpu_copy_bytes_per_s": _copy_rate("cpu", nbytes)}
    if device == "cuda":
        out |= {"device_gemm_float32_flops": _gemm_rate("cuda", torch.float32, size),
                "device_gemm_bfloat16_flops": _gemm_rate("cuda", torch.bfloat16, size),
                "device_copy_bytes_per_s": _copy_rate("cuda", 2 * nbytes),
                "host_to_device_bytes_per_s": _host_to_device_rate(nbytes)}
    else:       # the "device" is the CPU: the same ceilings
        out |= {"device_gemm_float32_flops": out["cpu_gemm_float32_flops"],
                "device_gemm_bfloat16_flops": out["cpu_gemm_float32_flops"],
                "device_copy_bytes_per_s": out["cpu_copy_bytes_per_s"],
                "host_to_device_bytes_per_s": out["cpu_copy_bytes_per_s"]}
    return {"status": "ok", **out}


def _best_of(fn, device: str, repeats: int = 3) -> float:
    fn()                                             # warm-up: kernels chosen, memory touched
    return min(timed(fn, device)[0] for _ in range(repeats))


def _gemm_rate(device: str, dtype, size: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size ** 3 / _best_of(lambda: a @ b, device)


def _copy_rate(device: str, nbytes: int) -> float:
    """Bytes read plus bytes written per second of a large copy."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_of(lambda: dst.copy_(src), device)


def _host_to_device_rate(nbytes: int) -> float:
    """From a NumPy array, as the torch PCA engine uploads its blocks (pageable memory)."""
    host = np.ones(nbytes // 4, dtype=np.float32)
    return nbytes / _best_of(lambda: torch.from_numpy(host).to("cuda"), "cuda")


# ----------------------------------------------------------------------------- canon
def bench_canon(shapes: dict, device: str, clock: Clock) -> dict:
    """Per family: models/s of ``canonicalize`` on the device and with NumPy, and whether both found the same
    permutations. The first device model is a warm-up (CUDA context, kernels) and is not timed."""
    out = {}
    for family, arch in shapes["canon"].items():
        spec = permutation_spec(arch)
        ref, models = derived_models(arch, shapes["canon_models"])
        on_device = torch.device(device)        # a torch.device: the torch code path, also on the CPU
        canonicalize(spec, ref, models[0][0], device=on_device)
        times = {"device": [], "cpu": []}
        same = True
        for other, _ in models[1:]:
            t_dev, (_, perm_dev) = timed(lambda: canonicalize(spec, ref, other, device=on_device), device)
            t_cpu, (_, perm_cpu) = timed(lambda: canonicalize(spec, ref, other), "cpu")
            times["device"].append(t_dev)
            times["cpu"].append(t_cpu)
            same &= all(np.array_equal(perm_dev[p], perm_cpu[p]) for p in perm_cpu)
            if clock.left() < 0:
                raise OutOfTime
        d = WeightLayout.from_arch(arch).size
        out[family] = {"d": d, "models_timed": len(times["cpu"]), "same_permutations": bool(same),
                       "device_models_per_s": len(times["device"]) / sum(times["device"]),
                       "cpu_models_per_s": len(times["cpu"]) / sum(times["cpu"])}
    return {"status": "ok" if all(v["same_permutations"] for v in out.values()) else "failed", **out}


# ----------------------------------------------------------------------------- pca
@dataclass(frozen=True)
class MemoryColumns:
    """One model's flat weights held in memory, read like ``pca.reader.ModelColumns``: the PCA timings are
    the products and passes of a GramShard, not the disk."""
    row: np.ndarray
    uri: str = "memory"

    def read(self, start: int, stop: int, out: np.ndarray) -> int:
        out[:] = self.row[start:stop]
        return 4 * (stop - start)


def synthetic_zoo(n: int, d: int, device: str, seed: int = 0) -> np.ndarray:
    """(n, d) float32 weights: a shared mean plus Gaussian spread, drawn on the device (fast) and copied here."""
    g = torch.Generator(device=device).manual_seed(seed)
    mean = 0.05 * torch.randn(d, generator=g, device=device)
    x = np.empty((n, d), dtype=np.float32)
    for row in x:
        row[:] = (mean + 0.01 * torch.randn(d, generator=g, device=device)).cpu().numpy()
    return x


def fit_one_shard(sources: list, d: int, k: int, engine: str, input_dtype: str, device: str, budget: int,
                  out_dir: str) -> dict:
    """The Gram side of ``pca.shards._fit_gram`` with one GramShard in this process: the Gram pass, eigh of
    the n x n matrix, the components pass (written to ``out_dir``); the wall time of each and the shard's own
    step times."""
    plan = plan_blocks(len(sources), d, budget, "float32", engine)
    shard = GramShard(sources, 0, d, plan, engine, "float32", input_dtype)
    if engine == "torch":           # the device this check runs on (make_engine takes any GPU it sees)
        shard.engine = TorchEngine("float32", input_dtype, device)
    t_gram, gram = timed(shard.gram, device)
    t_eigh, eig = timed(lambda: oriented(top_eigen(centre_gram(gram), k=k)), "cpu")
    t_comp, _ = timed(lambda: shard.components(component_weights(eig), os.path.join(out_dir, "shard.safetensors")),
                      device)
    steps = shard.stats()["seconds"]
    return {"engine": engine, "input_dtype": input_dtype, "block": plan.block, "cached": plan.cache,
            "gram_pass_s": t_gram, "eigh_s": t_eigh, "components_pass_s": t_comp,
            "products_s": steps.get("gram", 0.0) + steps.get("project", 0.0),
            "read_s": steps.get("read", 0.0), "write_wait_s": steps.get("write_wait", 0.0),
            "eigenvalues": eig.values}


def pca_limit_s(n: int, d: int, k: int, engine: str, input_dtype: str, limits: dict) -> float:
    """The fewest seconds the products of both passes can take here: the larger of their arithmetic at the
    measured matrix rate and the bytes they must move at the measured bandwidth: the float32 zoo once per pass
    and the float32 components once (the torch engine uploads each block to the device and brings its
    components back, taken here at the host-to-device rate; the NumPy engine reads and writes memory)."""
    flops = 2 * n * n * d + 2 * n * d * k
    moved = 4 * (2 * n * d + d * k)
    if engine == "numpy":
        rate, bandwidth = limits["cpu_gemm_float32_flops"], limits["cpu_copy_bytes_per_s"] / 2
    else:
        rate = limits["device_gemm_bfloat16_flops" if input_dtype != "float32" else "device_gemm_float32_flops"]
        bandwidth = limits["host_to_device_bytes_per_s"]
    return max(flops / rate, moved / bandwidth)


PCA_RUNS = (("numpy", "float32"), ("torch", "float32"), ("torch", "bfloat16"))


def bench_pca(shapes: dict, device: str, clock: Clock, limits: dict) -> dict:
    """The NumPy engine on the CPU and the torch engine on the device (float32 and bfloat16 inputs) over one
    synthetic zoo; each run's products against its limit, and its eigenvalues against NumPy's."""
    arch, n = shapes["pca_arch"], shapes["pca_n"]
    d, k = WeightLayout.from_arch(arch).size, n - 1
    sources = [MemoryColumns(row) for row in synthetic_zoo(n, d, device)]
    runs = {}
    for engine, input_dtype in PCA_RUNS:
        if clock.left() < 0:
            raise OutOfTime
        with tempfile.TemporaryDirectory() as tmp:
            run = fit_one_shard(sources, d, k, engine, input_dtype, device if engine == "torch" else "cpu",
                                shapes["pca_budget"], tmp)
        run["limit_s"] = pca_limit_s(n, d, k, engine, input_dtype, limits) if limits else None
        runs[f"{engine}-{input_dtype}"] = run
    exact = runs["numpy-float32"]["eigenvalues"]
    for run in runs.values():
        run["eigenvalue_max_rel_diff"] = float(np.max(np.abs(run["eigenvalues"] - exact) / exact))
    for run in runs.values():
        del run["eigenvalues"]
    return {"status": "ok", "arch": arch.family, "n": n, "d": d, "k": k, "runs": runs}


# ----------------------------------------------------------------------------- flow
def bench_flow(shapes: dict, device: str, clock: Clock) -> dict:
    """Training steps/s of one ``FlowTrainer`` (the Ray Train worker's optimiser) on the device and on the
    CPU: the paper's velocity net on k = 99 latents, its batch, fresh noise each step, EMA, loss read back."""
    cfg, dim = shapes["flow"], shapes["gen_k"]
    z = torch.randn(1000, dim, generator=torch.Generator().manual_seed(0))
    out = {"dim": dim, "hidden": cfg.hidden, "depth": cfg.depth, "batch_size": cfg.batch_size}
    for side, dev in (("device", device), ("cpu", "cpu")):
        trainer = FlowTrainer(cfg, dim, wrap=lambda net, dev=dev: net.to(dev))
        g = noise_generator(cfg.seed)

        def steps(count: int) -> None:
            for _ in range(count):
                trainer.step(z[torch.randint(len(z), (cfg.batch_size,), generator=g)], g)
        steps(10)                               # warm-up
        count, seconds = 0, 0.0
        while seconds < shapes["flow_seconds"]:
            if clock.left() < 0:
                raise OutOfTime
            seconds += timed(lambda: steps(20), dev)[0]
            count += 20
        out[f"{side}_steps_per_s"] = count / seconds
    return {"status": "ok", **out}


# ----------------------------------------------------------------------------- generate
class DeviceBasis:
    """A PCA decoder whose mean and components stay on a torch device: ``basis`` (1 + k, d), row 0 the mean,
    rows 1.. the components, in bfloat16 on CUDA (on the CPU, which has no mixed-precision product, the same
    bfloat16-rounded values in float32). ``decode(z)`` is ``PCAModel.decode``'s [1, z] @ basis there, with
    the torch PCA engine's products (bfloat16 inputs, float32 results), copied to host memory."""

    def __init__(self, basis: torch.Tensor, device: str):
        self.basis, self.engine = basis, TorchEngine("float32", "bfloat16", device)

    @classmethod
    def synthetic(cls, k: int, d: int, device: str, seed: int = 0) -> "DeviceBasis":
        """A mean of scale 0.02 and k components of unit norm (about), drawn row by row on the device."""
        g = torch.Generator(device=device).manual_seed(seed)
        basis = torch.empty((1 + k, d), dtype=torch.bfloat16, device=device)
        for i in range(1 + k):
            basis[i] = torch.randn(d, generator=g, device=device) * (0.02 if i == 0 else d ** -0.5)
        return cls(basis if device == "cuda" else basis.float(), device)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """(m, k) latents -> (m, d) float32 weights in host memory."""
        z1 = np.hstack([np.ones((len(z), 1), dtype=np.float32), np.asarray(z, dtype=np.float32)])
        return self.engine._mm(self.engine._put(z1), self.basis).cpu().numpy()

    def pca_model(self, columns: int) -> PCAModel:
        """The first ``columns`` columns as the project's PCAModel (float32, in host memory)."""
        basis = self.basis[:, :columns].float().cpu().numpy()
        return PCAModel({"d": columns, "k": len(basis) - 1}, [Shard(0, columns, basis.T)])


def bench_generate(shapes: dict, device: str, clock: Clock) -> dict:
    """Seconds per generated model, batch by batch: the Generator's RK4 solve (the paper's sampler: 100 steps;
    10 in the CPU mode) on the device and a decode by the device-held basis, against the Generator on the CPU
    (PCAModel.decode over ``gen_cpu_columns`` columns, its time scaled to d)."""
    arch, k, cfg = shapes["gen_arch"], shapes["gen_k"], shapes["gen_flow"]
    d = WeightLayout.from_arch(arch).size
    net = build_velocity_net(cfg, k)        # untrained: the same products as a trained one
    basis = DeviceBasis.synthetic(k, d, device)
    columns = min(d, shapes["gen_cpu_columns"])
    decoder = Decoder(LatentScaler(np.zeros(k), np.ones(k)), basis.pca_model(columns), arch)
    on_device = Generator(copy.deepcopy(net), cfg, [decoder], device=device)
    on_cpu = Generator(copy.deepcopy(net), cfg, [decoder], device="cpu")
    steps = shapes["gen_steps"]
    out = {"d": d, "k": k, "basis_dtype": str(basis.basis.dtype).removeprefix("torch."), "cpu_columns": columns,
           "flow_hidden": cfg.hidden, "solver": f"rk4, {steps} steps",
           "paper_seconds_per_model": PAPER_SECONDS_PER_MODEL, "batches": {}}
    u = on_device.solve(on_device.source(1, seed=0), "rk4", steps)
    exact = on_cpu.decode(u)
    got = basis.decode(decoder.scaler.inverse(u))[:, :columns]
    out["decode_max_rel_diff"] = float(np.abs(got - exact).max() / np.abs(exact).max())   # bfloat16 latents
    for batch in shapes["gen_batches"]:
        if clock.left() < 0:
            raise OutOfTime
        out["batches"][str(batch)] = _generate_batch(on_device, on_cpu, basis, batch, steps, d / columns, device)
    return {"status": "ok", **out}


def _generate_batch(on_device: Generator, on_cpu: Generator, basis: DeviceBasis, batch: int, steps: int,
                    scale: float, device: str, repeats: int = 2) -> dict:
    """The best of ``repeats`` timings of ``batch`` models on each side (after one warm-up on the device)."""
    scaler = on_device.decoder(None).scaler
    x0 = on_device.source(batch, seed=1)
    basis.decode(scaler.inverse(on_device.solve(x0, "rk4", steps)))                 # warm-up
    dev_solve, dev_decode, cpu_solve, cpu_decode = [], [], [], []
    for _ in range(repeats):
        t, u = timed(lambda: on_device.solve(x0, "rk4", steps), device)
        dev_solve.append(t)
        dev_decode.append(timed(lambda: basis.decode(scaler.inverse(u)), device)[0])
        t, u = timed(lambda: on_cpu.solve(x0, "rk4", steps), "cpu")
        cpu_solve.append(t)
        cpu_decode.append(timed(lambda: on_cpu.decode(u), "cpu")[0] * scale)
    device_s = (min(dev_solve) + min(dev_decode)) / batch
    cpu_s = (min(cpu_solve) + min(cpu_decode)) / batch
    return {"device_solve_s": min(dev_solve), "device_decode_s": min(dev_decode), "cpu_solve_s": min(cpu_solve),
            "cpu_decode_s_scaled": min(cpu_decode), "device_seconds_per_model": device_s,
            "device_models_per_minute": 60 / device_s, "cpu_seconds_per_model": cpu_s,
            "cpu_models_per_minute": 60 / cpu_s, "vs_paper": PAPER_SECONDS_PER_MODEL / device_s}


# ----------------------------------------------------------------------------- the run
@dataclass
class Context:
    shapes: dict
    device: str
    clock: Clock
    parts: tuple[str, ...]
    out_dir: Path
    limits: dict


def _run_tests_part(ctx: Context) -> dict:
    estimates = ctx.shapes["estimate_s"]
    reserve = sum(estimates[p] for p in ctx.parts if p != "tests")      # what the timed parts need
    timeout = min(estimates["tests"], ctx.clock.left() - reserve) if reserve else ctx.clock.left()
    if timeout < 20:
        return {"status": "skipped", "reason": f"{ctx.clock.left():.0f} s left, {reserve} s kept for the timings"}
    return run_tests(ctx.clock, timeout, ctx.out_dir)


def _run_limits_part(ctx: Context) -> dict:
    result = measure_limits(ctx.device, ctx.shapes["limit_size"], ctx.shapes["copy_bytes"])
    ctx.limits.update({k: v for k, v in result.items() if k != "status"})
    return result


RUNNERS = {
    "tests": _run_tests_part,
    "limits": _run_limits_part,
    "canon": lambda ctx: bench_canon(ctx.shapes, ctx.device, ctx.clock),
    "pca": lambda ctx: bench_pca(ctx.shapes, ctx.device, ctx.clock, ctx.limits),
    "flow": lambda ctx: bench_flow(ctx.shapes, ctx.device, ctx.clock),
    "generate": lambda ctx: bench_generate(ctx.shapes, ctx.device, ctx.clock),
}


def run_part(name: str, ctx: Context) -> dict:
    """One part, or why it did not run; never raises (OutOfTime included), frees the device's memory after."""
    need, left = ctx.shapes["estimate_s"][name], ctx.clock.left()
    if name != "tests" and left < need:
        return {"status": "skipped", "reason": f"needs about {need} s, {max(left, 0):.0f} s left"}
    t0 = time.monotonic()
    try:
        result = RUNNERS[name](ctx)
    except OutOfTime:
        result = {"status": "stopped", "reason": "the budget ran out during this part"}
    except Exception as exc:             # one part's failure is recorded; the others still run
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    if ctx.device == "cuda":
        torch.cuda.empty_cache()
    return result | {"seconds": round(time.monotonic() - t0, 2)}


def _on_alarm(signum, frame):
    raise OutOfTime


def run_check(device: str, budget_s: float, parts: tuple[str, ...], out: Path) -> dict:
    """Every part in order within ``budget_s`` seconds; the report that is written to ``out``."""
    shapes = SHAPES[device]
    ctx = Context(shapes, device, Clock(time.monotonic() + budget_s), parts, out.parent, {})
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    report = {"device": device, "device_name": name, "torch": torch.__version__, "cpus": os.cpu_count(),
              "budget_s": budget_s, "parts": {}}
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, budget_s)
    try:
        for name in parts:
            report["parts"][name] = run_part(name, ctx)
    except OutOfTime:                    # between two parts
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    for name in parts:
        report["parts"].setdefault(name, {"status": "stopped", "reason": "the budget ran out before this part"})
    report["seconds"] = round(budget_s - ctx.clock.left(), 2)
    report["table"] = table_rows(report)
    return report


# ----------------------------------------------------------------------------- the table
def _num(value, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}{unit}"


def _ratio(a, b) -> str:
    return f"x{a / b:.3g}" if a and b else "-"


def table_rows(report: dict) -> list[list[str]]:
    """[part, measure, device, cpu, note] rows; a part that did not finish is one row saying why."""
    rows = []
    for name, part in report["parts"].items():
        if part["status"] not in ("ok", "failed") or (part["status"] == "failed" and "error" in part):
            rows.append([name, part["status"], "", "", part.get("reason") or part.get("error", "")])
            continue
        rows += ROW_MAKERS[name](part)
    return rows


def _test_rows(p: dict) -> list[list[str]]:
    failed = [c["name"].rsplit("::", 1)[-1] for c in p.get("tests", []) if c["outcome"] == "failed"]
    return [["tests", "passed / failed / skipped", f"{p['passed']} / {p['failed']} / {p['skipped']}", "",
             ("failed: " + ", ".join(failed)) if failed else p["status"]]]


def _limit_rows(p: dict) -> list[list[str]]:
    return [["limits", "matmul float32 TFLOP/s", _num(p["device_gemm_float32_flops"] / 1e12),
             _num(p["cpu_gemm_float32_flops"] / 1e12), ""],
            ["limits", "matmul bfloat16 TFLOP/s", _num(p["device_gemm_bfloat16_flops"] / 1e12), "", ""],
            ["limits", "memory GB/s (read + write)", _num(p["device_copy_bytes_per_s"] / 1e9),
             _num(p["cpu_copy_bytes_per_s"] / 1e9), ""],
            ["limits", "host -> device GB/s", _num(p["host_to_device_bytes_per_s"] / 1e9), "", "pageable"]]


def _canon_rows(p: dict) -> list[list[str]]:
    return [[f"canon {fam}", f"models/s (d = {v['d']:,})", _num(v["device_models_per_s"]),
             _num(v["cpu_models_per_s"]), f"{_ratio(v['device_models_per_s'], v['cpu_models_per_s'])}, "
             f"{'same' if v['same_permutations'] else 'DIFFERENT'} permutations"]
            for fam, v in p.items() if isinstance(v, dict)]


def _pca_rows(p: dict) -> list[list[str]]:
    rows = []
    for name, r in p["runs"].items():
        on_cpu = r["engine"] == "numpy"
        value = f"{_num(r['products_s'])} s (limit {_num(r['limit_s'])} s)"
        rows.append([f"pca {name}", f"products, n={p['n']} d={p['d']:,} k={p['k']}", "" if on_cpu else value,
                     value if on_cpu else "", f"{_ratio(r['products_s'], r['limit_s'])} of limit; passes "
                     f"{r['gram_pass_s']:.2f} + {r['components_pass_s']:.2f} s; eig rel diff "
                     f"{r['eigenvalue_max_rel_diff']:.1e}"])
    return rows


def _flow_rows(p: dict) -> list[list[str]]:
    return [["flow", f"steps/s (hidden {p['hidden']}, batch {p['batch_size']})", _num(p["device_steps_per_s"]),
             _num(p["cpu_steps_per_s"]), _ratio(p["device_steps_per_s"], p["cpu_steps_per_s"])]]


def _generate_rows(p: dict) -> list[list[str]]:
    rows = []
    for batch, b in p["batches"].items():
        rows.append([f"generate b={batch}", f"s/model (d = {p['d']:,}, k = {p['k']})",
                     _num(b["device_seconds_per_model"]), _num(b["cpu_seconds_per_model"]) + " *",
                     f"{b['device_models_per_minute']:.0f} models/min; paper {p['paper_seconds_per_model']:g} s "
                     f"-> x{b['vs_paper']:.3g}"])
    rows.append(["generate", "decode rel diff (bfloat16)", _num(p["decode_max_rel_diff"], digits=2), "",
                 f"* cpu decode timed on {p['cpu_columns']:,} columns, scaled to d"])
    return rows


ROW_MAKERS = {"tests": _test_rows, "limits": _limit_rows, "canon": _canon_rows, "pca": _pca_rows,
              "flow": _flow_rows, "generate": _generate_rows}


def format_table(report: dict) -> str:
    head = ["part", "measure", f"device ({report['device']})", "cpu", "note"]
    rows = [head] + report["table"]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + " | " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    title = (f"gpu_check on {report['device_name']} ({report['device']}), torch {report['torch']}, "
             f"{report['cpus']} CPUs: {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget")
    return "\n".join([title, *lines])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: full shapes on this machine's GPU; cpu: small shapes on the CPU (CI)")
    ap.add_argument("--budget-s", type=float, default=440.0, help="wall-clock budget of the whole check")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    args = ap.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; known: {', '.join(PARTS)}")
    if args.budget_s <= 0:
        ap.error(f"--budget-s={args.budget_s}: must be above 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine; `--device cpu` runs the small check on the CPU",
              file=sys.stderr)
        return 2
    if args.device == "cpu":        # small shapes: one thread is fastest and never spins on a busy machine
        from threadpoolctl import threadpool_limits
        torch.set_num_threads(1)
        threadpool_limits(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = run_check(args.device, args.budget_s, parts, args.out)
    args.out.write_text(json.dumps(report, indent=2, default=float))
    print(format_table(report))
    print(f"wrote {args.out}")
    return 1 if any(p["status"] == "failed" for p in report["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
