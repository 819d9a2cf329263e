"""The canonicalization job at scale: bad rows kept, a worker killed mid-job, `dwf zoo import` from S3."""
import io
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dwf_ray import store
from dwf_ray.archs import ArchSpec, build_model, permutation_spec
from dwf_ray.canon.job import canonicalize_manifest
from dwf_ray.archs.perm_spec import apply_permutation, random_permutation
from dwf_ray.cli import app
from dwf_ray.config import CanonConfig, ZooConfig
from dwf_ray.weights import checkpoint_bytes, load_model_state, save_checkpoint, to_module
from dwf_ray.zoo import MANIFEST_COLUMNS

ARCH = ArchSpec("mlp", {"in_dim": 64, "hidden": [32, 32], "out_dim": 10})


def random_state(seed: int) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in build_model(ARCH).state_dict().items()}


def write_zoo(folder: str, n: int) -> pd.DataFrame:
    """n randomly initialised checkpoints (no training) and their zoo manifest."""
    rows = []
    for i in range(n):
        row = dict.fromkeys(MANIFEST_COLUMNS)
        uri = store.join(folder, f"m{i:05d}.safetensors")
        row.update(model_id=f"m{i:05d}", uri=uri, arch=ARCH.to_json(), dataset="digits", seed=i, status="ok",
                   error="", sha256=save_checkpoint(uri, random_state(i), ARCH))
        rows.append(row)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)


def test_bad_rows_on_s3_each_keep_their_error_and_the_rest_complete(s3_server, ray_session, tmp_path):
    bucket = s3_server()
    zoo_dir, out_dir = f"s3://{bucket}/zoo", f"s3://{bucket}/canonical"
    man = write_zoo(zoo_dir, 11)
    uri = dict(zip(man["model_id"], man["uri"]))
    ref = random_state(0)
    spec = permutation_spec(ARCH)
    save_checkpoint(uri["m00001"], apply_permutation(spec, random_permutation(spec, ref, seed=5), ref), ARCH)
    store.write_bytes(uri["m00002"], checkpoint_bytes(random_state(2), ARCH)[:500])
    save_checkpoint(uri["m00003"], {**random_state(3), "net.2.weight": np.zeros((32, 31), np.float32)}, ARCH)
    save_checkpoint(uri["m00004"], {**random_state(4), "net.0.bias": np.full(32, np.nan, np.float32)}, ARCH)
    save_checkpoint(uri["m00005"], {**random_state(5), "net.4.weight": np.full((10, 32), np.inf, np.float32)}, ARCH)
    man.loc[6, "uri"] = f"s3://{bucket}/zoo/deleted.safetensors"          # a missing object
    man.loc[7, ["status", "error"]] = ["error", "training diverged"]      # failed upstream: passes through
    (tmp_path / "a_folder.safetensors").mkdir()                           # not a file: an OSError, not a CheckpointError
    man.loc[8, "uri"] = str(tmp_path / "a_folder.safetensors")

    out = canonicalize_manifest(man, CanonConfig(min_actors=1, max_actors=1, batch_size=3), out_dir)

    assert len(out) == len(man) and list(out["model_id"]) == sorted(man["model_id"])
    status, error = dict(zip(out["model_id"], out["status"])), dict(zip(out["model_id"], out["error"]))
    assert [m for m, s in status.items() if s == "ok"] == ["m00000", "m00001", "m00009", "m00010"]
    expected = {"m00002": ("m00002.safetensors", "truncated"), "m00003": ("m00003.safetensors", "shape"),
                "m00004": ("m00004.safetensors", "non-finite"), "m00005": ("m00005.safetensors", "non-finite"),
                "m00006": ("deleted.safetensors", "not found"), "m00007": ("", "training diverged"),
                "m00008": ("a_folder.safetensors", "IsADirectoryError")}
    for model_id, (name, problem) in expected.items():
        assert name in error[model_id] and problem in error[model_id], (model_id, error[model_id])
    ok = out[out["status"] == "ok"].set_index("model_id")
    assert (ok["dist_after"] <= ok["dist_before"] + 1e-6).all()
    assert ok.loc["m00001", "dist_before"] > 1 and ok.loc["m00001", "dist_after"] < 1e-5   # permutation undone
    written = store.list_files(out_dir)
    assert sorted(written) == sorted(ok["canon_uri"]) and all(u.startswith("s3://") for u in written)
    moved, _ = load_model_state(ok.loc["m00001", "canon_uri"], ARCH)
    np.testing.assert_array_equal(moved["net.2.weight"], ref["net.2.weight"])


