"""Novelty in function space, the baselines, and evaluation that streams set by set."""

import numpy as np
import pytest

from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.canon.job import load_canonical
from dwf_ray.config import RunConfig
from dwf_ray.eval.baselines import (average_baseline, gaussian_baseline, interpolation_baseline,
                                    layer_noise_baseline, noise_baseline)
from dwf_ray.eval.diversity import disagreement_nearest, max_wrong_iou, zoo_nn_median
from dwf_ray.eval.scoring import score_flat
from dwf_ray.store import RunStore
from dwf_ray.weights import WeightLayout
from tests.conftest import random_flat_zoo

ARCH = ArchSpec("mlp", {"in_dim": 6, "hidden": [12, 8], "out_dim": 3})


def test_disagreement_and_similarity_by_hand():
    zoo = np.array([[0, 1, 2, 0], [0, 1, 1, 1]])
    wrong = np.array([[1, 0, 0, 0], [0, 1, 1, 0]], bool)
    d, idx = disagreement_nearest(np.array([[0, 1, 2, 1]]), zoo)
    assert d[0] == pytest.approx(0.25) and idx[0] in (0, 1)
    d_zoo, idx_zoo = disagreement_nearest(zoo, zoo, exclude_self=True)
    np.testing.assert_allclose(d_zoo, [0.5, 0.5]) and (idx_zoo == [1, 0]).all()
    s = max_wrong_iou(np.array([[1, 1, 0, 0]], bool), wrong)
    assert s[0] == pytest.approx(0.5)                   # {0,1} vs {0}: 1/2; vs {1,2}: 1/3
    np.testing.assert_allclose(max_wrong_iou(wrong, wrong, exclude_self=True), [0.0, 0.0])


def score(cfg: RunConfig, flat: np.ndarray):
    return score_flat(ArchSpec.parse(cfg.zoo.arch).to_json(), cfg.zoo.model_dump_json(),
                      cfg.eval.model_dump_json(), flat)


def test_copies_score_zero_and_another_training_run_scores_like_the_zoo(smoke_run):
    """A copy and a permuted copy of a zoo model have functional novelty 0; a model trained from another seed
    (the smoke zoo's last model, held out of the zoo) is about as far from the zoo as zoo models are."""
    root, _ = smoke_run
    st = RunStore(str(root))
    from dwf_ray import store
    cfg = RunConfig.model_validate(store.read_json(st.uri("config.json")))
    arch = ArchSpec.parse(cfg.zoo.arch)
    _, models = load_canonical(cfg, st)
    zoo, held_out = models[:-1], models[-1:]
    layout, spec = WeightLayout.from_arch(arch), permutation_spec(arch)
    state = layout.unflatten(zoo[3])
    permuted = layout.flatten(apply_permutation(spec, random_permutation(spec, state, 5), state))
    assert np.abs(permuted - zoo[3]).max() > 0.1
    _, zoo_wrong, _, zoo_preds = score(cfg, zoo)
    unit = np.median(disagreement_nearest(zoo_preds, zoo_preds, exclude_self=True)[0])
    _, wrong, _, preds = score(cfg, np.stack([zoo[3], permuted, held_out[0]]))
    d, idx = disagreement_nearest(preds, zoo_preds)
    assert d[0] == 0 and d[1] == 0 and idx[0] == idx[1] == 3
    np.testing.assert_allclose(max_wrong_iou(wrong[:2], zoo_wrong), 1.0)
    assert 0.4 < d[2] / unit < 2.5, (d[2], unit)


