"""The training pairs of a run: ``data.*`` settings -> tokenized pairs, sharded over hosts."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
from ml_collections import ConfigDict

from sgpo_jax.console import say
from sgpo_jax.data.batching import held_shards
from sgpo_jax.data.loading import SCORE_COLUMNS, column_values, load_preferences, load_split, reward_columns
from sgpo_jax.data.tokenize import BadRowReport, TokenizedPairs, tokenize_preferences
from sgpo_jax.parallel import distributed

__all__ = ["data_shards", "load_pairs"]


def data_shards(data_config: ConfigDict) -> int:
    """The number of data shards: ``data.shards``, or one per process when it is 0."""
    return int(data_config.shards) or jax.process_count()


def load_pairs(data_config: ConfigDict, tokenizer, source: Optional[str] = None) -> Tuple[TokenizedPairs, np.ndarray]:
    """Loads, normalizes and tokenizes ``source`` (default ``data.source``; comma-separated files
    are concatenated) with the ``data`` settings, keeping the first ``data.limit`` usable pairs.

    Each process loads and tokenizes only the data shards it feeds (:func:`data_shards` shards,
    rows ``s, s + S, ...`` in shard ``s``; :func:`sgpo_jax.data.held_shards`), then the processes
    exchange the pairs' lengths and source rows (:meth:`TokenizedPairs.from_shards`); a failure
    on one process (a bad row, a missing file) stops all of them with its message.

    Returns ``(pairs, gaps)``: ``gaps [N]`` float64 is ``chosen_reward - rejected_reward`` of each
    pair's source row where the source has those columns (self-annotated data) or the score
    columns ``data.score_columns`` (default ``("score_chosen", "score_rejected")``), else NaN
    (see :func:`reward_gaps`).
    Skipped bad rows (``data.on_bad_row="skip"``) are reported on the console (by process 0).
    """
    d = data_config
    source = source or d.source
    parts = [part for part in source.split(",") if part]
    shards = data_shards(d)
    score_columns = tuple(d.get("score_columns", SCORE_COLUMNS))

    def tokenize_held() -> Dict[int, Tuple[TokenizedPairs, BadRowReport]]:
        out = {}
        for s in held_shards(jax.process_index(), jax.process_count(), shards):
            dataset = load_preferences(parts if len(parts) > 1 else source, split=d.split,
                                       prompt_column=d.prompt_column, chosen_column=d.chosen_column,
                                       rejected_column=d.rejected_column, shard=(s, shards) if shards > 1 else None,
                                       score_columns=score_columns)
            out[s] = tokenize_preferences(dataset, tokenizer, max_length=d.max_length,
                                          max_prompt_length=d.max_prompt_length, on_bad_row=d.on_bad_row,
                                          source_name=source, allow_empty=shards > 1)
        return out

    tokenized = distributed.fail_together(tokenize_held)
    reports: Dict[int, BadRowReport] = {}
    for host in distributed.allgather_objects({s: r for s, (_, r) in tokenized.items()}):
        reports.update(host)
    report = BadRowReport.merge([reports[s] for s in sorted(reports)], source)
    if report.skipped:
        say(report)
    pairs = TokenizedPairs.from_shards({s: p for s, (p, _) in tokenized.items()}, shards,
                                       distributed.allgather_objects, limit=d.limit)
    return pairs, reward_gaps(parts, d.split, pairs.rows, score_columns)


def reward_gaps(parts: Sequence[str], split: str, rows: np.ndarray,
                score_columns: Sequence[str] = SCORE_COLUMNS) -> np.ndarray:
    """``chosen - rejected`` reward ``[len(rows)]`` of the given rows of the split of ``parts``
    (one source, or files concatenated as :func:`load_pairs` reads them): from the columns
    ``chosen_reward``/``rejected_reward`` (self-annotated pairs), else ``score_columns`` (e.g.
    ``score_chosen``/``score_rejected`` of ``HuggingFaceH4/ultrafeedback_binarized``); NaN where
    the source has neither pair of columns or a row's value is not a number."""
    gaps = np.full(len(rows), np.nan)
    raw = load_split(list(parts) if len(parts) > 1 else parts[0], split=split)
    columns = reward_columns(raw.column_names, score_columns)
    if columns is not None and len(rows):
        chosen, rejected = (np.array([_number(v) for v in column_values(raw, c)], np.float64) for c in columns)
        rows = np.asarray(rows, np.int64)
        gaps = chosen[rows] - rejected[rows]
    return gaps


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else np.nan
