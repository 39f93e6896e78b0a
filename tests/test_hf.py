"""Hugging Face checkpoints: transformers' own files load with the same logits, ours load in transformers.

Tiny random Llama, Mistral and Qwen2 models (weights at O(1) scale, so a 1e-4 agreement of O(1)
logits is a real check) are written by transformers' ``save_pretrained`` into tmp dirs; PyTorch
is the oracle. No network: tests/conftest.py sets HF_HUB_OFFLINE=1.
"""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from sgpo_jax.models import Decoder, DecoderConfig
from sgpo_jax.models.hf import from_pretrained, save_pretrained, to_hf_config

torch = pytest.importorskip("torch", reason="PyTorch is the parity oracle: pip install torch==2.13.0 (the CPU wheel)")

VOCAB, LAYERS = 61, 2
FAMILIES = {
    "llama": (transformers.LlamaConfig,
              dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                   rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "mistral": (transformers.MistralConfig,
                dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2,
                     sliding_window=4)),
    "qwen2": (transformers.Qwen2Config,
              dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                   tie_word_embeddings=True)),
}
IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9)).astype(np.int32)


def hf_model(family, seed=0):
    """A transformers ``*ForCausalLM`` of ``family`` with random O(1) weights, in eval mode."""
    config_cls, kwargs = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, num_hidden_layers=LAYERS, attn_implementation="eager", **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def our_logits(cfg, params):
    return np.asarray(Decoder(cfg).apply(params, jnp.asarray(IDS)), np.float32)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A transformers-written llama checkpoint, copied by the tests that damage it."""
    path = tmp_path_factory.mktemp("llama")
    hf_model("llama").save_pretrained(path)
    return path


def damaged_copy(llama_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(llama_dir, path)
    return path


# ----------------------------------------------------------------------------------------------
# Parity both ways
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_checkpoint_gives_same_logits(family, tmp_path):
    model = hf_model(family)
    model.save_pretrained(tmp_path)
    cfg, params, hf_config = from_pretrained(tmp_path)
    assert hf_config.model_type == family and cfg == DecoderConfig.from_hf(model.config)
    expected = torch_logits(model)
    assert np.abs(expected).max() > 1.0  # not vacuous
    np.testing.assert_allclose(our_logits(cfg, params), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_checkpoint_loads_in_transformers(family, tmp_path):
    model = hf_model(family, seed=1)
    model.save_pretrained(tmp_path / "theirs")
    cfg, params, _ = from_pretrained(tmp_path / "theirs", scan_layers=True)  # any param layout exports
    save_pretrained(tmp_path / "ours", cfg, params)  # config built from cfg alone
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == family
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is type(model)
    np.testing.assert_allclose(torch_logits(reloaded), our_logits(cfg, params), atol=1e-4, rtol=0)
    for name, tensor in model.state_dict().items():  # bit-identical weights
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_save_keeps_given_hf_config_and_tokenizer(llama_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    cfg, params, hf_config = from_pretrained(llama_dir)
    hf_config.bos_token_id = 7  # a field only the transformers config carries
    save_pretrained(tmp_path, cfg, params, hf_config, tokenizer)
    assert transformers.AutoConfig.from_pretrained(tmp_path).bos_token_id == 7
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)("hello world")["input_ids"] == [1, 2]
    assert from_pretrained(tmp_path)[0] == cfg


# ----------------------------------------------------------------------------------------------
# Sharded and bfloat16 checkpoints
# ----------------------------------------------------------------------------------------------


def test_sharded_checkpoint_loads(tmp_path):
    model = hf_model("mistral")
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "model.safetensors").exists()
    cfg, params, _ = from_pretrained(tmp_path)
    np.testing.assert_allclose(our_logits(cfg, params), torch_logits(model), atol=1e-4, rtol=0)


def test_bf16_checkpoint_loads_and_saves(tmp_path):
    model = hf_model("qwen2")  # float32, weights rounded to bf16 (casting it back would round RoPE buffers too)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    model.load_state_dict(model16.state_dict())
    model16.save_pretrained(tmp_path / "theirs")
    cfg, params, _ = from_pretrained(tmp_path / "theirs")  # bf16 weights, float32 params and compute
    assert cfg.param_dtype == jnp.float32
    np.testing.assert_allclose(our_logits(cfg, params), torch_logits(model), atol=1e-4, rtol=0)

    cfg16, params16, _ = from_pretrained(tmp_path / "theirs", dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    save_pretrained(tmp_path / "ours", cfg16, params16)
    written = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert {a.dtype for a in written.values()} == {np.dtype(ml_dtypes.bfloat16)}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert reloaded.dtype == torch.bfloat16
    for name, tensor in model16.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------


def rewrite_weights(path, edit):
    """Applies ``edit`` to the tensors of ``path/model.safetensors`` and writes them back."""
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing: \['model.layers.1.mlp.up_proj.weight'\]"),
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
     r"unexpected: \['model.layers.0.mlp.extra.weight'\]"),
    (lambda t: t.update({"model.norm.weight": np.zeros(31, np.float32)}),
     r"mis-shaped: \['model.norm.weight: got \(31,\), expected \(32,\)'\]"),
])
def test_tensor_errors_name_the_tensor(llama_dir, tmp_path, edit, match):
    path = damaged_copy(llama_dir, tmp_path)
    rewrite_weights(path, edit)
    with pytest.raises(ValueError, match=match):
        from_pretrained(path)


def test_truncated_file(llama_dir, tmp_path):
    path = damaged_copy(llama_dir, tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file \(truncated"):
        from_pretrained(path)


def test_sharded_checkpoint_errors(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="40KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = index["weight_map"].pop("model.norm.weight")
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{moved}: tensors disagree .* not listed \['model.norm.weight'\]"):
        from_pretrained(tmp_path)
    (tmp_path / moved).unlink()
    with pytest.raises(ValueError, match=rf"shard {moved} .* does not exist"):
        from_pretrained(tmp_path)
    index_path.unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value, match", [
    ("model_type", "gpt2", r"config\.json: model_type 'gpt2' is not supported"),
    ("hidden_act", "gelu", r"config\.json: hidden_act 'gelu' is not supported"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0},
     r"config\.json: rope_scaling: rope type 'yarn' is not supported"),
])
def test_config_errors_name_the_field(llama_dir, tmp_path, field, value, match):
    path = damaged_copy(llama_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        from_pretrained(path)


def test_hub_name_offline():
    with pytest.raises(ValueError, match=r"'someone/no-such-model' is not a local directory, and the Hugging Face "
                                         r"hub is offline .* pass a local directory"):
        from_pretrained("someone/no-such-model")


def test_save_rejects_mismatched_hf_config(llama_dir, tmp_path):
    cfg, params, hf_config = from_pretrained(llama_dir)
    hf_config.rms_norm_eps = 1e-3
    with pytest.raises(ValueError, match=r"hf_config disagrees with cfg: rms_norm_eps"):
        save_pretrained(tmp_path, cfg, params, hf_config)
    with pytest.raises(ValueError, match=r"params does not match the config: missing: \['norm/weight'\]"):
        save_pretrained(tmp_path, cfg, {"params": {k: v for k, v in params["params"].items() if k != "norm"}})


def test_to_hf_config_round_trips():
    for family in FAMILIES:
        config_cls, kwargs = FAMILIES[family]
        cfg = DecoderConfig.from_hf(config_cls(vocab_size=VOCAB, num_hidden_layers=LAYERS, **kwargs))
        hf_config = to_hf_config(cfg)
        assert hf_config.model_type == family and DecoderConfig.from_hf(hf_config) == cfg
