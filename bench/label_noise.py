r"""Label-noise robustness on the bundled checker-labeled pairs: DPO against SGPO (both leader
pairings), several seeds, reported as mean and 95% confidence interval with paired differences.

    python bench/label_noise.py --out runs/label_noise                       # the full grid
    python bench/label_noise.py --out runs/ln --noise 0 0.4 --methods dpo consistent \
        --train_pairs 64 --seeds 0 1 2                                        # a CPU budget

The 200 pairs of ``sgpo_jax/assets/seed_preferences.jsonl`` (chosen answers pass every
programmatic checker, rejected ones fail one) are split once: the last ``--heldout_pairs`` are
the clean held-out set, the rest the training pool. Per seed, ``--train_pairs`` pairs are drawn
from the pool and a fraction ``noise`` of their labels flipped (seeded). Each method trains
SmolLM2-135M-Instruct (``configs/smollm2.py``'s model and optimizer: lr 2e-5, batch 8, one
epoch) from the same initial weights, which are also the reference:

* ``dpo``: ``train.mode=dpo``;
* ``consistent``: SGPO, leader and follower share the K = 6 tangent loss (``sgpo.preset=consistent``),
  the exact follower on each batch's current margins (``sgpo.follower=step``);
* ``authors``: SGPO with the authors' leader, -log p with the 1e-6 floor, on the same follower
  (``sgpo.leader_loss=neg_log``; there are no self-annotations here, so no annotation atoms).

Scores: implicit-reward accuracy on the held-out clean pairs, the fraction with
``(log pi(y_w) - log pi_0(y_w)) - (log pi(y_l) - log pi_0(y_l)) > 0``; with ``--eval_tasks N``
also the verifiable-instruction pass rate (IFEval-style, prompt level, greedy) on the first N of
the 100 bundled held-out tasks (``--eval_tasks 100``: all of them; about a minute per run on
CPU, seconds on an accelerator), with the initial model's rate as the reference line. Each run writes
``OUT/noise{n}_{method}_eps{e}_seed{s}/result.json`` (rerunning skips finished runs; a killed
run resumes from its checkpoint) and the script prints the table, also written to
``OUT/summary.md``. Intervals: mean over seeds +- t(0.975, S-1) * sd / sqrt(S); paired
differences against DPO at the same seed and noise. With few seeds and ~40 held-out pairs one
pair is 2.5 points: say "no detectable difference" when an interval covers 0.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs.smollm2 import get_config  # noqa: E402
from sgpo_jax.data.batching import ordered_batches  # noqa: E402
from sgpo_jax.data.pairs import load_pairs  # noqa: E402
from sgpo_jax.eval.instructions import PROMPT_ACC, evaluate_heldout  # noqa: E402
from sgpo_jax.eval.intervals import mean_interval  # noqa: E402
from sgpo_jax.models import Decoder, decoder_logps_fn, load_model  # noqa: E402
from sgpo_jax.parallel import sharding  # noqa: E402
from sgpo_jax.parallel.mesh import make_mesh  # noqa: E402
from sgpo_jax.ssapo.instructions import ASSETS_DIR, load_tasks  # noqa: E402
from sgpo_jax.training.scoring import pair_logps  # noqa: E402
from sgpo_jax.training.trainer import fit  # noqa: E402


def method_config(base, method, epsilon):
    c = get_config()
    c.update_from_flattened_dict(base)
    c.train.mode = "dpo" if method == "dpo" else "sgpo"
    c.sgpo.epsilon = epsilon
    c.sgpo.follower = "step"
    c.sgpo.preset = "consistent" if method == "consistent" else ""
    c.sgpo.leader_loss = "neg_log" if method == "authors" else ""
    return c


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/label_noise")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--methods", nargs="+", default=["dpo", "consistent", "authors"])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_pairs", type=int, default=160)
    parser.add_argument("--heldout_pairs", type=int, default=40)
    parser.add_argument("--eval_tasks", type=int, default=0,
                        help="also score the pass rate on the first N bundled held-out tasks (0 = no, 100 = all)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (ASSETS_DIR / "seed_preferences.jsonl").read_text().splitlines() if line]
    heldout, pool = rows[-args.heldout_pairs:], rows[:-args.heldout_pairs]
    if args.train_pairs > len(pool):
        parser.error(f"--train_pairs {args.train_pairs} > the {len(pool)} pairs left after the held-out set")
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))

    base = {"train.epochs": 1, "export": False, "checkpoint.every": 4, "checkpoint.keep": 1}
    config = get_config()
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    cfg, initial, tokenizer = load_model(config.model)
    model = Decoder(cfg)
    initial = sharding.shard_params(initial, mesh)
    logps_fn = decoder_logps_fn(model, chunk_size=config.model.logps_chunk)
    heldout_config = get_config().data
    heldout_config.source = str(out / "heldout.jsonl")
    heldout_pairs, _ = load_pairs(heldout_config, tokenizer)
    batches = lambda: ordered_batches(heldout_pairs, 16, buckets=tuple(heldout_config.buckets))
    ref = pair_logps(logps_fn, initial, batches(), len(heldout_pairs), mesh=mesh, desc="held-out reference")

    tasks = load_tasks(ASSETS_DIR / "heldout.jsonl")[:args.eval_tasks]

    def pass_rate(params, seed):
        e = config.eval
        scored = evaluate_heldout(model, params, tokenizer, tasks, max_new_tokens=e.max_new_tokens,
                                  batch_size=e.batch_size, max_prompt_length=config.data.max_prompt_length, seed=seed)
        return {"pass_rate_prompt": scored[PROMPT_ACC], "passed": scored["passed"]}

    results = {}
    initial_file = out / f"initial_eval_{len(tasks)}.json"
    if tasks and not initial_file.exists():
        initial_file.write_text(json.dumps(pass_rate(initial, 0)))
    initial_rate = json.loads(initial_file.read_text())["pass_rate_prompt"] if tasks else None
    for noise in args.noise:
        for seed in args.seeds:
            rng = np.random.default_rng([seed, round(noise * 1000)])
            train = [dict(r) for r in (pool[i] for i in rng.permutation(len(pool))[:args.train_pairs])]
            for i in rng.choice(len(train), size=round(noise * len(train)), replace=False):
                train[i]["chosen"], train[i]["rejected"] = train[i]["rejected"], train[i]["chosen"]
            data_file = out / f"train_noise{noise:g}_seed{seed}.jsonl"
            data_file.write_text("".join(json.dumps(r) + "\n" for r in train))
            for method in args.methods:
                for epsilon in ([0.0] if method == "dpo" else args.epsilon):
                    name = f"noise{noise:g}_{method}_eps{epsilon:g}_seed{seed}"
                    done = out / name / "result.json"
                    if done.exists():
                        results[name] = json.loads(done.read_text())
                        continue
                    c = method_config({**base, "data.source": str(data_file), "train.seed": seed}, method, epsilon)
                    pairs, gaps = load_pairs(c.data, tokenizer)
                    result = fit(c, out / name, model=model, params=initial, pairs=pairs, mesh=mesh, gaps=gaps,
                                 desc=name)
                    policy = pair_logps(logps_fn, result.params, batches(), len(heldout_pairs), mesh=mesh,
                                        desc="held-out scores")
                    margins = (policy[0] - ref[0]) - (policy[1] - ref[1])
                    results[name] = {"noise": noise, "method": method, "epsilon": epsilon, "seed": seed,
                                     "heldout_accuracy": float(np.mean(margins > 0)),
                                     "heldout_pairs": len(heldout_pairs), "train_pairs": len(pairs),
                                     "mean_loss": result.summary.get("mean_loss")}
                    if tasks:
                        results[name].update(pass_rate(result.params, seed), eval_tasks=len(tasks))
                    done.write_text(json.dumps(results[name], indent=2))
                    rate = f", pass rate {results[name]['pass_rate_prompt']:.3f}" if tasks else ""
                    print(f"{name}: held-out accuracy {results[name]['heldout_accuracy']:.3f}{rate}", flush=True)

    scores = [("heldout_accuracy", "held-out reward accuracy")]
    if tasks:
        scores.append(("pass_rate_prompt", f"pass rate on {len(tasks)} tasks (initial {initial_rate:.3f})"))
    head = " | ".join(f"{label}, mean [95% CI] | vs DPO, paired [95% CI]" for _, label in scores)
    lines = [f"| noise | method | eps | {head} | seeds |", "|---:|---|---:|" + "---:|---:|" * len(scores) + "---:|"]
    for noise in args.noise:
        for method in args.methods:
            for epsilon in ([0.0] if method == "dpo" else args.epsilon):
                runs = [results.get(f"noise{noise:g}_{method}_eps{epsilon:g}_seed{s}") for s in args.seeds]
                runs = [r for r in runs if r]
                if not runs:
                    continue
                cells = []
                for key, _ in scores:
                    scored = [r for r in runs if key in r]  # runs finished before --eval_tasks was given lack it
                    if not scored:
                        cells.append("- | -")
                        continue
                    mean, half = mean_interval([r[key] for r in scored])
                    baseline = [results.get(f"noise{noise:g}_dpo_eps0_seed{r['seed']}") for r in scored]
                    diffs = [r[key] - b[key] for r, b in zip(scored, baseline) if b and key in b]
                    paired = "-"
                    if method != "dpo" and diffs:
                        d, dh = mean_interval(diffs)
                        paired = f"{d:+.3f} [{d - dh:+.3f}, {d + dh:+.3f}]"
                    cells.append(f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] | {paired}")
                lines.append(f"| {noise:g} | {method} | {epsilon:g} | {' | '.join(cells)} | {len(runs)} |")
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
