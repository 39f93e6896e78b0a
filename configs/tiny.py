"""A tiny random Llama for tests and smoke runs on CPU (seconds per step). Give it a tokenizer
and data:

    python -m sgpo_jax.train --config=configs/tiny.py --workdir=/tmp/tiny \
        --config.model.tokenizer=gguf:smollm2 --config.data.source=prefs.jsonl
"""

from sgpo_jax.config import base_config


def get_config():
    c = base_config()
    c.model.source = "random"
    c.model.logps_chunk = 16
    c.model.random.hidden_size = 32
    c.model.random.intermediate_size = 64
    c.model.random.num_attention_heads = 4
    c.model.random.num_key_value_heads = 2
    c.model.random.head_dim = 8
    c.model.random.initializer_range = 0.2
    c.data.max_length = 48
    c.data.max_prompt_length = 24
    c.data.buckets = (32, 48)
    c.train.learning_rate = 3e-2
    c.train.warmup_ratio = 0.0
    c.train.epochs = 2
    c.train.batch_size = 8
    c.train.reference_batch_size = 8
    c.train.beta = 0.5
    c.sgpo.epsilon = 0.05
    c.checkpoint.every = 3
    c.eval.tasks = ""  # a random model passes no task; --config.eval.tasks=heldout scores the bundled ones
    c.mesh.data = -1
    return c
