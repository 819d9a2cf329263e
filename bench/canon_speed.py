"""Per-model canonicalization time: ours against a paper-style reference implementation of the same algorithm.

Families: weight matching of a ResNet-18 (CIFAR stem, 11.2M parameters) and TransFusion of the ViT-Small of
the DeepWeightFlow code (image 32, patch 4, 6 layers, 3 heads, width 192, MLP 768; 2.7M parameters), heads and
MLP units only as in the paper.

The reference is written the way the paper's code does it: every permutation is a dense n x n 0/1 matrix
applied by products (P @ W, block-diagonal matrices for packed QKV), and the singular values of the heads'
Q, K, V slices are recomputed (full SVDs) for every pair of heads each time an attention block is visited.
It follows the same coordinate-ascent order, candidates and acceptance rule as ``dwf_ray.canon.matching``,
so both must return the same permutations; the run checks that, and that every permutation is undone.

Inputs: a reference (seeded initialisation) and models derived from it by a random function-preserving
permutation plus Gaussian noise (10% of each tensor's std), so the expected answer is known.

    python bench/canon_speed.py [--models 2] [--threads 1]

Writes bench/results/canon_speed.json and prints ms/model of both and their ratio, in wall-clock time and in
process CPU time (the steadier one on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import block_diag
from scipy.optimize import linear_sum_assignment
from threadpoolctl import threadpool_limits

from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon.matching import canonicalize
from dwf_ray.archs.perm_spec import PermutationSpec, apply_permutation, random_permutation

FAMILIES = {
    "resnet18": ArchSpec("resnet18", {"num_classes": 10, "cifar_stem": True}),
    "vit_small": ArchSpec("vit", {"image_size": 32, "patch_size": 4, "num_layers": 6, "num_heads": 3,
                                  "hidden_dim": 192, "mlp_dim": 768, "num_classes": 10}),
}


# ----------------------------------------------------------------------------- paper-style reference
def dense(idx: np.ndarray) -> np.ndarray:
    p = np.zeros((len(idx), len(idx)))
    p[np.arange(len(idx)), idx] = 1.0
    return p


def dense_apply(w: np.ndarray, p: np.ndarray, axis: int) -> np.ndarray:
    """P applied to ``axis`` of w by a matrix product."""
    return np.moveaxis(np.tensordot(p, w, axes=([1], [axis])), 0, axis)


class DenseReference:
    """Weight matching / TransFusion with dense permutation matrices and per-pair spectra."""

    def __init__(self, spec: PermutationSpec, ref: dict, other: dict):
        self.spec = spec
        self.ref = {k: v.astype(np.float64) for k, v in ref.items()}
        self.other = {k: v.astype(np.float64) for k, v in other.items()}
        self.sizes = spec.sizes(ref)
        self.P = {p: np.eye(n) for p, n in self.sizes.items() if p not in spec.concat}

    def matrix(self, p: str) -> np.ndarray:
        parts = self.spec.concat.get(p)
        return block_diag(*[self.P[c] for c in parts]) if parts else self.P[p]

    def permuted(self, name: str, w: np.ndarray, skip_axis: int | None = None) -> np.ndarray:
        for axis, p in enumerate(self.spec.axes.get(name, ())):
            if p is not None and axis != skip_axis:
                w = dense_apply(w, self.matrix(p), axis)
        return w

    def similarity(self, p: str) -> np.ndarray:
        n = self.sizes[p]
        sim = np.zeros((n, n))
        for name, axis, seg in self.spec.uses(p):
            if name not in self.ref:
                continue
            a = np.moveaxis(self.ref[name], axis, 0)[seg * n:(seg + 1) * n].reshape(n, -1)
            b = np.moveaxis(self.permuted(name, self.other[name], axis), axis, 0)[seg * n:(seg + 1) * n]
            sim += a @ b.reshape(n, -1).T
        return sim

    def head_cost(self, att) -> np.ndarray:
        """Spectral distance of every head pair, SVDs recomputed for each pair as in the paper's code."""
        h_n, d = att.num_heads, att.embed_dim // att.num_heads
        cost = np.zeros((h_n, h_n))
        for h in range(h_n):
            for g in range(h_n):
                for name, start in (att.q, att.k, att.v):
                    s1 = np.linalg.svd(self.ref[name][start + h * d:start + (h + 1) * d])[1]
                    s2 = np.linalg.svd(self.other[name][start + g * d:start + (g + 1) * d])[1]
                    cost[h, g] += np.linalg.norm(s1 - s2)
        return cost

    def attention_step(self, att) -> bool:
        h_n, d = att.num_heads, att.embed_dim // att.num_heads
        sim_qk, sim_vo = self.similarity(att.qk), self.similarity(att.vo)
        old = (sim_qk * self.P[att.qk]).sum() + (sim_vo * self.P[att.vo]).sum()
        current = self.P[att.qk].reshape(h_n, d, h_n, d).sum((1, 3)).argmax(1)
        spectral = linear_sum_assignment(self.head_cost(att))[1]
        best = None
        for heads in (current, spectral):
            mats = []
            for sim in (sim_qk, sim_vo):
                p = np.zeros_like(sim)
                for h, g in enumerate(heads):
                    block = sim[h * d:(h + 1) * d, g * d:(g + 1) * d]
                    p[h * d:(h + 1) * d, g * d:(g + 1) * d] = dense(linear_sum_assignment(block, maximize=True)[1])
                mats.append(p)
            total = (sim_qk * mats[0]).sum() + (sim_vo * mats[1]).sum()
            if best is None or total > best[0]:
                best = (total, mats)
        if best[0] > old + 1e-9 * max(1.0, abs(old)):
            self.P[att.qk], self.P[att.vo] = best[1]
            return True
        return False

    def free_step(self, p: str) -> bool:
        sim = self.similarity(p)
        new = dense(linear_sum_assignment(sim, maximize=True)[1])
        old_total, new_total = (sim * self.P[p]).sum(), (sim * new).sum()
        if new_total > old_total + 1e-9 * max(1.0, abs(old_total)):
            self.P[p] = new
            return True
        return False

    def run(self, max_iter: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
        attention = {att.qk: att for att in self.spec.attention}
        rng = np.random.default_rng(seed)
        units = sorted(self.spec.free(self.sizes) + list(attention))
        for _ in range(max_iter):
            improved = False
            for u in rng.permutation(units):
                improved |= self.attention_step(attention[u]) if u in attention else self.free_step(u)
            if not improved:
                break
        return {p: m.argmax(1) for p, m in self.P.items()}

    def canonical(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: self.permuted(k, v.astype(np.float64)).astype(v.dtype) for k, v in state.items()}


def reference_canonicalize(spec: PermutationSpec, ref: dict, state: dict) -> tuple[dict, dict]:
    matcher = DenseReference(spec, ref, state)
    perm = matcher.run()
    return matcher.canonical(state), perm


# ----------------------------------------------------------------------------- benchmark
def derived_models(arch: ArchSpec, n: int, noise: float = 0.1) -> tuple[dict, list[tuple[dict, dict]]]:
    """(reference parameters, [(permuted noisy copy, the permutation applied)])."""
    torch.manual_seed(0)
    ref = {k: v.detach().numpy().copy() for k, v in build_model(arch).named_parameters()}
    spec = permutation_spec(arch).without_residual()
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        perm = random_permutation(spec, ref, seed=100 + i)
        moved = apply_permutation(spec, perm, ref)
        out.append(({k: (v + noise * v.std() * rng.standard_normal(v.shape)).astype(np.float32)
                     for k, v in moved.items()}, perm))
    return ref, out


def undone(applied: dict, found: dict) -> bool:
    """Canonical[i] = other[found[i]] = ref[applied[found[i]]]: undone when applied[found] is the identity."""
    return all(np.array_equal(applied[p][found[p]], np.arange(len(found[p]))) for p in found)


def bench_family(name: str, arch: ArchSpec, n_models: int) -> dict:
    spec = permutation_spec(arch)
    ref, models = derived_models(arch, n_models)
    wall = {"ours": [], "reference": []}
    cpu = {"ours": [], "reference": []}
    same, all_undone = True, True
    for other, applied in models:
        w0, c0 = time.perf_counter(), time.process_time()
        ours, perm = canonicalize(spec, ref, other)
        w1, c1 = time.perf_counter(), time.process_time()
        theirs, ref_perm = reference_canonicalize(spec.without_residual(), ref, other)
        w2, c2 = time.perf_counter(), time.process_time()
        wall["ours"].append(w1 - w0)
        wall["reference"].append(w2 - w1)
        cpu["ours"].append(c1 - c0)
        cpu["reference"].append(c2 - c1)
        same &= all(np.array_equal(perm[p], ref_perm[p]) for p in ref_perm)
        same &= all(np.array_equal(ours[k], theirs[k]) for k in ours)
        all_undone &= undone(applied, perm)
    ms = {f"{impl}_{kind}_ms_per_model": 1000 * float(np.mean(t[impl]))
          for kind, t in (("wall", wall), ("cpu", cpu)) for impl in t}
    return {"family": name, "arch": json.loads(arch.to_json()),
            "n_params": int(sum(v.size for v in ref.values())), "models": n_models, **ms,
            "speedup_wall": ms["reference_wall_ms_per_model"] / ms["ours_wall_ms_per_model"],
            "speedup_cpu": ms["reference_cpu_ms_per_model"] / ms["ours_cpu_ms_per_model"],
            "same_result": bool(same), "permutations_undone": bool(all_undone)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=2, help="derived models canonicalized per family")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (both implementations)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--out", default="bench/results/canon_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    rows = [bench_family(f, FAMILIES[f], args.models) for f in args.families.split(",")]
    print(f"{'family':10s} {'params':>9s} | {'ms/model: ours':>14s} {'reference':>9s} {'ratio':>5s} | "
          f"{'cpu ms: ours':>12s} {'reference':>9s} {'ratio':>5s} | same result, undone")
    for r in rows:
        print(f"{r['family']:10s} {r['n_params']:9d} | {r['ours_wall_ms_per_model']:14.0f} "
              f"{r['reference_wall_ms_per_model']:9.0f} {r['speedup_wall']:5.2f} | "
              f"{r['ours_cpu_ms_per_model']:12.0f} {r['reference_cpu_ms_per_model']:9.0f} {r['speedup_cpu']:5.2f} | "
              f"{r['same_result']}, {r['permutations_undone']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
