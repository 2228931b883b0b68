"""The best held-out robust checkpoint beside the last (services/training.py BestKeeper; issue 24,
item 3): written when the held-out PGD accuracy improves, kept when it drops, the same run's best
kept over a kill and a resume (also when the kill fell between the last checkpoint's write and the
best's), a best of another run dropped; ``best`` with the monitor off fails with one line."""

import pytest
import torch
import yaml

from robustkd.data import ImageSet
from robustkd.errors import InputError
from robustkd.methods import create_objective
from robustkd.engine import OptimConfig
from robustkd.checkpoints import load_checkpoint
from robustkd.models import create_model
from services.params import Params, load_params
from services.training import BestKeeper, best_path, run_training

from .stage_fixtures import ROOT

KEY = "heldout_pgd2"


def images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 4, list("abcd"))


def model(seed=1):
    torch.manual_seed(seed)
    return create_model("resnet10", num_classes=4, width=4)


def weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same(state, m):
    return all(torch.equal(state[k], v) for k, v in m.state_dict().items())


def test_written_when_it_improves_kept_when_it_drops(tmp_path):
    m = model()
    path, store = tmp_path / "models" / "student_best.pt", tmp_path / "ckpt" / "best.pt"
    keeper = BestKeeper(m, path, store, KEY, "fp-1", {"method": "trades"}, log=lambda *_: None)
    keeper(1, {"epoch": 1, KEY: 10.0})
    first = weights(m)
    assert path.is_file() and store.is_file()
    assert load_checkpoint(path).checkpoint_meta["best_epoch"] == 1
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    keeper(2, {"epoch": 2, KEY: 25.0})   # better: the file holds epoch 2's weights now
    second = weights(m)
    loaded = load_checkpoint(path)
    assert loaded.checkpoint_meta["best_epoch"] == 2 and loaded.checkpoint_meta["best_heldout_pgd"] == 25.0
    assert same(second, loaded) and not same(first, loaded)
    before = path.read_bytes()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    keeper(3, {"epoch": 3, KEY: 20.0})   # worse: not overwritten
    keeper(4, {"epoch": 4, KEY: 25.0})   # a tie keeps the earlier epoch (IAD, AdaAD: strict >)
    assert path.read_bytes() == before
    assert same(second, load_checkpoint(path))
    assert load_checkpoint(path).checkpoint_meta["method"] == "trades"   # the last checkpoint's format


class Kill(RuntimeError):
    pass


def killer(at_epoch):
    """An epoch callback that stops the run once, after ``at_epoch``'s checkpoint and history were
    written but before the best keeper ran (it comes after the extra callbacks)."""
    done = []

    def callback(epoch, metrics):
        if epoch == at_epoch and not done:
            done.append(epoch)
            raise Kill(f"killed after epoch {epoch}")
    return callback


def train(tmp_path, epochs=3, callbacks=(), seed=0, monitor_steps=2):
    params = Params()
    params.run.seed = seed
    m = model()
    history = run_training(m, create_objective("pgd_at", {"steps": 1}),
                           OptimConfig(epochs=epochs, batch_size=16, lr=0.05, schedule="cosine"), params,
                           images(32, 0), images(16, 7), torch.device("cpu"), tmp_path / "checkpoints" / "student",
                           tmp_path / "metrics" / "student_history.csv", tmp_path / "metrics" / "student_train.json",
                           monitor_steps=monitor_steps, extra_callbacks=list(callbacks),
                           best_file=tmp_path / "models" / "student_best.pt", best_meta={"method": "pgd_at"})
    return m, history


def best_of(history):
    """The first epoch of the highest held-out PGD accuracy (1-based)."""
    accuracies = [row[KEY] for row in history]
    return accuracies.index(max(accuracies)) + 1, max(accuracies)


def check_best(tmp_path, last_model, history):
    epoch, accuracy = best_of(history)
    best = load_checkpoint(tmp_path / "models" / "student_best.pt")
    assert best.checkpoint_meta["best_epoch"] == epoch and best.checkpoint_meta["best_heldout_pgd"] == accuracy
    if epoch == len(history):   # the best is the last epoch: the same weights
        assert same(weights(last_model), best)
    metrics = yaml.safe_load((tmp_path / "metrics" / "student_train.json").read_text())
    assert metrics["best_epoch"] == epoch and metrics["best_heldout_pgd"] == accuracy
    info = yaml.safe_load((tmp_path / "metrics" / "student_info.json").read_text())
    assert info["best_checkpoint"]["best_epoch"] == epoch
    return best


