"""The one run path's plan (what a config executes) and the config copy it is built on."""

from sgpo_jax import runner
from sgpo_jax.config import base_config, replaced


def test_plan_of_a_training_run_lists_its_stages_and_programs():
    c = base_config()
    c.train.mode, c.checkpoint.every = "dpo", 50
    plan = runner.plan(c)
    assert plan.stages == ("load and tokenize the pairs of data.source",
                           "reference log-probs (cached in workdir/cache)",
                           "train: DPO steps with checkpoints every 50",
                           "evaluate the final policy on the held-out tasks (eval.tasks=heldout)",
                           "export the final policy (workdir/export, Hugging Face layout)", "summary.json")
    assert plan.programs == ("train_step", "reference_logps", "eval_generate")
    c.eval.tasks = ""
    assert runner.plan(c).programs == ("train_step", "reference_logps")
    assert set(plan.programs) <= set(runner.PROGRAMS)


def test_plan_of_the_ssapo_loop_has_one_stage_per_round_and_the_sampler():
    c = base_config()
    c.train.mode, c.ssapo.pool_sizes, c.ssapo.num_samples, c.export = "ssapo", (8, 16), 2, False
    plan = runner.plan(c)
    assert plan.stages == (
        "split: seed pairs and the rounds' prompt pools (split.json)",
        "evaluate the initial model on the held-out tasks",
        "round 0: DPO on the seed pairs, then evaluate",
        "round 1: generate 2 samples for each of 8 prompts, self-annotate, SGPO on the pairs, evaluate",
        "round 2: generate 2 samples for each of 16 prompts, self-annotate, SGPO on the pairs, evaluate",
        "summary.json, summary.md and plots/")
    assert plan.programs == ("train_step", "reference_logps", "sample", "eval_generate")
    assert plan.lines()[0] == "plan: train.mode=ssapo, 6 stages"


def test_replaced_copies_and_leaves_the_original_alone():
    c = base_config()
    copy = replaced(c, **{"data.limit": 7, "train.learning_rate": 0.5})
    assert (copy.data.limit, copy.train.learning_rate) == (7, 0.5)
    assert (c.data.limit, c.train.learning_rate) == (0, 5e-7)
    assert copy.to_dict() == {**c.to_dict(), "data": {**c.data.to_dict(), "limit": 7},
                              "train": {**c.train.to_dict(), "learning_rate": 0.5}}
