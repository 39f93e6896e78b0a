"""Zephyr / Mistral-7B-SFT recipe (SGPO_NOTES section 5): beta 0.1, lr 5e-7, 3 epochs on the seed
(round 0), batch 32, cosine schedule with 10% warmup, max length 2048 (prompt 1024), bf16;
the authors' Mistral script uses eps 0.05 with K = 6.

    python -m sgpo_jax.train --config=configs/mistral.py --workdir=/ckpt/zephyr \
        --config.model.source=/models/mistral-7b-sft-beta
"""

from sgpo_jax.config import base_config


def get_config():
    c = base_config()
    c.model.source = "HuggingFaceH4/mistral-7b-sft-beta"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.scan_layers = True
    c.model.logps_chunk = 256
    c.data.source = "argilla/ultrafeedback-binarized-preferences-cleaned"
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.buckets = (512, 1024, 1536, 2048)
    c.train.beta = 0.1
    c.train.learning_rate = 5e-7
    c.train.epochs = 3
    c.train.batch_size = 32
    c.train.micro_batches = 4
    c.train.reference_batch_size = 32
    c.sgpo.epsilon = 0.05
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
