"""Flow matching: sources, times, schedule, OT coupling, seeded sampling, conditional flows with guidance,
and a Ray Train run that resumes after a worker failure."""
import math

import numpy as np
import pytest
import torch

from dwf_ray.config import FlowConfig, SampleConfig
from dwf_ray.flow.checkpoint import LatentScaler
from dwf_ray.flow.model import VelocityMLP
from dwf_ray.flow.path import ot_pair, source_noise, training_times
from dwf_ray.flow.trainer import lr_lambda, train_in_process
from dwf_ray.sample.generator import Decoder, Generator

IDENTITY = LatentScaler(np.zeros(4), np.ones(4))


def sample_latents(net, scaler, n, source_std=1.0, temperature=1.0, solver="rk4", steps=100, seed=0,
                   source="gaussian", label=None, guidance=1.0) -> np.ndarray:
    """Latents from a bare velocity net through the Generator (no PCA: the latents are the samples)."""
    classes = net.n_classes or 1
    gen = Generator(net, FlowConfig(source=source, source_std=source_std), [Decoder(scaler, None, None)] * classes,
                    [str(c) for c in range(classes)] if net.n_classes else None)
    return gen.latents(n, temperature, seed, solver, steps, label, guidance)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_velocity_net() -> VelocityMLP:
    torch.manual_seed(0)
    net = VelocityMLP(4, hidden=32, depth=2, time_dim=16, dropout=0.1)
    torch.nn.init.normal_(net.out.weight, std=0.3)    # the zero-initialised head would make v = 0
    return net


@pytest.mark.parametrize("solver,steps", [("euler", 8), ("midpoint", 8), ("rk4", 8), ("dopri5", 0)])
def test_sampling_is_reproducible_from_its_seed(solver, steps):
    net = random_velocity_net()
    a = sample_latents(net, IDENTITY, 16, 0.5, 1.0, solver, steps, seed=3)
    b = sample_latents(net, IDENTITY, 16, 0.5, 1.0, solver, steps, seed=3)
    c = sample_latents(net, IDENTITY, 16, 0.5, 1.0, solver, steps, seed=4)
    assert np.array_equal(a, b)
    assert np.abs(a - c).min() > 1e-6
    source = sample_latents(VelocityMLP(4, 32, 2, 16), IDENTITY, 16, 0.5, 1.0, solver, steps, seed=3)  # v = 0
    assert np.abs(a - source).max() > 0.05      # the network moved the source noise


def test_source_noise_and_training_times():
    g = torch.Generator().manual_seed(0)
    gauss, unif = source_noise("gaussian", (20000, 3), g), source_noise("uniform", (20000, 3), g)
    for x in (gauss, unif):
        assert abs(float(x.mean())) < 0.03 and abs(float(x.std()) - 1) < 0.02
    assert float(unif.abs().max()) <= math.sqrt(3) and float(gauss.abs().max()) > math.sqrt(3)
    with pytest.raises(ValueError, match="unknown source distribution 'laplace'"):
        source_noise("laplace", (2, 2), g)
    uniform_t = training_times("uniform", 20000, g)
    logit_t = training_times("logit_normal", 20000, g, loc=0.5, scale=0.8)
    assert abs(float(uniform_t.std()) - 1 / math.sqrt(12)) < 0.01
    assert 0 < float(logit_t.min()) and float(logit_t.max()) < 1
    assert abs(float(logit_t.median()) - 1 / (1 + math.exp(-0.5))) < 0.01
    assert float(logit_t.std()) < 0.8 * float(uniform_t.std())     # concentrated in the middle of the path


def test_learning_rate_schedules():
    cos = lr_lambda(FlowConfig(steps=1000, warmup_steps=100))
    const = lr_lambda(FlowConfig(steps=1000, warmup_steps=100, schedule="constant"))
    assert cos(0) == pytest.approx(0.01) and cos(99) == pytest.approx(1.0)
    assert cos(550) == pytest.approx(0.5) and cos(1000) == pytest.approx(0.0, abs=1e-12)
    assert const(0) == pytest.approx(0.01) and const(550) == const(999) == 1.0


def test_paper_settings():
    fc, sc = FlowConfig.paper(), SampleConfig.paper()
    assert (fc.hidden, fc.time_dim, fc.dropout, fc.lr, fc.schedule, fc.steps, fc.sigma, fc.source_std) == \
        (512, 64, 0.1, 5e-4, "cosine", 30000, 0.001, 1.0)
    assert (sc.solver, sc.steps) == ("rk4", 100)
    assert FlowConfig.paper(steps=10).steps == 10
    net = VelocityMLP(7, fc.hidden, fc.depth, fc.time_dim, fc.dropout)
    assert net.body[0].in_features == 7 + 64 and net.out.in_features == 512


def test_ot_pairing_is_a_permutation_with_the_least_cost():
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g) + 2
    paired = ot_pair(x0, x1)
    assert sorted(map(tuple, paired.tolist())) == sorted(map(tuple, x0.tolist()))
    cost = float(((paired - x1) ** 2).sum())
    for seed in range(20):
        perm = torch.randperm(32, generator=torch.Generator().manual_seed(seed))
        assert cost <= float(((x0[perm] - x1) ** 2).sum())


