"""Attention kernels (``DecoderConfig.attention``): every kernel equals the blocked einsum ("xla").

On CPU the fused kernels run through their own code paths with ``attention._CPU_STANDIN`` set: the
cuDNN path (same ``jax.nn.dot_product_attention`` call, masks, GQA layout and window) with
``implementation="xla"`` instead of ``"cudnn"``, and Pallas splash attention (same masks,
segment ids, per-kv-head vmaps) in Pallas interpret mode. On a GPU/TPU (``bench/device_check.py``
runs this file there) the same tests also run the real kernels where the backend has them.

Tolerances, float32: the kernels compute the same sums in another order (the einsum scores a
query block against its visible keys only, the others score all ``T`` keys with masked ones
contributing exact zeros; splash uses an online softmax over key blocks), so values differ by a few
float32 ulps (2^-23 ~ 1.2e-7 relative) accumulated over T = 128 keys and D = 8 head dims, then
through 2 layers. Logits are ~0.4 at most: measured differences <= 9e-8 (3 ulps), bound
``atol 1e-6``. Gradients sum over B * T = 256 positions as well; compared relative to each leaf's
largest entry: measured <= 8e-7, bound ``1e-5``. A mask off by one key (window 6 instead of 5)
moves logits by ~9e-2, far outside both.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgpo_jax import compat, console
from sgpo_jax.models import attention
from sgpo_jax.models.attention import attention_kernel
from sgpo_jax.models.llama import Decoder, DecoderConfig

T = 128  # splash's smallest block; the einsum path runs 4 query blocks of 32


def _cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, attention_block=32)
    base.update(kw)
    return DecoderConfig(**base)


def _batch(padding):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (2, T)).astype(np.int32)
    mask = np.ones((2, T), np.int32)
    if padding == "left":
        mask[0, :9], mask[1, :70] = 0, 0
    else:
        mask[0, -9:], mask[1, -70:] = 0, 0
    weights = rng.normal(size=(2, T, 64)).astype(np.float32)
    return jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(weights)


def _values_and_grads(cfg, params, ids, mask, weights):
    """Logits and the gradient of a loss over real tokens only (padding outputs are unspecified)."""
    model = Decoder(cfg)

    def loss(p):
        logits = model.apply(p, ids, mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits * weights, 0.0)), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits)[np.asarray(mask) > 0], grads


@functools.lru_cache(maxsize=None)
def _reference(padding, window, remat_scan):
    """``(cfg, params, batch, logits, grads)`` of the einsum path, shared by the kernels' tests."""
    cfg = _cfg(sliding_window=window, remat=remat_scan, scan_layers=remat_scan, attention="xla")
    if jax.default_backend() != "cpu":  # the real kernels: compute in their dtype
        cfg = dataclasses.replace(cfg, dtype=jnp.bfloat16)
    ids, mask, weights = _batch(padding)
    params = Decoder(cfg).init(jax.random.PRNGKey(1), ids, mask)
    return (cfg, params, (ids, mask, weights)) + _values_and_grads(cfg, params, ids, mask, weights)


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setattr(attention, "_CPU_STANDIN", jax.default_backend() == "cpu")


CASES = [  # (padding, sliding_window, remat + scan_layers)
    ("left", None, False),
    ("right", 5, False),
    ("left", 5, True),
    ("right", None, True),
]


