"""Tokenization of normalized preference rows, with truncation and bad-row handling.

Per row (``P``, ``C``, ``R`` the prompt, chosen and rejected token counts):

* the prompt is rendered by the tokenizer's chat template with ``add_generation_prompt=True``
  and tokenized without adding special tokens (the template places them); a tokenizer without a
  chat template gets :func:`plain_prompt` tokenized with its special tokens (e.g. BOS);
* each response is tokenized without special tokens and the EOS id appended;
* the prompt keeps its last ``max_prompt_length`` tokens (left truncation), then each response
  keeps its first ``max_length - P`` tokens, so ``P + C <= max_length`` and ``P + R <= max_length``.
  A row whose prompt leaves no room for a response is bad (:data:`~sgpo_jax.data.loading.TRUNCATED`).

Bad rows (flagged by :func:`~sgpo_jax.data.loading.normalize_preferences` or found here, including
the lines of a local JSON file that do not parse) raise a :class:`~sgpo_jax.errors.DataError` (a
``ValueError``) naming the source, row (or line), field and problem (``on_bad_row="error"``), or
are dropped and counted in a :class:`BadRowReport` (``on_bad_row="skip"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
from tqdm.auto import tqdm

from sgpo_jax.data.loading import EXPECTED, NORMALIZED_FEATURES, TRUNCATED, split_reason
from sgpo_jax.errors import DataError

__all__ = ["BadRow", "BadRowReport", "ON_BAD_ROW", "TokenizedPairs", "encode_prompts", "left_pad", "plain_prompt",
           "tokenize_preferences", "tokenize_prompts"]

ON_BAD_ROW = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class BadRow:
    """One unusable row: its index in the source split, the offending field and the problem
    (one of :data:`~sgpo_jax.data.loading.ROW_PROBLEMS`). A line of a local file that is not a
    JSON object has ``field`` ``"line N"`` (``"line N of FILE"``, ``"item N"`` in a JSON array)
    and the parser's message in ``detail``."""

    row: int
    field: str
    reason: str
    detail: str = ""

    @classmethod
    def of(cls, row: int, field: str, bad_reason: str) -> "BadRow":
        """The bad row of a normalized row's ``bad_field`` and ``bad_reason``."""
        return cls(int(row), field, *split_reason(bad_reason))

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        if self.field.startswith(("line ", "item ")):
            return f"{self.field}: {self.reason}{detail}"
        return f"row {self.row}, field {self.field!r}: {self.reason}{detail}"


