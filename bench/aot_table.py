"""The README's table of ahead-of-time compiles, from the reports in bench/results/aot-*.json.

Each report is what ``python -m sgpo_jax.aot --json=bench/results/aot-<model>-<target>.json``
writes (``sgpo_jax.aot.compile_run``). Per row: the model and target, the mesh, XLA's verdict on
the training step (compile time, or its out-of-memory refusal), XLA's per-chip peak against the
chip's memory, the planner's estimate and its ratio to XLA's peak, the fused attention kernels in
the compiled step (a scanned layer body counted once), the largest ``train.batch_size`` the
planner fits on the chip, and the smallest target of the same kind it fits.

    python bench/aot_table.py [bench/results/aot-*.json ...]
"""

import glob
import json
import re
import sys
from pathlib import Path

GIB = 2 ** 30
RESULTS = Path(__file__).resolve().parent / "results"


def row(report):
    t, m, s = report["target"], report["model"], report["settings"]
    mesh = "x".join(f"{k}{v}" for k, v in report["mesh"].items() if v > 1) or "1"
    step = next(p for p in report["programs"] if p["program"] == "train_step")
    model = f"{m['params'] / 1e9:.1f}B, {m['layers']} layers"
    batch = f"{s['batch_size']} x {s['seq_len']} ({s['micro_batches']} mb)"
    planner = report["planner"]["total"]
    if step["ok"]:
        peak = step["memory"]["peak"]
        verdict = f"ok ({step['compile_seconds']:.0f} s)" if peak <= t["hbm_bytes"] else "peak > HBM"
        xla = f"{peak / GIB:.1f} / {t['hbm_bytes'] / GIB:.1f}"
        ratio = f"{planner / GIB:.1f} ({planner / peak:.2f}x)"
        calls = ", ".join(f"{v} {k}" for k, v in step["fused_attention_calls"].items()) or "none"
    else:
        sizes = re.findall(r"\(([\d.]+G)\)", step["error"])  # XLA: "temporaries (373.33G) exceeds ... HBM (94.75G)"
        why = f"temporaries {sizes[0]} > HBM {sizes[1]}" if len(sizes) >= 2 else step["error"][:80]
        verdict = f"refused ({step['compile_seconds']:.0f} s): {why}"
        xla, ratio, calls = f"- / {t['hbm_bytes'] / GIB:.1f}", f"{planner / GIB:.1f}", "-"
    largest = report["planner"].get("largest_batch", "")
    smallest = report["planner"].get("smallest_target", "") or "none up to 512 chips"
    return (f"| {model} | {t['name']} | {mesh} | {batch} | {verdict} | {xla} | {ratio} | {calls} | "
            f"{largest or 'none'} | {smallest} |")


def main(paths):
    paths = paths or sorted(glob.glob(str(RESULTS / "aot-*.json")))
    print("| model | target | mesh | step batch | XLA: train step | XLA peak / HBM per chip (GiB) | "
          "planner GiB (/ XLA) | fused attention in the step | largest batch (planner) | smallest target "
          "(planner) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        print(row(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
