"""Stage 6: evaluate zoo and generated models, baselines and the temperature sweep; write the report."""
from __future__ import annotations

import numpy as np

from dwf_ray import store
from dwf_ray.archs import ArchSpec, permutation_spec
from dwf_ray.canon.job import load_canonical
from dwf_ray.canon.matching import canonicalize
from dwf_ray.config import EvalConfig, RunConfig
from dwf_ray.eval.diversity import (candidates, interpolation_baseline, matched_nearest, noise_baseline,
                                    wrong_iou, zoo_nn_median)
from dwf_ray.eval.report import summary, write_report
from dwf_ray.eval.scoring import score_many
from dwf_ray.runtime import map_chunks
from dwf_ray.sample import sample_sets
from dwf_ray.store import NO_CANON, STAGE_FOLDERS, RunStore
from dwf_ray.weights import WeightLayout, load_flat_models


def canonicalize_flat(arch_json: str, ref: np.ndarray, flat: np.ndarray, residual: bool = False) -> tuple[np.ndarray]:
    """Weight-match (TransFusion for attention) each flat model onto the reference: (canonical flat models,)."""
    from dwf_ray.runtime import task_device
    arch = ArchSpec.from_json(arch_json)
    layout, spec, dev = WeightLayout.from_arch(arch), permutation_spec(arch), task_device()
    ref_state = layout.unflatten(ref)
    return (np.stack([layout.flatten(canonicalize(spec, ref_state, layout.unflatten(v), residual=residual, device=dev)[0])
                      for v in flat]),)


def baseline_at(points: list[dict], method: str, nov: float, field: str = "acc") -> float:
    """A baseline's accuracy (or another ``field``, such as its standard error ``se``) linearly interpolated
    to novelty ``nov`` (clamped at its measured ends)."""
    pts = sorted((p["novelty"], p[field]) for p in points if p["method"] == method)
    return float(np.interp(nov, [p[0] for p in pts], [p[1] for p in pts]))


def add_margins(points: list[dict]) -> None:
    """Each generator point gets ``margin``: its accuracy minus the better baseline at the same novelty, and
    ``margin_se``: the standard error of that difference (both means' standard errors, the baseline's
    interpolated like its accuracy)."""
    for p in points:
        if p["method"].startswith("generator"):
            accs = {m: baseline_at(points, m, p["novelty"]) for m in ("noise", "interpolation")}
            best = max(accs, key=accs.get)
            p["margin"] = p["acc"] - accs[best]
            p["margin_se"] = float(np.hypot(p["se"], baseline_at(points, best, p["novelty"], "se")))


def baseline_sets(zoo: np.ndarray, ec: EvalConfig, zoo_median: float) -> dict[str, tuple[str, str, np.ndarray]]:
    """The two baselines at every configured setting: key -> (method, setting, flat models)."""
    out = {f"noise_{lvl:g}": ("noise", f"{lvl:g} x NN dist", noise_baseline(zoo, lvl, zoo_median, ec.n_baseline, ec.seed))
           for lvl in ec.noise_levels}
    out.update({f"mix_{w:g}": ("interpolation", f"w={w:g}", interpolation_baseline(zoo, w, ec.n_baseline, ec.seed))
                for w in ec.mix_weights})
    return out


def score_and_match(arch: ArchSpec, cfg: RunConfig, sets: dict[str, np.ndarray], what: str = "eval") -> tuple:
    """Test scores of every set (``sets["zoo"]`` is the zoo) and each model's nearest zoo model up to permutation.

    Returns (scores: key -> (acc, wrong, logits), nn: key -> (distances, zoo indices), unit), where unit is the
    zoo's own median nearest-neighbour distance, the denominator of every novelty ratio.
    """
    ec, zoo = cfg.eval, sets["zoo"]
    scores = score_many(arch, cfg.zoo, ec, sets)
    zoo_logits = scores["zoo"][2]
    nn = map_chunks(matched_nearest, {
        key: ((arch.to_json(), zoo), (flat, candidates(flat, zoo, scores[key][2], zoo_logits, ec.nn_candidates,
                                                       exclude_self=key == "zoo")))
        for key, flat in sets.items()}, f"{what}: nearest zoo models", num_gpus=ec.num_gpus,
        residual=cfg.canon.residual)
    return scores, nn, float(np.median(nn["zoo"][0]))


