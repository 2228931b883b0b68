"""DARWIN-LF: the label-free reading of DARWIN [choice: the slides do not define "LF"].

Every use of the ground-truth label is replaced by the teacher's prediction on the clean
(augmented) image, argmax f_t(x): the untargeted attack's target, the targeted path's class,
the partner's "other class" condition (repaired in the loss, see
:func:`robustkd.methods.darwin.partners_of_other_class`) and the class index of the weights.
It is what a user needs for unlabeled or pseudo-labeled generated data (docs/methods.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from .darwin import DARWIN_SCHEDULE, DarwinConfig, check_run, darwin_objective, partner_options
from .registry import Method, register


@dataclass
class DarwinLfConfig(DarwinConfig):
    """DARWIN's settings with ``label_free`` on by default."""

    label_free: bool = True


register(Method(
    name="darwin_lf", config=DarwinLfConfig, loss=darwin_objective, role="student",
    summary="DARWIN-LF: DARWIN with the teacher's predictions in place of labels",
    source="this project's reading of the slides' 'DARWIN-LF' (docs/methods.md#darwin-lf)",
    uses_labels=False, slides_labels=False, needs_partners=lambda cfg: cfg.use_dbkd, check_run=check_run,
    partner_options=partner_options,
    schedules={"cifar10": DARWIN_SCHEDULE, "cifar100": DARWIN_SCHEDULE}))
