"""Nodes may die: on Ray's fake multi-node cluster (the autoscaling test's, on loopback), a worker node is killed
(its raylet and every process on it, at once) in the middle of canonicalization, of the PCA pass and of flow
training. Each stage finishes, every count adds up, and the results equal those of an undisturbed run with the
same seeds on the same cluster.

Two run roots share one trained zoo: an undisturbed run, then a run whose driver kills a node in each stage. The
drivers are this file run as a script (``python -m tests.test_node_failure ROOT REPORT [--kill]``) against the
head at RAY_ADDRESS, as `dwf` runs there; the kills are timed from the driver, where the stage's actors are seen.
These tests take minutes: they are marked slow, which `make test` leaves out and `make test-slow` runs.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.cluster_helpers import ROOT, AutoscalingHead, clean_env, kill_fake_node

pytestmark = pytest.mark.slow

N_MODELS = 32
FLOW_STEPS, FLOW_EVAL_EVERY = 1200, 150
OVERRIDES = [f"zoo.n_models={N_MODELS}", "zoo.epochs=2", "canon.batch_size=1", "canon.min_actors=1",
             "canon.max_actors=2", "pca.n_shards=2", "pca.max_restarts=2", f"flow.steps={FLOW_STEPS}",
             f"flow.eval_every={FLOW_EVAL_EVERY}", "flow.num_workers=1", "flow.max_failures=2"]
# the GCS declares a raylet that stopped answering dead after about 3 s (Ray's default: about 30 s), and the
# autoscaler replaces a node that stopped reporting after 5 s (default 30 s)
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
                   "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5"}
# Ray's fake provider does not replace a node that died under it (the autoscaler keeps it as "uninitialized"):
# one node to kill per stage, and one left over
WORKERS = 4


# ------------------------------------------------------------------------------------------------ the driver side
def run_config():
    from dwf_ray.presets import preset
    from tests.presets import SMOKE
    return preset(SMOKE).with_overrides(OVERRIDES)


def alive_actor_nodes(class_part: str) -> list[str]:
    """Node ids of the alive actors whose class name contains ``class_part`` (from the GCS actor table)."""
    from ray._private import state   # the public state API needs the dashboard, which the head leaves off
    return sorted({a["Address"]["NodeID"] for a in state.actors().values()
                   if a["State"] == "ALIVE" and class_part in a["ActorClassName"]})


def wait_for_workers(n: int, timeout: float = 180) -> None:
    import ray
    deadline = time.time() + timeout
    while sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0) < n:
        if time.time() > deadline:
            raise TimeoutError(f"fewer than {n} worker nodes after {timeout} s: {ray.nodes()}")
        time.sleep(1)


class NodeKiller:
    """Kills the node of an alive actor of a class once ``ready()`` holds, from a thread, while a stage runs."""

    def __init__(self, stage: str, actor_class: str, ready, kills: list):
        self.stage, self.actor_class, self.ready, self.kills = stage, actor_class, ready, kills
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            nodes = alive_actor_nodes(self.actor_class)
            progress = self.ready()
            if nodes and progress is not None:
                pids = kill_fake_node(nodes[0])
                self.kills.append({"stage": self.stage, "node": nodes[0], "pids": pids, "progress": progress,
                                   "t": time.time()})
                return
            self.stop.wait(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def files_done(folder: Path, pattern: str, at_least: int):
    """A ``ready`` check: the number of files matching ``pattern`` once it reaches ``at_least``, else None."""
    def ready():
        n = len(list(folder.glob(pattern))) if folder.exists() else 0
        return n if n >= at_least else None
    return ready


def drive(root: str, report: str, kill: bool) -> None:
    """Run zoo, canon, pca and flow on ``root`` against the cluster at RAY_ADDRESS; with ``kill``, kill a worker
    node in the middle of canon, of the PCA pass and of flow training. Writes what it killed to ``report``."""
    import functools
    import ray
    from dwf_ray.pca import shards
    from dwf_ray.pipeline import Pipeline
    from dwf_ray.runtime import ensure_ray
    ensure_ray(quiet=True)
    pipe = Pipeline(root, run_config(), log=print, quiet=True)
    kills: list[dict] = []
    wait_for_workers(WORKERS)
    pipe.run_stage("zoo")
    if not kill:
        for stage in ("canon", "pca", "flow"):
            pipe.run_stage(stage)
    else:
        with NodeKiller("canon", "MapWorker", files_done(Path(root, "canonical"), "*.safetensors", 4), kills):
            pipe.run_stage("canon")

        def kill_before_the_gram_pass(step, actors):
            if step == "gram":     # every actor holds its slice of the zoo; no partial Gram matrix is summed yet
                ray.get([a.stats.remote() for a in actors])
                node = alive_actor_nodes("GramShard")[0]
                kills.append({"stage": "pca", "node": node, "pids": kill_fake_node(node), "progress": step,
                              "t": time.time()})
        shards.fit_distributed_pca = functools.partial(shards.fit_distributed_pca, on_stage=kill_before_the_gram_pass)
        pipe.run_stage("pca")
        with NodeKiller("flow", "TrainWorker", files_done(Path(root, "flow"), "ray_train/**/checkpoint_*", 1), kills):
            pipe.run_stage("flow")
    Path(report).write_text(json.dumps({"kills": kills}))


# ------------------------------------------------------------------------------------------------ the test side
def run_driver(root: Path, report: Path, env: dict, kill: bool) -> None:
    args = [sys.executable, "-m", "tests.test_node_failure", str(root), str(report)] + (["--kill"] if kill else [])
    out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"driver failed ({'with' if kill else 'without'} kills):\n" \
                                f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """(undisturbed root, disturbed root, the kills, seconds of each run); both on one cluster of WORKERS nodes
    (one CPU each, started by the autoscaler)."""
    tmp = tmp_path_factory.mktemp("nodes")
    head = AutoscalingHead(tmp, worker_cpus=1, min_workers=WORKERS, max_workers=WORKERS, idle_timeout_s=600,
                           env=clean_env() | FAST_NODE_DEATH).start()
    env = clean_env() | {"RAY_ADDRESS": head.address, "PYTHONPATH": str(ROOT)}
    try:
        base, hit = tmp / "undisturbed", tmp / "disturbed"
        t0 = time.time()
        run_driver(base, tmp / "undisturbed.json", env, kill=False)
        t1 = time.time()
        hit.mkdir()
        shutil.copytree(base / "zoo", hit / "zoo")           # the same trained zoo (its manifest's uris: base's)
        shutil.copy(base / "config.json", hit / "config.json")
        run_driver(hit, tmp / "disturbed.json", env, kill=True)
        t2 = time.time()
    except BaseException:
        print(head.monitor_log())
        raise
    finally:
        head.stop()
    kills = json.loads((tmp / "disturbed.json").read_text())["kills"]
    seconds = {"undisturbed_s": round(t1 - t0, 1), "disturbed_s": round(t2 - t1, 1)}
    print("\nnode failure runs, seconds:", json.dumps(seconds))
    return base, hit, kills, seconds


def kill_of(kills: list[dict], stage: str) -> dict:
    found = [k for k in kills if k["stage"] == stage]
    assert len(found) == 1 and found[0]["pids"], kills
    return found[0]


def stage_info(root: Path, stage: str) -> dict:
    from dwf_ray.store import RunStore
    return RunStore(str(root)).stage_info({"canon": "canonical"}.get(stage, stage))


def test_canon_finishes_after_a_node_dies_and_equals_the_undisturbed_run(two_runs):
    import pandas as pd
    from dwf_ray.weights import load_model_state
    base, hit, kills, _ = two_runs
    kill = kill_of(kills, "canon")
    assert 4 <= kill["progress"] < N_MODELS, kill        # the node died mid-stage
    zoo = pd.read_parquet(base / "zoo" / "manifest.parquet")
    man = {r: pd.read_parquet(r / "canonical" / "manifest.parquet").set_index("model_id") for r in (base, hit)}
    assert len(man[hit]) == len(zoo) == N_MODELS and (man[hit]["status"] == "ok").all()
    assert stage_info(hit, "canon")["rows_in"] == N_MODELS
    assert sorted(p.name for p in (hit / "canonical").glob("*.safetensors")) == \
        sorted(p.name for p in (base / "canonical").glob("*.safetensors"))            # no partial write left
    for model_id in zoo["model_id"]:
        a, _ = load_model_state(man[base].loc[model_id, "canon_uri"])
        b, _ = load_model_state(man[hit].loc[model_id, "canon_uri"])
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), model_id
    for column in ("dist_before", "dist_after"):
        assert man[hit][column].equals(man[base][column])


def test_pca_finishes_after_a_node_dies_and_equals_the_undisturbed_run(two_runs):
    from dwf_ray.pca.model import PCAModel
    base, hit, kills, _ = two_runs
    kill = kill_of(kills, "pca")
    meta = {r: json.loads((r / "pca" / "meta.json").read_text()) for r in (base, hit)}
    assert meta[hit]["n"] == N_MODELS and meta[hit]["model_ids"] == meta[base]["model_ids"]
    assert sum(s["stop"] - s["start"] for s in meta[hit]["shards"]) == meta[hit]["d"]
    assert not set(kill["pids"]) & {s["pid"] for s in meta[hit]["shards"]}, "a killed actor wrote the stats"
    assert meta[hit]["eigenvalues"] == meta[base]["eigenvalues"]
    np.testing.assert_array_equal(PCAModel.load_latents(str(hit / "pca")), PCAModel.load_latents(str(base / "pca")))
    models = [PCAModel.load(str(r / "pca")) for r in (base, hit)]
    for a, b in zip(*(m.shards for m in models)):
        np.testing.assert_array_equal(a.basis, b.basis)


def test_flow_training_finishes_after_a_node_dies_and_counts_add_up(two_runs):
    base, hit, kills, _ = two_runs
    kill_of(kills, "flow")
    info = stage_info(hit, "flow")
    # Ray Train restarts the run after the node's death: from its latest checkpoint, or from the start
    assert all(0 < step < FLOW_STEPS for step in info["resumed_at"]), info
    assert info["n_train"] + info["n_holdout"] == N_MODELS
    assert stage_info(base, "flow")["resumed_at"] == []
    assert FLOW_EVAL_EVERY <= info["best_step"] <= FLOW_STEPS


def test_flow_after_a_node_dies_equals_the_undisturbed_run(two_runs):
    import torch
    base, hit, _, _ = two_runs
    a, b = (torch.load(r / "flow" / "model.pt", weights_only=True) for r in (base, hit))
    assert stage_info(hit, "flow")["best_step"] == stage_info(base, "flow")["best_step"]
    assert a["ema"].keys() == b["ema"].keys()
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]), "the flow's weights differ"


if __name__ == "__main__":
    drive(sys.argv[1], sys.argv[2], kill="--kill" in sys.argv[3:])
