"""sgpo_jax: SGPO / SSAPO preference optimization in JAX and Flax.

Importing this package has no side effects (no device initialization, no flags).
"""

from sgpo_jax.core.follower import (
    SmoothWorstCase,
    W1Certificate,
    WorstCase,
    entropic_worst_case,
    margin_window,
    w1_certificate,
    worst_case,
)
from sgpo_jax.core.losses import authors_weighted_loss, dpo_loss, sgpo_loss
from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, make_sgpo_step, sgpo_step

__all__ = [
    "PreferenceBatch",
    "SGPOConfig",
    "SmoothWorstCase",
    "TrainState",
    "W1Certificate",
    "WorstCase",
    "authors_weighted_loss",
    "dpo_loss",
    "entropic_worst_case",
    "make_sgpo_step",
    "margin_window",
    "sgpo_loss",
    "sgpo_step",
    "w1_certificate",
    "worst_case",
]
__version__ = "0.1.0"
