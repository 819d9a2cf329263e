"""Dual PCA math: from an n x n Gram matrix to components, never forming the d x d covariance."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Eigen:
    """Top-k eigenpairs of the centred Gram matrix and the variance they explain."""
    values: np.ndarray          # (k,) eigenvalues of the centred Gram, descending (= squared singular values)
    vectors: np.ndarray         # (n, k)
    total: float                # trace of the centred Gram: total variance times (n - 1)

    @property
    def explained_variance(self) -> np.ndarray:
        return self.values / (len(self.vectors) - 1)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """Against the total variance of the data, not against the kept part."""
        return self.values / self.total


def centre_gram(gram: np.ndarray) -> np.ndarray:
    """H G H with H = I - 11^T/n: the Gram matrix of the column-centred rows."""
    g = np.asarray(gram, dtype=np.float64)
    g = g - g.mean(axis=0, keepdims=True)
    return g - g.mean(axis=1, keepdims=True)


def top_eigen(gram_centered: np.ndarray, k: int | None = None, variance_target: float | None = None) -> Eigen:
    """Exact ``eigh`` of the n x n matrix; k fixed, or the smallest k reaching ``variance_target``."""
    n = len(gram_centered)
    vals, vecs = np.linalg.eigh(gram_centered)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    total = float(np.trace(gram_centered))
    rank = int((vals > max(vals[0], 0) * 1e-12).sum())
    max_k = min(n - 1, rank)
    if k is None and variance_target is not None:
        if not 0 < variance_target <= 1:
            raise ValueError(f"variance_target must be in (0, 1], got {variance_target}")
        k = int(np.searchsorted(np.cumsum(vals) / total, variance_target - 1e-12) + 1)
    k = max_k if k is None else k
    if not 1 <= k <= max_k:
        raise ValueError(f"k={k} is outside [1, {max_k}] for {n} models (rank {rank})")
    return Eigen(vals[:k].copy(), np.ascontiguousarray(vecs[:, :k]), total)


def component_weights(eig: Eigen) -> np.ndarray:
    """W = U Lambda^-1/2 (n, k): the components are V = X_c^T W."""
    return eig.vectors / np.sqrt(eig.values)


def slice_components(x_slice: np.ndarray, mean_slice: np.ndarray, eig: Eigen) -> np.ndarray:
    """V_k = (X_k - mean_k)^T U Lambda^-1/2 for one column slice: (d_k, k) unit-norm columns overall."""
    xc = np.asarray(x_slice, dtype=np.float64) - mean_slice
    return xc.T @ component_weights(eig)


def latents(eig: Eigen) -> np.ndarray:
    """Training latents Z = U Lambda^1/2, with no further pass over the data."""
    return eig.vectors * np.sqrt(eig.values)


def dual_pca(x: np.ndarray, k: int | None = None, variance_target: float | None = None):
    """Single-process reference: (mean, components (d, k), latents (n, k), Eigen)."""
    x64 = np.asarray(x, dtype=np.float64)
    mean = x64.mean(axis=0)
    xc = x64 - mean
    eig = top_eigen(xc @ xc.T, k, variance_target)
    return mean, slice_components(x64, mean, eig), latents(eig), eig
