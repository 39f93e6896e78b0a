r"""The layout of preference pairs packed into rows (scored by :func:`sgpo_jax.models.logps.packed_pair_logps`).

Unpacked, a batch of ``B`` pairs is ``2B`` rows (chosen rows, rejected rows), each
``[prompt, response, padding]``: every prompt runs twice and every row is padded to the batch's
bucket. :class:`PackedPairs` instead lays the pairs out as *sequences* in ``R`` rows of ``T``
slots (built on the host by :func:`sgpo_jax.data.packing.pack_batch`):

* prefix sharing (one sequence per pair): ``[prompt, chosen, rejected]``; the rejected RoPE
  positions restart at the prompt's end, and :func:`sgpo_jax.models.llama.segment_mask` lets
  chosen and rejected each attend the prompt and themselves, not each other (branch ids 0 for
  the prompt, 1 chosen, 2 rejected). The prompt's work is done once.
* without sharing (two sequences per pair): ``[prompt, chosen]`` and ``[prompt, rejected]``.
* packing: several sequences per row (segment ids ``1, 2, ...``, 0 = padding), positions
  restarting per sequence, no attention across sequences; rows are filled to a token budget.

Every hidden state is then the one the unpacked row would give at the same token (same visible
keys, same positions), so the log-probs are those of the unpacked batch up to float rounding.

A response is scored along its *chain* ``c_0, c_1, ..., c_L``: flat slot indices into the
``R * T`` slots, ``c_0`` the prompt's last token and ``c_1..`` the response's tokens, so that
:math:`\log p(y) = \sum_{l \ge 1} m_l \log \mathrm{softmax}(h_{c_{l-1}} W)_{x_{c_l}}` — the shift
by one of :func:`sgpo_jax.models.logps.chunked_sequence_logps` applied to the gathered chain (the
prompt's last hidden state predicts the first token of both responses, though rejected does not
follow it in the row).
"""

from __future__ import annotations

from typing import Optional

import jax
from flax import struct

Array = jax.Array

__all__ = ["PackedPairs"]


@struct.dataclass
class PackedPairs:
    """``B`` pairs laid out in ``R`` rows of ``T`` slots (module docstring). All int32.

    Attributes:
      ids: ``[R, T]`` token ids (the pad id at padding).
      positions: ``[R, T]`` RoPE positions, restarting at 0 per sequence (and for rejected, at
        the prompt's length when the prompt is shared).
      segment_ids: ``[R, T]`` the sequence of each slot within its row, ``1, 2, ...``; 0 = padding.
      branch_ids: ``[R, T]`` 0 on tokens every branch of the sequence sees (the prompt), 1
        chosen, 2 rejected, when the prompt is shared; ``None`` without sharing (every
        sequence one branch), which lets splash attention run on the segment ids.
      chosen_index, rejected_index: ``[B, L]`` each pair's chain of flat slots ``row * T + slot``
        (``c_0`` the prompt's last token, then the response's tokens; 0 past the end).
      chosen_mask, rejected_mask: ``[B, L]``, 1 at chain entries ``l >= 1`` that are response
        tokens to score; a padding pair (weight 0) has none.
      groups: static; ``m`` when the pairs were laid out in ``m`` groups of rows for ``m``
        micro-batches (:func:`sgpo_jax.data.packing.pack_batch` ``groups``): rows
        ``[g R, (g + 1) R)`` hold exactly pairs ``[g B / m, (g + 1) B / m)``.
    """

    ids: Array
    positions: Array
    segment_ids: Array
    branch_ids: Optional[Array]
    chosen_index: Array
    chosen_mask: Array
    rejected_index: Array
    rejected_mask: Array
    groups: int = struct.field(pytree_node=False, default=1)