@dataclasses.dataclass
class BadRowReport:
    """What ``on_bad_row="skip"`` dropped from ``source``: ``counts`` per problem and the first
    ``max_examples`` bad rows in row order, out of ``total`` rows read."""

    source: str
    total: int
    counts: Dict[str, int] = dataclasses.field(default_factory=dict)
    examples: List[BadRow] = dataclasses.field(default_factory=list)
    max_examples: int = 5

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    @classmethod
    def merge(cls, reports: Sequence["BadRowReport"], source: Optional[str] = None) -> "BadRowReport":
        """One report of several (e.g. the data shards'): totals and counts summed, the first
        examples by row."""
        merged = cls(source=source or (reports[0].source if reports else "dataset"), total=0)
        for report in reports:
            merged.total += report.total
            for reason, n in report.counts.items():
                merged.counts[reason] = merged.counts.get(reason, 0) + n
        examples = sorted((bad for report in reports for bad in report.examples), key=lambda bad: bad.row)
        merged.examples = examples[:merged.max_examples]
        return merged

    def add(self, bad: BadRow) -> None:
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
        if len(self.examples) < self.max_examples:
            self.examples.append(bad)

    def __str__(self) -> str:
        if not self.counts:
            return f"{self.source}: all {self.total} rows usable"
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        examples = "\n".join(f"  {bad}" for bad in self.examples)
        return f"{self.source}: skipped {self.skipped} of {self.total} rows ({counts}); first:\n{examples}"


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """``N`` tokenized pairs, truncated; possibly split into ``S`` data shards of which this host
    holds the token ids of some (multi-host runs: each host tokenizes only the shards it feeds,
    see :meth:`from_shards`).

    The pairs' global order is shard-major (shard 0's pairs in row order, then shard 1's, ...);
    with one shard (the default) it is row order and every pair is held.

    Attributes:
      prompt_ids: the held pairs' int32 arrays ``[P_i]`` (all ``N`` with one shard).
      chosen_ids, rejected_ids: the held pairs' int32 arrays ``[C_i]``, ``[R_i]``: response
        tokens, EOS last unless truncated; ``P_i + C_i <= max_length``, ``P_i + R_i <= max_length``.
      rows: int64 ``[N]``, every pair's row index in the source split (global order).
      max_length, max_prompt_length: the truncation settings.
      pad_id: the tokenizer's pad id (its EOS id if it has none).
      shard_sizes: pairs per shard, ``S`` ints summing to ``N``; ``()`` is one shard of all pairs.
      held: ``(first, last)``: the token ids here are those of shards ``[first, last)``;
        ``None`` is every shard.
      lengths: int64 ``[N]``, every pair's :meth:`pair_lengths` (required unless all are held).
      shard_digests: every shard's :meth:`fingerprint` as a one-shard ``TokenizedPairs``
        (required with several shards).
    """

    prompt_ids: List[np.ndarray]
    chosen_ids: List[np.ndarray]
    rejected_ids: List[np.ndarray]
    rows: np.ndarray
    max_length: int
    max_prompt_length: int
    pad_id: int
    shard_sizes: Tuple[int, ...] = ()
    held: Optional[Tuple[int, int]] = None
    lengths: Optional[np.ndarray] = None
    shard_digests: Tuple[str, ...] = ()

    def __post_init__(self):
        n = len(self.rows)
        if self.shard_sizes and sum(self.shard_sizes) != n:
            raise ValueError(f"shard_sizes {self.shard_sizes} must sum to the number of pairs ({n})")
        first, last = self.held_shards
        if not 0 <= first <= last <= self.num_shards:
            raise ValueError(f"held shards {self.held} out of range [0, {self.num_shards}]")
        begin, end = self.held_pairs
        if not len(self.prompt_ids) == len(self.chosen_ids) == len(self.rejected_ids) == end - begin:
            raise ValueError(f"prompt_ids, chosen_ids and rejected_ids must hold the {end - begin} pairs of shards "
                             f"[{first}, {last}) (rows holds all {n})")
        if self.lengths is None and (first, last) != (0, self.num_shards):
            raise ValueError("lengths (of every pair) is required when not every shard is held")
        if self.num_shards > 1 and len(self.shard_digests) != self.num_shards:
            raise ValueError(f"shard_digests must hold one digest per shard ({self.num_shards})")

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_shards(self) -> int:
        """``S``, the number of data shards."""
        return len(self.shard_sizes) or 1

    @property
    def held_shards(self) -> Tuple[int, int]:
        """``(first, last)``: the shards ``[first, last)`` whose token ids are here."""
        return self.held if self.held is not None else (0, self.num_shards)

    def shard_offsets(self) -> np.ndarray:
        """int64 ``[S + 1]``: shard ``s`` holds global pairs ``[offsets[s], offsets[s + 1])``."""
        return np.concatenate([[0], np.cumsum(self.shard_sizes or (len(self),))]).astype(np.int64)

    @property
    def held_pairs(self) -> Tuple[int, int]:
        """``(begin, end)``: the global pairs ``[begin, end)`` whose token ids are here."""
        offsets = self.shard_offsets()
        first, last = self.held_shards
        return int(offsets[first]), int(offsets[last])

    def token_ids(self, k: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(prompt, chosen, rejected)`` ids of global pair ``k``, which must be held here."""
        begin, end = self.held_pairs
        if not begin <= k < end:
            raise IndexError(f"pair {k} is not held here (this host holds pairs [{begin}, {end}))")
        return self.prompt_ids[k - begin], self.chosen_ids[k - begin], self.rejected_ids[k - begin]

    def pair_lengths(self) -> np.ndarray:
        """int64 ``[N]``: ``P_i + max(C_i, R_i)``, the padded length a pair needs (every pair,
        held or not)."""
        if self.lengths is not None:
            return np.asarray(self.lengths, np.int64)
        return np.array([len(p) + max(len(c), len(r))
                         for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)], np.int64)

    def fingerprint(self) -> str:
        """A stable hex digest of the token ids, source rows, truncation settings and shard
        layout (not ``pad_id``, which changes no log-probability): equal for equal data on any
        machine and any number of hosts. With several shards it hashes the shards' digests."""
        if self.num_shards > 1:
            digest = hashlib.blake2b(digest_size=16)
            header = {"format": "sgpo_jax.TokenizedPairs/shards", "shard_sizes": list(self.shard_sizes)}
            digest.update(json.dumps(header, sort_keys=True).encode())
            for shard in self.shard_digests:
                digest.update(shard.encode())
            return digest.hexdigest()
        digest = hashlib.blake2b(digest_size=16)
        header = {"format": "sgpo_jax.TokenizedPairs/1", "max_length": self.max_length,
                  "max_prompt_length": self.max_prompt_length, "pairs": len(self)}
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(np.asarray(self.rows, "<i8").tobytes())
        for arrays in (self.prompt_ids, self.chosen_ids, self.rejected_ids):
            digest.update(np.array([len(a) for a in arrays], "<i8").tobytes())
            for a in arrays:
                digest.update(np.asarray(a, "<i4").tobytes())
        return digest.hexdigest()

    def head(self, n: int) -> "TokenizedPairs":
        """The first ``n`` pairs (one shard, all held)."""
        if self.num_shards > 1:
            raise ValueError("head() of sharded pairs: pass limit to from_shards instead")
        return dataclasses.replace(self, prompt_ids=self.prompt_ids[:n], chosen_ids=self.chosen_ids[:n],
                                   rejected_ids=self.rejected_ids[:n], rows=self.rows[:n])

    @classmethod
    def from_shards(cls, parts: Dict[int, "TokenizedPairs"], num_shards: int,
                    allgather: Callable[[Any], List[Any]], *, limit: int = 0) -> "TokenizedPairs":
        """Pairs split into ``num_shards`` shards from each host's tokenized shards; a collective.

        Args:
          parts: ``{shard: its pairs}`` for the consecutive shards this host tokenized (each a
            one-shard ``TokenizedPairs``, e.g. :func:`tokenize_preferences` of
            ``load_preferences(..., shard=(shard, num_shards))``; may be empty).
          num_shards: ``S``; together the hosts must have tokenized every shard.
          allgather: ``obj -> [every process's obj]`` (e.g.
            :func:`sgpo_jax.parallel.distributed.allgather_objects`; ``lambda x: [x]`` in one process).
          limit: keep only the first ``limit`` pairs in source-row order (0: all), so the kept
            pairs do not depend on ``S``.

        Two all-gathers of per-pair metadata (rows, then lengths and the shards' digests); the
        token ids stay where they were tokenized. With ``S = 1`` the result is the shard itself
        (cut to ``limit``).

        Raises ``ValueError`` if a shard is missing on every host, or no pair is left.
        """
        if num_shards == 1:
            return parts[0].head(limit) if limit else parts[0]
        held = sorted(parts)
        if held and held != list(range(held[0], held[-1] + 1)):
            raise ValueError(f"each host must tokenize consecutive shards, got {held}")
        rows_by_shard: Dict[int, np.ndarray] = {}
        for host in allgather({s: np.asarray(p.rows, np.int64) for s, p in parts.items()}):
            rows_by_shard.update(host)
        missing = sorted(set(range(num_shards)) - set(rows_by_shard))
        if missing:
            raise ValueError(f"no host tokenized data shards {missing} of {num_shards}")
        if limit:
            every = np.sort(np.concatenate([rows_by_shard[s] for s in range(num_shards)]))
            if limit < every.size:
                cutoff = every[limit - 1]  # rows are distinct: exactly `limit` rows are <= cutoff
                parts = {s: p.head(int(np.sum(p.rows <= cutoff))) for s, p in parts.items()}
                rows_by_shard = {s: r[r <= cutoff] for s, r in rows_by_shard.items()}
        info: Dict[int, Tuple[str, np.ndarray]] = {}
        for host in allgather({s: (p.fingerprint(), p.pair_lengths()) for s, p in parts.items()}):
            info.update(host)
        sizes = tuple(int(rows_by_shard[s].size) for s in range(num_shards))
        if not sum(sizes):
            raise ValueError("no usable pairs in any data shard")
        some = next(iter(parts.values())) if parts else None
        if some is None:
            raise ValueError("every host must tokenize at least one data shard")
        pick = lambda field: [x for s in held for x in getattr(parts[s], field)]
        return cls(prompt_ids=pick("prompt_ids"), chosen_ids=pick("chosen_ids"), rejected_ids=pick("rejected_ids"),
                   rows=np.concatenate([rows_by_shard[s] for s in range(num_shards)]).astype(np.int64),
                   max_length=some.max_length, max_prompt_length=some.max_prompt_length, pad_id=some.pad_id,
                   shard_sizes=sizes, held=(held[0], held[-1] + 1),
                   lengths=np.concatenate([info[s][1] for s in range(num_shards)]).astype(np.int64),
                   shard_digests=tuple(info[s][0] for s in range(num_shards)))


def plain_prompt(messages: Sequence[Dict[str, str]]) -> str:
    """The prompt text for tokenizers without a chat template: a lone user message verbatim
    (TRL's standard format), otherwise ``"role: content"`` paragraphs ending in ``"assistant: "``."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant: "


def _prompt_token_ids(tokenizer: Any, conversations: Sequence[Sequence[Dict[str, str]]]) -> List[List[int]]:
    """Each conversation's prompt tokens: the chat template with ``add_generation_prompt=True``
    (its own special tokens, none added), or :func:`plain_prompt` with the tokenizer's specials."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer([plain_prompt(m) for m in conversations])["input_ids"]
    texts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False) for m in conversations]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenize_preferences(
    dataset: datasets.Dataset,
    tokenizer: Any,
    *,
    max_length: int,
    max_prompt_length: int,
    on_bad_row: str = "error",
    source_name: str = "dataset",
    chunk_size: int = 1000,
    allow_empty: bool = False,
) -> Tuple[TokenizedPairs, BadRowReport]:
    """Tokenizes and truncates normalized rows (see the module docstring).

    Args:
      dataset: the output of :func:`~sgpo_jax.data.loading.load_preferences` (or
        :func:`~sgpo_jax.data.loading.normalize_preferences`).
      tokenizer: a ``transformers`` tokenizer with an EOS token.
      max_length: the most tokens of prompt plus one response.
      max_prompt_length: the most prompt tokens, ``1 <= max_prompt_length <= max_length``.
      on_bad_row: ``"error"`` raises on the first bad row; ``"skip"`` drops and reports them.
      source_name: the file or dataset name used in messages.
      chunk_size: rows tokenized per call of the tokenizer.
      allow_empty: return no pairs instead of raising when no row is usable (one data shard of
        several may be empty).

    Returns ``(pairs, report)``, the pairs in row order.

    Raises ``DataError`` (a ``ValueError``) on a bad row (``"error"``) or when no row is usable
    (unless ``allow_empty``); ``ValueError`` on bad arguments.
    """
    if not 1 <= max_prompt_length <= max_length:
        raise ValueError(f"need 1 <= max_prompt_length <= max_length, got {max_prompt_length} and {max_length}")
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")
    missing = sorted(set(NORMALIZED_FEATURES) - set(dataset.column_names))
    if missing:
        raise ValueError(f"{source_name}: columns {missing} missing; normalize the dataset with load_preferences")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")

    report = BadRowReport(source=source_name, total=len(dataset))
    prompts, chosen, rejected, rows = [], [], [], []
    with tqdm(total=len(dataset), desc=f"tokenizing {source_name}", unit="row") as bar:
        for batch in dataset.iter(batch_size=chunk_size):
            good = [i for i, field in enumerate(batch["bad_field"]) if field is None]
            tokens = {}
            if good:
                ids = (
                    _prompt_token_ids(tokenizer, [batch["prompt"][i] for i in good]),
                    tokenizer([batch["chosen"][i] for i in good], add_special_tokens=False)["input_ids"],
                    tokenizer([batch["rejected"][i] for i in good], add_special_tokens=False)["input_ids"],
                )
                tokens = dict(zip(good, zip(*ids)))
            for i, row in enumerate(batch["row"]):
                if i in tokens:
                    p, c, r = _truncate(*tokens[i], eos=eos, max_length=max_length,
                                        max_prompt_length=max_prompt_length)
                    bad = BadRow(row, "chosen", TRUNCATED) if c.size == 0 else None
                else:
                    bad = BadRow.of(row, batch["bad_field"][i], batch["bad_reason"][i])
                if bad is None:
                    prompts.append(p)
                    chosen.append(c)
                    rejected.append(r)
                    rows.append(row)
                elif on_bad_row == "error":
                    raise DataError(f"{source_name}: bad {bad}. Fix the data, or pass on_bad_row='skip' to drop "
                                    "such rows (they are counted and reported)",
                                    "or set --config.data.on_bad_row=skip to drop such rows")
                else:
                    report.add(bad)
            bar.update(len(batch["row"]))
    if not rows and not allow_empty:
        if not report.total:
            raise DataError(f"no rows in {source_name}; {EXPECTED}")
        raise DataError(f"no usable rows in {report}\n{EXPECTED[0].upper()}{EXPECTED[1:]}")
    pad = tokenizer.pad_token_id
    pairs = TokenizedPairs(prompt_ids=prompts, chosen_ids=chosen, rejected_ids=rejected,
                           rows=np.asarray(rows, np.int64), max_length=max_length,
                           max_prompt_length=max_prompt_length, pad_id=int(eos if pad is None else pad))
    return pairs, report


