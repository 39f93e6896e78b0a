"""Preference data: loading and normalization, tokenization with truncation, padded batches.

::

    dataset = load_preferences("prefs.jsonl")                       # or a Hub name
    pairs, report = tokenize_preferences(dataset, tokenizer, max_length=1024, max_prompt_length=512,
                                         on_bad_row="skip", source_name="prefs.jsonl")
    print(report)                                                   # what was skipped and why
    for batch in ordered_batches(pairs, 64): ...                    # reference pass, cache by batch["index"]
    batcher = PairBatcher(pairs, 64, seed=0, process_index=jax.process_index(),
                          process_count=jax.process_count())
    for batch in batcher.epoch(epoch, start_step=step): ...         # training, resumable

``pairs.fingerprint()`` keys caches of per-pair results (e.g. reference log-probs).

Layouts: TRL's standard and conversational preference rows, with an explicit prompt (also one
repeated as the first turns of ``chosen``/``rejected``, as in UltraFeedback) or an implicit one
(``chosen``/``rejected`` conversations sharing their leading messages), detected per source and
reported on the console. Data that cannot be used raises :class:`sgpo_jax.errors.DataError`
naming the file, line or row, and what was expected.

Multi-host: with ``S`` data shards each host loads and tokenizes only the shards it feeds
(``held_shards(process_index, process_count, S)``, each ``load_preferences(..., shard=(s, S))``)
and ``TokenizedPairs.from_shards`` joins them, exchanging only per-pair lengths and source rows;
:func:`sgpo_jax.train.load_pairs` does all of it.
"""

from sgpo_jax.data.batching import PairBatcher, default_buckets, held_shards, ordered_batches
from sgpo_jax.data.loading import NORMALIZED_FEATURES, ROW_PROBLEMS, load_preferences, normalize_preferences
from sgpo_jax.data.split import farthest_point_sampling, flip_labels, last_token_hidden, split_prompts
from sgpo_jax.data.tokenize import (
    BadRow,
    BadRowReport,
    TokenizedPairs,
    encode_prompts,
    left_pad,
    plain_prompt,
    tokenize_preferences,
    tokenize_prompts,
)

__all__ = [
    "BadRow",
    "BadRowReport",
    "NORMALIZED_FEATURES",
    "PairBatcher",
    "ROW_PROBLEMS",
    "TokenizedPairs",
    "default_buckets",
    "encode_prompts",
    "farthest_point_sampling",
    "flip_labels",
    "held_shards",
    "last_token_hidden",
    "left_pad",
    "load_preferences",
    "normalize_preferences",
    "ordered_batches",
    "plain_prompt",
    "split_prompts",
    "tokenize_preferences",
    "tokenize_prompts",
]
