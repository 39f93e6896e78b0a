r"""Benchmark: our Flax Llama decoder vs transformers' PyTorch ``LlamaForCausalLM`` on CPU.

What is measured, back to back in one process, on the same config, weights and batch:

* **forward+backward throughput** (tokens/s = ``batch * seq / step time``, the median of
  ``--iters`` steps after ``--warmup`` untimed ones) of the loss :math:`-\sum_b \sum_{t \ge 1}
  m_{b,t} \log p(x_{b,t} \mid x_{b,<t})` (every token but the first scored, ``m = 1``, no padding).
  The implementations are timed in interleaved rounds (each one step per round), so that load
  from elsewhere on the machine hits them alike:

  - ``jax chunked``: ``jax.jit(jax.value_and_grad(loss))`` with
    :func:`sgpo_jax.models.decoder_logps_fn` (the head in ``--chunk-size`` sequence chunks,
    ``method="custom_vjp"``, the default);
  - ``jax chunked (checkpoint)``: the same with ``method="checkpoint"`` (``--no-checkpoint``
    skips it);
  - ``jax naive``: the same with ``losses.sequence_logps(model.apply(...))`` (full logits;
    ``--no-naive`` skips it);
  - ``torch``: ``model(input_ids, attention_mask).logits``, ``log_softmax`` in float32,
    ``gather`` of the targets, masked sum, ``loss.backward()`` (gradients zeroed with
    ``set_to_none`` before each step). ``--attn`` picks transformers' attention implementation
    (``sdpa``, its default, or ``eager``).

  Each timed step ends when the gradients are ready (``jax.block_until_ready``; torch is
  synchronous on CPU). The loss values are checked to agree (rtol 1e-4), and so is one
  gradient tensor (``lm_head``, rel. err 1e-3), so all do the same work; exit status 1 if not.

* **memory** of the log-prob loss step:

  - XLA's compiled memory analysis (``jit(...).lower(...).compile().memory_analysis()``) of our
    jitted value-and-grad: ``temp_size_in_bytes``, the peak of XLA's temporary buffers (arguments
    and outputs excluded), for the whole model step and for the head alone (``[B, T, H]`` hidden
    states and the head as inputs, so the difference is the log-prob computation only);
  - the peak increase of the process's resident set size during one step over the RSS just
    before it (``malloc_trim(0)`` first, so memory glibc kept from earlier steps is returned;
    sampled by a background thread every ~0.2 ms with ``psutil``; the larger of two steps), for
    every row, torch included. An honest but coarse measurement of the memory a step touches:
    short-lived peaks between samples can be missed and allocator caching (XLA's or torch's)
    can hide reuse. It is the only memory number given for torch.

Threads: ``torch.set_num_threads(--threads)`` (and one inter-op thread), and for XLA the flags
``--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=--threads``. XLA's CPU client
sizes its thread pool by the visible cores (2 on the project's machine, so the defaults already
match); whether this XLA build honours ``intra_op_parallelism_threads`` for every kind of op
was not verified, so on a larger machine pin the process (``taskset -c 0,1``) for a fair
comparison. ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` are set to ``--threads`` before torch is
imported, and ``OMP_WAIT_POLICY=PASSIVE`` unless set: with the default active spinning, torch's
OpenMP barriers stall badly when the cores are shared with other processes (on a loaded 2-core
machine a tiny model's step took 530 ms instead of 20 ms); set ``OMP_WAIT_POLICY=ACTIVE`` on an
idle machine to give torch its spin-waiting.

The default config is the project's benchmark config: Llama, vocab 32000, hidden 256,
intermediate 688, 4 layers, 8 heads, 4 KV heads, RoPE theta 1e4, float32, random init (our
initializer, std 0.02, copied into torch via ``params_to_hf_state_dict``); batch 8, sequence 256.
Our decoder uses its causal query-block attention (``DecoderConfig.attention_block``, the
library default unless ``--attention-block`` is given; 0 scores every key).

Run from the repository root: ``python bench/model.py`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmark_model import add_model_args, cpu_thread_env, hf_llama_config, model_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="sequence positions per head chunk (default: sgpo_jax.models.DEFAULT_CHUNK_SIZE)")
    p.add_argument("--attention-block", type=int, default=None,
                   help="DecoderConfig.attention_block of our model (default: the library's; 0 disables)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each implementation")
    p.add_argument("--iters", type=int, default=7, help="timed steps of each implementation (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads and XLA CPU threads")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="transformers attn_implementation")
    p.add_argument("--skip-torch", action="store_true", help="only time our model")
    p.add_argument("--no-naive", action="store_true", help="skip our naive (full-logits) variant")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="skip the chunked variant with method='checkpoint' (jax.checkpoint-ed scan step)")
    p.add_argument("--no-rss", action="store_true", help="skip the RSS measurements")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
cpu_thread_env(ARGS.threads if ARGS else 2)  # before jax is imported anywhere
# torch's OpenMP threads spin at every barrier by default; on a machine shared with other work
# that is pathological (measured here under load: 530 ms vs 20 ms per step of a tiny model).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sgpo_jax.core.losses import sequence_logps  # noqa: E402
from sgpo_jax.models import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    Decoder,
    chunked_sequence_logps,
    decoder_logps_fn,
    params_to_hf_state_dict,
)

MB = 1e6


class PeakRSS:
    """Context manager: peak RSS increase (bytes) over the RSS at entry, sampled in a thread."""

    def __init__(self, interval=2e-4):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss - self.base)
            time.sleep(self._interval)

    def __enter__(self):
        self._stop = threading.Event()
        self.base = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, self._proc.memory_info().rss - self.base)
        self._stop.set()
        self._thread.join()


def time_interleaved(steps, warmup, iters):
    """``{name: [wall times (s)]}``: ``warmup`` untimed calls of each step, then ``iters`` rounds that
    call every step once in turn, so that load from elsewhere on the machine hits all alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def _malloc_trim():
    """Return glibc's free heap memory to the OS, so that a step's RSS increase is not hidden by
    memory the allocator kept from earlier steps (no-op where glibc is absent)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_peak(step, repeats=2):
    """Largest peak RSS increase of ``repeats`` calls (after warm-up, heap trimmed before each), bytes."""
    peaks = []
    for _ in range(repeats):
        gc.collect()
        _malloc_trim()
        with PeakRSS() as probe:
            step()
        peaks.append(probe.peak)
    return max(peaks)


def main(args):
    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    cfg = model_config(args, args.seq, **({} if args.attention_block is None else
                                          dict(attention_block=args.attention_block)))
    model = Decoder(cfg)
    b, t = args.batch, args.seq
    tokens = b * t
    rng = np.random.default_rng(args.seed)
    ids_np = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    attn_np = np.ones((b, t), np.int32)
    loss_mask_np = np.ones((b, t), np.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(args.seed), jnp.zeros((1, 2), jnp.int32))
    ids, attn, loss_mask = jnp.asarray(ids_np), jnp.asarray(attn_np), jnp.asarray(loss_mask_np)

    chunked_logps = decoder_logps_fn(model, chunk_size=chunk)

    def naive_logps(p, i, a, m):
        return sequence_logps(model.apply(p, i, a), i, m)

    def loss_of(logps_fn):
        return lambda p, i, a, m: -jnp.sum(logps_fn(p, i, a, m))

    results = {"config": dict(vars(args), json=str(args.json) if args.json else None, chunk_size=chunk),
               "rows": {}, "memory": {}}
    env = {"python": platform.python_version(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "xla_flags": os.environ["XLA_FLAGS"],
           "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}

    # ---- our model --------------------------------------------------------------------------
    variants = {"jax chunked": chunked_logps}
    if not args.no_checkpoint:
        variants["jax chunked (checkpoint)"] = decoder_logps_fn(model, chunk_size=chunk, method="checkpoint")
    if not args.no_naive:
        variants["jax naive"] = naive_logps
    steps, rows = {}, results["rows"]
    for name, fn in variants.items():
        t0 = time.perf_counter()
        compiled = jax.jit(jax.value_and_grad(loss_of(fn))).lower(params, ids, attn, loss_mask).compile()
        rows[name] = dict(compile_s=time.perf_counter() - t0,
                          xla_temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
        steps[name] = lambda compiled=compiled: jax.block_until_ready(compiled(params, ids, attn, loss_mask))

    # The head alone (hidden states given): the log-prob computation's own temporary memory.
    hidden = jax.ShapeDtypeStruct((b, t, cfg.hidden_size), jnp.float32)
    head = jax.ShapeDtypeStruct((cfg.hidden_size, cfg.vocab_size), jnp.float32)

    def head_temp(fn):
        f = jax.jit(jax.value_and_grad(lambda h, w: -jnp.sum(fn(h, w)), argnums=(0, 1)))
        return f.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

    results["memory"]["head_only_xla_temp_bytes"] = {
        "naive": head_temp(lambda h, w: sequence_logps(h @ w, ids, loss_mask)),
        "chunked": head_temp(lambda h, w: chunked_sequence_logps(h, w, ids, loss_mask, chunk_size=chunk)),
        "chunked (checkpoint)": head_temp(lambda h, w: chunked_sequence_logps(h, w, ids, loss_mask, chunk_size=chunk,
                                                                              method="checkpoint")),
    }
    results["memory"]["float32_logits_bytes"] = 4 * tokens * cfg.vocab_size

    # ---- transformers ------------------------------------------------------------------------
    if not args.skip_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set
            pass
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_threads=torch.get_num_threads())
        hf_config = hf_llama_config(cfg, args.attn)
        torch_model = transformers.LlamaForCausalLM(hf_config).float().train()
        state = {k: torch.from_numpy(v) for k, v in params_to_hf_state_dict(params, cfg).items()}
        torch_model.load_state_dict(state, strict=True)
        t_ids = torch.from_numpy(ids_np.astype(np.int64))
        t_attn = torch.from_numpy(attn_np.astype(np.int64))
        t_mask = torch.from_numpy(loss_mask_np[:, 1:].astype(np.float32))

        def torch_step():
            torch_model.zero_grad(set_to_none=True)
            logits = torch_model(input_ids=t_ids, attention_mask=t_attn).logits[:, :-1].float()
            logps = torch.log_softmax(logits, dim=-1).gather(-1, t_ids[:, 1:, None]).squeeze(-1)
            loss = -(logps * t_mask).sum()
            loss.backward()
            return loss.detach()

        steps["torch"], rows["torch"] = torch_step, {}

    # ---- timing (interleaved), memory, agreement ---------------------------------------------
    print(f"timing {list(steps)}: {args.warmup} warm-up + {args.iters} interleaved rounds", flush=True)
    load_before = os.getloadavg()
    all_times = time_interleaved(steps, args.warmup, args.iters)
    env["loadavg_1_5_15_before_after_timing"] = [load_before, os.getloadavg()]
    for name, times in all_times.items():
        median = statistics.median(times)
        rows[name].update(step_s=median, times_s=times, tokens_per_s=tokens / median)
        if "torch" in all_times:  # speed-up over torch within each round, robust to load drifting across rounds
            rows[name]["speedup_vs_torch_per_round_median"] = statistics.median(
                t_torch / t for t_torch, t in zip(all_times["torch"], times))
    losses, head_grads = {}, {}
    for name, step in steps.items():
        if name == "torch":
            losses[name] = float(step())
            head_grads[name] = torch_model.lm_head.weight.grad.numpy().copy()
        else:
            value, grads = step()
            losses[name] = float(value)
            head_grads[name] = np.asarray(grads["params"]["lm_head"]["kernel"]).T
        if not args.no_rss:
            rows[name]["rss_peak_bytes"] = rss_peak(step)

    # ---- agreement ---------------------------------------------------------------------------
    ref = "torch" if "torch" in losses else "jax chunked"
    agreement = {}
    for name in losses:
        g, g_ref = head_grads[name], head_grads[ref]
        agreement[name] = dict(loss=losses[name], loss_rel_diff=abs(losses[name] / losses[ref] - 1),
                               lm_head_grad_rel_err=float(np.abs(g - g_ref).max() / np.abs(g_ref).max()))
    results["agreement"] = agreement
    results["env"] = env
    ok = all(a["loss_rel_diff"] < 1e-4 and a["lm_head_grad_rel_err"] < 1e-3 for a in agreement.values())
    results["agree"] = ok

    print_table(results, args, chunk)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=float))
        print(f"\nwrote {args.json}")
    return 0 if ok else 1


def print_table(results, args, chunk):
    rows = results["rows"]
    base = rows.get("torch")
    print(f"\nLlama V={args.vocab} H={args.hidden} I={args.intermediate} L={args.layers} heads={args.heads}/"
          f"{args.kv_heads} fp32, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
          f"torch attn={args.attn} (OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}), chunk={chunk}\n")
    print("| implementation | fwd+bwd step (ms, median) | tokens/s | vs torch (medians) | vs torch (per-round median) "
          "| XLA temp (MB) | peak RSS increase (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        per_round = f"{row['speedup_vs_torch_per_round_median']:.2f}x" if base else "-"
        temp = f"{row['xla_temp_bytes'] / MB:.0f}" if "xla_temp_bytes" in row else "-"
        rss = f"{row['rss_peak_bytes'] / MB:.0f}" if "rss_peak_bytes" in row else "-"
        print(f"| {name} | {row['step_s'] * 1e3:.1f} | {row['tokens_per_s']:,.0f} | {ratio} | {per_round} | {temp} "
              f"| {rss} |")
    before, after = results["env"]["loadavg_1_5_15_before_after_timing"]
    print(f"\nmachine load average (1 min) before/after timing: {before[0]:.1f} / {after[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    mem = results["memory"]
    head = mem["head_only_xla_temp_bytes"]
    print("\nRSS: peak resident-set increase during one step over the RSS before it (heap trimmed "
          "first, sampled every ~0.2 ms).")
    print("\nlog-prob head alone (value+grad from [B,T,H] hidden states), XLA temp: " + ", ".join(
        f"{k} {v / MB:.0f} MB ({v / head['naive']:.2f}x)" for k, v in head.items())
          + f"; one float32 [B,T,V] logits array is {mem['float32_logits_bytes'] / MB:.0f} MB")
    print("\nagreement (vs " + ("torch" if base else "jax chunked") + "): " + ", ".join(
        f"{k}: loss {v['loss']:.4f} (rel {v['loss_rel_diff']:.1e}), "
        f"lm_head grad rel err {v['lm_head_grad_rel_err']:.1e}"
        for k, v in results["agreement"].items()) + ("" if results["agree"] else "  ** DISAGREE **"))


if __name__ == "__main__":
    sys.exit(main(ARGS))
