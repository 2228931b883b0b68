"""docker-compose.yml (the team backends) without Docker: PostgreSQL backs MLflow and Prefect, the
servers run from the pipeline image with the lock's versions and the drivers they need, nothing
is published beyond 127.0.0.1. (Images cannot be built on the machines this project is tested on;
tests/test_tracking_postgres.py runs MLflow on a real PostgreSQL.)"""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_use_postgres_and_publish_on_localhost_only():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "prefect", "pipeline", "pipeline-gpu"}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    assert services["postgres"]["image"].startswith("postgres:")
    assert "--backend-store-uri postgresql://" in services["mlflow"]["command"]
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    for name in ("mlflow", "prefect", "pipeline"):
        assert services[name]["build"] == "." and services[name]["image"] == "robustkd:latest"
    env = services["pipeline"]["environment"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert "mlflow" in services["mlflow"]["command"].split("--allowed-hosts")[1]
    init = (ROOT / "docker" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow;" in init and "CREATE DATABASE prefect;" in init
    user = services["postgres"]["environment"]["POSTGRES_USER"]
    assert f"//{user}:" in services["mlflow"]["command"]


def test_the_lock_pins_the_database_drivers():
    lock = (ROOT / "requirements.lock").read_text()
    for package in ("psycopg2-binary", "asyncpg", "mlflow", "prefect"):
        assert re.search(rf"^{package}==", lock, re.M), package


def test_the_gpu_profile_gets_every_gpu_the_host_ipc_and_a_compiler():
    """`docker compose --profile pipeline-gpu`: --gpus all and --ipc=host in compose's terms, a CUDA
    base with what Triton needs to compile (gcc, the Python headers); the README's docker run too."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gpu = compose["services"]["pipeline-gpu"]
    assert gpu["profiles"] == ["pipeline-gpu"] and gpu["ipc"] == "host"
    device, = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", "all", ["gpu"])
    args = gpu["build"]["args"]
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "cu12" in args["TORCH_INDEX"]
    assert {"gcc", "python3-dev"} <= set(args["BUILD_PACKAGES"].split())
    assert gpu["environment"] == compose["services"]["pipeline"]["environment"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG BUILD_PACKAGES=" in dockerfile and "${BUILD_PACKAGES}" in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^docker run --rm --gpus all --ipc=host .* robustkd:cuda", readme, re.M)
