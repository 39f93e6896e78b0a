"""Ahead-of-time compilation for a TPU slice this host does not have (``sgpo_jax.aot``).

libtpu (the ``aot`` extra, installed by the README's test command) describes a v5p-8 slice
(4 chips) without opening a device; the tiny config's programs are lowered on abstract inputs
and compiled by XLA:TPU. The oracles are independent of the code under test: XLA's own
``memory_analysis()`` against the state's bytes computed from shapes, dtypes and jax's shard
shapes; splash's structure (one forward and two backward Mosaic kernels per layer); XLA's own
out-of-memory verdict.
"""

import math
import os

import numpy as np
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # xdist workers may each load libtpu

import importlib.util  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs.tiny import get_config  # noqa: E402
from sgpo_jax import aot  # noqa: E402
from sgpo_jax.errors import ConfigError  # noqa: E402
from sgpo_jax.models import Decoder, DecoderConfig  # noqa: E402
from sgpo_jax.train import user_error_lines  # noqa: E402

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install -e '.[aot]')")

LAYERS = 2
# XLA:TPU lays arrays out in tiles of 128 lanes (and 8 sublanes) and allocates at least 512 bytes
# per buffer (an int32 scalar takes 512 B). The model below keeps every per-chip shard of every
# matrix a multiple of (8, 128) on this mesh, so only the scalars and short vectors are rounded up.
MIN_BUFFER = 512


def _config(mode="ssapo"):
    c = get_config()
    c.train.mode = mode
    c.data.source = "unused.jsonl"  # nothing is read: only shapes matter
    c.data.max_length, c.data.buckets, c.data.max_prompt_length = 128, (128,), 64  # splash's block is 128
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 2, 2
    c.ssapo.generation_batch_size, c.ssapo.max_new_tokens = 4, 8
    c.eval.tasks = ""  # the eval generation is the sampler's program with other sizes
    c.sgpo.follower = "step"  # in the step: no [B, J] atom arrays in the batch
    return c


def _model(config, vocab):
    r = config.model.random
    return DecoderConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                         tie_word_embeddings=r.tie_word_embeddings,
                         scan_layers=False, remat=False, attention="auto")


def test_target_names():
    """Cloud TPU slice names count TensorCores on v4/v5p (2 per chip) and chips on v5e/v6e; several
    slices multiply; GPUs by count and kind with their memory; anything else is one clear error."""
    assert (aot.parse_target("v5p-8").topology, aot.parse_target("v5p-8").chips) == ("v5p:2x2x1", 4)
    assert (aot.parse_target("v5p-32").topology, aot.parse_target("v5p-32").chips) == ("v5p:2x2x4", 16)
    assert (aot.parse_target("v5e-16").topology, aot.parse_target("v6e-8").topology) == ("v5e:4x4", "v6e:2x4")
    two = aot.parse_target("2xv5e-16")
    assert (two.num_slices, two.chips, two.topology) == (2, 32, "v5e:4x4")
    h100 = aot.parse_target("8xH100")
    assert (h100.platform, h100.topology, h100.cuda_capability, h100.hbm_bytes) == ("cuda", "1x1x8", (9, 0),
                                                                                     81559 * 2 ** 20)
    for bad in ("v5p-6", "tpu", "8xB300"):
        with pytest.raises(ConfigError, match="--target="):
            aot.parse_target(bad)


@pytest.fixture(scope="module", autouse=True)
def one_tpu_host():
    """libtpu reads TPU_WORKER_HOSTNAMES when it loads (no pod metadata here: one host, quietly).
    Only while this module runs: the CLI tests that follow on this worker inherit the environment,
    and sgpo_jax.parallel.distributed takes the variable for a TPU pod."""
    old = os.environ.get("TPU_WORKER_HOSTNAMES")
    os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"
    yield
    if old is None:
        del os.environ["TPU_WORKER_HOSTNAMES"]
    else:
        os.environ["TPU_WORKER_HOSTNAMES"] = old


@pytest.fixture(scope="module")
def report():
    config = _config()
    return config, aot.compile_run(config, "v5p-8", model_cfg=_model(config, 256))


def _tpu_bytes(shape, dtype):
    return max(MIN_BUFFER, math.prod(shape) * np.dtype(dtype).itemsize)


@needs_libtpu
def test_programs_compile_with_splash_on_a_sharded_mesh(report):
    """``attention=auto`` resolves to splash for the TPU target; the train step, the reference pass
    and the sampler compile on a data=1, fsdp=2, tensor=2 mesh of 4 v5p chips; the step holds
    splash's forward and two backward kernels per layer, the reference pass the forward one; the
    sampler (KV cache) none."""
    _, r = report
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2} and r["model"]["attention_kernel"] == "splash"
    programs = {p["program"]: p for p in r["programs"]}
    assert set(programs) == {"train_step", "reference_logps", "sample"}
    assert all(p["ok"] for p in programs.values()), [p.get("error") for p in programs.values()]
    assert programs["train_step"]["fused_attention_calls"] == {"tpu_custom_call": 3 * LAYERS}
    assert programs["reference_logps"]["fused_attention_calls"] == {"tpu_custom_call": LAYERS}
    assert programs["sample"]["fused_attention_calls"] == {}
    assert programs["train_step"]["collectives"].get("all-gather", 0) > 0  # fsdp gathers the weights


