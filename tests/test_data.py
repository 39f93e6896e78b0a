"""The preference-data layer against hand expectations: loading and normalization of every row
format, tokenization and truncation, bad rows, bucketed / shuffled / resumable / sharded batches.

Everything is offline and hermetic: files are written to tmp_path, ``datasets`` caches there, and
the tokenizer is a word-level ``tokenizers`` model (word ``wK`` has id ``K + 8``) wrapped in
``transformers.PreTrainedTokenizerFast`` with a chat template written here.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from sgpo_jax.core.step import PreferenceBatch
from sgpo_jax.data import (
    PairBatcher,
    TokenizedPairs,
    default_buckets,
    load_preferences,
    loading,
    ordered_batches,
    plain_prompt,
    tokenize_preferences,
)
from sgpo_jax.errors import DataError

PAD, BOS, EOS, UNK, SYSTEM, USER, ASSISTANT, END = range(8)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOKEN_FIELDS = ["chosen_ids", "chosen_attention", "chosen_loss_mask",
                "rejected_ids", "rejected_attention", "rejected_loss_mask", "weight"]


def w(*ks):
    """Ids of words ``wK``."""
    return [k + len(SPECIALS) for k in ks]


def text(*ks):
    return " ".join(f"w{k}" for k in ks)


def make_tokenizer(chat_template=True, pad=True):
    vocab = {token: i for i, token in enumerate(SPECIALS + [f"w{k}" for k in range(200)])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    kwargs = dict(chat_template=TEMPLATE) if chat_template else {}
    if pad:
        kwargs["pad_token"] = "<pad>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write(path, rows):
    """Writes ``rows`` as .json (one array), .jsonl or .parquet, by ``path``'s suffix."""
    if path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def load(tmp_path):
    """``load_preferences`` of ``rows`` written to ``tmp_path/name``, caching in tmp_path."""
    def load_rows(rows, name="prefs.jsonl", **kwargs):
        return load_preferences(write(tmp_path / name, rows), cache_dir=tmp_path / "cache", **kwargs)
    return load_rows


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def normalized(dataset):
    return [{k: v for k, v in row.items() if k != "bad_field" and k != "bad_reason"} for row in dataset
            if row["bad_field"] is None]


# ----------------------------------------------------------------------------------------------
# Loading and normalization
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prefs.json", "prefs.jsonl", "prefs.parquet"])
def test_string_rows_load_from_every_file_type(load, name):
    rows = [{"prompt": "w1 w2", "chosen": "w3", "rejected": "w4", "score": 1.5},
            {"prompt": "w5", "chosen": " w6 ", "rejected": "w7", "score": 0.5}]
    dataset = load(rows, name)
    assert dataset.column_names == list(loading.NORMALIZED_FEATURES)
    assert list(dataset) == [
        dict(row=0, prompt=[user("w1 w2")], chosen="w3", rejected="w4", bad_field=None, bad_reason=None),
        dict(row=1, prompt=[user("w5")], chosen=" w6 ", rejected="w7", bad_field=None, bad_reason=None),
    ]


def test_conversational_rows_with_and_without_the_prompt_in_the_responses(load):
    system = {"role": "system", "content": "w0"}
    rows = [
        # Assistant turn only.
        {"prompt": [user("w1")], "chosen": [assistant("w2")], "rejected": [assistant("w3")]},
        # argilla/ultrafeedback-binarized-preferences-cleaned: string prompt, whole conversations.
        {"prompt": "w4", "chosen": [user("w4"), assistant("w5")], "rejected": [user("w4 "), assistant("w6")]},
        # Multi-turn prompt with a system message, repeated in the responses.
        {"prompt": [system, user("w7"), assistant("w8"), user("w9")],
         "chosen": [system, user("w7"), assistant("w8"), user("w9"), assistant("w10")],
         "rejected": [assistant("w11")]},
    ]
    assert normalized(load(rows)) == [
        dict(row=0, prompt=[user("w1")], chosen="w2", rejected="w3"),
        dict(row=1, prompt=[user("w4")], chosen="w5", rejected="w6"),
        dict(row=2, prompt=[system, user("w7"), assistant("w8"), user("w9")], chosen="w10", rejected="w11"),
    ]
    # The argilla rows alone, as parquet (one type per column).
    assert normalized(load([rows[1], rows[1]], "argilla.parquet")) == [
        dict(row=0, prompt=[user("w4")], chosen="w5", rejected="w6"),
        dict(row=1, prompt=[user("w4")], chosen="w5", rejected="w6"),
    ]


def test_column_mapping(load):
    rows = [{"question": "w1", "good": "w2", "bad": "w3", "prompt": "ignored"}]
    dataset = load(rows, prompt_column="question", chosen_column="good", rejected_column="bad")
    assert normalized(dataset) == [dict(row=0, prompt=[user("w1")], chosen="w2", rejected="w3")]
    with pytest.raises(ValueError, match=r"prefs2.jsonl: column 'chosen' not found .*'good'.*set chosen_column"):
        load(rows, "prefs2.jsonl")