def test_activation_matching_job_aligns_by_training_inputs(ray_session, tmp_path):
    man = write_zoo(str(tmp_path / "zoo"), 4)
    ref, spec = random_state(0), permutation_spec(ARCH)
    save_checkpoint(man.loc[2, "uri"], apply_permutation(spec, random_permutation(spec, ref, seed=1), ref), ARCH)
    cfg = CanonConfig(method="activations", activation_samples=200, min_actors=1, max_actors=1, batch_size=2)
    with pytest.raises(ValueError, match="canon.method=activations needs the zoo's dataset"):
        canonicalize_manifest(man, cfg, str(tmp_path / "none"))

    out = canonicalize_manifest(man, cfg, str(tmp_path / "canonical"), ZooConfig(arch={"family": ARCH.family, "args": ARCH.args}))

    assert (out["status"] == "ok").all() and len(out) == 4
    ok = out.set_index("model_id")
    assert ok.loc["m00002", "dist_before"] > 1 and ok.loc["m00002", "dist_after"] < 1e-5   # permutation undone
    moved, _ = load_model_state(ok.loc["m00003", "canon_uri"], ARCH)
    x = torch.randn(16, 64)
    with torch.no_grad():
        np.testing.assert_allclose(to_module(ARCH, moved)(x).numpy(), to_module(ARCH, random_state(3))(x).numpy(),
                                   rtol=1e-5, atol=1e-5)


def _canon_worker_pids() -> dict[str, int]:
    """Alive Ray Data map actors of this session's Ray (actor id -> pid), from the GCS actor table."""
    from ray._private import state   # the public state API needs the dashboard, which the tests leave off
    return {aid: a["Pid"] for aid, a in state.actors().items()
            if a["State"] == "ALIVE" and "MapWorker" in a["ActorClassName"]}


def test_worker_killed_mid_job_every_model_still_completes(ray_session, tmp_path):
    n = 200
    zoo_dir, out_dir = tmp_path / "zoo", tmp_path / "canonical"
    man = write_zoo(str(zoo_dir), n)
    out_dir.mkdir()
    stale = out_dir / "m00003.safetensors.tmp-0123abcd"                 # what a writer killed mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    killed, finished = {}, threading.Event()
    earlier = set(_canon_worker_pids())                                  # map actors of earlier jobs, if any left

    def kill_one_worker_mid_job():
        while not finished.is_set():
            done = len(list(out_dir.glob("*.safetensors")))
            pids = {a: p for a, p in _canon_worker_pids().items() if a not in earlier}
            if done >= 8 and pids:
                actor_id, pid = sorted(pids.items())[0]
                os.kill(pid, signal.SIGKILL)
                killed.update(actor_id=actor_id, done=done)
                return
            finished.wait(0.02)

    killer = threading.Thread(target=kill_one_worker_mid_job)
    killer.start()
    try:
        out = canonicalize_manifest(man, CanonConfig(min_actors=2, max_actors=2, batch_size=4), str(out_dir))
    finally:
        finished.set()
        killer.join()

    assert killed and killed["done"] < n, "the worker was not killed while the job was running"
    from ray._private import state
    assert state.actors()[killed["actor_id"]]["NumRestarts"] >= 1
    assert len(out) == n and (out["status"] == "ok").all()
    assert sorted(p.name for p in out_dir.iterdir()) == [f"m{i:05d}.safetensors" for i in range(n)]
    for uri in out["canon_uri"]:
        state_, arch = load_model_state(uri)
        assert arch == ARCH and state_["net.0.weight"].shape == (32, 64)


