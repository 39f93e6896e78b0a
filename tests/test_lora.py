"""LoRA (sgpo_jax.models.lora, applied with qwix) against independent oracles: the base model at
init, the chain rule through the full weight's gradient, the DPO step at eps = 0, PEFT in torch."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

pytest.importorskip("qwix")  # the lora extra (also in the test extra)
from sgpo_jax import runner
from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, sgpo_step
from sgpo_jax.models import from_pretrained, lora
from sgpo_jax.models.llama import Decoder, DecoderConfig
from sgpo_jax.models.logps import decoder_logps_fn
from sgpo_jax.models.peft_export import save_peft_adapters

from tiny_run import ROOT, tiny, write_pairs, write_tokenizer

SMALL = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=4, initializer_range=0.3)


def model_and_params(scan: bool, dtype=jnp.float32):
    cfg = DecoderConfig(**SMALL, scan_layers=scan, dtype=dtype, param_dtype=dtype)
    ids = jnp.zeros((1, 2), jnp.int32)
    return Decoder(cfg), Decoder(cfg).init(jax.random.PRNGKey(0), ids)


def random_adapters(base, config, seed=1):
    """Adapters with B drawn at random too (B = 0 at init would hide every error in B's path)."""
    adapters = lora.init_adapters(base, config, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


IDS = jnp.array([[3, 7, 1, 9, 22, 5], [11, 2, 30, 4, 8, 0]], jnp.int32)
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], jnp.int32)


def test_at_init_the_lora_model_is_the_base_model_exactly():
    """Scanned layers (stacked kernels, the harder case for qwix); the unscanned model's adapters-off
    reference equals the base bitwise in the end-to-end run below."""
    model, base = model_and_params(True)
    config = lora.LoraConfig(rank=3, alpha=6.0)
    adapters = lora.init_adapters(base, config, jax.random.PRNGKey(4))
    assert all(not np.any(np.asarray(b)) for b in jax.tree.leaves(adapters)[1::2])  # every B is zero
    got = lora.lora_model(model, config).apply(lora.join(base, adapters), IDS, MASK)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(model.apply(base, IDS, MASK)))
    count = lora.adapter_count(adapters)  # 2 layers x sum over q k v o gate up down of r (in + out)
    assert count == 2 * 3 * ((16 + 16) + (16 + 8) * 2 + (16 + 16) + (16 + 24) * 2 + (24 + 16))


