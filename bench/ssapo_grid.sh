#!/usr/bin/env bash
# The SSAPO grid on the embedded default (configs/smollm2.py, offline): for every seed in $SEEDS
# and label noise in $NOISES, cells that share the split, the initial evaluation and round 0
# (seed DPO) and differ in rounds 1..T only:
#   dpo        --config.ssapo.round_mode=dpo            (the baseline: DPO on the self-annotated pairs)
#   sgpoE      --config.sgpo.epsilon=E for E in $EPSILONS (default "0.01 0.05"; SGPO with
#              configs/smollm2.py's consistent preset)
# Every cell is exactly
#   python -m sgpo_jax.train --config=configs/smollm2.py --workdir=ROOT/noiseN_METHOD_seedS \
#       --config.train.seed=S --config.ssapo.seed_label_noise=N --config.eval.limit=$EVAL_LIMIT \
#       [the cell's flag] [extra arguments given after ROOT]
# The dpo cell runs first; the others start from a copy of its split.json, eval_initial*.json and
# round_0/ (the pipeline resumes from them: the same result as running the cell from scratch,
# minus round 0). Rerunning skips finished cells (each run resumes). At the end it prints, per
# noise and method, the final held-out prompt-level pass rate as mean [95% t interval over seeds]
# and the paired difference against the dpo cell of the same seed (a t interval over seeds, and
# the exact McNemar test on all (seed, task) outcomes pooled), and writes ROOT/summary.{md,json}.
#
#   bash bench/ssapo_grid.sh runs/grid                       # SEEDS="0 1 2", NOISES="0 0.25", all 100 tasks
#   NOISES=0 EPSILONS=0.05 bash bench/ssapo_grid.sh runs/grid   # the CPU budget the README reports
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
epsilons=(${EPSILONS:-0.01 0.05})
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
    for eps in "${epsilons[@]}"; do
      dir="$root/noise${noise}_sgpo${eps}_seed${seed}"
      if [ ! -e "$dir/round_0" ]; then
        mkdir -p "$dir"
        cp -r "$base/split.json" "$base"/eval_initial*.json "$base/round_0" "$dir/"
      fi
      cell "$dir" "$noise" "$seed" --config.sgpo.epsilon="$eps" "$@"
    done
  done
done
python - "$root" "${seeds[*]}" "${noises[*]}" "${epsilons[*]}" <<'PY'
import json, sys
from pathlib import Path

from sgpo_jax.eval.intervals import mean_interval, paired_change

root, seeds, noises = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
methods = ["dpo"] + [f"sgpo{eps}" for eps in sys.argv[4].split()]


def interval(values, sign=""):
    """mean [95% t interval over seeds]; sign="+" for differences."""
    mean, half = mean_interval(values)
    if len(values) < 2:
        return f"{mean:{sign}.3f} [one seed]"
    return f"{mean:{sign}.3f} [{mean - half:{sign}.3f}, {mean + half:{sign}.3f}]"


def cell(noise, method, seed):
    """The cell's final-round and initial pass rates and per-task outcomes (eval files)."""
    path = root / f"noise{noise}_{method}_seed{seed}"
    last = json.loads((path / "summary.json").read_text())["rounds"][-1]["round"]
    final = json.loads((path / f"round_{last}" / "eval.json").read_text())
    initial = json.loads((path / "eval_initial.json").read_text())
    return dict(rate=final["prompt_level_strict_acc"], passed=final["passed"], tasks=final["num_tasks"],
                initial=initial["prompt_level_strict_acc"])


lines = ["| noise | method | initial pass rate | final pass rate, mean [95% CI] | vs dpo, paired over seeds [95% CI] "
         "| vs dpo, pooled tasks x seeds (+won/-lost, exact McNemar p) | seeds | tasks |",
         "|---:|---|---:|---:|---:|---:|---:|---:|"]
results = []
read = {(noise, method): [cell(noise, method, seed) for seed in seeds] for noise in noises for method in methods}
for noise in noises:
    dpo = read[noise, "dpo"]
    for method in methods:
        cells = read[noise, method]
        diffs = [c["rate"] - d["rate"] for c, d in zip(cells, dpo)]
        pooled = paired_change(sum((d["passed"] for d in dpo), []), sum((c["passed"] for c in cells), []))
        results.append(dict(noise=float(noise), method=method, seeds=[int(s) for s in seeds],
                            final=[c["rate"] for c in cells], initial=[c["initial"] for c in cells],
                            diff_vs_dpo=diffs, pooled_vs_dpo=pooled, tasks=cells[0]["tasks"]))
        paired, pooled_text = "-", "-"
        if method != "dpo":
            paired = interval(diffs, "+")
            pooled_text = f"{pooled['change']:+.3f} (+{pooled['gained']}/-{pooled['lost']}, p={pooled['p_value']:.2f})"
        lines.append(f"| {noise} | {method} | {interval([c['initial'] for c in cells])} "
                     f"| {interval([c['rate'] for c in cells])} | {paired} | {pooled_text} | {len(seeds)} "
                     f"| {cells[0]['tasks']} |")
table = "\n".join(lines)
(root / "summary.md").write_text(table + "\n")
(root / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
print(table)
PY
