"""Nothing outlives `dwf`: however a command ends (done, a stage failing mid-run, SIGINT, SIGTERM while a Ray task
runs), under load, no process it started is left: not its local Ray cluster, not a worker or an actor. The same
commands show what a user sees: one line per stage and progress bars, Ray's logs in the run's log file, one line
for a failed stage.

Each `dwf` runs in a session of its own with a Ray temp dir of its own (RAY_TMPDIR). While it runs, a watcher
records its process tree; once it has ended, the whole process table is searched for any process of that tree
(same pid and start time), of its process group, or carrying its Ray temp dir (in its command line, environment,
working directory or an open file). The issue this guards against: a `ray::MapWorker(MapBatches(Canonicalizer))`
left alive with parent 1 after a `dwf canon` run under load.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.cluster_helpers import BIN, clean_env
from tests.presets import SMOKE

SMALL = ["--set", "zoo.n_models=6", "--set", "zoo.epochs=2",
         "--set", "canon.batch_size=2"]
HOG_SECONDS = 600         # the CPU hogs stop by themselves after this, whatever happens to the test


def process_table() -> dict[int, tuple[int, int, int]]:
    """Live processes (Linux /proc), zombies left out: pid -> (parent, process group, start time in ticks)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()   # after "pid (comm)": state ppid pgrp ...
        except (OSError, IndexError):
            continue                                               # it just ended
        if fields[0] not in "ZX":
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def carries(pid: int, text: str) -> str | None:
    """Where process ``pid`` carries ``text`` (its command line, environment, working directory or an open file),
    or None."""
    proc = Path(f"/proc/{pid}")
    try:
        if text in cmdline(pid):
            return "command line"
        if text.encode() in (proc / "environ").read_bytes():
            return "environment"
        if text in os.readlink(proc / "cwd"):
            return "working directory"
        for fd in (proc / "fd").iterdir():
            if text in os.readlink(fd):
                return f"open file {os.readlink(fd)}"
    except OSError:
        pass                        # ended, or not ours to read (another user's: not started by this dwf)
    return None


