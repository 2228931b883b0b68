"""Training methods behind one registry (see :mod:`robustkd.methods.registry`).

Students: DARWIN, DARWIN-LF, ARD, IAD-I, RSLAD, AdaAD, CRDND and GACD (reconstructions), and
natural KD (the non-robust reference). Teachers: TRADES, PGD-AT, AT-PRM (ViTs), natural training.
Importing this package registers every method module.
"""

from . import (adaad, ard, at_prm, crdnd, darwin, darwin_lf, gacd, iad, natural, natural_kd,  # noqa: F401
               pgd_at, rslad, trades)
from .registry import (DataInfo, Method, Objective, Schedule, Step, attack_steps,  # noqa: F401
                       available_methods, build_config, create_objective, get_method, standin_settings)

TEACHER_METHODS = tuple(available_methods("teacher"))
DISTILL_METHODS = tuple(available_methods("student"))
