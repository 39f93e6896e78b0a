"""The Llama-family decoder: parity with transformers' PyTorch models, remat/scan, KV cache, errors.

Every model is built from a tiny config (no hub access); transformers' weights are randomized at
O(1) scale so that logits are O(1) and a 1e-4 agreement is a real check.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from sgpo_jax.models import (
    Decoder,
    DecoderConfig,
    Llama3RopeScaling,
    hf_state_dict_to_params,
    params_to_hf_state_dict,
    rope_inv_freq,
)
from sgpo_jax.parallel import mesh as mesh_lib
from sgpo_jax.parallel import sharding

from toy import random_params

TORCH_REASON = "PyTorch is the parity oracle: pip install torch==2.13.0 (the CPU wheel)"
VOCAB, LAYERS, BATCH, LENGTH = 97, 2, 3, 12
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)

# name -> (config class, model class name, config kwargs). GQA ratios: 1, 4, 3, 2, 1.
FAMILIES = {
    "llama-mha-untied": (transformers.LlamaConfig, "LlamaForCausalLM",
                         dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                              rope_theta=500000.0)),
    "llama-gqa4-llama3rope-tied": (transformers.LlamaConfig, "LlamaForCausalLM",
                                   dict(hidden_size=64, intermediate_size=96, num_attention_heads=8,
                                        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                        rope_parameters=LLAMA3_ROPE)),
    "mistral-gqa3-window4": (transformers.MistralConfig, "MistralForCausalLM",
                             dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                                  sliding_window=4)),
    "qwen2-gqa2-bias-tied": (transformers.Qwen2Config, "Qwen2ForCausalLM",
                             dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True)),
    "qwen2-mha-bias-window5": (transformers.Qwen2Config, "Qwen2ForCausalLM",
                               dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                    num_key_value_heads=4, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=0)),
}


def hf_config(name):
    config_cls, _, kwargs = FAMILIES[name]
    return config_cls(vocab_size=VOCAB, num_hidden_layers=LAYERS, attn_implementation="eager", **kwargs)


def hf_model(name):
    """A transformers model of family ``name`` with random O(1) weights, in eval mode."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    config = hf_config(name)
    torch.manual_seed(0)
    model = getattr(transformers, FAMILIES[name][1])(config).eval()
    with torch.no_grad():
        for tensor_name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if tensor_name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


def numpy_state_dict(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def padded_batch(side, seed=0, batch=BATCH, length=LENGTH, lengths=(LENGTH, 7, 3)):
    """``(ids, mask)`` int32 ``[batch, length]``; row ``b`` has ``lengths[b]`` real tokens on one side."""
    rng = np.random.default_rng(seed)
    arange = np.arange(length)[None]
    real = np.asarray(lengths)[:, None]
    mask = arange >= length - real if side == "left" else arange < real
    return rng.integers(0, VOCAB, (batch, length)).astype(np.int32), mask.astype(np.int32)




def small_cfg(**overrides):
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_scaling=Llama3RopeScaling(
                      factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16),
                  attention_bias=True)
    fields.update(overrides)
    return DecoderConfig(**fields)


