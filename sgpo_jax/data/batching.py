"""Padded, bucketed, shuffled and host-sharded batches of tokenized pairs.

A global batch holds ``batch_size`` pairs; with ``process_count`` hosts, host ``p`` gets its
rows ``[p * b, (p + 1) * b)``, ``b = batch_size // process_count``, so the hosts' batches,
concatenated in host order, are the global batch. Each row is a pair's prompt followed by its
response, right-padded with the pad id to the batch's length ``T``: the smallest bucket that
holds the longest pair of the *global* batch (chosen and rejected alike), so every host pads to
the same shape and at most ``len(buckets)`` shapes ever reach the compiled step.

The pair order of an epoch is a permutation seeded by ``(seed, epoch)``; batch ``(epoch, step)``
depends on nothing else, so resuming at a step yields the batches an uninterrupted run would. The
last batch of an epoch is filled up with padding rows (weight 0, index -1); no pair is dropped.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np

from sgpo_jax.data.tokenize import TokenizedPairs

__all__ = ["PairBatcher", "default_buckets", "ordered_batches"]


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
    * ``index``: int32 ``[b]``, the pair's position in ``pairs`` (-1 for padding rows), to look
      up cached reference log-probs (mask them with ``weight``).

    Args:
      pairs: the tokenized pairs.
      batch_size: pairs per global batch, divisible by ``process_count``.
      buckets: allowed lengths ``T``; default :func:`default_buckets` of ``pairs.max_length``.
        The largest must hold the longest pair.
      shuffle: permute the pairs every epoch (else keep their order).
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
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of process_count "
                             f"({process_count})")
        if not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
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
        self.shuffle = shuffle
        self.seed = seed
        self.process_index = process_index
        self._order: Optional[Tuple[int, np.ndarray]] = None  # (epoch, its order), the last one asked

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, the last one padded: ``ceil(len(pairs) / batch_size)``."""
        return -(-len(self.pairs) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """int64 ``[N]``: the pairs in ``epoch``'s order."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.pairs)
            order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, epoch: int, step: int) -> Dict[str, np.ndarray]:
        """This host's part of global batch ``step`` (``0 <= step < steps_per_epoch``) of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} out of range [0, {self.steps_per_epoch})")
        indices = np.full(self.batch_size, -1, np.int64)
        chunk = self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        indices[:len(chunk)] = chunk
        length = self.buckets[int(np.searchsorted(self.buckets, self._lengths[chunk].max()))]
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
    """Every pair once, in order, in :class:`PairBatcher` batches of ``batch_size`` (the last
    one padded); for forward-only passes such as the reference log-probs."""
    return PairBatcher(pairs, batch_size, buckets=buckets, shuffle=False, process_index=process_index,
                       process_count=process_count).epoch(0)


def _assemble(pairs: TokenizedPairs, indices: np.ndarray, length: int) -> Dict[str, np.ndarray]:
    """The batch dict of ``indices`` (``[b]``, -1 for padding rows) padded to ``length``."""
    b = len(indices)
    batch = {}
    for side, responses in (("chosen", pairs.chosen_ids), ("rejected", pairs.rejected_ids)):
        ids = np.full((b, length), pairs.pad_id, np.int32)
        attention = np.zeros((b, length), np.int32)
        loss_mask = np.zeros((b, length), np.int32)
        for row, k in enumerate(indices):
            if k < 0:
                attention[row, 0] = 1
                continue
            prompt, response = pairs.prompt_ids[k], responses[k]
            p, n = len(prompt), len(prompt) + len(response)
            ids[row, :p] = prompt
            ids[row, p:n] = response
            attention[row, :n] = 1
            loss_mask[row, p:n] = 1
        batch.update({f"{side}_ids": ids, f"{side}_attention": attention, f"{side}_loss_mask": loss_mask})
    batch["weight"] = (indices >= 0).astype(np.float32)
    batch["index"] = indices.astype(np.int32)
    return batch
