"""Evaluation against a large zoo: the models' outputs stay in the object store, nearest neighbours are found by
Ray tasks block by block of the zoo, the zoo's own statistics are measured on a seeded sample, and the driver
holds object refs and per-model results only."""
import dataclasses

import numpy as np
import pytest

from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.config import RunConfig
from dwf_ray.eval.baselines import noise_baseline
from dwf_ray.eval.diversity import (ModelOutputs, candidates, disagreement_nearest, matched_nearest, max_wrong_iou,
                                    merge_blocks, nearest, nearest_in_block, sample_rows, zoo_nn_median)
from dwf_ray.eval.scoring import score_flat
from dwf_ray.weights import WeightLayout
from tests.conftest import random_flat_zoo
from tests.test_functional_novelty import peak_resident_while, resident_bytes

ARCH = ArchSpec("mlp", {"in_dim": 64, "hidden": [16, 16], "out_dim": 10})


def config(arch: ArchSpec = ARCH, dataset: str = "digits", dataset_args: dict | None = None,
           **eval_values) -> RunConfig:
    values = {"zoo.arch": {"family": arch.family, "args": arch.args}, "zoo.dataset": dataset,
              "zoo.dataset_args": dataset_args or {}}
    return RunConfig().with_values(values | {f"eval.{k}": v for k, v in eval_values.items()})


def exact(cfg: RunConfig, models: np.ndarray, zoo: np.ndarray, exclude_self: bool = False):
    """One pass over the whole zoo in this process, as evaluation did before it ran in blocks: (D, its index,
    S, the distance up to permutation) of each model."""
    args = (ARCH.to_json(), cfg.zoo.model_dump_json(), cfg.eval.model_dump_json())
    _, wrong, logits, preds = score_flat(*args, models)
    _, zoo_wrong, zoo_logits, zoo_preds = score_flat(*args, zoo)
    d, idx = disagreement_nearest(preds, zoo_preds, exclude_self)
    cands = candidates(models, zoo, logits, zoo_logits, cfg.eval.nn_candidates, exclude_self)
    weight_dist, _ = matched_nearest(ARCH.to_json(), zoo, models, cands)
    return d, idx, max_wrong_iou(wrong, zoo_wrong, exclude_self), weight_dist


def assert_same(result, expected, rows=slice(None)):
    d, idx, s, weight_dist = expected
    np.testing.assert_array_equal(result.disagreement, d[rows])
    np.testing.assert_array_equal(result.nearest, idx[rows])
    np.testing.assert_array_equal(result.similarity, s[rows])
    np.testing.assert_array_equal(result.weight_dist, weight_dist[rows])