def test_each_baseline_is_what_its_definition_says():
    zoo = random_flat_zoo(ARCH, 10)
    layout = WeightLayout.from_arch(ARCH)
    med = zoo_nn_median(zoo)
    noisy = noise_baseline(zoo, 0.5, med, 10, seed=0)
    assert np.allclose(np.linalg.norm(noisy - zoo, axis=1) / med, 0.5, rtol=0.1)
    layered = layer_noise_baseline(zoo, layout, 0.2, 10, seed=0)
    for e in layout.entries:               # noise of std 0.2 x each tensor's own RMS
        sl = slice(e.offset, e.offset + e.numel)
        rms = np.sqrt((zoo[:, sl].astype(np.float64) ** 2).mean(axis=1, keepdims=True))
        pooled = float(np.std((layered[:, sl] - zoo[:, sl]) / rms))
        assert pooled == pytest.approx(0.2, rel=0.4 if e.numel < 10 else 0.1), e.name
    avg = average_baseline(zoo, 4, 30, seed=0)
    for a in avg:                          # each is the mean of 4 distinct zoo members
        found = [c for c in __import__("itertools").combinations(range(10), 4)
                 if np.allclose(zoo[list(c)].mean(0), a, atol=1e-6)]
        assert len(found) == 1
    assert average_baseline(zoo, 50, 2, seed=0) == pytest.approx(np.stack([zoo.mean(0)] * 2), abs=1e-6)  # k capped
    mid = interpolation_baseline(zoo, 0.5, 20, seed=0)
    assert (np.linalg.norm(mid[:, None] - zoo[None], axis=2).min(1) > 0).all()
    gauss = gaussian_baseline(zoo, 1.0, 4000, seed=0)
    assert np.allclose(gauss.mean(0), zoo.mean(0), atol=4 * zoo.std(0).max() / np.sqrt(4000) + 1e-6)
    np.testing.assert_allclose(gauss.std(0), zoo.std(0), rtol=0.1, atol=1e-6)


def test_streaming_evaluation_matches_scoring_all_at_once_and_the_driver_holds_no_set(smoke_run, ray_session):
    """judge_sets scores set by set: per-model results equal one call over every set together, and the sets
    are built in tasks, so the driver's memory does not grow with their size or number."""
    from dwf_ray import store
    from dwf_ray.eval.judge import ScoredSet, ZooJudge, judge_sets
    root, _ = smoke_run
    st = RunStore(str(root))
    cfg = RunConfig.model_validate(store.read_json(st.uri("config.json")))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"weight_novelty": False})})
    arch = ArchSpec.parse(cfg.zoo.arch)
    _, zoo = load_canonical(cfg, st)
    sets = [noise_baseline(zoo, lvl, zoo_nn_median(zoo), 6, seed=1) for lvl in (0.2, 0.6, 1.0)]
    judge = ZooJudge(arch, cfg, zoo)
    _, results = judge_sets(judge, [ScoredSet(f"s{i}", "noise", "", lambda zoo, f=f: f, len(f)) for i, f in enumerate(sets)])
    acc, _, _, preds = score(cfg, np.concatenate(sets))
    d, _ = disagreement_nearest(preds, score(cfg, zoo)[3])
    np.testing.assert_allclose(np.concatenate([results[f"s{i}"].acc for i in range(3)]), acc)
    np.testing.assert_allclose(np.concatenate([results[f"s{i}"].disagreement for i in range(3)]), d)

    # memory: a wide MLP zoo (1.2 MB a model) and 8 sets of 40 models (48 MB each), built from it in tasks: the
    # driver's resident memory, object-store pages it touches included, grows by less than half a set
    wide = ArchSpec("mlp", {"in_dim": 64, "hidden": [512, 512], "out_dim": 10})
    wcfg = cfg.model_copy(update={"zoo": cfg.zoo.model_copy(update={"arch": {"family": "mlp", "args": wide.args}})})
    wzoo = random_flat_zoo(wide, 6)
    wjudge = ZooJudge(wide, wcfg, wzoo)
    set_bytes = 40 * wzoo.shape[1] * 4
    wide_sets = [ScoredSet(f"w{i}", "gaussian", "", lambda zoo, i=i: gaussian_baseline(zoo, 1.0, 40, i), 40)
                 for i in range(8)]
    before = resident_bytes()
    peak, (_, results) = peak_resident_while(lambda: judge_sets(wjudge, wide_sets))
    assert len(results) == 8 and all(len(r.acc) == 40 for r in results.values())
    assert peak - before < 0.5 * set_bytes, (before, peak, set_bytes)


def resident_bytes() -> int:
    """This process's resident memory now (shared pages it has touched, such as the object store's, count)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def peak_resident_while(fn):
    """(the largest resident memory seen every few milliseconds while ``fn()`` ran, what it returned)."""
    import threading
    import time
    peak, done = [resident_bytes()], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.003)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        out = fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], resident_bytes()), out
