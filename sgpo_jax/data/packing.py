"""Prefix sharing and padding-free packing of a host batch (the host side of
:class:`sgpo_jax.models.packed.PackedPairs`).

:func:`pack_batch` takes a :class:`~sgpo_jax.data.batching.PairBatcher` batch dict of ``b``
pairs and lays the same pairs, in the same order and with the same weights and indices, out as
sequences in rows:

* ``share_prompt=True``: one sequence per pair, ``[prompt, chosen, rejected]`` (branch ids
  ``0 / 1 / 2``, the rejected positions restarting at the prompt's length); ``False``: two,
  ``[prompt, chosen]`` and ``[prompt, rejected]``, and no branch ids (``packed_branch_ids`` is
  ``None``: splash attention can then take the rows' segment ids).
* ``budget=None``: each pair in its own row (``b`` rows), padded to the smallest of ``buckets``
  that holds the longest pair's sequences (or the next power of two); ``budget=T``: rows of ``T``
  slots filled first-fit, longest sequence first (no attention crosses sequences: segment ids),
  their count rounded up to a power of two times ``row_multiple`` (padding rows are empty), so
  at most ``log2(2b)`` row counts reach the compiled step per ``T``.
* ``groups=m`` (gradient accumulation, ``train.micro_batches``): the pairs split as the step
  splits them, group ``g`` the pairs ``[g b / m, (g + 1) b / m)``, and each group is laid out
  on its own in ``R`` rows (the groups' largest count, rounded as above): rows ``[g R, (g + 1) R)``
  hold exactly group ``g``'s sequences, so no pair straddles two micro-batches. The chains
  index the flat slots of all ``m R`` rows; :func:`sgpo_jax.core.step.sgpo_step` re-bases them
  per micro-batch.

Everything per pair (``weight``, ``index``, and so the reference log-probs and the follower's
atoms looked up by :func:`~sgpo_jax.data.batching.preference_batch`) is unchanged; the
``*_ids``/``*_attention``/``*_loss_mask`` arrays become ``[b, 0]`` (the step scores the packed
rows instead) and the layout comes as ``packed_*`` keys.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["PACKED_FIELDS", "pack_batch", "row_length"]

PACKED_FIELDS = ("ids", "positions", "segment_ids", "branch_ids", "chosen_index", "chosen_mask", "rejected_index",
                 "rejected_mask")


def row_length(needed: int, buckets: Sequence[int]) -> int:
    """The smallest of ``buckets`` that is ``>= needed``, else the next power of two ``>= needed``."""
    fitting = [int(b) for b in buckets if int(b) >= needed]
    return min(fitting) if fitting else 1 << max(needed - 1, 0).bit_length()


def _split_row(ids: np.ndarray, attention: np.ndarray, loss_mask: np.ndarray, index: int, side: str
               ) -> Tuple[np.ndarray, np.ndarray]:
    """``(prompt, response)`` token ids of one batch row: real tokens not scored, then scored."""
    real = np.flatnonzero(attention)
    scored = np.flatnonzero(loss_mask)
    if real.size and (not np.array_equal(real, np.arange(real[0], real[0] + real.size))
                      or not np.array_equal(scored, real[real.size - scored.size:])):
        raise ValueError(f"pair {index} ({side}): its tokens must be contiguous, prompt then the scored response")
    prompt_len = real.size - scored.size
    return ids[real[:prompt_len]], ids[scored]


def _sequences(prompt: np.ndarray, chosen: np.ndarray, rejected_prompt: np.ndarray, rejected: np.ndarray,
               share_prompt: bool) -> List[Dict[str, np.ndarray]]:
    """The pair's sequences: each ``ids``, ``positions``, ``branch`` (shared only) and the chains (slot offsets
    within the sequence, with their score masks) of the responses it holds."""
    def chain(first: int, length: int, prompt_len: int) -> Tuple[np.ndarray, np.ndarray]:
        slots = np.arange(first, first + length)
        if prompt_len:  # the prompt's last token predicts the response's first
            return np.concatenate([[prompt_len - 1], slots]), (np.arange(length + 1) > 0).astype(np.int32)
        return slots, (np.arange(length) > 0).astype(np.int32)  # position 0 is never scored

    p, c, r = len(prompt), len(chosen), len(rejected)
    if share_prompt:
        return [dict(ids=np.concatenate([prompt, chosen, rejected]),
                     positions=np.concatenate([np.arange(p + c), np.arange(p, p + r)]),
                     branch=np.concatenate([np.zeros(p), np.ones(c), np.full(r, 2)]),
                     chosen=chain(p, c, p), rejected=chain(p + c, r, p))]
    q = len(rejected_prompt)
    return [dict(ids=np.concatenate([prompt, chosen]), positions=np.arange(p + c), chosen=chain(p, c, p)),
            dict(ids=np.concatenate([rejected_prompt, rejected]), positions=np.arange(q + r),
                 rejected=chain(q, r, q))]


def pack_batch(batch: Dict[str, np.ndarray], *, share_prompt: bool, budget: Optional[int] = None,
               buckets: Sequence[int] = (), pad_id: int = 0, row_multiple: int = 1, groups: int = 1
               ) -> Dict[str, np.ndarray]:
    """The batch's pairs as packed rows (module docstring); returns a new dict (its
    ``packed_groups`` is ``groups``).

    Raises:
      ValueError: a pair's sequence is longer than ``budget``; with ``share_prompt``, a pair whose
        chosen and rejected rows hold different prompts; a row whose tokens are not contiguous
        ``[prompt, response]``; ``groups`` not dividing the pair count.
    """
    index = batch["index"]
    b = len(index)
    if budget is None and not share_prompt:
        raise ValueError("pack_batch without share_prompt needs a token budget (else it is the unpacked batch)")
    if groups < 1 or b % groups:
        raise ValueError(f"a batch of {b} pairs does not split into {groups} groups (micro-batches)")
    size = b // groups
    sequences: List[Tuple[int, Dict[str, np.ndarray]]] = []  # (pair row, sequence)
    for row in range(b):
        if index[row] < 0:
            continue
        prompt, chosen = _split_row(batch["chosen_ids"][row], batch["chosen_attention"][row],
                                    batch["chosen_loss_mask"][row], int(index[row]), "chosen")
        rejected_prompt, rejected = _split_row(batch["rejected_ids"][row], batch["rejected_attention"][row],
                                               batch["rejected_loss_mask"][row], int(index[row]), "rejected")
        if share_prompt and not np.array_equal(prompt, rejected_prompt):
            raise ValueError(f"pair {int(index[row])}: chosen and rejected hold different prompts; prefix sharing "
                             "needs one prompt")
        sequences += [(row, s) for s in _sequences(prompt, chosen, rejected_prompt, rejected, share_prompt)]
    longest = max([len(s["ids"]) for _, s in sequences], default=1)
    if budget is None:  # one row per pair: group g's pairs fill its rows in order
        t = row_length(longest, buckets)
        placement = [(row, 0) for row, _ in sequences]
        rows = b
    else:
        if longest > budget:
            raise ValueError(f"a sequence of {longest} tokens does not fit the packing budget of {budget} tokens")
        t, placement, used = budget, [None] * len(sequences), 1
        for g in range(groups):  # first-fit decreasing within each group, rows local to the group
            free = []
            members = [k for k, (row, _) in enumerate(sequences) if row // size == g]
            for k in sorted(members, key=lambda k: -len(sequences[k][1]["ids"])):  # stable: ties in order
                n = len(sequences[k][1]["ids"])
                row = next((i for i, room in enumerate(free) if room >= n), len(free))
                if row == len(free):
                    free.append(t)
                placement[k] = (row, t - free[row])
                free[row] -= n
            used = max(used, len(free))
        per_group = row_multiple * row_length(-(-used // row_multiple), ())
        placement = [(sequences[k][0] // size * per_group + row, start) for k, (row, start) in enumerate(placement)]
        rows = groups * per_group
    chain_len = row_length(max([len(s[side][0]) for _, s in sequences for side in ("chosen", "rejected") if side in s],
                               default=1), buckets)
    out = {name: np.zeros((rows, t), np.int32) for name in ("positions", "segment_ids", "branch_ids")}
    if not share_prompt:
        out["branch_ids"] = None
    out["ids"] = np.full((rows, t), pad_id, np.int32)
    for side in ("chosen", "rejected"):
        out[f"{side}_index"] = np.zeros((b, chain_len), np.int32)
        out[f"{side}_mask"] = np.zeros((b, chain_len), np.int32)
    for (pair_row, seq), (row, start) in zip(sequences, placement):
        n = len(seq["ids"])
        out["ids"][row, start:start + n] = seq["ids"]
        out["positions"][row, start:start + n] = seq["positions"]
        out["segment_ids"][row, start:start + n] = out["segment_ids"][row].max() + 1
        if share_prompt:
            out["branch_ids"][row, start:start + n] = seq["branch"]
        for side in ("chosen", "rejected"):
            if side in seq:
                slots, mask = seq[side]
                out[f"{side}_index"][pair_row, :len(slots)] = row * t + start + slots
                out[f"{side}_mask"][pair_row, :len(slots)] = mask
    packed = {k: v for k, v in batch.items()
              if not k.startswith(("chosen_", "rejected_"))}
    for side in ("chosen", "rejected"):
        for name in ("ids", "attention", "loss_mask"):
            packed[f"{side}_{name}"] = np.zeros((b, 0), np.int32)
    packed.update({f"packed_{name}": out[name] for name in PACKED_FIELDS})
    packed["packed_groups"] = groups
    return packed