def test_unloadable_sources_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"'someone/prefs' from the Hugging Face Hub.*pass a local .json, .jsonl"):
        load_preferences("someone/prefs", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        load_preferences(tmp_path / "missing.jsonl", cache_dir=tmp_path)
    (tmp_path / "prefs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(ValueError, match=r"prefs.csv: unsupported file type '.csv'"):
        load_preferences(tmp_path / "prefs.csv", cache_dir=tmp_path)


def test_several_files(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"prompt": "w1", "chosen": "w2", "rejected": "w3"}])
    b = write(tmp_path / "b.json", [{"prompt": "w4", "chosen": "w5", "rejected": "w6"},
                                    {"prompt": "w7", "chosen": "w8", "rejected": "w9"}])
    for dataset in (load_preferences([a, b], cache_dir=tmp_path / "cache"),
                    load_preferences("json", data_files=[str(a), str(b)], cache_dir=tmp_path / "cache")):
        assert [(r["row"], r["chosen"]) for r in dataset] == [(0, "w2"), (1, "w5"), (2, "w8")]
    c = write(tmp_path / "c.parquet", [{"prompt": "w1", "chosen": "w2", "rejected": "w3"}])
    with pytest.raises(ValueError, match="one format"):
        load_preferences([a, c], cache_dir=tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# Tokenization and truncation
# ----------------------------------------------------------------------------------------------


def test_tokenization_applies_the_chat_template_and_appends_eos(load, tokenizer):
    dataset = load([{"prompt": "w1 w2 w3", "chosen": "w4 w5", "rejected": "w6"},
                    {"prompt": [user("w7"), assistant("w8"), user("w9")], "chosen": "w10", "rejected": "w11 w12"}])
    pairs, report = tokenize_preferences(dataset, tokenizer, max_length=32, max_prompt_length=16)
    assert [p.tolist() for p in pairs.prompt_ids] == [
        [BOS, USER, *w(1, 2, 3), END, ASSISTANT],
        [BOS, USER, *w(7), END, ASSISTANT, *w(8), END, USER, *w(9), END, ASSISTANT],
    ]
    assert [c.tolist() for c in pairs.chosen_ids] == [[*w(4, 5), EOS], [*w(10), EOS]]
    assert [r.tolist() for r in pairs.rejected_ids] == [[*w(6), EOS], [*w(11, 12), EOS]]
    assert pairs.rows.tolist() == [0, 1] and pairs.pad_id == PAD
    assert all(a.dtype == np.int32 for a in pairs.prompt_ids + pairs.chosen_ids + pairs.rejected_ids)
    assert report.skipped == 0 and str(report) == "dataset: all 2 rows usable"


def test_plain_text_fallback_without_chat_template(load):
    dataset = load([{"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}])
    pairs, _ = tokenize_preferences(dataset, make_tokenizer(chat_template=False, pad=False),
                                    max_length=32, max_prompt_length=16)
    assert pairs.prompt_ids[0].tolist() == [BOS, *w(1, 2)]  # verbatim, with the tokenizer's BOS
    assert pairs.chosen_ids[0].tolist() == [*w(3), EOS]
    assert pairs.pad_id == EOS  # no pad token: EOS pads
    assert plain_prompt([user("w1")]) == "w1"
    assert plain_prompt([{"role": "system", "content": "be brief"}, user("hi")]) == (
        "system: be brief\n\nuser: hi\n\nassistant: ")


def test_truncation_left_truncates_the_prompt_then_cuts_responses_to_fit(load, tokenizer):
    dataset = load([{"prompt": text(*range(10)), "chosen": text(10, 11, 12, 13), "rejected": "w14"}])
    pairs, _ = tokenize_preferences(dataset, tokenizer, max_length=7, max_prompt_length=4)
    # Full prompt: BOS USER w0..w9 END ASSISTANT; its last 4 tokens stay; 7 - 4 = 3 tokens of room.
    assert pairs.prompt_ids[0].tolist() == [*w(8, 9), END, ASSISTANT]
    assert pairs.chosen_ids[0].tolist() == w(10, 11, 12)  # cut: no EOS
    assert pairs.rejected_ids[0].tolist() == [*w(14), EOS]

    batch = next(ordered_batches(pairs, 1, buckets=[7]))
    assert batch["chosen_ids"].tolist() == [[*w(8, 9), END, ASSISTANT, *w(10, 11, 12)]]
    assert batch["chosen_loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert batch["rejected_ids"].tolist() == [[*w(8, 9), END, ASSISTANT, *w(14), EOS, PAD]]
    assert batch["rejected_attention"].tolist() == [[1, 1, 1, 1, 1, 1, 0]]
    assert batch["rejected_loss_mask"].tolist() == [[0, 0, 0, 0, 1, 1, 0]]


GOOD = {"prompt": "w1", "chosen": "w2", "rejected": "w3"}
BAD_ROWS = {  # problem: (row, field)
    loading.MISSING: ({"prompt": None, "chosen": "w2", "rejected": "w3"}, "prompt"),
    loading.EMPTY: ({"prompt": "w1", "chosen": "  ", "rejected": "w3"}, "chosen"),
    loading.NOT_TEXT: ({"prompt": "w1", "chosen": "w2", "rejected": 5}, "rejected"),
    loading.BAD_CONVERSATION: ({"prompt": "w1", "chosen": [{"content": "w2"}], "rejected": "w3"}, "chosen"),
    loading.NO_PROMPT_PREFIX: ({"prompt": "w1", "chosen": [user("w9"), assistant("w2")], "rejected": "w3"}, "chosen"),
    loading.NOT_ONE_ASSISTANT: (
        {"prompt": "w1", "chosen": "w2", "rejected": [user("w1"), assistant("w3"), assistant("w4")]}, "rejected"),
    loading.IDENTICAL: ({"prompt": "w1", "chosen": "w2 w3", "rejected": "w2 w3 "}, "rejected"),
    loading.TRUNCATED: ({"prompt": text(*range(20)), "chosen": "w2", "rejected": "w3"}, "chosen"),
}
MAX_LENGTH = 8  # == max_prompt_length, so a long prompt leaves no room


@pytest.mark.parametrize("problem", list(BAD_ROWS))
def test_bad_row_raises_naming_file_row_field_and_problem(load, tokenizer, tmp_path, problem):
    bad, field = BAD_ROWS[problem]
    dataset = load([GOOD, bad, GOOD])
    message = (f"{tmp_path / 'prefs.jsonl'}: bad row 1, field {field!r}: {problem}. "
               "Fix the data, or pass on_bad_row='skip'")
    with pytest.raises(DataError) as err:
        tokenize_preferences(dataset, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH,
                             source_name=str(tmp_path / "prefs.jsonl"))
    assert message in str(err.value)


def test_more_bad_row_shapes(load):
    cases = [  # (row, field, problem)
        ({"prompt": "w1", "chosen": "w2"}, "rejected", loading.MISSING),  # key absent from the row
        ({"prompt": [user(None)], "chosen": "w2", "rejected": "w3"}, "prompt", loading.MISSING),
        ({"prompt": [], "chosen": "w2", "rejected": "w3"}, "prompt", loading.EMPTY),
        ({"prompt": [user(" "), assistant("")], "chosen": "w2", "rejected": "w3"}, "prompt", loading.EMPTY),
        ({"prompt": {"text": "w1"}, "chosen": "w2", "rejected": "w3"}, "prompt", loading.NOT_TEXT),
        ({"prompt": "w1", "chosen": [assistant([{"type": "text", "text": "w2"}])], "rejected": "w3"},
         "chosen", loading.NOT_TEXT),  # multimodal content parts
        ({"prompt": "w1", "chosen": ["w2"], "rejected": "w3"}, "chosen", loading.BAD_CONVERSATION),
        ({"prompt": "w1", "chosen": [], "rejected": "w3"}, "chosen", loading.NOT_ONE_ASSISTANT),
        ({"prompt": "w1", "chosen": [user("w1")], "rejected": "w3"}, "chosen", loading.NOT_ONE_ASSISTANT),
    ]
    dataset = load([GOOD] + [row for row, _, _ in cases])
    assert [(r["bad_field"], r["bad_reason"]) for r in dataset] == [(None, None)] + [(f, p) for _, f, p in cases]


def test_skipped_bad_rows_are_counted_and_reported(load, tokenizer):
    problems = list(BAD_ROWS)
    rows = [GOOD] + [BAD_ROWS[p][0] for p in problems] + [BAD_ROWS[loading.EMPTY][0], GOOD]
    dataset = load(rows)
    pairs, report = tokenize_preferences(dataset, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_LENGTH,
                                         on_bad_row="skip", source_name="prefs.jsonl")
    assert pairs.rows.tolist() == [0, len(rows) - 1] and len(pairs) + report.skipped == len(rows)
    assert report.total == len(rows) and report.skipped == len(rows) - 2
    assert report.counts == {p: 2 if p == loading.EMPTY else 1 for p in problems}
    assert [(b.row, b.field, b.reason) for b in report.examples] == [
        (1 + i, BAD_ROWS[p][1], p) for i, p in enumerate(problems[:report.max_examples])]
    assert str(report).splitlines() == [
        f"prefs.jsonl: skipped {len(rows) - 2} of {len(rows)} rows (empty: 2, "
        + ", ".join(f"{p}: 1" for p in problems if p != loading.EMPTY) + "); first:",
        *(f"  row {1 + i}, field {BAD_ROWS[p][1]!r}: {p}" for i, p in enumerate(problems[:5])),
    ]
    with pytest.raises(ValueError, match="no usable rows in prefs.jsonl: skipped 1 of 1 rows"):
        tokenize_preferences(load([BAD_ROWS[loading.EMPTY][0]], "only_bad.jsonl"), tokenizer, max_length=8,
                             max_prompt_length=8, on_bad_row="skip", source_name="prefs.jsonl")


# ----------------------------------------------------------------------------------------------
# Malformed files
# ----------------------------------------------------------------------------------------------

EXPECTED = ("expected one preference pair per row: 'prompt', 'chosen' and 'rejected' as strings or lists of "
            "{role, content} messages, or 'chosen' and 'rejected' conversations that start with the same prompt "
            "messages")
SKIP = "Fix the data, or pass on_bad_row='skip' to drop such rows (they are counted and reported)"


def pair_line(k):
    return json.dumps({"prompt": f"w{k}", "chosen": f"w{k + 1}", "rejected": f"w{k + 2}"})


@pytest.fixture
def malformed(tmp_path):
    """A JSONL file: 10 good lines, an unterminated string on line 11, a blank line, a good line,
    a list, trailing garbage after an object, and bytes that are not UTF-8 (lines 14-16)."""
    lines = [pair_line(k) for k in range(10)] + [
        '{"prompt": "w1", "chosen": "w2, "rejected": "w3"}', "", pair_line(20), "[1, 2]", pair_line(30) + " x"]
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"prompt": "w1\xff"}\n')
    return path


def test_a_line_that_does_not_parse_names_file_line_and_parser_message(malformed, tokenizer, tmp_path):
    dataset = load_preferences(malformed, cache_dir=tmp_path / "cache")  # the file itself is read
    assert len(dataset) == 15  # one row per non-blank line: rows keep their place
    with pytest.raises(DataError) as err:
        tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, source_name=str(malformed))
    assert str(err.value) == (f"{malformed}: bad line 11: not valid JSON (Expecting ',' delimiter: column 34). "
                              f"{SKIP}")
    assert err.value.hint == "or set --config.data.on_bad_row=skip to drop such rows"


def test_lines_that_do_not_parse_are_skipped_and_reported(malformed, tokenizer, tmp_path):
    dataset = load_preferences(malformed, cache_dir=tmp_path / "cache")
    pairs, report = tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, on_bad_row="skip",
                                         source_name="prefs.jsonl")
    assert pairs.rows.tolist() == list(range(10)) + [11]
    assert pairs.prompt_ids[-1].tolist() == [BOS, USER, *w(20), END, ASSISTANT]
    assert report.counts == {loading.NOT_JSON: 2, loading.NOT_OBJECT: 1, loading.NOT_UTF8: 1}
    assert str(report).splitlines() == [
        "prefs.jsonl: skipped 4 of 15 rows (not valid JSON: 2, not a JSON object: 1, not UTF-8 text: 1); first:",
        "  line 11: not valid JSON (Expecting ',' delimiter: column 34)",
        "  line 14: not a JSON object (a list)",
        "  line 15: not valid JSON (Extra data: column 55)",
        "  line 16: not UTF-8 text (byte 15 of the line)",
    ]
    assert [(b.row, b.field, b.reason) for b in report.examples][:2] == [
        (10, "line 11", loading.NOT_JSON), (12, "line 14", loading.NOT_OBJECT)]


def test_a_bad_line_in_one_of_several_files_names_that_file(tmp_path, tokenizer):
    a = tmp_path / "a.jsonl"
    a.write_text(pair_line(1) + "\n")
    b = tmp_path / "b.json"  # JSON lines in a .json file, as datasets reads them
    b.write_text(pair_line(2) + "\n{oops\n" + pair_line(3) + "\n")
    dataset = load_preferences([a, b], cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as err:
        tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, source_name="a.jsonl,b.json")
    assert str(err.value) == (f"a.jsonl,b.json: bad line 2 of {b}: not valid JSON (Expecting property name enclosed "
                              f"in double quotes: column 2). {SKIP}")
    pairs, _ = tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, on_bad_row="skip")
    assert pairs.rows.tolist() == [0, 1, 3]
    # The read-by-line path honours slices of the split, like datasets.
    sliced = load_preferences([a, b], split="train[1:]", cache_dir=tmp_path / "cache")
    assert [(r["row"], r["bad_field"]) for r in sliced] == [(0, None), (1, f"line 2 of {b}"), (2, None)]


def test_annotated_rewards_stay_aligned_with_rows_past_a_bad_line(tmp_path, tokenizer):
    from sgpo_jax.data.pairs import reward_gaps

    rows = [json.dumps({"prompt": f"w{k}", "chosen": "w1", "rejected": "w2", "chosen_reward": float(k),
                        "rejected_reward": 0.0}) for k in range(4)]
    path = tmp_path / "round_1.jsonl"
    path.write_text("\n".join(rows[:2] + ['{"prompt": '] + rows[2:]) + "\n")
    pairs, _ = tokenize_preferences(load_preferences(path, cache_dir=tmp_path / "cache"), tokenizer, max_length=16,
                                    max_prompt_length=8, on_bad_row="skip")
    assert pairs.rows.tolist() == [0, 1, 3, 4]
    assert reward_gaps([str(path)], "train", pairs.rows).tolist() == [0.0, 1.0, 2.0, 3.0]


def json_lookalikes(tmp_path):
    """16 JSON lines whose strings look like JSON ("\\"Yes\\"", "[1, 2, 3]", "42"); line 8 is cut
    short. Returns the path, the rows as written and the broken line."""
    rows = [{"prompt": text(k), "chosen": text(k + 1), "rejected": text(k + 2)} for k in range(16)]
    rows[1].update(chosen='"Yes"', rejected="Yes")
    rows[2]["chosen"] = "[1, 2, 3]"
    rows[3]["rejected"] = "42"
    rows[4]["prompt"] = "null"
    lines = [json.dumps(row) for row in rows]
    lines[7] = lines[7][:-9]
    path = tmp_path / "lookalikes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, rows, lines[7]


def test_one_broken_line_costs_that_line_only_and_no_string_is_parsed_again(tmp_path, tokenizer):
    path, rows, broken = json_lookalikes(tmp_path)
    with pytest.raises(json.JSONDecodeError) as parsed:  # the standard parser's own message is the oracle
        json.loads(broken)
    dataset = load_preferences(path, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as err:
        tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, source_name=str(path))
    assert str(err.value) == (f"{path}: bad line 8: not valid JSON ({parsed.value.msg}: column "
                              f"{parsed.value.colno}). {SKIP}")
    kept = [row for row in dataset if row["bad_field"] is None]
    assert [row["row"] for row in kept] == [k for k in range(16) if k != 7]
    assert [(row["prompt"][0]["content"], row["chosen"], row["rejected"]) for row in kept] == [
        (row["prompt"], row["chosen"], row["rejected"]) for k, row in enumerate(rows) if k != 7]
    pairs, report = tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, on_bad_row="skip",
                                         source_name="lookalikes.jsonl")
    assert pairs.rows.tolist() == [k for k in range(16) if k != 7]
    assert str(report).splitlines() == [
        "lookalikes.jsonl: skipped 1 of 16 rows (not valid JSON: 1); first:",
        f"  line 8: not valid JSON ({parsed.value.msg}: column {parsed.value.colno})"]


