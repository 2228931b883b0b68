"""Typed parameters of the pipeline, built from ``params.yaml`` (unknown keys rejected).

Every stage reads the whole file through :func:`load_params`, so a typo anywhere fails
before any work starts, with the file and key named.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from robustkd.config import from_dict
from robustkd.engine import OptimConfig
from robustkd.errors import InputError
from robustkd.evaluation import PROTOCOLS, EvalConfig, apply_protocol, protocol_conflicts
from robustkd.methods import DISTILL_METHODS, TEACHER_METHODS, build_config, get_method


@dataclass
class DataParams:
    """Where the images come from and how much of them the profile uses."""

    source: Literal["imagefolder", "cifar10", "cifar100"] = "imagefolder"
    # ImageFolder root; for cifar10/cifar100 the python archive (cifar-10-python.tar.gz,
    # cifar-100-python.tar.gz), its extracted folder, or a folder holding either (the download dir)
    root: str = "../shared/datasets/cifar10"
    download: bool = True                      # torchvision sources: download where a network exists
    train_per_class: int | None = None         # first k training images of each class (None: all)
    heldout_per_class: int = 0                 # the next k of each class, for per-epoch monitoring
    test_per_class: int | None = None          # first k test images of each class kept (None: all)


@dataclass
class ModelParams:
    arch: str = "resnet18"
    options: dict = field(default_factory=dict)   # builder keywords, e.g. {width: 16}


@dataclass
class ZooParams:
    """A released teacher of robustkd.teachers.ZOO, read from the RobustBench model-zoo layout
    ``{dir}/{dataset}/Linf/{name}.pt``. dvc.yaml declares ``dir`` as a dependency of train_teacher."""

    name: str = "Zhang2019Theoretically"   # the TRADES WRN-34-10 release (CIFAR-10)
    dir: str = "teachers/zoo"
    download: bool = True                  # fetch a missing file where a network exists


@dataclass
class TeacherParams:
    # train: TRADES/PGD-AT here; checkpoint: a given file (a robustkd checkpoint, or the TRADES
    # release model_cifar_wrn.pt); zoo: a released teacher of the registry (teacher.zoo).
    source: Literal["train", "checkpoint", "zoo"] = "train"
    # With source: checkpoint, the given teacher file. dvc.yaml declares it as a dependency of
    # train_teacher, so it always names an existing path: teachers/ (tracked, holds a README)
    # when the teacher is trained.
    checkpoint: str = "teachers"
    zoo: ZooParams = field(default_factory=ZooParams)
    model: ModelParams = field(default_factory=lambda: ModelParams("wrn34_10"))
    method: str = "trades"                 # a teacher method of robustkd.methods
    settings: dict = field(default_factory=dict)   # the method's settings (robustkd.methods)
    optim: OptimConfig = field(default_factory=OptimConfig)
    monitor_pgd_steps: int = 10            # PGD steps of the per-epoch held-out check
    # Which teacher checkpoint the student distils from: last (models/teacher.pt) or best
    # (models/teacher_best.pt, the best held-out PGD accuracy: services/training.py BestKeeper).
    # last [choice]: TRADES' official code distils nothing and keeps per-epoch files; best needs the monitor.
    select: Literal["last", "best"] = "last"
    # With source: train and a ViT teacher (vit_b_4, deit_s_4), a local ImageNet 224/16 weights file
    # (timm key names; .pth/.bin/.safetensors) adapted to 32 x 32 / 4 x 4 patches (robustkd/checkpoints.py);
    # empty: from scratch. The run records which (metrics/teacher_info.json "init", MLflow params).
    pretrained: str = ""


@dataclass
class DiffusersParams:
    model_dir: str = ""                    # a local diffusers DDPM pipeline directory
    scheduler: Literal["ddpm", "ddim"] = "ddim"
    inference_steps: int = 50
    batch_size: int = 64


@dataclass
class DdpmParams:
    """Generated data: the public .npz format, a local diffusers DDPM, or none."""

    source: Literal["none", "npz", "diffusers"] = "none"
    files: list[str] = field(default_factory=list)
    num_images: int = 0                    # subsample to this many (0: keep all)
    relabel: bool = False                  # label with the teacher even when labels exist
    fraction: float = 0.0                  # share of generated images in each distillation batch
    drop_test_duplicates: bool = True      # drop generated images identical to a test image
    max_class_imbalance: float = 0.0       # fail if max/min class count exceeds this (0: report only)
    diffusers: DiffusersParams = field(default_factory=DiffusersParams)


@dataclass
class DistillParams:
    method: str = "darwin"                 # a student method of robustkd.methods (registry)
    student: ModelParams = field(default_factory=lambda: ModelParams("resnet18"))
    settings: dict = field(default_factory=dict)   # per method: {darwin: {...}, rslad: {...}}
    optim: OptimConfig = field(default_factory=OptimConfig)
    # How each method's optimiser is set: 'shared' - distill.optim for every method;
    # 'official' - the method's official recipe for the dataset (robustkd.methods, each
    # module's Schedule), with epochs and milestones rescaled to ``official_epochs`` when set.
    # ``method_optim.<method>`` then overrides single fields for that method.
    schedule: Literal["shared", "official"] = "shared"
    official_epochs: int | None = None
    method_optim: dict = field(default_factory=dict)
    monitor_pgd_steps: int = 10            # PGD steps of the per-epoch held-out check
    # The student exported and registered: last (models/student.pt) or best (models/student_best.pt,
    # the best held-out PGD accuracy; both are kept and evaluated, services/training.py BestKeeper).
    # last [choice]: IAD's and AdaAD's official code select the best on the *test* set
    # (ZFancy/IAD IAD-I.py L251-259, boyellow/AdaAD main.py L479-493); best needs the monitor.
    select: Literal["last", "best"] = "last"
    reference_method: str = "natural_kd"   # the same student trained without adversarial examples


@dataclass
class EvaluateParams:
    # A named evaluation protocol (robustkd.evaluation.PROTOCOLS: project | rslad | ard | iad |
    # autoattack): "project" (default) is evaluate.config as written; another name sets the attack
    # keys its paper's code uses (eps, PGD steps/step/start, CW steps/step/kappa, AutoAttack version),
    # so that "evaluated under RSLAD's protocol" means exactly that. How explicit keys interact: a key
    # the protocol sets may be left at the project's value (it is replaced, and the stage says so) or
    # set to the protocol's; any other value contradicts it and stops the first stage with one line.
    # Keys a protocol does not set (batch size, the attacks run, the checks, AutoAttack's custom
    # list) keep evaluate.config's values; the image counts stay evaluate.per_class and friends.
    protocol: str = "project"
    per_class: int | None = None           # the stratified subset "first k per class" (None: all)
    # AutoAttack (the expensive attack) on the first k per class of that subset (None: all of it)
    autoattack_per_class: int | None = None
    max_images: int | None = None          # at most the first N images of that subset (smoke runs; None: all)
    reference_attacks: list[str] = field(default_factory=lambda: ["natural", "pgd20"])
    # torch.compile the evaluated model; auto: on CUDA devices whose capability probe passes, eager
    # elsewhere. Only the natural forward runs compiled: every attack (PGD, CW, AutoAttack) and every
    # check runs on the eager module, so a compiled model gets its eager copy's verdict (issue 24);
    # the info file lists what ran compiled (compiled_parts). Evaluation runs in fp32 with TF32 off
    # (robustkd.evaluation.fp32_matmuls: a reduced precision can mask gradients).
    compile: bool | Literal["auto"] = "auto"
    # one progress line per attack and batch on stderr (AutoAttack's attacks and the masking checks
    # included), with images/s and the ETA; false: quiet [choice]
    progress: bool = True
    # The models whose best held-out checkpoint (models/<name>_best.pt) is evaluated too, beside the
    # last: metrics/evaluate/<name>_best.json. [student] [choice]; dvc.yaml declares these outputs.
    best_checkpoints: list[str] = field(default_factory=lambda: ["student"])
    config: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        """The protocol applied to ``config`` (keys it replaced in ``protocol_replaced``); an unknown
        name or a contradicting key is left for services.param_checks to report with the file."""
        self.protocol_replaced: list[str] = []
        self.protocol_conflicts = protocol_conflicts(self.config, self.protocol)
        if self.protocol in PROTOCOLS and not self.protocol_conflicts:
            before = self.config
            self.config = apply_protocol(before, self.protocol)
            self.protocol_replaced = [k for k in PROTOCOLS[self.protocol].settings
                                      if getattr(before, k) != getattr(self.config, k)]


@dataclass
class ExportAttackParams:
    """The exported ONNX file attacked (services/onnx_attack.py, docs/pipeline.md "The deployed file
    attacked"): Square (gradient-free, L-inf, evaluate.config.eps) on the onnxruntime session, and
    the evaluation's PGD-20 crafted on the PyTorch student and classified by the session."""

    # Square's query budget per image, one restart (AutoAttack's standard Square: 5000). 1000 [choice]:
    # at most 12 s on the CPU profile's 100 images (2 idle cores; 46 s shared), even if none is ever
    # fooled (docs/pipeline.md#the-deployed-file-attacked); 0: no attack on the file
    square_queries: int = 1000
    # images: the first k (at most) of each class of the headline images (evaluate's AutoAttack
    # subset, services.results.headline_indices); null: all of them. 10 [choice]: the CPU profile's 100
    per_class: int | None = 10
    # registry: a version whose ONNX Square accuracy lies below the lower end of the 95% Wilson
    # interval of its PyTorch PGD-20 accuracy on the same images is not promoted [choice]
    block_promotion: bool = True


@dataclass
class ExportParams:
    opset: int = 18
    per_class: int | None = None           # parity on the first k test images of each class (None: all)
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 256])
    latency_repeats: int = 20
    parity_atol: float = 1e-4              # max |logit difference| accepted between torch and ORT
    attack: ExportAttackParams = field(default_factory=ExportAttackParams)


