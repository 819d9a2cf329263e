"""One run per root: a second `dwf` on a root that a live run holds exits 2 with one line naming the holder (host,
pid, since when) and writes nothing; a holder that died is detected and its lease taken over; reading a held root
needs no lease. On local disk and on the moto S3 server, with real processes."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dwf_ray import store
from dwf_ray.lease import RootHeld
from dwf_ray.pipeline import Pipeline
from dwf_ray.presets import preset
from tests.presets import SMOKE
from tests.test_s3 import dwf_subprocess, one_error_line

TTL_S = 5   # the S3 lease's ttl in these tests (DWF_LEASE_TTL_S); the holder beats every ttl / 4

HOLDER = """
import sys, time
from dwf_ray.lease import RootHeld
from dwf_ray.pipeline import Pipeline
from dwf_ray.presets import preset
from dwf_ray.presets import preset
pipe = Pipeline(sys.argv[1], preset(sys.argv[2]))
with pipe.holding():
    print("held", flush=True)
    time.sleep(600)
"""


def start_holder(root: str) -> subprocess.Popen:
    """A run that holds ``root`` (the Pipeline's own lease) until it is killed; returns once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, root, SMOKE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "DWF_LEASE_TTL_S": str(TTL_S)})
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()[-2000:] if proc.poll() is not None else line
    return proc


def try_hold(root: str) -> subprocess.CompletedProcess:
    """Another process that takes the lease and lets it go at once."""
    code = "import sys; from dwf_ray.pipeline import Pipeline; p = Pipeline(sys.argv[1])\nwith p.holding(): pass"
    return subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DWF_LEASE_TTL_S": str(TTL_S)})


def assert_refused_naming(root: str, holder: subprocess.Popen) -> None:
    """`dwf zoo` on the held root: one line naming the holder, exit 2, and no zoo written."""
    line = one_error_line(dwf_subprocess("zoo", "--preset", SMOKE, "--root", root,
                                         env={"DWF_LEASE_TTL_S": str(TTL_S)}))
    assert f"{root} is held by another run" in line, line
    assert f"host {socket.gethostname()}, pid {holder.pid}, since 20" in line, line
    assert not store.exists(store.join(root, "zoo")), "the refused run wrote its stage"


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_local_root_one_run_at_a_time_and_a_dead_holder_frees_it(tmp_path):
    root = str(tmp_path / "run")
    holder = start_holder(root)
    try:
        assert_refused_naming(root, holder)
        assert Pipeline(root).cfg.zoo.n_models == 12, "reading a held root needed the lease"
    finally:
        kill(holder)
    freed = try_hold(root)   # the kernel released the dead holder's lock
    assert freed.returncode == 0, freed.stderr[-2000:]


def test_s3_root_lease_heartbeat_keeps_a_live_holder_and_a_dead_one_is_taken_over(s3_server):
    root = f"s3://{s3_server()}/runs/leased"
    holder = start_holder(root)
    try:
        time.sleep(2 * TTL_S)    # longer than the ttl: only the heartbeat keeps the lease alive
        assert_refused_naming(root, holder)
        assert Pipeline(root).cfg.zoo.n_models == 12, "reading a held root needed the lease"
    finally:
        kill(holder)
    with pytest.raises(RootHeld, match=f"pid {holder.pid}"):   # its last heartbeat is still fresh
        with Pipeline(root).holding():
            pass
    time.sleep(TTL_S + 1)
    taken = try_hold(root)       # stale now: taken over, then released
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert not store.exists(f"{root}/_lease.json"), "a finished run left its lease behind"


def test_two_holders_started_together_one_wins(tmp_path):
    """Two runs racing for a fresh root: exactly one holds it."""
    root = str(tmp_path / "run")
    Pipeline(root, preset(SMOKE))
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, root, SMOKE], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        time.sleep(1)
        deadline = time.time() + 60
        while sum(p.poll() is not None for p in procs) < 1 and time.time() < deadline:
            time.sleep(0.5)
        done = [p for p in procs if p.poll() is not None]
        assert len(done) == 1 and done[0].returncode != 0 and "is held by another run" in done[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                kill(p)
