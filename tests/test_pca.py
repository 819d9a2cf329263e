import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from sklearn.decomposition import PCA

from dwf_ray.archs import ArchSpec
from dwf_ray.config import PCAConfig, RunConfig
from dwf_ray.pca.covariance import covariance_pca
from dwf_ray.pca.dual import centre_gram, dual_pca, latent_signs
from dwf_ray.pca.gram import GramShard, budget_for_block, plan_blocks
from dwf_ray.pca.reader import model_columns
from dwf_ray.pca.rows import bytes_per_row, fixed_row_bytes, plan_rows
from dwf_ray.pca.shardfile import load_shard, write_shard
from dwf_ray.pca.model import PCAModel
from dwf_ray.pca.shards import fit_distributed_pca, shard_ranges
from dwf_ray.weights import CheckpointError, WeightLayout, save_checkpoint

ARCH = ArchSpec("mlp", {"in_dim": 6, "hidden": [5], "out_dim": 3})   # d = 53
LAYOUT = WeightLayout.from_arch(ARCH)


def make_zoo(root: str, n: int = 10, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """n checkpoints whose flat weights have a few strong directions plus noise."""
    rng = np.random.default_rng(seed)
    d = LAYOUT.size
    x = (rng.normal(size=(n, 3)) * [5, 2, 1]) @ rng.normal(size=(3, d)) + 0.1 * rng.normal(size=(n, d))
    x = (x + rng.normal(size=d)).astype(np.float32)
    uris = []
    for i, row in enumerate(x):
        uris.append(f"{root}/m{i:03d}.safetensors")
        save_checkpoint(uris[-1], LAYOUT.unflatten(row), ARCH)
    return uris, x


def fit(uris: list[str], out_dir: str, **cfg) -> tuple[dict, PCAModel, np.ndarray]:
    """(meta, loaded model, training latents)."""
    meta = fit_distributed_pca(uris, [f"m{i}" for i in range(len(uris))], LAYOUT, PCAConfig(**cfg), out_dir)
    return meta, PCAModel.load(out_dir), PCAModel.load_latents(out_dir)


def align_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Flip the columns of a to match b's signs."""
    return a * np.sign((a * b).sum(0))


def basis(model: PCAModel) -> np.ndarray:
    return np.concatenate([s.basis for s in model.shards])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session):
    """A zoo on local disk and its fit with 2 shards and the default budget (every slice kept in memory)."""
    root = tmp_path_factory.mktemp("pca_ref")
    uris, x = make_zoo(str(root / "zoo"))
    return (uris, x) + fit(uris, str(root / "pca"), k=4)


# float64 products must match scikit-learn to 1e-5; float32 products to 1e-3 relative (the smallest eigenvalue
# here is 1 / 24,000 of the largest, float32 carries 7 digits)
@pytest.mark.parametrize("n_shards,block,dtype", [(1, None, "float64"), (2, None, "float32"), (3, None, "float64"),
                                                  (2, 7, "float32"), (3, 4, "float64")])