@dataclass
class RunParams:
    seed: int = 0
    device: str = "auto"                   # auto: CUDA when present
    # The fast path (robustkd.capability, docs/performance.md#the-fast-path): 'auto' turns bf16 autocast,
    # channels_last and the compiled student on for CUDA devices whose capability probe passes and
    # leaves them off elsewhere; explicit values are probed too (a failing probe stops the stage
    # with one line naming the setting, the device and the cause).
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # bf16: autocast, the losses in float32
    channels_last: bool | Literal["auto"] = "auto"
    threads: int = 0                       # torch CPU threads (0: torch's default)
    compile: bool | Literal["auto"] = "auto"   # torch.compile the trained model
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    # Distributed (torchrun): train_teacher, distill and evaluate are launched with
    # `torchrun --nproc_per_node` when nproc_per_node > 1 (stages/launch.py).
    nproc_per_node: int = 1                # processes per machine (GPUs per machine on GPU nodes)
    nnodes: int = 1                        # machines; > 1 needs rdzv_endpoint, reachable from all
    rdzv_endpoint: str = ""                # host:port of the rendezvous (c10d), e.g. node0:29400
    rdzv_id: str = "robustkd"              # the job's rendezvous id (same on every machine)
    backend: Literal["auto", "nccl", "gloo"] = "auto"   # auto: NCCL on GPUs, gloo on CPUs
    sync_bn: bool = False                  # SyncBatchNorm across ranks (GPU only) instead of per-rank BN

    def __post_init__(self):
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise InputError(f"run.nproc_per_node and run.nnodes must be >= 1, found "
                             f"{self.nproc_per_node} and {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise InputError(f"run.nnodes is {self.nnodes} but run.rdzv_endpoint is empty: set it to "
                             "host:port of a machine every node reaches")


