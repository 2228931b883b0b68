"""Two flows in one workspace: the second refuses (or waits) with one line naming the holder, before
it touches params.yaml, dvc.lock, the MLflow store or the registry; a stage whose DVC lock is
held by another DVC process fails with one line saying so (a transient failure, retried)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.flow import StageFailed, main, repro_stage, workspace_lock

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def holder(code: str, cwd: Path) -> subprocess.Popen:
    """A child process that takes a lock, prints 'held' and sleeps; stopped by the test."""
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"})
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)


def with_the_cpu_preset(project: Path, monkeypatch) -> None:
    """A project whose ``--preset cpu`` validates (the flow checks params and the data folder first)."""
    (project / "params").mkdir(exist_ok=True)
    (project / "params/cpu.yaml").write_text((ROOT / "params/cpu.yaml").read_text())
    monkeypatch.setenv("ROBUSTKD_DATA_ROOT", str(project))


def test_a_second_flow_in_the_workspace_refuses_with_one_line(tmp_path, capsys, monkeypatch):
    with_the_cpu_preset(tmp_path, monkeypatch)
    (tmp_path / "params.yaml").write_text("profile: mine\n")
    first = holder(f"from pathlib import Path; import time; from pipeline.flow import workspace_lock\n"
                   f"with workspace_lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(120)",
                   tmp_path)
    try:
        for extra, waited in (([], ""), (["--wait-lock", "1"], "waited 1 s; ")):
            with pytest.raises(SystemExit) as err:
                main(["--project-dir", str(tmp_path), "--preset", "cpu", "--no-register", *extra])
            assert err.value.code == 1
            out = capsys.readouterr().err.strip()
            assert out.startswith(f"error: another flow is running in {tmp_path.resolve()} (flow pid {first.pid}, "
                                  f"started "), out
            assert out.endswith(f"); {waited}this one did not start (--wait-lock SECONDS waits for it)")
            assert len(out.splitlines()) == 1
        assert (tmp_path / "params.yaml").read_text() == "profile: mine\n"   # never swapped
    finally:
        stop(first)
    with workspace_lock(tmp_path), workspace_lock(tmp_path):   # free again; re-entrant in one process
        other = subprocess.run([sys.executable, "-c", "from pathlib import Path; from pipeline.flow import "
                                f"workspace_lock\nwith workspace_lock(Path({str(tmp_path)!r})): pass"],
                               cwd=ROOT, capture_output=True, text=True)
        assert other.returncode == 1 and f"WorkspaceBusy: another flow is running in {tmp_path.resolve()} (flow pid " \
            f"{os.getpid()}, started" in other.stderr, other.stderr[-2000:]


def test_a_stage_whose_dvc_lock_is_held_fails_with_one_line_and_is_retried(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run("git init -q && dvc init -q", shell=True, cwd=tmp_path, env=env, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  quick:\n    cmd: echo hi > out.txt\n    outs: [out.txt]\n")
    dvc = holder("from dvc.repo import Repo; import time\nr = Repo('.'); r.lock.lock()\n"
                 "print('held', flush=True); time.sleep(120)", tmp_path)
    lines = []
    try:
        start = time.monotonic()
        with pytest.raises(StageFailed) as err:
            repro_stage("quick", str(tmp_path), {}, lines.append)
        assert time.monotonic() - start < 120   # DVC gives up after a few seconds: no hang
    finally:
        stop(dvc)
    assert err.value.transient
    assert str(err.value).splitlines()[1].startswith(
        f"the DVC lock of {tmp_path} is held by another DVC process (a flow or a `dvc repro` in this "
        f"workspace); DVC said: ERROR: Unable to acquire lock")
    assert len(str(err.value).splitlines()) == 2
    assert repro_stage("quick", str(tmp_path), {}, lines.append)["ran"]   # the lock is free again


def test_a_flow_does_not_start_under_a_running_dvc_command(tmp_path, capsys, monkeypatch):
    """A `dvc repro` or workspace `dvc exp run` holds DVC's repo lock for its whole run: a flow refuses
    to start (or waits) instead of swapping params.yaml and interleaving its stages with it."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run("git init -q && dvc init -q", shell=True, cwd=tmp_path, env=env, check=True)
    with_the_cpu_preset(tmp_path, monkeypatch)
    (tmp_path / "params.yaml").write_text("profile: mine\n")
    dvc = holder("from dvc.repo import Repo; import time\nr = Repo('.'); r.lock.lock()\n"
                 "print('held', flush=True); time.sleep(120)", tmp_path)
    try:
        with pytest.raises(SystemExit) as err:
            main(["--project-dir", str(tmp_path), "--preset", "cpu", "--no-register"])
        assert err.value.code == 1
        out = capsys.readouterr().err.strip()
        assert out.startswith(f"error: a DVC command (`dvc repro` or `dvc exp run`) is running in "
                              f"{tmp_path.resolve()} (DVC's lock: "), out
        assert out.endswith("this one did not start (--wait-lock SECONDS waits for it)") and len(out.splitlines()) == 1
        assert (tmp_path / "params.yaml").read_text() == "profile: mine\n"
    finally:
        stop(dvc)
    with workspace_lock(tmp_path):   # DVC's lock released: the flow's lock is taken
        pass


