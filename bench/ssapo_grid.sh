#!/usr/bin/env bash
# The SSAPO grid on the embedded default (configs/smollm2.py, offline): for every seed in $SEEDS
# and label noise in $NOISES, three cells that share the split, the initial evaluation and round 0
# (seed DPO) and differ in rounds 1..T only:
#   dpo        --config.ssapo.round_mode=dpo            (the baseline: DPO on the self-annotated pairs)
#   sgpo0.01   --config.sgpo.epsilon=0.01               (SGPO, configs/smollm2.py's consistent preset)
#   sgpo0.05   --config.sgpo.epsilon=0.05
# Every cell is exactly
#   python -m sgpo_jax.train --config=configs/smollm2.py --workdir=ROOT/noiseN_METHOD_seedS \
#       --config.train.seed=S --config.ssapo.seed_label_noise=N --config.eval.limit=$EVAL_LIMIT \
#       [the cell's flag] [extra arguments given after ROOT]
# The dpo cell runs first; the others start from a copy of its split.json, eval_initial*.json and
# round_0/ (the pipeline resumes from them: the same result as running the cell from scratch,
# minus round 0). Rerunning skips finished cells (each run resumes). At the end it prints, per
# noise and method, the final held-out prompt-level pass rate as mean [95% t interval over seeds]
# and the paired difference against the dpo cell of the same seed, and writes ROOT/summary.md.
#
#   bash bench/ssapo_grid.sh runs/grid                       # SEEDS="0 1 2", NOISES="0 0.25", all 100 tasks
#   SEEDS=0 NOISES=0 EVAL_LIMIT=4 bash bench/ssapo_grid.sh runs/grid_smoke \
#       --config.ssapo.pool_sizes='(8,)' --config.ssapo.seed_size=8 --config.ssapo.max_new_tokens=16
#
# On 2 CPU cores one cell takes about 11 minutes with all 100 tasks (18 cells: 3.3 hours); on one
# GPU a round takes seconds.
set -euo pipefail
root=${1:-runs/grid}
shift || true
seeds=(${SEEDS:-0 1 2})
noises=(${NOISES:-0 0.25})
eval_limit=${EVAL_LIMIT:-0}
cell() {  # cell DIR NOISE SEED FLAG...
  local dir=$1 noise=$2 seed=$3
  shift 3
  python -m sgpo_jax.train --config=configs/smollm2.py --workdir="$dir" --config.train.seed="$seed" \
      --config.ssapo.seed_label_noise="$noise" --config.eval.limit="$eval_limit" "$@"
}
for seed in "${seeds[@]}"; do
  for noise in "${noises[@]}"; do
    base="$root/noise${noise}_dpo_seed${seed}"
    cell "$base" "$noise" "$seed" --config.ssapo.round_mode=dpo "$@"
    for eps in 0.01 0.05; do
      dir="$root/noise${noise}_sgpo${eps}_seed${seed}"
      if [ ! -e "$dir/round_0" ]; then
        mkdir -p "$dir"
        cp -r "$base/split.json" "$base"/eval_initial*.json "$base/round_0" "$dir/"
      fi
      cell "$dir" "$noise" "$seed" --config.sgpo.epsilon="$eps" "$@"
    done
  done
done
python - "$root" "${seeds[*]}" "${noises[*]}" <<'PY'
import json, sys
from pathlib import Path

from sgpo_jax.ssapo.eval import mean_interval

root, seeds, noises = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()


def interval(values, sign=""):
    """mean [95% t interval over seeds]; sign="+" for differences."""
    mean, half = mean_interval(values)
    if len(values) < 2:
        return f"{mean:{sign}.3f} [one seed]"
    return f"{mean:{sign}.3f} [{mean - half:{sign}.3f}, {mean + half:{sign}.3f}]"


def final_rate(noise, method, seed):
    summary = json.loads((root / f"noise{noise}_{method}_seed{seed}" / "summary.json").read_text())
    return summary["rounds"][-1]["pass_rate_prompt"], summary["rounds"][-1]["eval_tasks"], summary["initial_eval"]


lines = ["| noise | method | initial pass rate | final pass rate, mean [95% CI] | vs dpo, paired [95% CI] | seeds | tasks |",
         "|---:|---|---:|---:|---:|---:|---:|"]
for noise in noises:
    for method in ("dpo", "sgpo0.01", "sgpo0.05"):
        rates, diffs, initial, tasks = [], [], [], 0
        for seed in seeds:
            rate, tasks, first = final_rate(noise, method, seed)
            rates.append(rate)
            initial.append(first["pass_rate_prompt"])
            diffs.append(rate - final_rate(noise, "dpo", seed)[0])
        paired = "-" if method == "dpo" else interval(diffs, "+")
        lines.append(f"| {noise} | {method} | {interval(initial)} | {interval(rates)} | {paired} | {len(seeds)} | {tasks} |")
table = "\n".join(lines)
(root / "summary.md").write_text(table + "\n")
print(table)
PY
