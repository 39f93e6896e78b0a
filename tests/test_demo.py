"""The demo end to end: it must learn the synthetic task (clean labels) within its budget."""

import pytest

from sgpo_jax import demo


def test_demo_learns_the_clean_task():
    dpo = demo.run("dpo", 0.0, 0.0, steps=60, seed=0)
    sgpo = demo.run("sgpo", 0.05, 0.0, steps=60, seed=0)
    # Chance is 0.5; a quality-aware reward separates held-out pairs.
    assert dpo["heldout_accuracy"] > 0.85
    assert sgpo["heldout_accuracy"] > 0.85
    # The follower spends its budget: transport equals epsilon while it is active.
    assert abs(sgpo["follower/transport"] - 0.05) < 1e-4
    assert sgpo["follower/moved"] > 0


def test_demo_rejects_bad_noise():
    with pytest.raises(ValueError, match=r"--noise values must be in \[0, 0.5\), got 0.7"):
        demo.main([0.7], epsilon=0.05, steps=1, seed=0)
