"""The eval stage: score the zoo, every set of samples, the baselines (and the no-canon variant's samples when
that sub-run exists) with ``eval/judge.py``; the metrics (``evaluate``: accuracy, the trade-off of
``eval/tradeoff.py``, diversity, the operating point) go to report/."""
from __future__ import annotations

from typing import Callable

import numpy as np
import ray

from dwf_ray import store
from dwf_ray.archs import ArchSpec
from dwf_ray.canon.align import canonicalize_flat
from dwf_ray.config import RunConfig
from dwf_ray.eval.baselines import baseline_sets
from dwf_ray.eval.diversity import sample_rows, zoo_nn_median
from dwf_ray.eval.judge import ScoredSet, ZooJudge, judge_sets, stored
from dwf_ray.eval.metrics import NOVELTY, point
from dwf_ray.eval.report import summary, write_report
from dwf_ray.eval.tradeoff import GENERATOR, accepted
from dwf_ray.sample.stage import sample_sets
from dwf_ray.store import NO_CANON, STAGE_FOLDERS, RunStore, ok_rows
from dwf_ray.weights import WeightLayout, load_flat_models


def _built_nn_median(build: Callable[[np.ndarray], np.ndarray], zoo: np.ndarray) -> float:
    return zoo_nn_median(build(zoo))


def evaluate(cfg: RunConfig, arch: ArchSpec, zoo, generated: list[ScoredSet],
             extra: list[ScoredSet] = ()) -> tuple[dict, dict]:
    """Returns (metrics, accuracies per set). ``zoo``: the canonical zoo's flat models or an object ref to them;
    ``generated``: the sample sets, the configured temperature first; ``extra``: further generator sets (the
    no-canon variant). All flat weights are in canonical space."""
    from tqdm.auto import tqdm
    eval_cfg = cfg.eval
    layout = WeightLayout.from_arch(arch)
    zoo, n_zoo = stored(zoo)
    sample = sample_rows(n_zoo, eval_cfg.zoo_sample, eval_cfg.seed)    # the zoo models its reference statistics come from
    # direct distance (the noise baseline's scale), over the same sample
    zoo_median = ray.get(ray.remote(zoo_nn_median).remote(zoo, None if len(sample) == n_zoo else sample))
    baselines = [ScoredSet(b.key, b.method, b.setting, b.build, eval_cfg.n_baseline)
                 for b in baseline_sets(n_zoo, layout, eval_cfg, zoo_median)]
    sets = [*generated, *baselines, *extra]
    set_models = sum(s.size for s in sets)
    total = n_zoo + set_models + (len(sample) + set_models if eval_cfg.weight_novelty else 0)   # scored, then matched
    with tqdm(total=total, desc="eval", unit="model") as bar:
        judge = ZooJudge(arch, cfg, zoo, bar)
        points, results = judge_sets(judge, sets)
    main = generated[0].key
    operating = next(p for p in points if p["key"] == main)
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
        "diversity": {"zoo_reference": zoo_reference(len(sample), n_zoo, eval_cfg.seed),
                      "zoo_median_disagreement": float(np.median(zoo_r.disagreement)),
                      "zoo_nn_median_direct": zoo_median,
                      "zoo_nn_median_matched": None if zoo_r.weight_dist is None else float(np.median(zoo_r.weight_dist)),
                      # spread of the generated set itself (its own median NN distance over the zoo's, direct)
                      "generated_self_nn_ratio": gen_nn_median / zoo_median},
        "operating_point": {**{k: operating.get(k) for k in ("setting", "acc", "se", NOVELTY, "similarity", "weight_novelty",
                                                       "baselines_at", "best_baseline", "margin", "margin_se")},
                            "temperature": cfg.sample.temperature, "min_novelty": eval_cfg.accept_novelty,
                            "gap_to_zoo": accuracy["zoo"]["mean"] - operating["acc"],
                            "accepted": accepted(operating, eval_cfg.accept_novelty),
                            "passing_settings": [p["setting"] for p in points
                                                 if p["method"] == GENERATOR and accepted(p, eval_cfg.accept_novelty)]},
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


def run_eval(cfg: RunConfig, run_store: RunStore) -> dict:
    """The eval stage: score the zoo, every set of samples, the baselines (and the no-canon variant's samples
    when that sub-run exists); writes report/."""
    arch = ArchSpec.parse(cfg.zoo.arch)
    ok = ok_rows(run_store.manifest("canon"))
    zoo = ray.remote(load_flat_models).remote(ok["canon_uri"], arch)    # loaded into the object store by a task
    generated = [ScoredSet("generated" if not folder else f"gen_{folder}", GENERATOR, f"T={temp:g}",
                           _from_manifest(run_store.uri("samples", folder, "manifest.parquet"), arch), cfg.sample.n)
                 for folder, (temp, _) in sample_sets(cfg).items()]
    sub = RunStore(run_store.uri(NO_CANON), zoo_root=run_store.zoo_root)
    extra = []
    if cfg.compares_no_canon and sub.done(STAGE_FOLDERS["sample"]):
        ref_index = list(ok["model_id"]).index(ok["reference_id"].iloc[0])
        raw = _from_manifest(sub.stage_uri("sample", "manifest.parquet"), arch)

        def aligned(zoo: np.ndarray) -> np.ndarray:   # aligned onto the reference, so that weight distances compare
            return canonicalize_flat(arch.to_json(), zoo[ref_index], raw(zoo), cfg.canon.residual)
        extra.append(ScoredSet("no_canon", f"{GENERATOR} (no canon)", f"T={cfg.sample.temperature:g}", aligned,
                               cfg.sample.n, build_gpus=cfg.eval.num_gpus))
    metrics, accs = evaluate(cfg, arch, zoo, generated, extra)
    metrics["root"] = run_store.root
    metrics["timings"] = run_store.stage_seconds()
    if extra:
        metrics["timings"].update({f"{k} (no canon)": v for k, v in sub.stage_seconds().items()})
    metrics["counts"] = {s: run_store.stage_info(STAGE_FOLDERS[s]) for s in ("zoo", "canon", "pca")
                         if run_store.done(STAGE_FOLDERS[s])}
    write_report(run_store.uri("report"), metrics, accs["zoo"], accs["generated"])
    operating = metrics["operating_point"]
    return {"zoo_acc": metrics["accuracy"]["zoo"]["mean"], "gen_acc": operating["acc"], "novelty": operating[NOVELTY],
            "margin": operating["margin"], "accepted": operating["accepted"]}
