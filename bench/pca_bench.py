"""Benchmark of the distributed dual PCA (GramShard actors) on synthetic zoos of safetensors checkpoints.

In one run, on this machine:
- our fit with 2 actors and with 1 (one CPU and one BLAS thread each);
- the paper's algorithm (dwf_ray/analysis/paper_pca.py: models streamed as rows, float16 Gram, randomized SVD)
  with the memory of our 2 actors;
- scikit-learn's PCA and IncrementalPCA on the largest set of whole tensors that fits --sklearn-max-gib,
  and our fit on the same tensors;
- the machine's limit: the time to read the zoo's bytes once plus 2 n^2 d flops at the float32 BLAS rate of
  an (n x B) @ (B x n) product measured here (per core, the best of a measurement before and after the
  contestants); the full fit is compared with that limit plus its components' work (2 n k d flops, and
  the d x k floats written once).
Every contestant runs one BLAS thread per process (on a shared, oversubscribed machine multi-threaded BLAS
collapses), and CPU seconds are reported beside wall seconds, as they are robust to other load.
Prints a table and the ratios; writes bench/results/pca_bench.json (one entry per configuration) and
bench/results/pca_bench_<arch>_n<n>.png.

    python bench/pca_bench.py                                # n = 100 ResNet-18 checkpoints, d = 11.2M
    python bench/pca_bench.py --arch bert-base --n 32        # d = 109.5M (writes 14 GB, deleted afterwards)

The covariance side (d < n: RowShard actors, d x d products), with each step (products, eigh, latents, write)
against the machine's limit (the zoo read once, the syrk and GEMM rates and LAPACK's eigh measured here):

    python bench/pca_bench.py --side covariance --arch mlp-40-32-32-10              # 10,000 x 2,698
    python bench/pca_bench.py --side covariance --arch mlp-40-100-100-10 --budget-gib 4   # 10,000 x 15,210
    python bench/pca_bench.py --side covariance --arch mlp-40-16-10 --n 2000 --compare-gram   # a quick check

How many components a real zoo needs (the default k): the variance curve of a finished run root's zoo, and the
accuracy of its models rebuilt from k components (docs/results-pca.md):

    python bench/pca_bench.py --spectrum runs/digits-mlp
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import uuid

# Ray workers run at niceness 15 by default; the baseline and scikit-learn run in plain child processes,
# so on a shared machine every contestant gets the same priority only with niceness 0 for the workers too.
for _k, _v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GIB = 1 << 30


# ---------------------------------------------------------------- synthetic checkpoints

def resnet18_shapes(width: int = 64, classes: int = 10) -> list[tuple[str, tuple]]:
    """Parameter shapes of a CIFAR ResNet-18 (3x3 stem): 11.17M parameters at width 64."""
    shapes = [("conv1.weight", (width, 3, 3, 3)), ("bn1.weight", (width,)), ("bn1.bias", (width,))]
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        cout = width * mult
        for blk in range(2):
            p = f"layer{stage}.{blk}"
            c_in = cin if blk == 0 else cout
            shapes += [(f"{p}.conv1.weight", (cout, c_in, 3, 3)), (f"{p}.bn1.weight", (cout,)),
                       (f"{p}.bn1.bias", (cout,)), (f"{p}.conv2.weight", (cout, cout, 3, 3)),
                       (f"{p}.bn2.weight", (cout,)), (f"{p}.bn2.bias", (cout,))]
            if blk == 0 and c_in != cout:
                shapes += [(f"{p}.downsample.0.weight", (cout, c_in, 1, 1)),
                           (f"{p}.downsample.1.weight", (cout,)), (f"{p}.downsample.1.bias", (cout,))]
        cin = cout
    return shapes + [("fc.weight", (classes, cin)), ("fc.bias", (classes,))]


def bert_shapes(layers: int = 12, hidden: int = 768, vocab: int = 30522) -> list[tuple[str, tuple]]:
    """Parameter shapes of BERT-Base with its pooler: 109.5M parameters."""
    h, f = hidden, 4 * hidden
    shapes = [("embeddings.word_embeddings.weight", (vocab, h)), ("embeddings.position_embeddings.weight", (512, h)),
              ("embeddings.token_type_embeddings.weight", (2, h)),
              ("embeddings.LayerNorm.weight", (h,)), ("embeddings.LayerNorm.bias", (h,))]
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes += [(f"{p}.{m}.weight", (h, h)), (f"{p}.{m}.bias", (h,))]
        shapes += [(f"{p}.attention.output.LayerNorm.weight", (h,)), (f"{p}.attention.output.LayerNorm.bias", (h,)),
                   (f"{p}.intermediate.dense.weight", (f, h)), (f"{p}.intermediate.dense.bias", (f,)),
                   (f"{p}.output.dense.weight", (h, f)), (f"{p}.output.dense.bias", (h,)),
                   (f"{p}.output.LayerNorm.weight", (h,)), (f"{p}.output.LayerNorm.bias", (h,))]
    return shapes + [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]


def mlp_shapes(*widths: int) -> list[tuple[str, tuple]]:
    """Parameter shapes of an MLP with these layer widths (input first)."""
    shapes = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        shapes += [(f"net.{2 * i}.weight", (b, a)), (f"net.{2 * i}.bias", (b,))]
    return shapes


ARCHS = {"resnet18": resnet18_shapes, "bert-base": bert_shapes,
         "resnet18-small": lambda: resnet18_shapes(width=16),     # 0.7M: a quick check of the script
         # MNIST-1D MLPs for zoos of many small models (the covariance side): d = 2,698 and d = 15,210
         "mlp-40-32-32-10": lambda: mlp_shapes(40, 32, 32, 10),
         "mlp-40-100-100-10": lambda: mlp_shapes(40, 100, 100, 10),
         "mlp-40-16-10": lambda: mlp_shapes(40, 16, 10)}           # d = 826: a quick check of the covariance mode


def make_layout(shapes):
    from dwf_ray.weights import Entry, WeightLayout
    entries, off = [], 0
    for name, shape in shapes:
        entries.append(Entry(name, tuple(shape), off))
        off += int(np.prod(shape))
    return WeightLayout(entries)


def write_zoo(root: str, layout, n: int, bert_like: bool, seed: int = 0) -> list[str]:
    """n checkpoints: a shared initialisation-scale base, two shared directions and per-model noise."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    scale = np.empty(layout.size, dtype=np.float32)
    base = rng.standard_normal(layout.size, dtype=np.float32)
    for e in layout.entries:
        s = slice(e.offset, e.offset + e.numel)
        fan_in = int(np.prod(e.shape[1:])) if len(e.shape) > 1 else 0
        scale[s] = 0.02 if bert_like or not fan_in else np.sqrt(2.0 / fan_in)
        base[s] = base[s] * scale[s] + (1.0 if e.name.endswith("weight") and not fan_in else 0.0)
    dirs = [0.1 * scale * rng.standard_normal(layout.size, dtype=np.float32) for _ in range(2)]
    os.makedirs(root, exist_ok=True)
    uris = []
    for i in range(n):
        x = rng.standard_normal(layout.size, dtype=np.float32)
        x *= 0.05 * scale
        x += base
        for c, v in zip(rng.normal(size=len(dirs)), dirs):
            x += np.float32(c) * v
        uris.append(os.path.join(root, f"m{i:03d}.safetensors"))
        save_file(layout.unflatten(x), uris[-1])
    return uris