def test_distributed_dual_pca_matches_sklearn(tmp_path, reference, n_shards, block, dtype):
    uris, x = reference[:2]
    k = 4
    cfg = {"k": k, "n_shards": n_shards, "compute_dtype": dtype}
    if block:
        cfg["memory_budget_bytes"] = budget_for_block(len(x), block, dtype)
    meta, model, z = reference[2:] if (n_shards, block) == (2, None) else fit(uris, str(tmp_path / "pca"), **cfg)
    assert len(meta["shards"]) == n_shards and meta["k"] == k and meta["compute_dtype"] == dtype
    tol = 1e-5 if dtype == "float64" else 1e-3
    sk = PCA(n_components=k, svd_solver="full").fit(x.astype(np.float64))
    np.testing.assert_allclose(np.array(meta["eigenvalues"]) / (len(x) - 1), sk.explained_variance_, rtol=tol)
    np.testing.assert_allclose(meta["explained_variance_ratio"], sk.explained_variance_ratio_, rtol=tol)
    assert meta["total_variance"] == pytest.approx(sk.explained_variance_.sum() / sk.explained_variance_ratio_.sum())
    comps = np.concatenate([s.components for s in model.shards])           # (d, k)
    np.testing.assert_allclose(align_signs(comps, sk.components_.T), sk.components_.T, atol=10 * tol)
    np.testing.assert_allclose(np.concatenate([s.mean for s in model.shards]), sk.mean_, atol=1e-5)
    np.testing.assert_allclose(align_signs(z, sk.transform(x)), sk.transform(x), rtol=10 * tol, atol=10 * tol)
    np.testing.assert_allclose(model.decode(model.project(x)), sk.inverse_transform(sk.transform(x)), atol=10 * tol)
    # each shard read exactly its own columns of every checkpoint: once when its slice fits the budget,
    # and once more for the components when it streams in blocks
    passes = 2 if block else 1
    assert all(s["passes"] == passes and s["cached"] == (not block) for s in meta["shards"])
    assert all(s["bytes_read"] == passes * 4 * len(x) * (s["stop"] - s["start"]) for s in meta["shards"])
    if block:
        assert {s["block"] for s in meta["shards"]} == {block}
    pca_dir = Path(uris[0]).parents[1] / "pca" if (n_shards, block) == (2, None) else tmp_path / "pca"
    for s in meta["shards"]:       # one plain safetensors file per shard: (columns, 1 + k), mean first
        assert safetensors.numpy.load_file(pca_dir / s["file"])["basis"].shape == (s["stop"] - s["start"], 1 + k)
    moved = shutil.copytree(pca_dir, tmp_path / "moved")   # a copied PCA folder loads on its own
    np.testing.assert_array_equal(PCAModel.load(str(moved)).decode(z[:3]), model.decode(z[:3]))


def test_full_rank_pca_reconstructs_the_training_models(tmp_path, ray_session):
    uris, x = make_zoo(str(tmp_path / "zoo"), n=8, seed=1)
    meta, model, z = fit(uris, str(tmp_path / "pca"), n_shards=2, memory_budget_bytes=budget_for_block(8, 5),
                         variance_target=1.0)
    assert meta["k"] == 7 and meta["explained_variance_total"] == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(model.decode(z), x, atol=1e-4)
    np.testing.assert_allclose(model.decode(model.project(x)), x, atol=1e-4)
    # projecting straight from the checkpoints, range by range, gives the training latents back
    np.testing.assert_allclose(model.project_checkpoints(uris, LAYOUT, block=6), z, atol=1e-4)
    with pytest.raises(ValueError, match="k=7"):
        model.decode(z[:, :3])


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


def test_block_size_follows_the_memory_budget_not_d():
    budget = 1 << 30
    big = [plan_blocks(100, d, budget) for d in (10**8, 10**9, 10**11)]
    assert len({p.block for p in big}) == 1 and not big[0].cache      # streamed: the same blocks whatever d
    assert all(p.bytes <= budget for p in big)
    small = plan_blocks(100, 10**6, budget)                           # 400 MB slice: kept for the second pass
    assert small.cache and small.bytes <= budget
    assert plan_blocks(100, 10**8, budget, "float64").block < big[0].block
    with pytest.raises(ValueError, match="too small for 100 models"):
        plan_blocks(100, 10**6, 300 << 20)


