"""Every config value is checked before any work: a bad --set or preset value is one line naming the key, the value
and the allowed range (exit 2, nothing written); a stage that fails mid-run is one line naming it, its traceback
goes to the run's log, and rerunning the same command resumes."""
import json

import pytest

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
    line = one_error_line(dwf_subprocess("run", "--preset", SMOKE, "--root", str(root), "--set", override))
    assert f"{named}:" in line and allowed in line, line
    assert not root.exists(), "a rejected config wrote to the run root"


def test_a_bad_value_in_a_preset_file_is_the_same_one_line(tmp_path):
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


def test_a_stage_failing_mid_run_is_one_line_with_the_traceback_in_the_log_and_the_run_resumes(tmp_path):
    """The zoo is trained; its reference checkpoint is then unreadable (a disk or bucket fault): `dwf canon`
    prints one line naming the stage and cause, exit 1; once the file is back, the same command continues."""
    root = tmp_path / "run"
    small = ["--set", "zoo.n_models=4", "--set", "zoo.epochs=2"]
    zoo = dwf_subprocess("zoo", "--preset", SMOKE, "--root", str(root), *small)
    assert zoo.returncode == 0, zoo.stderr[-2000:]
    reference = root / "zoo" / "m00000.safetensors"
    good = reference.read_bytes()
    reference.write_bytes(b"not a checkpoint")
    failed = dwf_subprocess("canon", "--root", str(root))
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert lines[0].startswith("dwf: error: stage canon failed: ValueError: canonicalize: the reference model is "
                               "unusable") and "logs/dwf.log" in lines[0], lines[0]
    log = (root / "logs" / "dwf.log").read_text()
    assert "Traceback (most recent call last)" in log and "the reference model is unusable" in log
    assert not (root / "canonical" / "_SUCCESS").exists()

    reference.write_bytes(good)
    zoo_done = (root / "zoo" / "_SUCCESS").stat().st_mtime_ns
    resumed = dwf_subprocess("canon", "--root", str(root))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (root / "canonical" / "_SUCCESS").exists()
    assert (root / "zoo" / "_SUCCESS").stat().st_mtime_ns == zoo_done, "the completed zoo stage was redone"
