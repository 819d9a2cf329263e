"""The zoo-size curve's bench (bench/zoo_scaling.py): its pure helpers, with no run."""
import importlib.util
from pathlib import Path

import numpy as np
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


def test_a_report_places_its_run_on_the_curve_measured_for_its_preset(smoke_run, tmp_path, monkeypatch):
    """The curve file the bench writes (--save-curve) puts a section and a plot in the report of a run of that
    preset: the measured points and this run's operating point in order of zoo size. A preset with no curve gets
    neither."""
    import json
    from dwf_ray.eval import zoo_curve
    from dwf_ray.eval.report import write_report
    root, _ = smoke_run
    metrics = json.loads((root / "report" / "metrics.json").read_text())
    op, n = metrics["operating_point"], metrics["diversity"]["zoo_reference"]["zoo_models"]
    accs = [np.array(metrics["model_accuracy"][k]) / 100 for k in ("zoo", "generated")]
    monkeypatch.setattr(zoo_curve, "CURVES", tmp_path / "curves.json")
    assert "measured curve" not in write_report(str(tmp_path / "none"), metrics, *accs)
    assert not (tmp_path / "none" / "zoo_curve.png").exists()

    measured = [{"n": size, "zoo_acc": 90.0, "acc": 80.0 + i, "func_novelty": 1.0, "margin": -1.0 + i,
                 "margin_se": 0.2, "best_baseline": "noise"} for i, size in enumerate((4, 100, 10))]
    zoo_curve.save_curve(metrics["preset"], "a test zoo", measured)
    zoo_curve.save_curve("other", "another preset's", measured[:1])
    assert [p["n"] for p in zoo_curve.measured_curve(metrics["preset"])["points"]] == [4, 10, 100]
    md = write_report(str(tmp_path / "placed"), metrics, *accs)
    assert f"n = {n:,} lies between the measured sizes 10 and 100" in md
    rows = [line for line in md.splitlines() if line.startswith(("| measured |", "| **this run** |"))]
    assert [r.split("|")[2].strip() for r in rows] == ["4", "10", str(n), "100"]
    assert f"{op['margin']:+.2f} ({op['margin_se']:.2f})" in rows[2] and "this run" in rows[2]
    assert (tmp_path / "placed" / "zoo_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_curves_are_presets_own_and_well_formed():
    """Every curve shipped in zoo_curves.json belongs to a preset, as written: points in order of n, one per n,
    every field a report reads; the scale preset's spans 1,000 to 10,000 models."""
    import json
    from dwf_ray.eval.zoo_curve import CURVES, FIELDS
    shipped = json.loads(CURVES.read_text())
    assert {"mnist1d-mlp-scale", "mnist1d-cnn", "digits-mlp"} <= set(shipped)
    for name, curve in shipped.items():
        preset(name)                                          # a preset of that name exists
        sizes = [p["n"] for p in curve["points"]]
        assert sizes == sorted(set(sizes)) and sizes, name
        for p in curve["points"]:
            assert set(p) == set(FIELDS) and p["margin_se"] > 0 and -100 < p["margin"] < 100, (name, p)
    assert {1000, 10000} <= {p["n"] for p in shipped["mnist1d-mlp-scale"]["points"]}