def test_adapter_gradients_are_the_chain_rule_through_the_weight_gradient(x64):
    """y = x (W + s A B): dL/dA = s dL/dW B^T and dL/dB = s A^T dL/dW, with dL/dW taken from the
    plain model at the merged weights (a different program: it never sees A or B)."""
    model, base = model_and_params(True, jnp.float64)
    config = lora.LoraConfig(rank=2, alpha=5.0, targets=("q", "o", "up", "down"))
    adapters = jax.tree.map(lambda x: x.astype(jnp.float64), random_adapters(base, config))
    weights = jax.random.normal(jax.random.PRNGKey(9), (2, 6, SMALL["vocab_size"]), jnp.float64)
    lora_loss = lambda ad: jnp.sum(lora.lora_model(model, config).apply(lora.join(base, ad), IDS, MASK) * weights)
    full_loss = lambda p: jnp.sum(model.apply(p, IDS, MASK) * weights)
    grads = jax.jit(jax.grad(lora_loss))(adapters)["params"]["layers"]
    dw = jax.jit(jax.grad(full_loss))(lora.merge(base, adapters, config))["params"]["layers"]
    s = config.scale
    for parent, module in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "up_proj"),
                           ("mlp", "down_proj")):
        a = adapters["params"]["layers"][parent][module]["kernel_lora_a"]
        b = adapters["params"]["layers"][parent][module]["kernel_lora_b"]
        g_w = dw[parent][module]["kernel"]  # [L, in, out]
        # float64: the two programs differ only in the order of sums (x W + s (x A) B vs x (W + s A B))
        np.testing.assert_allclose(grads[parent][module]["kernel_lora_a"], s * g_w @ np.swapaxes(b, 1, 2),
                                   rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(grads[parent][module]["kernel_lora_b"], s * np.swapaxes(a, 1, 2) @ g_w,
                                   rtol=1e-9, atol=1e-12)
    assert "k_proj" not in grads["self_attn"] and "gate_proj" not in grads["mlp"]  # not targeted: no adapters


def test_merged_weights_give_the_lora_forward():
    """Scanned layers: the merge adds s A B per layer of the stacked kernels (the unscanned export
    is checked against PEFT's forward below)."""
    model, base = model_and_params(True)
    config = lora.LoraConfig(rank=4, alpha=8.0)
    adapters = random_adapters(base, config)
    got = model.apply(lora.merge(base, adapters, config), IDS, MASK)
    want = lora.lora_model(model, config).apply(lora.join(base, adapters), IDS, MASK)
    # float32, |logits| ~ 10: x W + s (x A) B and x (W + s A B) round differently (~1e-6 relative per matmul,
    # through 2 layers); 1e-4 absolute is far below any adapter's effect (the adapters move logits by O(1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-5)
    assert np.max(np.abs(np.asarray(want) - np.asarray(model.apply(base, IDS, MASK)))) > 0.1


def preference_batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, SMALL["vocab_size"], (4, 8)).astype(np.int32)
    ones = np.ones((4, 8), np.int32)
    loss_mask = np.zeros((4, 8), np.int32)
    loss_mask[:, 4:] = 1
    return PreferenceBatch(chosen_ids=ids, chosen_attention=ones, chosen_loss_mask=loss_mask,
                           rejected_ids=ids[::-1].copy(), rejected_attention=ones, rejected_loss_mask=loss_mask,
                           ref_chosen_logps=jnp.asarray(rng.normal(-20, 1, 4), jnp.float32),
                           ref_rejected_logps=jnp.asarray(rng.normal(-20, 1, 4), jnp.float32),
                           weight=jnp.ones(4, jnp.float32))


def test_sgpo_step_at_eps_zero_with_an_exact_loss_is_the_dpo_step_with_lora():
    """Margin space with the exact -log sigmoid loss: at eps = 0 the follower moves nothing, so the
    leader minimizes the DPO loss; both steps update only the adapters."""
    import optax

    model, base = model_and_params(True)
    config = lora.LoraConfig(rank=2, alpha=4.0)
    adapters = random_adapters(base, config)
    logps_fn = lora.lora_logps_fn(model, config, chunk_size=4)
    states = {}
    for mode in ("dpo", "sgpo"):
        step_config = SGPOConfig(mode=mode, beta=0.5, space="margin", loss="neg_log_sigmoid", epsilon=0.0)
        state = TrainState.create(apply_fn=model.apply, params=adapters, tx=optax.sgd(0.1), config=step_config,
                                  rng=jax.random.PRNGKey(0), logps_fn=logps_fn, frozen=base)
        states[mode], metrics = jax.jit(sgpo_step)(state, preference_batch())
        assert np.isfinite(float(metrics["loss"]))
    dpo, sgpo = states["dpo"], states["sgpo"]
    assert jax.tree.structure(dpo.params) == jax.tree.structure(adapters)  # the state trains the adapters only
    for x, y, z in zip(jax.tree.leaves(dpo.params), jax.tree.leaves(sgpo.params), jax.tree.leaves(adapters)):
        assert np.max(np.abs(np.asarray(x) - np.asarray(z))) > 0  # every adapter moved
        # the same loss through two code paths (DPO's log-sigmoid vs the follower's atoms at their centers)
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(dpo.frozen), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # the base never moves


