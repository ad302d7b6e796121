"""Curvature solvers: one file per method, each a ``fit`` / ``solve`` pair."""

from ._base import CurvatureOperator, NotPositiveDefiniteError, Solver
from .direct import DirectSolver

__all__ = ["CurvatureOperator", "DirectSolver", "NotPositiveDefiniteError", "Solver"]
