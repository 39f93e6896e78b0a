"""The memory planner against XLA's own accounting of the compiled training step.

Oracle: ``make_sgpo_step(...).lower(state, batch).compile().memory_analysis()`` of the real
jitted, sharded, donated step on the fake CPU devices; its peak is ``arguments + temporaries +
outputs - aliased outputs`` (the donated state is updated in place). The estimate must be within
a factor 1.5 of it, the planner's lower bound must not exceed it, and the state (parameters and
optimizer moments, sharded by the name rules) must match the argument bytes to 1%.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, make_sgpo_step
from sgpo_jax.models import Decoder, DecoderConfig, decoder_logps_fn
from sgpo_jax.parallel import mesh as mesh_lib
from sgpo_jax.parallel import sharding
from sgpo_jax.training import memory

TOLERANCE = 1.5  # estimate / measured in [1 / 1.5, 1.5]
CHUNK = 32
BASE = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32)
CASES = {  # name: (DecoderConfig overrides, (data, fsdp, tensor), pairs, length, micro-batches)
    "1 device": ({}, (1, 1, 1), 8, 128, 1),
    "1 device, remat": (dict(remat=True, scan_layers=True), (1, 1, 1), 8, 128, 1),
    "1 device, 2 micro-batches": ({}, (1, 1, 1), 8, 128, 2),
    "1 device, tied 4k vocab": (dict(num_hidden_layers=2, vocab_size=4096, tie_word_embeddings=True), (1, 1, 1),
                                8, 128, 1),
    "8 devices fsdp": ({}, (1, 8, 1), 8, 128, 1),
    "8 devices fsdp, remat, T=256": (dict(remat=True, scan_layers=True), (1, 8, 1), 16, 256, 1),
    "8 devices (2, 2, 2)": ({}, (2, 2, 2), 8, 128, 1),
}
_MEASURED = {}


def measured(name):
    """(peak bytes, argument bytes, plan) of a case, compiled once per session."""
    if name in _MEASURED:
        return _MEASURED[name]
    overrides, mesh_shape, pairs, length, parts = CASES[name]
    cfg = DecoderConfig(**{**BASE, **overrides})
    mesh = mesh_lib.make_mesh(*mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    model = Decoder(cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
    state = jax.eval_shape(lambda p: TrainState.create(
        apply_fn=model.apply, params=p, tx=tx, config=SGPOConfig(mode="sgpo", micro_batches=parts),
        rng=jax.random.PRNGKey(0), logps_fn=decoder_logps_fn(model, chunk_size=CHUNK)), params)
    tokens = jax.ShapeDtypeStruct((pairs, length), jnp.int32)
    scalars = jax.ShapeDtypeStruct((pairs,), jnp.float32)
    batch = PreferenceBatch(tokens, tokens, tokens, tokens, tokens, tokens, scalars, scalars, scalars)
    step = make_sgpo_step(mesh, state, batch_axes=mesh_lib.BATCH_AXES,
                          state_sharding=sharding.param_sharding(state, mesh))
    m = step.lower(state, batch).compile().memory_analysis()
    peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    plan = memory.estimate(cfg, dict(zip(("data", "fsdp", "tensor"), mesh_shape)), batch_size=pairs,
                           micro_batches=parts, seq_len=length, logps_chunk=CHUNK)
    _MEASURED[name] = (peak, m.argument_size_in_bytes, plan)
    return _MEASURED[name]


@pytest.mark.parametrize("name", list(CASES))
def test_estimate_brackets_the_compiled_footprint(name):
    peak, arguments, plan = measured(name)
    ratio = plan.total / peak
    assert 1 / TOLERANCE <= ratio <= TOLERANCE, f"{name}: estimate {plan.total:,.0f} vs measured {peak:,.0f}\n{plan}"
    assert plan.lower_bound <= peak, f"{name}: lower bound {plan.lower_bound:,.0f} > measured {peak:,.0f}\n{plan}"
    state_and_batch = plan.state_bytes + plan.components["batch"]
    assert abs(arguments - state_and_batch) <= 0.01 * arguments, (arguments, state_and_batch)


def test_fsdp_and_remat_move_memory_as_measured():
    one, one_args, one_plan = measured("1 device")
    eight, eight_args, eight_plan = measured("8 devices fsdp")
    assert one_args / eight_args == pytest.approx(8, rel=0.02)  # ZeRO-3: 1/8 of the state per device
    assert one_plan.state_bytes / eight_plan.state_bytes == pytest.approx(8, rel=0.02)
    remat, _, remat_plan = measured("1 device, remat")
    assert one / remat > 2 and one_plan.total / remat_plan.total > 2  # both see remat's saving
    two_mb, _, two_mb_plan = measured("1 device, 2 micro-batches")
    assert two_mb < one and two_mb_plan.total < one_plan.total


def test_param_count_of_a_known_model():
    tinyllama = DecoderConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                              num_attention_heads=32, num_key_value_heads=4, head_dim=64)
    assert memory.param_count(tinyllama) == 1_100_048_384  # TinyLlama-1.1B's published count


LLAMA_8B = DecoderConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, param_dtype=jnp.float32,
                         dtype=jnp.bfloat16, remat=True, scan_layers=True)
GB80 = 80e9


def test_check_refuses_clearly_impossible_plans_and_names_the_fix():
    no_remat = memory.estimate(LLAMA_8B, dict(fsdp=16), batch_size=64, seq_len=2048, remat=False, logps_chunk=256)
    with pytest.raises(memory.MemoryPlanError) as err:
        memory.check(no_remat, GB80)
    message = str(err.value)
    assert "cannot fit" in message and "model.remat=False" in message and "largest: activations" in message
    assert "Each of these alone would fit: model.remat=True" in message
    assert "| total" in message  # the table comes with it
    one_device = memory.estimate(LLAMA_8B, dict(), batch_size=8, seq_len=2048, logps_chunk=256)
    with pytest.raises(memory.MemoryPlanError, match="No single change fits: shard over more devices"):
        memory.check(one_device, GB80)  # fp32 weights + gradients + Adam alone are 128 GB

    with pytest.warns(ResourceWarning, match="may not fit"):  # estimate over, lower bound under
        memory.check(memory.estimate(LLAMA_8B, dict(fsdp=16), batch_size=32, seq_len=2048, remat=False,
                                     logps_chunk=256), GB80)
    recommended = memory.estimate(LLAMA_8B, dict(data=2, fsdp=8), batch_size=32, micro_batches=2, seq_len=2048,
                                  logps_chunk=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert memory.check(recommended, GB80) is recommended
        assert memory.check(no_remat, None) is no_remat  # unknown device memory (CPU): nothing to check
    assert recommended.total < 0.5 * GB80


def test_table_and_errors_are_readable():
    plan = memory.estimate(LLAMA_8B, dict(fsdp=16), batch_size=32, seq_len=2048, logps_chunk=256, device_bytes=GB80)
    text = str(plan)
    for row in ("parameters", "gradients", "optimizer", "activations", "log-probs", "total", "device memory"):
        assert f"| {row}" in text or row in text
    norms = 32 * 2 * 4096 + 4096  # replicated; everything else is split 16 ways
    assert plan.components["parameters"] == 4 * ((8_030_261_248 - norms) / 16 + norms)
    with pytest.raises(ValueError, match=r"train.batch_size \(30\) must be a multiple of train.micro_batches \(4\)"):
        memory.estimate(LLAMA_8B, dict(fsdp=16), batch_size=30, micro_batches=4, seq_len=2048)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        memory.estimate(LLAMA_8B, dict(fsdp=16), batch_size=32, seq_len=2048, optimizer="adafactor")
    with pytest.warns(UserWarning, match="does not split evenly over mesh.data \\* mesh.fsdp = 16"):
        memory.estimate(LLAMA_8B, dict(fsdp=16), batch_size=32, micro_batches=4, seq_len=2048)


def test_plan_for_run_reads_the_training_config():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from configs.llama import get_config

    config = get_config()
    config.train.micro_batches = 2
    plan = memory.plan_for_run(config, LLAMA_8B, dict(fsdp=16))
    direct = memory.estimate(LLAMA_8B, dict(fsdp=16), batch_size=32, micro_batches=2,
                             seq_len=max(config.data.buckets), param_dtype="float32", dtype="bfloat16", remat=True,
                             logps_chunk=config.model.logps_chunk)
    assert plan.components == direct.components
