import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_DIR = SHARED / "datasets" / "cifar10"
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))
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
