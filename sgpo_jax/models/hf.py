"""Hugging Face checkpoints <-> :class:`~sgpo_jax.models.llama.Decoder`, without PyTorch.

A checkpoint is a directory holding transformers' ``config.json`` and the weights in safetensors:
one ``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (transformers'
``save_pretrained(max_shard_size=...)``). Tensors are read with the ``safetensors`` package's
NumPy API, which represents bfloat16 through ``ml_dtypes``, so bf16 checkpoints load as they are::

    cfg, params, hf_config = from_pretrained("path/to/SmolLM2-135M-Instruct", dtype=jnp.bfloat16)
    logits = Decoder(cfg).apply(params, input_ids, attention_mask)
    save_pretrained("out", cfg, params, hf_config, tokenizer)  # transformers' PyTorch classes load it

Anything that does not fit (missing, unexpected or mis-shaped tensors, an unsupported
architecture or config field, a truncated file) raises a ``ValueError`` naming the file and the
tensor or field.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import jax.numpy as jnp
import numpy as np

from sgpo_jax.errors import ModelError
from sgpo_jax.models.llama import (
    SUPPORTED_MODEL_TYPES,
    DecoderConfig,
    hf_state_dict_to_params,
    params_to_hf_state_dict,
)

__all__ = ["from_pretrained", "save_pretrained", "resolve_checkpoint", "to_hf_config"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# What `resolve_checkpoint` fetches from the hub: config, weights and tokenizer, nothing else.
HUB_ALLOW_PATTERNS = [
    CONFIG_NAME,
    "generation_config.json",
    "*.safetensors",
    WEIGHTS_INDEX_NAME,
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
]

# Non-persistent RoPE buffers that checkpoints written by transformers < 4.31 still carry.
_LEGACY_BUFFER_SUFFIX = ".rotary_emb.inv_freq"

# transformers config and model class of each of SUPPORTED_MODEL_TYPES.
_HF_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}

# DecoderConfig fields that are ours alone (not part of a transformers config).
_OWN_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "attention_block", "attention")


def resolve_checkpoint(path_or_name: Union[str, os.PathLike], *, revision: Optional[str] = None) -> Path:
    """The local directory of a checkpoint: ``path_or_name`` itself, or a hub snapshot of it.

    A name that is not an existing directory is fetched with ``huggingface_hub.snapshot_download``
    (config, safetensors weights and tokenizer files only); in offline mode
    (``HF_HUB_OFFLINE=1``) that succeeds only from the local cache. The returned directory also
    serves ``transformers.AutoTokenizer.from_pretrained``.

    Raises:
      ValueError: the name is neither a local directory nor obtainable from the hub, saying
        whether the hub is offline and to pass a local directory instead.
    """
    if os.path.isdir(path_or_name):
        return Path(path_or_name)
    import huggingface_hub

    name = os.fspath(path_or_name)
    try:
        return Path(huggingface_hub.snapshot_download(name, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as err:  # offline, unknown repo, network or validation error: all end here
        if huggingface_hub.constants.HF_HUB_OFFLINE:
            reason = "the Hugging Face hub is offline (HF_HUB_OFFLINE=1) with no cached copy of it"
        else:
            reason = f"downloading it from the Hugging Face hub failed ({type(err).__name__}: {err})"
        raise ModelError(
            f"{name!r} is not a local directory, and {reason}; pass a local directory holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME} with its shards)"
        ) from err


def from_pretrained(path_or_name: Union[str, os.PathLike], *, dtype: Any = jnp.float32, param_dtype: Any = None,
                    revision: Optional[str] = None,
                    **config_overrides: Any) -> Tuple[DecoderConfig, Dict[str, Any], Any]:
    """Loads a Llama, Mistral or Qwen2 causal-LM checkpoint for :class:`~sgpo_jax.models.llama.Decoder`.

    Args:
      path_or_name: a local checkpoint directory, or a hub repo id (see :func:`resolve_checkpoint`).
      dtype: compute dtype of the model (``DecoderConfig.dtype``).
      param_dtype: dtype the parameters are cast to; ``None`` means ``dtype``.
      revision: hub revision, when ``path_or_name`` is a repo id.
      **config_overrides: further :class:`DecoderConfig` fields (``scan_layers``, ``remat``, ...).

    Returns:
      ``(cfg, variables, hf_config)``: the :class:`DecoderConfig`, the Flax variables
      ``{"params": ...}`` and the transformers config (pass it to :func:`save_pretrained` to
      keep fields we do not model, such as token ids).

    Raises:
      ValueError: naming the file and the field or tensor that does not fit.
    """
    directory = resolve_checkpoint(path_or_name, revision=revision)
    hf_config = _load_hf_config(directory)
    param_dtype = dtype if param_dtype is None else param_dtype
    try:
        cfg = DecoderConfig.from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **config_overrides)
    except ValueError as err:
        raise ModelError(f"{directory / CONFIG_NAME}: {err}") from err
    state_dict = {name: array for name, array in _read_weights(directory).items()
                  if not name.endswith(_LEGACY_BUFFER_SUFFIX)}
    try:
        params = hf_state_dict_to_params(state_dict, cfg)
    except ValueError as err:
        raise ModelError(f"{directory}: the safetensors weights do not fit {CONFIG_NAME}: {err}") from err
    return cfg, params, hf_config


def save_pretrained(path: Union[str, os.PathLike], cfg: DecoderConfig, params: Mapping[str, Any],
                    hf_config: Any = None, tokenizer: Any = None) -> Path:
    """Writes a checkpoint directory that transformers' ``AutoModelForCausalLM`` loads.

    Writes ``model.safetensors`` (PyTorch layout and names, the parameters' own dtype,
    ``lm_head.weight`` omitted when tied, as transformers does), ``config.json`` and, if given,
    the tokenizer (anything with a transformers-style ``save_pretrained``).

    Args:
      path: the directory (created if needed; existing files of the same names are replaced).
      cfg: the model's :class:`DecoderConfig`.
      params: Flax variables ``{"params": ...}`` or the params tree itself.
      hf_config: the transformers config to write (e.g. from :func:`from_pretrained`); it must
        describe the same architecture as ``cfg``. ``None`` builds one with :func:`to_hf_config`.
      tokenizer: optional tokenizer to save alongside.

    Returns the directory.

    Raises:
      ValueError: ``params`` do not match ``cfg`` (naming the parameters), or ``hf_config``
        disagrees with ``cfg`` (naming the fields).
    """
    from safetensors.numpy import save_file

    state_dict = params_to_hf_state_dict(params, cfg)
    if cfg.tie_word_embeddings:
        del state_dict["lm_head.weight"]
    if hf_config is None:
        hf_config = to_hf_config(cfg)
    else:
        hf_config = copy.deepcopy(hf_config)
        _check_same_architecture(hf_config, cfg)
    hf_config.dtype = str(state_dict["model.embed_tokens.weight"].dtype)

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    hf_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def to_hf_config(cfg: DecoderConfig) -> Any:
    """The transformers config of the architecture ``cfg`` describes.

    q/k/v biases make it a ``Qwen2Config``, otherwise a sliding window a ``MistralConfig``,
    otherwise a ``LlamaConfig``; ``DecoderConfig.from_hf`` of the result gives back ``cfg``.
    """
    import transformers

    if cfg.attention_bias:
        model_type = "qwen2"
        extra = dict(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window,
                     max_window_layers=0)
    elif cfg.sliding_window is not None:
        model_type, extra = "mistral", dict(sliding_window=cfg.sliding_window)
    else:
        model_type, extra = "llama", {}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling.factor,
                    low_freq_factor=cfg.rope_scaling.low_freq_factor,
                    high_freq_factor=cfg.rope_scaling.high_freq_factor,
                    original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings)
    config_class, model_class = _HF_CLASSES[model_type]
    hf_config = getattr(transformers, config_class)(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.initializer_range,
        architectures=[model_class],
        **extra,
    )
    _check_same_architecture(hf_config, cfg)
    return hf_config


def _check_same_architecture(hf_config: Any, cfg: DecoderConfig) -> None:
    """Raises if ``hf_config`` does not read back as ``cfg`` (up to our own fields), naming the fields."""
    try:
        read = DecoderConfig.from_hf(hf_config, **{name: getattr(cfg, name) for name in _OWN_FIELDS})
    except ValueError as err:
        raise ValueError(f"hf_config cannot describe this model: {err}") from err
    differ = [f"{f.name}: hf_config has {getattr(read, f.name)!r}, cfg has {getattr(cfg, f.name)!r}"
              for f in dataclasses.fields(cfg) if getattr(read, f.name) != getattr(cfg, f.name)]
    if differ:
        raise ValueError("hf_config disagrees with cfg: " + "; ".join(differ))


def _load_hf_config(directory: Path) -> Any:
    """transformers' config of ``directory``, after checking its ``model_type`` is supported."""
    import transformers

    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ModelError(f"{directory}: no {CONFIG_NAME}; not a transformers checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{path}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    return transformers.AutoConfig.from_pretrained(directory)


def _read_weights(directory: Path) -> Dict[str, np.ndarray]:
    """Every tensor of the checkpoint, by name (``model.safetensors`` first, as transformers)."""
    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        return _read_safetensors(single)
    if not index.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise ModelError(f"{directory}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (found {found}); only "
                         "safetensors checkpoints are supported")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ModelError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): {err!r}") from err
    tensors: Dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        listed = {name for name, file in weight_map.items() if file == shard}
        path = directory / shard
        if not path.is_file():
            raise ValueError(f"{index}: shard {shard} (holding e.g. {min(listed)}) does not exist")
        found = _read_safetensors(path)
        if set(found) != listed:
            raise ValueError(
                f"{path}: tensors disagree with {index.name}: in the shard but not listed "
                f"{sorted(set(found) - listed)}, listed but not in the shard {sorted(listed - set(found))}"
            )
        tensors.update(found)
    return tensors


def _read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """All tensors of one safetensors file as NumPy arrays (bfloat16 as ``ml_dtypes.bfloat16``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as file:
            return {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from err
