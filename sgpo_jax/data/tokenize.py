"""Tokenization of normalized preference rows, with truncation and bad-row handling.

Per row (``P``, ``C``, ``R`` the prompt, chosen and rejected token counts):

* the prompt is rendered by the tokenizer's chat template with ``add_generation_prompt=True``
  and tokenized without adding special tokens (the template places them); a tokenizer without a
  chat template gets :func:`plain_prompt` tokenized with its special tokens (e.g. BOS);
* each response is tokenized without special tokens and the EOS id appended;
* the prompt keeps its last ``max_prompt_length`` tokens (left truncation), then each response
  keeps its first ``max_length - P`` tokens, so ``P + C <= max_length`` and ``P + R <= max_length``.
  A row whose prompt leaves no room for a response is bad (:data:`~sgpo_jax.data.loading.TRUNCATED`).

Bad rows (flagged by :func:`~sgpo_jax.data.loading.normalize_preferences` or found here) raise a
``ValueError`` naming the source, row, field and problem (``on_bad_row="error"``), or are dropped
and counted in a :class:`BadRowReport` (``on_bad_row="skip"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
from tqdm.auto import tqdm

from sgpo_jax.data.loading import NORMALIZED_FEATURES, TRUNCATED

__all__ = ["BadRow", "BadRowReport", "ON_BAD_ROW", "TokenizedPairs", "encode_prompts", "left_pad", "plain_prompt",
           "tokenize_preferences", "tokenize_prompts"]

ON_BAD_ROW = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class BadRow:
    """One unusable row: its index in the source split, the offending field and the problem
    (one of :data:`~sgpo_jax.data.loading.ROW_PROBLEMS`)."""

    row: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}, field {self.field!r}: {self.reason}"


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
    """``N`` tokenized pairs, truncated.

    Attributes:
      prompt_ids: ``N`` int32 arrays ``[P_i]``.
      chosen_ids, rejected_ids: ``N`` int32 arrays ``[C_i]``, ``[R_i]``: response tokens, EOS
        last unless truncated; ``P_i + C_i <= max_length``, ``P_i + R_i <= max_length``.
      rows: int64 ``[N]``, each pair's row index in the source split.
      max_length, max_prompt_length: the truncation settings.
      pad_id: the tokenizer's pad id (its EOS id if it has none).
    """

    prompt_ids: List[np.ndarray]
    chosen_ids: List[np.ndarray]
    rejected_ids: List[np.ndarray]
    rows: np.ndarray
    max_length: int
    max_prompt_length: int
    pad_id: int

    def __post_init__(self):
        n = len(self.rows)
        if not len(self.prompt_ids) == len(self.chosen_ids) == len(self.rejected_ids) == n:
            raise ValueError("prompt_ids, chosen_ids, rejected_ids and rows must have the same length")

    def __len__(self) -> int:
        return len(self.rows)

    def pair_lengths(self) -> np.ndarray:
        """int64 ``[N]``: ``P_i + max(C_i, R_i)``, the padded length a pair needs."""
        return np.array([len(p) + max(len(c), len(r))
                         for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)], np.int64)

    def fingerprint(self) -> str:
        """A stable hex digest of the token ids, source rows and truncation settings (not
        ``pad_id``, which changes no log-probability): equal for equal data on any machine."""
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

    Returns ``(pairs, report)``, the pairs in row order.

    Raises ``ValueError`` on a bad row (``"error"``), when no row is usable, or on bad arguments.
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
                    bad = BadRow(row, batch["bad_field"][i], batch["bad_reason"][i])
                if bad is None:
                    prompts.append(p)
                    chosen.append(c)
                    rejected.append(r)
                    rows.append(row)
                elif on_bad_row == "error":
                    raise ValueError(f"{source_name}: bad {bad}. Fix the data, or pass on_bad_row='skip' to drop "
                                     "such rows (they are counted and reported)")
                else:
                    report.add(bad)
            bar.update(len(batch["row"]))
    if not rows:
        raise ValueError(f"no usable rows in {report}")
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
    :func:`sgpo_jax.sampling.generate` (:func:`left_pad` with the tokenizer's pad id).

    Args:
      tokenizer, prompts, max_prompt_length: as in :func:`tokenize_prompts`.
      pad_to: the padded length ``P`` (a bucket, so that batches share one compiled shape);
        default the longest prompt of the batch.

    Returns ``(ids, mask)``, int32 ``[B, P]`` each; ``P`` is ``pad_to``, or the longest prompt's
    length (at most ``max_prompt_length``).
    """
    ids, pad_id = tokenize_prompts(tokenizer, prompts, max_prompt_length=max_prompt_length)
    return left_pad(ids, pad_id, length=pad_to)
