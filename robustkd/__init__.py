"""robustkd: adversarially robust knowledge distillation (DARWIN and baselines).

The core library. It depends on torch, torchvision and numpy only; DVC, Prefect and
MLflow live in ``stages/`` and ``pipeline/``, which import this package, never the
other way round.
"""

__version__ = "0.1.0"
