r"""SGPO inside tunix's ``DPOTrainer`` (google-tunix 0.1.7; MaxText's DPO is that trainer).

tunix calls ``loss_fn(model, **gen_model_input_fn(batch))`` under ``nnx.value_and_grad`` once per
micro-batch and averages micro-batch gradients (``optax.MultiSteps``) when
``gradient_accumulation_steps > 1``. The SGPO follower couples the whole batch (the worst case over
all its pairs), so :func:`use_sgpo` refuses a trainer that would split the batch.

Per call, with tunix's :class:`TrainExample` (``[2B, ...]`` rows, chosen then rejected):
policy log-probs :math:`\ell_c, \ell_r` ``[B]`` (tunix's own ``compute_logps``), margins
:math:`h = (\ell_c - \ell^{ref}_c) - (\ell_r - \ell^{ref}_r)`, the exact follower
(:func:`sgpo_jax.core.follow.follow`, no gradient) gives the atoms, and the loss is
:func:`sgpo_jax.core.losses.sgpo_loss`'s mean: the same value and gradient as
:func:`sgpo_jax.core.step.sgpo_step` on the same pairs (in-step follower, one micro-batch).

Usage (a tunix or MaxText user adds)::

    from sgpo_jax.core.step import SGPOConfig
    from sgpo_jax.integrations.tunix import use_sgpo
    trainer = DPOTrainer(model, ref_model, optimizer, training_config)
    use_sgpo(trainer, SGPOConfig(mode="sgpo", beta=training_config.beta, epsilon=0.01))
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax

from sgpo_jax.core import losses
from sgpo_jax.core.follow import follow
from sgpo_jax.core.step import SGPOConfig

__all__ = ["sgpo_loss_fn", "use_sgpo"]

# tunix's DPOTrainer logs these aux names (its _aux_metrics_to_log)
_AUX = {"rewards/chosen": "rewards/chosen", "rewards/rejected": "rewards/rejected",
        "rewards/margin": "rewards/margins", "rewards/accuracy": "rewards/accuracies",
        "log_probs/chosen": "logps/chosen", "log_probs/rejected": "logps/rejected"}


def sgpo_loss_fn(model: Any, train_example: Any, *, config: SGPOConfig) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The SGPO leader loss of one tunix ``TrainExample`` (its whole batch) and tunix's aux metrics
    plus ``follower/*``. Needs the reference log-probs (a trainer with a ``ref_model``)."""
    from tunix.sft.dpo.dpo_trainer import compute_logps

    if train_example.ref_chosen_logps is None:
        raise ValueError("SGPO needs reference log-probs: give tunix's DPOTrainer a ref_model")
    pc, pr = compute_logps(model, train_example.input_ids, train_example.positions, train_example.attention_mask,
                           train_example.logits_to_keep, train_example.completion_mask, images=train_example.images)
    rc, rr = train_example.ref_chosen_logps, train_example.ref_rejected_logps
    f = follow((pc - rc) - (pr - rr), config)
    terms, metrics = losses.sgpo_loss(
        pc, pr, rc, rr, f.shift, f.mass, beta=config.beta, space=config.space,
        loss=config.leader_loss or config.loss, num_tangents=config.num_tangents, support=f.support,
        p_min=config.p_min,
    )
    aux = {name: metrics[ours] for name, ours in _AUX.items()}
    return terms.mean, {**aux, **f.metrics}


def use_sgpo(trainer: Any, config: SGPOConfig) -> Any:
    """Makes tunix's ``DPOTrainer`` train with SGPO (:func:`sgpo_loss_fn`); returns the trainer.

    Raises ``ValueError`` when the trainer accumulates gradients over micro-batches (the follower
    would see one micro-batch, not the batch) or ``config`` is not ``mode="sgpo"``."""
    steps = getattr(trainer.config, "gradient_accumulation_steps", None)
    if steps not in (None, 1):
        raise ValueError(f"gradient_accumulation_steps={steps}: tunix averages micro-batch gradients, but the SGPO "
                         "follower needs the whole batch; use gradient_accumulation_steps=None and a larger batch")
    if config.mode != "sgpo":
        raise ValueError(f"use_sgpo needs SGPOConfig(mode='sgpo'), got mode={config.mode!r}")
    if config.micro_batches != 1:
        raise ValueError("SGPOConfig.micro_batches applies to sgpo_step; tunix runs the loss on its own batches")

    def loss_fn(model, train_example):  # a plain signature: nnx.value_and_grad binds tunix's keyword
        return sgpo_loss_fn(model, train_example, config=config)  # arguments to it (a partial fails)

    trainer.with_loss_fn(loss_fn, has_aux=True)
    trainer.with_gen_model_input_fn(lambda example: {"train_example": example})
    return trainer
