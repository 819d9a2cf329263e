"""Bad command lines get one line naming the problem and exit code 2, before any Ray starts."""
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
