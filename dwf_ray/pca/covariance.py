"""Covariance-side PCA math (d < n): from summed row-block products to components, never forming the n x n Gram.

The same eigenvalues, choice of k and sign convention as the Gram side (dual.py), so both sides give the same
components and latents.
"""
from __future__ import annotations

import numpy as np

from dwf_ray.pca.dual import Eigen, latent_signs, top_eigen


def centre_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """From the summed (d + 1, d + 1) [Y, 1]^T [Y, 1] of shifted rows Y: (mean of Y (d,), the centred
    C = Y^T Y - n mu mu^T (d, d), n). C is the top-left block of ``sums``, updated in place when it may be
    (one actor's result straight from Ray's object store is read-only)."""
    d = len(sums) - 1
    n = int(round(sums[d, d]))
    mu = sums[:d, d] / n
    c = sums[:d, :d] if sums.flags.writeable else np.array(sums[:d, :d])
    for a in range(0, d, 1024):     # the rank-one update in row blocks: no second d x d array
        c[a:a + 1024] -= np.outer(n * mu[a:a + 1024], mu)
    return mu, c, n


def covariance_eigen(sums: np.ndarray, k: int | None = None, variance_target: float | None = None,
                     max_k: int | None = None) -> tuple[np.ndarray, Eigen]:
    """(mean of the shifted rows, Eigen with the components V (d, k) as vectors) from the summed products."""
    mu, c, n = centre_sums(sums)
    return mu, top_eigen(c, k, variance_target, max_k, n=n)


def projection_weights(eig: Eigen, mu: np.ndarray) -> np.ndarray:
    """W (d + 1, k) = [V; -mu V]: [Y, 1] W = (Y - mu) V, the latents, in one product per row block."""
    return np.vstack([eig.vectors, -(mu @ eig.vectors)[None]])


def orient(eig: Eigen, z: np.ndarray) -> tuple[Eigen, np.ndarray]:
    """The sign convention of ``latent_signs`` applied to the components and their latents."""
    s = latent_signs(z)
    return Eigen(eig.values, eig.vectors * s, eig.total, eig.n), z * s


def covariance_pca(x: np.ndarray, k: int | None = None, variance_target: float | None = None,
                   max_k: int | None = None):
    """Single-process reference: (mean, components (d, k), latents (n, k), Eigen), as ``dual_pca`` returns."""
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=0)
    xc = x64 - mean
    eig = top_eigen(xc.T @ xc, k, variance_target, max_k, n=len(x64))
    eig, z = orient(eig, xc @ eig.vectors)
    return mean, eig.vectors, z, eig
