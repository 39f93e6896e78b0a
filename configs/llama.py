"""Llama-3-8B-Instruct recipe (SGPO_NOTES section 5): beta 0.05, lr 1e-6, 1 epoch, batch 32,
cosine schedule with 10% warmup, max length 2048 (prompt 1024), bf16, eps 0.01, K = 6.

    python -m sgpo_jax.train --config=configs/llama.py --workdir=/ckpt/llama3 \
        --config.model.source=/models/Meta-Llama-3-8B-Instruct \
        --config.data.source=argilla/ultrafeedback-binarized-preferences-cleaned
"""

from sgpo_jax.config import base_config, seven_to_eight_b


def get_config():
    c = seven_to_eight_b(base_config())
    c.model.source = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.train.beta = 0.05
    c.train.learning_rate = 1e-6
    c.train.epochs = 1
    c.sgpo.epsilon = 0.01
    return c
