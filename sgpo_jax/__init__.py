"""sgpo_jax: SGPO / SSAPO preference optimization in JAX and Flax.

Importing this package has no side effects (no device initialization, no flags).
"""

from sgpo_jax.follower import (
    WorstCase,
    SmoothWorstCase,
    entropic_worst_case,
    margin_window,
    w1_certificate,
    worst_case,
)

__all__ = [
    "WorstCase",
    "SmoothWorstCase",
    "entropic_worst_case",
    "margin_window",
    "w1_certificate",
    "worst_case",
]
__version__ = "0.1.0"