# ---------------------------------------------------------------- machine limits

def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def read_once(uris: list[str]) -> None:
    """Sequential read of every file once into one reusable buffer."""
    buf = bytearray(64 << 20)
    for u in uris:
        with open(u, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def write_once(path: str, nbytes: int) -> None:
    """Sequential write of ``nbytes`` (the size of the components) through the page cache; the file is removed."""
    buf = np.ones(64 << 20, dtype=np.uint8)
    with open(path, "wb") as f:
        for start in range(0, nbytes, buf.size):
            f.write(buf[:min(buf.size, nbytes - start)].data)
    os.remove(path)


def blas_seconds_per_flop(n: int, columns: int, threads: int, reps: int = 3) -> tuple[float, float]:
    """(wall, CPU) seconds per flop of a float32 (n x columns) @ (columns x n) product on ``threads`` threads."""
    from threadpoolctl import threadpool_limits
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, columns), dtype=np.float32)
    b = rng.standard_normal((n, columns), dtype=np.float32)
    with threadpool_limits(threads, user_api="blas"):
        a @ b.T
        wall, cpu = min(timed(lambda: a @ b.T) for _ in range(reps))
    return wall / (2 * n * n * columns), cpu / (2 * n * n * columns)


def syrk_seconds_per_flop(rows: int, columns: int, threads: int, reps: int = 3) -> tuple[float, float]:
    """(wall, CPU) seconds per flop of the float32 X^T X (a syrk: rows x columns x (columns + 1) flops) of a
    (rows, columns) block, the covariance side's product."""
    from threadpoolctl import threadpool_limits
    x = np.random.default_rng(0).standard_normal((rows, columns), dtype=np.float32)
    with threadpool_limits(threads, user_api="blas"):
        x.T @ x
        wall, cpu = min(timed(lambda: x.T @ x) for _ in range(reps))
    flops = rows * columns * (columns + 1)
    return wall / flops, cpu / flops


# ---------------------------------------------------------------- the contestants