@pytest.mark.parametrize("overrides", [{}, {"source": "uniform", "time_dist": "logit_normal", "ot_coupling": True}])
def test_flow_learns_a_shifted_anisotropic_gaussian(overrides):
    rng = np.random.default_rng(0)
    target_mean, target_std = np.array([2.0, -1.0, 0.5, 0.0]), np.array([0.5, 0.2, 1.0, 0.3])
    z = rng.standard_normal((512, 4)) * target_std + target_mean
    cfg = FlowConfig(hidden=64, depth=2, time_dim=16, dropout=0.0, steps=1200, warmup_steps=50, batch_size=64,
                     eval_every=250, source_std=1.0, lr=2e-3, ema_decay=0.99, **overrides)
    seen = {}
    trainer, info = train_in_process(z, cfg, on_eval=lambda step, loss, _: seen.setdefault(step, loss))
    assert list(seen) == [750, 1000, 1200]       # every selectable checkpoint (from half the steps on), and the last
    assert info["best_step"] == min(seen, key=seen.get) and info["best_heldout_loss"] == min(seen.values())
    out = sample_latents(trainer.ema, IDENTITY, 2000, cfg.source_std, 1.0, "rk4", 20, 0, cfg.source)
    assert np.abs(out.mean(0) - target_mean).max() < 0.1
    assert np.abs(out.std(0) / target_std - 1).max() < 0.2


RIDGE = math.sqrt(1 - 0.1 ** 2)


def same_moment_classes(n: int = 512, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes with the same mean (0) and covariance (about I), like zoos whitened each on their own:
    coordinate ``label`` sits on the ridge |x| = RIDGE (two sharp modes), every other one is N(0, 1)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    z = rng.standard_normal((n, 4))
    z[np.arange(n), y] = rng.choice([-1.0, 1.0], n) * RIDGE + 0.1 * rng.standard_normal(n)
    return z.astype(np.float32), y


def on_ridge(x: np.ndarray, dim: int) -> float:
    return float(np.mean(np.abs(np.abs(x[:, dim]) - RIDGE) < 0.3))    # about 0.29 for N(0, 1)


def test_conditional_flow_follows_its_label_and_guidance_sharpens():
    z, y = same_moment_classes()
    cfg = FlowConfig(hidden=64, depth=2, time_dim=16, dropout=0.0, steps=2000, warmup_steps=50, batch_size=64,
                     eval_every=250, source_std=1.0, lr=2e-3, ema_decay=0.99, p_uncond=0.2)
    trainer, _ = train_in_process(z, cfg, labels=y)
    for label in (0, 1):
        ridge = {}
        for w in (0.0, 1.0, 3.0):
            out = sample_latents(trainer.ema, IDENTITY, 1000, 1.0, 1.0, "rk4", 20, 0, label=label, guidance=w)
            ridge[w] = (on_ridge(out, label), on_ridge(out, 1 - label))
        assert ridge[1.0][0] > 0.75 and ridge[1.0][1] < 0.5, ridge        # the class's own shape
        assert ridge[3.0][0] > max(0.9, ridge[1.0][0]) and ridge[3.0][1] < ridge[1.0][1], ridge   # sharper
        assert all(0.4 < r < 0.75 for r in ridge[0.0]), ridge            # w = 0: the mixture of both
    with pytest.raises(ValueError, match=r"needs a label in 0..1 \(0, 1\); got 2"):
        sample_latents(trainer.ema, IDENTITY, 4, label=2)
    with pytest.raises(ValueError, match="labels must be 512 non-negative integers"):
        train_in_process(z, cfg, labels=y[:-1])


def test_an_unconditional_net_rejects_labels():
    with pytest.raises(ValueError, match="unconditional"):
        random_velocity_net()(torch.zeros(2, 4), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_ray_train_run_resumes_from_its_latest_checkpoint_after_a_worker_failure(tmp_path, ray_session):
    """The first attempt's worker raises right after reporting step 120; FailureConfig restarts the worker
    group, which resumes from a checkpoint (not step 0) and completes."""
    from dwf_ray.flow.checkpoint import load_flow
    from dwf_ray.flow.train import train_flow, train_loop
    marker = tmp_path / "crashed"

    def crash_once(config):
        import ray.train
        report = ray.train.report

        def report_then_crash(metrics, checkpoint=None):
            report(metrics, checkpoint=checkpoint)
            if metrics["step"] == 120 and not marker.exists():
                marker.write_text("the first attempt failed here")
                raise RuntimeError("injected worker failure")
        ray.train.report = report_then_crash
        try:
            train_loop(config)
        finally:
            ray.train.report = report

    z, _ = same_moment_classes(64)
    cfg = FlowConfig(hidden=32, depth=2, time_dim=16, steps=200, eval_every=40, warmup_steps=10, num_workers=1,
                     max_failures=1)
    info = train_flow(z, cfg, str(tmp_path / "flow"), loop=crash_once)
    assert marker.exists()
    assert len(info["resumed_at"]) == 1 and 40 <= info["resumed_at"][0] <= 120, info["resumed_at"]
    assert [h["step"] for h in info["history"]] == [40, 80, 120, 160, 200]   # each step once, up to the end
    assert info["best_step"] >= 100                 # select_after: from the second half of training
    net, scaler, got = load_flow(str(tmp_path / "flow" / "model.pt"))
    assert got == cfg and net.n_classes == 0
    assert np.isfinite(sample_latents(net, scaler, 8, cfg.source_std, steps=4)).all()
    # the checkpoint carries the noise and dropout streams: the resumed run is the undisturbed one
    undisturbed = train_flow(z, cfg, str(tmp_path / "undisturbed"))
    assert undisturbed["resumed_at"] == [] and undisturbed["best_step"] == info["best_step"]
    a, b = (torch.load(tmp_path / name / "model.pt", weights_only=True) for name in ("flow", "undisturbed"))
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]), "the resumed flow's weights differ"


