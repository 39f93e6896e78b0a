"""The divergence checks on hand-made step metrics: which problem, and the evidence named."""

import math

from sgpo_jax.training.divergence import DEAD_STEPS, PARAM_GROWTH, DivergenceMonitor


def step(monitor, n, loss=0.5, grad=1.0, norm=10.0):
    return monitor.check(n, {"loss": loss, "grad_norm": grad}, norm)


def test_a_dead_model_is_k_consecutive_exact_zero_gradients():
    monitor = DivergenceMonitor(10.0, learning_rate=1.0)
    assert step(monitor, 1) is None
    assert step(monitor, 2, grad=0.0) is None and step(monitor, 3, grad=1e-30) is None  # tiny is not zero
    for n in range(4, 4 + DEAD_STEPS - 1):
        assert step(monitor, n, grad=0.0) is None
    assert step(monitor, 3 + DEAD_STEPS, grad=0.0) == "gradient norm exactly 0 since step 4 (a dead model)"


def test_exploding_weights_against_the_documented_bound():
    monitor = DivergenceMonitor(10.0, learning_rate=1.0)
    assert step(monitor, 1, norm=10.0 * PARAM_GROWTH) is None  # at the bound: allowed
    assert step(monitor, 2, norm=2000.0) == "parameter norm 2e+03 is 200 x its start 10 (bound 100 x)"


def test_non_finite_metrics_and_the_evidence_for_the_cause():
    monitor = DivergenceMonitor(10.0, learning_rate=0.5)
    for n, (loss, grad) in enumerate([(0.6, 1.0), (0.5, 1.0), (0.9, 1.0), (1.4, 30.0)], start=1):
        assert step(monitor, n, loss=loss, grad=grad, norm=10.0 + n) is None
    assert step(monitor, 5, loss=math.nan, grad=math.inf) == "non-finite grad_norm, loss"
    cause, hint = monitor.cause(5)
    assert cause == ("rising loss: 0.5 -> 1.4 over steps 1-4; exploding gradient norm: 1 (median) -> 30 at "
                     "step 4")
    assert hint.startswith("rerun in a new --workdir with a lower --config.train.learning_rate (now 0.5)")


def test_a_resume_after_checkpoints_failed_their_check_is_named():
    monitor = DivergenceMonitor(10.0, learning_rate=1.0, resumed_at=4, set_aside=((6, "empty step directory"),))
    assert step(monitor, 5, loss=math.nan) == "non-finite loss"
    cause, _ = monitor.cause(5)
    assert cause == ("it began 1 steps after resuming from step 4, newer checkpoints having failed their check: "
                     "step 6 (empty step directory)")