@needs_libtpu
def test_packed_rows_without_sharing_lower_to_splash_with_segment_ids():
    """On one v5p chip, the gradient of the log-probs of packed rows (2 rows of 128 slots, no
    branch ids) holds splash's forward and two backward kernels per layer, their "segmented"
    variants: the rows' segment ids are the kernel's (shared rows fall back to the einsum:
    tests/test_packing.py)."""
    import dataclasses

    from sgpo_jax import compat
    from sgpo_jax.models.logps import packed_pair_logps
    from sgpo_jax.models.packed import PackedPairs

    one_chip = jax.sharding.SingleDeviceSharding(aot.target_devices(aot.parse_target("v5p-8"))[0])
    model = Decoder(dataclasses.replace(_model(_config(), 256), attention="splash"))
    spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_chip)
    params = jax.tree.map(spec, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))))
    rows, chains = jax.ShapeDtypeStruct((2, 128), jnp.int32, sharding=one_chip), \
        jax.ShapeDtypeStruct((4, 64), jnp.int32, sharding=one_chip)
    packed = PackedPairs(ids=rows, positions=rows, segment_ids=rows, branch_ids=None, chosen_index=chains,
                         chosen_mask=chains, rejected_index=chains, rejected_mask=chains)
    loss = lambda p, b: sum(jnp.sum(x) for x in packed_pair_logps(model, p, b))
    with compat.compile_target("tpu"):
        text = jax.jit(jax.grad(loss)).lower(params, packed).compile().as_text()
    kernels = [line for line in text.splitlines() if "tpu_custom_call" in line]
    assert len(kernels) == 3 * LAYERS and all("splash_mqa" in k and "_segmented" in k for k in kernels)


@needs_libtpu
def test_step_arguments_are_the_sharded_state_exactly(report):
    """XLA's per-chip argument bytes of the step = the state's (params, AdamW moments, step, rng)
    and the batch's per-chip shards, each from its global shape, dtype and jax's shard shape under
    the trainer's shardings (plus TPU buffer padding, module constant)."""
    from sgpo_jax.config import sgpo_config
    from sgpo_jax.core.step import TrainState
    from sgpo_jax.models import decoder_logps_fn
    from sgpo_jax.parallel import sharding
    from sgpo_jax.training.trainer import make_optimizer

    config, r = report
    step = next(p for p in r["programs"] if p["program"] == "train_step")
    model = Decoder(_model(config, 256))
    ids = jnp.zeros((1, 2), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids))
    tx, _ = make_optimizer(config.train, 10)
    state = jax.eval_shape(lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=tx,
                                                       config=sgpo_config(config, mode="sgpo"),
                                                       rng=jax.random.PRNGKey(0),
                                                       logps_fn=decoder_logps_fn(model)), params)
    mesh = aot.target_mesh(config, aot.target_devices(aot.parse_target("v5p-8")))
    shardings = sharding.param_sharding(state, mesh)
    state_bytes = sum(_tpu_bytes(s.shard_shape(x.shape), x.dtype)
                      for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)))
    pairs, seq = config.train.batch_size, 128
    rows = pairs // 2  # the batch splits over data * fsdp = 2
    # 6 token arrays [B, T] int32; per pair: 2 reference log-probs and the weight, float32
    batch_bytes = 6 * _tpu_bytes((rows, seq), np.int32) + 3 * _tpu_bytes((rows,), np.float32)
    assert step["memory"]["argument"] == state_bytes + batch_bytes


@needs_libtpu
def test_oversized_run_is_refused_in_one_line():
    """The tiny model with 32768 pairs of 128 tokens per step on a 4-chip v5e slice (16 GiB each):
    16384 sequences per chip whose layer inputs alone (2 layers x 2M tokens x 256 x 4 B) take 4 GiB
    and the log-prob chunk's float32 logits more; XLA refuses the step or its peak exceeds the chip. The
    report becomes one ``error:`` line naming the program, and a hint naming the settings that
    reduce memory."""
    config = _config(mode="sgpo")
    config.train.batch_size = config.train.reference_batch_size = 32768
    r = aot.compile_run(config, "v5e-4", model_cfg=_model(config, 256))
    with pytest.raises(aot.ProgramDoesNotFit) as err:
        aot.refuse_if_oversized(r)
    lines = user_error_lines(err.value)
    assert len(lines) == 2 and lines[0].startswith("error: train_step does not fit v5e-4: "), lines
    assert "train.micro_batches" in lines[1] and "mesh.fsdp" in lines[1]