def test_a_byte_that_is_not_utf8_names_file_line_and_offset(tmp_path, tokenizer):
    lines = [pair_line(k).encode() for k in range(4)]
    lines[2] = lines[2].replace(b"w3", b"w\xe93")  # Latin-1 e-acute inside a string, at byte 30 of the line
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UnicodeDecodeError) as decoded:  # Python's UTF-8 decoder places the byte (0-based)
        lines[2].decode("utf-8")
    dataset = load_preferences(path, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError) as err:
        tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, source_name=str(path))
    assert str(err.value) == f"{path}: bad line 3: not UTF-8 text (byte {decoded.value.start + 1} of the line). {SKIP}"
    pairs, report = tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8, on_bad_row="skip")
    assert pairs.rows.tolist() == [0, 1, 3]
    array = tmp_path / "latin1.json"  # one JSON array: nothing can be skipped, the line and byte are named
    array.write_bytes(b"[" + b",\n".join(lines) + b"]")
    offset = array.read_bytes().index(b"\xe9") + 1
    with pytest.raises(DataError) as err:
        load_preferences(array, cache_dir=tmp_path / "cache")
    assert str(err.value) == (f"{array}, line 3: not UTF-8 text (byte {offset} of the file); a JSON array file must "
                              "be UTF-8")