@pytest.fixture(scope="module")
def two_small_zoos(tmp_path_factory, ray_session):
    """Run roots (zoo, canon, pca) of 8 MLPs on digits 0-2 and of 8 smaller MLPs on iris."""
    from dwf_ray.config import RunConfig, ZooConfig
    from dwf_ray.pipeline import Pipeline
    roots = []
    for name, zoo in [
        ("digits012", ZooConfig(classes=[0, 1, 2], n_models=8, epochs=8,
                                arch={"family": "mlp", "args": {"in_dim": 64, "hidden": [16], "out_dim": 3}})),
        ("iris", ZooConfig(dataset="iris", n_models=8, epochs=60, batch_size=16,
                           arch={"family": "mlp", "args": {"in_dim": 4, "hidden": [8], "out_dim": 3}})),
    ]:
        cfg = RunConfig(preset=name, zoo=zoo)
        cfg.eval.noise_levels, cfg.eval.mix_weights, cfg.eval.n_baseline = [0.25, 1.0], [0.1, 0.5], 8
        root = str(tmp_path_factory.mktemp("zoos") / name)
        Pipeline(root, cfg, log=lambda *_: None).run(stages=("zoo", "canon", "pca"))
        roots.append(root)
    return roots


def test_one_conditional_flow_generates_models_for_two_zoos(two_small_zoos, tmp_path):
    import json
    import pandas as pd
    from dwf_ray.conditional import ConditionalConfig, run_conditional
    from dwf_ray.flow.checkpoint import load_flow
    from dwf_ray.weights import load_model_state
    cfg = ConditionalConfig(roots=two_small_zoos, guidance=[0.0, 1.0, 2.0]).with_overrides([
        "flow.steps=300", "flow.eval_every=100", "flow.hidden=64", "flow.warmup_steps=10", "flow.num_workers=1",
        "sample.n=8", "sample.steps=10"])
    out = tmp_path / "cond"
    logs = []
    metrics = run_conditional(cfg, str(out), log=logs.append)
    net, _, fc = load_flow(str(out / "flow" / "model.pt"))
    assert net.n_classes == 2 and fc.steps == 300 and fc.scaling == "none"
    classes = json.loads((out / "flow" / "classes.json").read_text())
    assert classes["k"] == 7 and [c["name"] for c in classes["classes"]] == ["digits012", "iris"]
    for name, in_dim in (("digits012", 64), ("iris", 4)):
        for w in ("w0", "w1", "w2"):
            man = pd.read_parquet(out / "samples" / name / w / "manifest.parquet")
            state, arch = load_model_state(man["uri"].iloc[0])
            assert len(man) == 8 and arch.args["in_dim"] == in_dim and state["net.0.weight"].shape == (arch.args["hidden"][0], in_dim)
        m = metrics["classes"][name]
        assert m["zoo"]["n"] == 8 and set(m["generated"]) == {"w0", "w1", "w2"}
        for row in m["generated"].values():
            assert row["accuracy"]["mean"] > 60, (name, row)     # chance is 33 %
            assert row["func_novelty"] > 0 and np.isfinite(row["margin"])
    report = (out / "report" / "report.md").read_text()
    assert "| digits012 | zoo |" in report and "| iris | w=2 |" in report
    # a second call reuses the flow and the samples and gives the same report
    logs.clear()
    assert run_conditional(cfg, str(out), log=logs.append)["classes"] == metrics["classes"]
    assert any("complete" in line and "skipped" in line for line in logs)
    with pytest.raises(ValueError, match="different conditional config"):
        run_conditional(cfg.model_copy(update={"guidance": [3.0]}), str(out))
    from dwf_ray.config import RunConfig
    from dwf_ray.pipeline import Pipeline
    Pipeline(str(tmp_path / "unfinished"), RunConfig())
    with pytest.raises(ValueError, match="unfinished: the canon stage is not complete"):
        run_conditional(ConditionalConfig(roots=[two_small_zoos[0], str(tmp_path / "unfinished")]), str(tmp_path / "c2"))