def test_gram_shard_reads_its_columns_in_any_stored_dtype(tmp_path):
    """Float16 and bfloat16 tensors are read (and counted) at their stored width, straight from the files."""
    uris, x = make_zoo(str(tmp_path / "zoo"), n=4)
    mixed = []
    for i, row in enumerate(x):
        tensors = {k: torch.from_numpy(v.copy()) for k, v in LAYOUT.unflatten(row).items()}
        tensors["net.0.weight"] = tensors["net.0.weight"].half()         # columns 0..29
        tensors["net.2.weight"] = tensors["net.2.weight"].bfloat16()     # columns 35..49
        mixed.append(str(tmp_path / f"mixed{i}.safetensors"))
        safetensors.torch.save_file(tensors, mixed[-1])
        x[i] = LAYOUT.flatten({k: v.float().numpy() for k, v in tensors.items()})
    plan = plan_blocks(4, 40, budget_for_block(4, 9))
    shard = GramShard([model_columns(u, LAYOUT) for u in mixed], 10, 50, plan)
    xc = x[:, 10:50] - x[:, 10:50].mean(0)
    np.testing.assert_allclose(shard.gram(), xc @ xc.T, rtol=1e-5, atol=1e-5)
    assert shard.bytes_read == 4 * (20 * 2 + 5 * 4 + 15 * 2)


def test_unusable_checkpoints_are_clear_errors(tmp_path):
    uris, x = make_zoo(str(tmp_path / "zoo"), n=2)
    with pytest.raises(CheckpointError, match="nope.safetensors: checkpoint not found"):
        model_columns(str(tmp_path / "nope.safetensors"), LAYOUT)
    other = WeightLayout.from_arch(ArchSpec("mlp", {"in_dim": 7, "hidden": [5], "out_dim": 3}))
    with pytest.raises(CheckpointError, match=r"m000.safetensors: tensor 'net.0.weight' has shape \(5, 6\)"):
        model_columns(uris[0], other)
    cols = model_columns(uris[1], LAYOUT)
    with open(uris[1], "r+b") as f:
        f.truncate(os.path.getsize(uris[1]) - 8)
    with pytest.raises(CheckpointError, match="m001.safetensors: truncated data for tensor 'net.2.weight'"):
        cols.read(0, LAYOUT.size, np.empty(LAYOUT.size, dtype=np.float32))
    with pytest.raises(ValueError, match="the weight layout has no parameters"):
        fit_distributed_pca(uris, ["a", "b"], WeightLayout([]), PCAConfig(), str(tmp_path / "pca"))


def test_a_shard_file_is_written_whole_or_not_at_all(tmp_path):
    uri = str(tmp_path / "shard.safetensors")
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    with write_shard(uri, 5, 15, k=2) as put:
        put(rows[:4])
        put(rows[4:])
    shard = load_shard(uri)
    assert (shard.start, shard.stop) == (5, 15)
    np.testing.assert_array_equal(shard.mean, rows[:, 0])
    np.testing.assert_array_equal(shard.components, rows[:, 1:])
    with pytest.raises(ValueError, match="4 of 10 rows were never written"):
        with write_shard(str(tmp_path / "short.safetensors"), 5, 15, k=2) as put:
            put(rows[:6])
    assert os.listdir(tmp_path) == ["shard.safetensors"]


def test_torch_engine_runs_the_gpu_code_path_on_the_cpu(tmp_path, reference):
    """engine=torch is what a GPU actor runs; here on the CPU, in float32 and with bfloat16 inputs."""
    uris, x, ref_meta, ref_model, _ = reference
    meta, model, _ = fit(uris, str(tmp_path / "pca"), k=4, engine="torch", n_shards=1)
    assert meta["engine"] == "torch"
    # two float32 implementations: they agree to float32 accuracy (see the tolerance note above)
    np.testing.assert_allclose(meta["eigenvalues"], ref_meta["eigenvalues"], rtol=1e-3)
    np.testing.assert_allclose(align_signs(basis(model), basis(ref_model)), basis(ref_model), atol=1e-3)
    plan = plan_blocks(len(x), LAYOUT.size, 2 << 30, engine="torch")
    sources = [model_columns(u, LAYOUT) for u in uris]
    exact = centre_gram(GramShard(sources, 0, LAYOUT.size, plan).gram())
    bf16 = centre_gram(GramShard(sources, 0, LAYOUT.size, plan, "torch", input_dtype="bfloat16").gram())
    err = np.abs(bf16 - exact).max() / np.abs(exact).max()
    assert 1e-6 < err < 1e-2          # rounded inputs (bfloat16 has 8 mantissa bits), float32 sums
    with pytest.raises(ValueError, match="input_dtype=bfloat16 needs the torch engine"):
        fit(uris, str(tmp_path / "bad"), input_dtype="bfloat16")


