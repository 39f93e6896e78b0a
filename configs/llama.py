"""Llama-3-8B-Instruct recipe (SGPO_NOTES section 5): beta 0.05, lr 1e-6, 1 epoch, batch 32,
cosine schedule with 10% warmup, max length 2048 (prompt 1024), bf16, eps 0.01, K = 6.

    python -m sgpo_jax.train --config=configs/llama.py --workdir=/ckpt/llama3 \
        --config.model.source=/models/Meta-Llama-3-8B-Instruct \
        --config.data.source=argilla/ultrafeedback-binarized-preferences-cleaned
"""

from sgpo_jax.config import base_config


def get_config():
    c = base_config()
    c.model.source = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.scan_layers = True
    c.model.logps_chunk = 256
    c.data.source = "argilla/ultrafeedback-binarized-preferences-cleaned"
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.buckets = (512, 1024, 1536, 2048)
    c.train.beta = 0.05
    c.train.learning_rate = 1e-6
    c.train.epochs = 1
    c.train.batch_size = 32
    c.train.micro_batches = 4
    c.train.reference_batch_size = 32
    c.sgpo.epsilon = 0.01
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
