"""Autoscaling on Ray's own autoscaler: the canonicalization stage, driven by the `dwf` CLI against a head with no
CPUs, makes the autoscaler add worker nodes, and the autoscaler removes them once they are idle.

The cluster is Ray's fake multi-node provider on loopback: each worker "node" is a raylet the autoscaler starts on
this machine (the same code path that launches cloud instances or KubeRay pods decides when and what to add).
"""
import json
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.cluster_helpers import BIN, AutoscalingHead, NodePoller, clean_env

# Ray Data grows the pool onto a second node in steps: its autoscaling coordinator looks at the cluster's nodes
# every 20 s, and the stage asks the autoscaler for more at most every 10 s, only once the CPUs it was given were at
# least half busy over the last 10 s; the second node can come 45 s into the stage. 1600 checkpoints (about 60 s
# of matching on one actor) outlast that.
N_MODELS = 1600
MAX_WORKERS = 2
IDLE_TIMEOUT_S = 6.0
WIDTH = 256             # about 0.03 s of weight matching a model at this width, 0.04 s with its reading and writing
ARCH = '{"family": "mlp", "args": {"in_dim": 64, "hidden": [%d, %d], "out_dim": 10}}' % (WIDTH, WIDTH)


def write_state_dicts(folder: Path, n: int) -> None:
    """``n`` untrained 64-WIDTH-WIDTH-10 MLPs saved as plain PyTorch state_dicts (keys net.0.weight, ...), as a user
    would bring them from elsewhere."""
    import torch
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                                     nn.Linear(WIDTH, 10))

    folder.mkdir()
    torch.manual_seed(0)
    for i in range(n):
        torch.save(MLP().state_dict(), folder / f"net{i:04d}.pt")


@pytest.fixture
def autoscaling_head(tmp_path):
    head = AutoscalingHead(tmp_path, worker_cpus=1, max_workers=MAX_WORKERS, idle_timeout_s=IDLE_TIMEOUT_S)
    head.start()
    yield head
    head.stop()


def workers_alive(sample: dict) -> int:
    """Worker nodes alive in one poll: the head has no CPU, every worker has some."""
    return sum(1 for n in sample["nodes"] if n["alive"] and n["cpu"] > 0)


def first_time(samples: list[dict], after: float, pred) -> float | None:
    return next((s["t"] for s in samples if s["t"] >= after and pred(workers_alive(s))), None)


def wait_for(poller: NodePoller, after: float, pred, timeout: float) -> float | None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        t = first_time(poller.samples(), after, pred)
        if t is not None:
            return t
        time.sleep(0.5)
    return None