def test_zoo_on_s3_gives_the_same_pca_as_on_local_disk(tmp_path, reference, s3_server):
    import s3fs
    uris, x, ref_meta, ref_model, ref_z = reference
    bucket = s3_server()
    fs = s3fs.S3FileSystem()
    s3_uris = [f"s3://{bucket}/zoo/{os.path.basename(u)}" for u in uris]
    for u, s3u in zip(uris, s3_uris):
        fs.put_file(u, s3u)
    meta, model, z = fit(s3_uris, f"s3://{bucket}/pca", k=4)
    assert meta["eigenvalues"] == ref_meta["eigenvalues"]
    assert [s["bytes_read"] for s in meta["shards"]] == [s["bytes_read"] for s in ref_meta["shards"]]
    np.testing.assert_array_equal(basis(model), basis(ref_model))
    np.testing.assert_array_equal(z, ref_z)
    assert sorted(fs.ls(f"{bucket}/pca")) == sorted(
        f"{bucket}/pca/{f}" for f in ("meta.json", "latents.npy", "shard_000.safetensors", "shard_001.safetensors"))


def test_a_killed_gram_shard_is_restarted_and_the_fit_completes(tmp_path, reference):
    """SIGKILL one actor's process before the Gram pass and another's between the Gram and components passes."""
    import ray
    uris, x, ref_meta, ref_model, _ = reference
    killed = {}

    def kill(stage, actors):
        victim = {"gram": 0, "components": 1}[stage]
        killed[victim] = ray.get(actors[victim].stats.remote())["pid"]
        os.kill(killed[victim], signal.SIGKILL)

    meta = fit_distributed_pca(uris, [f"m{i}" for i in range(len(uris))], LAYOUT, PCAConfig(k=4),
                               str(tmp_path / "pca"), on_stage=kill)
    assert all(meta["shards"][i]["pid"] != killed[i] for i in (0, 1))
    assert meta["eigenvalues"] == ref_meta["eigenvalues"]
    np.testing.assert_array_equal(basis(PCAModel.load(str(tmp_path / "pca"))), basis(ref_model))


# ---------------------------------------------------------------- the covariance side (d < n) and the choice of k

@pytest.fixture(scope="module")
def tall_zoo(tmp_path_factory):
    """80 models of d = 53 parameters: more models than parameters."""
    return make_zoo(str(tmp_path_factory.mktemp("tall") / "zoo"), n=80, seed=2)


