"""Preference data from the Hugging Face Hub or local files, normalized to one row format.

Accepted row formats (TRL's preference formats; column names are configurable):

* standard: ``prompt``, ``chosen`` and ``rejected`` are strings;
* conversational: each is a list of ``{"role", "content"}`` messages. ``chosen``/``rejected`` hold
  either the assistant message alone or the whole conversation, prompt included (as in
  ``argilla/ultrafeedback-binarized-preferences-cleaned`` and ``HuggingFaceH4/ultrafeedback_binarized``,
  where ``chosen`` is ``[user message, assistant message]`` and ``prompt`` a string: the repeated
  prompt turns are removed); mixing a string prompt with conversational responses (or the reverse)
  is fine;
* conversational with an implicit prompt (``trl-lib/hh-rlhf-helpful-base``): no prompt column,
  ``chosen``/``rejected`` are whole conversations and the prompt is their longest common prefix
  of messages (as TRL's ``extract_prompt``); a pair that shares no leading message is a bad row
  (:data:`NO_COMMON_PROMPT`). Standard (string) rows without a prompt column are refused: a
  common text prefix is no chat turn.

The layout is detected per source from its columns and first rows, and reported once on the
console (``data: prefs.jsonl: conversational, implicit prompt``). Score columns
(:data:`REWARD_COLUMNS`, else ``score_columns``, default :data:`SCORE_COLUMNS`) are not part of
the normalized rows; :func:`sgpo_jax.data.pairs.reward_gaps` reads them as the pairs' rewards.

Local JSON/JSONL files (a JSON array, or one object per line; a UTF-8 BOM and CRLF line ends are
fine) are read here, not by ``datasets``: each line is parsed once by :func:`json.loads`, and every
value is kept exactly as parsed (a string is never parsed again, see :func:`column_values`). A
line that is not JSON, not an object or not UTF-8 becomes a bad row of its own (``bad_field``
``"line N"``, or ``"line N of FILE"`` when several files are read; ``bad_reason``
:data:`NOT_JSON`, :data:`NOT_OBJECT` or :data:`NOT_UTF8`, then ``": "`` and the parser's message
or the byte offset), so that ``on_bad_row`` raises on it naming the file and line, or skips only
that line and reports it like any bad row; every other line keeps its row. Data that cannot be
used at all (an empty file, a malformed JSON array, a missing column) raises
:class:`sgpo_jax.errors.DataError` naming the file, what was found and what was expected.

Every row becomes (:data:`NORMALIZED_FEATURES`):

* ``row`` (int64): the row's index in the loaded split (several files count on in order; also
  when only a shard of the split is normalized, see ``shard``);
* ``prompt``: list of ``{"role", "content"}`` messages (a string prompt is one user message);
* ``chosen``, ``rejected``: the assistant responses as strings. A conversation's leading
  messages must equal the prompt's (compared whitespace-stripped) and are dropped; exactly one
  assistant message must remain;
* ``bad_field``, ``bad_reason``: ``None`` for a usable row, else the first offending field
  (``"prompt"``, ``"chosen"`` or ``"rejected"``; ``"line N"`` for a line read line by line, see
  above) and one of :data:`ROW_PROBLEMS`: a missing
  value or message content, an empty prompt or response (whitespace only), a non-string value
  or content (e.g. multimodal content parts), a malformed message list, a conversation that does
  not start with the prompt or does not end in one assistant message, or ``rejected`` equal to
  ``chosen`` (whitespace-stripped), or (implicit prompt) no common leading message. Bad rows are
  kept and flagged here;
  :func:`sgpo_jax.data.tokenize.tokenize_preferences` raises on them or skips and reports them.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import pyarrow as pa

from sgpo_jax.console import say
from sgpo_jax.errors import DataError

__all__ = [
    "BAD_CONVERSATION", "EMPTY", "EXPECTED", "IDENTICAL", "MISSING", "NORMALIZED_FEATURES", "NOT_JSON", "NOT_OBJECT",
    "NOT_ONE_ASSISTANT", "NOT_TEXT", "NOT_UTF8", "NO_COMMON_PROMPT", "NO_PROMPT_PREFIX", "REWARD_COLUMNS",
    "ROW_PROBLEMS", "SCORE_COLUMNS", "TRUNCATED", "column_values", "describe_layout", "load_preferences", "load_split",
    "normalize_preferences", "reward_columns", "split_reason",
]

MISSING = "missing"
EMPTY = "empty"
NOT_TEXT = "not text"
BAD_CONVERSATION = "not a list of {role, content} messages"
NO_PROMPT_PREFIX = "conversation does not start with the prompt"
NOT_ONE_ASSISTANT = "not exactly one assistant message after the prompt"
IDENTICAL = "identical to chosen"
NO_COMMON_PROMPT = "chosen and rejected share no leading message (no prompt)"
NOT_JSON = "not valid JSON"  # a line of a local file; ": " and the parser's message follow in bad_reason
NOT_OBJECT = "not a JSON object"
NOT_UTF8 = "not UTF-8 text"
TRUNCATED = "nothing left after truncation"  # found by tokenization, not here
ROW_PROBLEMS = (MISSING, EMPTY, NOT_TEXT, BAD_CONVERSATION, NO_PROMPT_PREFIX, NOT_ONE_ASSISTANT, IDENTICAL,
                NO_COMMON_PROMPT, NOT_JSON, NOT_OBJECT, NOT_UTF8, TRUNCATED)
LINE_PROBLEMS = (NOT_JSON, NOT_OBJECT, NOT_UTF8)

EXPECTED = ("expected one preference pair per row: 'prompt', 'chosen' and 'rejected' as strings or lists of "
            "{role, content} messages, or 'chosen' and 'rejected' conversations that start with the same prompt "
            "messages")
REWARD_COLUMNS = ("chosen_reward", "rejected_reward")  # written by self-annotation (sgpo_jax.ssapo.annotate)
SCORE_COLUMNS = ("score_chosen", "score_rejected")  # HuggingFaceH4/ultrafeedback_binarized

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
    score_columns: Sequence[str] = SCORE_COLUMNS,
) -> datasets.Dataset:
    """Loads a preference split and normalizes its rows (see the module docstring); reports the
    detected layout on the console, once per source and layout.

    Args:
      source: a local ``.json``/``.jsonl``/``.parquet`` file or a list of files of one format
        (concatenated in order: ``row`` counts across them), a local directory (format inferred
        by ``datasets``), a builder name (``"json"``, ``"parquet"``) with ``data_files``, or a
        Hub dataset name.
      split: the split to load (local files hold one split, ``"train"``; slices such as
        ``"train[:1000]"`` work).
      prompt_column, chosen_column, rejected_column: the source columns to read. Without a
        prompt column, conversational ``chosen``/``rejected`` carry an implicit prompt.
      data_files: passed to ``datasets.load_dataset`` for directories, builders and Hub datasets.
      cache_dir: ``datasets`` cache directory (default: ``datasets``' own).
      shard: ``(index, count)``: normalize only rows ``index, index + count, index + 2 count, ...``
        (``row`` keeps their index in the split), e.g. one host's share of a multi-host run. The
        split itself is read as ``datasets`` reads it (memory-mapped Arrow, cached on disk);
        only the shard's rows are converted.
      score_columns: the (chosen, rejected) score columns named in the layout report when the
        source has no :data:`REWARD_COLUMNS` (only reported here; see
        :func:`sgpo_jax.data.pairs.reward_gaps`).

    Returns a ``datasets.Dataset`` with exactly the columns of :data:`NORMALIZED_FEATURES`.

    Raises:
      FileNotFoundError: ``source`` looks like a local path and does not exist.
      DataError: (a ``ValueError``) unsupported or mixed file types, the Hub is unreachable
        (offline) or does not hold ``source``, an empty or unreadable file, no rows, or a column
        is missing.
    """
    dataset, name = _load_split(source, split, data_files, cache_dir)
    normalized = normalize_preferences(dataset, prompt_column=prompt_column, chosen_column=chosen_column,
                                       rejected_column=rejected_column, source_name=name, shard=shard)
    layout = describe_layout(dataset, prompt_column=prompt_column, chosen_column=chosen_column,
                             rejected_column=rejected_column, score_columns=score_columns)
    if (name, layout) not in _REPORTED:
        _REPORTED.add((name, layout))
        say(f"data: {name}: {layout}")
    return normalized


_REPORTED: set = set()  # (source, layout) lines already printed by this process


def load_split(
    source: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    *,
    split: str = "train",
    data_files: Optional[Union[str, Sequence[str], Dict[str, Any]]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> datasets.Dataset:
    """The split of ``source`` as stored, before normalization (arguments and errors as in
    :func:`load_preferences`): every column, rows in the order that ``row`` counts. Bad lines of
    local JSON files are rows of a hidden column (see the module docstring); read a column's values
    with :func:`column_values`."""
    return _load_split(source, split, data_files, cache_dir)[0]


def _load_split(source, split, data_files, cache_dir) -> Tuple[datasets.Dataset, str]:
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)
    if not isinstance(source, (str, os.PathLike)):
        paths = [Path(os.fspath(s)).expanduser() for s in source]
        name = ", ".join(map(str, paths))
        dataset = _load_files(name, paths, split, cache_dir)
    else:
        name = os.fspath(source)
        path = Path(name).expanduser()
        local = _local_files(data_files) if name in _BUILDERS.values() else None
        if local:
            builder, name = name, ", ".join(map(str, local))
            dataset = _load_files(name, local, split, cache_dir, builder=builder)
        elif path.is_dir() or name in _BUILDERS.values():
            dataset = datasets.load_dataset(str(path) if path.is_dir() else name, data_files=data_files,
                                            split=split, cache_dir=cache_dir)
        elif path.is_file() or path.suffix.lower() in _BUILDERS or name.startswith(("/", ".", "~")):
            dataset = _load_files(name, [path], split, cache_dir)
        else:
            try:
                dataset = datasets.load_dataset(name, data_files=data_files, split=split, cache_dir=cache_dir)
            except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:
                raise DataError(
                    f"could not load dataset {name!r} from the Hugging Face Hub ({err}); without network access "
                    "pass a local .json, .jsonl or .parquet file (or a list or directory of them) instead"
                ) from err
    if not len(dataset):
        raise DataError(f"{name}: no rows in split {split!r}; {EXPECTED}")
    return dataset, name


def _local_files(data_files: Any) -> Optional[List[Path]]:
    """``data_files`` as local paths when it is one file or a list of existing local files."""
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    if not isinstance(data_files, (list, tuple)) or not data_files:
        return None
    paths = [Path(os.fspath(f)).expanduser() for f in data_files]
    return paths if all(p.is_file() for p in paths) else None


def _load_files(name: str, paths: List[Path], split: str, cache_dir: Optional[str],
                builder: Optional[str] = None) -> datasets.Dataset:
    """Local data files of one format (``builder``, default by their suffixes), concatenated in order."""
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if builder is None and path.suffix.lower() not in _BUILDERS:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {sorted(_BUILDERS)}")
    builders = {builder} if builder else {_BUILDERS[path.suffix.lower()] for path in paths}
    if len(builders) != 1:
        raise DataError(f"{name}: give one or more files of one format (JSON/JSONL or parquet)")
    if builders.pop() == "json":
        return _select_split(_read_json_files(paths), split, name)
    try:
        with _quiet("parquet"):
            return datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split=split,
                                         cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - diagnosed below: datasets' own errors name no file or line
        if _is_split_error(err):
            raise DataError(f"{name}: {err} (local files hold one split, 'train')") from err
        raise _parquet_error(name, paths, err) from err


@contextlib.contextmanager
def _quiet(builder: str):
    """Keeps the ``datasets`` builder's own error lines (diagnosed here) off the console."""
    logger = logging.getLogger(f"datasets.packaged_modules.{builder}.{builder}")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parquet_error(name: str, paths: List[Path], err: Exception) -> DataError:
    """The ``DataError`` that says why ``datasets`` could not read parquet ``paths``."""
    import pyarrow.parquet as pq

    rows = 0
    for path in paths:
        if path.stat().st_size == 0:
            return DataError(f"{path} is empty; {EXPECTED}")
        try:
            rows += pq.read_metadata(path).num_rows
        except Exception as problem:  # noqa: BLE001 - reported
            return DataError(f"{path}: not a readable parquet file ({type(problem).__name__}: {problem})")
    if not rows:
        return DataError(f"{name}: no rows; {EXPECTED}")
    return DataError(f"{name}: could not be read as parquet ({_last_line(err)})")


def _last_line(err: BaseException) -> str:
    """The innermost message of a chained exception, on one line."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1].strip() if lines else ''}"


def _is_split_error(err: Exception) -> bool:
    return isinstance(err, ValueError) and str(err).startswith(("Unknown split", "Bad split"))


def _select_split(dataset: datasets.Dataset, split: str, name: str) -> datasets.Dataset:
    """``split`` (``"train"`` or a slice of it) of rows read from local files."""
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({"train": len(dataset)})
    except (ValueError, AssertionError) as err:
        raise DataError(f"{name}: {err} (local files hold one split, 'train')") from err
    indices = [i for instruction in instructions for i in range(instruction.from_, instruction.to)]
    return dataset if indices == list(range(len(dataset))) else dataset.select(indices)


_BAD_LINE = "__sgpo_bad_line__"  # hidden column of JSON files: [field, reason] of a bad line, else null
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \\uD800-\\uDFFF escape: maybe a lone surrogate


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")


def _read_json_files(paths: List[Path]) -> datasets.Dataset:
    """Local JSON arrays or JSON lines, each line parsed once by :func:`json.loads`: one row per
    object (rows of several files in order); a line that is not a JSON object is a row flagged in
    the hidden :data:`_BAD_LINE` column. Every value is kept exactly as parsed: a column is an
    Arrow column when Arrow holds its values unchanged, else (values of different JSON types,
    integers past 64 bits, NaN...) a ``datasets.Json(decode=False)`` column of each value's JSON
    text, decoded by :func:`column_values` (a string value is never parsed again)."""
    records: List[Dict[str, Any]] = []
    for path in paths:
        where = "" if len(paths) == 1 else f" of {path}"
        records.extend(_read_json_file(path, where))
    columns: Dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    columns.pop(_BAD_LINE, None)
    arrays, features = {}, {}
    for column in list(columns) + [_BAD_LINE]:
        arrays[column], features[column] = _arrow_column([record.get(column) for record in records])
    return datasets.Dataset(pa.table(arrays), info=datasets.DatasetInfo(features=datasets.Features(features)))


def _arrow_column(values: List[Any]) -> Tuple[pa.Array, Any]:
    """``(array, feature)`` holding ``values`` unchanged: Arrow's own type when converting back
    gives the same values, else JSON texts (see :func:`_read_json_files`)."""
    try:
        array = pa.array(values)
        if array.to_pylist() == values:  # e.g. not when objects have different keys (Arrow adds nulls)
            return array, datasets.Features.from_arrow_schema(pa.schema([("value", array.type)]))["value"]
    except (pa.ArrowException, OverflowError):  # values of different JSON types, integers past 64 bits
        pass
    texts = pa.array([None if value is None else json.dumps(value) for value in values], pa.string())
    return pa.ExtensionArray.from_storage(pa.json_(), texts), datasets.Json(decode=False)


def column_values(dataset: datasets.Dataset, column: str) -> List[Any]:
    """The values of ``column`` of a split from :func:`load_split` (a JSON file's column of
    values of different types is stored as JSON texts, decoded here)."""
    return _decoded(dataset.select_columns([column])[column], _is_json(dataset, column))


def _is_json(dataset: datasets.Dataset, column: str) -> bool:
    return isinstance(dataset.features.get(column), datasets.Json)


def _decoded(values: Sequence[Any], is_json: bool) -> List[Any]:
    return [None if v is None else json.loads(v) for v in values] if is_json else list(values)


def _read_json_file(path: Path, where: str) -> List[Dict[str, Any]]:
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    if not data.strip():
        raise DataError(f"{path} is empty; {EXPECTED}")
    if data.lstrip()[:1] == b"[":  # one JSON array of objects
        try:
            items = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            raise DataError(f"{path}, line {line}: {NOT_UTF8} (byte {err.start + 1} of the file); a JSON array file "
                            "must be UTF-8") from err
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: {NOT_JSON} ({err.msg}: column {err.colno}); the file is one "
                            "JSON array, so no line can be skipped: fix it, or write one object per line "
                            "(JSON lines)") from err
        if not items:
            raise DataError(f"{path} holds an empty JSON array; {EXPECTED}")
        surrogate = _SURROGATE.search(data) and _lone_surrogate(items)
        if surrogate:
            raise DataError(f"{path}: {NOT_UTF8} (a lone surrogate escape {surrogate} in a string); a JSON array "
                            "file must be UTF-8")
        records = [item if isinstance(item, dict) else {_BAD_LINE: [f"item {i}{where}", f"{NOT_OBJECT}: {_kind(item)}"]}
                   for i, item in enumerate(items)]
        usable = any(isinstance(item, dict) for item in items)
    else:  # JSON lines; blank lines are skipped, as datasets does
        records, usable = [], False
        for number, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            problem = None
            try:
                value = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as err:
                problem = f"{NOT_UTF8}: byte {err.start + 1} of the line"
            except json.JSONDecodeError as err:
                problem = f"{NOT_JSON}: {err.msg}: column {err.colno}"
            else:
                if not isinstance(value, dict):
                    problem = f"{NOT_OBJECT}: {_kind(value)}"
                elif _SURROGATE.search(line) and _lone_surrogate(value):
                    problem = f"{NOT_UTF8}: a lone surrogate escape {_lone_surrogate(value)} in a string"
            if problem:
                records.append({_BAD_LINE: [f"line {number}{where}", problem]})
            else:
                records.append(value)
                usable = True
    if not usable:
        field, reason = records[0][_BAD_LINE]
        problem, detail = split_reason(reason)
        raise DataError(f"{path}: no line is a JSON object (first: {field}, {problem}: {detail}); {EXPECTED}, one "
                        "JSON object per line")
    return records


def _lone_surrogate(value: Any) -> Optional[str]:
    """The first ``\\uD800``-``\\uDFFF`` escape in the strings (keys included) of a parsed JSON
    value that pairs with no other (JSON allows it; it is no UTF-8 text) as ``"\\udxxx"``, or ``None``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return f"\\u{ord(value[err.start]):04x}"
        return None
    if isinstance(value, dict):
        value = [*value, *value.values()]
    for item in value if isinstance(value, list) else ():
        found = _lone_surrogate(item)
        if found:
            return found
    return None


def split_reason(reason: str) -> Tuple[str, str]:
    """``(problem, detail)`` of a ``bad_reason``: the parser's message of a bad line is kept
    after its problem (``"not valid JSON: Expecting value: column 1"``); other reasons have none."""
    for problem in LINE_PROBLEMS:
        if reason.startswith(problem + ": "):
            return problem, reason[len(problem) + 2:]
    return reason, ""


def reward_columns(column_names: Sequence[str], score_columns: Sequence[str] = SCORE_COLUMNS
                   ) -> Optional[Tuple[str, str]]:
    """The (chosen, rejected) columns that hold the pairs' rewards: :data:`REWARD_COLUMNS`, else
    ``score_columns``, when a source has both of them; else ``None``."""
    for pair in (REWARD_COLUMNS, tuple(score_columns)):
        if len(pair) == 2 and set(pair) <= set(column_names):
            return pair[0], pair[1]
    return None


def _sample(dataset: datasets.Dataset, column: str, n: int = 100) -> List[Any]:
    """The first non-null values of ``column`` among the first ``n`` rows."""
    if column not in dataset.column_names:
        return []
    return [v for v in _decoded(dataset.select_columns([column])[:n][column], _is_json(dataset, column))
            if v is not None]


def _is_conversation(values: List[Any]) -> bool:
    return bool(values) and isinstance(values[0], list)


def describe_layout(dataset: datasets.Dataset, *, prompt_column: str = "prompt", chosen_column: str = "chosen",
                    rejected_column: str = "rejected", score_columns: Sequence[str] = SCORE_COLUMNS) -> str:
    """The layout of a (raw) preference split in words, from its columns and first rows, e.g.
    ``"conversational, implicit prompt"``."""
    prompts, responses = _sample(dataset, prompt_column), _sample(dataset, chosen_column)
    if prompt_column not in dataset.column_names:
        layout = "conversational, implicit prompt"
    elif not (_is_conversation(prompts) or _is_conversation(responses)):
        layout = "standard, explicit prompt"
    else:
        layout = "conversational, explicit prompt" + (" (a string)" if prompts and isinstance(prompts[0], str) else "")
        repeated = any(isinstance(v, list) and v and isinstance(v[0], dict) and v[0].get("role") != "assistant"
                       for v in responses)
        if repeated:
            layout += ", repeated at the start of chosen/rejected (removed there)"
    rewards = reward_columns(dataset.column_names, score_columns)
    if rewards:
        layout += f"; rewards from {rewards[0]}/{rewards[1]}"
        if rewards != REWARD_COLUMNS:
            layout += f" (as {REWARD_COLUMNS[0]}/{REWARD_COLUMNS[1]})"
    return layout


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
    Without ``prompt_column``, conversational ``chosen``/``rejected`` hold an implicit prompt.
    ``shard=(index, count)`` normalizes only rows ``index + count * i`` (as in
    :func:`load_preferences`).

    Raises ``DataError`` (a ``ValueError``) naming ``source_name``, the columns found and the
    ones expected if a column is missing; ``ValueError`` if ``shard`` is invalid.
    """
    found = [c for c in dataset.column_names if c != _BAD_LINE]
    columns = (prompt_column, chosen_column, rejected_column)
    implicit = prompt_column not in found and chosen_column in found and rejected_column in found
    for argument, column in zip(("prompt_column", "chosen_column", "rejected_column"), columns):
        if column not in found and not (implicit and argument == "prompt_column"):
            raise DataError(
                f"{source_name}: column {column!r} not found (columns found: {found or 'none'}); {EXPECTED}; "
                f"set {argument} (--config.data.{argument}=...) to the column that holds it"
            )
    if implicit:
        sample = _sample(dataset, chosen_column)
        if sample and not isinstance(sample[0], list):
            raise DataError(
                f"{source_name}: column {prompt_column!r} not found (columns found: {found}) and {chosen_column!r} "
                f"holds {_kind(sample[0])}, not a conversation, so no prompt can be taken from it; {EXPECTED}; set "
                "prompt_column (--config.data.prompt_column=...) to the column that holds the prompt"
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
        fn_kwargs={"columns": columns, "first": index, "stride": count, "implicit": implicit,
                   "bad_lines": _BAD_LINE in dataset.column_names,
                   "as_json": tuple(_is_json(dataset, column) for column in columns)},
        remove_columns=dataset.column_names,
        features=NORMALIZED_FEATURES,
        desc=f"normalizing {source_name}" + (f" (shard {index} of {count})" if count > 1 else ""),
    )


def _normalize_batch(batch: Dict[str, list], indices: List[int], *, columns: Tuple[str, str, str], first: int,
                     stride: int, implicit: bool = False, bad_lines: bool = False,
                     as_json: Tuple[bool, bool, bool] = (False, False, False)) -> Dict[str, list]:
    out: Dict[str, list] = {name: [] for name in NORMALIZED_FEATURES}
    chosen, rejected = _decoded(batch[columns[1]], as_json[1]), _decoded(batch[columns[2]], as_json[2])
    prompts = [None] * len(indices) if implicit else _decoded(batch[columns[0]], as_json[0])
    flags = batch[_BAD_LINE] if bad_lines else [None] * len(indices)
    for index, prompt, chosen_value, rejected_value, flag in zip(indices, prompts, chosen, rejected, flags):
        if flag:
            normalized = [], None, None, (flag[0], flag[1])
        elif implicit:
            normalized = _normalize_implicit(chosen_value, rejected_value)
        else:
            normalized = _normalize_row(prompt, chosen_value, rejected_value)
        prompt, chosen_text, rejected_text, problem = normalized
        out["row"].append(first + stride * index)
        out["prompt"].append(prompt)
        out["chosen"].append(chosen_text)
        out["rejected"].append(rejected_text)
        out["bad_field"].append(problem and problem[0])
        out["bad_reason"].append(problem and problem[1])
    return out


def _normalize_implicit(
    chosen: Any, rejected: Any,
) -> Tuple[List[Message], Optional[str], Optional[str], Optional[Tuple[str, str]]]:
    """An implicit-prompt row: the prompt is the messages ``chosen`` and ``rejected`` start with."""
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            return [], None, None, (field, MISSING)
        if not isinstance(value, list):
            return [], None, None, (field, BAD_CONVERSATION)
        problem = _conversation_problem(value)
        if problem:
            return [], None, None, (field, problem)
    shared = 0
    while shared < min(len(chosen), len(rejected)) and _same_messages([chosen[shared]], [rejected[shared]]):
        shared += 1
    if shared == 0:
        return [], None, None, ("prompt", NO_COMMON_PROMPT)
    if shared == len(chosen) == len(rejected):
        return [], None, None, ("rejected", IDENTICAL)
    prompt = [{"role": m["role"], "content": m["content"]} for m in chosen[:shared]]
    if not any(m["content"].strip() for m in prompt):
        return [], None, None, ("prompt", EMPTY)
    texts, problem = _two_responses(chosen[shared:], rejected[shared:], [])
    if problem:
        return [], None, None, problem
    return prompt, texts[0], texts[1], None


def _normalize_row(
    prompt: Any, chosen: Any, rejected: Any,
) -> Tuple[List[Message], Optional[str], Optional[str], Optional[Tuple[str, str]]]:
    """``(prompt messages, chosen, rejected, None)`` or ``([], None, None, (field, problem))``."""
    messages, problem = _prompt_messages(prompt)
    if problem:
        return [], None, None, ("prompt", problem)
    texts, problem = _two_responses(chosen, rejected, messages)
    if problem:
        return [], None, None, problem
    return messages, texts[0], texts[1], None


def _two_responses(chosen: Any, rejected: Any, context: List[Message]
                   ) -> Tuple[Optional[Tuple[str, str]], Optional[Tuple[str, str]]]:
    """``((chosen text, rejected text), None)`` after the prompt ``context``, or ``(None, (field,
    problem))`` for the first bad response, or identical ones."""
    texts = []
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        text, problem = _response_text(value, context)
        if problem:
            return None, (field, problem)
        texts.append(text)
    if texts[0].strip() == texts[1].strip():
        return None, ("rejected", IDENTICAL)
    return (texts[0], texts[1]), None


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
