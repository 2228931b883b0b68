# Two commands: `make run` (set up and run the pipeline on the default CPU profile) and
# `make test` (set up and run the tests). Both create .venv at the project root if needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
# Take torch from a local wheel folder when pip is configured with one (CPU machines here);
# elsewhere torch==2.13.0 comes from the index (add a PyTorch index URL for other builds).
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS   := $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) --compile-bytecode
PRESET  ?= cpu

export DVC_NO_ANALYTICS=1
export MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: setup run test preset compare benchmark clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install -q --python $(PY) $(UV_FLAGS) -e ".[pipeline,dev]"
	$(PY) -m robustkd.tvfix
	touch $@

run: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc repro
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc metrics show metrics/evaluate metrics/export.json

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q

# Switch params.yaml to a preset of params/ (cpu, cifar10-resnet18, ...): `make preset PRESET=...`
preset: setup
	cp params/$(PRESET).yaml params.yaml
	$(PY) -m stages.prepare_data --download-only

compare: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc repro compare/dvc.yaml

clean:
	rm -rf data models metrics reports checkpoints
