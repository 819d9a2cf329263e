"""Stage 6: score the zoo, every set of samples and every baseline, set by set; write the report.

The zoo is loaded and every set is built (samples read from their manifests, baselines generated) in Ray tasks,
into the object store, and so are every model's outputs; the driver holds object refs and per-model results
only, whatever the models' and the zoo's size (nearest neighbours are found in tasks, block by block of the zoo).
Novelty is measured in function space (``eval/metrics.py``); distances in weight space up to permutation stay
as a diagnostic.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import ray

from dwf_ray import store
from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.canon.matching import canonicalize
from dwf_ray.config import RunConfig
from dwf_ray.eval.baselines import baseline_sets
from dwf_ray.eval.diversity import (ModelOutputs, matched_nearest, merge_blocks, merge_k, nearest_in_block,
                                   nearest_k, sample_rows, zoo_nn_median)
from dwf_ray.eval.metrics import NOVELTY, SetResult, point
from dwf_ray.eval.report import summary, write_report
from dwf_ray.eval.scoring import score_flat
from dwf_ray.runtime import cluster_cpus, wait_with_progress
from dwf_ray.sample import sample_sets
from dwf_ray.store import NO_CANON, STAGE_FOLDERS, RunStore, ok_rows
from dwf_ray.weights import WeightLayout, load_flat_models

GENERATOR = "generator"


@dataclass(frozen=True)
class ScoredSet:
    key: str
    method: str
    setting: str
    build: Callable[[np.ndarray], np.ndarray]   # the canonical zoo -> the set's flat models (run in a Ray task)
    size: int                                   # models in the set (for the progress bar)
    build_gpus: float = 0.0                     # GPUs for the task that builds it (weight matching on a GPU)


def canonicalize_flat(arch_json: str, ref: np.ndarray, flat: np.ndarray, residual: bool = False) -> np.ndarray:
    """Weight-match (TransFusion for attention) each flat model onto the reference: the canonical flat models."""
    from dwf_ray.runtime import task_device
    arch = ArchSpec.from_json(arch_json)
    layout, spec, dev = WeightLayout.from_arch(arch), permutation_spec(arch), task_device()
    ref_state = layout.unflatten(ref)
    return np.stack([layout.flatten(canonicalize(spec, ref_state, layout.unflatten(v), residual=residual, device=dev)[0])
                     for v in flat])


def _rows(flat: np.ndarray) -> int:
    return len(flat)


def _take(flat: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return flat[rows]


def _take_outputs(outputs: ModelOutputs, rows: np.ndarray) -> ModelOutputs:
    return outputs.take(rows)


def _built(build: Callable[[np.ndarray], np.ndarray], zoo: np.ndarray) -> np.ndarray:
    return build(zoo)


def _built_nn_median(build: Callable[[np.ndarray], np.ndarray], zoo: np.ndarray) -> float:
    return zoo_nn_median(build(zoo))


def stored(flat) -> tuple[ray.ObjectRef, int]:
    """Flat models in the object store, and how many: put there by the driver, or there already (an object ref
    to what a task built)."""
    if isinstance(flat, ray.ObjectRef):
        return flat, ray.get(ray.remote(_rows).remote(flat))
    return ray.put(flat), len(flat)


def _score_rows(arch_json: str, zoo_json: str, eval_json: str, flat: np.ndarray, start: int, stop: int,
                keep_logits: bool) -> tuple[np.ndarray, ModelOutputs]:
    """Rows start..stop: their accuracies (for the driver) and their outputs (left in the object store)."""
    acc, wrong, logits, preds = score_flat(arch_json, zoo_json, eval_json, flat[start:stop])
    return acc, ModelOutputs.of(preds, wrong, logits.shape[-1], logits if keep_logits else None)


def _nearest_block(start: int, skip: np.ndarray | None, per_space: int, n_parts: int, flat, zoo, *outputs):
    """A whole set (its ``n_parts`` first ``outputs``) against one block of the zoo (the rest, zoo models
    ``start``..): each model's D, its zoo index and S, and when ``per_space``: its ``per_space`` nearest zoo
    models of the block in weight space and in logit space (``nearest_k`` each). ``skip``: the zoo against
    itself, each model's own zoo index."""
    models, block = ModelOutputs.concat(outputs[:n_parts]), ModelOutputs.concat(outputs[n_parts:])
    d, idx, s = nearest_in_block(models, block, start, skip)
    if not per_space:
        return d, idx, s, None
    stop = start + len(block)
    logit_k = nearest_k(models.logits.reshape(len(models), -1), block.logits.reshape(len(block), -1), per_space,
                        skip, start)
    return d, idx, s, (nearest_k(flat, zoo[start:stop], per_space, skip, start), logit_k)


