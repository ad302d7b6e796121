"""Influence at scale: tiled, lazy and streaming computations (methods of the scorers)."""

from __future__ import annotations

__all__ = ["LargeData"]


class LargeData:
    """Tiled, out-of-core and streaming methods shared by every scorer.

    Examples
    --------
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.large import LargeData
    >>> issubclass(DirectInfluenceScorer, LargeData)
    True
    """
