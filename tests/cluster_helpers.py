"""Helpers of the cluster tests: the pinned Ray version, Ray processes started and stopped by process group,
`ray job submit` with a runtime env, and a node-timeline poller for an autoscaling head."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from tests.conftest import _free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# Settings every Ray process started by a test needs on this machine.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def pinned_ray_version() -> str:
    """The Ray version pinned in pyproject.toml (``ray[...]==X.Y.Z``)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d.split("==", 1)[1].strip() for d in deps if d.replace(" ", "").split("[")[0].split("=")[0] == "ray"]
    assert len(pins) == 1 and "==" not in pins[0], f"ray is not pinned to one version in pyproject.toml: {deps}"
    return pins[0]


def clean_env() -> dict:
    """This process's environment with the venv first on PATH (so that `python` in jobs is the venv's), no
    RAY_ADDRESS, and the Ray settings above."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENV)
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"
    return env


def own_ports() -> list[str]:
    """`ray start --head` flags giving the head every port of its own, never a default another Ray may hold."""
    return [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")]


def group_members(pgid: int) -> list[int]:
    """Processes in process group ``pgid`` (from /proc: Linux)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue                          # a process that just ended
        if int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


def stop_group(proc: subprocess.Popen, timeout: float = 45) -> None:
    """Stop a `ray start --block` (or any process) this test started, and everything in its process group.

    SIGTERM to the leader first: `ray start` drains its node and stops the processes it started (a few seconds);
    the leader itself can then linger for a minute, so once it is alone (or after ``timeout``) the whole group
    gets SIGKILL. Never `ray stop`: that stops every Ray on the machine."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    proc.terminate()
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and set(group_members(pgid)) - {proc.pid}:
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


class AutoscalingHead:
    """A Ray head on loopback running Ray's own autoscaler with the fake multi-node provider: worker "nodes" are
    raylets that the autoscaler starts on this machine, each its own node with its own resources.

    The head has no CPU (work can only run on workers the autoscaler adds); one worker type ``cpu_worker``
    with ``worker_cpus`` CPUs, ``min_workers``..``max_workers`` of them, removed after ``idle_timeout_s`` idle.
    """

    def __init__(self, workdir: Path, worker_cpus: int = 1, max_workers: int = 2, idle_timeout_s: float = 6,
                 object_store_bytes: int = 256 * 2**20, env: dict | None = None, min_workers: int = 0):
        self.workdir = Path(workdir)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="rayas", dir="/tmp")   # short socket paths
        # the autoscaler checks every second; on SIGTERM the head drains for 2 s at most (Ray's default: 30 s)
        self.env = (env or clean_env()) | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                                           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "2"}
        self.config = {
            "cluster_name": "dwf-fake",
            "max_workers": max_workers,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": idle_timeout_s / 60,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "auth": {"ssh_user": "ray"},
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
                "cpu_worker": {"resources": {"CPU": worker_cpus, "object_store_memory": object_store_bytes},
                               "node_config": {}, "min_workers": min_workers, "max_workers": max_workers},
            },
            "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [],
        }
        self.object_store_bytes = object_store_bytes
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> "AutoscalingHead":
        import yaml
        cfg_path = self.workdir / "autoscaling.yaml"
        cfg_path.write_text(yaml.safe_dump(self.config))
        self.log_path = self.workdir / "head.log"
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}", *own_ports(),
             "--num-cpus=0", "--num-gpus=0", f"--object-store-memory={self.object_store_bytes}",
             f"--autoscaling-config={cfg_path}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
             "--disable-usage-stats", "--block"],
            env=self.env, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while subprocess.run([RAY, "status", "--address", self.address], env=self.env, capture_output=True,
                             timeout=60).returncode != 0:
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"autoscaling head did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(1)
        return self

    def monitor_log(self, tail: int | None = 4000) -> str:
        """The autoscaler's log (monitor.log/.out/.err of this head's session; the last ``tail`` characters of
        each, None: all)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/monitor.*"))
        return "\n".join(p.read_text(errors="replace")[-(tail or 0):] for p in logs)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
        import shutil
        shutil.rmtree(self.temp_dir, ignore_errors=True)