# ----------------------------------------------------------------------------------------------
# Parity with transformers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [0, 5], ids=["unblocked", "block5"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers(name, side, block):
    """Also with causal query blocks of 5 slots (12 = 5 + 5 + 2; windows 4 and 5 cut the key prefix)."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    model = hf_model(name)
    cfg = DecoderConfig.from_hf(model.config, attention_block=block)
    params = hf_state_dict_to_params(numpy_state_dict(model), cfg)
    ids, mask = padded_batch(side)
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)  # transformers needs them for left padding
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                         position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    logits = np.asarray(jax.jit(Decoder(cfg).apply)(params, ids, mask))  # default positions
    real = mask.astype(bool)
    assert np.abs(expected[real]).max() > 1.0  # the check is not vacuous
    np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0)


def test_config_read_from_transformers():
    cfg = DecoderConfig.from_hf(hf_config("llama-gqa4-llama3rope-tied"))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (64, 8, 2, 16)
    assert cfg.rope_theta == 10000.0 and cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 64)
    assert DecoderConfig.from_hf(hf_config("llama-mha-untied")).rope_theta == 500000.0
    mistral = DecoderConfig.from_hf(hf_config("mistral-gqa3-window4"))
    assert mistral.sliding_window == 4 and mistral.head_dim == 8 and mistral.rope_scaling is None
    qwen = DecoderConfig.from_hf(hf_config("qwen2-gqa2-bias-tied"), scan_layers=True, dtype="bfloat16")
    assert qwen.attention_bias and qwen.sliding_window is None and qwen.scan_layers and qwen.dtype == jnp.bfloat16
    assert DecoderConfig.from_hf(hf_config("qwen2-mha-bias-window5")).sliding_window == 5


def test_config_read_from_transformers_v4_attributes():
    """transformers v4 kept ``rope_theta`` on the config and the scaling in ``rope_scaling``."""
    v4 = types.SimpleNamespace(
        model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=128,
        rope_theta=500000.0, rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
        hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    cfg = DecoderConfig.from_hf(v4)
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == 8
    assert cfg.rope_scaling == Llama3RopeScaling(8.0, 1.0, 4.0, 128)


def test_rope_inv_freq_matches_transformers():
    pytest.importorskip("torch", reason=TORCH_REASON)
    for name in ("llama-gqa4-llama3rope-tied", "mistral-gqa3-window4"):
        model = hf_model(name)
        ours = rope_inv_freq(DecoderConfig.from_hf(model.config))
        np.testing.assert_array_equal(ours, model.model.rotary_emb.inv_freq.numpy())
    # The llama3 config has kept, interpolated (wavelength in (16, 64)) and divided frequencies.
    cfg = DecoderConfig.from_hf(hf_config("llama-gqa4-llama3rope-tied"))
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    ratio = plain / rope_inv_freq(cfg)
    assert ratio[0] == 1 and np.any((ratio > 1) & (ratio < 8)) and ratio[-1] == pytest.approx(8)


def test_state_dict_round_trip_and_strict_load():
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    for name in ("qwen2-gqa2-bias-tied", "llama-mha-untied"):
        model = hf_model(name)
        state = numpy_state_dict(model)
        for scan in (False, True):
            cfg = DecoderConfig.from_hf(model.config, scan_layers=scan)
            back = params_to_hf_state_dict(hf_state_dict_to_params(state, cfg), cfg)
            assert back.keys() == state.keys()
            for key in state:
                np.testing.assert_array_equal(back[key], state[key])
        model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_param_tree_matches_init():
    for scan in (False, True):
        for tied in (False, True):
            cfg = small_cfg(scan_layers=scan, tie_word_embeddings=tied)
            init = jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
            state = params_to_hf_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), init), cfg)
            converted = hf_state_dict_to_params(state, cfg)
            assert jax.tree.structure(converted) == jax.tree.structure(init)
            assert jax.tree.map(jnp.shape, converted) == jax.tree.map(lambda s: s.shape, init)


# ----------------------------------------------------------------------------------------------
# remat / scan_layers / dtype
# ----------------------------------------------------------------------------------------------


def test_remat_and_scan_give_identical_logits_and_grads():
    cfg = small_cfg(sliding_window=5)
    params = random_params(cfg)
    ids, mask = padded_batch("left")
    state = params_to_hf_state_dict(params, cfg)

    def run(variant_cfg):
        variant_params = hf_state_dict_to_params(state, variant_cfg)
        model = Decoder(variant_cfg)

        def loss(p):
            logits = model.apply(p, ids, mask)
            return jnp.sum(jnp.sin(logits)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variant_params)
        return np.asarray(logits), params_to_hf_state_dict(grads, variant_cfg)

    logits, grads = run(cfg)
    for kw in (dict(remat=True), dict(scan_layers=True), dict(remat=True, scan_layers=True)):
        other_logits, other_grads = run(dataclasses.replace(cfg, **kw))
        np.testing.assert_allclose(other_logits, logits, atol=1e-6, rtol=0, err_msg=str(kw))
        for key in grads:
            np.testing.assert_allclose(other_grads[key], grads[key], atol=1e-5, rtol=1e-5, err_msg=f"{kw} {key}")


@pytest.mark.parametrize("variant, side", [(dict(), "left"), (dict(), "right"), (dict(sliding_window=5), "right"),
                                           (dict(remat=True, scan_layers=True), "left")],
                         ids=["full-left", "full-right", "window5-right", "remat-scan-left"])
def test_blocked_attention_equals_unblocked(variant, side):
    """Query blocks of 1, 4, 5 and 12 slots (4 and 5 with a window or scan) give the unblocked
    (attention_block=0) logits at the real tokens, and the same gradients of a loss on them
    (padding queries with no visible key average other keys' values, which no real token reads)."""
    cfg = small_cfg(attention_block=0, **variant)
    params = random_params(cfg)
    ids, mask = padded_batch(side)
    real = mask.astype(bool)

    def run(block):
        model = Decoder(dataclasses.replace(cfg, attention_block=block))

        def loss(p):
            logits = model.apply(p, ids, mask)
            return jnp.sum(jnp.where(real[..., None], jnp.sin(logits), 0.0)), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(logits)[real], grads

    expected, expected_grads = run(0)
    assert np.abs(expected).max() > 0.5
    # every block shape once, without a window or scan, left-padded (1: one slot each; 4 divides
    # LENGTH; 5 leaves a ragged last block; LENGTH: one block); the other cases need the two kinds
    # of multi-block split only (each compiled block count costs seconds on 2 cores); each padding
    # side meets a window or scan once
    for block in ((1, 4, 5, LENGTH) if not variant and side == "left" else (4, 5)):
        logits, grads = run(block)
        np.testing.assert_allclose(logits, expected, atol=1e-6, rtol=0, err_msg=f"block {block}")
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"block {block}")


