"""MLflow tracking into a PostgreSQL backend store, as the team setup (docker-compose.yml) runs it:
a real PostgreSQL server (the machine's own binaries: initdb, pg_ctl) on 127.0.0.1 and a free port,
its data in a temporary folder; a stage run through the project's tracking interface
(services/tracking.py) with ``MLFLOW_TRACKING_URI=postgresql://...``; the run read back from the
database; the server stopped. Skipped, with the reason, where no PostgreSQL binaries exist."""

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from .stage_fixtures import tiny_params, write_params

pytestmark = pytest.mark.slow


def pg_bin(name: str) -> str | None:
    """A PostgreSQL server binary: on PATH (e.g. /usr/local/bin), else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """postgresql://postgres@127.0.0.1:<port>/mlflow on a fresh cluster, stopped and removed afterwards."""
    initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: `apt-get install postgresql` "
                    "to run the PostgreSQL tracking test")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="robustkd-pg-"))
    if os.geteuid() == 0:   # initdb refuses to run as root: the cluster belongs to an unprivileged user
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and no unprivileged user 'nobody' to own the PostgreSQL cluster")
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        prefix = ["runuser", "-u", "nobody", "--"]
        os.chmod(base, 0o755)
        os.chown(base, user.pw_uid, user.pw_gid)
    data, port = base / "data", free_port()
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, env=env, cwd=base)
    opts = f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "server.log"), "-w", "start"],
                   check=True, capture_output=True, env=env, cwd=base)
    try:
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        con.autocommit = True
        with con.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        con.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       env=env, cwd=base)
        shutil.rmtree(base, ignore_errors=True)


def test_a_stage_run_is_stored_in_postgresql(postgres, tmp_path, monkeypatch):
    import psycopg2
    from mlflow.tracking import MlflowClient

    from services.params import load_params
    from services.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "robustkd-postgres")
    params = load_params(write_params(tmp_path / "params.yaml", tiny_params("raw")))
    (tmp_path / "history.csv").write_text("epoch,loss\n1,2.0\n2,1.5\n")
    with stage_run("evaluate", params, ("evaluate",)) as tracker:
        tracker.log_metrics({"natural": 40.0, "pgd20": 25.0})
        tracker.log_artifact(tmp_path / "history.csv")
        run_id = tracker.run_id

    run = MlflowClient(tracking_uri=postgres).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"natural": 40.0, "pgd20": 25.0}
    assert run.data.tags["dvc_stage"] == "evaluate" and run.data.tags["profile"] == "tiny"
    assert run.data.params["evaluate.config.pgd_steps"] == "3"
    with contextlib.closing(psycopg2.connect(postgres)) as con, con.cursor() as cur:   # in PostgreSQL itself
        cur.execute("SELECT r.status, e.name FROM runs r JOIN experiments e USING (experiment_id) WHERE run_uuid = %s",
                    (run_id,))
        assert cur.fetchall() == [("FINISHED", "robustkd-postgres")]
