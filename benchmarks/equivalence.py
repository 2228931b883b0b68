"""Does bf16 autocast change what DARWIN learns? fp32 against bf16 autocast (losses in float32),
side by side on small models, with the seed-to-seed spread of fp32 itself as the yardstick.

    python -m benchmarks.equivalence                  # CPU: a few minutes on 2 cores
    python -m benchmarks.equivalence --device cuda    # the same on a GPU (add --paper for the models)

Three measurements, each over several seeds:
1. DARWIN's loss on one batch (the same weights, data and attack random start) in fp32 and in
   bf16: the relative difference, against the loss's change between two attack random starts.
2. The direction of the student's gradient: cosine similarity between the fp32 and bf16
   gradients, against the cosine between the fp32 gradients of two attack random starts.
3. A short DARWIN training run per seed and precision (the project's Trainer, so the bf16 run
   goes through the capability probe): natural and PGD-10 accuracy of the student in fp32 on
   held-out test images. bf16 agrees when its mean lies within the fp32 seeds' spread.

The teacher is a ResNet-10 trained naturally for a few epochs on the same subset (the comparison
is between two numerics of one method, not about the method's accuracy). If bf16 autocast is not
usable on the device, the capability probe says so and the script reports it as its finding.
Writes ``benchmarks/equivalence-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_subsets(train_per_class: int, test_per_class: int):
    import torch

    from robustkd.data import ImageSet, load_image_folder

    root = ROOT.parent / "shared/datasets/cifar10"
    if (root / "train").is_dir():
        return (load_image_folder(root / "train", per_class=train_per_class),
                load_image_folder(root / "test", per_class=test_per_class), "CIFAR-10 (first k per class)")
    g = torch.Generator().manual_seed(0)   # no data: random images, a weaker comparison
    make = lambda n: ImageSet(torch.randint(0, 256, (n * 10, 3, 32, 32), dtype=torch.uint8, generator=g),  # noqa: E731
                              torch.arange(n * 10) % 10, [str(i) for i in range(10)])
    return make(train_per_class), make(test_per_class), "random images (CIFAR-10 not found)"


def train(model, method: str, settings: dict, train_set, device, precision: str, seed: int, epochs: int,
          teacher=None, lr: float = 0.05, batch: int = 128):
    from robustkd.data import TrainBatches
    from robustkd.engine import OptimConfig, RunConfig, Trainer
    from robustkd.methods import create_objective

    objective = create_objective(method, settings)
    batches = TrainBatches(train_set, batch, device, with_partners=objective.needs_partners, **objective.partner_options)
    trainer = Trainer(model, objective, batches,
                      OptimConfig(epochs=epochs, batch_size=batch, lr=lr, schedule="cosine"),
                      RunConfig(seed=seed, device=str(device), precision=precision, progress_every_s=1e9),
                      teacher=teacher, log=lambda *_: None)
    history = trainer.fit()
    return history, trainer.fast


def accuracy(model, test_set, device, pgd_steps: int) -> tuple[float, float]:
    from robustkd.data import to_float
    from robustkd.evaluation import EvalConfig, run_attack

    x, y = to_float(test_set.images), test_set.labels
    cfg = EvalConfig(attacks=["natural", "pgd20"], pgd_steps=pgd_steps, batch_size=250, checks=False)
    nat = run_attack(model, x, y, "natural", cfg, device).float().mean().item() * 100
    rob = run_attack(model, x, y, "pgd20", cfg, device).float().mean().item() * 100
    return nat, rob


def loss_and_grad(student, teacher, batch, cfg, device, bf16: bool, attack_seed: int):
    import torch

    from robustkd.methods.darwin import darwin_loss
    from robustkd.utils import autocast, make_generator

    student.zero_grad(set_to_none=True)
    student.train()
    loss, _ = darwin_loss(student, teacher, batch.x, batch.y, batch.x_pair, batch.y_pair, cfg,
                          generator=make_generator(attack_seed, device), autocast=lambda: autocast(device, bf16))
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    return loss.item(), grad.clone()


def cosine(a, b) -> float:
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()


def spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (min {min(values):.2f}, max {max(values):.2f})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="DARWIN's attack steps n")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--paper", action="store_true", help="ResNet-18 student, WRN-34-10 teacher (GPUs)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)

    import torch

    from robustkd.capability import device_name, probe
    from robustkd.data import TrainBatches
    from robustkd.methods import create_objective
    from robustkd.models import create_model
    from robustkd.utils import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    out_path = Path(args.out or f"benchmarks/equivalence-{device.type}.json")
    where = device_name(device)
    report = {"device": where, "torch": torch.__version__, "settings": vars(args)}
    started = time.perf_counter()
    check = probe("bf16", device)
    report["bf16_probe"] = {"ok": check.ok, "cause": check.cause}
    if not check.ok:
        print(f"bf16 autocast is not usable on {where}: its capability probe was {check.cause}. "
              "No comparison is possible here; fp32 stays the only precision on this device.")
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        return
    student_arch, teacher_arch = ("resnet18", "wrn34_10") if args.paper else ("resnet10_w8", "resnet10_w16")
    train_set, test_set, data_kind = load_subsets(args.train_per_class, args.test_per_class)
    print(f"fp32 against bf16 autocast on {where}, torch {torch.__version__}: {student_arch} student, "
          f"{teacher_arch} teacher, {data_kind}: {len(train_set.labels)} training and {len(test_set.labels)} "
          f"test images; DARWIN n = {args.steps}, batch {args.batch}, {args.epochs} epochs; {args.seeds} seeds", flush=True)

    torch.manual_seed(1234)
    teacher = create_model(teacher_arch, num_classes=10)
    train(teacher, "natural", {}, train_set, device, "fp32", seed=1234, epochs=args.teacher_epochs, lr=0.1,
          batch=args.batch)
    teacher.eval()
    t_nat, t_rob = accuracy(teacher, test_set, device, args.pgd_steps)
    print(f"teacher: natural {t_nat:.1f} %, PGD-{args.pgd_steps} {t_rob:.1f} %", flush=True)
    report["teacher"] = {"natural": t_nat, "pgd": t_rob}

    # 1-2: loss and gradient direction on one batch per seed
    cfg = create_objective("darwin", {"steps": args.steps}).config
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        student = create_model(student_arch, num_classes=10).to(device)
        batch = next(iter(TrainBatches(train_set, args.batch, device, with_partners=True).epoch(seed, 0)))
        l32, g32 = loss_and_grad(student, teacher, batch, cfg, device, False, attack_seed=seed)
        l16, g16 = loss_and_grad(student, teacher, batch, cfg, device, True, attack_seed=seed)
        l32b, g32b = loss_and_grad(student, teacher, batch, cfg, device, False, attack_seed=seed + 1000)
        rows.append({"seed": seed, "loss_fp32": l32, "loss_bf16": l16,
                     "loss_rel_diff_bf16": abs(l16 - l32) / abs(l32),
                     "loss_rel_diff_other_start": abs(l32b - l32) / abs(l32),
                     "grad_cos_fp32_bf16": cosine(g32, g16), "grad_cos_fp32_other_start": cosine(g32, g32b)})
        r = rows[-1]
        print(f"seed {seed}: loss fp32 {l32:.5f}, bf16 {l16:.5f} (rel. diff {r['loss_rel_diff_bf16']:.2e}; "
              f"another attack start: {r['loss_rel_diff_other_start']:.2e}); gradient cosine fp32-bf16 "
              f"{r['grad_cos_fp32_bf16']:.4f} (fp32, another attack start: {r['grad_cos_fp32_other_start']:.4f})",
              flush=True)
    report["loss_and_gradient"] = rows

    # 3: short training runs
    runs = {"fp32": [], "bf16": []}
    for seed in range(args.seeds):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(seed)
            student = create_model(student_arch, num_classes=10)
            t0 = time.perf_counter()
            history, fast = train(student, "darwin", {"steps": args.steps}, train_set, device, precision,
                                  seed=seed, epochs=args.epochs, teacher=teacher, batch=args.batch)
            nat, rob = accuracy(student, test_set, device, args.pgd_steps)
            runs[precision].append({"seed": seed, "natural": nat, "pgd": rob, "final_loss": history[-1]["loss"],
                                    "fast_path": fast.describe(), "train_s": time.perf_counter() - t0})
            print(f"seed {seed} {precision}: natural {nat:.1f} %, PGD-{args.pgd_steps} {rob:.1f} %, "
                  f"last-epoch loss {history[-1]['loss']:.4f} ({fast.describe()}, "
                  f"{time.perf_counter() - t0:.0f} s)", flush=True)
    report["training"] = runs
    summary = {}
    for key in ("natural", "pgd", "final_loss"):
        a = [r[key] for r in runs["fp32"]]
        b = [r[key] for r in runs["bf16"]]
        summary[key] = {"fp32": spread(a), "bf16": spread(b),
                        "mean_difference": statistics.mean(b) - statistics.mean(a),
                        "fp32_seed_sd": statistics.stdev(a) if len(a) > 1 else None}
    report["summary"] = summary
    report["minutes"] = (time.perf_counter() - started) / 60
    print()
    print("| measure | fp32 | bf16 autocast | bf16 - fp32 (means) |")
    print("|---|---|---|---|")
    names = {"natural": "natural accuracy %", "pgd": f"PGD-{args.pgd_steps} accuracy %",
             "final_loss": "last-epoch loss"}
    for key, s in summary.items():
        print(f"| {names[key]} | {s['fp32']} | {s['bf16']} | {s['mean_difference']:+.2f} |")
    lg = rows
    print(f"| loss on one batch, rel. diff | fp32 vs another attack start: "
          f"{statistics.mean(r['loss_rel_diff_other_start'] for r in lg):.2e} | "
          f"fp32 vs bf16: {statistics.mean(r['loss_rel_diff_bf16'] for r in lg):.2e} | |")
    print(f"| gradient cosine | fp32 vs another attack start: "
          f"{statistics.mean(r['grad_cos_fp32_other_start'] for r in lg):.4f} | "
          f"fp32 vs bf16: {statistics.mean(r['grad_cos_fp32_bf16'] for r in lg):.4f} | |")
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out_path} ({report['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
