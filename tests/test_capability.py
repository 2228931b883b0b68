"""The capability probe (robustkd.capability): a setting that kills its process is caught in a
child, named in one line (explicit setting) or skipped with a note (``auto``); the parent lives.

The crash is injected through ROBUSTKD_PROBE_FAULT: the probe's child kills itself with SIGILL,
as oneDNN's bf16 convolution does on a VM that hides AMX from the guest."""

import pytest
import torch

from robustkd import capability
from robustkd.capability import FAULT_ENV, probe, resolve_fast_path
from robustkd.data import ImageSet, TrainBatches
from robustkd.engine import OptimConfig, RunConfig, Trainer
from robustkd.errors import InputError
from robustkd.methods import create_objective
from robustkd.models import create_model

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(capability.CACHE_ENV, str(tmp_path / "probes.json"))
    capability.clear_cache()
    yield
    capability.clear_cache()


def test_a_setting_that_kills_its_process_is_named_in_one_line(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "bf16=SIGILL")
    result = probe("bf16", CPU)
    assert not result.ok and result.cause == "killed by SIGILL"
    with pytest.raises(InputError) as err:
        resolve_fast_path(CPU, precision="bf16", channels_last=False, compile=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("run.precision: bf16 is not usable on cpu") and "SIGILL" in message


def test_auto_falls_back_and_says_so(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "bf16=SIGILL,compile=error")
    path = resolve_fast_path(CPU, "auto", "auto", "auto", fast_default=True)   # as on a GPU
    assert (path.bf16, path.channels_last, path.compile) == (False, True, False)
    assert any("run.precision: auto" in n and "SIGILL" in n and "using fp32" in n for n in path.notes)
    assert any("run.compile: auto" in n and "RuntimeError: injected fault" in n for n in path.notes)


def test_probe_passes_and_is_cached_per_process(monkeypatch):
    first = probe("channels_last", CPU)
    assert first.ok, first.cause
    monkeypatch.setenv(FAULT_ENV, "channels_last=SIGILL")   # a new child would now die
    assert probe("channels_last", CPU) is first


def test_a_passing_probe_is_remembered_on_disk_a_failing_one_not(monkeypatch, tmp_path):
    calls = []
    real_run = capability.subprocess.run
    monkeypatch.setattr(capability.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    assert probe("channels_last", CPU).ok and len(calls) == 1
    capability.clear_cache()                                  # as a new process would start
    assert probe("channels_last", CPU).ok and len(calls) == 1  # from disk: no child
    assert (tmp_path / "probes.json").is_file()
    monkeypatch.setenv(capability.CACHE_ENV, "0")
    capability.clear_cache()
    assert probe("channels_last", CPU).ok and len(calls) == 2  # cache off: probed again


def test_auto_on_cpu_is_fp32_eager_without_probing(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "bf16=SIGILL,channels_last=SIGILL,compile=SIGILL")
    path = resolve_fast_path(CPU, "auto", "auto", "auto")
    assert (path.bf16, path.channels_last, path.compile, path.notes) == (False, False, False, [])


def test_trainer_stops_before_training_on_a_crashing_setting(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "channels_last=SIGSEGV")
    data = ImageSet(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8) % 2, ["a", "b"])
    with pytest.raises(InputError, match=r"run.channels_last: channels_last is not usable on cpu: .*SIGSEGV"):
        Trainer(create_model("resnet10_w8", num_classes=2), create_objective("natural", {}),
                TrainBatches(data, 4, CPU), OptimConfig(epochs=1, batch_size=4),
                RunConfig(device="cpu", channels_last=True))


def test_a_nonfinite_loss_names_epoch_and_batch():
    data = ImageSet(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8) % 2, ["a", "b"])
    model = create_model("resnet10_w8", num_classes=2)
    with torch.no_grad():
        model.backbone.linear.weight.fill_(float("nan"))
    trainer = Trainer(model, create_objective("natural", {}), TrainBatches(data, 4, CPU),
                      OptimConfig(epochs=1, batch_size=4), RunConfig(device="cpu"))
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at epoch 1, batch 1 of 2"):
        trainer.fit()


def test_params_name_the_replacement_of_run_bf16(tmp_path):
    import yaml

    from services.params import load_params

    raw = yaml.safe_load(open("params.yaml"))
    assert load_params("params.yaml").run.precision == "auto"
    raw["run"].pop("precision")
    raw["run"]["bf16"] = True
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match=r"run.bf16 was replaced by run.precision .*`precision: bf16`"):
        load_params(path)
    raw["run"].pop("bf16")
    raw["run"]["precision"] = "fp16"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError, match=r"run.precision: expected one of \['auto', 'fp32', 'bf16'\], found 'fp16'"):
        load_params(path)


def test_a_failed_probe_is_printed_and_recorded(monkeypatch, capsys):
    """Never a silent fallback: the failure is on stderr at once and in the run's record."""
    monkeypatch.setenv(FAULT_ENV, "compile=error")
    path = resolve_fast_path(CPU, "fp32", False, "auto", fast_default=True)   # auto, as on a GPU
    assert not path.compile
    failures = path.record()["probe_failures"]
    assert [(f["key"], f["setting"], f["device"]) for f in failures] == [("run.compile", "compile", "cpu")]
    assert "RuntimeError: injected fault" in failures[0]["cause"]
    err = capsys.readouterr().err
    assert "probe failed: run.compile: auto: compile failed its probe on cpu" in err and "injected fault" in err


def test_probes_run_in_process_where_a_child_cannot_use_the_gpu(monkeypatch):
    """Exclusive-process GPUs: the probe runs in this process (forced here by the variable that
    an exclusive compute mode sets in effect); its answer and its failures are the same."""
    calls = []
    real_run = capability.subprocess.run
    monkeypatch.setattr(capability.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    monkeypatch.setenv(capability.IN_PROCESS_ENV, "1")
    monkeypatch.setenv(capability.CACHE_ENV, "0")
    assert probe("channels_last", CPU).ok and calls == []          # no child
    monkeypatch.setenv(FAULT_ENV, "bf16=SIGILL")                    # in process: an error, not a kill
    result = probe("bf16", CPU)
    assert not result.ok and result.cause.startswith("in process: RuntimeError: injected fault")
    assert not capability.exclusive_compute(CPU)


def test_the_compile_probe_runs_the_training_steps_pattern(monkeypatch):
    """An attack step (eval, frozen parameters, input gradient) and a loss step (train, weight
    gradients) on the compiled net, in this process so that the calls can be watched."""
    seen = []
    real_compile = torch.compile

    def watching_compile(model, **kw):
        model.register_forward_pre_hook(lambda m, _i: seen.append(
            (m.training, any(p.requires_grad for p in m.parameters()))))
        return real_compile(model, **{**kw, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", watching_compile)
    capability._probe_body("compile", "cpu", "default")
    assert seen == [(False, False), (True, True)] * 3
