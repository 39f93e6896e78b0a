r"""Label-noise robustness: DPO against the robust preference losses and SGPO (both leader
pairings), several seeds, reported as mean and 95% confidence interval with paired differences.
Two arms, one command each:

    python bench/label_noise.py --task synthetic --out runs/robust_synthetic \
        --methods dpo cdpo rdpo ipo dr_dpo consistent authors --epsilon 0.05 \
        --seeds $(seq 0 12) --heldout_pairs 2048                              # the many-seed arm
    python bench/label_noise.py --out runs/label_noise                       # SmolLM2, the full grid
    python bench/label_noise.py --out runs/ln --noise 0 0.4 --methods dpo consistent \
        --train_pairs 64 --seeds 0 1 2                                        # SmolLM2, a CPU budget

Methods (TRL's names where TRL has them, :class:`sgpo_jax.core.step.SGPOConfig` fields):

* ``dpo``: ``mode="dpo"``, the sigmoid loss (the baseline of every paired difference);
* ``cdpo``: DPO with ``label_smoothing = --smoothing`` (conservative DPO);
* ``rdpo``: ``loss_type="robust"``, the assumed flip rate ``--smoothing`` (Chowdhury et al. 2024);
* ``ipo``: ``loss_type="ipo"`` (Azar et al. 2023, TRL's length-averaged form, tau = beta);
* ``dr_dpo``: ``loss_type="dr_dpo"`` with ``dr_dpo_beta = --dr_dpo_beta`` (Wu et al. 2024);
* ``consistent``: SGPO, leader and follower share the K = 6 tangent loss (``sgpo.preset=consistent``),
  the exact follower on each batch's current margins (``sgpo.follower=step``), radius ``--epsilon``;
* ``authors``: SGPO with the authors' leader, -log p with the 1e-6 floor, on the same follower
  (``leader_loss="neg_log"``; there are no self-annotations here, so no annotation atoms).

``--task synthetic``: the task of :mod:`sgpo_jax.demo` (responses are random token strings,
quality = #good - #bad tokens, :class:`~sgpo_jax.demo.PrefixMeanLM` trained from its
initialization, which is also the reference, with Adam 3e-2, beta 0.5, ``--steps`` steps of 64
pairs drawn from ``--train_pairs`` pairs). Per seed ``s`` (``numpy.random.default_rng(s)``, as
the demo) the training pairs are drawn, each label flipped with probability ``noise`` (the same
uniform draws at every noise level, so the flipped pairs at 0.2 are among those at 0.4), then
``--heldout_pairs`` clean held-out pairs; every method of a seed sees the same pairs, batches and
initialization. All seeds of a method train in one program (``vmap`` over seeds, ``scan`` over
steps): one compilation per method.

``--task smollm2``: the 200 pairs of ``sgpo_jax/assets/seed_preferences.jsonl`` (chosen answers
pass every programmatic checker, rejected ones fail one) are split once: the last
``--heldout_pairs`` (default 40) are the clean held-out set, the rest the training pool. Per
seed, ``--train_pairs`` pairs are drawn from the pool and a fraction ``noise`` of their labels
flipped (seeded). Each method trains SmolLM2-135M-Instruct (``configs/smollm2.py``'s model and
optimizer: lr 2e-5, batch 8, one epoch) from the same initial weights, which are also the
reference; ``--config`` overrides (``train.epochs=1``, ``model.lora.rank=8``, ...) apply to every
run. With ``--eval_tasks N`` it also scores the verifiable-instruction pass rate (IFEval-style,
prompt level, greedy) on the first N of the 100 bundled held-out tasks (about a minute per run
on CPU), with the initial model's rate as the reference line. Each run writes
``OUT/noise{n}_{method}_eps{e}_seed{s}/result.json`` (rerunning skips finished runs; a killed
run resumes from its checkpoint).

Score: implicit-reward accuracy on the clean held-out pairs, the fraction with
``(log pi(y_w) - log pi_0(y_w)) - (log pi(y_l) - log pi_0(y_l)) > 0``. Every run's result goes to
``--results`` (default ``OUT/results.json``) and the script prints the table, also written to
``OUT/summary.md``. Intervals: mean over seeds +- t(0.975, S-1) * sd / sqrt(S); paired
differences against DPO at the same seed and noise. Say "no detectable difference" when an
interval covers 0; with S seeds the smallest difference found with 80% power is about
(t(0.975, S-1) + t(0.8, S-1)) / t(0.975, S-1) = 1.4 (S = 13) times the paired half-width.
"""

import argparse
import ast
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sgpo_jax.eval.intervals import mean_interval  # noqa: E402

