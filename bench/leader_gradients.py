r"""What each leader pairing does to the hardest pairs: dL_i/dh_i per pair, from the library's own
follower and leader loss, on real self-annotated pairs.

    python bench/leader_gradients.py runs/smollm2/round_1/pairs.jsonl --epsilon 0.05

The follower runs on the authors' annotation centers sigmoid(0.1 * reward gap) (K = 6 tangents,
one global ball, then the authors' per-entry bounds on groups of 100), through the training
step's own ``follow`` (so each pairing gets the atoms its leader trains on);
the leader is evaluated where an SSAPO round starts, h = 0 (policy = reference, p = 0.5), with
beta = 0.1. Printed: the mean gradient of the per-pair leader loss with respect to the margin,
over moved pairs (some mass moved to the support's lower end) and unmoved pairs, for
DPO (-log sigmoid(beta h)), the consistent pairing (leader = the follower's K-tangent loss), and
the authors' pairing (leader -log max(p - shift, 1e-6)). Also the eps = 0 single-pair figures at
p = 0.3.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from sgpo_jax.core.follow import follow
from sgpo_jax.core.losses import dpo_loss, sgpo_loss
from sgpo_jax.core.step import SGPOConfig


def gradients(shift, mass, h0, *, beta, loss):
    """dL_i/dh_i of each pair's leader loss at margins ``h0``."""
    def per_pair(h):
        zeros = jnp.zeros_like(h)
        terms, _ = sgpo_loss(h, zeros, zeros, zeros, shift, mass, beta=beta, loss=loss, num_tangents=6)
        return jnp.sum(terms.per_pair)
    return np.asarray(jax.grad(per_pair)(h0))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", help="a round's pairs.jsonl (chosen_reward / rejected_reward columns)")
    parser.add_argument("--epsilon", type=float, default=0.05)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    rows = [json.loads(line) for line in open(args.pairs) if line.strip()]
    gaps = np.array([r["chosen_reward"] - r["rejected_reward"] for r in rows], np.float32)
    h0 = jnp.zeros(len(gaps))
    zeros = jnp.zeros_like(h0)
    dpo = np.asarray(jax.grad(lambda h: jnp.sum(dpo_loss(h, zeros, zeros, zeros, beta=args.beta)[0]))(h0))
    print(f"{len(gaps)} pairs from {args.pairs}, eps = {args.epsilon}, beta = {args.beta}, leader at h = 0")
    for variant, group in (("ball", None), ("per_entry", 100)):
        pairings = {}
        for name, leader in (("consistent (tangent leader)", None), ("authors (-log, floor)", "neg_log")):
            config = SGPOConfig(mode="sgpo", beta=args.beta, epsilon=args.epsilon, loss="tangents", num_tangents=6,
                                variant=variant, group_size=group, leader_loss=leader)
            f = follow(jnp.asarray(gaps), config, scale=0.1)  # the atoms the step's leader trains on
            pairings[name] = gradients(f.shift, f.mass, h0, beta=args.beta, loss=leader or "tangents")
        moved = np.asarray(f.worst_case.moved) > 0
        print(f"follower {variant}{'' if group is None else f', groups of {group}'}: "
              f"{moved.sum()} of {len(gaps)} pairs moved ({float(np.mean(np.asarray(f.worst_case.moved))):.3f} "
              "of the mass)")
        for name, g in (("DPO", dpo), *pairings.items()):
            mv = f"{g[moved].mean():+.4f}" if moved.any() else "-"
            un = f"{g[~moved].mean():+.4f}" if (~moved).any() else "-"
            print(f"  {name:30s} dL/dh moved {mv}   unmoved {un}")
    p = 0.3
    h = jnp.asarray([np.log(p / (1 - p)) / args.beta])
    one, zero = jnp.ones((1, 1)), jnp.zeros((1, 1))
    print(f"eps = 0, one pair at p = {p}: DPO "
          f"{float(jax.grad(lambda x: dpo_loss(x, 0 * x, 0 * x, 0 * x, beta=args.beta)[0].sum())(h)[0]):+.4f}, "
          f"tangent leader {gradients(zero, one, h, beta=args.beta, loss='tangents')[0]:+.4f}, "
          f"-log leader {gradients(zero, one, h, beta=args.beta, loss='neg_log')[0]:+.4f}")


if __name__ == "__main__":
    main()
