# Two commands: `make run` (set up and run the pipeline on the default CPU profile) and
# `make test` (set up and run the tests). Both create .venv at the project root if needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PYTHON  ?= python3
# Take torch from a local wheel folder when pip is configured with one (CPU machines here);
# elsewhere torch==2.13.0 comes from the index (add a PyTorch index URL for other builds).
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
# TORCH_INDEX: a PyTorch wheel index for other torch builds, e.g. https://download.pytorch.org/whl/cpu
# (the Docker image) or https://download.pytorch.org/whl/cu128 (GPU machines).
TORCH_INDEX ?=
UV_FLAGS   := $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) \
              $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --index-strategy unsafe-best-match) \
              --compile-bytecode
PRESET  ?= cpu
# `make test` runs the tests on two pytest-xdist workers, a file's tests on one worker (files that share
# state: one unit, tests/conftest.py's SHARED_STATE), slow ones first. XDIST=-n0 runs them serially.
XDIST   ?= -n 2 --dist loadfile --no-loadscope-reorder

export DVC_NO_ANALYTICS=1
export MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false

.PHONY: setup run test test-unit test-stage test-e2e test-presets test-gpu lint typecheck plots lock preset compare ablation benchmark benchmark-gpu gpu-check clean mlflow-ui prefect-server schedule serve
LINT_PATHS := robustkd stages services pipeline tools

setup: $(VENV)/.installed

# requirements.lock pins every package (make lock); the install takes exactly those versions.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null
	$(PY) -m pip install -q --disable-pip-version-check uv
	$(VENV)/bin/uv pip install -q --python $(PY) $(UV_FLAGS) -c requirements.lock -e ".[pipeline,dev]"
	$(PY) -m tools.tvfix
	touch $@

# The pipeline through the Prefect flow: one task per DVC stage, MLflow runs, registry. It ends with
# the registered students, the evaluation as one table and where to look next (services/summary.py;
# every figure: `dvc metrics show`).
run: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pipeline.flow $(FLOW_ARGS)
	$(PY) -m pipeline.registry list
	$(PY) -m services.summary --mlflow-port $(MLFLOW_PORT)

# `make test` (what CI runs): every tier but `presets`, the slowest 25 tests listed at the end. One tier:
# `make test-unit`, `test-stage`, `test-e2e`; `make test-presets` smoke-runs every preset of params/
# (tests/test_presets.py); `make test-gpu` the CUDA tier (skipped without CUDA). Markers: pyproject.toml.
PYTEST := PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q
test: setup lint typecheck
	$(PYTEST) $(XDIST) -m "not presets" --durations=25

test-unit test-stage test-e2e test-gpu: test-%: setup
	$(PYTEST) $(XDIST) -m $*

test-presets: setup
	$(PYTEST) $(XDIST) tests/test_presets.py

$(VENV)/bin/uv:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null
	$(PY) -m pip install -q --disable-pip-version-check uv

lint: setup
	$(VENV)/bin/ruff check $(LINT_PATHS)

# mypy on robustkd, stages and tools ([tool.mypy] in pyproject.toml; about 40 s cold, seconds with its cache)
typecheck: setup
	$(VENV)/bin/mypy

# DVC's plots (dvc.yaml, top-level plots) as an offline page: dvc_plots/index.html.
# PLOTS_ARGS="diff HEAD~1" or "diff exp-a exp-b" compares revisions or experiments.
plots: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pipeline.plots $(PLOTS_ARGS)

# Re-pin requirements.lock after changing pyproject.toml's dependencies (Python 3.11, Linux). Local
# version tags (+cpu) are dropped so that the CUDA or CPU build of the same torch satisfies the pin.
# uv keeps the versions already in the lock; torch's own pin is removed first, else the PyPI (CUDA)
# build of that version is preferred over the local wheel and its CUDA packages enter the lock.
lock: $(VENV)/bin/uv
	test ! -f requirements.lock || sed -i -E '/^torch(vision)?==/d' requirements.lock
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra pipeline --extra dev --python-version 3.11 \
	  $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) --custom-compile-command "make lock" -o requirements.lock
	sed -i -E 's/^(torch(vision)?==[0-9.]+)\+[a-z0-9.]+/\1/' requirements.lock

# Switch params.yaml to a preset of params/ (cpu, cifar10-resnet18, ...): `make preset PRESET=...`
preset: setup
	$(PY) -m services.presets $(PRESET)
	$(PY) -m stages.prepare_data --download-only

compare: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc repro compare/dvc.yaml

# The slides' two DARWIN ablation tables (modules; weighting): reports/ablation.md
ablation: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH dvc repro ablation/dvc.yaml
	cat reports/ablation.md

# Speed and memory, side by side in one run (benchmarks/bench.py): table + benchmarks/results.json
benchmark: setup
	$(PY) -m benchmarks.bench $(BENCH_ARGS)

# The GPU targets need no setup step and no network (an offline GPU machine): they run on GPU_PY, a
# Python whose torch is already installed there (with pytest, numpy; timm for the AT-PRM case).
GPU_PY ?= python3
# The fast path on one GPU in < 5 min (benchmarks/gpu.py): paper preset, per-method full-run hours
benchmark-gpu:
	$(GPU_PY) -m benchmarks.gpu $(BENCH_ARGS)

# One GPU lease, at most 8 min (benchmarks/gpu_check.py): the GPU test tier (pytest -m gpu), then the
# benchmark (DARWIN default path, fp32 eager, RSLAD and TRADES): benchmarks/results-gpu-check.json.
# GPU_CHECK_ARGS="--device cpu --budget-s 120": the smoke run on a CPU (CI).
gpu-check:
	$(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf data models metrics reports checkpoints

# UIs and deployment (docs/operations.md). Servers bind to 127.0.0.1.
# Ports: `make prefect-server PREFECT_PORT=4300` (the UI then calls its API on that port, and
# `make schedule PREFECT_PORT=4300` deploys to it); `make mlflow-ui MLFLOW_PORT=5001`.
MLFLOW_PORT ?= 5000
PREFECT_PORT ?= 4200
mlflow-ui: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

prefect-server: setup
	PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PREFECT_SERVER_API_PORT=$(PREFECT_PORT) \
	  $(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

CRON ?= 0 2 * * *
schedule: setup
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pipeline.schedule --cron "$(CRON)"

serve: setup
	$(PY) -m pipeline.serve_model --model models:/robustkd-student@champion --port 8080