def sklearn_reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's components (d, k) and latents (n, k), with the project's sign convention applied."""
    sk = PCA(n_components=k, svd_solver="full").fit(x.astype(np.float64))
    z = sk.transform(x.astype(np.float64))
    signs = latent_signs(z)
    return sk.components_.T * signs, z * signs


@pytest.mark.parametrize("shape", ["wide", "tall"])
def test_gram_and_covariance_sides_give_the_same_components_and_latents(tmp_path, reference, tall_zoo, shape):
    """n < d (10 x 53) and n > d (80 x 53): both sides, the single-process references and scikit-learn agree
    without any sign alignment; auto picks the smaller problem."""
    uris, x = reference[:2] if shape == "wide" else tall_zoo
    k = 4
    fits = {side: fit(uris, str(tmp_path / side), k=k, side=side, compute_dtype="float64", n_shards=3)
            for side in ("gram", "covariance")}
    ref_comps, ref_z = sklearn_reference(x, k)
    for side, (meta, model, z) in fits.items():
        assert meta["side"] == side and meta["k"] == k
        np.testing.assert_allclose(basis(model)[:, 1:], ref_comps, atol=1e-5)
        np.testing.assert_allclose(z, ref_z, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(basis(model)[:, 0], x.astype(np.float64).mean(0), atol=1e-5)
        np.testing.assert_allclose(model.project_checkpoints(uris, LAYOUT, block=7), z, rtol=1e-4, atol=1e-4)
    (gmeta, gmodel, gz), (cmeta, cmodel, cz) = fits["gram"], fits["covariance"]
    # float64 products of float32 blocks, each centred (Gram side) or shifted (row side) in float32: eigenvalues
    # agree to 1e-6, the 4th component (a noise direction, close to the 5th) to 1e-5
    np.testing.assert_allclose(basis(cmodel), basis(gmodel), atol=1e-5)
    np.testing.assert_allclose(cz, gz, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cmeta["eigenvalues"], gmeta["eigenvalues"], rtol=1e-6)
    assert cmeta["total_variance"] == pytest.approx(gmeta["total_variance"], rel=1e-6)
    for reference_fit in (dual_pca, covariance_pca):
        mean, comps, ref_latents, _ = reference_fit(x, k)
        np.testing.assert_allclose(basis(cmodel)[:, 1:], comps, atol=1e-5)
        np.testing.assert_allclose(cz, ref_latents, rtol=1e-5, atol=1e-5)
    # the row side read every model whole, once (its rows fit the default budget), in 3 actors
    rows = cmeta["row_shards"]
    assert [(r["start"], r["stop"]) for r in rows] == shard_ranges(len(x), 3)
    assert sum(r["bytes_read"] for r in rows) == 4 * x.size and all(r["passes"] == 1 for r in rows)
    auto, _, _ = fit(uris, str(tmp_path / "auto"), k=k)
    assert auto["side"] == ("gram" if shape == "wide" else "covariance")


def test_covariance_side_in_float32_matches_the_gram_side(tmp_path, tall_zoo):
    """The default float32 products: the shifted row sums keep both sides within float32 accuracy."""
    uris, x = tall_zoo
    (gmeta, gmodel, gz), (cmeta, cmodel, cz) = (fit(uris, str(tmp_path / s), k=4, side=s)
                                                for s in ("gram", "covariance"))
    np.testing.assert_allclose(cmeta["eigenvalues"], gmeta["eigenvalues"], rtol=1e-3)   # as float32 Gram vs sklearn
    np.testing.assert_allclose(basis(cmodel), basis(gmodel), atol=1e-3)
    np.testing.assert_allclose(cz, gz, rtol=1e-3, atol=1e-3)


def test_row_blocks_follow_the_memory_budget_not_n(tmp_path, tall_zoo):
    uris, x = tall_zoo
    d = LAYOUT.size
    budget = fixed_row_bytes(d) + 9 * bytes_per_row(d)               # 9-model blocks, no room to keep 80 models
    meta, model, z = fit(uris, str(tmp_path / "pca"), k=4, side="covariance", memory_budget_bytes=budget,
                         n_shards=1)
    rows = meta["row_shards"]
    assert all(r["block"] == 9 and not r["cached"] and r["passes"] == 2 for r in rows)
    assert all(r["bytes_read"] == 2 * 4 * d * (r["stop"] - r["start"]) and r["planned_bytes"] <= budget
               for r in rows)
    _, comps, latents_ref, _ = covariance_pca(x, 4)
    np.testing.assert_allclose(z, latents_ref, rtol=1e-3, atol=1e-3)
    big = [plan_rows(n, 2700, 1 << 30) for n in (10**5, 10**6, 10**7)]
    assert len({p.block for p in big}) == 1 and all(p.bytes <= 1 << 30 for p in big)
    with pytest.raises(ValueError, match=r"pca.memory_budget_bytes=2147483648 is too small for the covariance "
                                         r"side with d=20000 parameters: .* set pca.side=gram"):
        plan_rows(10**5, 20000, 2 << 30)
    with pytest.raises(ValueError, match="too small for the covariance side with d=53"):
        fit(uris, str(tmp_path / "bad"), side="covariance", memory_budget_bytes=fixed_row_bytes(d))


def test_a_killed_row_shard_is_restarted_and_the_fit_completes(tmp_path, tall_zoo):
    """SIGKILL one RowShard before the covariance pass and another between that pass and the latents."""
    import ray
    uris, x = tall_zoo
    killed = {}

    def kill(stage, actors):
        victim = {"covariance": 0, "latents": 1}[stage]
        killed[victim] = ray.get(actors[victim].stats.remote())["pid"]
        os.kill(killed[victim], signal.SIGKILL)

    cfg = PCAConfig(k=4, side="covariance")
    ids = [f"m{i}" for i in range(len(uris))]
    meta = fit_distributed_pca(uris, ids, LAYOUT, cfg, str(tmp_path / "killed"), on_stage=kill)
    calm = fit_distributed_pca(uris, ids, LAYOUT, cfg, str(tmp_path / "calm"))
    assert all(meta["row_shards"][i]["pid"] != killed[i] for i in (0, 1))
    assert meta["eigenvalues"] == calm["eigenvalues"]
    np.testing.assert_array_equal(PCAModel.load_latents(str(tmp_path / "killed")),
                                  PCAModel.load_latents(str(tmp_path / "calm")))
    np.testing.assert_array_equal(basis(PCAModel.load(str(tmp_path / "killed"))),
                                  basis(PCAModel.load(str(tmp_path / "calm"))))


def test_default_k_follows_the_variance_kept_not_the_zoo_size(tmp_path, reference, tall_zoo):
    """By default k is the smallest reaching pca.variance_target (never n - 1); three strong directions keep
    3 components at 0.999 whether the zoo has 10 or 80 models, on either side; max_k caps k."""
    ks = {}
    for name, (uris, x) in {"wide": reference[:2], "tall": tall_zoo}.items():
        meta, _, z = fit(uris, str(tmp_path / name))
        ratio = np.cumsum(PCA().fit(x.astype(np.float64)).explained_variance_ratio_)
        expected = int(np.searchsorted(ratio, PCAConfig().variance_target) + 1)
        assert meta["k"] == expected == z.shape[1] < len(x) - 1
        assert meta["explained_variance_total"] == pytest.approx(ratio[expected - 1], rel=1e-5)
        ks[name] = fit(uris, str(tmp_path / f"{name}_999"), variance_target=0.999)[0]["k"]
        assert fit(uris, str(tmp_path / f"{name}_cap"), variance_target=0.999, max_k=2)[0]["k"] == 2
    assert ks == {"wide": 3, "tall": 3}
    everything, _, _ = fit(reference[0], str(tmp_path / "all"), variance_target=None, max_k=None)
    assert everything["k"] == len(reference[1]) - 1


def test_out_of_range_k_and_variance_target_are_one_line_errors(tmp_path, reference):
    for override, message in [("pca.k=0", "pca.k: Value error, 0 is outside [1, n - 1]"),
                              ("pca.variance_target=1.5", "pca.variance_target: Value error, 1.5 is outside (0, 1]"),
                              ("pca.variance_target=0", "pca.variance_target: Value error, 0.0 is outside (0, 1]"),
                              ("pca.max_k=0", "pca.max_k: Value error, 0 is outside [1, inf)")]:
        with pytest.raises(ValueError) as err:
            RunConfig().with_overrides([override])
        assert str(err.value) == f"invalid config value ({message})"
    with pytest.raises(ValueError, match=r"^pca.k=10 is outside \[1, 9\] for 10 models \(rank 9\)$"):
        fit(reference[0], str(tmp_path / "pca"), k=10)
