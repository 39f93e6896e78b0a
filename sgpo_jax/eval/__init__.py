"""Evaluation in every mode, behind one interface (:class:`sgpo_jax.eval.evaluator.Evaluator`,
``evaluate(params, step) -> dict``):

* :mod:`sgpo_jax.eval.preference`: the held-out preference pairs (``data.eval_source`` or
  ``data.eval_fraction``): TRL's ``eval_*`` implicit-reward metrics and loss, every
  ``train.eval_every`` steps and at the end of ``dpo``/``sgpo`` runs;
* :mod:`sgpo_jax.eval.instructions`: the verifiable-instruction pass rate (``eval.tasks``; after
  every SSAPO round, at the end of ``dpo``/``sgpo`` runs), generation, AlpacaEval / MT-Bench
  exports and pairwise win rates;
* :mod:`sgpo_jax.eval.intervals`: the 95% intervals every figure carries, and the paired test.
"""
