"""Curvature solvers, one file per method, and the registry of methods.

Each line of :data:`METHODS` is a method: its name (as ``inversion_method`` of the
functional interface takes it) and its solver class, which declares the method's
parameters and documentation. The named scorers of :mod:`skinfluence.scorers`, the
functional interface and the documentation's table of methods are built from it.
"""

from .._linalg import NotPositiveDefiniteError
from ._base import Attribute, CurvatureOperator, Param, Solver, SolveReport, pairwise_tile
from .arnoldi import ArnoldiSolver
from .blocks import BlockDiagonalSolver
from .cg import CgSolver
from .direct import DirectSolver
from .ekfac import EkfacSolver
from .gradient_similarity import GradientSimilaritySolver
from .lissa import LissaDivergenceError, LissaSolver
from .nystroem import NystroemSolver

#: method name -> solver class; one line per method.
METHODS = {
    "direct": DirectSolver,
    "cg": CgSolver,
    "lissa": LissaSolver,
    "arnoldi": ArnoldiSolver,
    "nystroem": NystroemSolver,
    "ekfac": EkfacSolver,
    "gradient_similarity": GradientSimilaritySolver,
}

__all__ = [
    "METHODS",
    "ArnoldiSolver",
    "Attribute",
    "BlockDiagonalSolver",
    "CgSolver",
    "CurvatureOperator",
    "DirectSolver",
    "EkfacSolver",
    "GradientSimilaritySolver",
    "LissaDivergenceError",
    "LissaSolver",
    "NotPositiveDefiniteError",
    "NystroemSolver",
    "Param",
    "SolveReport",
    "Solver",
    "pairwise_tile",
]