def test_a_training_run_keeps_its_best_beside_the_last(tmp_path):
    m, history = train(tmp_path)
    assert len(history) == 3 and all(KEY in row for row in history)
    check_best(tmp_path, m, history)
    assert (tmp_path / "checkpoints" / "student" / "best.pt").is_file()


def test_the_best_survives_a_kill_and_a_resume(tmp_path):
    with pytest.raises(Kill):   # epoch 1 was the best so far (the first); killed during epoch 2's callbacks
        train(tmp_path, callbacks=[killer(2)])
    stored = load_checkpoint(tmp_path / "checkpoints" / "student" / "best.pt")
    assert stored.checkpoint_meta["best_epoch"] == 1
    (tmp_path / "models" / "student_best.pt").unlink()   # dvc repro removes a stage's outputs before it reruns
    m, history = train(tmp_path)
    assert len(history) == 3
    best = check_best(tmp_path, m, history)
    if best.checkpoint_meta["best_epoch"] == 1:   # the weights of epoch 1, from before the kill
        assert same(weights(stored), best)


def test_a_kill_between_the_last_and_the_best_write(tmp_path):
    with pytest.raises(Kill):   # epoch 1's state.pt and history written, its best never
        train(tmp_path, callbacks=[killer(1)])
    assert not (tmp_path / "checkpoints" / "student" / "best.pt").exists()
    m, history = train(tmp_path)
    check_best(tmp_path, m, history)


def test_a_resume_with_other_monitor_steps_chooses_again(tmp_path):
    """The monitor's PGD steps are not in the resume fingerprint: a best chosen by PGD-2 is not
    compared with PGD-3 accuracies; the best is chosen again among the epochs that report PGD-3."""
    with pytest.raises(Kill):
        train(tmp_path, callbacks=[killer(2)])   # epochs 1-2 monitored with 2 steps
    m, history = train(tmp_path, monitor_steps=3)
    best = load_checkpoint(tmp_path / "models" / "student_best.pt")
    assert best.checkpoint_meta["best_metric"] == "heldout_pgd3" and best.checkpoint_meta["best_epoch"] == 3
    assert same(weights(m), best)


def test_a_best_of_another_run_is_dropped(tmp_path):
    train(tmp_path, epochs=1, seed=5)
    other = load_checkpoint(tmp_path / "models" / "student_best.pt").checkpoint_meta["fingerprint"]
    m, history = train(tmp_path, epochs=2)   # another seed: a fresh run, whose best is its own
    best = check_best(tmp_path, m, history)
    assert best.checkpoint_meta["fingerprint"] != other


def test_best_path():
    assert str(best_path(ROOT / "models" / "student.pt")).endswith("models/student_best.pt")


@pytest.mark.parametrize("key, heldout, steps", [("distill", 0, 10), ("distill", 20, 0), ("teacher", 0, 10)])
def test_best_with_the_monitor_off_fails_with_one_line(tmp_path, key, heldout, steps):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["heldout_per_class"] = heldout
    raw[key]["monitor_pgd_steps"] = steps
    raw[key]["select"] = "best"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(InputError) as exc:
        load_params(path)
    message = str(exc.value)
    assert "\n" not in message and f"{key}.select" in message and "monitor" in message, message
    raw[key]["select"] = "last"   # the default runs with the monitor off
    path.write_text(yaml.safe_dump(raw))
    load_params(path)


def test_a_stage_refuses_best_without_a_monitor(tmp_path, capsys):
    from stages import distill

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["heldout_per_class"] = 0
    raw["distill"]["select"] = "best"
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exc:
        distill.run(["--params", str(path)])
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "distill.select" in lines[0] and "data.heldout_per_class 0" in lines[0], lines


def write_results(model_path, out_path, attacks, outcomes):
    """What the evaluate stage writes for one model (numbers, info, per-image outcomes)."""
    import numpy as np

    from services.common import save_arrays, write_json
    from services.results import info_path, per_image_path

    write_json({a: 100.0 * float(np.mean(outcomes[a])) for a in attacks}, out_path)
    write_json({"model": str(model_path)}, info_path(out_path))
    save_arrays(per_image_path(out_path), index=np.arange(8), label=np.arange(8) % 4,
                **{a: np.asarray(outcomes[a], np.uint8) for a in attacks})
    return False