def test_peft_loads_our_adapters_with_our_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                         tie_word_embeddings=False)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(tmp_path / "base")
    cfg, base, _ = from_pretrained(tmp_path / "base", scan_layers=True)
    config = lora.LoraConfig(rank=3, alpha=7.0, targets=("q", "v", "o", "gate", "down"))
    adapters = random_adapters(base, config)
    save_peft_adapters(tmp_path / "peft", jax.device_get(adapters), cfg, config, str(tmp_path / "base"))
    torch_model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft").eval()
    with torch.no_grad():
        want = torch_model(torch.tensor(np.asarray(IDS), dtype=torch.long)).logits.numpy()
    got = lora.lora_model(Decoder(cfg), config).apply(lora.join(base, adapters), IDS)
    assert np.max(np.abs(want - torch_model.get_base_model()(torch.tensor(np.asarray(IDS))).logits.detach().numpy())
                  ) == 0  # get_base_model() still carries the adapters: same forward
    # float32 in two frameworks (different matmul kernels and summation orders)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)
    with torch.no_grad(), torch_model.disable_adapter():
        off = torch_model(torch.tensor(np.asarray(IDS), dtype=torch.long)).logits.numpy()
    assert np.max(np.abs(off - want)) > 1e-2  # the adapters matter: the comparison above is not vacuous


# -- end to end on the tiny config ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "prefs.jsonl")


@pytest.fixture(autouse=True)
def _configs_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def lora_tiny(tokenizer_dir, data_file, **overrides):
    config = tiny(tokenizer_dir, data_file, **{**dict(train__mode="dpo", train__max_steps=4, checkpoint__every=2),
                                               **overrides})
    config.model.lora.rank = 4
    config.model.lora.alpha = 8.0
    return config


