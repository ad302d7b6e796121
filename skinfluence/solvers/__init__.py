"""Curvature solvers: one file per method, each a ``fit`` / ``solve`` pair."""

from ._base import CurvatureOperator, NotPositiveDefiniteError, Solver
from .arnoldi import ArnoldiSolver
from .cg import CgSolver
from .direct import DirectSolver
from .ekfac import EkfacSolver
from .lissa import LissaDivergenceError, LissaSolver
from .nystroem import NystroemSolver

__all__ = [
    "ArnoldiSolver",
    "CgSolver",
    "CurvatureOperator",
    "DirectSolver",
    "EkfacSolver",
    "LissaDivergenceError",
    "LissaSolver",
    "NotPositiveDefiniteError",
    "NystroemSolver",
    "Solver",
]
