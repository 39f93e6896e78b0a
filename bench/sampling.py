r"""Benchmark: :func:`sgpo_jax.ssapo.sampling.generate` vs transformers' PyTorch ``generate`` on CPU.

Both sample ``--new-tokens`` tokens after each of ``--batch`` prompts of ``--prompt`` random
tokens (no padding) from the same model: our :class:`~sgpo_jax.models.Decoder` with a random
init (our initializer, std 0.02), copied into transformers' ``LlamaForCausalLM`` with
``params_to_hf_state_dict``. Sampling is ancestral with ``--temperature``, ``--top-p`` and
``--top-k`` (0 = off) and no EOS token (transformers' ``generation_config.eos_token_id = None``,
our ``eos_token_ids=()``), so both generate exactly ``batch * new_tokens`` tokens (checked).

* **ours**: ``generate(model, params, ids, mask, rng=..., ...)`` plus ``jax.block_until_ready``:
  one jitted prefill of the prompts into a KV cache, then a ``while_loop`` of cached one-token
  steps; the first call (compilation) is excluded.
* **torch**: ``model.generate(input_ids, attention_mask, do_sample=True, ...)`` under
  ``torch.inference_mode()`` with transformers' default (dynamic) KV cache and ``--attn``
  attention (``sdpa`` by default).

Throughput is ``new tokens/s = batch * new_tokens / wall time`` of one whole call (prefill
included), the median of ``--iters`` timed calls after ``--warmup`` untimed ones; the two run in
interleaved rounds (one call each per round), so that load from elsewhere on the machine hits
both alike; the 1-minute load average before and after is printed (on an oversubscribed machine
torch's OpenMP threads degrade far more than XLA's, so ratios from a busy machine overstate
ours). The ratio is ours over torch; the target is >= ``--target`` (exit status 1 if missed).

Threads: ``torch.set_num_threads(--threads)`` (one inter-op thread) and XLA's CPU client with
``--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=--threads``;
``OMP_NUM_THREADS``/``MKL_NUM_THREADS``/``OPENBLAS_NUM_THREADS`` are set to the same value before
torch or jax is imported, and ``JAX_PLATFORMS=cpu``.

**Roofline** (``--roofline``, instead of the comparison): a decode step at batch ``b`` with ``S``
real context tokens must read the weights once and every row's KV cache,

.. math::

    \text{bytes} = 4 \left(P_{\text{layers}} + V H\right) + 4 \cdot 2 L b K S D, \qquad
    \text{FLOPs} = 2 b \left(P_{\text{layers}} + V H\right) + 4 L b N S D

(float32; :math:`P_{\text{layers}}` the parameters of the layers and final norm, :math:`V H`
the output head, the embedding read only ``b`` rows; attention ``q k^T`` and ``p v``), with
:math:`S` the mean context over the run, ``prompt + (new_tokens - 1) / 2``. The machine's limits
are measured in the same process: memory bandwidth by a STREAM-like triad ``a = b + s c`` on
``--stream-mb`` MB arrays (3 arrays moved per call), the FLOP rate by a ``--matmul-n``-square
float32 matmul; each the best of ``--probe-iters`` calls. The time of one decode step is
``(t(new_tokens) - t(1)) / (new_tokens - 1)`` from two ``generate`` calls (so the prefill
cancels), the median of ``--iters``. The roofline time is ``max(bytes / bandwidth, FLOPs / rate)``
and the fraction achieved is roofline time / measured time, for each batch of
``--roofline-batches``. On a shared or loaded machine both the probes and the steps are noisy:
report only numbers from a quiet one.

Run from the repository root: ``python bench/sampling.py`` (``--help`` for the options), and
``python bench/sampling.py --roofline`` for the roofline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmark_model import add_model_args, cpu_thread_env, hf_llama_config, model_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--scan-layers", action="store_true", help="our model with scan_layers=True")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per row")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 disables top-k")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each implementation")
    p.add_argument("--iters", type=int, default=5, help="timed calls of each implementation (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads and XLA CPU threads")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="transformers attn_implementation")
    p.add_argument("--skip-torch", action="store_true", help="only time ours")
    p.add_argument("--target", type=float, default=4.0, help="required ratio ours / torch (the throughput issue's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    g = p.add_argument_group("roofline")
    g.add_argument("--roofline", action="store_true", help="print the decode roofline table instead")
    g.add_argument("--roofline-batches", default="1,8,32,64", help="comma-separated batch sizes")
    g.add_argument("--stream-mb", type=int, default=256, help="size of each triad array (MB)")
    g.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul probe")
    g.add_argument("--probe-iters", type=int, default=10, help="calls of each probe (best reported)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
cpu_thread_env(ARGS.threads if ARGS else 2)  # before jax is imported anywhere
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sgpo_jax.models import Decoder, params_to_hf_state_dict  # noqa: E402
from sgpo_jax.ssapo.sampling import generate  # noqa: E402


def time_interleaved(calls, warmup, iters):
    """``{name: [wall times (s)]}``: ``warmup`` untimed calls of each, then ``iters`` rounds of one call each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(iters):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return times