def test_lora_run_references_the_base_checkpoints_adapters_and_exports_both(tokenizer_dir, data_file, tmp_path):
    full = tiny(tokenizer_dir, data_file, train__mode="dpo", train__max_steps=1, export=False)
    runner.run(full, tmp_path / "full")
    summary = runner.run(lora_tiny(tokenizer_dir, data_file), tmp_path / "lora")
    assert summary["step"] == 4
    (full_cache,) = (tmp_path / "full" / "cache").glob("reference_logps_*.npz")
    (lora_cache,) = (tmp_path / "lora" / "cache").glob("reference_logps_*.npz")
    assert lora_cache.name == full_cache.name  # the same key: the reference is the base weights
    with np.load(full_cache) as a, np.load(lora_cache) as b:
        np.testing.assert_array_equal(a["chosen"], b["chosen"])  # adapters off == the base model, exactly
        np.testing.assert_array_equal(a["rejected"], b["rejected"])
    # the checkpoint holds the adapters and their optimizer state only: every saved array under the
    # parameters and the Adam moments is an adapter (orbax's tree metadata lists the saved leaves)
    def saved_leaves(run, step):
        meta = json.loads((tmp_path / run / "checkpoints" / str(step) / "state" / "_METADATA").read_text())
        return [tuple(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()
                if v["value_metadata"].get("value_type") != "None"]

    lora_weights = [k for k in saved_leaves("lora", 4) if "params" in k or "mu" in k or "nu" in k]
    assert lora_weights and all(k[-1] in ("kernel_lora_a", "kernel_lora_b") for k in lora_weights), lora_weights
    assert any(k[-1] == "embedding" for k in saved_leaves("full", 1))  # the full run saves the base weights
    base_names = ("embedding", "kernel", "scale")  # no base weight anywhere in the LoRA checkpoint (frozen part too)
    assert not [k for k in saved_leaves("lora", 4) if k[-1] in base_names]
    # the exports: the merged model in the HF layout, the adapters with PEFT's names
    assert (tmp_path / "lora" / "export" / "config.json").is_file()
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "lora" / "export_peft" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (32, 4)
    assert len(tensors) == 2 * 7 * 2  # layers x targets x (A, B)
    assert any(np.any(v) for k, v in tensors.items() if "lora_B" in k)  # B trained away from zero


def test_lora_resume_after_a_kill_gives_the_same_adapters(tokenizer_dir, data_file, tmp_path, monkeypatch):
    from sgpo_jax.training import trainer as trainer_lib

    config = lora_tiny(tokenizer_dir, data_file)
    runner.run(config, tmp_path / "straight")
    run = trainer_lib.run_step

    def crash_at_step_4(step_fn, state, batch, cfg):
        if int(state.step) == 3:
            raise RuntimeError("simulated kill")
        return run(step_fn, state, batch, cfg)

    monkeypatch.setattr(trainer_lib, "run_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        runner.run(config, tmp_path / "resumed")
    monkeypatch.setattr(trainer_lib, "run_step", run)
    assert runner.run(config, tmp_path / "resumed")["step"] == 4  # from the step-2 checkpoint
    from safetensors.numpy import load_file

    a = load_file(Path(tmp_path / "straight" / "export_peft" / "adapter_model.safetensors"))
    b = load_file(Path(tmp_path / "resumed" / "export_peft" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])  # same program, same inputs: bitwise


NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)  # the QLoRA paper's NormalFloat4 code book (Dettmers et al.)


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_qlora_forward_is_the_forward_with_the_dequantized_base(quantize):
    model, base = model_and_params(True)
    config = lora.LoraConfig(rank=2, alpha=4.0, quantize=quantize)
    adapters = random_adapters(base, config)
    quantized = lora.quantize_base(base, model, config)
    by_hand = jax.tree.map(lambda x: x, base)  # W = code(q) * scale, one scale per output channel and layer
    for parent, module in [("self_attn", m) for m in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
            ("mlp", m) for m in ("gate_proj", "up_proj", "down_proj")]:
        leaf = quantized["params"]["layers"][parent][module]["kernel"].array
        q, scale = np.asarray(leaf.qvalue).astype(np.int32), np.asarray(leaf.scale)
        assert scale.shape == (2, 1, base["params"]["layers"][parent][module]["kernel"].shape[-1])
        codes = q.astype(np.float32) if quantize == "int8" else NF4[q]
        by_hand["params"]["layers"][parent][module]["kernel"] = jnp.asarray(codes * scale)
        w = np.asarray(base["params"]["layers"][parent][module]["kernel"])
        step = np.abs(w).max(axis=1, keepdims=True) / (127 if quantize == "int8" else 1)  # absmax per channel
        assert np.max(np.abs(codes * scale - w) / step) <= (0.5 + 1e-5 if quantize == "int8" else 0.2)
    got = lora.lora_model(model, config).apply(lora.join(quantized, adapters), IDS, MASK)
    want = lora.lora_model(model, dataclasses.replace(config, quantize="")).apply(lora.join(by_hand, adapters), IDS,
                                                                                   MASK)
    # float32: x (q s) vs (x q) s or a dequantize-then-dot in another order; |logits| ~ 10
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=5e-5, rtol=1e-5)
    merged = model.apply(lora.merge(quantized, adapters, config), IDS, MASK)
    np.testing.assert_allclose(np.asarray(merged), np.asarray(want), atol=1e-4, rtol=1e-5)  # as the merge test


def test_qlora_trains_end_to_end(tokenizer_dir, data_file, tmp_path):
    config = lora_tiny(tokenizer_dir, data_file, train__max_steps=2, export=False)
    config.model.lora.quantize = "int8"
    summary = runner.run(config, tmp_path)
    assert summary["step"] == 2 and np.isfinite(summary["metrics"]["loss"])
    # the reference is the quantized policy at init, so the first step's rewards vanish; not bitwise: the
    # reference pass and the step are different compiled programs (float32 sums of ~20 token log-probs)
    first = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    assert abs(first["loss"] - np.log(2)) < 1e-5


def test_planner_counts_lora_adapters_only_for_gradients_and_moments():
    from sgpo_jax.training import memory

    cfg = DecoderConfig(**memory.MODEL_PRESETS["llama3-8b"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        remat=True, scan_layers=True)
    plan = memory.estimate(cfg, {"fsdp": 1}, batch_size=8, seq_len=2048, logps_chunk=256,
                           lora=lora.LoraConfig(rank=16))
    full = memory.estimate(cfg, {"fsdp": 1}, batch_size=8, seq_len=2048, logps_chunk=256)
    # r (in + out) per projection: q, o 4096 + 4096; k, v 4096 + 1024; gate, up, down 4096 + 14336; 32 layers
    adapters = 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)
    assert adapters == 41_943_040  # PEFT's trainable count for Llama-3-8B, r = 16, all linear projections
    assert plan.components["gradients"] == adapters * 4 and plan.components["optimizer"] == 2 * adapters * 4
    assert plan.components["parameters"] == full.components["parameters"] + adapters * 4
    assert plan.total < 80e9 * 0.92 < full.lower_bound  # fits one 80 GB GPU; full fine-tuning cannot


