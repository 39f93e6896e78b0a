"""The preference layouts TRL documents, in small files shaped exactly like the public data sets
(columns, types, the order of message keys), down to token ids: trl-lib/hh-rlhf-helpful-base
(conversational, implicit prompt), HuggingFaceH4/ultrafeedback_binarized and
argilla/ultrafeedback-binarized-preferences-cleaned (a string prompt repeated as the first turn
of chosen/rejected, scores), TRL's explicit conversational and standard layouts.

Offline and hermetic: files are written to tmp_path; the tokenizer is tests/tiny_run.py's
word-level one (template ``<role> content </s> `` per message, then ``<assistant> ``).
"""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from ml_collections import ConfigDict

from sgpo_jax.data import load_preferences, loading, tokenize_preferences
from sgpo_jax.data.pairs import load_pairs, reward_gaps
from sgpo_jax.errors import DataError

from tiny_run import BAD, GOOD, NEUTRAL, write_tokenizer

SPECIALS = ["<pad>", "<unk>", "</s>", "<user>", "<assistant>", "<system>"]  # tiny_run's vocabulary order
VOCAB = {token: i for i, token in enumerate(SPECIALS + GOOD + BAD + NEUTRAL)}
EOS, USER, ASSISTANT, SYSTEM = (VOCAB[t] for t in ("</s>", "<user>", "<assistant>", "<system>"))
LIMITS = dict(max_length=32, max_prompt_length=24)


def ids(text):
    return [VOCAB[word] for word in text.split()]


def msg(role, content):
    """A message as the Hub's parquet files store it (``content`` first)."""
    return {"content": content, "role": role}


