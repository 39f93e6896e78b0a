r"""The held-out preference pairs of a ``dpo``/``sgpo`` run: ``data.eval_source`` (a file or
dataset of its own) or ``data.eval_fraction`` of the usable pairs of ``data.source``.

The fraction is split by a hash of each pair's source row index, not by a seeded permutation:
pair :math:`i` with source row :math:`r_i` gets the key :math:`\text{SHA-256}(\texttt{"sgpo\_jax.holdout:"} r_i)`
(its first 8 bytes, big-endian), and the :math:`m = \operatorname{round}(f N)` pairs with the
smallest keys are held out (at least 1; at least one pair is left to train on). The split so
depends on the source rows alone: not on ``train.seed`` (every seed of a study is scored on the
same pairs), the tokenizer or the order of the other rows, and rerunning gives the same split.
Train and held-out pairs keep source order; together they are every usable pair, each once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Sequence

import numpy as np
from ml_collections import ConfigDict

from sgpo_jax.config import replaced
from sgpo_jax.data.pairs import load_pairs
from sgpo_jax.data.tokenize import TokenizedPairs
from sgpo_jax.errors import ConfigError, DataError

__all__ = ["HeldOut", "hash_keys", "held_out", "select_pairs", "split_indices"]


@dataclasses.dataclass
class HeldOut:
    """A run's pairs after the hold-out: ``train`` (with its reward ``gaps [N_train]``), ``eval``
    (None without held-out pairs) and ``line``, the one-line report of what was held out and
    from where ('' without)."""

    train: TokenizedPairs
    gaps: np.ndarray
    eval: Optional[TokenizedPairs]
    line: str


def hash_keys(rows: Sequence[int]) -> np.ndarray:
    """uint64 ``[N]``: each source row index's SHA-256 key (module docstring)."""
    return np.array([int.from_bytes(hashlib.sha256(f"sgpo_jax.holdout:{int(r)}".encode()).digest()[:8], "big")
                     for r in rows], np.uint64)


def split_indices(rows: Sequence[int], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(train, eval)``: sorted int64 indices into ``rows`` (the pairs' source rows); ``eval`` the
    ``max(1, round(fraction * N))`` pairs with the smallest :func:`hash_keys` (ties, which need
    equal row indices, by position). Raises :class:`DataError` unless a pair is left on each side."""
    n = len(rows)
    count = max(1, int(round(fraction * n)))
    if count >= n:
        raise DataError(f"data.eval_fraction={fraction} of {n} usable pairs holds out {count}, leaving none to "
                        "train on", "lower data.eval_fraction or give more pairs")
    order = np.argsort(hash_keys(rows), kind="stable")
    return np.sort(order[count:]).astype(np.int64), np.sort(order[:count]).astype(np.int64)


def select_pairs(pairs: TokenizedPairs, indices: np.ndarray) -> TokenizedPairs:
    """The pairs at ``indices`` (one data shard, every pair held), in that order."""
    if pairs.num_shards > 1:
        raise ConfigError(f"data.eval_fraction needs the pairs in one data shard, these are in {pairs.num_shards}",
                          "set --config.data.shards=1, or give the held-out pairs as --config.data.eval_source")
    pick = lambda arrays: [arrays[int(i)] for i in indices]
    return dataclasses.replace(pairs, prompt_ids=pick(pairs.prompt_ids), chosen_ids=pick(pairs.chosen_ids),
                               rejected_ids=pick(pairs.rejected_ids), rows=np.asarray(pairs.rows)[indices],
                               lengths=None)


def held_out(config: ConfigDict, tokenizer, pairs: TokenizedPairs, gaps: np.ndarray) -> HeldOut:
    """The run's held-out pairs from ``data.eval_source`` (read and tokenized with the ``data``
    settings, all of it: ``data.limit`` does not apply, one shard on every process) or
    ``data.eval_fraction`` of ``pairs`` (the usable pairs of ``data.source``, after
    ``data.limit``), with ``gaps`` cut to the training pairs."""
    d = config.data
    if d.eval_source:
        data = replaced(config, **{"data.limit": 0, "data.shards": 1}).data
        heldout, _ = load_pairs(data, tokenizer, d.eval_source)
        return HeldOut(pairs, gaps, heldout, f"held-out pairs: {len(heldout)} from data.eval_source {d.eval_source} "
                                             f"(training on all {len(pairs)} usable pairs of {d.source})")
    if not d.eval_fraction:
        return HeldOut(pairs, gaps, None, "")
    train, heldout = split_indices(pairs.rows, d.eval_fraction)
    line = (f"held-out pairs: {len(heldout)} of the {len(pairs)} usable pairs of {d.source} (data.eval_fraction="
            f"{d.eval_fraction}, the smallest SHA-256 of the source row index); training on the other {len(train)}")
    return HeldOut(select_pairs(pairs, train), np.asarray(gaps)[train], select_pairs(pairs, heldout), line)