@dataclass
class CompareParams:
    methods: list[str] = field(default_factory=lambda: ["darwin", "rslad", "ard"])
    schedule: Literal["shared", "official"] = "official"   # how each compared method's optimiser is set
    seeds: list[int] = field(default_factory=lambda: [0])  # each method trained and evaluated once per seed


@dataclass
class AblationParams:
    """The slides' DARWIN ablations (ablation/dvc.yaml, `make ablation`): one distill + evaluate per
    variant of robustkd.methods.darwin.ABLATIONS and seed, each variant a named override of
    ``distill.settings.darwin`` (modules and weighting), then reports/ablation.md."""

    variants: list[str] = field(default_factory=lambda: ["arkd", "arkd_iakd", "arkd_dbkd", "full",
                                                         "uniform", "gamma0", "gamma1"])
    schedule: Literal["shared", "official"] = "official"   # how the variants' optimiser is set
    seeds: list[int] = field(default_factory=lambda: [0])


@dataclass
class RegistryParams:
    """The MLflow model registry entry of the exported ONNX student (pipeline/registry.py)."""

    model_name: str = "robustkd-student"
    natural_tolerance: float = 1.0    # percentage points of natural accuracy a new champion may lose
    # point_estimate: AutoAttack accuracy >= the champion's; significant: also an exact McNemar
    # p-value below `alpha` on the same images (the champion then moves only on evidence)
    promotion: Literal["point_estimate", "significant"] = "point_estimate"
    alpha: float = 0.05


