r"""Training-step throughput and MFU of the jitted ``sgpo_step`` on an accelerator.

The step is the library's: ``make_sgpo_step`` over a mesh of the local devices, ``mode="sgpo"``
with the exact follower inside the step (epsilon 0.01, K = 6 tangents), reference log-probs
cached in the batch (computed once before timing, the trainer's design), log-probs through
``decoder_logps_fn`` (chunked head), AdamW with global-norm clipping, the state donated.
Parameters are float32 (master weights), compute ``--dtype`` (default bfloat16). The model is
random-initialized with the ``--preset`` shape (default TinyLlama-1.1B: V=32000, H=2048,
I=5632, 22 layers, 32 heads, 4 KV heads, head_dim 64, untied; 1,100,048,384 parameters).
Data: ``--pairs`` random token pairs of ``--seq`` tokens each (no padding), the loss on the
last ``--response`` positions of each sequence.

Model FLOPs per step: :func:`sgpo_jax.training.flops.model_flops` (its docstring has the formula:
fwd + bwd, the PaLM-paper convention; remat recomputation and the chunked head's backward
recomputation are *not* counted, so this is MFU, not HFU)::

    MFU = model_flops / step_time / (devices * peak_flops)

``peak_flops`` per device: ``--peak-flops``, else by ``device_kind``: H100 SXM and H200
989e12 (bf16 dense), H100 PCIe 756e12, H100 NVL 835e12, A100 312e12, TPU v5p 459e12, v5e
197e12, v4 275e12, v6e 918e12 (bf16); unknown kinds (and CPU) report no MFU. With
``--dtype float32`` the bf16 peak is still used unless you pass ``--peak-flops``.

Also reported: step time (median of ``--iters`` steps after ``--warmup`` untimed ones, each
blocked on), tokens/s, achieved TFLOP/s per device, XLA's own FLOP count of the compiled step
(``cost_analysis``: it includes recomputation but counts a loop body once, so with scanned
layers it is not comparable), compile time, compiled memory
(``memory_analysis``), the device's peak bytes in use, and the memory planner's estimate.

Imports only ``sgpo_jax.models``, ``step``, ``losses``, ``follower``, ``sharding`` (and
``sgpo_jax.training.memory`` when present): no ott, ml_collections or datasets.

    python bench/mfu.py                         # TinyLlama-1.1B shape, 8 pairs x 1024 tokens, remat
    python bench/mfu.py --preset=tiny           # a seconds-long CPU smoke run
    python bench/mfu.py --no-remat --pairs 4 --json mfu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

PRESETS = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, head_dim=64, rope_theta=10000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0),
}
PRESET_RUN = {"tinyllama-1.1b": dict(pairs=8, seq=1024, response=512, chunk=256),
              "tiny": dict(pairs=2, seq=64, response=32, chunk=16)}
PEAK_BF16 = [  # (substring of device_kind, FLOP/s); first match wins
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12),
    ("A100", 312e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v6", 918e12),
    ("TPU v4", 275e12),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    p.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--pairs", type=int, default=None, help="preference pairs per step (preset: 8, tiny 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (preset: 1024, tiny 64)")
    p.add_argument("--response", type=int, default=None, help="scored positions at the end of each sequence")
    p.add_argument("--chunk", type=int, default=None, help="log-prob head chunk (positions)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype")
    p.add_argument("--param-dtype", default="float32", help="parameter (master weight) dtype")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=True, help="rematerialize each layer")
    p.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True, help="scan over layers")
    p.add_argument("--attention-block", type=int, default=None, help="DecoderConfig.attention_block (default: "
                   "the library's)")
    p.add_argument("--mode", choices=("sgpo", "dpo"), default="sgpo", help="sgpo: exact follower in the step")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor over the local devices")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s (default: by device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    for key, value in PRESET_RUN[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.response < args.seq:
        p.error(f"--response must be in [1, --seq), got {args.response} with --seq {args.seq}")
    return args


def peak_for(kind: str):
    for needle, flops in PEAK_BF16:
        if needle.lower() in kind.lower():
            return flops
    return None


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, make_sgpo_step
    from sgpo_jax.models import Decoder, DecoderConfig, decoder_logps_fn
    from sgpo_jax.parallel import mesh as mesh_lib
    from sgpo_jax.parallel import sharding
    from sgpo_jax.training.flops import model_flops

    fields = dict(PRESETS[args.preset])
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    extra = {} if args.attention_block is None else dict(attention_block=args.attention_block)
    cfg = DecoderConfig(**fields, tie_word_embeddings=False, max_position_embeddings=max(2048, args.seq),
                        dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.param_dtype),
                        remat=args.remat, scan_layers=args.scan, **extra)
    devices = jax.local_devices()
    mesh = mesh_lib.make_mesh(*(int(x) for x in args.mesh.split(",")), devices=devices)
    model = Decoder(cfg)
    logps_fn = decoder_logps_fn(model, chunk_size=args.chunk)
    sgpo = SGPOConfig(mode=args.mode, beta=0.1, epsilon=0.01, num_tangents=6)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.0))

    # Parameters initialized directly into their shardings (never a host copy).
    ids0 = jnp.zeros((1, 2), jnp.int32)
    init = lambda key: model.init(key, ids0, jnp.ones_like(ids0))
    abstract = jax.eval_shape(init, jax.random.PRNGKey(args.seed))
    params = jax.jit(init, out_shardings=sharding.param_sharding(abstract, mesh))(jax.random.PRNGKey(args.seed))
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, config=sgpo,
                              rng=jax.random.PRNGKey(args.seed), logps_fn=logps_fn)
    state_sharding = sharding.param_sharding(state, mesh)
    state = jax.device_put(state, state_sharding)

    rng = np.random.default_rng(args.seed)
    shape = (args.pairs, args.seq)
    ones = np.ones(shape, np.int32)
    loss_mask = np.zeros(shape, np.int32)
    loss_mask[:, args.seq - args.response:] = 1
    chosen, rejected = (rng.integers(3, cfg.vocab_size, shape).astype(np.int32) for _ in range(2))
    batch_sharding = sharding.batch_sharding(mesh)
    put = lambda x: jax.device_put(jnp.asarray(x), batch_sharding)

    @jax.jit
    def reference(params, c, r, att, mask):  # the cached reference log-probs (computed once)
        return logps_fn(params, c, att, mask), logps_fn(params, r, att, mask)

    ref_c, ref_r = reference(state.params, put(chosen), put(rejected), put(ones), put(loss_mask))
    batch = PreferenceBatch(chosen_ids=put(chosen), chosen_attention=put(ones), chosen_loss_mask=put(loss_mask),
                            rejected_ids=put(rejected), rejected_attention=put(ones),
                            rejected_loss_mask=put(loss_mask), ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
                            weight=put(np.ones(args.pairs, np.float32)))

    plan = None
    try:
        from sgpo_jax.training import memory

        plan = memory.estimate(cfg, dict(mesh.shape), batch_size=args.pairs, seq_len=args.seq,
                               logps_chunk=args.chunk)
    except ImportError:
        pass
    step = make_sgpo_step(mesh, state, batch_axes=mesh_lib.BATCH_AXES, state_sharding=state_sharding)
    begin = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - begin
    mem = compiled.memory_analysis()
    compiled_peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes) if mem is not None else None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    except Exception:  # not every backend reports it
        xla_flops = float("nan")

    times, losses = [], []
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        loss = float(metrics["loss"])  # blocks until the step is done
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            losses.append(loss)
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss in the timed steps: {losses}")
    step_s = statistics.median(times)

    kind = devices[0].device_kind
    peak = args.peak_flops or peak_for(kind)
    flops = model_flops(cfg, args.pairs, args.seq)
    n_dev = len(devices)
    achieved = flops["total"] / step_s / n_dev
    try:
        device_peak_bytes = devices[0].memory_stats().get("peak_bytes_in_use")
    except Exception:
        device_peak_bytes = None
    result = dict(
        preset=args.preset, params=n_params, non_embedding_params=flops["non_embedding_params"],
        pairs=args.pairs, seq=args.seq, response=args.response, tokens_per_step=flops["tokens"],
        dtype=args.dtype, param_dtype=args.param_dtype, remat=args.remat, scan_layers=args.scan,
        attention_block=getattr(cfg, "attention_block", None), chunk=args.chunk, mode=args.mode,
        mesh=dict(mesh.shape), devices=n_dev, device_kind=kind, platform=devices[0].platform,
        jax=jax.__version__, python=platform.python_version(),
        compile_s=compile_s, step_s_median=step_s, step_s_min=min(times), step_s_max=max(times),
        tokens_per_s=flops["tokens"] / step_s, model_flops_per_step=flops["total"],
        model_flops_breakdown=dict(dense=flops["dense"], head=flops["head"], attention=flops["attention"]),
        achieved_tflops_per_device=achieved / 1e12, peak_flops_per_device=peak,
        mfu=achieved / peak if peak else None, mfu_causal_attention=(flops["total_causal"] / step_s / n_dev / peak
                                                                   if peak else None),
        xla_flops_per_step=xla_flops, xla_flops_per_s_per_device=xla_flops / step_s if xla_flops == xla_flops else None,
        compiled_peak_bytes=compiled_peak, device_peak_bytes_in_use=device_peak_bytes,
        planner_estimate_bytes=plan.total if plan else None,
        planner_lower_bound_bytes=plan.lower_bound if plan else None,
        losses=losses,
    )
    def gib(b):
        if not b:
            return "n/a"
        return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"

    print(f"## sgpo_step MFU: {args.preset} ({n_params:,} params), {args.pairs} pairs x {args.seq} tokens, "
          f"{args.dtype} compute / {args.param_dtype} params, remat={args.remat}, scan={args.scan}, mode={args.mode}")
    print(f"{n_dev} x {kind} ({devices[0].platform}), mesh {dict(mesh.shape)}, jax {jax.__version__}\n")
    rows = [
        ("step time (median of %d)" % args.iters, f"{1e3 * step_s:,.1f} ms (min {1e3 * min(times):,.1f}, max "
                                                   f"{1e3 * max(times):,.1f})"),
        ("tokens / s", f"{flops['tokens'] / step_s:,.0f}"),
        ("model FLOPs / step", f"{flops['total']:.4g} (dense {flops['dense']:.3g}, head {flops['head']:.3g}, "
                               f"attention {flops['attention']:.3g})"),
        ("achieved TFLOP/s per device", f"{achieved / 1e12:,.1f}"),
        ("peak TFLOP/s per device", f"{peak / 1e12:,.0f}" if peak else "unknown (pass --peak-flops)"),
        ("**MFU**", f"**{100 * achieved / peak:.1f}%**" if peak else "n/a"),
        ("MFU, causal attention FLOPs", f"{100 * result['mfu_causal_attention']:.1f}%" if peak else "n/a"),
        ("XLA cost_analysis FLOPs / step (recompute included, loop bodies counted once)", f"{xla_flops:.4g}"),
        ("compile time", f"{compile_s:.1f} s"),
        ("compiled peak memory / device", gib(compiled_peak)),
        ("device peak bytes in use", gib(device_peak_bytes)),
        ("planner estimate (lower bound)", f"{gib(plan.total)} ({gib(plan.lower_bound)})" if plan else "n/a"),
    ]
    print("| quantity | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n" + json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