def write(path, rows):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return transformers.AutoTokenizer.from_pretrained(write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


@pytest.fixture
def said(monkeypatch):
    """The console lines of the data layer."""
    lines = []
    monkeypatch.setattr(loading, "say", lines.append)
    return lines


def load_and_tokenize(path, tokenizer, **kwargs):
    dataset = load_preferences(path, cache_dir=path.parent / "cache", **kwargs)
    pairs, report = tokenize_preferences(dataset, tokenizer, source_name=str(path), **LIMITS)
    return dataset, pairs, report


def token_lists(pairs):
    return [[a.tolist() for a in arrays] for arrays in (pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)]


# The same three pairs in every layout: (prompt turns, chosen, rejected, score_chosen, score_rejected).
PAIRS = [
    ([("user", "word0 word1")], "good0 good1", "bad0", 8.5, 3.0),
    ([("user", "word2 word3 word4")], "good2", "bad1 bad2", 7.0, 6.5),
    ([("user", "word5")], "good3 good4 good5", "bad3", 9.0, 1.0),
]
EXPECTED_IDS = [
    [[USER, *ids(p[0][1]), EOS, ASSISTANT] for p, *_ in PAIRS],
    [[*ids(c), EOS] for _, c, *_ in PAIRS],
    [[*ids(r), EOS] for _, _, r, *_ in PAIRS],
]


def standard_rows():
    """TRL's standard layout, explicit prompt: strings."""
    return [{"prompt": p[0][1], "chosen": c, "rejected": r} for p, c, r, *_ in PAIRS]


def ultrafeedback_binarized_rows():
    """HuggingFaceH4/ultrafeedback_binarized (splits train_prefs/test_prefs): a string prompt, its
    id, chosen/rejected = [user message, assistant message], messages, scores."""
    rows = []
    for p, c, r, sc, sr in PAIRS:
        prompt = p[0][1]
        rows.append({"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                     "chosen": [msg("user", prompt), msg("assistant", c)],
                     "rejected": [msg("user", prompt), msg("assistant", r)],
                     "messages": [msg("user", prompt), msg("assistant", c)],
                     "score_chosen": sc, "score_rejected": sr})
    return rows


def argilla_rows():
    """argilla/ultrafeedback-binarized-preferences-cleaned: a string prompt, chosen/rejected =
    [user message, assistant message], ratings and models in hyphenated columns."""
    return [{"source": "evol_instruct", "prompt": p[0][1],
             "chosen": [msg("user", p[0][1]), msg("assistant", c)], "chosen-rating": sc, "chosen-model": "gpt-4",
             "rejected": [msg("user", p[0][1]), msg("assistant", r)], "rejected-rating": sr,
             "rejected-model": "llama-2-13b-chat"} for p, c, r, sc, sr in PAIRS]


def hh_rows():
    """trl-lib/hh-rlhf-helpful-base: chosen/rejected whole conversations, no prompt column."""
    return [{"chosen": [msg(role, text) for role, text in p] + [msg("assistant", c)],
             "rejected": [msg(role, text) for role, text in p] + [msg("assistant", r)]} for p, c, r, *_ in PAIRS]


def test_standard_layout_is_the_reference(tmp_path, tokenizer, said):
    path = write(tmp_path / "standard.jsonl", standard_rows())
    _, pairs, report = load_and_tokenize(path, tokenizer)
    assert token_lists(pairs) == EXPECTED_IDS and report.skipped == 0
    assert said == [f"data: {path}: standard, explicit prompt"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ultrafeedback_binarized_prompt_is_not_doubled_and_scores_are_rewards(tmp_path, tokenizer, said, suffix):
    path = write(tmp_path / f"train_prefs-00000-of-00001{suffix}", ultrafeedback_binarized_rows())
    dataset, pairs, _ = load_and_tokenize(path, tokenizer)
    # The repeated first turn is removed: the prompt appears once, the responses are the assistant text.
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in dataset] == [
        ([{"role": "user", "content": p[0][1]}], c, r) for p, c, r, *_ in PAIRS]
    assert token_lists(pairs) == EXPECTED_IDS
    assert all(list(p).count(USER) == 1 for p in pairs.prompt_ids)
    standard, _, _ = load_and_tokenize(write(tmp_path / "standard.jsonl", standard_rows()), tokenizer)
    assert pairs.fingerprint() == tokenize_preferences(standard, tokenizer, **LIMITS)[0].fingerprint()
    assert said[0] == (f"data: {path}: conversational, explicit prompt (a string), repeated at the start of "
                       "chosen/rejected (removed there); rewards from score_chosen/score_rejected "
                       "(as chosen_reward/rejected_reward)")
    gaps = reward_gaps([str(path)], "train", pairs.rows)
    np.testing.assert_allclose(gaps, [sc - sr for *_, sc, sr in PAIRS])
    np.testing.assert_allclose(reward_gaps([str(path)], "train", np.array([2, 0])), [8.0, 5.5])


def test_argilla_cleaned_and_configurable_score_columns(tmp_path, tokenizer, said):
    path = write(tmp_path / "argilla.parquet", argilla_rows())
    _, pairs, _ = load_and_tokenize(path, tokenizer)
    assert token_lists(pairs) == EXPECTED_IDS
    assert said == [f"data: {path}: conversational, explicit prompt (a string), repeated at the start of "
                    "chosen/rejected (removed there)"]
    assert np.isnan(reward_gaps([str(path)], "train", pairs.rows)).all()  # ratings are not rewards by default
    columns = ("chosen-rating", "rejected-rating")
    np.testing.assert_allclose(reward_gaps([str(path)], "train", pairs.rows, columns),
                               [sc - sr for *_, sc, sr in PAIRS])
    load_preferences(path, cache_dir=tmp_path / "cache", score_columns=columns)
    assert said[-1].endswith("; rewards from chosen-rating/rejected-rating (as chosen_reward/rejected_reward)")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_hh_rlhf_implicit_prompt_is_the_common_prefix(tmp_path, tokenizer, said, suffix):
    system = [("system", "word9"), ("user", "word6"), ("assistant", "word7"), ("user", "word8")]
    rows = hh_rows() + [{  # a multi-turn conversation: every shared leading message is the prompt
        "chosen": [msg(role, text) for role, text in system] + [msg("assistant", "good6")],
        "rejected": [msg(role, text) for role, text in system] + [msg("assistant", "bad6 bad7")]}]
    path = write(tmp_path / f"hh{suffix}", rows)
    dataset, pairs, report = load_and_tokenize(path, tokenizer)
    assert said == [f"data: {path}: conversational, implicit prompt"]
    assert dataset[3]["prompt"] == [{"role": role, "content": text} for role, text in system]
    assert (dataset[3]["chosen"], dataset[3]["rejected"]) == ("good6", "bad6 bad7")
    prompts, chosen, rejected = token_lists(pairs)
    assert [prompts[:3], chosen[:3], rejected[:3]] == EXPECTED_IDS
    assert prompts[3] == [SYSTEM, *ids("word9"), EOS, USER, *ids("word6"), EOS, ASSISTANT, *ids("word7"), EOS,
                          USER, *ids("word8"), EOS, ASSISTANT]
    assert chosen[3] == [*ids("good6"), EOS] and rejected[3] == [*ids("bad6 bad7"), EOS]
    assert report.skipped == 0 and np.isnan(reward_gaps([str(path)], "train", pairs.rows)).all()


def test_implicit_prompt_bad_rows(tmp_path, tokenizer):
    good = hh_rows()[0]
    user, chosen, rejected = good["chosen"][0], good["chosen"][1], good["rejected"][1]
    cases = [  # (row, field, problem)
        ({"chosen": [msg("user", "word1"), chosen], "rejected": [msg("user", "word2"), rejected]},
         "prompt", loading.NO_COMMON_PROMPT),
        ({"chosen": [user, chosen], "rejected": [user, chosen]}, "rejected", loading.IDENTICAL),
        ({"chosen": [user, chosen, chosen], "rejected": [user, rejected]}, "chosen", loading.NOT_ONE_ASSISTANT),
        ({"chosen": [user], "rejected": [user, rejected]}, "chosen", loading.NOT_ONE_ASSISTANT),
        ({"chosen": [user, chosen], "rejected": None}, "rejected", loading.MISSING),
        ({"chosen": [msg("user", " "), chosen], "rejected": [msg("user", ""), rejected]}, "prompt", loading.EMPTY),
        ({"chosen": [user, msg("assistant", " ")], "rejected": [user, rejected]}, "chosen", loading.EMPTY),
        ({"chosen": [user, chosen], "rejected": [user, msg("assistant", "good0 good1 ")]},
         "rejected", loading.IDENTICAL),
    ]
    path = write(tmp_path / "hh.jsonl", [good] + [row for row, _, _ in cases])
    dataset = load_preferences(path, cache_dir=tmp_path / "cache")
    assert [(r["bad_field"], r["bad_reason"]) for r in dataset] == [(None, None)] + [(f, p) for _, f, p in cases]
    with pytest.raises(DataError) as err:
        tokenize_preferences(dataset, tokenizer, source_name=str(path), **LIMITS)
    assert str(err.value) == (f"{path}: bad row 1, field 'prompt': chosen and rejected share no leading message "
                              "(no prompt). Fix the data, or pass on_bad_row='skip' to drop such rows (they are "
                              "counted and reported)")
    assert err.value.hint == "or set --config.data.on_bad_row=skip to drop such rows"
    pairs, report = tokenize_preferences(dataset, tokenizer, source_name=str(path), on_bad_row="skip", **LIMITS)
    assert pairs.rows.tolist() == [0] and report.counts[loading.NO_COMMON_PROMPT] == 1
    assert str(report.examples[0]) == "row 1, field 'prompt': chosen and rejected share no leading message (no prompt)"


def test_implicit_prompt_needs_conversations(tmp_path):
    path = write(tmp_path / "implicit.jsonl", [{"chosen": "good0", "rejected": "bad0"}])
    with pytest.raises(DataError) as err:
        load_preferences(path, cache_dir=tmp_path / "cache")
    assert str(err.value) == (
        f"{path}: column 'prompt' not found (columns found: ['chosen', 'rejected']) and 'chosen' holds a string, "
        f"not a conversation, so no prompt can be taken from it; {loading.EXPECTED}; set prompt_column "
        "(--config.data.prompt_column=...) to the column that holds the prompt")


def test_explicit_conversational_layout_and_one_report_per_source(tmp_path, tokenizer, said):
    rows = [{"prompt": [msg(role, text) for role, text in p], "chosen": [msg("assistant", c)],
             "rejected": [msg("assistant", r)]} for p, c, r, *_ in PAIRS]
    path = write(tmp_path / "conversational.jsonl", rows)
    _, pairs, _ = load_and_tokenize(path, tokenizer)
    load_preferences(path, cache_dir=tmp_path / "cache", shard=(1, 2))  # a second load: no second line
    assert token_lists(pairs) == EXPECTED_IDS
    assert said == [f"data: {path}: conversational, explicit prompt"]


def data_config(source, **changes):
    d = ConfigDict(dict(source=str(source), split="train", prompt_column="prompt", chosen_column="chosen",
                        rejected_column="rejected", buckets=(), on_bad_row="error", limit=0, shards=0, **LIMITS))
    d.update(changes)
    return d


def test_load_pairs_carries_scores_as_rewards(tmp_path, tokenizer):
    path = write(tmp_path / "train_prefs.parquet", ultrafeedback_binarized_rows())
    pairs, gaps = load_pairs(data_config(path), tokenizer)
    assert token_lists(pairs) == EXPECTED_IDS
    np.testing.assert_allclose(gaps, [sc - sr for *_, sc, sr in PAIRS])
    argilla = write(tmp_path / "argilla.jsonl", argilla_rows())
    assert np.isnan(load_pairs(data_config(argilla), tokenizer)[1]).all()
    d = data_config(argilla, score_columns=("chosen-rating", "rejected-rating"))  # a data.score_columns setting
    np.testing.assert_allclose(load_pairs(d, tokenizer)[1], [sc - sr for *_, sc, sr in PAIRS])
    # Self-annotated columns come first.
    annotated = [dict(row, chosen_reward=1.0, rejected_reward=0.25) for row in ultrafeedback_binarized_rows()]
    np.testing.assert_allclose(load_pairs(data_config(write(tmp_path / "annotated.jsonl", annotated)),
                                          tokenizer)[1], [0.75] * 3)
