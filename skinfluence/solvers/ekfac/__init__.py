"""EK-FAC, split by concern: layer types (``_layers``), the Fisher variants
(``_fisher``), the passes that build the factors (``_factors``) and the
solver (``_solver``)."""

from ._fisher import FISHERS
from ._layers import select_layers
from ._solver import EkfacSolver, kronecker_preconditioner

__all__ = ["FISHERS", "EkfacSolver", "kronecker_preconditioner", "select_layers"]
