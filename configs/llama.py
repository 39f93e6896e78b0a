"""Llama-3-8B-Instruct SSAPO recipe (SGPO_NOTES section 5): round 0 is DPO on 2K UltraFeedback
seed pairs with beta 0.05, lr 1e-6, 1 epoch; rounds 1-3 (pools of 8K / 20K / 30K prompts) train
1 epoch each from the previous policy with it as the reference, same lr; batch 32, cosine schedule
with 10% warmup, max length 2048 (prompt 1024), bf16, eps 0.01 (the paper's best), K = 6.

    python -m sgpo_jax.train --config=configs/llama.py --workdir=/ckpt/llama3 \
        --config.model.source=/models/Meta-Llama-3-8B-Instruct

``--config.train.mode=sgpo`` (or ``dpo``) trains once on ``data.source`` instead of the loop.

On one 80 GB GPU: LoRA on a bf16 frozen base, ``--config.model.lora.rank=16
--config.model.param_dtype=bfloat16`` with a LoRA learning rate (e.g. ``--config.train.learning_rate=5e-5
--config.ssapo.seed_learning_rate=5e-5``): 33.7 GiB per step by the memory planner
(XLA: 31.1 GiB on one H100) at 8 pairs x 2048 tokens per micro-batch;
full fine-tuning needs an FSDP slice (README: "LoRA and QLoRA").
"""

from sgpo_jax.config import base_config, seven_to_eight_b


def get_config():
    c = seven_to_eight_b(base_config())
    c.model.source = "meta-llama/Meta-Llama-3-8B-Instruct"
    c.train.beta = 0.05
    c.train.learning_rate = 1e-6
    c.train.epochs = 1
    c.ssapo.seed_learning_rate = 1e-6
    c.ssapo.seed_epochs = 1
    c.sgpo.epsilon = 0.01
    return c
