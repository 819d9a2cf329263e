"""The paper's dual PCA, written as a baseline: one process, models streamed as rows, a float16 Gram matrix
and randomized SVD.

Models are loaded ``block`` at a time (whole checkpoints, flattened, stored in float16). For every pair of
model blocks (i, j >= i) both blocks are in memory and G_ij = X_i X_j^T is computed (float32 products of the
float16 values) and stored in float16, so the zoo is read about (n / block + 1) / 2 times. The Gram matrix
is centred afterwards (H G H) and its top k eigenpairs come from randomized SVD; latents are U S^1/2.
"""
from __future__ import annotations

import os
import time

import numpy as np
from safetensors.numpy import load_file
from sklearn.utils.extmath import randomized_svd


def load_block(uris: list[str], entries: list[tuple[str, int, int]], rows: range) -> tuple[np.ndarray, int]:
    """Whole checkpoints ``rows``, flattened in the order of ``entries`` (name, offset, numel), as a float16
    (len(rows), d) array."""
    d = entries[-1][1] + entries[-1][2]
    x = np.empty((len(rows), d), dtype=np.float16)
    nbytes = 0
    for out, i in zip(x, rows):
        tensors = load_file(uris[i])
        nbytes += os.path.getsize(uris[i])
        for name, offset, numel in entries:
            out[offset:offset + numel] = tensors[name].reshape(-1)
        del tensors
    return x, nbytes


def block_product(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """a @ b^T of two float16 blocks, in float32 column chunks (the CPU has no float16 GEMM), as float16."""
    acc = np.zeros((len(a), len(b)), dtype=np.float32)
    for c in range(0, a.shape[1], chunk):
        acc += a[:, c:c + chunk].astype(np.float32) @ b[:, c:c + chunk].astype(np.float32).T
    return acc.astype(np.float16)


def paper_fit(uris: list[str], entries: list[tuple[str, int, int]], k: int, block: int, seed: int = 0) -> dict:
    """Eigenvalues and latents of the zoo by the paper's algorithm; timings and bytes read."""
    n = len(uris)
    starts = list(range(0, n, block))
    gram = np.zeros((n, n), dtype=np.float16)
    bytes_read, t0 = 0, time.perf_counter()
    for bi, i in enumerate(starts):
        rows_i = range(i, min(i + block, n))
        xi, nb = load_block(uris, entries, rows_i)
        bytes_read += nb
        gram[i:rows_i.stop, i:rows_i.stop] = block_product(xi, xi)
        for j in starts[bi + 1:]:
            rows_j = range(j, min(j + block, n))
            xj, nb = load_block(uris, entries, rows_j)
            bytes_read += nb
            g = block_product(xi, xj)
            gram[i:rows_i.stop, j:rows_j.stop] = g
            gram[j:rows_j.stop, i:rows_i.stop] = g.T
            del xj
        del xi
    t_gram = time.perf_counter() - t0
    g = gram.astype(np.float32)
    g = g - g.mean(axis=0, keepdims=True)
    g = g - g.mean(axis=1, keepdims=True)
    finite = bool(np.isfinite(g).all())
    if finite:
        u, s, _ = randomized_svd(g, n_components=k, random_state=seed)
    else:                      # the float16 Gram overflowed (entries above 65504)
        u, s = np.full((n, k), np.nan), np.full(k, np.nan)
    return {"seconds_gram": t_gram, "seconds": time.perf_counter() - t0, "bytes_read": bytes_read,
            "blocks": len(starts), "eigenvalues": s, "latents": u * np.sqrt(s), "gram_finite": finite}
