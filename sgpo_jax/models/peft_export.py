r"""LoRA adapters in PEFT's layout: ``adapter_config.json`` and ``adapter_model.safetensors``.

PEFT (``peft.PeftModel.from_pretrained(base_model, directory)``) names the adapters of layer ``i``'s
projection ``m`` (``self_attn.q_proj``, ..., ``mlp.down_proj``)
``base_model.model.model.layers.{i}.{m}.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` and computes ``y = x W^T + (alpha / r) (x A^T) B^T`` with torch weights. Our adapters
(:mod:`sgpo_jax.models.lora`) are ``kernel_lora_a [in, r]`` and ``kernel_lora_b [r, out]`` acting
on ``x`` from the right, so PEFT's ``lora_A.weight`` is our ``A^T`` and ``lora_B.weight`` our
``B^T``, with the same ``r`` and ``alpha`` (no rsLoRA, no dropout, no bias).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping

import numpy as np
from flax import traverse_util

from sgpo_jax.models.llama import DecoderConfig
from sgpo_jax.models.lora import LoraConfig, target_modules

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "peft_state_dict", "save_peft_adapters"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def peft_state_dict(adapters: Mapping[str, Any], cfg: DecoderConfig, lora: LoraConfig) -> Dict[str, np.ndarray]:
    """Our adapter tree (``{"params": ...}``, host arrays) -> PEFT tensor names and torch layouts."""
    params = adapters["params"] if set(adapters) == {"params"} else adapters
    flat = traverse_util.flatten_dict(dict(params))
    out = {}
    for module in target_modules(lora):
        parent = _MODULE_PARENT[module]
        for leaf, peft_name in (("kernel_lora_a", "lora_A"), ("kernel_lora_b", "lora_B")):
            for i in range(cfg.num_hidden_layers):
                if cfg.scan_layers:
                    array = np.asarray(flat[("layers", parent, module, leaf)])[i]
                else:
                    array = np.asarray(flat[(f"layers_{i}", parent, module, leaf)])
                name = f"base_model.model.model.layers.{i}.{parent}.{module}.{peft_name}.weight"
                out[name] = np.ascontiguousarray(array.T.astype(np.float32))
    return out


def save_peft_adapters(directory: str | Path, adapters: Mapping[str, Any], cfg: DecoderConfig, lora: LoraConfig,
                       base_model: str = "") -> Path:
    """Writes ``directory/adapter_config.json`` and ``directory/adapter_model.safetensors`` (float32)
    so that ``peft.PeftModel.from_pretrained(base, directory)`` applies our adapters to ``base``
    (the model the adapters were trained on; ``base_model`` is recorded as its name)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(target_modules(lora)), "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    save_file(peft_state_dict(adapters, cfg, lora), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory
