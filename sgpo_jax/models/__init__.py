"""Flax models with exact transformers counterparts."""

from sgpo_jax.models.llama import (
    SUPPORTED_MODEL_TYPES,
    Decoder,
    DecoderConfig,
    KVCache,
    Llama3RopeScaling,
    hf_state_dict_to_params,
    params_to_hf_state_dict,
    rope_inv_freq,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Decoder",
    "DecoderConfig",
    "KVCache",
    "Llama3RopeScaling",
    "hf_state_dict_to_params",
    "params_to_hf_state_dict",
    "rope_inv_freq",
]

from sgpo_jax.models.llama import output_head  # noqa: E402
from sgpo_jax.models.logps import DEFAULT_CHUNK_SIZE, chunked_sequence_logps, decoder_logps_fn  # noqa: E402

__all__ += ["output_head", "DEFAULT_CHUNK_SIZE", "chunked_sequence_logps", "decoder_logps_fn"]

from sgpo_jax.models.gguf import load_gguf, smollm2_gguf_path, unpermute_rope_rows  # noqa: E402
from sgpo_jax.models.hf import from_pretrained, resolve_checkpoint, save_pretrained, to_hf_config  # noqa: E402

__all__ += [
    "from_pretrained",
    "load_gguf",
    "resolve_checkpoint",
    "save_pretrained",
    "smollm2_gguf_path",
    "to_hf_config",
    "unpermute_rope_rows",
]
