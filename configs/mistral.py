"""Zephyr / Mistral-7B-SFT SSAPO recipe (SGPO_NOTES section 5): round 0 is DPO on 2K UltraFeedback
seed pairs with beta 0.1, lr 5e-7, 3 epochs; rounds 1-3 (pools of 8K / 20K / 30K prompts) train 1
epoch each at lr 3e-7 from the previous policy with it as the reference; batch 32, cosine schedule
with 10% warmup, max length 2048 (prompt 1024), bf16; the authors' Mistral script uses eps 0.05
with K = 6.

    python -m sgpo_jax.train --config=configs/mistral.py --workdir=/ckpt/zephyr \
        --config.model.source=/models/mistral-7b-sft-beta

On one 80 GB GPU: LoRA on a bf16 frozen base, ``--config.model.lora.rank=16
--config.model.param_dtype=bfloat16`` with a LoRA learning rate (e.g. ``--config.train.learning_rate=5e-5
--config.ssapo.seed_learning_rate=5e-5``): 29.3 GiB per step by the memory planner
(XLA: 29.7 GiB on one H100) at 8 pairs x 2048 tokens per micro-batch;
full fine-tuning needs an FSDP slice (README: "LoRA and QLoRA").
"""

from sgpo_jax.config import base_config, seven_to_eight_b


def get_config():
    c = seven_to_eight_b(base_config())
    c.model.source = "HuggingFaceH4/mistral-7b-sft-beta"
    c.train.beta = 0.1
    c.ssapo.seed_learning_rate = 5e-7
    c.ssapo.seed_epochs = 3
    c.train.learning_rate = 3e-7
    c.train.epochs = 1
    c.sgpo.epsilon = 0.05
    return c
