"""skinfluence: influence functions for scikit-learn, skorch and torch models."""

from . import scorers as _scorers
from ._data import DatasetSource
from .detection import MislabelDetector
from .solvers import NotPositiveDefiniteError

# One scorer per method of the registry (skinfluence.solvers.METHODS).
globals().update({name: getattr(_scorers, name) for name in _scorers.__all__})

__all__ = [*_scorers.__all__, "DatasetSource", "MislabelDetector", "NotPositiveDefiniteError"]
__version__ = "0.1.0"
