"""The scheduling of evaluation: sets of models scored against one canonical zoo in Ray tasks (``ZooJudge``), a
few sets in flight at a time (``judge_sets``); the eval stage and its metrics are ``eval/stage.py``.

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

from dwf_ray.archs import ArchSpec
from dwf_ray.config import RunConfig
from dwf_ray.eval.diversity import (ModelOutputs, matched_nearest, merge_blocks, merge_k, nearest_in_block,
                                   nearest_k, sample_rows)
from dwf_ray.eval.metrics import SetResult, point
from dwf_ray.eval.scoring import score_flat
from dwf_ray.eval.tradeoff import add_margins
from dwf_ray.runtime import cluster_cpus
from dwf_ray.runtime.progress import wait_with_progress


@dataclass(frozen=True)
class ScoredSet:
    key: str
    method: str
    setting: str
    build: Callable[[np.ndarray], np.ndarray]   # the canonical zoo -> the set's flat models (run in a Ray task)
    size: int                                   # models in the set (for the progress bar)
    build_gpus: float = 0.0                     # GPUs for the task that builds it (weight matching on a GPU)


def _rows(flat: np.ndarray) -> int:
    return len(flat)


def _take(flat: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return flat[rows]


def _take_outputs(outputs: ModelOutputs, rows: np.ndarray) -> ModelOutputs:
    return outputs.take(rows)


def _built(build: Callable[[np.ndarray], np.ndarray], zoo: np.ndarray) -> np.ndarray:
    return build(zoo)


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
        eval_cfg = cfg.eval
        self.args = (arch.to_json(), cfg.zoo.model_dump_json(), eval_cfg.model_dump_json())
        self.zoo_ref, self.n_zoo = stored(zoo)
        ranges = self._ranges(self.n_zoo)
        accs, outputs = self._submit_scores(self.zoo_ref, ranges)
        per_block = max(1, eval_cfg.nn_block // (ranges[0][1] - ranges[0][0]))
        self.blocks = [(ranges[i][0], outputs[i:i + per_block]) for i in range(0, len(ranges), per_block)]
        self.sample = sample_rows(self.n_zoo, eval_cfg.zoo_sample, eval_cfg.seed)
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
            eval_cfg = self.cfg.eval
            cands = np.concatenate([merge_k([f[3][space] for f in found], eval_cfg.nn_candidates)[1] for space in (0, 1)],
                                   axis=1)
            task = ray.remote(_match_rows).options(num_gpus=eval_cfg.num_gpus)
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