_POLL_SCRIPT = r"""
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
while True:
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "cpu": n["Resources"].get("CPU", 0.0),
              "ip": n["NodeManagerAddress"]} for n in ray.nodes()]
    print(json.dumps({"t": time.time(), "nodes": nodes}), flush=True)
    time.sleep(float(sys.argv[2]))
"""


class NodePoller:
    """A small process (a Ray driver) that records the cluster's nodes (id, alive, CPUs, IP) every ``interval``
    seconds as JSON lines; `.samples()` reads them back."""

    def __init__(self, address: str, out: Path, env: dict, interval: float = 0.5):
        self.out = Path(out)
        self.proc = subprocess.Popen([sys.executable, "-c", _POLL_SCRIPT, address, str(interval)], env=env,
                                     stdout=open(self.out, "w"), stderr=subprocess.DEVNULL, start_new_session=True)

    def samples(self) -> list[dict]:
        rows = []
        for line in self.out.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass                      # a line cut short while being written
        return rows

    def stop(self) -> None:
        stop_group(self.proc, timeout=5)


def submit_job(address: str, env: dict, entrypoint: list[str], runtime_env: dict | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> [--runtime-env-json ...] -- entrypoint`, retried while the head's job
    agent is still starting."""
    extra = ["--runtime-env-json", json.dumps(runtime_env)] if runtime_env else []
    deadline = time.time() + 120
    while True:
        out = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), *extra,
                              "--", *entrypoint], env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in out.stderr + out.stdout or time.time() > deadline:
            return out
        time.sleep(3)


def ray_start_temp_dir(address: str) -> Path:
    """The --temp-dir of the `ray start --head` whose dashboard (job server) is at ``address``: where that head
    keeps its sessions, job working dirs included (found in /proc: Linux)."""
    port = address.rstrip("/").rsplit(":", 1)[1]
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue                      # a process that just ended
        if "start" in cmd and f"--dashboard-port={port}" in cmd:
            return Path(next(a for a in cmd if a.startswith("--temp-dir=")).split("=", 1)[1])
    raise LookupError(f"no `ray start` process serves {address}")


# The fake provider starts each worker node's raylet with the node's id in this variable (its node id in Ray).
FAKE_NODE_ID_ENV = "RAY_OVERRIDE_NODE_ID_FOR_TESTING"


def _stat_table() -> dict[int, tuple[int, int]]:
    """Live processes (/proc, zombies left out): pid -> (parent pid, start time in clock ticks)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue
        if fields[0] not in "ZX":
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]))
    return table


def _proc_file(pid: int, name: str) -> bytes:
    """/proc/PID/NAME (cmdline, environ), or b"" for a process that ended or is not ours to read."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def fake_node_processes(node_id: str) -> list[int]:
    """Every process of one worker node of an ``AutoscalingHead``: its raylet (the process whose environment
    carries the node's id), everything under it (workers, actors, the node's agents; its object store lives in
    the raylet), and the log monitor the provider started for that node just before the raylet."""
    table = _stat_table()
    marker = f"{FAKE_NODE_ID_ENV}={node_id}".encode()
    raylets = [pid for pid in table if _proc_file(pid, "cmdline").split(b"\0")[0].endswith(b"raylet")
               and marker in _proc_file(pid, "environ").split(b"\0")]
    found = set(raylets)
    for raylet in raylets:
        parent, start = table[raylet]
        monitors = [(s, pid) for pid, (pp, s) in table.items()
                    if pp == parent and s <= start and b"log_monitor.py" in _proc_file(pid, "cmdline")]
        if monitors:
            found.add(max(monitors)[1])
    grew = True
    while grew:
        new = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return sorted(found)


def kill_fake_node(node_id: str) -> list[int]:
    """Kill one worker node of an ``AutoscalingHead`` as a machine dies: every process of it (see
    ``fake_node_processes``) stopped first, so that none reacts to the others' deaths, then SIGKILLed.
    Returns their pids; raises LookupError if the node has no process."""
    pids = fake_node_processes(node_id)
    if not pids:
        raise LookupError(f"no process of node {node_id}")
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return pids