def _match_rows(arch_json: str, zoo: np.ndarray, flat: np.ndarray, cands: np.ndarray, start: int, stop: int,
                residual: bool):
    return matched_nearest(arch_json, zoo, flat[start:stop], cands[start:stop], residual=residual)


class ZooJudge:
    """Scores sets of flat models against one canonical zoo: accuracy, D and S in function space, and (when
    ``cfg.eval.weight_novelty``) the distance to the nearest zoo model up to permutation.

    ``zoo`` and each set are flat models or object refs to them; a set is in the object store once and its
    tasks read row ranges of it. The models' outputs (packed test predictions and mistakes, validation logits)
    stay in the object store in blocks; nearest neighbours are found by one task per block of the zoo
    (``eval.nn_block`` models) and merged. The driver keeps object refs and per-model results only.
    ``judge_sets`` keeps a few sets in flight so that the cluster stays busy.

    The zoo's own result (``result``) has every zoo model's accuracy; its D, S, nearest index and matched
    distance are those of the zoo models in ``sample`` (``eval.zoo_sample`` of them, seeded; every zoo model
    in a zoo no larger), each against the whole zoo, itself left out.
    """

    def __init__(self, arch: ArchSpec, cfg: RunConfig, zoo, bar=None):
        self.arch, self.cfg, self.bar = arch, cfg, bar
        ec = cfg.eval
        self.args = (arch.to_json(), cfg.zoo.model_dump_json(), ec.model_dump_json())
        self.zoo_ref, self.n_zoo = stored(zoo)
        ranges = self._ranges(self.n_zoo)
        accs, outputs = self._submit_scores(self.zoo_ref, ranges)
        per_block = max(1, ec.nn_block // (ranges[0][1] - ranges[0][0]))
        self.blocks = [(ranges[i][0], outputs[i:i + per_block]) for i in range(0, len(ranges), per_block)]
        self.sample = sample_rows(self.n_zoo, ec.zoo_sample, ec.seed)
        sample_flat, sample_outputs = self._sampled(outputs, ranges)
        nn = self._submit_nearest(sample_outputs, sample_flat, self.sample)
        self.result = self._finish(self._gather_acc(accs, ranges), nn, sample_flat)

    def _sampled(self, outputs: list, ranges: list[tuple[int, int]]) -> tuple:
        """The zoo's sample as a set: an object ref to its flat models, and refs to its outputs (taken from
        the zoo's, in order)."""
        if len(self.sample) == self.n_zoo:
            return self.zoo_ref, outputs
        take = ray.remote(_take_outputs)
        picks = [(out, self.sample[(self.sample >= a) & (self.sample < b)] - a) for out, (a, b) in zip(outputs, ranges)]
        return (ray.remote(_take).remote(self.zoo_ref, self.sample),
                [take.remote(out, rows) for out, rows in picks if len(rows)])

    def _ranges(self, n: int) -> list[tuple[int, int]]:
        step = min(self.cfg.eval.chunk_models, max(4, -(-n // cluster_cpus())))
        return [(i, min(i + step, n)) for i in range(0, n, step)]

    def _submit_scores(self, flat_ref, ranges: list[tuple[int, int]]) -> tuple[list, list]:
        """Object refs to each range's accuracies and to its outputs."""
        task = ray.remote(_score_rows).options(num_gpus=self.cfg.eval.num_gpus, num_returns=2)
        refs = [task.remote(*self.args, flat_ref, a, b, self.cfg.eval.weight_novelty) for a, b in ranges]
        return [r[0] for r in refs], [r[1] for r in refs]

    def _submit_nearest(self, outputs: list, flat_ref, skip: np.ndarray | None = None) -> list:
        """One task per block of the zoo, each comparing the whole set with its block."""
        per_space = self.cfg.eval.nn_candidates if self.cfg.eval.weight_novelty else 0
        flat, zoo = (flat_ref, self.zoo_ref) if per_space else (None, None)
        task = ray.remote(_nearest_block)
        return [task.remote(start, skip, per_space, len(outputs), flat, zoo, *outputs, *block)
                for start, block in self.blocks]

    def _gather_acc(self, accs: list, ranges: list[tuple[int, int]]) -> np.ndarray:
        return np.concatenate(wait_with_progress(accs, "eval", self.bar, [b - a for a, b in ranges]))

    def _finish(self, acc: np.ndarray, nn: list, flat_ref) -> SetResult:
        found = ray.get(nn)
        d, nearest_idx, s = merge_blocks([f[:3] for f in found])
        weight_dist = None
        if self.cfg.eval.weight_novelty:
            ec = self.cfg.eval
            cands = np.concatenate([merge_k([f[3][space] for f in found], ec.nn_candidates)[1] for space in (0, 1)],
                                   axis=1)
            task = ray.remote(_match_rows).options(num_gpus=ec.num_gpus)
            ranges = self._ranges(len(d))
            parts = wait_with_progress([task.remote(self.arch.to_json(), self.zoo_ref, flat_ref, cands, a, b,
                                                    self.cfg.canon.residual) for a, b in ranges],
                                       "eval", self.bar, [b - a for a, b in ranges])
            weight_dist = np.concatenate([p[0] for p in parts])
        return SetResult(acc, d, s, nearest_idx, weight_dist)

    def submit(self, flat):
        """Start scoring a set (flat models or an object ref to them); ``finish`` completes the handle."""
        ref, n = stored(flat)
        ranges = self._ranges(n)
        accs, outputs = self._submit_scores(ref, ranges)
        return ref, accs, ranges, self._submit_nearest(outputs, ref)

    def finish(self, handle) -> SetResult:
        ref, accs, ranges, nn = handle
        return self._finish(self._gather_acc(accs, ranges), nn, ref)

    def __call__(self, flat) -> SetResult:
        return self.finish(self.submit(flat))


def baseline_at(points: list[dict], method: str, x: float, field: str = "acc", axis: str = NOVELTY) -> float:
    """A curve's ``field`` (accuracy, or its standard error ``se``) linearly interpolated to ``axis`` = ``x``
    (clamped at its measured ends)."""
    pts = sorted((p[axis], p[field]) for p in points if p["method"] == method)
    return float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))


def add_margins(points: list[dict], axis: str = NOVELTY) -> None:
    """Each generator point gets every baseline's accuracy at its novelty (``baselines_at``), ``margin`` over
    the best of them (``best_baseline``), and ``margin_se``: the standard error of that difference (both means'
    standard errors, the baseline's interpolated like its accuracy)."""
    methods = list(dict.fromkeys(p["method"] for p in points if not p["method"].startswith(GENERATOR)))
    for p in points:
        if p["method"].startswith(GENERATOR) and methods:
            accs = {m: baseline_at(points, m, p[axis], axis=axis) for m in methods}
            best = max(accs, key=accs.get)
            p["baselines_at"] = accs
            p["best_baseline"] = best
            p["margin"] = p["acc"] - accs[best]
            p["margin_se"] = float(np.hypot(p["se"], baseline_at(points, best, p[axis], "se", axis)))


def accepted(p: dict, min_novelty: float) -> bool:
    """An operating point passes when it is novel enough in function space and beats the best baseline at
    equal functional novelty by more than one standard error."""
    return bool(p[NOVELTY] >= min_novelty and p.get("margin", -np.inf) > p.get("margin_se", np.inf))


def judge_sets(judge: ZooJudge, sets: Iterable[ScoredSet], in_flight: int = 3) -> tuple[list[dict], dict[str, SetResult]]:
    """Trade-off points and per-model results of every set. Each set is built from the zoo in a Ray task, and
    at most ``in_flight`` of them wait in the object store while the cluster scores them."""
    sets, pending, results = list(sets), deque(), {}

    def finish_oldest():
        s, handle = pending.popleft()
        results[s.key] = judge.finish(handle)
    for s in sets:
        built = ray.remote(_built).options(num_gpus=s.build_gpus).remote(s.build, judge.zoo_ref)
        pending.append((s, judge.submit(built)))
        if len(pending) >= in_flight:
            finish_oldest()
    while pending:
        finish_oldest()
    points = [point(s.key, s.method, s.setting, results[s.key], judge.result) for s in sets]
    add_margins(points)
    return points, results


def evaluate(cfg: RunConfig, arch: ArchSpec, zoo, generated: list[ScoredSet],
             extra: list[ScoredSet] = ()) -> tuple[dict, dict]:
    """Returns (metrics, accuracies per set). ``zoo``: the canonical zoo's flat models or an object ref to them;
    ``generated``: the sample sets, the configured temperature first; ``extra``: further generator sets (the
    no-canon variant). All flat weights are in canonical space."""
    from tqdm.auto import tqdm
    ec = cfg.eval
    layout = WeightLayout.from_arch(arch)
    zoo, n_zoo = stored(zoo)
    sample = sample_rows(n_zoo, ec.zoo_sample, ec.seed)    # the zoo models its reference statistics come from
    # direct distance (the noise baseline's scale), over the same sample
    zoo_median = ray.get(ray.remote(zoo_nn_median).remote(zoo, None if len(sample) == n_zoo else sample))
    baselines = [ScoredSet(b.key, b.method, b.setting, b.build, ec.n_baseline)
                 for b in baseline_sets(n_zoo, layout, ec, zoo_median)]
    sets = [*generated, *baselines, *extra]
    set_models = sum(s.size for s in sets)
    total = n_zoo + set_models + (len(sample) + set_models if ec.weight_novelty else 0)   # scored, then matched
    with tqdm(total=total, desc="eval", unit="model") as bar:
        judge = ZooJudge(arch, cfg, zoo, bar)
        points, results = judge_sets(judge, sets)
    main = generated[0].key
    op = next(p for p in points if p["key"] == main)
    zoo_r = judge.result
    accuracy = {"zoo": summary(zoo_r.acc)} | {s.key: summary(results[s.key].acc) for s in [*generated, *extra]}
    gen_nn_median = ray.get(ray.remote(_built_nn_median).remote(generated[0].build, zoo))
    metrics = {
        "preset": cfg.preset,
        "model": {"family": arch.family, "args": arch.args, "n_params": layout.size, "dataset": cfg.zoo.dataset},
        "accuracy": accuracy,
        "zoo": point("zoo", "zoo", "", zoo_r, zoo_r),
        "tradeoff": points,
        "model_accuracy": {"zoo": [round(float(a) * 100, 4) for a in zoo_r.acc]} |
                          {key: [round(float(a) * 100, 4) for a in r.acc] for key, r in results.items()},
        "diversity": {"zoo_reference": zoo_reference(len(sample), n_zoo, ec.seed),
                      "zoo_median_disagreement": float(np.median(zoo_r.disagreement)),
                      "zoo_nn_median_direct": zoo_median,
                      "zoo_nn_median_matched": None if zoo_r.weight_dist is None else float(np.median(zoo_r.weight_dist)),
                      # spread of the generated set itself (its own median NN distance over the zoo's, direct)
                      "generated_self_nn_ratio": gen_nn_median / zoo_median},
        "operating_point": {**{k: op.get(k) for k in ("setting", "acc", "se", NOVELTY, "similarity", "weight_novelty",
                                                       "baselines_at", "best_baseline", "margin", "margin_se")},
                            "temperature": cfg.sample.temperature, "min_novelty": ec.accept_novelty,
                            "gap_to_zoo": accuracy["zoo"]["mean"] - op["acc"],
                            "accepted": accepted(op, ec.accept_novelty),
                            "passing_settings": [p["setting"] for p in points
                                                 if p["method"] == GENERATOR and accepted(p, ec.accept_novelty)]},
    }
    return metrics, {"zoo": zoo_r.acc, "generated": results[main].acc}


def zoo_reference(sampled: int, n_zoo: int, seed: int) -> dict:
    """How the zoo's own statistics (the units of novelty, its row of the trade-off) were measured."""
    how = (f"{sampled} of {n_zoo} zoo models drawn uniformly without replacement (seed {seed}), each against "
           "the whole zoo, itself left out" if sampled < n_zoo else
           f"every zoo model ({n_zoo}) against the rest of the zoo")
    return {"models": sampled, "zoo_models": n_zoo, "sampled": sampled < n_zoo, "how": how}


def _from_manifest(uri: str, arch: ArchSpec) -> Callable[[np.ndarray], np.ndarray]:
    return lambda zoo: load_flat_models(store.read_table(uri)["uri"], arch)


def run_eval(cfg: RunConfig, st: RunStore) -> dict:
    """The eval stage: score the zoo, every set of samples, the baselines (and the no-canon variant's samples
    when that sub-run exists); writes report/."""
    arch = ArchSpec.parse(cfg.zoo.arch)
    ok = ok_rows(st.manifest("canon"))
    zoo = ray.remote(load_flat_models).remote(ok["canon_uri"], arch)    # loaded into the object store by a task
    generated = [ScoredSet("generated" if not folder else f"gen_{folder}", GENERATOR, f"T={temp:g}",
                           _from_manifest(st.uri("samples", folder, "manifest.parquet"), arch), cfg.sample.n)
                 for folder, (temp, _) in sample_sets(cfg).items()]
    sub = RunStore(st.uri(NO_CANON), zoo_root=st.zoo_root)
    extra = []
    if cfg.eval.compare_no_canon and cfg.canon.enabled and sub.done(STAGE_FOLDERS["sample"]):
        ref_index = list(ok["model_id"]).index(ok["reference_id"].iloc[0])
        raw = _from_manifest(sub.stage_uri("sample", "manifest.parquet"), arch)

        def aligned(zoo: np.ndarray) -> np.ndarray:   # aligned onto the reference, so that weight distances compare
            return canonicalize_flat(arch.to_json(), zoo[ref_index], raw(zoo), cfg.canon.residual)
        extra.append(ScoredSet("no_canon", f"{GENERATOR} (no canon)", f"T={cfg.sample.temperature:g}", aligned,
                               cfg.sample.n, build_gpus=cfg.eval.num_gpus))
    metrics, accs = evaluate(cfg, arch, zoo, generated, extra)
    metrics["root"] = st.root
    metrics["timings"] = st.stage_seconds()
    if extra:
        metrics["timings"].update({f"{k} (no canon)": v for k, v in sub.stage_seconds().items()})
    metrics["counts"] = {s: st.stage_info(STAGE_FOLDERS[s]) for s in ("zoo", "canon", "pca") if st.done(STAGE_FOLDERS[s])}
    write_report(st.uri("report"), metrics, accs["zoo"], accs["generated"])
    op = metrics["operating_point"]
    return {"zoo_acc": metrics["accuracy"]["zoo"]["mean"], "gen_acc": op["acc"], "novelty": op[NOVELTY],
            "margin": op["margin"], "accepted": op["accepted"]}