def test_blocked_attention_sharded_equals_unsharded():
    """Batch over (data, fsdp), heads over tensor, activations constrained: the same logits."""
    cfg = small_cfg(vocab_size=96, attention_block=4)  # 96: the vocabulary splits over tensor = 2
    params = random_params(cfg)
    ids, mask = padded_batch("left", batch=8, lengths=(12, 7, 3, 12, 5, 9, 1, 10))
    ids = ids % 96
    model = Decoder(cfg)
    expected = np.asarray(jax.jit(Decoder(dataclasses.replace(cfg, attention_block=0)).apply)(params, ids, mask))
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    batch = sharding.batch_sharding(mesh)
    with sharding.activation_sharding(mesh):
        logits = jax.jit(model.apply)(sharding.shard_params(params, mesh), jax.device_put(ids, batch),
                                      jax.device_put(mask, batch))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], expected[real], atol=1e-5, rtol=0)


def test_bfloat16_compute_tracks_float32():
    cfg = small_cfg()
    params = random_params(cfg)
    ids, mask = padded_batch("right")
    logits = np.asarray(jax.jit(Decoder(cfg).apply)(params, ids, mask))
    bf16 = dataclasses.replace(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bf16_params = hf_state_dict_to_params(params_to_hf_state_dict(params, cfg), bf16)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(bf16_params))
    low = jax.jit(Decoder(bf16).apply)(bf16_params, ids, mask)
    assert low.dtype == jnp.bfloat16
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(low, np.float32)[real], logits[real], atol=0.05 * np.abs(logits).max())


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("window", [None, 3], ids=["full", "window3"])
def test_cached_decoding_equals_full_forward(window, scan):
    """Left-padded prompts prefilled at once, then 5 tokens one by one, into a 16-slot cache; the
    full forward runs in query blocks of 4. The cache keeps a [B, K, S, D] buffer per layer, or
    one stacked [L, B, K, S, D] array with scanned layers."""
    cfg = small_cfg(sliding_window=window, scan_layers=scan, tie_word_embeddings=True, attention_block=4)
    params = random_params(cfg)
    prompt_len, new_tokens = 6, 5
    ids, mask = padded_batch("left", seed=1, length=prompt_len + new_tokens, lengths=(11, 8, 6))
    mask[:, prompt_len:] = 1  # generated tokens are real in every row
    model = Decoder(cfg)
    full = np.asarray(jax.jit(model.apply)(params, ids, mask))

    step = jax.jit(lambda p, i, m, c: model.apply(p, i, m, cache=c))
    cache = model.init_cache(BATCH, 16)
    layer_shape = (BATCH, cfg.num_key_value_heads, 16, cfg.head_dim)
    assert [a.shape for a in jax.tree.leaves(cache.k)] == ([(LAYERS, *layer_shape)] if scan else [layer_shape] * LAYERS)
    logits, cache = step(params, ids[:, :prompt_len], mask[:, :prompt_len], cache)
    real = mask[:, :prompt_len].astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :prompt_len][real], atol=1e-5, rtol=0)
    for t in range(prompt_len, prompt_len + new_tokens):
        logits, cache = step(params, ids[:, t:t + 1], mask[:, t:t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=0, err_msg=f"step {t}")
    assert int(cache.index) == prompt_len + new_tokens
    np.testing.assert_array_equal(np.asarray(cache.mask[:, :prompt_len + new_tokens]), mask.astype(bool))


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config, field", [
    (transformers.GPT2Config(), "model_type"),
    (transformers.LlamaConfig(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0)), "rope_scaling"),
    (transformers.LlamaConfig(attention_bias=True), "attention_bias"),
    (transformers.LlamaConfig(mlp_bias=True), "mlp_bias"),
    (transformers.LlamaConfig(hidden_act="gelu"), "hidden_act"),
    (transformers.LlamaConfig(attention_dropout=0.1), "attention_dropout"),
    (transformers.Qwen2Config(num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"]),
     "layer_types"),
], ids=["model_type", "rope_type", "llama_attention_bias", "mlp_bias", "hidden_act", "dropout", "mixed_layers"])
def test_unsupported_transformers_configs_are_rejected(config, field):
    with pytest.raises(ValueError, match=field):
        DecoderConfig.from_hf(config)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(attention_block=-1), "attention_block"),
])
def test_invalid_configs_are_rejected(overrides, field):
    with pytest.raises(ValueError, match=field):
        small_cfg(**overrides)


