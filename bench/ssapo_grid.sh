#!/usr/bin/env bash
# The README's SSAPO experiments on the embedded default (configs/smollm2.py, CPU, offline):
# epsilon in {0, 0.01, 0.05} x seed_label_noise in {0, 0.25}, one workdir per cell under
# ${1:-runs/grid}. Every cell is exactly
#   python -m sgpo_jax.train --config=configs/smollm2.py --workdir=DIR $MODEL \
#       --config.sgpo.epsilon=EPS --config.ssapo.seed_label_noise=NOISE
# with MODEL="--config.model.scan_layers=False --config.model.remat=False", the model layout the
# README's table was computed with (the default is now scanned layers with remat: the same math,
# half the memory, but other float rounding, so other samples).
# Round 0 (seed DPO), the split and the initial evaluation do not depend on epsilon, so the
# eps = 0 and 0.05 cells start from a copy of the eps = 0.01 cell's finished split.json,
# eval_initial*.json and round_0/ (the pipeline resumes from them; the result is the same as
# running the cell from scratch, minus ~4 minutes). The two noise levels run one after another.
set -euo pipefail
root=${1:-runs/grid}
model=(--config.model.scan_layers=False --config.model.remat=False)
for noise in 0 0.25; do
  first="$root/noise${noise}_eps0.01"
  python -m sgpo_jax.train --config=configs/smollm2.py --workdir="$first" "${model[@]}" \
      --config.sgpo.epsilon=0.01 --config.ssapo.seed_label_noise="$noise"
  for eps in 0 0.05; do
    dir="$root/noise${noise}_eps${eps}"
    if [ ! -e "$dir/round_0" ]; then
      mkdir -p "$dir"
      cp -r "$first/split.json" "$first"/eval_initial*.json "$first/round_0" "$dir/"
    fi
    python -m sgpo_jax.train --config=configs/smollm2.py --workdir="$dir" "${model[@]}" \
        --config.sgpo.epsilon="$eps" --config.ssapo.seed_label_noise="$noise"
  done
done
python - "$root" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
print("| noise | eps | initial | after round 0 | after round 1 | after round 2 |")
print("|---:|---:|---:|---:|---:|---:|")
for noise in ("0", "0.25"):
    for eps in ("0", "0.01", "0.05"):
        s = json.loads((root / f"noise{noise}_eps{eps}" / "summary.json").read_text())
        rates = [s["initial_eval"]["pass_rate_prompt"]] + [r["pass_rate_prompt"] for r in s["rounds"]]
        print(f"| {noise} | {eps} | " + " | ".join(f"{r:.3f}" for r in rates) + " |")
PY