@pytest.mark.parametrize("n_test, n_classes", [(1, 2), (63, 3), (64, 10), (65, 17), (200, 300)])
def test_bit_packed_counts_equal_the_definitions_and_blocks_merge_to_one_pass(n_test, n_classes):
    """D, its index (the first on ties) and S from packed bits equal the element-wise definitions, at and
    around word boundaries and for classes that need up to 9 bit planes, split into blocks or not."""
    rng = np.random.default_rng(n_test)
    zoo_preds = rng.integers(0, n_classes, (23, n_test))
    preds = np.concatenate([rng.integers(0, n_classes, (9, n_test)), zoo_preds[[4, 4]]])  # copies: ties at D = 0
    zoo_wrong, wrong = rng.random((23, n_test)) < 0.4, rng.random((11, n_test)) < 0.4
    differ = (preds[:, None] != zoo_preds[None]).mean(-1)
    inter, union = (wrong[:, None] & zoo_wrong[None]).sum(-1), (wrong[:, None] | zoo_wrong[None]).sum(-1)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    d, idx = disagreement_nearest(preds, zoo_preds)
    np.testing.assert_array_equal(d, differ.min(1))
    np.testing.assert_array_equal(idx, differ.argmin(1))
    np.testing.assert_array_equal(max_wrong_iou(wrong, zoo_wrong), iou.max(1))
    models, zoo = ModelOutputs.of(preds, wrong, n_classes), ModelOutputs.of(zoo_preds, zoo_wrong, n_classes)
    cuts = [0, 5, 6, 17, 23]
    parts = [nearest_in_block(models, zoo.take(np.arange(a, b)), a) for a, b in zip(cuts, cuts[1:])]
    for merged, whole in zip(merge_blocks(parts), (differ.min(1), differ.argmin(1), iou.max(1))):
        np.testing.assert_array_equal(merged, whole)
    own = ModelOutputs.concat([zoo.take(np.arange(0, 10)), zoo.take(np.arange(10, 23))])    # the zoo itself
    d_self, idx_self, s_self = merge_blocks([nearest_in_block(own, zoo.take(np.arange(a, b)), a, np.arange(23))
                                             for a, b in zip(cuts, cuts[1:])])
    differ_self = (zoo_preds[:, None] != zoo_preds[None]).mean(-1) + np.diag(np.full(23, np.inf))
    inter, union = (zoo_wrong[:, None] & zoo_wrong[None]).sum(-1), (zoo_wrong[:, None] | zoo_wrong[None]).sum(-1)
    iou_self = np.where(union > 0, inter / np.maximum(union, 1), 1.0) - np.diag(np.full(23, np.inf))
    np.testing.assert_array_equal(d_self, differ_self.min(1))
    np.testing.assert_array_equal(idx_self, differ_self.argmin(1))
    np.testing.assert_array_equal(s_self, iou_self.max(1))


def test_blockwise_nearest_neighbours_in_ray_tasks_equal_one_pass_over_the_whole_zoo(ray_session):
    """A random zoo of 40 scored 6 models a task and searched 12 zoo models a task (4 blocks): every set
    model's D, nearest index, S and matched distance equal one unchunked pass; a permuted copy of a zoo model
    is found at D = 0."""
    from dwf_ray.eval.judge import ZooJudge
    cfg = config(chunk_models=6, nn_block=12)
    zoo = random_flat_zoo(ARCH, 40)
    layout, spec = WeightLayout.from_arch(ARCH), permutation_spec(ARCH)
    state = layout.unflatten(zoo[17])
    permuted = layout.flatten(apply_permutation(spec, random_permutation(spec, state, 3), state))
    models = np.concatenate([noise_baseline(zoo, 0.7, zoo_nn_median(zoo), 15, seed=2), permuted[None]])
    judge = ZooJudge(ARCH, cfg, zoo)
    assert [start for start, _ in judge.blocks] == [0, 12, 24, 36]
    result = judge(models)
    expected = exact(cfg, models, zoo)
    assert_same(result, expected)
    assert result.disagreement[-1] == 0 and result.nearest[-1] == 17 and result.similarity[-1] == 1.0
    assert result.disagreement[:-1].max() > 0
    assert_same(judge.result, exact(cfg, zoo, zoo, exclude_self=True))    # the zoo against the rest of it


