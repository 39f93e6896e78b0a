"""Divergence and dead-model detection during training, with the evidence for the likely cause.

After every step :meth:`DivergenceMonitor.check` looks at the step's metrics and the parameter
norm :math:`\\|\\theta_t\\|_2` (global over all leaves) and returns the problem, or None:

* a non-finite metric (loss, gradient norm, rewards): the step's numbers are NaN or infinite;
* a dead model: the gradient norm is exactly 0 for :data:`DEAD_STEPS` consecutive steps (every
  gradient vanished: saturated or overflowed activations; a real optimum never gives exact 0
  in floating point on a batch of distinct pairs);
* exploding weights: :math:`\\|\\theta_t\\| > ` :data:`PARAM_GROWTH` :math:`\\cdot \\|\\theta_0\\|`,
  the norm at the run's first step (training moves a pretrained or initialized model by a small
  fraction of its norm; a hundredfold growth only comes from runaway updates).

:meth:`DivergenceMonitor.cause` reads the last :data:`WINDOW` finite steps for the likely cause:
rising loss, an exploding gradient norm, fast-growing weights (the update size), or a run that
just resumed from a checkpoint after newer ones failed their check.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Deque, Dict, List, Optional, Tuple

__all__ = ["DEAD_STEPS", "PARAM_GROWTH", "WINDOW", "DivergenceMonitor"]

DEAD_STEPS = 3  # consecutive steps with a gradient norm of exactly 0
PARAM_GROWTH = 100.0  # bound on ||params_t|| / ||params_0||
WINDOW = 5  # finite steps kept as evidence


class DivergenceMonitor:
    """Per-run state of the checks (see the module docstring). ``start_norm``: the parameter
    norm at the run's first step (kept in the checkpoints, so a resumed run keeps its bound);
    ``resumed_at``: the step the run restored, ``set_aside``: the newer checkpoints that failed
    their check then (``(step, reason)``), ``learning_rate``: for the advice."""

    def __init__(self, start_norm: float, *, learning_rate: float, resumed_at: int = 0,
                 set_aside: Tuple[Tuple[int, str], ...] = ()):
        self.start_norm, self.learning_rate = start_norm, learning_rate
        self.resumed_at, self.set_aside = resumed_at, set_aside
        self.history: Deque[Tuple[int, float, float, float]] = deque(maxlen=WINDOW)  # step, loss, grad, norm
        self.zero_since: Optional[int] = None
        self.current: Optional[Tuple[int, float, float, float]] = None

    def check(self, step: int, metrics: Dict[str, float], param_norm: float) -> Optional[str]:
        """The problem at ``step`` in words, or None (then the step joins the evidence)."""
        self.current = (step, metrics.get("loss", math.nan), metrics.get("grad_norm", math.nan), param_norm)
        bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
        if bad or not math.isfinite(param_norm):
            return f"non-finite {', '.join(bad or ['parameters'])}"
        grad = metrics["grad_norm"]
        if grad == 0.0:
            self.zero_since = self.zero_since or step
            if step - self.zero_since + 1 >= DEAD_STEPS:
                return f"gradient norm exactly 0 since step {self.zero_since} (a dead model)"
        else:
            self.zero_since = None
        if param_norm > PARAM_GROWTH * self.start_norm:
            return (f"parameter norm {param_norm:.3g} is {param_norm / self.start_norm:.3g} x its start "
                    f"{self.start_norm:.3g} (bound {PARAM_GROWTH:g} x)")
        self.history.append((step, metrics["loss"], grad, param_norm))
        return None

    def cause(self, step: int) -> Tuple[str, str]:
        """``(likely cause, hint)`` from the evidence before ``step``."""
        evidence: List[str] = []
        if self.set_aside and step - self.resumed_at <= WINDOW:
            names = ", ".join(f"step {s} ({reason})" for s, reason in self.set_aside)
            evidence.append(f"it began {step - self.resumed_at} steps after resuming from step {self.resumed_at}, "
                            f"newer checkpoints having failed their check: {names}")
        rows = list(self.history) + [r for r in [self.current] if r and all(map(math.isfinite, r))]
        if rows:
            first_norm = rows[0][3] if len(rows) > 1 else self.start_norm
            growth = rows[-1][3] / max(first_norm, 1e-30)
            if rows[-1][3] > 2 * self.start_norm or growth > 1.5:
                evidence.append(f"exploding updates: the parameter norm grew from {self.start_norm:.3g} to "
                                f"{rows[-1][3]:.3g} by step {rows[-1][0]} at train.learning_rate="
                                f"{self.learning_rate:g}")
            losses = [r[1] for r in rows]
            if len(rows) > 1 and losses[-1] > 1.5 * min(losses) and losses[-1] > losses[0]:
                evidence.append(f"rising loss: {min(losses):.4g} -> {losses[-1]:.4g} over steps {rows[0][0]}-"
                                f"{rows[-1][0]}")
            grads = sorted(r[2] for r in rows)
            median = grads[len(grads) // 2]
            if len(rows) > 1 and rows[-1][2] > 10 * median > 0:
                evidence.append(f"exploding gradient norm: {median:.3g} (median) -> {rows[-1][2]:.3g} at step "
                                f"{rows[-1][0]}")
        if not evidence:
            evidence.append("no warning sign in the steps before: check the data of this batch and the compute "
                            "dtype (model.dtype)")
        hint = (f"rerun in a new --workdir with a lower --config.train.learning_rate (now {self.learning_rate:g}) "
                "or a smaller --config.train.max_grad_norm")
        return "; ".join(evidence), hint