def _truncate(prompt: List[int], chosen: List[int], rejected: List[int], *, eos: int, max_length: int,
              max_prompt_length: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-truncated prompt, then responses (EOS appended) cut to the room left."""
    prompt = prompt[-max_prompt_length:]
    room = max_length - len(prompt)
    as_array = lambda ids: np.asarray(ids, np.int32)
    return as_array(prompt), as_array((chosen + [eos])[:room]), as_array((rejected + [eos])[:room])


# ----------------------------------------------------------------------------------------------
# Prompts alone (generation: self-annotation, evaluation)
# ----------------------------------------------------------------------------------------------

Prompt = Union[str, Sequence[Dict[str, str]]]
"""A prompt: a string (one user message) or a list of ``{"role", "content"}`` messages."""


def tokenize_prompts(tokenizer: Any, prompts: Sequence[Prompt], *, max_prompt_length: int,
                     source_name: str = "prompts") -> Tuple[List[np.ndarray], int]:
    """Each prompt's token ids exactly as :func:`tokenize_preferences` builds the prompt of a pair
    (the same chat-template code path and left truncation to ``max_prompt_length``): a response
    generated for these ids is scored and trained on after the same prompt tokens.

    Args:
      tokenizer: a ``transformers`` tokenizer with an EOS token.
      prompts: ``N`` prompts, strings (one user message each) or lists of ``{"role", "content"}``
        messages (e.g. a multi-turn conversation ending in a user message).
      max_prompt_length: keep each prompt's last ``max_prompt_length >= 1`` tokens.
      source_name: the name used in the progress bar and in messages.

    Returns ``(ids, pad_id)``: ``N`` int32 arrays ``[P_i]`` with ``1 <= P_i <= max_prompt_length``,
    and the tokenizer's pad id (its EOS id if it has none).

    Raises ``ValueError`` naming the indices of empty (whitespace-only) prompts, or on bad arguments.
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of prompts, not one string")
    if not isinstance(max_prompt_length, (int, np.integer)) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be a positive int, got {max_prompt_length!r}")
    messages = [[{"role": "user", "content": p}] if isinstance(p, str)
                else [{"role": m["role"], "content": m["content"]} for m in p] for p in prompts]
    empty = [i for i, m in enumerate(messages) if not any(isinstance(x["content"], str) and x["content"].strip()
                                                          for x in m)]
    if empty:
        raise ValueError(f"{source_name}: {len(empty)} empty prompts (no non-whitespace text), indices {empty[:10]}"
                         f"{' ...' if len(empty) > 10 else ''}")
    pad = tokenizer.pad_token_id
    pad = tokenizer.eos_token_id if pad is None else pad
    ids = _prompt_token_ids(tokenizer, messages) if messages else []
    return [np.asarray(x[-int(max_prompt_length):], np.int32) for x in ids], int(pad if pad is not None else 0)


def left_pad(sequences: Sequence[np.ndarray], pad_id: int, *, length: Optional[int] = None
             ) -> Tuple[np.ndarray, np.ndarray]:
    """``N`` token sequences left-padded to one length, for generation.

    Args:
      sequences: ``N >= 1`` int sequences ``[P_i]``, each with ``P_i >= 1``.
      pad_id: id written at padding positions (must be a valid id for the model).
      length: the padded length ``P``; default the longest ``P_i``. Must be ``>= max P_i``.

    Returns ``(ids, mask)``, int32 ``[N, P]`` each; ``mask`` is 1 on the real tokens (the last
    ``P_i`` positions of row ``i``).
    """
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"need at least one sequence and no empty sequence, got lengths {lengths[:10]}")
    longest = max(lengths)
    length = longest if length is None else int(length)
    if length < longest:
        raise ValueError(f"length {length} is shorter than the longest sequence ({longest} tokens)")
    ids = np.full((len(lengths), length), pad_id, np.int32)
    mask = np.zeros((len(lengths), length), np.int32)
    for row, (seq, n) in enumerate(zip(sequences, lengths)):
        ids[row, length - n:] = np.asarray(seq, np.int32)
        mask[row, length - n:] = 1
    return ids, mask


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], *, max_prompt_length: int,
                   pad_to: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Prompts tokenized as for training (:func:`tokenize_prompts`) and left-padded for
    :func:`sgpo_jax.ssapo.sampling.generate` (:func:`left_pad` with the tokenizer's pad id).

    Args:
      tokenizer, prompts, max_prompt_length: as in :func:`tokenize_prompts`.
      pad_to: the padded length ``P`` (a bucket, so that batches share one compiled shape);
        default the longest prompt of the batch.

    Returns ``(ids, mask)``, int32 ``[B, P]`` each; ``P`` is ``pad_to``, or the longest prompt's
    length (at most ``max_prompt_length``).
    """
    ids, pad_id = tokenize_prompts(tokenizer, prompts, max_prompt_length=max_prompt_length)
    return left_pad(ids, pad_id, length=pad_to)
