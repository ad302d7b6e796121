"""skinfluence: influence functions for scikit-learn, skorch and torch models."""

from .detection import MislabelDetector
from .scorers import (
    ArnoldiInfluenceScorer,
    CgInfluenceScorer,
    DirectInfluenceScorer,
    EkfacInfluenceScorer,
    InfluenceScorer,
    LissaInfluenceScorer,
    NystroemInfluenceScorer,
)
from .solvers import NotPositiveDefiniteError

__all__ = ["ArnoldiInfluenceScorer", "CgInfluenceScorer", "DirectInfluenceScorer", "EkfacInfluenceScorer", "InfluenceScorer", "LissaInfluenceScorer", "MislabelDetector", "NotPositiveDefiniteError", "NystroemInfluenceScorer"]
__version__ = "0.1.0"