def test_the_zoo_sample_gives_the_exact_statistics_of_its_models_and_covers_a_small_zoo(ray_session, tmp_path):
    """With eval.zoo_sample below the zoo's size the zoo's D, S, nearest index and matched distance are the
    exact ones of the sampled models (drawn with eval.seed), accuracy stays every model's; a sample that covers
    the zoo gives the exact statistics of every model. metrics.json and report.md say which was measured."""
    from dwf_ray.eval.report import write_report
    from dwf_ray.eval.judge import ScoredSet, ZooJudge
    from dwf_ray.eval.stage import evaluate
    from dwf_ray.eval.tradeoff import GENERATOR
    zoo = random_flat_zoo(ARCH, 30)
    full = ZooJudge(ARCH, config(zoo_sample=30), zoo).result
    expected = exact(config(), zoo, zoo, exclude_self=True)
    assert_same(full, expected)
    rows = sample_rows(30, 9, seed=7)
    assert len(set(rows)) == 9 and (np.diff(rows) > 0).all()
    assert not np.array_equal(rows, sample_rows(30, 9, seed=8))
    cfg = config(zoo_sample=9, chunk_models=7, nn_block=14)
    sampled = ZooJudge(ARCH, cfg, zoo).result
    assert_same(sampled, expected, rows)
    np.testing.assert_array_equal(sampled.acc, full.acc)
    direct, _ = nearest(zoo, zoo, exclude_self=True)
    assert zoo_nn_median(zoo, rows) == pytest.approx(np.median(direct[rows]), rel=1e-12)
    assert zoo_nn_median(zoo, rows) != pytest.approx(np.median(direct), rel=1e-6)
    assert zoo_nn_median(zoo, np.arange(30)) == zoo_nn_median(zoo)

    small = {"noise_levels": [0.5], "layer_noise_levels": [0.1], "average_ks": [2], "mix_weights": [0.3],
             "gaussian_scales": [1.0], "n_baseline": 4, "weight_novelty": False}
    gen = ScoredSet("generated", GENERATOR, "T=1", lambda z: noise_baseline(z, 0.3, 1.0, 5, seed=0), 5)
    for size, how in ((9, "9 of 30 zoo models drawn uniformly without replacement (seed 7)"),
                      (30, "every zoo model (30) against the rest of the zoo")):
        metrics, _ = evaluate(config(zoo_sample=size, **small), ARCH, zoo, [gen])
        ref = metrics["diversity"]["zoo_reference"]
        assert (ref["models"], ref["zoo_models"], ref["sampled"]) == (size, 30, size < 30) and how in ref["how"]
        assert len(metrics["model_accuracy"]["zoo"]) == 30
        report = write_report(str(tmp_path / f"report{size}"), {**metrics, "root": str(tmp_path)}, np.ones(3),
                              np.ones(3))
        assert how in report.replace("\n", " ")


def reachable_array_bytes(obj, seen=None) -> int:
    """Bytes of every numpy array reachable from ``obj`` through attributes, dataclass fields and containers
    (an object ref is a handle: what it points to is in the object store, not here)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return 0
    return sum(reachable_array_bytes(c, seen) for c in children)


def test_the_judge_holds_per_model_results_not_the_zoo_predictions_on_ten_thousand_test_signals(ray_session):
    """300 MLPs on MNIST-1D's 10,000 test signals (3 million predictions): the judge keeps a few numbers per
    zoo model, and the driver's resident memory while it judges the zoo and a set grows by less than the
    zoo's predictions as int32 (before evaluation ran in blocks it held them, and grew by 218 MB here)."""
    from dwf_ray.eval.judge import ZooJudge
    arch = ArchSpec("mlp", {"in_dim": 40, "hidden": [32, 32], "out_dim": 10})
    cfg = config(arch, "mnist1d", {"num_train": 400}, chunk_models=50, nn_block=100)
    zoo = random_flat_zoo(arch, 300)
    ZooJudge(arch, cfg, zoo[:8])(zoo[:4])     # workers start and build the data set first

    def judge_zoo_and_a_set():
        judge = ZooJudge(arch, cfg, zoo)
        return judge, judge(zoo[:40] * 1.1)
    before = resident_bytes()
    peak, (judge, result) = peak_resident_while(judge_zoo_and_a_set)
    held = reachable_array_bytes(judge)
    assert len(judge.result.acc) == 300 and len(result.disagreement) == 40 and len(judge.blocks) == 3
    print(f"judge holds {held} bytes of arrays; resident memory grew by {(peak - before) / 2**20:.1f} MiB")
    assert held <= 64 * 300, held                  # per-model results: 8 bytes a number, a few per model
    assert peak - before < 300 * 10_000 * 4, (before, peak)   # the predictions as int32, as the driver held them