def evaluate(cfg: RunConfig, arch: ArchSpec, zoo: np.ndarray, generated: dict[str, tuple[float, np.ndarray]],
             reference: np.ndarray, no_canon: np.ndarray | None = None) -> tuple[dict, dict]:
    """Returns (metrics, accuracies per set). ``generated``: samples/ sub-folder -> (temperature, flat models),
    "" being the configured temperature. All flat weights are in canonical space except ``no_canon``."""
    ec, sc = cfg.eval, cfg.sample
    zoo_median = zoo_nn_median(zoo)      # direct distance: the noise baseline's scale and the spread's unit
    sets: dict[str, np.ndarray] = {"zoo": zoo}
    labels: dict[str, tuple[str, str]] = {}
    for folder, (temp, flat) in generated.items():
        key = f"gen_{folder}" if folder else "generated"
        sets[key], labels[key] = flat, ("generator", f"T={temp:g}")
    for key, (method, setting, flat) in baseline_sets(zoo, ec, zoo_median).items():
        sets[key], labels[key] = flat, (method, setting)
    if no_canon is not None:   # aligned onto the reference afterwards, so that distances compare
        sets["no_canon"] = map_chunks(canonicalize_flat, {"no_canon": ((arch.to_json(), reference), (no_canon,))},
                                      "eval: aligning no-canon samples", num_gpus=ec.num_gpus,
                                      residual=cfg.canon.residual)["no_canon"][0]
        labels["no_canon"] = ("generator (no canon)", f"T={sc.temperature:g}")
    scores, nn, unit = score_and_match(arch, cfg, sets)
    zoo_acc, zoo_wrong, _ = scores["zoo"]

    points = []
    for key, (method, setting) in labels.items():
        acc, wrong, _ = scores[key]
        dist, idx = nn[key]
        points.append({"method": method, "setting": setting, "key": key, "acc": float(acc.mean() * 100),
                       "se": float(acc.std(ddof=1) / np.sqrt(len(acc)) * 100) if len(acc) > 1 else 0.0,
                       "novelty": float(np.median(dist) / unit), "iou": float(wrong_iou(wrong, zoo_wrong[idx]).mean())})
    add_margins(points)
    op = next(p for p in points if p["key"] == "generated")
    noise_acc, interp_acc = baseline_at(points, "noise", op["novelty"]), baseline_at(points, "interpolation", op["novelty"])
    passing = [p["setting"] for p in points if p["method"] == "generator" and p["novelty"] >= 0.25 and p["margin"] > 0]
    gen_acc, generated = scores["generated"][0], sets["generated"]
    accuracy = {"zoo": summary(zoo_acc), "generated": summary(gen_acc)}
    if no_canon is not None:
        accuracy["generated_no_canon"] = summary(scores["no_canon"][0])
    metrics = {
        "preset": cfg.preset,
        "model": {"family": arch.family, "args": arch.args, "n_params": int(zoo.shape[1]), "dataset": cfg.zoo.dataset},
        "accuracy": accuracy,
        "diversity": {"zoo_nn_median": unit, "zoo_nn_median_direct": zoo_median, "novelty_ratio": op["novelty"],
                      "gen_nn_dist_median": float(np.median(nn["generated"][0])),
                      "wrong_iou_mean": op["iou"],
                      "zoo_wrong_iou_mean": float(wrong_iou(zoo_wrong, zoo_wrong[nn["zoo"][1]]).mean()),
                      "distinct_nearest_zoo_models": int(len(np.unique(nn["generated"][1]))),
                      # spread of the generated set itself, in the same unit (1.0 = as spread as the zoo)
                      "generated_self_nn_ratio": zoo_nn_median(generated) / zoo_median},
        "tradeoff": points,
        "model_accuracy": {key: [round(float(a) * 100, 4) for a in scores[key][0]] for key in sets},   # test %
        "operating_point": {"temperature": sc.temperature, "acc": op["acc"], "novelty": op["novelty"],
                            "noise_acc_at_novelty": noise_acc, "interp_acc_at_novelty": interp_acc,
                            "margin": op["margin"], "margin_se": op["margin_se"],
                            "gap_to_zoo": accuracy["zoo"]["mean"] - op["acc"],
                            "accepted": bool(op["novelty"] >= 0.25 and op["margin"] > 0),
                            "passing_settings": passing},   # every temperature that passes
    }
    return metrics, {"zoo": zoo_acc, "generated": gen_acc}


def run_eval(cfg: RunConfig, st: RunStore) -> dict:
    """The eval stage: score the zoo, every set of samples, the baselines (and the no-canon variant's samples
    when that sub-run exists); writes report/."""
    arch = ArchSpec.parse(cfg.zoo.arch)
    ok, zoo_flat = load_canonical(cfg, st)
    reference = zoo_flat[list(ok["model_id"]).index(ok["reference_id"].iloc[0])]
    generated = {folder: (temp, load_flat_models(store.read_table(st.uri("samples", folder, "manifest.parquet"))["uri"],
                                                 arch))
                 for folder, (temp, _) in sample_sets(cfg).items()}
    sub = RunStore(st.uri(NO_CANON), zoo_root=st.zoo_root)
    with_no_canon = cfg.eval.compare_no_canon and cfg.canon.enabled and sub.done(STAGE_FOLDERS["sample"])
    no_canon = load_flat_models(sub.manifest("sample")["uri"], arch) if with_no_canon else None
    metrics, accs = evaluate(cfg, arch, zoo_flat, generated, reference, no_canon)
    metrics["root"] = st.root
    metrics["timings"] = st.stage_seconds()
    if with_no_canon:
        metrics["timings"].update({f"{k} (no canon)": v for k, v in sub.stage_seconds().items()})
    metrics["counts"] = {s: st.stage_info(STAGE_FOLDERS[s]) for s in ("zoo", "canon") if st.done(STAGE_FOLDERS[s])}
    write_report(st.uri("report"), metrics, accs["zoo"], accs["generated"])
    return {"zoo_acc": metrics["accuracy"]["zoo"]["mean"], "gen_acc": metrics["accuracy"]["generated"]["mean"],
            "novelty": metrics["diversity"]["novelty_ratio"], "accepted": metrics["operating_point"]["accepted"]}