def test_the_evaluation_and_the_report_of_best_and_last(tmp_path):
    """Best weights other than the last: evaluated on their own, the info says which epoch, the report
    section gives both rows, labelled, and the exact McNemar test on the paired outcomes."""
    import json

    from robustkd.checkpoints import save_checkpoint
    from services.best_last import best_last_markdown, evaluate_best

    models, out = tmp_path / "models", tmp_path / "metrics" / "evaluate"
    save_checkpoint(model(1), models / "student.pt", epochs=3)
    save_checkpoint(model(2), models / "student_best.pt", best_epoch=1, best_heldout_pgd=40.0,
                    best_metric="heldout_pgd10", selection="best held-out robust accuracy")
    last = {"natural": [1, 1, 1, 1, 0, 0, 0, 0], "pgd20": [1, 0, 0, 0, 0, 0, 0, 0]}
    best = {"natural": [1, 1, 1, 0, 0, 0, 0, 0], "pgd20": [1, 1, 1, 1, 1, 0, 0, 0]}
    write_results(models / "student.pt", out / "student.json", ["natural", "pgd20"], last)
    ran = []

    def evaluate(path, out_path, attacks):
        ran.append(path.name)
        return write_results(path, out_path, attacks, best)

    assert evaluate_best(["student"], models, out, lambda name: ["natural", "pgd20"], evaluate) == []
    assert ran == ["student_best.pt"]
    record = json.loads((out / "student_best_info.json").read_text())["best_checkpoint"]
    assert record["best_epoch"] == 1 and record["last_epoch"] == 3 and record["same_weights_as_last"] is False
    md = best_last_markdown(out, ["student"])
    assert "| student (last) | 3 | 50.00" in md and "| student (best) | 1 | 37.50" in md
    assert "| student | PGD-20 | 8 | 0 | 4 | 0.125 |" in md   # 4 discordant pairs, all for the best: p = 2/16
    assert "| student | Natural | 8 | 1 | 0 | 1 |" in md
    assert best_last_markdown(out, ["teacher"]) == ""   # nothing evaluated: no section


@pytest.mark.parametrize("select", ["last", "best"])
def test_the_registry_takes_the_checkpoint_distill_select_names(tmp_path, select):
    import json

    from pipeline import registry

    from .test_serving import tiny_onnx

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["distill"]["select"] = select
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "models").mkdir()
    tiny_onnx(tmp_path / "models" / "student.onnx")
    for name, aa in (("student", 20.0), ("student_best", 30.0)):
        path = tmp_path / "metrics" / "evaluate" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"natural": 50.0, "autoattack": aa, "num_images": 100}))
    metrics, tags = registry.workspace_metadata(tmp_path)
    assert tags["checkpoint"] == select and metrics["autoattack"] == (30.0 if select == "best" else 20.0)
    assert f"checkpoint: {select}" in registry.version_description(metrics, tags)


def test_best_and_last_rows_put_every_column_on_the_images_every_attack_ran_on():
    """Natural and PGD-20 on 6 images, AutoAttack and the worst case on 3 of them: the row's cells
    are all on those 3 (a worst case beside a column of other images would read as masking)."""
    import numpy as np

    from services.best_last import on_shared_images

    per_image = {"index": np.array([10, 11, 12, 13, 14, 15]), "natural": np.array([1, 1, 1, 1, 0, 0]),
                 "pgd20": np.array([1, 0, 1, 0, 0, 0]), "autoattack": np.array([0, 1, 0]),
                 "autoattack_index": np.array([10, 12, 14]), "worst_case": np.array([0, 1, 0]),
                 "worst_case_index": np.array([10, 12, 14])}
    got = on_shared_images(per_image, ["natural", "pgd20", "autoattack", "worst_case"])
    assert {c: v.tolist() for c, v in got.items()} == {"natural": [1, 1, 0], "pgd20": [1, 1, 0],
                                                      "autoattack": [0, 1, 0], "worst_case": [0, 1, 0]}
    assert all(got["worst_case"].sum() <= v.sum() for v in got.values())