METHODS = ("dpo", "cdpo", "rdpo", "ipo", "dr_dpo", "consistent", "authors")


def method_fields(method, args):
    """The :class:`~sgpo_jax.core.step.SGPOConfig` fields (``train.*`` and ``sgpo.leader_loss``) of a method."""
    fields = {"mode": "dpo", "loss_type": "sigmoid", "label_smoothing": 0.0, "dr_dpo_beta": args.dr_dpo_beta,
              "leader_loss": None}
    fields.update({
        "dpo": {}, "cdpo": {"label_smoothing": args.smoothing},
        "rdpo": {"loss_type": "robust", "label_smoothing": args.smoothing},
        "ipo": {"loss_type": "ipo"}, "dr_dpo": {"loss_type": "dr_dpo"},
        "consistent": {"mode": "sgpo"}, "authors": {"mode": "sgpo", "leader_loss": "neg_log"},
    }[method])
    return fields


def run_name(noise, method, epsilon, seed):
    return f"noise{noise:g}_{method}_eps{epsilon:g}_seed{seed}"


def cells(args):
    """(method, epsilon) in table order: DPO-type methods at eps 0, SGPO at each ``--epsilon``."""
    return [(m, e) for m in args.methods for e in ([0.0] if method_fields(m, args)["mode"] == "dpo" else args.epsilon)]


def synthetic(args, out):
    """The many-seed arm on :mod:`sgpo_jax.demo`'s task; returns ``{run name: result}``."""
    import jax
    import jax.numpy as jnp
    import optax

    from sgpo_jax.core.losses import sequence_logps
    from sgpo_jax.core.step import PreferenceBatch, SGPOConfig, TrainState, sgpo_step
    from sgpo_jax.demo import PrefixMeanLM, make_pairs

    vocab, prompt, response, batch, beta, lr = 32, 4, 6, 64, 0.5, 3e-2
    length = prompt + response
    model = PrefixMeanLM(vocab)
    scored = jnp.asarray(np.arange(length) >= prompt, jnp.int32)[None]
    attention = jnp.ones((batch, length), jnp.int32)
    loss_mask = jnp.repeat(scored, batch, 0)

    def logps(params, ids):
        return sequence_logps(model.apply(params, ids, jnp.ones_like(ids)), ids, scored * jnp.ones_like(ids))

    seeds = args.seeds
    init = jax.vmap(lambda key: model.init(key, jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32)))(
        jnp.stack([jax.random.PRNGKey(s) for s in seeds]))
    data = {}  # noise -> per-seed stacked arrays
    for noise in args.noise:
        per_seed = []
        for seed in seeds:
            rng = np.random.default_rng(seed)
            a, b, clean, label = make_pairs(rng, args.train_pairs, vocab=vocab, prompt=prompt, response=response,
                                            noise=noise)
            test_a, test_b, test_clean, _ = make_pairs(rng, args.heldout_pairs, vocab=vocab, prompt=prompt,
                                                       response=response, noise=0.0)
            idx = np.stack([rng.choice(args.train_pairs, batch, replace=False) for _ in range(args.steps)])
            per_seed.append(dict(chosen=np.where(label[:, None], a, b), rejected=np.where(label[:, None], b, a),
                                 test_a=test_a, test_b=test_b, test_clean=test_clean, idx=idx,
                                 flipped=np.mean(label != clean)))
        data[noise] = {k: np.stack([d[k] for d in per_seed]) for k in per_seed[0]}
    logps_seeds = jax.jit(jax.vmap(logps))
    for d in data.values():
        d["ref_c"], d["ref_r"] = logps_seeds(init, d["chosen"]), logps_seeds(init, d["rejected"])
        d["ref_a"], d["ref_b"] = logps_seeds(init, d["test_a"]), logps_seeds(init, d["test_b"])

    def trainer(config):
        def one_seed(params, key, chosen, rejected, ref_c, ref_r, idx):
            state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(lr), config=config, rng=key)

            def step(state, sel):
                state, metrics = sgpo_step(state, PreferenceBatch(
                    chosen_ids=chosen[sel], chosen_attention=attention, chosen_loss_mask=loss_mask,
                    rejected_ids=rejected[sel], rejected_attention=attention, rejected_loss_mask=loss_mask,
                    ref_chosen_logps=ref_c[sel], ref_rejected_logps=ref_r[sel], weight=jnp.ones(batch)))
                return state, (metrics["loss"], metrics.get("follower/moved", jnp.zeros(())))

            state, (loss, moved) = jax.lax.scan(step, state, idx)
            return state.params, loss[-10:].mean(), moved.mean()

        return jax.jit(jax.vmap(one_seed))

    results = {}
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    for method, epsilon in cells(args):
        config = SGPOConfig(beta=beta, epsilon=epsilon, **method_fields(method, args))
        train = trainer(config)
        for first, noise in zip([True] + [False] * len(args.noise), args.noise):
            d = data[noise]
            start = time.perf_counter()
            params, loss, moved = train(init, keys, d["chosen"], d["rejected"], d["ref_c"], d["ref_r"], d["idx"])
            margins = (logps_seeds(params, d["test_a"]) - d["ref_a"]) - (logps_seeds(params, d["test_b"]) - d["ref_b"])
            accuracy = np.mean((np.asarray(margins) > 0) == d["test_clean"], axis=1)
            seconds = time.perf_counter() - start
            for i, seed in enumerate(seeds):
                results[run_name(noise, method, epsilon, seed)] = {
                    "noise": noise, "method": method, "epsilon": epsilon, "seed": seed,
                    "heldout_accuracy": float(accuracy[i]), "heldout_pairs": args.heldout_pairs,
                    "train_pairs": args.train_pairs, "flipped": float(d["flipped"][i]), "steps": args.steps,
                    "final_loss": float(loss[i]), "follower_moved": float(moved[i])}
            print(f"noise {noise:g} {method} eps {epsilon:g}: held-out accuracy {accuracy.mean():.3f} over "
                  f"{len(seeds)} seeds ({seconds:.1f} s{', with compilation' if first else ''})", flush=True)
    return results


