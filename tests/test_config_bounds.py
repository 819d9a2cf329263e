"""Every config value is checked before any work: a bad --set or preset value is one line naming the key, the value
and the allowed range (exit 2, nothing written). A stage that fails mid-run: tests/test_cleanup.py."""
import json

import pytest
from typer.testing import CliRunner

from dwf_ray.cli import app
from dwf_ray.config import RunConfig
from dwf_ray.serve.config import ServeConfig
from tests.presets import SMOKE
from tests.test_s3 import dwf_subprocess, one_error_line

BAD_VALUES = [   # (--set, the key=value the line names, the allowed range it states)
    ("zoo.lr=-1", "zoo.lr=-1", "greater than 0"),
    ("flow.steps=-5", "flow.steps=-5", "greater than or equal to 1"),
    ("zoo.n_models=0", "zoo.n_models=0", "greater than or equal to 1"),
    ("flow.holdout_fraction=1.5", "flow.holdout_fraction=1.5", "less than 1"),
    ("eval.temperatures=[1.0,-0.5]", "eval.temperatures.1=-0.5", "greater than 0"),
    ("canon.reference=12", "canon.reference=12", "outside [0, zoo.n_models - 1 = 11]"),
    ("flow.batch_size=1", "flow.batch_size=1", "below flow.num_workers=2"),
]


@pytest.mark.parametrize("override,named,allowed", BAD_VALUES)
def test_a_bad_set_value_is_one_line_naming_key_value_and_range_before_any_work(tmp_path, override, named, allowed):
    root = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--preset", SMOKE, "--root", str(root), "--set", override])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dwf: error:") and "Traceback" not in result.output, result.output
    assert f"{named}:" in lines[0] and allowed in lines[0], lines[0]
    assert not root.exists(), "a rejected config wrote to the run root"


def test_a_bad_value_in_a_preset_file_is_the_same_one_line(tmp_path):
    """From the `dwf` entry point in its own process, as a user runs it."""
    preset = tmp_path / "bad.json"
    preset.write_text(json.dumps({"base": "digits-mlp", "set": {"sample.temperature": 0}}))
    line = one_error_line(dwf_subprocess("zoo", "--preset", str(preset), "--root", str(tmp_path / "run")))
    assert "sample.temperature=0:" in line and "greater than 0" in line, line
    assert not (tmp_path / "run").exists()


def test_every_numeric_field_of_the_defaults_carries_a_bound():
    """A negative value of any count, rate or size is refused (seeds and indices included)."""
    unbounded = []
    for section, model in RunConfig.model_fields.items():
        if section == "preset":
            continue
        for key, field in model.annotation.model_fields.items():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, bool) or not isinstance(default, (int, float, list)) or key == "time_loc":
                continue
            bad = [-1] if isinstance(default, list) else -1
            try:
                RunConfig().with_values({f"{section}.{key}": bad})
                unbounded.append(f"{section}.{key}")
            except ValueError as exc:
                assert f"{section}.{key}" in str(exc) and "-1" in str(exc), str(exc)
    assert unbounded == []


def test_serve_options_name_key_value_and_range():
    with pytest.raises(ValueError, match=r"^invalid serve option \(max_batch_size=0: Input should be greater than "
                                         r"or equal to 1\)$"):
        ServeConfig().with_overrides(["max_batch_size=0"])