def run_ours(uris: list[str], layout, n_shards: int, budget: int, k: int | None, out_dir: str,
             side: str = "gram") -> dict:
    """Our fit on ``side`` with ``n_shards`` actors of one CPU (one BLAS thread) each; k=None: the default rule."""
    from dwf_ray.config import PCAConfig
    from dwf_ray.pca.shards import fit_distributed_pca
    cfg = PCAConfig(k=k, n_shards=n_shards, shard_cpus=1, memory_budget_bytes=budget, side=side)
    t0 = time.perf_counter()
    meta = fit_distributed_pca(uris, [str(i) for i in range(len(uris))], layout, cfg, out_dir)
    total = time.perf_counter() - t0
    actors = meta.get("row_shards") or meta["shards"]
    steps = meta["seconds"]         # Gram side: latents come with the eigenvectors; covariance side: one more pass
    latent_steps = ("products", "eigh") + (("second_pass",) if side == "covariance" else ())
    latent_passes = tuple(actors[0]["cpu_seconds"])[:len(latent_steps) - 1]
    shutil.rmtree(out_dir)
    return {"seconds_to_latents": sum(steps[s] for s in latent_steps), "seconds": total, "steps": steps,
            "cpu_seconds_to_latents": sum(a["cpu_seconds"][p] for a in actors for p in latent_passes),
            "cpu_seconds": sum(sum(a["cpu_seconds"].values()) for a in actors),
            "bytes_read": sum(a["bytes_read"] for a in actors), "passes": max(a["passes"] for a in actors),
            "block": actors[0]["block"], "cached": actors[0]["cached"], "k": meta["k"],
            "planned_bytes_per_actor": max(a["planned_bytes"] for a in actors),
            "peak_rss_per_actor": max(a["peak_rss_bytes"] for a in actors),
            "data_rss_per_actor": max(a["peak_rss_bytes"] - a["rss_at_start_bytes"] for a in actors),
            "actor_seconds": [a["seconds"] for a in actors], "eigenvalues": meta["eigenvalues"]}


def _child(fn, kwargs: dict, queue) -> None:
    import dwf_ray.analysis.paper_pca  # noqa: F401  (imports outside the timed and measured part)
    import sklearn.decomposition  # noqa: F401
    from threadpoolctl import threadpool_limits
    from dwf_ray.pca.gram import peak_rss
    rss0 = peak_rss()
    c0 = time.process_time()
    try:
        with threadpool_limits(1, user_api="blas"):
            out = fn(**kwargs)
    except Exception as exc:  # reported in the table
        out = {"error": f"{type(exc).__name__}: {exc}"}
    out["cpu_seconds_to_latents"] = time.process_time() - c0
    out["peak_rss_per_actor"] = peak_rss()
    out["data_rss_per_actor"] = out["peak_rss_per_actor"] - rss0
    queue.put(out)


def in_child(fn, **kwargs) -> dict:
    """Run ``fn`` in a fresh process on one BLAS thread, so that its peak memory and CPU time are its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, kwargs, queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def paper_run(uris, entries, k, block) -> dict:
    from dwf_ray.analysis.paper_pca import paper_fit
    r = paper_fit(uris, entries, k, block)
    r["seconds_to_latents"] = r.pop("seconds")
    r["eigenvalues"] = r["eigenvalues"].tolist()
    del r["latents"]
    return r


def read_matrix(uris, entries) -> tuple[np.ndarray, int]:
    from safetensors import safe_open
    d = entries[-1][1] + entries[-1][2]
    x = np.empty((len(uris), d), dtype=np.float32)
    nbytes = 0
    for row, u in zip(x, uris):
        with safe_open(u, framework="numpy") as f:
            for name, offset, numel in entries:
                row[offset:offset + numel] = f.get_tensor(name).reshape(-1)
                nbytes += 4 * numel
    return x, nbytes


def sklearn_run(uris, entries, k, kind) -> dict:
    """scikit-learn's PCA or IncrementalPCA (one batch of all n models) on the matrix read from the files."""
    from sklearn.decomposition import PCA, IncrementalPCA
    t0 = time.perf_counter()
    x, nbytes = read_matrix(uris, entries)
    if kind == "IncrementalPCA":
        model = IncrementalPCA(n_components=k, batch_size=len(x))
    else:       # "PCA": full SVD; "PCA covariance_eigh": scikit-learn's own d x d covariance path
        model = PCA(n_components=k, svd_solver="full" if kind == "PCA" else "covariance_eigh")
    model.fit(x)
    total = time.perf_counter() - t0
    return {"seconds_to_latents": total, "seconds": total, "bytes_read": nbytes,
            "eigenvalues": (model.explained_variance_ * (len(x) - 1)).tolist()}


# ---------------------------------------------------------------- report

def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b))) if np.isfinite(a).all() else float("nan")


def _fmt(v, spec: str, width: int) -> str:
    return format(v, spec) if v is not None else "-".rjust(width)


