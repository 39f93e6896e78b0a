r"""One accelerator check, under 8 minutes on one GPU: kernels, step MFU, an 8B-shaped step, the sampler.

Parts (each one its own subprocess, so each starts with the device's memory free; a part that
fails or runs past its time share is recorded as such and the others still run):

1. ``kernels``: ``pytest tests/test_attention.py`` on the device (``--noconftest``: the suite's
   conftest forces CPU). On a GPU the "cudnn" tests run the real cuDNN kernel in bfloat16
   against the einsum; "splash" skips (TPU only); on a TPU the reverse.
2. ``mfu``: ``bench/mfu.py`` at the TinyLlama-1.1B shape, 8 x 1024 and 16 x 1024 (pairs x
   tokens), remat on and off (a run that does not fit is recorded with its error),
   ``DecoderConfig.attention="auto"`` (the default), also reporting which kernel "auto" chose.
3. ``llama3_8b``: the Llama-3-8B shape (V=128256, H=4096, I=14336, 32 heads, 8 KV heads,
   head_dim 128, rope_theta 5e5) through ``bench/mfu.py`` (bf16 compute, float32 master weights,
   AdamW, the exact follower in the step, remat, scanned layers) with the largest layer count
   ``L`` the memory planner fits into 85% of the device, and with ``L // 2`` layers: per layer
   ``t_layer = (t(L) - t(L/2)) / (L - L/2)``, its MFU from the per-layer model FLOPs (the
   ``dense + attention`` terms of ``bench/mfu.py``'s count divided by the layer count), and the
   32-layer step time extrapolated as ``t(L) + (32 - L) * t_layer`` (the head and embedding are
   in ``t(L)`` already). Measured at ``L`` only; the extrapolation is labelled as such.
4. ``sampler``: ``sgpo_jax.ssapo.sampling.generate`` at the TinyLlama-1.1B shape (bf16 params and
   compute), 64 prompts of 128 tokens, 256 new tokens, temperature 0.7: new tokens/s (median of 3
   timed calls after 1 untimed, prefill included) and the fraction of the HBM roofline:
   a decode step reads the parameters and the KV cache once, ``bytes = param_bytes +
   kv_bytes(mean context)``, ``kv_bytes(c) = 2 * L * B * K * c * D * 2``, mean context
   ``prompt + new / 2``; roofline new tokens/s ``= B * peak_bw / bytes`` with ``peak_bw`` from
   :data:`PEAK_HBM` by device kind (unknown kinds, CPU included, report no fraction).

Writes everything (device kind, jax version, every figure, every error) to one JSON file
``bench/results/device_check-<kind>-<UTC time>.json`` and prints a summary. ``--smoke`` runs the
same parts at tiny shapes (a CPU-runnable check that the script works; its figures mean nothing).

    python bench/device_check.py            # on the accelerator machine
    python bench/device_check.py --smoke    # anywhere, ~2 minutes on CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_HBM = [  # (substring of device_kind, bytes/s); first match wins
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12), ("TPU v5p", 2.765e12), ("TPU v5 lite", 8.19e11), ("TPU v5e", 8.19e11), ("TPU v6", 1.64e12),
    ("TPU v4", 1.2e12),
]
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=64, rope_theta=10000.0)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)


def peak_hbm(kind: str):
    for needle, bw in PEAK_HBM:
        if needle.lower() in kind.lower():
            return bw
    return None


def run(cmd, timeout, env=None):
    """``(returncode or 'timeout', seconds, stdout + stderr)`` of a subprocess in the repository root."""
    full_env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    HF_HUB_OFFLINE="1", **(env or {}))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, time.perf_counter() - t0, p.stdout + p.stderr
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        return "timeout", time.perf_counter() - t0, out.decode() if isinstance(out, bytes) else out


def tail(text, n=1500):
    return text[-n:] if text else ""


def part_kernels(args, budget):
    cmd = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", "tests/test_attention.py",
           "-rs"]
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    if args.smoke:  # the CPU-resolution tests only (the full file takes ~40 s on CPU)
        cmd += ["-k", "auto or explicit or conditions"]
    rc, secs, out = run(cmd, budget, env)
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return dict(returncode=rc, seconds=secs, summary=summary[-1] if summary else None,
                skips=[line for line in out.splitlines() if line.startswith("SKIPPED")], tail=tail(out))


MFU_DRIVER = r"""
import json, sys
sys.path.insert(0, "bench")
import mfu
spec = json.loads(sys.argv[1])
mfu.PRESETS["custom"] = spec["shape"]
mfu.PRESET_RUN["custom"] = spec["run"]
from sgpo_jax.models.llama import DecoderConfig, attention_kernel
import jax.numpy as jnp
cfg = DecoderConfig(**spec["shape"], dtype=jnp.bfloat16)
print("ATTENTION_KERNEL=" + attention_kernel(cfg, spec["run"]["seq"]), flush=True)
mfu.main(["--preset", "custom"] + spec["argv"])
"""


def mfu_run(shape, pairs, seq, extra, budget, env):
    """One ``bench/mfu.py`` run on a custom shape in a subprocess: its result dict, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        out_json = Path(tmp) / "mfu.json"
        spec = dict(shape=shape, run=dict(pairs=pairs, seq=seq, response=seq // 2, chunk=256 if seq >= 256 else 16),
                    argv=["--json", str(out_json)] + extra)
        rc, secs, out = run([sys.executable, "-c", MFU_DRIVER, json.dumps(spec)], budget, env)
        kernel = re.search(r"ATTENTION_KERNEL=(\w+)", out)
        row = dict(pairs=pairs, seq=seq, argv=extra, returncode=rc, seconds=secs,
                   attention_kernel=kernel.group(1) if kernel else None)
        if rc == 0 and out_json.exists():
            row["result"] = json.loads(out_json.read_text())
        else:
            row["error_tail"] = tail(out)
        return row


def part_mfu(args, budget, env):
    shape = TINY if args.smoke else TINYLLAMA
    shapes = [(2, 64), (4, 64)] if args.smoke else [(8, 1024), (16, 1024)]
    iters = ["--warmup", "1", "--iters", "2"] if args.smoke else ["--warmup", "2", "--iters", "5"]
    rows, deadline = [], time.perf_counter() + budget
    for pairs, seq in shapes:
        for remat in (True, False):
            left = deadline - time.perf_counter()
            if left < 20:
                rows.append(dict(pairs=pairs, seq=seq, remat=remat, skipped="time budget spent"))
                continue
            row = mfu_run(shape, pairs, seq, iters + ["--remat" if remat else "--no-remat"], left, env)
            row["remat"] = remat
            rows.append(row)
    return rows


def part_llama3(args, budget, env, device_bytes):
    import jax.numpy as jnp

    from sgpo_jax.models.llama import DecoderConfig

    shape = dict(TINY, num_hidden_layers=4) if args.smoke else dict(LLAMA3_8B)
    pairs, seq = (2, 64) if args.smoke else (4, 1024)
    total_layers = shape["num_hidden_layers"]
    from sgpo_jax.training import memory

    fit, plans = None, {}
    for layers in range(total_layers, 0, -1):  # the planner's estimate, largest layer count first
        cfg = DecoderConfig(**dict(shape, num_hidden_layers=layers), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                            remat=True, scan_layers=True, max_position_embeddings=max(2048, seq))
        plans[layers] = memory.estimate(cfg, {"data": 1}, batch_size=pairs, seq_len=seq, logps_chunk=256).total
        if device_bytes and plans[layers] <= 0.85 * device_bytes:
            fit = layers
            break
        if not device_bytes and args.smoke:  # CPU: no device size; the smoke run takes all layers
            fit = layers
            break
    if fit is None:
        return dict(error="the planner fits no layer count into 85% of the device (or the device size is unknown)",
                    planner_bytes=plans)
    out = dict(shape=shape, pairs=pairs, seq=seq, layers_fit=fit, planner_bytes=plans, runs={})
    iters = ["--warmup", "1", "--iters", "2" if args.smoke else "3"]
    deadline = time.perf_counter() + budget
    for layers in (fit, max(1, fit // 2)):
        left = deadline - time.perf_counter()
        if left < 20:
            out["runs"][layers] = dict(skipped="time budget spent")
            continue
        out["runs"][layers] = mfu_run(dict(shape, num_hidden_layers=layers), pairs, seq,
                                      iters + ["--remat", "--scan", "--layers", str(layers)], left, env)
    full, half = out["runs"].get(fit, {}).get("result"), out["runs"].get(max(1, fit // 2), {}).get("result")
    if full and half and fit != max(1, fit // 2):
        d_layers = fit - max(1, fit // 2)
        t_layer = (full["step_s_median"] - half["step_s_median"]) / d_layers
        per_layer_flops = (full["model_flops_breakdown"]["dense"] + full["model_flops_breakdown"]["attention"]) / fit
        peak = full["peak_flops_per_device"]
        out.update(step_s_at_fit=full["step_s_median"], mfu_at_fit=full["mfu"], seconds_per_layer=t_layer,
                   model_flops_per_layer=per_layer_flops,
                   mfu_per_layer=(per_layer_flops / t_layer / peak) if peak and t_layer > 0 else None,
                   extrapolated_step_s_all_layers=full["step_s_median"] + (total_layers - fit) * t_layer,
                   extrapolation=f"t({fit}) + ({total_layers} - {fit}) * t_layer (not measured)")
    return out


SAMPLER_DRIVER = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from sgpo_jax.models import Decoder, DecoderConfig
from sgpo_jax.ssapo.sampling import generate
spec = json.loads(sys.argv[1])
cfg = DecoderConfig(**spec["shape"], dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                    max_position_embeddings=max(2048, spec["prompt"] + spec["new"]))
model = Decoder(cfg)
params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))
b, new = spec["batch"], spec["new"]
ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (b, spec["prompt"])), jnp.int32)
mask = jnp.ones_like(ids)
key = [jax.random.key(0)]
def call():
    key[0], k = jax.random.split(key[0])
    out = jax.block_until_ready(generate(model, params, ids, mask, rng=k, max_new_tokens=new, temperature=0.7))
    return int(np.sum(np.asarray(out.lengths)))
t0 = time.perf_counter(); count = call(); first = time.perf_counter() - t0
times = []
for _ in range(spec["iters"]):
    t0 = time.perf_counter(); count = call(); times.append(time.perf_counter() - t0)
n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
print("RESULT=" + json.dumps(dict(first_call_s=first, times_s=times, call_s=statistics.median(times),
      new_tokens=count, params=n_params, param_bytes=param_bytes, kind=jax.devices()[0].device_kind)))
"""


def part_sampler(args, budget, env):
    shape = TINY if args.smoke else TINYLLAMA
    spec = dict(shape=shape, batch=4 if args.smoke else 64, prompt=16 if args.smoke else 128,
                new=16 if args.smoke else 256, iters=2 if args.smoke else 3)
    rc, secs, out = run([sys.executable, "-c", SAMPLER_DRIVER, json.dumps(spec)], budget, env)
    found = re.search(r"RESULT=(\{.*\})", out)
    row = dict(spec=spec, returncode=rc, seconds=secs)
    if not found:
        return dict(row, error_tail=tail(out))
    r = json.loads(found.group(1))
    b, new = spec["batch"], spec["new"]
    layers, kv_heads, head_dim = shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]
    mean_context = spec["prompt"] + new / 2
    kv_bytes = 2 * layers * b * kv_heads * mean_context * head_dim * 2  # k and v, bf16
    bytes_per_step = r["param_bytes"] + kv_bytes
    bw = peak_hbm(r["kind"])
    tokens_per_s = b * new / r["call_s"]
    roofline = b * bw / bytes_per_step if bw else None
    return dict(row, **r, new_tokens_per_s=tokens_per_s, complete=r["new_tokens"] == b * new,
                bytes_per_decode_step=bytes_per_step, kv_bytes_mean_context=kv_bytes, peak_hbm_bytes_per_s=bw,
                roofline_new_tokens_per_s=roofline, roofline_fraction=tokens_per_s / roofline if roofline else None,
                roofline_note="prefill included in the measured time; the roofline counts decode reads only")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU-runnable); figures meaningless")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 450, smoke 600)")
    p.add_argument("--parts", default="kernels,mfu,llama3_8b,sampler")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    budget = args.budget or (600.0 if args.smoke else 450.0)
    start = time.perf_counter()
    dev = jax.devices()[0]
    kind = dev.device_kind
    try:
        device_bytes = dev.memory_stats().get("bytes_limit")
    except Exception:
        device_bytes = None
    env = {"JAX_PLATFORMS": "cpu"} if args.smoke else {}
    result = dict(smoke=args.smoke, device_kind=kind, platform=dev.platform, devices=jax.device_count(),
                  device_bytes=device_bytes, jax=jax.__version__, jaxlib=getattr(jax.lib, "__version__", None)
                  or getattr(getattr(jax.lib, "version", None), "__version__", None),
                  python=platform.python_version(), utc=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  peak_hbm_bytes_per_s=peak_hbm(kind), parts={})
    shares = dict(kernels=0.15, mfu=0.40, llama3_8b=0.30, sampler=0.15)
    parts = [x for x in args.parts.split(",") if x]
    for name in parts:
        spent = time.perf_counter() - start
        share = min(budget - spent, shares[name] * budget + max(0.0, budget * sum(
            shares[n] for n in parts[:parts.index(name)]) - spent))
        if share < 20:
            result["parts"][name] = dict(skipped=f"time budget spent ({spent:.0f} of {budget:.0f} s)")
            continue
        print(f"[{time.perf_counter() - start:6.1f} s] {name} (up to {share:.0f} s)", flush=True)
        if name == "kernels":
            result["parts"][name] = part_kernels(args, share)
        elif name == "mfu":
            result["parts"][name] = part_mfu(args, share, env)
        elif name == "llama3_8b":
            result["parts"][name] = part_llama3(args, share, env, device_bytes)
        elif name == "sampler":
            result["parts"][name] = part_sampler(args, share, env)
    result["total_s"] = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"device_check-{re.sub(r'[^A-Za-z0-9]+', '_', kind)}-{stamp}{'-smoke' if args.smoke else ''}.json"
    path = args.out_dir / name
    path.write_text(json.dumps(result, indent=2, default=str))
    print_summary(result)
    print(f"\nwrote {path}")
    return result


def _pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def print_summary(r):
    print(f"\n## device check: {r['device_kind']} ({r['platform']}), jax {r['jax']}, {r['total_s']:.0f} s"
          + (" [SMOKE: tiny shapes, figures meaningless]" if r["smoke"] else ""))
    parts = r["parts"]
    if "kernels" in parts:
        k = parts["kernels"]
        print(f"kernels: {k.get('summary') or k.get('skipped') or k.get('returncode')}")
    for row in parts.get("mfu", []) if isinstance(parts.get("mfu"), list) else []:
        res = row.get("result")
        label = f"mfu {row['pairs']}x{row['seq']} remat={row.get('remat')}"
        if res:
            print(f"{label}: attention={row['attention_kernel']} step {1e3 * res['step_s_median']:.1f} ms, "
                  f"{res['tokens_per_s']:,.0f} tok/s, MFU {_pct(res['mfu'])}")
        else:
            print(f"{label}: {row.get('skipped') or 'failed (rc %s)' % row.get('returncode')}")
    if "llama3_8b" in parts:
        l8 = parts["llama3_8b"]
        if "seconds_per_layer" in l8:
            print(f"llama3-8b shape: {l8['layers_fit']} layers fit, step {l8['step_s_at_fit']:.3f} s "
                  f"(MFU {_pct(l8['mfu_at_fit'])}), {1e3 * l8['seconds_per_layer']:.1f} ms/layer "
                  f"(MFU {_pct(l8['mfu_per_layer'])}), all {l8['shape']['num_hidden_layers']} layers extrapolated "
                  f"{l8['extrapolated_step_s_all_layers']:.3f} s")
        else:
            print(f"llama3-8b shape: {l8.get('error') or l8.get('skipped') or 'failed: see the JSON'}")
    if "sampler" in parts:
        s = parts["sampler"]
        if "new_tokens_per_s" in s:
            print(f"sampler: {s['new_tokens_per_s']:,.0f} new tokens/s (batch {s['spec']['batch']}, "
                  f"{s['spec']['new']} new), roofline fraction {_pct(s['roofline_fraction'])}")
        else:
            print(f"sampler: {s.get('skipped') or 'failed: see the JSON'}")


if __name__ == "__main__":
    main()
