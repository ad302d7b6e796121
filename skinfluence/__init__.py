"""skinfluence: influence functions for scikit-learn, skorch and torch models."""

from .scorers import DirectInfluenceScorer, InfluenceScorer
from .solvers import NotPositiveDefiniteError

__all__ = ["DirectInfluenceScorer", "InfluenceScorer", "NotPositiveDefiniteError"]
__version__ = "0.1.0"