def test_ssapo_rounds_merge_their_adapters_and_reference_the_previous_policy(tmp_path, monkeypatch):
    """Round 1's reference weights are round 0's merged policy (adapters off on the new base): the
    weights the trainer keys its reference cache with are the arrays the previous merge produced."""
    from sgpo_jax.training import trainer as trainer_lib

    from tiny_run import ssapo_config, write_ssapo_files

    config = ssapo_config(write_ssapo_files(tmp_path), ssapo__pool_sizes=(8,), ssapo__seed_epochs=1, export=False,
                          eval__tasks="")
    config.model.lora.rank = 4
    merged, references = [], []
    merge, key = lora.merge, trainer_lib.cache_key
    monkeypatch.setattr(lora, "merge", lambda *a: merged.append(merge(*a)) or merged[-1])
    monkeypatch.setattr(trainer_lib, "cache_key", lambda ref, fp: references.append(ref) or key(ref, fp))
    runner.run(config, tmp_path / "run")
    assert len(merged) == 2 and len(references) == 2  # round 0 (seed DPO) and round 1
    before, after = jax.tree.leaves(references[0]), jax.tree.leaves(merged[0])
    assert any(np.max(np.abs(np.asarray(a) - np.asarray(b))) > 0 for a, b in zip(before, after))  # round 0 trained
    assert jax.tree.structure(references[1]) == jax.tree.structure(merged[0])
    for a, b in zip(jax.tree.leaves(references[1]), after):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("quantize", ["", "nf4"])
