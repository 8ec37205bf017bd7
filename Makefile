# sciml: `make run` trains the HEP example, `make test` runs the test suite, `make test-cluster` the tests against a
# real one-node SLURM and Ray cluster it starts and stops (as root; installs slurm-wlm and munge when missing).
# All create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# --prefer-binary: pythia8mc's newest release may have no wheel for this Python yet; an older wheel beats a
# 20-minute compile.
PIP_INSTALL := $(PY) -m pip install --prefer-binary --disable-pip-version-check

.PHONY: venv run test test-slow test-cluster lint clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) -e ".[all,dev]"
	touch $@

run: venv
	$(PY) -m sciml +plugin=hep

# Tests in parallel workers (pytest-xdist), one test file per worker at a time so that a file's module fixtures
# (trained runs) are built once: on CI's 2 cores, 11 minutes instead of 20 (most tests wait on `python -m sciml`
# subprocesses starting up). At most 4 workers: each may run 2-rank DDP jobs.
test: venv
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=15

test-slow: venv
	$(PY) -m pytest -q -m slow

test-cluster: venv
	.ci/cluster/test.sh $(PY)

# ruff (pycodestyle, pyflakes, isort, bugbear, pyupgrade, public-API docstrings) and mypy on the core;
# both configured in pyproject.toml
lint: venv
	$(PY) -m ruff check sciml
	$(PY) -m mypy

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
