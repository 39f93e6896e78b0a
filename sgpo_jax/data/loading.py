"""Preference data from the Hugging Face Hub or local files, normalized to one row format.

Accepted row formats (TRL's preference formats; column names are configurable):

* standard: ``prompt``, ``chosen`` and ``rejected`` are strings;
* conversational: each is a list of ``{"role", "content"}`` messages. ``chosen``/``rejected`` hold
  either the assistant message alone or the whole conversation, prompt included (as in
  ``argilla/ultrafeedback-binarized-preferences-cleaned``, where ``chosen`` is ``[user message,
  assistant message]`` and ``prompt`` a string); mixing a string prompt with conversational
  responses (or the reverse) is fine.

Every row becomes (:data:`NORMALIZED_FEATURES`):

* ``row`` (int64): the row's index in the loaded split (several files count on in order; also
  when only a shard of the split is normalized, see ``shard``);
* ``prompt``: list of ``{"role", "content"}`` messages (a string prompt is one user message);
* ``chosen``, ``rejected``: the assistant responses as strings. A conversation's leading
  messages must equal the prompt's (compared whitespace-stripped) and are dropped; exactly one
  assistant message must remain;
* ``bad_field``, ``bad_reason``: ``None`` for a usable row, else the first offending field
  (``"prompt"``, ``"chosen"`` or ``"rejected"``) and one of :data:`ROW_PROBLEMS`: a missing
  value or message content, an empty prompt or response (whitespace only), a non-string value
  or content (e.g. multimodal content parts), a malformed message list, a conversation that does
  not start with the prompt or does not end in one assistant message, or ``rejected`` equal to
  ``chosen`` (whitespace-stripped). Bad rows are kept and flagged here;
  :func:`sgpo_jax.data.tokenize.tokenize_preferences` raises on them or skips and reports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import datasets

__all__ = [
    "BAD_CONVERSATION", "EMPTY", "IDENTICAL", "MISSING", "NORMALIZED_FEATURES", "NOT_ONE_ASSISTANT", "NOT_TEXT",
    "NO_PROMPT_PREFIX", "ROW_PROBLEMS", "TRUNCATED", "load_preferences", "normalize_preferences",
]

MISSING = "missing"
EMPTY = "empty"
NOT_TEXT = "not text"
BAD_CONVERSATION = "not a list of {role, content} messages"
NO_PROMPT_PREFIX = "conversation does not start with the prompt"
NOT_ONE_ASSISTANT = "not exactly one assistant message after the prompt"
IDENTICAL = "identical to chosen"
TRUNCATED = "nothing left after truncation"  # found by tokenization, not here
ROW_PROBLEMS = (MISSING, EMPTY, NOT_TEXT, BAD_CONVERSATION, NO_PROMPT_PREFIX, NOT_ONE_ASSISTANT, IDENTICAL, TRUNCATED)

NORMALIZED_FEATURES = datasets.Features({
    "row": datasets.Value("int64"),
    "prompt": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
    "chosen": datasets.Value("string"),
    "rejected": datasets.Value("string"),
    "bad_field": datasets.Value("string"),
    "bad_reason": datasets.Value("string"),
})

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

Message = Dict[str, str]


def load_preferences(
    source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    split: str = "train",
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    data_files: Optional[Union[str, Sequence[str], Dict[str, Any]]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    shard: Optional[Tuple[int, int]] = None,
) -> datasets.Dataset:
    """Loads a preference split and normalizes its rows (see the module docstring).

    Args:
      source: a local ``.json``/``.jsonl``/``.parquet`` file or a list of files of one format
        (concatenated in order: ``row`` counts across them), a local directory (format inferred
        by ``datasets``), a builder name (``"json"``, ``"parquet"``) with ``data_files``, or a
        Hub dataset name.
      split: the split to load (local files hold one split, ``"train"``; slices such as
        ``"train[:1000]"`` work).
      prompt_column, chosen_column, rejected_column: the source columns to read.
      data_files: passed to ``datasets.load_dataset`` for directories, builders and Hub datasets.
      cache_dir: ``datasets`` cache directory (default: ``datasets``' own).
      shard: ``(index, count)``: normalize only rows ``index, index + count, index + 2 count, ...``
        (``row`` keeps their index in the split), e.g. one host's share of a multi-host run. The
        split itself is read as ``datasets`` reads it (memory-mapped Arrow, cached on disk);
        only the shard's rows are converted.

    Returns a ``datasets.Dataset`` with exactly the columns of :data:`NORMALIZED_FEATURES`.

    Raises:
      FileNotFoundError: ``source`` looks like a local path and does not exist.
      ValueError: unsupported or mixed file types, the Hub is unreachable (offline) or does not
        hold ``source``, or a column is missing.
    """
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    if not isinstance(source, (str, os.PathLike)):
        paths = [Path(os.fspath(s)).expanduser() for s in source]
        name = ", ".join(map(str, paths))
        dataset = _load_files(name, paths, split, cache_dir)
    else:
        name = os.fspath(source)
        path = Path(name).expanduser()
        if path.is_dir() or name in _BUILDERS.values():
            dataset = datasets.load_dataset(str(path) if path.is_dir() else name, data_files=data_files,
                                            split=split, cache_dir=cache_dir)
        elif path.is_file() or path.suffix.lower() in _BUILDERS or name.startswith(("/", ".", "~")):
            dataset = _load_files(name, [path], split, cache_dir)
        else:
            try:
                dataset = datasets.load_dataset(name, data_files=data_files, split=split, cache_dir=cache_dir)
            except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
                raise ValueError(
                    f"could not load dataset {name!r} from the Hugging Face Hub ({err}); without network access "
                    "pass a local .json, .jsonl or .parquet file (or a list or directory of them) instead"
                ) from err
    return normalize_preferences(dataset, prompt_column=prompt_column, chosen_column=chosen_column,
                                 rejected_column=rejected_column, source_name=name, shard=shard)


def _load_files(name: str, paths: List[Path], split: str, cache_dir: Optional[str]) -> datasets.Dataset:
    """Local data files of one format, concatenated in order."""
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if path.suffix.lower() not in _BUILDERS:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(_BUILDERS)}")
    builders = {_BUILDERS[path.suffix.lower()] for path in paths}
    if len(builders) != 1:
        raise ValueError(f"{name}: give one or more files of one format (JSON/JSONL or parquet)")
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in paths], split=split, cache_dir=cache_dir)


def normalize_preferences(
    dataset: datasets.Dataset,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    source_name: str = "dataset",
    shard: Optional[Tuple[int, int]] = None,
) -> datasets.Dataset:
    """Normalizes the rows of an already loaded ``dataset`` (see the module docstring); rows
    keep their order and ``row`` is their index in ``dataset``. Other columns are dropped.
    ``shard=(index, count)`` normalizes only rows ``index + count * i`` (as in
    :func:`load_preferences`).

    Raises ``ValueError`` naming ``source_name`` if a column is missing or ``shard`` is invalid.
    """
    columns = (prompt_column, chosen_column, rejected_column)
    for argument, column in zip(("prompt_column", "chosen_column", "rejected_column"), columns):
        if column not in dataset.column_names:
            raise ValueError(
                f"{source_name}: column {column!r} not found (columns: {dataset.column_names}); "
                f"set {argument} to the column that holds it"
            )
    index, count = (0, 1) if shard is None else (int(shard[0]), int(shard[1]))
    if not 0 <= index < count:
        raise ValueError(f"{source_name}: shard must be (index, count) with 0 <= index < count, got {shard}")
    if count > 1:
        dataset = dataset.shard(num_shards=count, index=index, contiguous=False)
    return dataset.map(
        _normalize_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"columns": columns, "first": index, "stride": count},
        remove_columns=dataset.column_names,
        features=NORMALIZED_FEATURES,
        desc=f"normalizing {source_name}" + (f" (shard {index} of {count})" if count > 1 else ""),
    )


def _normalize_batch(batch: Dict[str, list], indices: List[int], *, columns: Tuple[str, str, str], first: int,
                     stride: int) -> Dict[str, list]:
    out: Dict[str, list] = {name: [] for name in NORMALIZED_FEATURES}
    for index, values in zip(indices, zip(*(batch[column] for column in columns))):
        prompt, chosen, rejected, problem = _normalize_row(*values)
        out["row"].append(first + stride * index)
        out["prompt"].append(prompt)
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
        out["bad_field"].append(problem and problem[0])
        out["bad_reason"].append(problem and problem[1])
    return out


def _normalize_row(
    prompt: Any, chosen: Any, rejected: Any,
) -> Tuple[List[Message], Optional[str], Optional[str], Optional[Tuple[str, str]]]:
    """``(prompt messages, chosen, rejected, None)`` or ``([], None, None, (field, problem))``."""
    messages, problem = _prompt_messages(prompt)
    if problem:
        return [], None, None, ("prompt", problem)
    texts = []
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        text, problem = _response_text(value, messages)
        if problem:
            return [], None, None, (field, problem)
        texts.append(text)
    if texts[0].strip() == texts[1].strip():
        return [], None, None, ("rejected", IDENTICAL)
    return messages, texts[0], texts[1], None


def _conversation_problem(value: list) -> Optional[str]:
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            return BAD_CONVERSATION
        if message["content"] is None:
            return MISSING
        if not isinstance(message["content"], str):
            return NOT_TEXT
    return None


def _prompt_messages(value: Any) -> Tuple[List[Message], Optional[str]]:
    if value is None:
        return [], MISSING
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        problem = _conversation_problem(value)
        if problem:
            return [], problem
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        return [], NOT_TEXT
    if not any(m["content"].strip() for m in messages):
        return [], EMPTY
    return messages, None


def _same_messages(a: List[Message], b: List[Message]) -> bool:
    return len(a) == len(b) and all(
        x["role"] == y["role"] and x["content"].strip() == y["content"].strip() for x, y in zip(a, b)
    )


def _response_text(value: Any, prompt: List[Message]) -> Tuple[Optional[str], Optional[str]]:
    if value is None:
        return None, MISSING
    if isinstance(value, list):
        problem = _conversation_problem(value)
        if problem:
            return None, problem
        if len(value) >= len(prompt) and _same_messages(value[:len(prompt)], prompt):
            value = value[len(prompt):]
        elif any(m["role"] != "assistant" for m in value):
            return None, NO_PROMPT_PREFIX
        if len(value) != 1 or value[0]["role"] != "assistant":
            return None, NOT_ONE_ASSISTANT
        value = value[0]["content"]
    if not isinstance(value, str):
        return None, NOT_TEXT
    if not value.strip():
        return None, EMPTY
    return value, None
