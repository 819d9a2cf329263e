# Two commands: `make demo` (set up and run the default preset) and `make test` (`make test-slow`: the tests
# marked slow, which `make test` leaves out).
VENV ?= .venv
PY := $(VENV)/bin/python
PRESET ?= digits-mlp

# Ray on a single machine: no auth token, no usage stats, bind to loopback.
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/dwf run --preset $(PRESET)

test: setup
	$(PY) -m pytest -q -ra -m "not slow" --durations=25

test-slow: setup
	$(PY) -m pytest -q -ra -m slow

bench: demo
	$(PY) bench/flow_sweep.py runs/$(PRESET) --grid flow.source_std=0.1,0.3,1.0

clean:
	rm -rf runs .pytest_cache
