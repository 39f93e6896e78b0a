"""Flax models with exact transformers counterparts, their log-probs and checkpoints."""

from sgpo_jax.models.gguf import load_gguf, smollm2_gguf_path, unpermute_rope_rows
from sgpo_jax.models.hf import from_pretrained, resolve_checkpoint, save_pretrained, to_hf_config
from sgpo_jax.models.llama import (
    SUPPORTED_MODEL_TYPES,
    Decoder,
    DecoderConfig,
    KVCache,
    Llama3RopeScaling,
    hf_state_dict_to_params,
    output_head,
    params_to_hf_state_dict,
    rope_inv_freq,
)
from sgpo_jax.models.loading import export_policy, gguf_path, load_model, load_tokenizer
from sgpo_jax.models.logps import DEFAULT_CHUNK_SIZE, chosen_rejected_logps, chunked_sequence_logps, decoder_logps_fn

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "SUPPORTED_MODEL_TYPES",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "Llama3RopeScaling",
    "chosen_rejected_logps",
    "chunked_sequence_logps",
    "decoder_logps_fn",
    "export_policy",
    "from_pretrained",
    "gguf_path",
    "hf_state_dict_to_params",
    "load_gguf",
    "load_model",
    "load_tokenizer",
    "output_head",
    "params_to_hf_state_dict",
    "resolve_checkpoint",
    "rope_inv_freq",
    "save_pretrained",
    "smollm2_gguf_path",
    "to_hf_config",
    "unpermute_rope_rows",
]
