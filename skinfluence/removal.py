"""Removal effects of groups of training points (methods of the influence scorers)."""

from __future__ import annotations

__all__ = ["RemovalEffects"]


class RemovalEffects:
    """Group influence and removal-effect methods shared by every scorer.

    Examples
    --------
    >>> from skinfluence import DirectInfluenceScorer
    >>> from skinfluence.removal import RemovalEffects
    >>> issubclass(DirectInfluenceScorer, RemovalEffects)
    True
    """