def smollm2(args, out):
    """The real-model arm (SmolLM2-135M-Instruct); returns ``{run name: result}``."""
    from configs.smollm2 import get_config
    from sgpo_jax.data.batching import ordered_batches
    from sgpo_jax.data.pairs import load_pairs
    from sgpo_jax.eval.instructions import PROMPT_ACC, evaluate_heldout
    from sgpo_jax.models import Decoder, decoder_logps_fn, load_model
    from sgpo_jax.parallel import sharding
    from sgpo_jax.parallel.mesh import make_mesh
    from sgpo_jax.ssapo.instructions import ASSETS_DIR, load_tasks
    from sgpo_jax.training.scoring import pair_logps
    from sgpo_jax.training.trainer import fit

    def method_config(base, method, epsilon):
        c = get_config()
        c.update_from_flattened_dict(base)
        fields = method_fields(method, args)
        for name in ("mode", "loss_type", "label_smoothing", "dr_dpo_beta"):
            setattr(c.train, name, fields[name])
        c.sgpo.epsilon = epsilon
        c.sgpo.follower = "step"
        c.sgpo.preset = "consistent" if method == "consistent" else ""
        c.sgpo.leader_loss = fields["leader_loss"] or ""
        return c

    rows = [json.loads(line) for line in (ASSETS_DIR / "seed_preferences.jsonl").read_text().splitlines() if line]
    heldout, pool = rows[-args.heldout_pairs:], rows[:-args.heldout_pairs]
    if args.train_pairs > len(pool):
        raise SystemExit(f"--train_pairs {args.train_pairs} > the {len(pool)} pairs left after the held-out set")
    (out / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))

    base = {"train.epochs": 1, "export": False, "checkpoint.every": 4, "checkpoint.keep": 1}
    for key, value in (kv.split("=", 1) for kv in args.config):
        try:
            base[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a plain string
            base[key] = value
    config = get_config()
    config.update_from_flattened_dict(base)
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
    args.initial_pass_rate = json.loads(initial_file.read_text())["pass_rate_prompt"] if tasks else None
    for noise in args.noise:
        for seed in args.seeds:
            rng = np.random.default_rng([seed, round(noise * 1000)])
            train = [dict(r) for r in (pool[i] for i in rng.permutation(len(pool))[:args.train_pairs])]
            for i in rng.choice(len(train), size=round(noise * len(train)), replace=False):
                train[i]["chosen"], train[i]["rejected"] = train[i]["rejected"], train[i]["chosen"]
            data_file = out / f"train_noise{noise:g}_seed{seed}.jsonl"
            data_file.write_text("".join(json.dumps(r) + "\n" for r in train))
            for method, epsilon in cells(args):
                name = run_name(noise, method, epsilon, seed)
                done = out / name / "result.json"
                if done.exists():
                    results[name] = json.loads(done.read_text())
                    continue
                c = method_config({**base, "data.source": str(data_file), "train.seed": seed}, method, epsilon)
                pairs, gaps = load_pairs(c.data, tokenizer)
                start = time.perf_counter()
                result = fit(c, out / name, model=model, params=initial, pairs=pairs, mesh=mesh, gaps=gaps, desc=name)
                policy = pair_logps(logps_fn, result.params, batches(), len(heldout_pairs), mesh=mesh,
                                    desc="held-out scores")
                margins = (policy[0] - ref[0]) - (policy[1] - ref[1])
                results[name] = {"noise": noise, "method": method, "epsilon": epsilon, "seed": seed,
                                 "heldout_accuracy": float(np.mean(margins > 0)),
                                 "heldout_pairs": len(heldout_pairs), "train_pairs": len(pairs),
                                 "mean_loss": result.summary.get("mean_loss"),
                                 "train_seconds": time.perf_counter() - start}
                if tasks:
                    results[name].update(pass_rate(result.params, seed), eval_tasks=len(tasks))
                done.write_text(json.dumps(results[name], indent=2))
                rate = f", pass rate {results[name]['pass_rate_prompt']:.3f}" if tasks else ""
                print(f"{name}: held-out accuracy {results[name]['heldout_accuracy']:.3f}{rate}", flush=True)
    return results


def table(results, args):
    """Markdown: per (noise, method, eps) the mean [95% CI] over seeds and the paired difference
    against DPO at the same seeds, for each score."""
    scores = [("heldout_accuracy", "held-out reward accuracy")]
    if args.initial_pass_rate is not None:
        scores.append(("pass_rate_prompt",
                       f"pass rate on {args.eval_tasks} tasks (initial {args.initial_pass_rate:.3f})"))
    head = " | ".join(f"{label}, mean [95% CI] | vs DPO, paired [95% CI]" for _, label in scores)
    lines = [f"| noise | method | eps | {head} | seeds |", "|---:|---|---:|" + "---:|---:|" * len(scores) + "---:|"]
    for noise in args.noise:
        for method, epsilon in cells(args):
            runs = [r for r in (results.get(run_name(noise, method, epsilon, s)) for s in args.seeds) if r]
            if not runs:
                continue
            row = []
            for key, _ in scores:
                scored = [r for r in runs if key in r]  # runs finished before --eval_tasks was given lack it
                if not scored:
                    row.append("- | -")
                    continue
                mean, half = mean_interval([r[key] for r in scored])
                baseline = [results.get(run_name(noise, "dpo", 0.0, r["seed"])) for r in scored]
                diffs = [r[key] - b[key] for r, b in zip(scored, baseline) if b and key in b]
                paired = "-"
                if method != "dpo" and diffs:
                    d, dh = mean_interval(diffs)
                    paired = f"{d:+.3f} [{d - dh:+.3f}, {d + dh:+.3f}]"
                row.append(f"{mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] | {paired}")
            lines.append(f"| {noise:g} | {method} | {epsilon:g} | {' | '.join(row)} | {len(runs)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("smollm2", "synthetic"), default="smollm2")
    parser.add_argument("--out", default="runs/label_noise")
    parser.add_argument("--results", default=None, help="the per-run results JSON (default OUT/results.json)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["dpo", "consistent", "authors"])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[0.01, 0.05], help="SGPO radii")
    parser.add_argument("--smoothing", type=float, default=0.1, help="cDPO's label smoothing, rDPO's flip rate")
    parser.add_argument("--dr_dpo_beta", type=float, default=1.0, help="Dr. DPO's beta'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train_pairs", type=int, default=None, help="default: 160 (smollm2), 512 (synthetic)")
    parser.add_argument("--heldout_pairs", type=int, default=None, help="default: 40 (smollm2), 2048 (synthetic)")
    parser.add_argument("--steps", type=int, default=150, help="synthetic: optimizer steps of 64 pairs")
    parser.add_argument("--eval_tasks", type=int, default=0,
                        help="smollm2: also score the pass rate on the first N bundled held-out tasks (0 = no)")
    parser.add_argument("--config", nargs="*", default=[],
                        help="smollm2: config overrides for every run, e.g. model.lora.rank=8 train.epochs=1")
    args = parser.parse_args()
    synthetic_task = args.task == "synthetic"
    args.train_pairs = args.train_pairs or (512 if synthetic_task else 160)
    args.heldout_pairs = args.heldout_pairs or (2048 if synthetic_task else 40)
    args.initial_pass_rate = None  # the smollm2 arm sets it with --eval_tasks
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = (synthetic if synthetic_task else smollm2)(args, out)
    import jax

    record = {"command": "python bench/label_noise.py " + " ".join(sys.argv[1:]),
              "machine": f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, "
                         f"jax {jax.__version__}, {date.today()}",
              "seconds": round(time.perf_counter() - start, 1), "runs": results}
    Path(args.results or out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    text = table(results, args)
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