def test_bad_state_dicts_and_params_are_named():
    cfg = small_cfg()
    state = params_to_hf_state_dict(random_params(cfg), cfg)
    missing = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"missing: \['model.layers.1.self_attn.k_proj.bias'\]"):
        hf_state_dict_to_params(missing, cfg)
    with pytest.raises(ValueError, match=r"unexpected: \['model.layers.2.mlp.up_proj.weight'\]"):
        hf_state_dict_to_params({**state, "model.layers.2.mlp.up_proj.weight": state["lm_head.weight"]}, cfg)
    transposed = {**state, "model.layers.0.mlp.down_proj.weight": state["model.layers.0.mlp.down_proj.weight"].T}
    with pytest.raises(ValueError, match=r"mis-shaped: \['model.layers.0.mlp.down_proj.weight: got \(64, 32\), "
                                         r"expected \(32, 64\)'\]"):
        hf_state_dict_to_params(transposed, cfg)
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        hf_state_dict_to_params(state, tied)
    with pytest.raises(ValueError, match="missing: .*'layers/self_attn/q_proj/kernel'"):
        params_to_hf_state_dict(random_params(cfg), dataclasses.replace(cfg, scan_layers=True))


def test_bad_inputs_raise():
    cfg = small_cfg()
    params = random_params(cfg)
    model = Decoder(cfg)
    ids = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="input_ids"):
        model.apply(params, ids[0])
    with pytest.raises(ValueError, match="input_ids"):
        model.apply(params, ids.astype(jnp.float32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.apply(params, ids, jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        model.apply(params, ids, positions=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="does not fit a cache of 3 slots"):
        model.apply(params, ids, cache=model.init_cache(2, 3))
    with pytest.raises(ValueError, match="cache k/v shape"):
        model.apply(params, ids, cache=model.init_cache(3, 8))
