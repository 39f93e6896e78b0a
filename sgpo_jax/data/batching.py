"""Padded, bucketed, shuffled and host-sharded batches of tokenized pairs.

A global batch holds ``B = batch_size`` pairs: ``c = B / S`` from each of the ``S`` data shards
of the pairs (one shard unless the pairs were tokenized per host, see
:meth:`~sgpo_jax.data.tokenize.TokenizedPairs.from_shards`), in shard order. With
``process_count`` hosts, host ``p`` gets rows ``[p * b, (p + 1) * b)``, ``b = B / process_count``,
so the hosts' batches, concatenated in host order, are the global batch; those rows come from
shards ``[floor(p S / P), ceil((p + 1) S / P))`` (:func:`held_shards`), the only ones whose token
ids host ``p`` needs. Each row is a pair's prompt followed by its response, right-padded with the
pad id to the batch's length ``T``: the smallest bucket that holds the longest pair of the
*global* batch (chosen and rejected alike), so every host pads to the same shape and at most
``len(buckets)`` shapes ever reach the compiled step.

Each shard's pair order in an epoch is a permutation seeded by ``(seed, epoch)`` (one shard) or
``(seed, epoch, shard)``; batch ``(epoch, step)`` depends on nothing else (not on the number of
hosts), so resuming at a step yields the batches an uninterrupted run would. An epoch has
``max_s ceil(n_s / c)`` steps; a shard whose pairs run out (its last batch, or a shard with fewer
pairs than the others) fills its part with padding rows (weight 0, index -1): no pair is dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sgpo_jax.core.step import PreferenceBatch
from sgpo_jax.data.packing import PACKED_FIELDS
from sgpo_jax.data.tokenize import TokenizedPairs
from sgpo_jax.models.packed import PackedPairs

__all__ = ["PairBatcher", "default_buckets", "held_shards", "ordered_batches", "preference_batch"]


def held_shards(process_index: int, process_count: int, num_shards: int) -> range:
    """The data shards whose pairs host ``process_index`` feeds (module docstring):
    ``[floor(p S / P), ceil((p + 1) S / P))``; e.g. ``S = P``: shard ``p``; ``S = 2P``: shards
    ``2p, 2p + 1``; ``S = 1``: shard 0 on every host."""
    if not 0 <= process_index < process_count or num_shards < 1:
        raise ValueError(f"need 0 <= process_index < process_count and num_shards >= 1, got {process_index}, "
                         f"{process_count} and {num_shards}")
    return range(process_index * num_shards // process_count, -(-(process_index + 1) * num_shards // process_count))


def default_buckets(max_length: int, *, smallest: int = 64) -> Tuple[int, ...]:
    """Powers of two ``smallest * 2^k`` below ``max_length``, then ``max_length``; e.g.
    ``1024 -> (64, 128, 256, 512, 1024)`` and ``1000 -> (64, 128, 256, 512, 1000)``."""
    if max_length < 1 or smallest < 1:
        raise ValueError(f"max_length and smallest must be >= 1, got {max_length} and {smallest}")
    buckets = []
    length = smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


class PairBatcher:
    """Batches of :class:`~sgpo_jax.data.tokenize.TokenizedPairs` for training (see the module
    docstring).

    A batch is a dict of NumPy arrays, ``b`` this host's rows and ``T`` the bucketed length:

    * ``chosen_ids``, ``rejected_ids``: int32 ``[b, T]``, prompt then response, then pad ids;
    * ``chosen_attention``, ``rejected_attention``: int32 ``[b, T]``, 1 on prompt and response;
      a padding row attends its first position only, so no attention row is fully masked;
    * ``chosen_loss_mask``, ``rejected_loss_mask``: int32 ``[b, T]``, 1 exactly on the response;
    * ``weight``: float32 ``[b]``, 1 for pairs, 0 for padding rows;
    * ``index``: int32 ``[b]``, the pair's global index in ``pairs`` (-1 for padding rows), to
      look up cached reference log-probs (mask them with ``weight``).

    Args:
      pairs: the tokenized pairs; this host must hold the shards :func:`held_shards` names.
      batch_size: pairs per global batch, divisible by ``process_count`` and by the number of
        shards.
      buckets: allowed lengths ``T``; default :func:`default_buckets` of ``pairs.max_length``.
        The largest must hold the longest pair.
      shuffle: permute each shard's pairs every epoch (else keep their order).
      seed: shuffling seed.
      process_index, process_count: this host and the number of hosts.
    """

    def __init__(
        self,
        pairs: TokenizedPairs,
        batch_size: int,
        *,
        buckets: Optional[Sequence[int]] = None,
        shuffle: bool = True,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        shards = pairs.num_shards
        if batch_size < 1 or batch_size % process_count or batch_size % shards:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of process_count "
                             f"({process_count}) and of the number of data shards ({shards})")
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
        needed = held_shards(process_index, process_count, shards)
        first, last = pairs.held_shards
        if not (first <= needed.start and needed.stop <= last):
            raise ValueError(f"host {process_index} of {process_count} feeds data shards [{needed.start}, "
                             f"{needed.stop}) of {shards} but holds the token ids of [{first}, {last})")
        buckets = default_buckets(pairs.max_length) if buckets is None else buckets
        self.buckets = tuple(sorted({int(b) for b in buckets}))
        self._lengths = pairs.pair_lengths()
        longest = int(self._lengths.max())
        if not self.buckets or self.buckets[0] < 1 or self.buckets[-1] < longest:
            raise ValueError(f"buckets {self.buckets} must be positive and the largest must hold the longest pair "
                             f"({longest} tokens)")
        self.pairs = pairs
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        self.shard_batch_size = batch_size // shards
        self.shuffle = shuffle
        self.seed = seed
        self.process_index = process_index
        self._offsets = pairs.shard_offsets()
        self._order: Optional[Tuple[int, List[np.ndarray]]] = None  # (epoch, its order), the last one asked

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: ``max_s ceil(n_s / c)`` (``ceil(N / B)`` with one shard)."""
        return int(max(-(-np.diff(self._offsets) // self.shard_batch_size)))

    def order(self, epoch: int) -> List[np.ndarray]:
        """Per shard, int64 ``[n_s]``: its pairs' global indices in ``epoch``'s order."""
        if self._order is None or self._order[0] != epoch:
            order = []
            for s, (begin, end) in enumerate(zip(self._offsets[:-1], self._offsets[1:])):
                n = int(end - begin)
                key = (self.seed, epoch) if len(self._offsets) == 2 else (self.seed, epoch, s)
                local = np.random.default_rng(key).permutation(n) if self.shuffle else np.arange(n)
                order.append(begin + local)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, epoch: int, step: int) -> Dict[str, np.ndarray]:
        """This host's part of global batch ``step`` (``0 <= step < steps_per_epoch``) of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range [0, {self.steps_per_epoch})")
        c = self.shard_batch_size
        indices = np.full(self.batch_size, -1, np.int64)
        for s, shard in enumerate(self.order(epoch)):
            chunk = shard[step * c:(step + 1) * c]
            indices[s * c:s * c + len(chunk)] = chunk
        real = indices[indices >= 0]
        length = self.buckets[int(np.searchsorted(self.buckets, self._lengths[real].max()))]
        start = self.process_index * self.local_batch_size
        return _assemble(self.pairs, indices[start:start + self.local_batch_size], length)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
        """This host's batches of ``epoch`` from ``start_step`` on (to resume mid-epoch)."""
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


def ordered_batches(
    pairs: TokenizedPairs,
    batch_size: int,
    *,
    buckets: Optional[Sequence[int]] = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Dict[str, np.ndarray]]:
    """Every pair once, each shard in order, in :class:`PairBatcher` batches of ``batch_size``
    (the last one padded); for forward-only passes such as the reference log-probs."""
    return PairBatcher(pairs, batch_size, buckets=buckets, shuffle=False, process_index=process_index,
                       process_count=process_count).epoch(0)


def _assemble(pairs: TokenizedPairs, indices: np.ndarray, length: int) -> Dict[str, np.ndarray]:
    """The batch dict of ``indices`` (``[b]``, -1 for padding rows) padded to ``length``."""
    b = len(indices)
    batch = {}
    for side in ("chosen", "rejected"):
        ids = np.full((b, length), pairs.pad_id, np.int32)
        attention = np.zeros((b, length), np.int32)
        loss_mask = np.zeros((b, length), np.int32)
        for row, k in enumerate(indices):
            if k < 0:
                attention[row, 0] = 1
                continue
            prompt, chosen, rejected = pairs.token_ids(int(k))
            response = chosen if side == "chosen" else rejected
            p, n = len(prompt), len(prompt) + len(response)
            ids[row, :p] = prompt
            ids[row, p:n] = response
            attention[row, :n] = 1
            loss_mask[row, p:n] = 1
        batch.update({f"{side}_ids": ids, f"{side}_attention": attention, f"{side}_loss_mask": loss_mask})
    batch["weight"] = (indices >= 0).astype(np.float32)
    batch["index"] = indices.astype(np.int32)
    return batch


def preference_batch(batch: Dict[str, np.ndarray], ref: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                     atoms: Optional[Tuple[np.ndarray, np.ndarray]] = None,
                     support: Optional[Sequence[float]] = None) -> PreferenceBatch:
    """A host batch (a :class:`PairBatcher` dict, ``b`` rows) as a
    :class:`~sgpo_jax.core.step.PreferenceBatch` of NumPy arrays.

    Per-pair arrays indexed by pair (``batch["index"]``; padding rows, index -1, get zeros):
    ``ref = (chosen [N], rejected [N])`` reference log-probs (zeros when None), ``atoms =
    (shift [N, J], mass [N, J])`` the follower's atoms (None: the step runs its own follower),
    and ``support`` the margin window ``(lo, hi)`` the atoms were solved on (margin space)."""
    index = batch["index"]
    real = index >= 0
    rows = np.maximum(index, 0)
    take = lambda values: np.where(real, values[rows], 0).astype(np.float32)
    zeros = np.zeros(index.shape, np.float32)
    tokens = {f.name: batch[f.name] for f in dataclasses.fields(PreferenceBatch) if f.name in batch}
    extra = {}
    if "packed_ids" in batch:  # a pack_batch dict
        extra["packed"] = PackedPairs(**{name: batch[f"packed_{name}"] for name in PACKED_FIELDS},
                                      groups=int(batch["packed_groups"]))
    if atoms is not None:
        shift, mass = atoms
        extra.update(atom_shift=np.where(real[:, None], shift[rows], 0).astype(np.float32),
                     atom_mass=np.where(real[:, None], mass[rows], 0).astype(np.float32))
        if support is not None:
            extra["support"] = np.tile(np.asarray(support, np.float32), (index.shape[0], 1))
    return PreferenceBatch(
        **tokens,
        ref_chosen_logps=take(ref[0]) if ref is not None else zeros,
        ref_rejected_logps=take(ref[1]) if ref is not None else zeros,
        **extra,
    )
