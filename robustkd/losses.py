"""Compatibility names: the objectives moved to :mod:`robustkd.methods` (one module per method,
one registry). Import from there in new code."""

from .methods import DISTILL_METHODS, TEACHER_METHODS, Objective, available_methods, create_objective  # noqa: F401
from .methods.adaad import AdaadConfig  # noqa: F401
from .methods.ard import ArdConfig  # noqa: F401
from .methods.common import reduce_kl  # noqa: F401
from .methods.crdnd import CrdndConfig  # noqa: F401
from .methods.darwin import DarwinConfig, darwin_loss, path_weights, resolve_batching, triplet  # noqa: F401
from .methods.gacd import GacdConfig  # noqa: F401
from .methods.iad import IadConfig  # noqa: F401
from .methods.natural import NaturalConfig  # noqa: F401
from .methods.natural_kd import NaturalKdConfig  # noqa: F401
from .methods.pgd_at import PgdAtConfig  # noqa: F401
from .methods.rslad import RsladConfig  # noqa: F401
from .methods.trades import TradesConfig  # noqa: F401

available_objectives = available_methods