@dataclass
class AttentionParams:
    """Grad-CAM maps of teacher, student and reference on the same clean and PGD-20 images
    (stages/attention.py; PGD settings of evaluate.config)."""

    images: int = 4                        # the first test image of each of the first k classes
    layers: dict = field(default_factory=dict)   # architecture -> module path (else robustkd.attention's default)
    backend: Literal["auto", "grad-cam", "builtin"] = "auto"   # auto: the grad-cam package when installed
    attack_model: Literal["teacher", "student", "reference"] = "student"   # whose PGD-20 images


@dataclass
class Params:
    profile: str = "custom"
    data: DataParams = field(default_factory=DataParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    ddpm: DdpmParams = field(default_factory=DdpmParams)
    distill: DistillParams = field(default_factory=DistillParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    export: ExportParams = field(default_factory=ExportParams)
    run: RunParams = field(default_factory=RunParams)
    compare: CompareParams = field(default_factory=CompareParams)
    ablation: AblationParams = field(default_factory=AblationParams)
    registry: RegistryParams = field(default_factory=RegistryParams)
    attention: AttentionParams = field(default_factory=AttentionParams)


_PARSED: dict[tuple[str, str], Params] = {}   # the last file parsed in this process, by path and text


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """The typed, validated parameters of ``path``. A process parses a file once: a second call on
    the same unchanged file (stages.launch, then the stage it starts in the same process) returns a
    copy of the first result (benchmarks/config_builds.py counts the parses of a `dvc repro`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"parameters file {path} does not exist")
    text = path.read_text()
    key = (str(path.resolve()), text)
    if key not in _PARSED:
        params = parse_params(path, text)
        _PARSED.clear()
        _PARSED[key] = params
    return copy.deepcopy(_PARSED[key])


def parse_params(path: Path, text: str) -> Params:
    """``text`` (the content of ``path``, named in messages) parsed, typed and validated."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if not raw:  # an empty file would silently mean "all defaults" (the full data set)
        raise InputError(f"{path}: the parameters file is empty; expected the sections "
                         f"{[f.name for f in dataclasses.fields(Params)]} (see params/ for complete files)")
    check_renamed(raw, str(path))
    check_evaluation_seed(raw, str(path))
    params = from_dict(Params, raw, str(path))
    from .param_checks import check_params

    validate_methods(params, str(path))
    check_params(params, str(path))
    return params


RENAMED = {("run", "bf16"): "run.bf16 was replaced by run.precision (auto | fp32 | bf16): write "
                             "`precision: bf16` for bf16: true, `precision: fp32` for bf16: false, or "
                             "`precision: auto` (bf16 on GPUs whose probe passes)"}


def check_renamed(raw, where: str) -> None:
    """Keys of older parameter files: a message saying what replaced them, not 'unknown key'."""
    if not isinstance(raw, dict):
        return
    for (section, key), message in RENAMED.items():
        block = raw.get(section)
        if isinstance(block, dict) and key in block:
            raise InputError(f"{where}: {message} (found {section}.{key}: {block[key]!r})")


def check_evaluation_seed(raw, where: str) -> None:
    """``evaluate.config.seed`` would be silently replaced: the attacks' random starts are seeded by
    ``run.seed`` (or a stage's ``--seed``), the one seed a run records."""
    evaluate = raw.get("evaluate") if isinstance(raw, dict) else None
    config = evaluate.get("config") if isinstance(evaluate, dict) else None
    if isinstance(config, dict) and "seed" in config:
        raise InputError(f"{where}: evaluate.config.seed is not read: the evaluation is seeded by run.seed "
                         f"(or the stage's --seed); remove it (found seed: {config['seed']!r})")


def validate_methods(params: Params, where: str) -> None:
    """Every method named and every method-settings block, checked against the method registry
    when the file is read: a misspelt key in any method's block stops the first stage."""
    for field_name, name, allowed in (("teacher.method", params.teacher.method, TEACHER_METHODS),
                                      ("distill.method", params.distill.method, DISTILL_METHODS),
                                      ("distill.reference_method", params.distill.reference_method,
                                       DISTILL_METHODS)):
        if name not in allowed:
            raise InputError(f"{where}: {field_name} is {name!r}; expected one of {list(allowed)}")
    for name in params.compare.methods:
        if name not in DISTILL_METHODS:
            raise InputError(f"{where}: compare.methods names {name!r}; expected methods of {list(DISTILL_METHODS)}")
    seeds = params.compare.seeds
    from robustkd.methods.darwin import ABLATIONS

    for name in params.ablation.variants:
        if name not in ABLATIONS:
            raise InputError(f"{where}: ablation.variants names {name!r}; expected DARWIN ablations of "
                             f"{list(ABLATIONS)} (robustkd/methods/darwin.py)")
    for key, values in (("compare.seeds", seeds), ("ablation.seeds", params.ablation.seeds)):
        if not values or len(set(values)) != len(values) or any(not isinstance(s, int) or s < 0 for s in values):
            raise InputError(f"{where}: {key}: expected distinct integers >= 0, found {values!r}")
    if not params.ablation.variants or len(set(params.ablation.variants)) != len(params.ablation.variants):
        raise InputError(f"{where}: ablation.variants: expected distinct names, found {params.ablation.variants!r}")
    build_config(params.teacher.method, params.teacher.settings, where=f"{where}:teacher.settings")
    for name, block in params.distill.settings.items():
        if name not in DISTILL_METHODS:
            raise InputError(f"{where}: distill.settings has a block for unknown method {name!r}; "
                             f"expected methods of {list(DISTILL_METHODS)}")
        build_config(name, block or {}, where=f"{where}:distill.settings.{name}")
    for name, block in params.distill.method_optim.items():
        if name not in DISTILL_METHODS:
            raise InputError(f"{where}: distill.method_optim has a block for unknown method {name!r}")
        from_dict(OptimConfig, {**_optim_fields(params.distill.optim), **(block or {})},
                  f"{where}:distill.method_optim.{name}")


def _optim_fields(cfg: OptimConfig) -> dict:
    return {k: v for k, v in vars(cfg).items()}


def dataset_key(num_classes: int) -> str:
    """The dataset whose official branches and schedules apply: CIFAR-100 for 100 classes."""
    return "cifar100" if num_classes == 100 else "cifar10"


def resolve_optim(params: Params, method: str, num_classes: int,
                  schedule: str | None = None) -> tuple[OptimConfig, str]:
    """The optimiser ``method`` trains with, and one line saying how it was set (for the
    comparison table and MLflow). ``schedule`` overrides ``distill.schedule``."""
    d = params.distill
    if (schedule or d.schedule) == "official":
        sched = get_method(method).schedules.get(dataset_key(num_classes))
        if sched is None:
            raise InputError(f"method {method!r} has no official schedule; set distill.schedule: shared")
        base = sched.optim_dict()
        how = f"official ({sched.source})" if sched.official else f"the method's recipe ({sched.source})"
        if d.official_epochs:
            scale = d.official_epochs / sched.epochs
            base["epochs"] = d.official_epochs
            base["milestones"] = [m * scale for m in sched.milestones]
            how += f", {sched.epochs} epochs rescaled to {d.official_epochs}"
    else:
        base, how = _optim_fields(d.optim), "shared (distill.optim)"
    override = d.method_optim.get(method) or {}
    if override:
        how += f", overridden by distill.method_optim.{method}: {sorted(override)}"
    return from_dict(OptimConfig, {**base, **override}, f"distill.method_optim.{method}"), how


def with_ablation(params: Params, variant: str) -> Params:
    """``params`` running DARWIN ablation ``variant``: method darwin, its settings block overridden
    by the variant (robustkd.methods.darwin.ABLATIONS), so what is recorded is what ran."""
    from robustkd.methods.darwin import ablation_settings

    settings = {**params.distill.settings, "darwin": ablation_settings(method_settings(params, "darwin"), variant)}
    build_config("darwin", settings["darwin"], where=f"ablation variant {variant}")
    return dataclasses.replace(params, distill=dataclasses.replace(params.distill, method="darwin", settings=settings))


def method_settings(params: Params, method: str) -> dict:
    """The settings block of ``method`` under distill.settings (empty when absent)."""
    block = params.distill.settings.get(method, {}) or {}
    if not isinstance(block, dict):
        raise InputError(f"params.yaml: distill.settings.{method} must be a mapping, found {block!r}")
    return block