def print_table(rows: list[dict]) -> None:
    head = (f"{'method':36s} {'cores':>5s} {'d':>11s} {'latents s':>9s} {'total s':>8s} {'CPU s lat.':>10s} "
            f"{'CPU s':>7s} {'read GB':>8s} {'passes':>6s} {'peak RSS MB':>11s} {'data MB':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['method']:36s} {r['cores']:5d} {r['d']:>11,d}  failed: {r['error']}")
            continue
        print(f"{r['method']:36s} {r['cores']:5d} {r['d']:>11,d} {r['seconds_to_latents']:9.1f} "
              f"{_fmt(r.get('seconds'), '8.1f', 8)} {r['cpu_seconds_to_latents']:10.1f} "
              f"{_fmt(r.get('cpu_seconds'), '7.1f', 7)} {r['bytes_read'] / 1e9:8.2f} "
              f"{r['bytes_read'] / r['zoo_param_bytes']:6.2f} {r['peak_rss_per_actor'] / 2**20:11.0f} "
              f"{r['data_rss_per_actor'] / 2**20:8.0f}")


def plot(rows: list[dict], limits: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    full = [r for r in rows if "error" not in r and "subset" not in r["method"]]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(full) + 2.5))
    names = [f"{r['method']} ({r['cores']} core{'s' * (r['cores'] > 1)})" for r in full]
    lat = [r["seconds_to_latents"] for r in full]
    ax.barh(names, lat, label="to latents (Gram + eigh)")
    ax.barh(names, [(r.get("seconds") or t) - t for r, t in zip(full, lat)], left=lat, label="components")
    for cores, style in ((1, ":"), (2, "--")):
        ax.axvline(limits[f"wall_to_latents_{cores}_cores"], color="k", ls=style,
                   label=f"limit, {cores} core{'s' * (cores > 1)}: read once + 2n²d flops")
    ax.set_xscale("log")
    ax.set_xlim(1, 1.5 * max((r.get("seconds") or t) for r, t in zip(full, lat)))
    ax.set_xlabel("wall seconds (log)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- the covariance side (d < n)

# LAPACK's eigh alone is measured up to this d (at d = 15,210 it takes as long as our fit's own, 8 to 13 minutes
# on 2 shared cores)
EIGH_LIMIT_MAX_D = 8192


def covariance_limits(uris: list[str], n: int, d: int, k: int, work: str) -> dict:
    """Seconds the machine needs for each step of the covariance side, on 1 core (divide flops by cores): the
    zoo read once, the syrk X^T X and the projections at the BLAS rates measured here, LAPACK's eigh of a
    random d x d matrix with the same k (None above EIGH_LIMIT_MAX_D), and the components written once."""
    from dwf_ray.pca.dual import top_eigen
    e = d + 1
    read_wall, _ = timed(lambda: read_once(uris))
    syrk_wall, _ = syrk_seconds_per_flop(min(n, max(256, (256 << 20) // (4 * e))), e, threads=1)
    gemm_wall, _ = blas_seconds_per_flop(k, e, threads=1)
    eigh_wall = None
    if d <= EIGH_LIMIT_MAX_D:
        g = np.random.default_rng(0).standard_normal((d, d))
        g += g.T
        g[np.diag_indices(d)] += 3 * np.sqrt(2 * d)     # past the semicircle's edge: positive definite
        eigh_wall, _ = timed(lambda: top_eigen(g, k=k, n=n))
        del g
    write_wall, _ = timed(lambda: write_once(os.path.join(work, "write_test"), 4 * d * (k + 1)))
    return {"read_once": read_wall, "products_flops": n * e * (e + 1), "syrk_seconds_per_flop": syrk_wall,
            "latents_flops": 2 * n * e * k, "gemm_seconds_per_flop": gemm_wall, "eigh": eigh_wall,
            "write": write_wall, "syrk_gflops_1_thread": 1e-9 / syrk_wall, "gemm_gflops_1_thread": 1e-9 / gemm_wall}


def covariance_table(ours: dict, lim: dict, cores: int) -> dict:
    """Per step: our wall seconds against the machine's limit on ``cores`` cores; prints and returns them."""
    reread = 0.0 if ours["cached"] else lim["read_once"]
    limits = {"products": lim["read_once"] + lim["products_flops"] * lim["syrk_seconds_per_flop"] / cores,
              "eigh": lim["eigh"],
              "second_pass": reread + lim["latents_flops"] * lim["gemm_seconds_per_flop"] / cores,
              "write": lim["write"]}
    print(f"{'step':12s} {'ours s':>8s} {'limit s':>8s} {'ratio':>6s}   limit from")
    why = {"products": f"read {lim['read_once']:.1f} s + {lim['products_flops'] / 1e9:.0f} GFLOP syrk",
           "eigh": "LAPACK alone, random d x d", "write": "4 d (k + 1) bytes written once",
           "second_pass": f"{'' if ours['cached'] else 'read again + '}{lim['latents_flops'] / 1e9:.1f} GFLOP GEMM"}
    if limits["eigh"] is None:
        del limits["eigh"]
        why["eigh"] = "not measured (d > EIGH_LIMIT_MAX_D); the total is without it"
    for step in ("products", "eigh", "second_pass", "write"):
        ratio, limit = (ours["steps"][step] / limits[step], f"{limits[step]:8.1f}") if step in limits else (0, "-")
        print(f"{step:12s} {ours['steps'][step]:8.1f} {limit:>8s} {ratio:6.2f}   {why[step]}")
    total, seconds = sum(limits.values()), ours["seconds"] - ("eigh" not in limits) * ours["steps"]["eigh"]
    print(f"{'total':12s} {seconds:8.1f} {total:8.1f} {seconds / total:6.2f}   "
          f"(actor start-up and the reduction count in 'products')")
    return {"limits_seconds": limits, "ours_over_limit": {s: ours["steps"][s] / v for s, v in limits.items()}
            | {"total": seconds / total}}


def covariance_main(args, layout, n: int, budget: int, work: str) -> dict:
    """The covariance side on a synthetic zoo of n models with d < n: 2 and 1 actors, each pass against the
    machine's limit; optionally the Gram side and scikit-learn's covariance_eigh PCA on the same zoo."""
    d = layout.size
    uris = write_zoo(os.path.join(work, "zoo"), layout, n, bert_like=False)
    import ray
    ray.init(num_cpus=2, object_store_memory=max(256 << 20, 3 * 8 * (d + 1) ** 2), include_dashboard=False,
             log_to_driver=False)
    result, rows = {"side": "covariance", "zoo_bytes": sum(os.path.getsize(u) for u in uris)}, []
    for actors in (2, 1):
        r = run_ours(uris, layout, actors, budget, args.k, os.path.join(work, f"pca{actors}"), side="covariance")
        rows.append({"method": f"ours covariance, {actors} actor{'s' * (actors > 1)}", "cores": actors, "d": d} | r)
        print(f"  {rows[-1]['method']}: k={r['k']}, {r['seconds']:.1f} s, steps {r['steps']}", flush=True)
    k = rows[0]["k"]
    if args.compare_gram:
        r = run_ours(uris, layout, 2, budget, k, os.path.join(work, "gram"), side="gram")
        rows.append({"method": "ours Gram side, 2 actors", "cores": 2, "d": d} | r)
    entries = [(e.name, e.offset, e.numel) for e in layout.entries]
    if not args.skip_baseline and (16 * n * d + 24 * d * d) <= args.sklearn_max_gib * GIB:
        rows.append({"method": "sklearn PCA covariance_eigh", "cores": 1, "d": d}
                    | in_child(sklearn_run, uris=uris, entries=entries, k=k, kind="PCA covariance_eigh"))
    lim = covariance_limits(uris, n, d, k, work)
    print(f"\nmachine: zoo ({result['zoo_bytes'] / 1e9:.2f} GB in {n:,} files) read once in {lim['read_once']:.1f} s; "
          f"float32 syrk {lim['syrk_gflops_1_thread']:.1f} GFLOP/s, GEMM {lim['gemm_gflops_1_thread']:.1f} GFLOP/s "
          f"on 1 thread; LAPACK eigh of {d:,} x {d:,} (k={k}) {lim['eigh'] or float('nan'):.1f} s\n")
    for cores, ours in ((2, rows[0]), (1, rows[1])):
        print(f"{ours['method']}:")
        result[f"{cores}_actors"] = covariance_table(ours, lim, cores)
    for r in rows:
        r["zoo_param_bytes"] = 4 * n * d
    print()
    print_table(rows)
    for r in rows[2:]:
        if "error" not in r:
            err = rel_err(r["eigenvalues"], rows[0]["eigenvalues"])
            print(f"{r['method']}: eigenvalues max rel. err. vs ours {err:.2e}, "
                  f"time {r['seconds'] / rows[0]['seconds']:.2f} x ours with 2 actors")
    return result | {"machine": lim, "rows": rows, "speedup_2_actors_over_1": rows[1]["seconds"] / rows[0]["seconds"]}


# ---------------------------------------------------------------- how many components a real zoo needs

def spectrum_main(root: str, models: int) -> dict:
    """The explained-variance curve of a run root's canonical zoo (and of its raw zoo), and the mean test accuracy
    of its first ``models`` models rebuilt from their top-k components (mean + z_k V_k^T): what choosing k costs."""
    import torch
    from dwf_ray import store
    from dwf_ray.accuracy import accuracy
    from dwf_ray.archs import ArchSpec
    from dwf_ray.config import RunConfig
    from dwf_ray.data import dataset_for
    from dwf_ray.pca.covariance import covariance_pca
    from dwf_ray.pca.dual import dual_pca
    from dwf_ray.weights import WeightLayout, load_flat_models, to_module
    torch.set_num_threads(1)
    st = store.RunStore(root)
    cfg = RunConfig.model_validate(store.read_json(st.uri("config.json")))
    arch = ArchSpec.parse(cfg.zoo.arch)
    layout, test = WeightLayout.from_arch(arch), dataset_for(cfg.zoo).test
    targets, result = (0.9, 0.95, 0.99, 0.999), {"root": root}
    for name, stage, column in (("raw", "zoo", "uri"), ("canonical", "canon", "canon_uri")):
        x = load_flat_models(store.ok_rows(st.manifest(stage))[column], arch).astype(np.float64)
        mean, comps, z, eig = (dual_pca if len(x) <= x.shape[1] else covariance_pca)(x, variance_target=None)
        cum = np.cumsum(eig.explained_variance_ratio)
        ks = {t: int(np.searchsorted(cum, t - 1e-12) + 1) for t in targets}
        result[name] = {"n": len(x), "d": layout.size, "k_for_variance": ks,
                        "variance_at_k": {k: float(cum[k - 1]) for k in (16, 64, 256, 1024) if k <= len(cum)}}
        print(f"{name}: n={len(x):,}, d={layout.size:,}; k for variance {ks}; variance at k "
              f"{ {k: round(v, 3) for k, v in result[name]['variance_at_k'].items()} }", flush=True)

    def acc(flat: np.ndarray) -> float:
        return 100 * float(np.mean([accuracy(to_module(arch, layout.unflatten(v.astype(np.float32))), test)
                                    for v in flat]))
    m = min(models, len(x))       # x, mean, z, comps, cum, ks: of the canonical zoo (the loop's last)
    result["rebuilt_accuracy"] = {"zoo": acc(x[:m]), "mean_model": acc(mean[None]), "models": m}
    for k in sorted({k for k in (16, 64, 256, 1024) if k <= len(cum)} | set(ks.values()) | {len(cum)}):
        result["rebuilt_accuracy"][f"k={k} ({cum[k - 1]:.3f})"] = acc(mean + z[:m, :k] @ comps[:, :k].T)
    print(f"mean test accuracy % of {m} canonical models rebuilt from k components (variance kept):",
          {k: round(v, 2) for k, v in result["rebuilt_accuracy"].items()})
    return result


def save_result(key: str, result: dict) -> str:
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "pca_bench.json")
    saved = json.load(open(path)) if os.path.exists(path) else {}
    saved[key] = result
    with open(path, "w") as f:
        json.dump(saved, f, indent=1, default=float)
    return path


def gram_contestants(args, uris: list[str], layout, n: int, k: int, budget: int, work: str) -> tuple[list, dict]:
    """Our fit with 2 and 1 actors, the paper's algorithm, and scikit-learn with our fit on the tensors that fit
    its memory: (table rows, {"ours2", "ours1", "paper", "subset", "sklearn"})."""
    from dwf_ray.weights import Entry, WeightLayout
    d, rows, named = layout.size, [], {}
    for shards in (2, 1):
        r = run_ours(uris, layout, shards, budget, k, os.path.join(work, f"pca{shards}"))
        rows.append({"method": f"ours, {shards} actor{'s' * (shards > 1)}", "cores": shards, "d": d,
                     "load_average_1min": os.getloadavg()[0]} | r)
        named[f"ours{shards}"] = r
        print(f"  {rows[-1]['method']}: {r['seconds_to_latents']:.1f} s to latents, {r['seconds']:.1f} s in all")
    entries = [(e.name, e.offset, e.numel) for e in layout.entries]
    if not args.skip_baseline:
        block = max(1, int(2 * budget // (2 * 2 * d)))     # two float16 model blocks in our 2 actors' budget
        named["paper"] = paper = in_child(paper_run, uris=uris, entries=entries, k=k, block=block)
        rows.append({"method": f"paper: fp16 Gram, {block}-model blocks", "cores": 1, "d": d,
                     "seconds": None, "load_average_1min": os.getloadavg()[0]} | paper)
        print(f"  paper's algorithm: {paper.get('seconds_to_latents', float('nan')):.1f} s to latents")
    # scikit-learn holds X, its centred copy, V^T and LAPACK's workspace: about 16 n d' bytes; where the
    # whole model does not fit, it gets the tensors (in order, whole) that fit, and so does our fit
    keep, size = [], 0
    for e in layout.entries:
        if 16 * n * (size + e.numel) <= args.sklearn_max_gib * GIB:
            keep.append(Entry(e.name, e.shape, size))
            size += e.numel
    if size < d:
        print(f"  scikit-learn on all {d:,} parameters needs ~{16 * n * d / GIB:.0f} GiB > "
              f"{args.sklearn_max_gib} GiB: run on {len(keep)} of the {len(layout.entries)} tensors "
              f"({size:,} parameters), with our fit on the same subset")
    named["subset"] = run_ours(uris, WeightLayout(keep), 1, budget, k, os.path.join(work, "pca_subset"))
    rows.append({"method": "ours on subset, 1 actor", "cores": 1, "d": size} | named["subset"])
    named["sklearn"] = {}
    for kind in ("PCA", "IncrementalPCA"):
        named["sklearn"][kind] = r = in_child(sklearn_run, uris=uris, k=k, kind=kind,
                                              entries=[(e.name, e.offset, e.numel) for e in keep])
        rows.append({"method": f"sklearn {kind} on subset", "cores": 1, "d": size, "load_average_1min":
                     os.getloadavg()[0]} | r)
    return rows, named


def gram_limits(read: tuple, write: tuple, spf: tuple, n: int, k: int, d: int) -> dict:
    """The Gram side's limits: the zoo read once plus 2 n^2 d flops (to latents), and with the components' 2 n k d
    flops and the d x k floats written once (total); wall clock on 1 and 2 cores and CPU time."""
    (read_wall, read_cpu), (write_wall, write_cpu), (spf_wall, spf_cpu) = read, write, spf
    gram_flops, comp_flops = 2 * n * n * d, 2 * n * k * d
    limits = {"cpu_to_latents": read_cpu + gram_flops * spf_cpu,
              "cpu_total": read_cpu + (gram_flops + comp_flops) * spf_cpu + write_cpu}
    for cores in (1, 2):
        limits[f"wall_to_latents_{cores}_cores"] = read_wall + gram_flops * spf_wall / cores
        limits[f"wall_total_{cores}_cores"] = read_wall + (gram_flops + comp_flops) * spf_wall / cores + write_wall
    return limits


def gram_ratios(named: dict, lim: dict, n: int, d: int, budget: int) -> dict:
    ours2, ours1, paper, subset = named["ours2"], named["ours1"], named.get("paper"), named["subset"]
    ratios = {"ours_2_actors_to_latents_over_limit": ours2["seconds_to_latents"] / lim["wall_to_latents_2_cores"],
              "ours_2_actors_total_over_limit_with_components": ours2["seconds"] / lim["wall_total_2_cores"],
              "ours_1_actor_to_latents_over_limit": ours1["seconds_to_latents"] / lim["wall_to_latents_1_cores"],
              "ours_1_actor_total_over_limit_with_components": ours1["seconds"] / lim["wall_total_1_cores"],
              "ours_2_actors_cpu_to_latents_over_limit": ours2["cpu_seconds_to_latents"] / lim["cpu_to_latents"],
              "ours_2_actors_cpu_total_over_limit": ours2["cpu_seconds"] / lim["cpu_total"],
              "speedup_2_actors_over_1": ours1["seconds"] / ours2["seconds"],
              "ours_bytes_read_passes": ours2["bytes_read"] / (4 * n * d),
              "ours_peak_data_rss_over_budget": ours2["data_rss_per_actor"] / budget,
              "ours_peak_rss_over_budget": ours2["peak_rss_per_actor"] / budget}
    if paper and "error" not in paper:
        t_paper = paper["seconds_to_latents"]
        ratios |= {"speedup_vs_paper_to_latents_same_core": t_paper / ours1["seconds_to_latents"],
                   "speedup_vs_paper_to_latents_2_actors": t_paper / ours2["seconds_to_latents"],
                   "speedup_vs_paper_cpu_time": paper["cpu_seconds_to_latents"] / ours1["cpu_seconds_to_latents"],
                   "paper_top10_eigenvalue_max_rel_err_vs_ours": rel_err(paper["eigenvalues"][:10],
                                                                         ours2["eigenvalues"][:10]),
                   "paper_eigenvalue_max_rel_err_vs_ours": rel_err(paper["eigenvalues"], ours2["eigenvalues"])}
    for kind, r in named["sklearn"].items():
        if "error" not in r:
            ratios[f"speedup_vs_sklearn_{kind}_on_subset_same_core"] = r["seconds"] / subset["seconds"]
            ratios[f"sklearn_{kind}_eigenvalue_max_rel_err_vs_ours"] = rel_err(subset["eigenvalues"],
                                                                               r["eigenvalues"])
    return ratios


def gram_main(args, layout, n: int, budget: int, work: str) -> dict:
    """The dual fit (Gram side) on a synthetic zoo, against the machine's limit, the paper and scikit-learn."""
    d = layout.size
    k = args.k or n - 1
    result = {"k": k}
    print(f"{args.arch}: n={n} models, d={d:,} parameters, k={k}; zoo of {4 * n * d / 1e9:.1f} GB in {work}")
    t0 = time.perf_counter()
    uris = write_zoo(os.path.join(work, "zoo"), layout, n, args.arch.startswith("bert"))
    print(f"zoo written in {time.perf_counter() - t0:.0f} s")
    zoo_bytes = sum(os.path.getsize(u) for u in uris)
    # the machine's limits, wall clock for 1 and 2 cores and CPU time (robust to a shared machine)
    read = timed(lambda: read_once(uris))
    write = timed(lambda: write_once(os.path.join(work, "write_test"), 4 * k * d))
    spf = blas_seconds_per_flop(n, min(d, 1 << 20), threads=1)
    spf_wall_2, _ = blas_seconds_per_flop(n, min(d, 1 << 20), threads=2)
    print(f"machine: zoo read once in {read[0]:.1f} s ({zoo_bytes / read[0] / 1e9:.2f} GB/s), components "
          f"({4 * k * d / 1e9:.1f} GB) written once in {write[0]:.1f} s, float32 BLAS "
          f"{1e-9 / spf[0]:.1f} GFLOP/s on 1 thread ({1e-9 / spf_wall_2:.1f} on 2)")
    import ray
    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, log_to_driver=False)
    rows, named = gram_contestants(args, uris, layout, n, k, budget, work)
    spf_end = blas_seconds_per_flop(n, min(d, 1 << 20), threads=1)
    spf = (min(spf[0], spf_end[0]), min(spf[1], spf_end[1]))
    limits = gram_limits(read, write, spf, n, k, d)
    result |= {"zoo_bytes": zoo_bytes, "read_once_seconds": read[0], "read_GBps": zoo_bytes / read[0] / 1e9,
               "write_components_once_seconds": write[0], "blas_gflops_1_thread": 1e-9 / spf[0],
               "blas_gflops_1_thread_cpu_time": 1e-9 / spf[1], "blas_gflops_2_threads": 1e-9 / spf_wall_2,
               "limits_seconds": limits}
    print(f"\nlimit (best BLAS rate {1e-9 / spf[0]:.1f} GFLOP/s per core): to latents "
          f"{limits['wall_to_latents_2_cores']:.1f} s on 2 cores, {limits['wall_to_latents_1_cores']:.1f} s on 1; "
          f"with components {limits['wall_total_2_cores']:.1f} s on 2 cores")
    for r in rows:
        r["zoo_param_bytes"] = 4 * n * r["d"]
    print()
    print_table(rows)
    ratios = gram_ratios(named, limits, n, d, budget)
    print()
    for key, v in ratios.items():
        print(f"{key:52s} {v:8.3f}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    plot(rows, limits, os.path.join(HERE, "results", f"pca_bench_{args.arch}_n{n}.png"),
         f"dual PCA, n={n}, d={d / 1e6:.1f}M, k={k}")
    return result | {"rows": rows, "ratios": ratios}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="resnet18")
    ap.add_argument("--n", type=int, default=None, help="models in the zoo (default 100; covariance side 10,000)")
    ap.add_argument("--k", type=int, default=None,
                    help="components (default n - 1; covariance side: pca.variance_target capped by pca.max_k)")
    ap.add_argument("--budget-gib", type=float, default=1.0, help="memory budget of one shard actor")
    ap.add_argument("--sklearn-max-gib", type=float, default=3.0, help="memory scikit-learn may use")
    ap.add_argument("--workdir", default=None, help="folder for the zoo (default: a temporary folder)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--side", choices=("gram", "covariance"), default="gram",
                    help="covariance: the row-shard fit for zoos of many small models (default --n 10000)")
    ap.add_argument("--compare-gram", action="store_true", help="covariance mode: also fit the Gram side")
    ap.add_argument("--spectrum", metavar="RUN_ROOT", help="instead: the variance curve of a run root's zoo and "
                    "the accuracy of its models rebuilt from k components")
    ap.add_argument("--rebuilt-models", type=int, default=200, help="--spectrum: models rebuilt and scored")
    args = ap.parse_args()
    if args.spectrum:
        result = spectrum_main(args.spectrum, args.rebuilt_models)
        print(f"\nwrote {save_result('spectrum_' + os.path.basename(args.spectrum.rstrip('/')), result)}")
        return

    layout = make_layout(ARCHS[args.arch]())
    n, d = args.n or (10_000 if args.side == "covariance" else 100), layout.size
    budget = int(args.budget_gib * GIB)
    work = os.path.join(args.workdir or tempfile.gettempdir(), f"pca_bench-{uuid.uuid4().hex[:8]}")
    result = {"arch": args.arch, "n": n, "d": d, "budget_bytes_per_actor": budget,
              "load_average_start": os.getloadavg()}
    try:
        if args.side == "covariance":
            print(f"{args.arch}: n={n:,} models, d={d:,} parameters, covariance side; zoo in {work}")
            result |= covariance_main(args, layout, n, budget, work)
        else:
            result |= gram_main(args, layout, n, budget, work)
        result["load_average_end"] = os.getloadavg()
        key = f"{args.arch}_n{n}" + ("_covariance" if args.side == "covariance" else "")
        print(f"\nwrote {save_result(key, result)}")
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