def test_a_lone_surrogate_escape_is_a_bad_line(tmp_path, tokenizer):
    path = tmp_path / "surrogate.jsonl"
    path.write_text(pair_line(1) + "\n" + '{"prompt": "w1", "chosen": "w2\\ud83d", "rejected": "w3"}\n'
                    + '{"prompt": "w1", "chosen": "w2 \\ud83d\\ude00", "rejected": "w3"}\n')  # a pair: fine
    dataset = load_preferences(path, cache_dir=tmp_path / "cache")
    assert [(row["bad_field"], row["bad_reason"]) for row in dataset] == [
        (None, None), ("line 2", "not UTF-8 text: a lone surrogate escape \\ud83d in a string"), (None, None)]
    assert dataset[2]["chosen"] == "w2 \U0001F600"


def test_columns_of_mixed_json_types_keep_every_value(tmp_path, tokenizer):
    from sgpo_jax.data.pairs import reward_gaps

    rewards = [0.1 + 0.2, 1.2345678901234567e-300, "n/a", 2**70, 7.000000000000001]
    rows = [{"prompt": "w1", "chosen": text(k + 2), "rejected": "w9", "chosen_reward": r, "rejected_reward": 0.0}
            for k, r in enumerate(rewards)]
    rows[1]["chosen"] = 42
    rows[2]["prompt"] = [user("w1"), {"role": "user", "content": "w2", "name": "x"}]
    path = write(tmp_path / "mixed.jsonl", rows)
    dataset = load_preferences(path, cache_dir=tmp_path / "cache")
    assert [(row["bad_field"], row["bad_reason"]) for row in dataset] == [
        (None, None), ("chosen", loading.NOT_TEXT), (None, None), (None, None), (None, None)]
    assert dataset[2]["prompt"] == [user("w1"), user("w2")]
    raw = loading.load_split(path)
    assert loading.column_values(raw, "prompt") == [row["prompt"] for row in rows]  # no key added
    # Every number exactly as Python's json reads it (datasets' own JSON decoder rounds some floats).
    assert loading.column_values(raw, "chosen_reward") == rewards
    gaps = reward_gaps([str(path)], "train", np.arange(5))
    assert gaps.tolist()[:2] == [0.1 + 0.2, 1.2345678901234567e-300] and np.isnan(gaps[2])
    assert gaps.tolist()[3:] == [float(2**70), 7.000000000000001]


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", "", "{path} is empty; {expected}"),
    ("blank.json", " \n\n", "{path} is empty; {expected}"),
    ("array.json", "[]", "{path} holds an empty JSON array; {expected}"),
    ("array.json", '[{"prompt": "w1",\n "chosen": "w2"\n "rejected": "w3"}]',
     "{path}, line 3: not valid JSON (Expecting ',' delimiter: column 2); the file is one JSON array, so no line "
     "can be skipped: fix it, or write one object per line (JSON lines)"),
    ("garbage.jsonl", "prompt,chosen,rejected\nw1,w2,w3\n",
     "{path}: no line is a JSON object (first: line 1, not valid JSON: Expecting value: column 1); {expected}, "
     "one JSON object per line"),
    ("objects.jsonl", "{}\n{}\n",
     "{path}: column 'prompt' not found (columns found: none); {expected}; set prompt_column "
     "(--config.data.prompt_column=...) to the column that holds it"),
    ("columns.jsonl", '{"question": "w1", "good": "w2", "bad": "w3"}\n',
     "{path}: column 'prompt' not found (columns found: ['question', 'good', 'bad']); {expected}; set prompt_column "
     "(--config.data.prompt_column=...) to the column that holds it"),
    ("empty.parquet", "", "{path} is empty; {expected}"),
    ("garbage.parquet", "not parquet",
     "{path}: not a readable parquet file (ArrowInvalid: Parquet magic bytes not found in footer. Either the file is "
     "corrupted or this is not a parquet file.)"),
])
def test_unusable_files_get_one_sentence(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_preferences(path, cache_dir=tmp_path / "cache")
    assert str(err.value) == message.format(path=path, expected=EXPECTED)


def test_parquet_without_rows_or_with_other_columns(tmp_path):
    empty = tmp_path / "empty_rows.parquet"
    pq.write_table(pa.table({c: pa.array([], pa.string()) for c in ("prompt", "chosen", "rejected")}), empty)
    with pytest.raises(DataError) as err:
        load_preferences(empty, cache_dir=tmp_path / "cache")
    assert str(err.value) == f"{empty}: no rows; {EXPECTED}"
    other = write(tmp_path / "other.parquet", [{"prompt": "w1", "good": "w2", "bad": "w3"}])
    with pytest.raises(DataError) as err:
        load_preferences(other, cache_dir=tmp_path / "cache")
    assert str(err.value) == (f"{other}: column 'chosen' not found (columns found: ['prompt', 'good', 'bad']); "
                              f"{EXPECTED}; set chosen_column (--config.data.chosen_column=...) to the column that "
                              "holds it")


def test_no_usable_row_says_so_and_what_was_expected(load, tokenizer):
    dataset = load([BAD_ROWS[loading.EMPTY][0], BAD_ROWS[loading.IDENTICAL][0]])
    with pytest.raises(DataError) as err:
        tokenize_preferences(dataset, tokenizer, max_length=8, max_prompt_length=8, on_bad_row="skip",
                             source_name="prefs.jsonl")
    assert str(err.value).splitlines() == [
        "no usable rows in prefs.jsonl: skipped 2 of 2 rows (empty: 1, identical to chosen: 1); first:",
        "  row 0, field 'chosen': empty",
        "  row 1, field 'rejected': identical to chosen",
        EXPECTED[0].upper() + EXPECTED[1:],
    ]


# ----------------------------------------------------------------------------------------------
# Fingerprint
# ----------------------------------------------------------------------------------------------


def tiny_pairs(**changes):
    fields = dict(prompt_ids=[np.array([1, 5], np.int32)], chosen_ids=[np.array([9, 2], np.int32)],
                  rejected_ids=[np.array([10, 2], np.int32)], rows=np.array([0]), max_length=8,
                  max_prompt_length=4, pad_id=0)
    return TokenizedPairs(**{**fields, **changes})


def test_fingerprint_is_stable_and_tracks_data_and_length_settings(load, tokenizer):
    base = tiny_pairs()
    assert base.fingerprint() == "573772660479f497098622357189dbd2"  # stable across runs and machines
    assert tiny_pairs(pad_id=2).fingerprint() == base.fingerprint()
    changed = [tiny_pairs(chosen_ids=[np.array([9, 3], np.int32)]), tiny_pairs(rows=np.array([1])),
               tiny_pairs(prompt_ids=[np.array([1], np.int32)], chosen_ids=[np.array([5, 9, 2], np.int32)]),
               tiny_pairs(max_length=9), tiny_pairs(max_prompt_length=3)]
    assert len({base.fingerprint()} | {p.fingerprint() for p in changed}) == 1 + len(changed)

    rows = [{"prompt": text(*range(6)), "chosen": "w6 w7", "rejected": "w8"}]
    first, _ = tokenize_preferences(load(rows), tokenizer, max_length=16, max_prompt_length=8)
    again, _ = tokenize_preferences(load(rows, "copy.parquet"), tokenizer, max_length=16, max_prompt_length=8)
    shorter, _ = tokenize_preferences(load(rows), tokenizer, max_length=16, max_prompt_length=7)
    assert first.fingerprint() == again.fingerprint() != shorter.fingerprint()


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def random_pairs(n, seed=0, max_length=100):
    """``n`` pairs of random token ids and lengths within ``max_length``."""
    rng = np.random.default_rng(seed)
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        p = rng.integers(1, 40)
        prompts.append(rng.integers(3, 50, p).astype(np.int32))
        chosen.append(rng.integers(3, 50, rng.integers(1, max_length - p + 1)).astype(np.int32))
        rejected.append(rng.integers(3, 50, rng.integers(1, max_length - p + 1)).astype(np.int32))
    return TokenizedPairs(prompts, chosen, rejected, np.arange(n) * 3, max_length, 40, pad_id=0)


def test_batch_layout(load, tokenizer):
    dataset = load([{"prompt": "w1", "chosen": "w2 w3", "rejected": "w4"},
                    {"prompt": "w5 w6", "chosen": "w7", "rejected": "w8"}])
    pairs, _ = tokenize_preferences(dataset, tokenizer, max_length=16, max_prompt_length=8)
    batch = next(ordered_batches(pairs, 4, buckets=[4, 9, 16]))
    assert list(batch) == TOKEN_FIELDS[:6] + ["weight", "index"]
    prompt0, prompt1 = [BOS, USER, *w(1), END, ASSISTANT], [BOS, USER, *w(5, 6), END, ASSISTANT]
    # Longest pairs: 5 + 3 = 6 + 2 = 8 tokens -> bucket 9; chosen and rejected alike.
    assert batch["chosen_ids"].tolist() == [prompt0 + [*w(2, 3), EOS, PAD], prompt1 + [*w(7), EOS, PAD],
                                            [PAD] * 9, [PAD] * 9]
    assert batch["rejected_ids"].tolist() == [prompt0 + [*w(4), EOS, PAD, PAD], prompt1 + [*w(8), EOS, PAD],
                                              [PAD] * 9, [PAD] * 9]
    assert batch["chosen_attention"].tolist() == [[1] * 8 + [0], [1] * 8 + [0], [1] + [0] * 8, [1] + [0] * 8]
    assert batch["rejected_attention"].tolist() == [[1] * 7 + [0] * 2, [1] * 8 + [0], [1] + [0] * 8,
                                                    [1] + [0] * 8]
    assert batch["chosen_loss_mask"].tolist() == [[0] * 5 + [1] * 3 + [0], [0] * 6 + [1] * 2 + [0],
                                                  [0] * 9, [0] * 9]
    assert batch["rejected_loss_mask"].tolist() == [[0] * 5 + [1] * 2 + [0] * 2, [0] * 6 + [1] * 2 + [0],
                                                    [0] * 9, [0] * 9]
    assert batch["weight"].tolist() == [1, 1, 0, 0] and batch["weight"].dtype == np.float32
    assert batch["index"].tolist() == [0, 1, -1, -1]
    assert all(batch[k].dtype == np.int32 for k in TOKEN_FIELDS[:6] + ["index"])
    zeros = np.zeros(4, np.float32)
    PreferenceBatch(**{k: batch[k] for k in TOKEN_FIELDS}, ref_chosen_logps=zeros, ref_rejected_logps=zeros)


def test_buckets_bound_the_shapes():
    assert default_buckets(1024) == (64, 128, 256, 512, 1024)
    assert default_buckets(1000) == (64, 128, 256, 512, 1000)
    assert default_buckets(48) == (48,)
    pairs = random_pairs(200)
    lengths = pairs.pair_lengths()
    buckets = (16, 32, 64, 100)
    batcher = PairBatcher(pairs, 2, buckets=buckets, seed=1)
    shapes = set()
    for epoch in range(3):
        for batch in batcher.epoch(epoch):
            t = batch["chosen_ids"].shape[1]
            longest = lengths[batch["index"][batch["index"] >= 0]].max()
            assert t == min(b for b in buckets if b >= longest)
            assert batch["rejected_ids"].shape == batch["chosen_ids"].shape == (2, t)
            shapes.add(t)
    assert shapes <= set(buckets) and len(shapes) > 1
    with pytest.raises(ValueError, match=r"the largest must hold the longest pair \(\d+ tokens\)"):
        PairBatcher(pairs, 2, buckets=(16, 32))


def epoch_indices(batcher, epoch, start_step=0):
    return np.concatenate([b["index"] for b in batcher.epoch(epoch, start_step)])


def test_shuffle_is_deterministic_by_seed_and_epoch():
    pairs = random_pairs(50)
    a, b, other_seed = PairBatcher(pairs, 8, seed=3), PairBatcher(pairs, 8, seed=3), PairBatcher(pairs, 8, seed=4)
    orders = [epoch_indices(a, e) for e in range(3)]
    for e, order in enumerate(orders):
        assert sorted(order[order >= 0].tolist()) == list(range(50))  # each pair exactly once
        np.testing.assert_array_equal(epoch_indices(b, e), order)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert not np.array_equal(epoch_indices(other_seed, 0), orders[0])
    np.testing.assert_array_equal(epoch_indices(a, 0), orders[0])  # revisiting an epoch
    unshuffled = epoch_indices(PairBatcher(pairs, 8, shuffle=False), 5)
    assert unshuffled.tolist() == list(range(50)) + [-1] * 6


def test_resume_from_a_step_equals_the_uninterrupted_tail():
    pairs = random_pairs(45)
    full = list(PairBatcher(pairs, 4, seed=7).epoch(2))
    for k in (0, 5, len(full) - 1):
        resumed = list(PairBatcher(pairs, 4, seed=7).epoch(2, start_step=k))
        assert len(resumed) == len(full) - k
        for x, y in zip(resumed, full[k:]):
            assert x.keys() == y.keys() and all(np.array_equal(x[f], y[f]) for f in x)


def test_host_shards_concatenate_to_the_global_batch():
    pairs = random_pairs(37)
    whole = PairBatcher(pairs, 8, seed=2)
    hosts = [PairBatcher(pairs, 8, seed=2, process_index=p, process_count=4) for p in range(4)]
    assert all(h.local_batch_size == 2 for h in hosts)
    for step in range(whole.steps_per_epoch):
        expected = whole.batch(1, step)
        parts = [h.batch(1, step) for h in hosts]
        for field in expected:
            np.testing.assert_array_equal(np.concatenate([p[field] for p in parts]), expected[field])
    with pytest.raises(ValueError, match="multiple of process_count"):
        PairBatcher(pairs, 6, process_index=0, process_count=4)


def test_partial_last_batch_is_padded_with_weight_zero_rows():
    pairs = random_pairs(10)
    batcher = PairBatcher(pairs, 4, seed=0)
    batches = list(batcher.epoch(0))
    assert batcher.steps_per_epoch == len(batches) == 3
    last = batches[-1]
    assert last["weight"].tolist() == [1, 1, 0, 0] and last["index"][2:].tolist() == [-1, -1]
    for side in ("chosen", "rejected"):
        assert (last[f"{side}_ids"][2:] == pairs.pad_id).all() and not last[f"{side}_loss_mask"][2:].any()
        assert (last[f"{side}_attention"][2:].sum(axis=1) == 1).all()
    # Sequence content of each real row is its prompt + response.
    for batch in batches:
        for row, k in enumerate(batch["index"]):
            if k >= 0:
                seq = np.concatenate([pairs.prompt_ids[k], pairs.chosen_ids[k]])
                np.testing.assert_array_equal(batch["chosen_ids"][row, :len(seq)], seq)
                assert batch["chosen_loss_mask"][row].sum() == len(pairs.chosen_ids[k])
    with pytest.raises(IndexError):
        batcher.batch(0, 3)


def test_ordered_batches_visit_every_pair_in_order_on_every_host():
    pairs = random_pairs(11)
    local = [list(ordered_batches(pairs, 4, process_index=p, process_count=2)) for p in range(2)]
    indices = np.concatenate([np.concatenate([a["index"], b["index"]]) for a, b in zip(*local)])
    assert indices.tolist() == list(range(11)) + [-1]


# ----------------------------------------------------------------------------------------------
# Data shards (each host tokenizes only the shards it feeds)
# ----------------------------------------------------------------------------------------------


def simulated_hosts(num_hosts, work):
    """Runs ``work(process_index, allgather)`` on ``num_hosts`` threads that stand for hosts:
    ``allgather(obj)`` returns every thread's ``obj`` in host order, as a collective would."""
    import threading

    barrier = threading.Barrier(num_hosts)
    slots, results, errors = [None] * num_hosts, [None] * num_hosts, []

    def host(p):
        def allgather(obj):
            barrier.wait()
            slots[p] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        try:
            results[p] = work(p, allgather)
        except BaseException as err:  # reported below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=host, args=(p,)) for p in range(num_hosts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def shard_rows(n):
    """``n`` rows of varied lengths, every 5th one bad (identical responses)."""
    return [{"prompt": text(*range(k % 7 + 1)), "chosen": text(*range(10, 10 + k % 5 + 1)),
             "rejected": text(*range(10, 10 + k % 5 + 1)) if k % 5 == 3 else text(20 + k % 9)} for k in range(n)]


def tokenize_as_host(tmp_path, tokenizer, num_shards, process_index, process_count, allgather, limit=0):
    """One host's ``train.load_pairs``: tokenize the shards it feeds, then join."""
    from sgpo_jax.data import held_shards

    parts = {}
    for s in held_shards(process_index, process_count, num_shards):
        dataset = load_preferences(tmp_path / "prefs.jsonl", cache_dir=tmp_path / "cache", shard=(s, num_shards))
        parts[s], _ = tokenize_preferences(dataset, tokenizer, max_length=24, max_prompt_length=12,
                                           on_bad_row="skip", allow_empty=True)
    return TokenizedPairs.from_shards(parts, num_shards, allgather, limit=limit)


@pytest.mark.parametrize("num_shards, num_hosts, limit", [(3, 3, 0), (4, 2, 0), (2, 4, 0), (3, 3, 11)])
def test_hosts_tokenize_only_their_shards_and_together_hold_every_pair(tmp_path, tokenizer, num_shards, num_hosts,
                                                                       limit):
    rows = shard_rows(31)
    write(tmp_path / "prefs.jsonl", rows)
    whole, _ = tokenize_preferences(load_preferences(tmp_path / "prefs.jsonl", cache_dir=tmp_path / "cache"),
                                    tokenizer, max_length=24, max_prompt_length=12, on_bad_row="skip")
    usable = [r for r in range(31) if r % 5 != 3]  # the oracle: rows with distinct responses
    assert whole.rows.tolist() == usable
    kept = usable[:limit] if limit else usable
    by_row = {int(r): k for k, r in enumerate(whole.rows)}

    hosts = simulated_hosts(num_hosts, lambda p, gather: tokenize_as_host(tmp_path, tokenizer, num_shards, p,
                                                                          num_hosts, gather, limit))
    for p, pairs in enumerate(hosts):
        assert pairs.num_shards == num_shards and len(pairs) == len(kept)
        # Shard s holds the kept rows r with r % S == s, in row order; global order is shard-major.
        assert pairs.rows.tolist() == [r for s in range(num_shards) for r in kept if r % num_shards == s]
        assert pairs.shard_sizes == tuple(sum(r % num_shards == s for r in kept) for s in range(num_shards))
        first, last = p * num_shards // num_hosts, -(-(p + 1) * num_shards // num_hosts)
        assert pairs.held_shards == (first, last)
        begin, end = pairs.held_pairs
        assert len(pairs.prompt_ids) == end - begin < len(kept) or num_shards == 1
        lengths = whole.pair_lengths()
        np.testing.assert_array_equal(pairs.pair_lengths(), [lengths[by_row[r]] for r in pairs.rows])
        for k in range(begin, end):  # the held token ids are the whole tokenization's
            expected = (whole.prompt_ids[by_row[pairs.rows[k]]], whole.chosen_ids[by_row[pairs.rows[k]]],
                        whole.rejected_ids[by_row[pairs.rows[k]]])
            for got, want in zip(pairs.token_ids(k), expected):
                np.testing.assert_array_equal(got, want)
        with pytest.raises(IndexError, match="not held here"):
            pairs.token_ids(end % len(pairs) if end - begin < len(pairs) else -1)
        assert pairs.fingerprint() == hosts[0].fingerprint()
    # One host holding every shard sees the same pairs, and the same fingerprint.
    single = tokenize_as_host(tmp_path, tokenizer, num_shards, 0, 1, lambda x: [x], limit)
    assert single.held_shards == (0, num_shards) and single.fingerprint() == hosts[0].fingerprint()
    assert single.rows.tolist() == hosts[0].rows.tolist()
    assert single.fingerprint() != whole.fingerprint()  # the layout is part of the data order


def test_sharded_batches_do_not_depend_on_the_host_count(tmp_path, tokenizer):
    write(tmp_path / "prefs.jsonl", shard_rows(45))
    single = tokenize_as_host(tmp_path, tokenizer, 4, 0, 1, lambda x: [x])
    n, sizes = len(single), single.shard_sizes
    assert n == 36 and sizes == (10, 9, 9, 8)  # usable rows r (r % 5 != 3) with r % 4 == s
    batcher = PairBatcher(single, 8, seed=5)
    assert batcher.steps_per_epoch == 5  # ceil(10 / (8 / 4)); the shorter shards pad their last parts
    for epoch in range(2):
        batches = list(batcher.epoch(epoch))
        seen = np.concatenate([b["index"] for b in batches])
        assert sorted(seen[seen >= 0].tolist()) == list(range(n))  # every pair exactly once
        offsets = single.shard_offsets()
        for b in batches:  # rows [2s, 2s + 2) of a batch come from shard s
            for row, k in enumerate(b["index"]):
                assert k < 0 or offsets[row // 2] <= k < offsets[row // 2 + 1]
    for hosts in (2, 4):
        views = simulated_hosts(hosts, lambda p, gather: tokenize_as_host(tmp_path, tokenizer, 4, p, hosts, gather))
        batchers = [PairBatcher(v, 8, seed=5, process_index=p, process_count=hosts) for p, v in enumerate(views)]
        for epoch in range(2):
            for step in range(batcher.steps_per_epoch):
                expected = batcher.batch(epoch, step)
                parts = [b.batch(epoch, step) for b in batchers]  # each reads only its own shards
                for field in expected:
                    np.testing.assert_array_equal(np.concatenate([p[field] for p in parts]), expected[field])
    with pytest.raises(ValueError, match="multiple of process_count .* and of the number of data shards"):
        PairBatcher(single, 6)
    partial = simulated_hosts(2, lambda p, gather: tokenize_as_host(tmp_path, tokenizer, 4, p, 2, gather))[0]
    with pytest.raises(ValueError, match=r"feeds data shards \[2, 4\) of 4 but holds the token ids of \[0, 2\)"):
        PairBatcher(partial, 8, process_index=1, process_count=2)


def test_a_shard_with_fewer_pairs_pads_its_part():
    """Shard sizes 5 and 2 at 2 pairs per shard and batch: 3 steps, shard 1 padded from step 1."""
    pairs = random_pairs(7)
    sharded = TokenizedPairs(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids, pairs.rows, 100, 40, 0,
                             shard_sizes=(5, 2), shard_digests=("a", "b"))
    batches = list(PairBatcher(sharded, 4, shuffle=False).epoch(0))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 5, 6], [2, 3, -1, -1], [4, -1, -1, -1]]
    assert [b["weight"].tolist() for b in batches][-1] == [1, 0, 0, 0]


def test_bad_row_reports_of_shards_merge():
    from sgpo_jax.data import BadRow, BadRowReport

    a, b = BadRowReport("f", 10), BadRowReport("f", 12)
    for report, rows in ((a, (1, 7, 9)), (b, (0, 4))):
        for r in rows:
            report.add(BadRow(r, "rejected", loading.IDENTICAL))
    b.add(BadRow(6, "prompt", loading.EMPTY))
    merged = BadRowReport.merge([a, b])
    assert merged.total == 22 and merged.counts == {loading.IDENTICAL: 5, loading.EMPTY: 1}
    assert [bad.row for bad in merged.examples] == [0, 1, 4, 6, 7]
