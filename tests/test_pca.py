import numpy as np
import pytest
from sklearn.decomposition import PCA

from dwf_ray.archs import ArchSpec
from dwf_ray.config import PCAConfig
from dwf_ray.pca.dual import dual_pca
from dwf_ray.pca.shards import PCAModel, fit_distributed_pca
from dwf_ray.weights import WeightLayout, save_checkpoint

ARCH = ArchSpec("mlp", {"in_dim": 6, "hidden": [5], "out_dim": 3})   # d = 53


def make_zoo(root: str, n: int = 10, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """n checkpoints whose flat weights have a few strong directions plus noise."""
    layout = WeightLayout.from_arch(ARCH)
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 3)) * [5, 2, 1]) @ rng.normal(size=(3, layout.size)) + 0.1 * rng.normal(size=(n, layout.size))
    x = (x + rng.normal(size=layout.size)).astype(np.float32)
    uris = []
    for i, row in enumerate(x):
        uris.append(f"{root}/m{i:03d}.safetensors")
        save_checkpoint(uris[-1], layout.unflatten(row), ARCH)
    return uris, x


def align_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Flip the columns of a to match b's signs."""
    return a * np.sign((a * b).sum(0))


@pytest.mark.parametrize("n_shards,block", [(1, 1 << 20), (2, 1 << 20), (3, 1 << 20), (2, 7), (3, 4)])
def test_distributed_dual_pca_matches_sklearn(tmp_path, ray_session, n_shards, block):
    uris, x = make_zoo(str(tmp_path / "zoo"))
    k = 4
    cfg = PCAConfig(k=k, n_shards=n_shards, block_columns=block)
    meta = fit_distributed_pca(uris, [f"m{i}" for i in range(len(uris))], WeightLayout.from_arch(ARCH), cfg,
                               str(tmp_path / "pca"))
    assert len(meta["shards"]) == n_shards and meta["k"] == k
    sk = PCA(n_components=k, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(np.array(meta["eigenvalues"]) / (len(x) - 1), sk.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(meta["explained_variance_ratio"], sk.explained_variance_ratio_, rtol=1e-5)
    model = PCAModel.load(str(tmp_path / "pca"))
    comps = np.concatenate([s["components"] for s in model.shards])           # (d, k)
    np.testing.assert_allclose(align_signs(comps, sk.components_.T), sk.components_.T, atol=1e-4)
    z = PCAModel.load_latents(str(tmp_path / "pca"))
    np.testing.assert_allclose(align_signs(z, sk.transform(x)), sk.transform(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.decode(model.project(x)), sk.inverse_transform(sk.transform(x)), atol=1e-4)
    # each shard read its own columns once: about n * d_k * 4 bytes, the whole zoo once in total
    assert sum(s["bytes_read"] for s in meta["shards"]) == 4 * x.size


def test_full_rank_pca_reconstructs_the_training_models(tmp_path, ray_session):
    uris, x = make_zoo(str(tmp_path / "zoo"), n=8, seed=1)
    meta = fit_distributed_pca(uris, list(map(str, range(8))), WeightLayout.from_arch(ARCH), PCAConfig(n_shards=2),
                               str(tmp_path / "pca"))
    assert meta["k"] == 7 and meta["explained_variance_total"] == pytest.approx(1.0, abs=1e-9)
    model = PCAModel.load(str(tmp_path / "pca"))
    np.testing.assert_allclose(model.decode(PCAModel.load_latents(str(tmp_path / "pca"))), x, atol=1e-4)
    np.testing.assert_allclose(model.decode(model.project(x)), x, atol=1e-4)


def test_variance_target_picks_the_smallest_k_and_reports_against_the_total():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 3)) * [10, 3, 1] @ rng.normal(size=(3, 40)) + 0.01 * rng.normal(size=(20, 40))
    _, _, _, eig = dual_pca(x, variance_target=0.95)
    ratio = PCA().fit(x).explained_variance_ratio_
    expected_k = int(np.searchsorted(np.cumsum(ratio), 0.95) + 1)
    assert len(eig.values) == expected_k
    np.testing.assert_allclose(eig.explained_variance_ratio, ratio[:expected_k], rtol=1e-6)
    assert eig.explained_variance_ratio.sum() < 1.0
    with pytest.raises(ValueError, match="k=25 is outside"):
        dual_pca(x, k=25)