@pytest.mark.parametrize("kernel", ["cudnn", "splash"])
@pytest.mark.parametrize("padding,window,remat_scan", CASES)
def test_kernel_matches_einsum(standin, kernel, padding, window, remat_scan):
    """Values at real tokens and all parameter gradients equal the blocked einsum's: GQA (4 query
    heads on 2 kv heads), left/right padding, Mistral's sliding window, remat + scan."""
    fused = dataclasses.replace(_cfg(sliding_window=window, remat=remat_scan, scan_layers=remat_scan,
                                     attention=kernel))
    try:
        assert attention_kernel(fused, T) == kernel
    except ValueError as err:
        pytest.skip(f"{kernel} does not run on this backend: {err}")
    cfg, params, (ids, mask, weights), ref, ref_grads = _reference(padding, window, remat_scan)
    fused = dataclasses.replace(cfg, attention=kernel)
    out, grads = _values_and_grads(fused, params, ids, mask, weights)
    # bf16 (device runs): 2^-8 relative per rounding; the float32 reasons are in the docstring.
    atol, rtol = (1e-6, 1e-5) if cfg.dtype == jnp.float32 else (3e-2, 3e-2)
    np.testing.assert_allclose(out, ref, atol=atol, rtol=0)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        r = np.asarray(dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path])
        scale = np.abs(r).max()
        np.testing.assert_allclose(np.asarray(g), r, atol=rtol * scale, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_auto_on_cpu_is_exactly_xla():
    """``"auto"`` resolves to the einsum on CPU, silently, and gives bit-identical logits."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU resolution")
    cfg = _cfg(sliding_window=5)
    assert cfg.attention == "auto" and attention_kernel(cfg, T) == "xla"
    ids, mask, _ = _batch("left")
    params = Decoder(cfg).init(jax.random.PRNGKey(1), ids, mask)
    auto = jax.jit(Decoder(cfg).apply)(params, ids, mask)
    xla = jax.jit(Decoder(dataclasses.replace(cfg, attention="xla")).apply)(params, ids, mask)
    assert np.array_equal(np.asarray(auto), np.asarray(xla))


def test_explicit_fused_kernel_on_cpu_raises():
    """An explicit kernel that cannot run is a clear error (``"auto"`` is the falling-back choice)."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU resolution")
    with pytest.raises(ValueError, match="attention='cudnn' cannot run: it needs a CUDA GPU"):
        attention_kernel(_cfg(attention="cudnn", dtype=jnp.bfloat16), T)
    ids, mask, _ = _batch("right")
    params = Decoder(_cfg()).init(jax.random.PRNGKey(0), ids, mask)
    with pytest.raises(ValueError, match="attention='splash' cannot run: it needs a TPU and the target is 'cpu'"):
        Decoder(_cfg(attention="splash")).apply(params, ids, mask)


def test_shape_and_dtype_conditions(monkeypatch):
    """The conditions the fused kernels need, checked before tracing (with the CPU stand-in on)."""
    monkeypatch.setattr(attention, "_CPU_STANDIN", True)  # skip the platform check on any backend
    with pytest.raises(ValueError, match="multiple of 128"):
        attention_kernel(_cfg(attention="splash"), 96)
    with pytest.raises(ValueError, match="head_dim a multiple of 8"):
        attention_kernel(_cfg(attention="cudnn", head_dim=12), T)
    with pytest.raises(ValueError, match="even sequence length"):
        attention_kernel(_cfg(attention="cudnn"), 127)
    with pytest.raises(ValueError, match="attention must be one of"):
        _cfg(attention="flash")


def test_auto_fallback_says_why_once(monkeypatch):
    """``"auto"`` on a (pretend) CUDA backend with float32 compute falls back to the einsum with
    exactly one console line for the whole model (2 layers, traced twice)."""
    lines = []
    monkeypatch.setattr(compat, "accelerator", lambda: "cuda")
    monkeypatch.setattr(compat, "cuda_compute_capability", lambda: (9, 0))
    monkeypatch.setattr(console, "say", lines.append)
    monkeypatch.setattr(console, "_SAID", set())
    cfg = _cfg()
    ids, mask, _ = _batch("left")
    params = Decoder(cfg).init(jax.random.PRNGKey(0), ids, mask)
    Decoder(cfg).apply(params, ids, mask)
    assert lines == ["attention='auto': using 'xla' instead of 'cudnn' because it needs bfloat16 or float16 "
                     "compute, got dtype float32"]
    monkeypatch.setattr(compat, "accelerator", lambda: "tpu")
    assert attention_kernel(cfg, 100) == "xla" and "multiple of 128" in lines[-1] and len(lines) == 2


def test_kv_cache_path_keeps_einsum(standin):
    """With a cache (prefill + decode) every kernel runs the einsum: same logits as "xla"."""
    cfg = _cfg(attention="xla", sliding_window=5)
    ids, mask, _ = _batch("left")
    ids, mask = ids[:, :16], mask.at[:, :3].set(0)[:, :16]
    model = Decoder(cfg)
    params = model.init(jax.random.PRNGKey(0), ids, mask)
    outs = []
    for kernel in ("xla", "cudnn"):
        m = Decoder(dataclasses.replace(cfg, attention=kernel))
        logits, _ = m.apply(params, ids, mask, cache=m.init_cache(2, 20))
        outs.append(np.asarray(logits))
    assert np.array_equal(outs[0], outs[1])