class WatchedDwf:
    """A `dwf` command in its own session and Ray temp dir, whose process tree is recorded while it runs."""

    def __init__(self, args: list[str], workdir: Path):
        self.ray_tmp = tempfile.mkdtemp(prefix="dwfcl", dir="/tmp")     # short: Ray's socket paths live in it
        self.out, self.err = workdir / f"dwf-{id(self)}.out", workdir / f"dwf-{id(self)}.err"
        env = clean_env() | {"RAY_TMPDIR": self.ray_tmp, "PYTHONUNBUFFERED": "1"}
        env.pop("TQDM_DISABLE")                                       # the terminal's progress bars, as a user sees
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([str(BIN / "dwf"), *args], env=env, stdout=out, stderr=err,
                                         start_new_session=True)
        self.seen: dict[tuple[int, int], set[str]] = {}   # (pid, start) -> every command line seen (a Ray
                                                          # worker's title changes: ray::IDLE, then its task's)
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            table = process_table()
            tree, grew = {self.proc.pid}, True
            while grew:
                new = {pid for pid, (ppid, _, _) in table.items() if ppid in tree} - tree
                tree |= new
                grew = bool(new)
            for pid in tree - {self.proc.pid}:
                if pid in table:
                    titles = self.seen.setdefault((pid, table[pid][2]), set())
                    titles |= {cmdline(pid)} - {""}
            time.sleep(0.1)

    def titles(self) -> list[str]:
        return [title for titles in self.seen.values() for title in titles]

    def wait_for_title(self, prefix: str, timeout: float = 300) -> bool:
        """Wait until a process of the tree has a command line starting with ``prefix`` (e.g. a Ray task's
        ``ray::train_chunk``); False if the command ended or ``timeout`` passed first."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            if any(t.startswith(prefix) for t in self.titles()):
                return True
            time.sleep(0.1)
        return False

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        code = self.proc.wait(timeout=timeout)
        self._watcher.join()
        return code, self.out.read_text(), self.err.read_text()

    def survivors(self, settle_s: float = 2.0) -> list[str]:
        """Processes of this command alive after it ended (after ``settle_s`` seconds for ones being killed)."""
        deadline = time.time() + settle_s
        while True:
            found = []
            for pid, (_, pgrp, start) in process_table().items():
                why = ("started under dwf" if (pid, start) in self.seen else
                       "in dwf's process group" if pgrp == self.proc.pid else carries(pid, self.ray_tmp))
                if why:
                    found.append(f"pid {pid} ({why}): {cmdline(pid)[:150]}")
            if not found or time.time() > deadline:
                return found
            time.sleep(0.2)

    def cleanup(self) -> None:
        """After the assertions: make sure nothing of a failed check lingers into other tests."""
        for pid, (_, pgrp, start) in process_table().items():
            if (pid, start) in self.seen or pgrp == self.proc.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def assert_nothing_left(dwf: WatchedDwf, worker_title: str) -> None:
    titles = dwf.titles()
    # the watcher saw the cluster this dwf started, and the worker the check is about: the check can fail
    assert any("raylet" in t for t in titles), titles
    assert any(t.startswith(worker_title) for t in titles), f"no {worker_title} process was seen: {titles}"
    left = dwf.survivors()
    assert not left, "processes of the dwf command outlived it:\n" + "\n".join(left)


@pytest.fixture(scope="module")
def load():
    """One busy-looping process per CPU for the tests of this module (each stops itself after HOG_SECONDS)."""
    hog = f"import time\nend = time.time() + {HOG_SECONDS}\nwhile time.time() < end:\n    pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", hog]) for _ in range(os.cpu_count() or 1)]
    yield
    for h in hogs:
        h.kill()
        h.wait()


@pytest.fixture(scope="module")
def finished_runs(load, tmp_path_factory):
    """`dwf zoo` then `dwf canon` on a small smoke root, both watched, both left to finish."""
    tmp = tmp_path_factory.mktemp("cleanup")
    root = tmp / "run"
    runs = []
    for args in (["zoo", "--preset", SMOKE, *SMALL], ["canon"]):
        dwf = WatchedDwf([*args, "--root", str(root)], tmp)
        runs.append((dwf, *dwf.finish()))
    yield root, runs
    for dwf, *_ in runs:
        dwf.cleanup()


@pytest.mark.parametrize("stage, worker", [("zoo", "ray::train_chunk"),
                                           ("canon", "ray::MapWorker(MapBatches(Canonicalizer))")],
                         ids=["zoo", "canon"])
def test_a_finished_command_leaves_no_process(finished_runs, stage, worker):
    root, runs = finished_runs
    dwf, code, out, err = runs[["zoo", "canon"].index(stage)]
    assert code == 0, out[-2000:] + err[-2000:]
    assert f"[{stage}] done" in out
    assert_nothing_left(dwf, worker)


def test_the_terminal_shows_stage_lines_and_progress_bars_and_ray_logs_go_to_the_run_root(finished_runs):
    """`dwf` on a Ray of its own, as a user runs it: stdout has the stages' lines, stderr only progress bars;
    Ray's log lines, and what its C++ core writes to the process's standard error, go to <root>/logs/dwf.log."""
    root, runs = finished_runs
    for stage, (_, code, out, err) in zip(("zoo", "canon"), runs):
        assert code == 0, out[-2000:] + err[-2000:]
        assert re.search(rf"^\[{stage}\] done in [\d.]+ s$", out, re.M), out
        pieces = [p.strip() for p in re.split(r"[\r\n]", err) if p.strip()]
        bars = [p for p in pieces if re.match(rf"^{stage}\b[\w :]*:\s+\d+%\|", p)]
        assert bars and bars == pieces, [p for p in pieces if p not in bars][:5]
        assert "INFO" not in out and "WARNING" not in out
    log = (root / "logs" / "dwf.log").read_text()
    assert "Started a local Ray instance" in log and "ray.data" in log


def test_a_stage_failing_mid_run_is_one_line_and_leaves_no_process(finished_runs, tmp_path):
    """`dwf pca` where one canonical checkpoint lost the end of its data (a disk or bucket fault): its header passes
    the driver's check, the shard actors fail reading it; the stage fails (exit 1) with one line naming the stage
    and pointing at the run's log, which has the traceback, and its actors up. (The same command resuming once the
    file is whole: tests/test_end_to_end.py.)"""
    root, _ = finished_runs
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    canon = pd.read_parquet(copy / "canonical" / "manifest.parquet")
    canon["canon_uri"] = [u.replace(str(root), str(copy)) for u in canon["canon_uri"]]
    canon.to_parquet(copy / "canonical" / "manifest.parquet")
    cut = Path(canon["canon_uri"].iloc[-1])
    cut.write_bytes(cut.read_bytes()[:-1000])
    dwf = WatchedDwf(["pca", "--root", str(copy)], tmp_path)
    try:
        code, out, err = dwf.finish()
        assert code == 1, out[-2000:] + err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("dwf:")]
        assert len(lines) == 1 and lines[0].startswith("dwf: error: stage pca failed"), err[-2000:]
        assert "logs/dwf.log" in lines[0] and "Traceback" not in err, lines[0]
        assert_nothing_left(dwf, "ray::GramShard")
    finally:
        dwf.cleanup()
    assert "Traceback (most recent call last)" in (copy / "logs" / "dwf.log").read_text()
    assert not (copy / "pca" / "_SUCCESS").exists()



@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_a_ray_task_runs_leaves_no_process(load, tmp_path, signum):
    """SIGINT as a terminal sends it (to the whole foreground process group), SIGTERM as a supervisor does (to
    the command), while the zoo's training tasks run: exit 128 + the signal, one line, nothing left."""
    long_zoo = ["--set", "zoo.n_models=6", "--set", "zoo.epochs=5000"]
    dwf = WatchedDwf(["zoo", "--preset", SMOKE, *long_zoo, "--root", str(tmp_path / "run")], tmp_path)
    try:
        running = dwf.wait_for_title("ray::train_chunk")
        assert running, dwf.err.read_text()[-2000:]
        time.sleep(1)                                       # the task is under way
        if signum == signal.SIGINT:
            os.killpg(dwf.proc.pid, signum)
        else:
            os.kill(dwf.proc.pid, signum)
        code, out, err = dwf.finish(timeout=120)
        assert code == 128 + signum, out[-2000:] + err[-2000:]
        lines = [line for line in err.splitlines() if line.startswith("dwf:")]
        assert lines == [f"dwf: stopped by {signal.Signals(signum).name}; the same command resumes the run"], \
            err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert_nothing_left(dwf, "ray::train_chunk")
    finally:
        dwf.cleanup()