def test_bf16_compute_applies_the_float32_adapters_and_returns_float32_gradients(quantize):
    """The recipes' setting: bf16 compute on float32 weights. qwix must still find the (cast) kernels;
    with QLoRA the float32 scales are cast too (else the scanned layer's carry turns float32)."""
    cfg = DecoderConfig(**SMALL, scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    model, ones = Decoder(cfg), jnp.ones_like(IDS)
    base = model.init(jax.random.PRNGKey(0), IDS)
    config = lora.LoraConfig(rank=2, alpha=4.0, quantize=quantize)
    adapters = random_adapters(base, config)
    logps = lora.lora_logps_fn(model, config, chunk_size=4)
    plain = decoder_logps_fn(model, chunk_size=4)
    base = lora.quantize_base(base, model, config) if quantize else base
    got = np.asarray(logps((base, adapters), IDS, ones, ones))
    merged = np.asarray(plain(lora.merge(base, adapters, config), IDS, ones, ones))
    # bf16 activations (8-bit mantissa) through 2 layers, rounded differently in the two forms; sums of 5 tokens
    np.testing.assert_allclose(got, merged, rtol=2e-2)
    assert np.min(np.abs(got - np.asarray(plain(lora.dequantize_base(base), IDS, ones, ones)))) > 0.5  # adapters on
    grads = jax.grad(lambda a: logps((base, a), IDS, ones, ones).sum())(adapters)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


# -- the frozen base: one copy, not donated; QLoRA's leaves sharded like their kernel ----------------


def test_the_step_donates_the_adapters_state_only_and_reads_the_base_in_place(quantize="nf4"):
    """Oracles: XLA's ``memory_analysis()`` of the compiled QLoRA step on a 4-device (fsdp 2, tensor 2)
    mesh (aliased bytes = what is donated; argument bytes = what is read), the device buffers
    themselves, and the same step unsharded on one device. (The unquantized base: the trainer test below.)"""
    import optax

    from sgpo_jax.core.step import make_sgpo_step
    from sgpo_jax.parallel import mesh as mesh_lib
    from sgpo_jax.parallel import sharding
    from sgpo_jax.training import memory

    model, base = model_and_params(True)
    config = lora.LoraConfig(rank=2, alpha=4.0, quantize=quantize)
    mesh = mesh_lib.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    frozen, adapters = lora.frozen_and_adapters(sharding.shard_params(base, mesh), model, config,
                                                jax.random.PRNGKey(1))
    adapters = random_adapters(base, config)  # B != 0: the comparison below sees B's path
    state = TrainState.create(apply_fn=model.apply, params=adapters, tx=optax.adamw(1e-2),
                              config=SGPOConfig(mode="dpo"), rng=jax.random.PRNGKey(0),
                              logps_fn=lora.lora_logps_fn(model, config, chunk_size=4), frozen=frozen)
    unsharded, want = jax.jit(sgpo_step)(state, preference_batch())
    state_sharding = sharding.param_sharding(state, mesh)
    state = jax.device_put(state, state_sharding)
    step = make_sgpo_step(mesh, state, batch_axes=mesh_lib.BATCH_AXES, state_sharding=state_sharding)
    batch = sharding.place_rows(mesh, preference_batch())[0]
    m = step.lower(state, batch).compile().memory_analysis()
    on_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
    trainable = on_device((state.step, state.params, state.opt_state, state.rng))  # float32 / int32: exact
    assert m.alias_size_in_bytes == trainable  # donated: the adapters, their moments, step and rng; not the base
    plan = memory.estimate(model.cfg, {"fsdp": 2, "tensor": 2}, batch_size=4, seq_len=8, logps_chunk=4,
                           lora=config)
    frozen_read = m.argument_size_in_bytes - trainable - on_device(batch)  # XLA's bytes (nf4 packed, 4 bits)
    assert plan.components["parameters"] - on_device(state.params) == frozen_read  # the planner's base, exactly
    # codes split like their kernel, per-channel scales like its output axis (not replicated)
    kernel = sharding.spec_for("params/layers/self_attn/q_proj/kernel", (2, 16, 16), mesh)
    leaf = state.frozen["params"]["layers"]["self_attn"]["q_proj"]["kernel"].array
    assert leaf.qvalue.sharding.spec == kernel == P(None, "fsdp", "tensor")
    assert leaf.scale.sharding.spec == P(None, None, "tensor")
    buffers = lambda tree: [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) for s in x.addressable_shards]
    before, old = buffers(state.frozen), state
    state, metrics = step(state, batch)
    assert all(x.is_deleted() for x in jax.tree.leaves(old.params))  # donated
    assert not any(x.is_deleted() for x in jax.tree.leaves(old.frozen)) and buffers(state.frozen) == before
    # the same step on one device: float32 sums in another order over the split rows and columns
    np.testing.assert_allclose(float(metrics["loss"]), float(want["loss"]), rtol=1e-5)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(unsharded.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_the_trainer_trains_on_the_callers_base_without_a_copy(tokenizer_dir, data_file, tmp_path):
    """The trainer's frozen base is the caller's device buffers (no copy) and stays valid after the run."""
    from sgpo_jax.data.pairs import load_pairs
    from sgpo_jax.parallel import sharding
    from sgpo_jax.training.trainer import Trainer

    config = lora_tiny(tokenizer_dir, data_file, train__max_steps=2)
    ready = runner.setup(config)
    params = sharding.shard_params(ready.params, ready.mesh)  # placed as the trainer places them
    values = jax.device_get(params)
    pairs, _ = load_pairs(config.data, ready.tokenizer)
    trainer = Trainer(config, tmp_path, model=ready.model, params=params, pairs=pairs, mesh=ready.mesh)
    buffers = lambda tree: [s.data.unsafe_buffer_pointer() for x in jax.tree.leaves(tree) for s in x.addressable_shards]
    assert buffers(trainer.state.frozen) == buffers(params)
    trainer.run()
    assert trainer.step == 2 and buffers(trainer.state.frozen) == buffers(params)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(values)):
        np.testing.assert_array_equal(np.asarray(x), y)  # not deleted, not changed