def test_zoo_import_from_an_s3_prefix(s3_server, ray_session, tmp_path):
    """`dwf zoo import s3://... --arch @arch.json`: state_dicts and safetensors become a zoo; bad files stay rows."""
    bucket = s3_server()
    src = f"s3://{bucket}/trained-elsewhere"
    for i in range(3):
        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(v) for k, v in random_state(i).items()}, buf)
        store.write_bytes(f"{src}/run{i}/model.pt", buf.getvalue())
    save_checkpoint(f"{src}/run3/model.safetensors", random_state(3), ARCH)
    store.write_bytes(f"{src}/run4/model.pth", b"not a checkpoint")
    save_checkpoint(f"{src}/run5/model.safetensors", {**random_state(5), "net.4.bias": np.zeros(9, np.float32)}, ARCH)
    store.write_bytes(f"{src}/notes.txt", b"ignored: not a checkpoint suffix")
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(ARCH.to_json())
    root = tmp_path / "imported"
    runner = CliRunner()

    result = runner.invoke(app, ["zoo", "import", src, "--arch", f"@{arch_file}", "--root", str(root)])
    assert result.exit_code == 0, result.output
    zoo = pd.read_parquet(root / "zoo" / "manifest.parquet")
    assert len(zoo) == 6 and list(zoo["status"]) == ["ok"] * 4 + ["error"] * 2
    assert zoo["source_uri"].iloc[4].endswith("run4/model.pth") and "unreadable" in zoo["error"].iloc[4]
    assert "run4/model.pth" in zoo["error"].iloc[4]
    assert "run5/model.safetensors" in zoo["error"].iloc[5] and "shape" in zoo["error"].iloc[5]
    for uri in zoo["uri"].iloc[:4]:
        state_, arch = load_model_state(uri)
        assert arch == ARCH and Path(uri).parent == root / "zoo"
    imported, _ = load_model_state(zoo["uri"].iloc[1])
    np.testing.assert_array_equal(imported["net.0.weight"], random_state(1)["net.0.weight"])

    result = runner.invoke(app, ["zoo", "--root", str(root)])              # the stage form still works
    assert result.exit_code == 0 and "[zoo] complete" in result.output, result.output
    result = runner.invoke(app, ["zoo", "import", src, "--arch", '{"family": "mlp", "args": {"depth": 3}}',
                                 "--root", str(tmp_path / "other")])
    assert result.exit_code != 0 and "ArchSpec" in result.output and "'depth'" in result.output


DRIVER = """
import json, sys
import ray
from dwf_ray.canon.job import canonicalize_manifest
from dwf_ray.config import CanonConfig
from tests.test_canon_job import write_zoo
ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
         runtime_env={"env_vars": {"PYTHONPATH": sys.argv[1]}, "worker_process_setup_hook": "tests.poison.install"})
man = write_zoo(sys.argv[2], 12)
man.loc[5, "uri"] = man.loc[5, "uri"].replace("m00005", "m00005-poison")
import shutil; shutil.copy(man.loc[4, "uri"], man.loc[5, "uri"])
out = canonicalize_manifest(man, CanonConfig(min_actors=1, max_actors=2, batch_size=4, max_retries=1), sys.argv[3])
from dwf_ray.config import ZooConfig
from dwf_ray.zoo import train_zoo
zoo = train_zoo(ZooConfig(n_models=3, seed0=12, epochs=1, max_retries=1), sys.argv[4])
chunks = train_zoo(ZooConfig(n_models=5, seed0=12, epochs=1, max_retries=1, models_per_task=2), sys.argv[4] + "-chunks")
cols = ["model_id", "seed", "status", "error"]
print("RESULT" + json.dumps({"canon": out[["model_id", "status", "error"]].to_dict("records"),
                             "zoo": zoo[cols].to_dict("records"), "chunks": chunks[cols].to_dict("records")}))
"""


def test_a_checkpoint_that_kills_its_worker_every_time_becomes_an_error_row(tmp_path):
    """Bounded retries: canonicalization and zoo training give up on the model whose worker dies every time,
    keep it as an error row naming the file, and finish every other row (in a Ray of their own, whose workers
    die on "poison" files and on the zoo model of seed 13, trained alone or in a chunk)."""
    import json
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-c", DRIVER, root, str(tmp_path / "zoo"), str(tmp_path / "canonical"),
                           str(tmp_path / "trained")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1].splitlines()[0])
    rows = result["canon"]
    assert len(rows) == 12
    bad = [r for r in rows if r["status"] != "ok"]
    assert [r["model_id"] for r in bad] == ["m00005"], bad
    assert "m00005-poison.safetensors" in bad[0]["error"] and "died" in bad[0]["error"] and "(3 attempts)" in bad[0]["error"]
    zoo = {r["seed"]: r for r in result["zoo"]}
    assert [zoo[s]["status"] for s in (12, 13, 14)] == ["ok", "error", "ok"], result["zoo"]
    assert "m00001.safetensors" in zoo[13]["error"] and "died" in zoo[13]["error"]
    # lockstep chunks of 2: the chunk that holds seed 13 is retried, then both its models are error rows
    chunks = {r["seed"]: r for r in result["chunks"]}
    assert [chunks[s]["status"] for s in range(12, 17)] == ["error", "error", "ok", "ok", "ok"], result["chunks"]
    assert all("died" in chunks[s]["error"] and "(2 attempts" in chunks[s]["error"] for s in (12, 13))