def test_kernel_follows_the_compile_target(monkeypatch):
    """``"auto"`` resolves for the target set by ``compat.compile_target``, not the host: splash for
    a TPU target (the einsum, said once, where T is no multiple of 128), cuDNN for a CUDA target
    with bf16 compute; head_dim 256 needs compute capability 9.0."""
    lines = []
    monkeypatch.setattr(console, "say", lines.append)
    monkeypatch.setattr(console, "_SAID", set())
    with compat.compile_target("tpu"):
        assert compat.target_platform() == "tpu"
        assert attention_kernel(_cfg(), T) == "splash"
        assert attention_kernel(_cfg(), 100) == "xla" and "multiple of 128" in lines[-1]
    with compat.compile_target("cuda", (9, 0)):
        assert attention_kernel(_cfg(dtype=jnp.bfloat16), T) == "cudnn"
        assert attention_kernel(_cfg(dtype=jnp.bfloat16, head_dim=256), T) == "cudnn"
    with compat.compile_target("cuda", (8, 0)):
        with pytest.raises(ValueError, match="<= 128 on this GPU"):
            attention_kernel(_cfg(attention="cudnn", dtype=jnp.bfloat16, head_dim=256), T)
    assert compat.target_platform() == compat.accelerator()
    with pytest.raises(ValueError, match="platform must be one of"):
        with compat.compile_target("gpu"):
            pass


@pytest.mark.parametrize("kernel", ["xla", "cudnn", "splash"])
def test_init_is_the_same_with_every_kernel(kernel):
    """``Decoder.init`` on a 2-token dummy input (shorter than splash's 128-token block) works with
    every kernel setting, under a TPU target too, and gives the einsum's parameters bit for bit."""
    ids = jnp.zeros((1, 2), jnp.int32)
    ref = Decoder(_cfg(attention="xla")).init(jax.random.PRNGKey(3), ids)
    with compat.compile_target("tpu"):
        got = Decoder(_cfg(attention=kernel)).init(jax.random.PRNGKey(3), ids)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got, ref))


def _rows(n):
    """``n`` rows of the left/right padding patterns of :func:`_batch`."""
    ids, mask, weights = (np.concatenate([np.asarray(a), np.asarray(b)]) for a, b in zip(_batch("left"),
                                                                                           _batch("right")))
    reps = -(-n // 4)
    return tuple(jnp.asarray(np.tile(a, (reps,) + (1,) * (a.ndim - 1))[:n]) for a in (ids, mask, weights))


SHARDED = [  # (data, fsdp, tensor, rows): kv heads (2) over tensor and rows over data * fsdp where they divide
    (2, 2, 2, 4),  # both split (the replicated fallbacks cost another ~30 s of interpret mode: not run)
]


@pytest.mark.parametrize("data,fsdp,tensor,rows", SHARDED)
def test_sharded_splash_matches_einsum(standin, data, fsdp, tensor, rows):
    """Splash under ``shard_map`` on a data/fsdp/tensor mesh of the 8 CPU devices (Pallas interpret
    mode) gives the einsum's values and gradients (tolerances as the unsharded test: the docstring's
    float32 reasoning; sharding only splits rows and heads, which attention never mixes)."""
    if jax.default_backend() != "cpu" or jax.device_count() < 8:
        pytest.skip("8 fake CPU devices")
    from sgpo_jax.parallel.mesh import make_mesh
    from sgpo_jax.parallel.sharding import activation_sharding

    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    cfg = _cfg(sliding_window=5, attention="xla", num_hidden_layers=1)  # one layer: interpret mode is slow
    ids, mask, weights = _rows(rows)
    params = Decoder(cfg).init(jax.random.PRNGKey(1), ids, mask)

    def run(kernel):
        model = Decoder(dataclasses.replace(cfg, attention=kernel))

        def loss(p):
            with activation_sharding(mesh):
                logits = model.apply(p, ids, mask)
            return jnp.sum(jnp.where(mask[..., None] > 0, logits * weights, 0.0)), logits

        fn = jax.value_and_grad(loss, has_aux=True)
        return jax.make_jaxpr(fn)(params), jax.jit(fn)(params)

    _, ((_, ref), ref_grads) = run("xla")
    jaxpr, ((_, out), grads) = run("splash")
    assert "shard_map" in str(jaxpr)
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-6, rtol=0)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * np.abs(r).max(), rtol=0,
                                   err_msg=jax.tree_util.keystr(path))