def dwf(args: list[str], env: dict, timeout: float = 600) -> tuple[int, str, dict[str, float]]:
    """Run the `dwf` CLI; returns its exit code, its output, and when each ``[stage] ...`` line appeared."""
    proc = subprocess.Popen([str(BIN / "dwf"), *args], env=env | {"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    lines, marks = [], {}
    for line in proc.stdout:
        lines.append(line)
        key = " ".join(line.split()[:2])       # "[canon] running", "[canon] done", ...
        if line.startswith("[") and key not in marks:
            marks[key] = time.time()
    killer.cancel()
    return proc.wait(), "".join(lines), marks


def test_canon_adds_workers_while_it_runs_and_they_leave_when_idle(autoscaling_head, tmp_path):
    head = autoscaling_head
    write_state_dicts(tmp_path / "checkpoints", N_MODELS)
    root = tmp_path / "run"
    env = clean_env() | {"RAY_ADDRESS": head.address}     # the dwf CLI joins the cluster at RAY_ADDRESS
    poller = NodePoller(head.address, tmp_path / "nodes.jsonl", clean_env())
    try:
        assert wait_for(poller, 0, lambda n: n == 0, 60) is not None, "the node poller did not start"

        # the import's Ray Data tasks need CPUs too: the cluster grows for them, then shrinks back to the bare head
        t0 = time.time()
        code, log, _ = dwf(["zoo", "import", str(tmp_path / "checkpoints"), "--arch", ARCH, "--root", str(root),
                            "--set", "canon.min_actors=1", "--set", f"canon.max_actors={MAX_WORKERS}",
                            "--set", "canon.actor_cpus=1"], env)
        t1 = time.time()
        assert code == 0, log[-5000:] + head.monitor_log()
        assert first_time(poller.samples(), t0, lambda n: n >= 1) is not None, "the import ran without a worker?"
        idle = wait_for(poller, t1, lambda n: n == 0, IDLE_TIMEOUT_S + 60)
        assert idle is not None, f"workers not removed after the import:\n{head.monitor_log()}"

        t_start = time.time()
        code, log, marks = dwf(["canon", "--root", str(root)], env)
        t_end = time.time()
        assert code == 0 and "[canon] done" in marks, log[-5000:] + head.monitor_log()
        t_down = wait_for(poller, t_end, lambda n: n == 0, IDLE_TIMEOUT_S + 60)
        monitor_log = head.monitor_log(tail=None)
    finally:
        poller.stop()

    samples = poller.samples()
    during = [s for s in samples if t_start <= s["t"] <= t_end]
    peak = max(workers_alive(s) for s in during)
    timeline = [(round(s["t"] - t_start, 1), workers_alive(s)) for s in samples]
    t_one = first_time(samples, t_start, lambda n: n >= 1)
    t_all = first_time(samples, t_start, lambda n: n >= MAX_WORKERS)
    t_ray = marks["[canon] running"]          # the driver has joined the cluster and starts the stage
    timings = {
        "n_models": N_MODELS, "canon_s": round(t_end - t_start, 1), "cli_start_to_stage_s": round(t_ray - t_start, 1),
        "peak_workers_during_canon": peak,
        # from the moment the stage starts asking for actors (no worker alive then) to each node being up
        "scale_up_first_worker_s": t_one and round(t_one - t_ray, 1),
        "scale_up_all_workers_s": t_all and round(t_all - t_ray, 1),
        # from the end of `dwf canon` to no worker left (they may go idle, and leave, before the CLI exits)
        "scale_down_after_canon_s": t_down and round(t_down - t_end, 1), "idle_timeout_s": IDLE_TIMEOUT_S,
        "import_s": round(t1 - t0, 1), "scale_down_after_import_s": round(idle - t1, 1),
    }
    (tmp_path / "autoscale_timings.json").write_text(json.dumps(timings | {"timeline": timeline}, indent=1))
    print("\nautoscaling, seconds:", json.dumps(timings))

    # worker nodes came while canon ran, both of them: the pool grew onto the second node it asked for
    assert peak == MAX_WORKERS, f"peak {peak} workers during canon; timeline {timeline}\n{monitor_log[-4000:]}"
    # they were added by the autoscaler for canon's demand, not left over from the import
    assert workers_alive(min(samples, key=lambda s: abs(s["t"] - t_ray))) == 0
    assert "Adding" in monitor_log and "Removing" in monitor_log, monitor_log[-4000:]
    # and removed once idle
    assert t_down is not None, f"workers still alive {IDLE_TIMEOUT_S + 60} s after canon; timeline {timeline}"
    # every node, the autoscaler's too, on loopback; the head never offered CPUs
    assert {n["ip"] for s in samples for n in s["nodes"]} == {"127.0.0.1"}
    head_ids = {n["id"] for n in samples[0]["nodes"]}
    assert all(n["cpu"] == 0 for s in samples for n in s["nodes"] if n["id"] in head_ids)

    zoo = pd.read_parquet(root / "zoo" / "manifest.parquet")
    canon = pd.read_parquet(root / "canonical" / "manifest.parquet")
    assert len(zoo) == N_MODELS and (zoo["status"] == "ok").all()
    assert len(canon) == N_MODELS and (canon["status"] == "ok").all(), canon[canon["status"] != "ok"].head()
    assert sorted(canon["model_id"]) == sorted(zoo["model_id"])
    assert all(Path(u).is_file() for u in canon["canon_uri"])
