"""Bad command lines get one line naming the problem and exit code 2, before any Ray starts; Ray's and native
output goes to the run's log, progress bars stay (a real run's terminal: tests/test_cleanup.py)."""
import pytest
from typer.testing import CliRunner

from dwf_ray.cli import app


@pytest.mark.parametrize("args, named", [
    (["run", "--preset", "digits-mlp", "--set", "flow.nosuch=1"], "unknown key 'nosuch'"),
    (["run", "--preset", "digits-mlp", "--set", "flow.hidden=abc"], "flow.hidden"),
    (["run", "--preset", "digits-mlp", "--set", "nosection.x=1"], "no config section 'nosection'"),
    (["run", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["canon", "--root", "{tmp}/empty"], "no config.json in this run root"),
    (["run", "--preset", "digits-mlp", "--root", "{tmp}/r", "--restart-from", "nostage"], "unknown stage 'nostage'"),
])
def test_bad_command_lines_get_one_line_and_exit_code_2(args, named, tmp_path):
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dwf: error:") and named in lines[0], result.stderr
    assert "Traceback" not in result.output


QUIET = """
import os, sys
from tqdm import tqdm
from dwf_ray.runtime.logs import quiet_logs
with quiet_logs(sys.argv[1]):
    os.write(2, b"native line, as Ray's C++ core writes it\\n")
    for _ in tqdm(range(3), desc="stage"):
        pass
    import logging; logging.getLogger("ray.data").warning("a Ray Data warning")
os.write(2, b"after the block\\n")
"""


def test_quiet_logs_sends_what_is_written_to_descriptor_2_to_the_log_and_keeps_the_bars(tmp_path):
    import os
    import subprocess
    import sys
    log = tmp_path / "logs" / "dwf.log"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.run([sys.executable, "-c", QUIET, str(log)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "stage: 100%" in proc.stderr and "after the block" in proc.stderr
    assert "native line" not in proc.stderr and "a Ray Data warning" not in proc.stderr
    text = log.read_text()
    assert "native line, as Ray's C++ core writes it" in text and "a Ray Data warning" in text