def probe_bandwidth(megabytes: int, iters: int) -> float:
    """Bytes/s of the triad ``a = b + s * c`` (read ``b`` and ``c``, write ``a``), best of ``iters``."""
    n = megabytes * 2 ** 20 // 4
    b = jnp.arange(n, dtype=jnp.float32)
    c = jnp.ones(n, jnp.float32)
    triad = jax.jit(lambda b, c: b + jnp.float32(3.0) * c)
    jax.block_until_ready(triad(b, c))
    best = min(_timed(lambda: triad(b, c)) for _ in range(iters))
    return 3 * 4 * n / best


def probe_matmul(n: int, iters: int) -> float:
    """FLOP/s of an ``[n, n] x [n, n]`` float32 matmul (``2 n^3`` FLOPs), best of ``iters``."""
    x = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(x))
    return 2 * n ** 3 / min(_timed(lambda: matmul(x)) for _ in range(iters))


def _timed(call) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - t0


def decode_cost(cfg, params, batch: int, context: float):
    """``(bytes, FLOPs)`` of one decode step (module docstring), float32."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = sum(x.size for _, x in leaves)
    embed = cfg.vocab_size * cfg.hidden_size
    head = embed  # the output head reads [H, V] (tied: the embedding itself)
    layers = total - embed - (0 if cfg.tie_word_embeddings else head)  # layers and final norm
    weights = layers + head
    kv = 2 * cfg.num_hidden_layers * batch * cfg.num_key_value_heads * context * cfg.head_dim
    flops = 2 * batch * weights + 4 * cfg.num_hidden_layers * batch * cfg.num_attention_heads * context * cfg.head_dim
    return 4 * (weights + kv + batch * cfg.hidden_size), flops


# The throughput issue's target: a decode step at batch 32 reaches half of its roofline time.
ROOFLINE_TARGET_BATCH, ROOFLINE_TARGET = 32, 0.5


def roofline(args):
    """The roofline table (module docstring); returns its results dict."""
    cfg = model_config(args, args.prompt + args.new_tokens, scan_layers=args.scan_layers)
    model = Decoder(cfg)
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), jnp.zeros((1, 2), jnp.int32))
    loadavg = os.getloadavg()
    bandwidth = probe_bandwidth(args.stream_mb, args.probe_iters)
    flop_rate = probe_matmul(args.matmul_n, args.probe_iters)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    context = args.prompt + (args.new_tokens - 1) / 2
    rows = []
    for b in [int(x) for x in args.roofline_batches.split(",")]:
        ids = jnp.asarray(np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (b, args.prompt)), jnp.int32)
        mask = jnp.ones_like(ids)

        def call(new):
            return generate(model, params, ids, mask, rng=jax.random.key(args.seed), max_new_tokens=new,
                            **sampling).lengths

        calls = {"one": lambda: _timed(lambda: call(1)), "all": lambda: _timed(lambda: call(args.new_tokens))}
        times = time_interleaved(calls, args.warmup, args.iters)
        step_s = (statistics.median(times["all"]) - statistics.median(times["one"])) / (args.new_tokens - 1)
        nbytes, flops = decode_cost(cfg, params, b, context)
        bound_s = max(nbytes / bandwidth, flops / flop_rate)
        rows.append(dict(batch=b, step_s=step_s, bytes=nbytes, flops=flops, roofline_s=bound_s,
                         bound="memory" if nbytes / bandwidth >= flops / flop_rate else "compute",
                         fraction=bound_s / step_s if step_s > 0 else float("nan"),
                         tokens_per_s=b / step_s if step_s > 0 else float("nan")))
    print(f"\nroofline: Llama V={args.vocab} H={args.hidden} I={args.intermediate} L={args.layers} heads={args.heads}/"
          f"{args.kv_heads} fp32, prompt {args.prompt}, {args.new_tokens} new tokens (mean context {context:g}); "
          f"{args.threads} threads; measured bandwidth {bandwidth / 1e9:.1f} GB/s (triad of {args.stream_mb} MB), "
          f"matmul {flop_rate / 1e9:.1f} GFLOP/s (n={args.matmul_n}); 1-min load average {loadavg[0]:.1f} "
          f"({os.cpu_count()} CPUs): numbers from a loaded machine are not the machine's limits\n")
    print("| batch | decode step (ms) | new tokens/s | MB read | MFLOP | bound | roofline step (ms) | fraction |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {1e3 * r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['bytes'] / 1e6:.2f} | "
              f"{r['flops'] / 1e6:.1f} | {r['bound']} | {1e3 * r['roofline_s']:.3f} | {r['fraction']:.1%} |")
    for r in rows:
        if r["batch"] == ROOFLINE_TARGET_BATCH:
            print(f"\nbatch {r['batch']}: {r['fraction']:.1%} of the roofline (target {ROOFLINE_TARGET:.0%}: "
                  f"{'PASS' if r['fraction'] >= ROOFLINE_TARGET else 'FAIL'})")
    return {"bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flop_rate, "mean_context": context,
            "loadavg_before": loadavg, "rows": rows}


def main(args):
    if args.roofline:
        results = {"config": dict(vars(args), json=str(args.json) if args.json else None), "roofline": roofline(args)}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2, default=float))
        return 0
    cfg = model_config(args, args.prompt + args.new_tokens, scan_layers=args.scan_layers)
    model = Decoder(cfg)
    b, new = args.batch, args.new_tokens
    ids_np = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (b, args.prompt)).astype(np.int32)
    mask_np = np.ones_like(ids_np)
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), jnp.zeros((1, 2), jnp.int32))
    ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    env = {"python": platform.python_version(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "xla_flags": os.environ["XLA_FLAGS"]}
    rng = {"key": jax.random.key(args.seed)}
    counts = {}

    def ours():
        rng["key"], key = jax.random.split(rng["key"])
        out = jax.block_until_ready(generate(model, params, ids, mask, rng=key, max_new_tokens=new, **sampling))
        counts["ours"] = int(np.sum(np.asarray(out.lengths)))

    t0 = time.perf_counter()
    ours()
    rows = {"ours": {"first_call_s": time.perf_counter() - t0}}
    calls = {"ours": ours}

    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set
            pass
        torch.manual_seed(args.seed)
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_threads=torch.get_num_threads())
        hf_config = hf_llama_config(cfg, args.attn)
        torch_model = transformers.LlamaForCausalLM(hf_config).float().eval()
        state = {k: torch.from_numpy(v) for k, v in params_to_hf_state_dict(params, cfg).items()}
        torch_model.load_state_dict(state, strict=True)
        torch_model.generation_config.eos_token_id = None
        torch_model.generation_config.pad_token_id = 0
        t_ids, t_mask = torch.from_numpy(ids_np.astype(np.int64)), torch.from_numpy(mask_np.astype(np.int64))

        def torch_generate():
            with torch.inference_mode():
                out = torch_model.generate(input_ids=t_ids, attention_mask=t_mask, do_sample=True,
                                           max_new_tokens=new, temperature=args.temperature, top_p=args.top_p,
                                           top_k=args.top_k)
            counts["torch"] = int(out.shape[0] * (out.shape[1] - args.prompt))

        t0 = time.perf_counter()
        torch_generate()
        rows["torch"] = {"first_call_s": time.perf_counter() - t0}
        calls["torch"] = torch_generate

    print(f"timing {list(calls)}: {args.warmup} warm-up + {args.iters} interleaved rounds", flush=True)
    env["loadavg_before"] = os.getloadavg()
    timings = time_interleaved(calls, args.warmup, args.iters)
    env["loadavg_after"] = os.getloadavg()
    for name, times in timings.items():
        median = statistics.median(times)
        rows[name].update(call_s=median, times_s=times, new_tokens_per_s=b * new / median,
                          new_tokens=counts[name])
    complete = all(c == b * new for c in counts.values())
    ratio = rows["ours"]["new_tokens_per_s"] / rows["torch"]["new_tokens_per_s"] if "torch" in rows else None
    results = {"config": dict(vars(args), json=str(args.json) if args.json else None), "rows": rows,
               "ratio": ratio, "complete": complete, "env": env}
    print_table(results, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float))
        print(f"\nwrote {args.json}")
    return 0 if complete and (ratio is None or ratio >= args.target) else 1


def print_table(results, args):
    rows, ratio = results["rows"], results["ratio"]
    print(f"\nLlama V={args.vocab} H={args.hidden} I={args.intermediate} L={args.layers} heads={args.heads}/"
          f"{args.kv_heads} fp32 (scan_layers={args.scan_layers}); batch {args.batch}, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, temperature {args.temperature}, top_p {args.top_p}, top_k {args.top_k}, "
          f"{args.threads} threads, torch attn={args.attn}; "
          f"1-min load average {results['env']['loadavg_before'][0]:.1f} "
          f"before, {results['env']['loadavg_after'][0]:.1f} after ({os.cpu_count()} CPUs)\n")
    print("| implementation | call (s), median | new tokens/s | vs torch | first call (s) | new tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        rel = f"{row['new_tokens_per_s'] / rows['torch']['new_tokens_per_s']:.2f}x" if "torch" in rows else "-"
        print(f"| {name} | {row['call_s']:.3f} | {row['new_tokens_per_s']:,.0f} | {rel} | {row['first_call_s']:.2f} "
              f"| {row['new_tokens']} |")
    if ratio is not None:
        verdict = "PASS" if ratio >= args.target else "FAIL"
        print(f"\nratio ours / torch = {ratio:.2f} (target >= {args.target:g}): {verdict}")
    if not results["complete"]:
        print("** some call generated fewer than batch * new_tokens tokens **")


if __name__ == "__main__":
    sys.exit(main(ARGS))
