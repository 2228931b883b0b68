import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_DIR = SHARED / "datasets" / "cifar10"
sys.path.insert(0, str(ROOT))
# `make test` runs two pytest-xdist workers (PYTEST_XDIST_WORKER set in each): they split the cores
# between them (one torch thread each on 2 cores) instead of each taking two, and so do the processes
# that tests start (stage scripts under DVC, torchrun, servers): torch and OpenBLAS read OMP_NUM_THREADS.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) if XDIST_WORKER else 1
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if XDIST_WORKER:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
torch.set_num_threads(THREADS)
# Tests track into a SQLite store in their own working directory, never a user's server.
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("ROBUSTKD_PARENT_RUN_ID", None)
os.environ.update(MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                  DVC_NO_ANALYTICS="1", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120")


class FixedLinear(torch.nn.Module):
    """logits = W @ flatten(x) + b: a model whose outputs are easy to compute by hand."""

    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float32))
        self.bias = torch.nn.Parameter(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x):
        return x.flatten(1) @ self.weight.T + self.bias


@pytest.fixture
def tiny_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 32, 32, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    xp = torch.rand(6, 3, 32, 32, generator=g)
    yp = torch.tensor([1, 2, 3, 4, 5, 6])
    return x, y, xp, yp


@pytest.fixture
def small_models():
    from robustkd.models import create_model

    torch.manual_seed(0)
    return create_model("resnet10_w8"), create_model("resnet10_w8").eval()


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory) -> Path:
    """The tiny project after one `dvc repro`, committed (tests/stage_fixtures.build_tiny_repro): one
    build per test session, shared by the xdist workers; take a copy (``copy_project``) to use it."""
    from .stage_fixtures import build_tiny_repro

    base = tmp_path_factory.getbasetemp()
    return build_tiny_repro(base.parent if XDIST_WORKER else base)


# Under xdist (`make test`: -n 2 --dist loadfile, see pytest_xdist_make_scheduler below) one worker runs all
# of a file's tests, in their order, as serially: many files build an expensive module-scoped fixture (a
# pipeline run, a server) and some tests build on the one before. Files whose tests share state with
# another file's are one unit here, run on one worker in this order:
SHARED_STATE = {
    # Never two prefect_test_harness servers at once: each has its own SQLite db and port, but they
    # share PREFECT_HOME (~/.prefect), whose memo_store.toml every server start rewrites.
    "tests/test_flow.py": "prefect",
    "tests/test_prefect_deployment.py": "prefect",
    # test_report_browser.py may apt-get install chromium, which test_dvc_pipeline.py's plots test
    # would otherwise find half installed; both screenshot into test-artifacts/.
    "tests/test_dvc_pipeline.py": "chromium",
    "tests/test_report_browser.py": "chromium",
}


def xdist_unit(nodeid: str) -> str:
    """The unit of work of a test under xdist: its file, or its SHARED_STATE group."""
    path = nodeid.split("::", 1)[0]
    return SHARED_STATE.get(path, path)


@pytest.hookimpl(optionalhook=True)   # an xdist hook: pytest without xdist (or -p no:xdist) ignores it
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the files of one SHARED_STATE group as one unit. (Not loadgroup with
    xdist_group marks: pytest-xdist 3.8 under pytest 9.2 silently ignores those marks, pytest-xdist
    issue 1386: it renames the test ids, which pytest 9.2 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedStateScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit(nodeid)

    return SharedStateScheduling(config, log)


# Tiers (pyproject.toml's markers; `make test-unit`, `test-stage`, `test-e2e`, `test-presets`, `test-gpu`):
# unit: in-process, no subprocess, no files beyond tmp; stage: one stage (or a few) on tiny data, in process
# or as its CLI; e2e: DVC, Prefect, MLflow servers, PostgreSQL, torchrun, Chromium for real. A file's tier is
# the heaviest of its tests; a test's own tier marker (presets, gpu, ...) wins over its file's.
TIERS = {
    "unit": ["test_attacks", "test_bench_driver", "test_cifar_archives", "test_data", "test_engine",
             "test_gpu_benchmark", "test_grouped_bn", "test_models", "test_official_parity", "test_resume",
             "test_standin_ddpm", "test_stats", "test_vit", "test_layout", "test_docs_links", "test_fast_step"],
    "stage": ["test_attention", "test_capability", "test_ddpm_diffusers", "test_evaluation", "test_evaluation_compiled",
              "test_input_checks", "test_protocols",
              "test_params_checks", "test_presets", "test_seeds", "test_stages", "test_teachers",
              "test_declared_inputs", "test_serving", "test_serving_hostile",
              "test_best_checkpoint", "test_tables", "test_summary", "test_gpu_check", "test_onnx_attack"],
    "e2e": ["test_ablation", "test_compose", "test_distributed", "test_dvc_pipeline", "test_faults", "test_flow",
            "test_flow_lock", "test_kept_outputs", "test_pipeline_units", "test_prefect_deployment", "test_registry_mlflow",
            "test_report_browser", "test_tracking_postgres"],
    "gpu": ["test_gpu"],
}
TIER_MARKERS = ("unit", "stage", "e2e", "presets", "gpu")
FILE_TIER = {f"tests/{name}.py": tier for tier, names in TIERS.items() for name in names}


def file_tier(path: str) -> str:
    """The tier of a test file (path relative to the project, as in a node id). A method's test
    module (tests/methods/) is a unit test by rule: adding a method does not touch this file."""
    if path.startswith("tests/methods/test_") and path.endswith(".py"):
        return "unit"
    if path not in FILE_TIER:
        raise pytest.UsageError(f"tests/conftest.py TIERS: {path} has no tier; add it to unit, stage or e2e")
    return FILE_TIER[path]


def assign_tiers(items) -> None:
    """Each test's tier marker; `gpu` tests skip where CUDA is absent."""
    no_cuda = pytest.mark.skip(reason="gpu tier: no CUDA device here") if not torch.cuda.is_available() else None
    for item in items:
        if not any(item.get_closest_marker(m) for m in TIER_MARKERS):
            item.add_marker(getattr(pytest.mark, file_tier(item.nodeid.split("::", 1)[0])))
        if no_cuda and item.get_closest_marker("gpu"):
            item.add_marker(no_cuda)


def pytest_collection_modifyitems(config, items):
    """Every test gets its tier (TIERS). On an xdist worker: the units holding `slow` (end-to-end) tests first, so that no long unit
    starts last while the other worker idles (the Makefile's --no-loadscope-reorder keeps this order;
    xdist's default orders units by their number of tests)."""
    assign_tiers(items)
    if XDIST_WORKER:
        slow = {xdist_unit(item.nodeid) for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: xdist_unit(item.nodeid) not in slow)   # stable: units keep their order
