r"""Held-out preference metrics: how the policy ranks pairs it was not trained on, under TRL's
``eval_*`` names (``DPOTrainer.evaluate``), each with its 95% interval.

For held-out pair :math:`i` with policy and reference sequence log-probs :math:`\pi_w, \pi_l,
\pi^{ref}_w, \pi^{ref}_l` (``[N]`` each, summed over the response tokens) the implicit rewards are

.. math:: r_{w,i} = \beta (\pi_{w,i} - \pi^{ref}_{w,i}), \quad r_{l,i} = \beta (\pi_{l,i} - \pi^{ref}_{l,i}),
          \quad m_i = r_{w,i} - r_{l,i},

and the figures, over the :math:`N` pairs:

* ``eval_rewards/accuracies``: the fraction with :math:`r_{w,i} > r_{l,i}` (strict, as TRL; a
  tie, e.g. at step 0 where policy = reference, counts as wrong), with its Wilson interval;
* ``eval_rewards/chosen``, ``eval_rewards/rejected``, ``eval_rewards/margins``: the means of
  :math:`r_w, r_l, m`; ``eval_logps/chosen``, ``eval_logps/rejected``: the means of
  :math:`\pi_w, \pi_l`; ``eval_loss``: the mean of the per-pair loss of ``train.loss_type`` at
  ``train.beta`` and ``train.label_smoothing`` (:func:`sgpo_jax.core.losses.pair_loss`; for the
  coupled ``dr_dpo`` its per-pair DPO terms, for ``train.mode=sgpo`` the nominal, not the
  worst-case, loss); each with its Student t interval over the pairs
  (:func:`sgpo_jax.eval.intervals.mean_interval`; the pairs are independent draws).

The log-probs come from the forward-only scoring pass the reference log-probs use
(:func:`sgpo_jax.training.scoring.pair_logps`) with the training run's log-prob functions and
reference (the reference's computed once and cached in ``workdir/cache``, keyed by its weights
and the held-out pairs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import jax
import numpy as np
from ml_collections import ConfigDict

from sgpo_jax.core.losses import pair_loss
from sgpo_jax.data.batching import ordered_batches
from sgpo_jax.data.tokenize import TokenizedPairs
from sgpo_jax.eval.evaluator import Evaluator
from sgpo_jax.eval.intervals import mean_interval, wilson_interval
from sgpo_jax.training.scoring import cache_key, cached_reference, pair_logps

__all__ = ["ACCURACY", "EVAL_METRICS", "PreferenceEvaluator", "policy_weights", "preference_metrics",
           "response_tokens"]

ACCURACY = "eval_rewards/accuracies"
EVAL_METRICS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", ACCURACY, "eval_rewards/margins",
                "eval_logps/chosen", "eval_logps/rejected")
INTERVALS = "eval_rewards/accuracies: Wilson over pairs; the others: Student t over pairs"


def response_tokens(pairs: TokenizedPairs) -> Tuple[np.ndarray, np.ndarray]:
    """``(chosen [N], rejected [N])``: each response's scored token count, as the step counts it
    (the loss mask's positions after the first; every pair held)."""
    count = lambda p, r: len(r) - (len(p) == 0)
    return (np.array([count(p, c) for p, c in zip(pairs.prompt_ids, pairs.chosen_ids)], np.float64),
            np.array([count(p, r) for p, r in zip(pairs.prompt_ids, pairs.rejected_ids)], np.float64))


def preference_metrics(policy: Tuple[np.ndarray, np.ndarray], reference: Tuple[np.ndarray, np.ndarray],
                       tokens: Tuple[np.ndarray, np.ndarray], *, beta: float, loss_type: str,
                       label_smoothing: float) -> Dict[str, Any]:
    """The module docstring's figures from ``policy = (chosen, rejected)`` and ``reference``
    log-probs and the responses' ``tokens`` (each ``[N]``): ``{name: {"value", "ci95": [lo, hi]}}``
    for every name of :data:`EVAL_METRICS` (the rewards in float64; the loss as the training step
    computes it, in float32), and ``pairs``, ``intervals``."""
    pc, pr = (np.asarray(x, np.float64) for x in policy)
    rc, rr = (np.asarray(x, np.float64) for x in reference)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    losses, _ = pair_loss(pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                          chosen_tokens=tokens[0], rejected_tokens=tokens[1])
    n = len(pc)
    wins = int(np.sum(chosen > rejected))
    out: Dict[str, Any] = {"pairs": n, "intervals": INTERVALS,
                           ACCURACY: {"value": wins / n, "ci95": list(wilson_interval(wins, n))}}
    means = {"eval_loss": np.asarray(losses, np.float64), "eval_rewards/chosen": chosen,
             "eval_rewards/rejected": rejected, "eval_rewards/margins": chosen - rejected,
             "eval_logps/chosen": pc, "eval_logps/rejected": pr}
    for name, values in means.items():
        mean, half = mean_interval(values.tolist())
        out[name] = {"value": mean, "ci95": [mean - half, mean + half]}
    return {key: out[key] for key in ("pairs", "intervals", *EVAL_METRICS)}


class PreferenceEvaluator(Evaluator):
    """The held-out preference pairs' figures (module docstring) for the policy of a
    ``dpo``/``sgpo`` run. The trainer calls :meth:`start` once its reference is set (so the
    held-out pairs are scored with the training run's own log-prob functions and weights, LoRA
    adapters included), :meth:`at_step` after every optimizer step and :meth:`at_end` when the
    run ends.

    Args:
      config: the run config (``train.beta``, ``train.loss_type``, ``train.label_smoothing``,
        ``train.eval_every``, ``train.reference_batch_size``, ``data.buckets``).
      pairs: the held-out pairs (one shard, every pair held on every process).
      mesh: the device mesh.
      held_out: the line saying what was held out and from where (kept in the result).
    """

    def __init__(self, config: ConfigDict, pairs: TokenizedPairs, *, mesh, held_out: str):
        t = config.train
        self.pairs, self.mesh, self.held_out, self.every = pairs, mesh, held_out, t.eval_every
        self.settings = dict(beta=t.beta, loss_type=t.loss_type, label_smoothing=t.label_smoothing)
        self.batch_size, self.buckets = t.reference_batch_size, tuple(config.data.buckets) or None
        self.tokens = response_tokens(pairs)
        self.policy_fn = self.reference = None
        self.last: Dict[str, Any] = {}

    def _batches(self):
        return ordered_batches(self.pairs, self.batch_size, buckets=self.buckets, process_index=jax.process_index(),
                               process_count=jax.process_count())

    def start(self, workdir: str | Path, reference_fn, reference: Any, policy_fn) -> None:
        """The reference log-probs of the held-out pairs, ``reference_fn(reference, ...)`` (cached
        in ``workdir/cache``, keyed by the reference weights and the held-out pairs); later
        evaluations score the policy with ``policy_fn`` (``logps_fn(params, ids, attention,
        loss_mask) -> [B]``, as :func:`sgpo_jax.models.logps.decoder_logps_fn`)."""
        self.policy_fn = policy_fn
        self.reference = cached_reference(Path(workdir), cache_key(reference, self.pairs.fingerprint()),
                                          lambda resume: pair_logps(reference_fn, reference, self._batches(),
                                                                    len(self.pairs), mesh=self.mesh, resume=resume,
                                                                    desc="held-out reference log-probs"))

    def evaluate(self, params: Any, step: int) -> Dict[str, Any]:
        """``{"step", "held_out", "pairs", "intervals", name: {"value", "ci95"}}`` for the names of
        :data:`EVAL_METRICS`, ``params`` being what the policy's log-prob function takes (with
        LoRA: ``(base, adapters)``); a collective (every process calls it). Needs :meth:`start`."""
        if self.reference is None:
            raise RuntimeError("PreferenceEvaluator.evaluate before start(): the reference log-probs are missing")
        policy = pair_logps(self.policy_fn, params, self._batches(), len(self.pairs), mesh=self.mesh,
                            desc=f"held-out evaluation, step {step}")
        self.last = {"step": step, "held_out": self.held_out,
                     **preference_metrics(policy, self.reference, self.tokens, **self.settings)}
        return self.last

    def at_step(self, state: Any, step: int, total: int) -> Dict[str, float]:
        """After optimizer step ``step`` of ``total`` (``state`` the
        :class:`~sgpo_jax.core.step.TrainState`): the figures' values (for ``metrics.jsonl`` and
        TensorBoard) every ``train.eval_every`` steps and at ``total``, else ``{}``."""
        if step != total and not (self.every and step % self.every == 0):
            return {}
        result = self.evaluate(policy_weights(state), step)
        return {name: result[name]["value"] for name in EVAL_METRICS}

    def at_end(self, state: Any, step: int) -> Dict[str, Any]:
        """The run's last evaluation with intervals (for the summary): :meth:`at_step`'s at
        ``step`` when it ran, else a new one (a rerun of a finished run)."""
        return self.last if self.last.get("step") == step else self.evaluate(policy_weights(state), step)


def policy_weights(state: Any) -> Any:
    """What the policy's log-prob function takes from a :class:`~sgpo_jax.core.step.TrainState`:
    its ``params``, or ``(frozen, params)`` when it trains LoRA adapters on a frozen base."""
    return state.params if state.frozen is None else (state.frozen, state.params)
