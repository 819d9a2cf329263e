"""The zoo-size curve's bench (bench/zoo_scaling.py): its pure helpers, with no run."""
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from dwf_ray.presets import preset

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "zoo_scaling.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("zoo_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _manifest(ids):
    return pd.DataFrame({"model_id": ids, "status": ["ok"] * len(ids), "test_acc": [0.5] * len(ids)})


def test_first_rows_are_the_smallest_model_ids_whatever_the_file_order(bench):
    man = _manifest(["m00003", "m00000", "m00002", "m00001"])
    assert bench.first_rows(man, 3)["model_id"].tolist() == ["m00000", "m00001", "m00002"]
    with pytest.raises(ValueError, match="has 4 models"):
        bench.first_rows(man, 5)


def test_every_recipe_is_a_valid_config_at_every_zoo_size(bench):
    base = preset("mnist1d-mlp-scale")
    for recipe in bench.RECIPES.values():
        for n in (100, 300, 1000, 3000, 10000):
            cfg = base.with_values({"zoo.n_models": n, **recipe(n)})
            assert cfg.zoo.n_models == n


def test_shared_stages_stop_at_the_first_changed_section(bench):
    base = preset("mnist1d-mlp-scale").model_dump()
    assert bench.shared_stages(base, base) == ["zoo", "canon", "pca", "flow"]
    flow = preset("mnist1d-mlp-scale").with_overrides(["flow.ot_coupling=true"]).model_dump()
    assert bench.shared_stages(flow, base) == ["zoo", "canon", "pca"]
    pca = preset("mnist1d-mlp-scale").with_overrides(["pca.max_k=null"]).model_dump()
    assert bench.shared_stages(pca, base) == ["zoo", "canon"]
    evals = preset("mnist1d-mlp-scale").with_overrides(["eval.temperatures=[1.0]"]).model_dump()
    assert bench.shared_stages(evals, base) == ["zoo", "canon", "pca", "flow"]   # sample and eval always redone


def _point(setting, acc, nov, margin, se):
    return {"method": "generator", "setting": setting, "acc": acc, "se": 0.3, "func_novelty": nov,
            "similarity": 0.5, "margin": margin, "margin_se": se, "best_baseline": "noise"}


def test_best_setting_needs_the_novelty_and_ranks_by_margin_minus_two_errors(bench):
    points = [_point("T=0.1", 55.0, 0.2, 3.0, 0.1),        # the largest margin, but too near the zoo
              _point("T=0.7", 50.0, 0.6, 1.0, 0.1),        # 1.0 - 0.2
              _point("T=1", 49.0, 0.9, 1.5, 0.5),          # 1.5 - 1.0
              {"method": "noise", "func_novelty": 1.0, "acc": 40.0}]
    assert bench.best_setting(points, 0.5)["setting"] == "T=0.7"
    assert bench.best_setting(points, 2.0) is None


def test_curve_point_reads_a_report(bench):
    op = _point("T=1", 49.0, 0.9, 1.5, 0.5)
    metrics = {"accuracy": {"zoo": {"mean": 55.2}}, "tradeoff": [op],
               "operating_point": {**op, "accepted": True}}
    p = bench.curve_point(metrics, {"flow": {"seconds": 12.0}}, {"k": 256, "explained_variance_total": 0.4})
    assert (p["zoo_acc"], p["k"], p["variance_kept"]) == (55.2, 256, 0.4)
    assert p["operating_point"]["margin"] == 1.5 and p["operating_point"]["accepted"]
    assert p["best"]["setting"] == "T=1" and p["seconds"] == {"flow": 12.0}


def test_ceiling_ks_are_counts_variance_shares_or_every_component(bench):
    cumulative = [0.5, 0.8, 0.9, 0.99, 1.0]
    assert bench.resolve_ks("2,0.9,0.95,all,64", cumulative) == {"2": 2, "0.9": 3, "0.95": 4, "all": 5, "64": 5}


def test_separate_runs_of_the_bench_add_to_one_results_file(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "zoo_scaling.json")
    bench.save("curves", "k90", {"acc": 1.0}, "100")
    bench.save("curves", "k90", {"acc": 2.0}, "1000")
    bench.save("ceiling", "1000", [{"k": "all"}])
    results = bench.load_results()
    assert results["curves"] == {"k90": {"100": {"acc": 1.0}, "1000": {"acc": 2.0}}}
    assert results["ceiling"] == {"1000": [{"k": "all"}]}
