"""Meshes and name-rule sharding on 8 fake CPU devices: same numbers as unsharded, 1/8 memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgpo_jax.core.losses import sequence_logps
from sgpo_jax.core.step import SGPOConfig, TrainState, make_sgpo_step, sgpo_step
from sgpo_jax.models import Decoder, DecoderConfig
from sgpo_jax.parallel import mesh as mesh_lib
from sgpo_jax.parallel import sharding

from toy import random_batch

CFG = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2)


def _model(cfg=CFG, seed=0):
    model = Decoder(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    return model, model.init(jax.random.PRNGKey(seed), ids, jnp.ones_like(ids))


def _tokens(batch=8, length=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, CFG.vocab_size, (batch, length)), jnp.int32)
    lengths = rng.integers(3, length + 1, batch)
    mask = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)
    return ids, mask


def test_make_mesh_sizes_and_errors():
    mesh = mesh_lib.make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(mesh_lib.make_mesh(data=1, fsdp=-1).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    with pytest.raises(ValueError, match="there are 8 devices"):
        mesh_lib.make_mesh(data=3, fsdp=1, tensor=1)
    with pytest.raises(ValueError, match="at most one -1"):
        mesh_lib.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_lib.make_mesh(data=-1, fsdp=3)


def test_pure_fsdp_puts_an_eighth_of_the_parameters_on_each_device():
    _, params = _model()
    mesh = mesh_lib.make_mesh(data=1, fsdp=8, tensor=1)
    placed = sharding.shard_params(params, mesh)
    leaves = jax.tree.leaves(placed)
    total = sum(x.size for x in leaves)
    replicated = sum(x.size for x in leaves if x.sharding.is_fully_replicated)  # the norm weights
    for device in jax.devices():
        held = sum(s.data.size for x in leaves for s in x.addressable_shards if s.device == device)
        assert held == (total - replicated) // 8 + replicated
    assert replicated < 0.01 * total


def test_rules_follow_the_megatron_split():
    _, params = _model()
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    specs = sharding.param_sharding(params, mesh)
    layer = specs["params"]["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert layer["self_attn"]["o_proj"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert layer["input_layernorm"]["weight"].spec == jax.sharding.PartitionSpec()
    assert specs["params"]["embed_tokens"]["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")


def test_scanned_layers_get_an_unsharded_leading_axis():
    _, params = _model(dataclasses.replace(CFG, scan_layers=True))
    mesh = mesh_lib.make_mesh(data=2, fsdp=2, tensor=2)
    spec = sharding.param_sharding(params, mesh)["params"]["layers"]["mlp"]["up_proj"]["kernel"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_indivisible_dimension_fails_clearly():
    mesh = mesh_lib.make_mesh(data=1, fsdp=8, tensor=1)
    with pytest.raises(ValueError, match=r"up_proj/kernel of shape \(60, 128\).*60 is not divisible"):
        sharding.spec_for("params/layers_0/mlp/up_proj/kernel", (60, 128), mesh)
    odd = dataclasses.replace(CFG, hidden_size=36, num_attention_heads=3, num_key_value_heads=3, head_dim=12)
    _, params = _model(odd)
    with pytest.raises(ValueError, match="not divisible by mesh axes"):
        sharding.shard_params(params, mesh)


@pytest.mark.parametrize("shape", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)],
                         ids=["fsdp8", "2x2x2"])
def test_sharded_forward_and_gradients_equal_unsharded(shape):
    model, params = _model()
    ids, mask = _tokens()
    loss_mask = mask.at[:, :2].set(0)

    def loss(p, ids, mask):
        return -jnp.mean(sequence_logps(model.apply(p, ids, mask), ids, loss_mask))

    ref_logits = jax.jit(model.apply)(params, ids, mask)  # one device (jit: op-by-op costs seconds per op kind)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, ids, mask)

    mesh = mesh_lib.make_mesh(**shape)
    placed = sharding.shard_params(params, mesh)
    batch = sharding.batch_sharding(mesh)
    s_ids, s_mask = jax.device_put(ids, batch), jax.device_put(mask, batch)
    logits = jax.jit(model.apply)(placed, s_ids, s_mask)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(placed, s_ids, s_mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    assert float(got_loss) == pytest.approx(float(ref_loss), rel=1e-5)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(got_grads)):  # float32 reduction order
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_fsdp_train_state_step_equals_unsharded():
    """The whole TrainState (params and Adam moments) sharded by the same rules."""
    model, params = _model()
    config = SGPOConfig(mode="sgpo", epsilon=0.05, beta=0.5)
    make = lambda: TrainState.create(apply_fn=model.apply, params=jax.tree.map(jnp.copy, params),
                                     tx=optax.adam(1e-3), config=config, rng=jax.random.PRNGKey(0))
    batch = random_batch(seed=7, pairs=8, vocab=CFG.vocab_size, pad_rows=1)
    ref_state, ref_metrics = jax.jit(sgpo_step)(make(), batch)

    mesh = mesh_lib.make_mesh(data=2, fsdp=4, tensor=1)
    state = make()
    state_sharding = sharding.param_sharding(state, mesh)
    mu = state_sharding.opt_state[0].mu["params"]["layers_1"]["mlp"]["gate_proj"]["kernel"]
    assert mu.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # optimizer state follows params
    step = make_sgpo_step(mesh, state, batch_axes=mesh_lib.BATCH_AXES, state_sharding=state_sharding)
    state = jax.device_put(state, state_sharding)
    hlo = step.lower(state, sharding.place_rows(mesh, batch)[0]).as_text()
    assert hlo.count("sharding_constraint") >= CFG.num_hidden_layers + 1  # activation constraints per layer
    got_state, got_metrics = step(state, sharding.place_rows(mesh, batch)[0])
    for name in ("loss", "grad_norm", "follower/dual", "rewards/margins"):
        assert float(got_metrics[name]) == pytest.approx(float(ref_metrics[name]), rel=1e-4, abs=1e-6), name
    for a, b in zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(got_state.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