def test_an_experiment_in_the_workspace_does_not_run_under_a_flow(tmp_path):
    """`dvc exp run` in the workspace starts with the fingerprint_data stage: it refuses while a flow
    holds the workspace; the flow's own stages, and queued/temporary experiments (their own copy
    under .dvc/tmp/exps), run."""
    from tests.stage_fixtures import make_image_folder, tiny_params, write_params

    make_image_folder(tmp_path / "raw", train_per_class=1, test_per_class=1)
    write_params(tmp_path / "params.yaml", tiny_params(str(tmp_path / "raw")))
    queued = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "abc123"
    queued.mkdir(parents=True)
    write_params(queued / "params.yaml", tiny_params(str(tmp_path / "raw")))

    def fingerprint(cwd, **extra):
        return subprocess.run([sys.executable, "-m", "stages.fingerprint_data"], cwd=cwd, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **extra})

    flow = holder(f"from pathlib import Path; import time; from pipeline.flow import workspace_lock\n"
                  f"with workspace_lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(120)",
                  tmp_path)
    try:
        refused = fingerprint(tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(f"error: a Prefect flow is running in {tmp_path.resolve()} (flow pid "
                                         f"{flow.pid}, started "), refused.stderr
        assert "`dvc exp run --queue` then `dvc queue start`" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "data" / "raw_fingerprint.json").exists()
        in_flow = fingerprint(tmp_path, ROBUSTKD_IN_FLOW="1")
        assert in_flow.returncode == 0, in_flow.stderr
        assert fingerprint(queued).returncode == 0
    finally:
        stop(flow)
    assert fingerprint(tmp_path).returncode == 0


def test_a_killed_flows_mlflow_runs_are_ended_as_killed_by_the_next_flow(tmp_path):
    """A flow killed with SIGKILL leaves its parent run and its stage's run RUNNING; the next flow of
    the same workspace (holding the lock) ends both as KILLED; another workspace's run is left alone."""
    import mlflow

    from pipeline.flow import close_stale_flow_runs
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("robustkd", artifact_location=str(tmp_path / "mlruns"))
    here, elsewhere = tmp_path / "ws", tmp_path / "other"
    killed = client.create_run(exp, tags={"stage": "flow", "workspace": str(here.resolve())})
    stage = client.create_run(exp, tags={"stage": "distill", "mlflow.parentRunId": killed.info.run_id})
    foreign = client.create_run(exp, tags={"stage": "flow", "workspace": str(elsewhere.resolve())})
    said: list[str] = []
    assert close_stale_flow_runs(client, exp, here, log=said.append) == [killed.info.run_id]
    status = {r: client.get_run(r).info.status for r in (killed.info.run_id, stage.info.run_id, foreign.info.run_id)}
    assert status == {killed.info.run_id: "KILLED", stage.info.run_id: "KILLED", foreign.info.run_id: "RUNNING"}
    assert len(said) == 1 and "ended as KILLED with 1 stage run(s)" in said[0]


def test_a_stopped_flow_stops_its_stage_process(tmp_path, monkeypatch):
    """The stage's dvc process does not outlive the flow: an exception while it runs (SIGTERM turned
    into pipeline.flow.Stopped) terminates it."""
    import pipeline.flow as flow_module
    from pipeline.flow import Stopped, repro_stage
    pids: list[int] = []

    def log(line):
        pids.append(int(line.split()[1]))
        raise Stopped(143)
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text("#!/bin/sh\necho \"pid $$\"\nexec sleep 60\n")
    fake_dvc.chmod(0o755)
    monkeypatch.setattr(flow_module, "dvc_executable", lambda: str(fake_dvc))
    with pytest.raises(Stopped):
        repro_stage("x", str(tmp_path), {}, log)
    assert pids and not Path(f"/proc/{pids[0]}").exists(), "the stage process is still running"


def test_dvcs_per_stage_hints_are_not_passed_into_the_flow_log(tmp_path, monkeypatch):
    import pipeline.flow as flow_module
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text("#!/bin/sh\necho 'Running stage x:'\necho 'To track the changes with git, run:'\necho\n"
                        "printf '\\tgit add dvc.lock\\n'\necho 'To enable auto staging, run:'\n"
                        "printf '\\tdvc config core.autostage true\\n'\necho 'Use `dvc push` to send your updates to remote storage.'\n")
    fake_dvc.chmod(0o755)
    monkeypatch.setattr(flow_module, "dvc_executable", lambda: str(fake_dvc))
    lines: list[str] = []
    assert flow_module.repro_stage("x", str(tmp_path), {}, lines.append)["ran"]
    assert lines == ["Running stage x:"], lines


@pytest.mark.parametrize("edit, said", [
    (lambda text: text.replace("\ndistill:", "\ndistil:", 1), "unknown key(s) ['distil'] (did you mean 'distill'?)"),
    (lambda text: text.replace("root: ../shared/datasets/cifar10", "root: no/such/folder", 1),
     "no/such/folder does not exist: expected an ImageFolder tree there"),
])
def test_a_user_error_under_make_run_is_one_line_and_writes_nothing(tmp_path, capsys, edit, said):
    """`make run` (pipeline.flow) checks params.yaml and the data folder before Prefect, DVC or
    MLflow start: one line, exit 1, no file written in the project (no dvc.lock, no mlflow.db)."""
    text = (ROOT / "params.yaml").read_text()
    assert edit(text) != text
    (tmp_path / "params.yaml").write_text(edit(text))
    with pytest.raises(SystemExit) as exit_:
        main(["--project-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(err) == 1 and said in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
