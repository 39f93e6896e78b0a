"""Verifiable instructions: every checker against hand-written positive and negative responses,
JSON round trips, the task sampler, and the bundled assets (seed pairs re-checked from their JSON
constraints, disjoint splits, byte-identical regeneration, loading with ``load_preferences``)."""

import json
import random

import pytest

from sgpo_jax.data import NORMALIZED_FEATURES, load_preferences
from sgpo_jax.ssapo import instructions as vi
from sgpo_jax.ssapo.instructions import (
    AvoidWord,
    BulletPoints,
    EndWith,
    IncludeKeywords,
    JsonFormat,
    Lowercase,
    MaxSentences,
    MaxWords,
    MinWords,
    NoCommas,
    Postscript,
    StartWith,
    Title,
    Uppercase,
    VerifiableTask,
    WrapInQuotes,
)

GENERATED = (vi.SEED_PREFERENCES, vi.PROMPT_POOL, vi.HELDOUT)

CASES = [
    # (constraint, response, expected)
    (MaxWords(5), "one two three four five", True),
    (MaxWords(5), "one two three four five six", False),
    (MaxWords(5), "Don't: well-known, a b c.", True),               # contractions and hyphenations are one word
    (MaxWords(5), "* one\n* two -- three!!!\n\n  four, five", True),  # markup and punctuation are not words
    (MaxWords(5), "", False),                                        # blank fails every constraint
    (MaxWords(5), " \n\t ", False),
    (MinWords(3), "a b c", True),
    (MinWords(3), "  a\n\n b  ", False),
    (MinWords(3), "<< >> * ** a", False),
    (IncludeKeywords(("rest", "joy")), "Rest brings JOY.", True),
    (IncludeKeywords(("rest", "joy")), "rest,joy", True),
    (IncludeKeywords(("rest", "joy")), "A restful joy.", False),      # "rest" only inside a longer word
    (IncludeKeywords(("rest", "joy")), "Rest well.", False),
    (IncludeKeywords(("rest",)), "line one\nthen REST", True),
    (AvoidWord("very"), "Every day is fine.", True),
    (AvoidWord("very"), "veryfine", True),
    (AvoidWord("very"), "It is Very nice.", False),
    (AvoidWord("very"), "Nice.\n(very)", False),
    (AvoidWord("very"), "", False),
    (AvoidWord("very"), "\n\n", False),
    (Lowercase(), "hello, world! 123", True),
    (Lowercase(), "multi\nline text.", True),
    (Lowercase(), "Hello", False),
    (Lowercase(), "hello\nWorld", False),
    (Lowercase(), "123 !!", False),                                  # no letters at all
    (Lowercase(), "", False),
    (Uppercase(), "HELLO WORLD 2!", True),
    (Uppercase(), "P.S. OK\nDONE", True),
    (Uppercase(), "HELLO World", False),
    (Uppercase(), "123", False),
    (EndWith("Thanks for reading."), "A story.\nThanks for reading.  \n", True),
    (EndWith("Thanks for reading."), "Thanks for reading.", True),
    (EndWith("Thanks for reading."), "A story. thanks for reading.", False),   # case-sensitive
    (EndWith("Thanks for reading."), "Thanks for reading. Bye.", False),
    (EndWith("Thanks for reading."), "A story. Thanks for reading", False),
    (EndWith("hanks"), "Many hanks", True),
    (EndWith("hanks"), "Many thanks", False),                        # the phrase must not complete a word
    (StartWith("Sure!"), "  \nSure! Here it is.", True),
    (StartWith("Sure!"), "sure! here it is.", False),
    (StartWith("Sure!"), "Well, Sure!", False),
    (StartWith("Sure"), "Sure, fine.", True),
    (StartWith("Sure"), "Sure", True),
    (StartWith("Sure"), "Surely not.", False),                       # the phrase must not start a longer word
    (BulletPoints(3), "* a\n* b\n* c", True),
    (BulletPoints(3), "Intro:\n  * a\n\t* b\n*   c\nOutro.", True),
    (BulletPoints(3), "*\n* a\n* b\n* c", True),                     # a lone star is not a bullet
    (BulletPoints(3), "* a\n* b", False),
    (BulletPoints(3), "* a\n* b\n* c\n* d", False),
    (BulletPoints(3), "- a\n- b\n- c", False),                       # only "* " bullets count
    (BulletPoints(3), "**bold**\n* a\n* b", False),
    (BulletPoints(3), "* a * b * c", False),
    (WrapInQuotes(), '"hello"', True),
    (WrapInQuotes(), '  "multi\nline"\n', True),
    (WrapInQuotes(), '"', False),
    (WrapInQuotes(), "hello", False),
    (WrapInQuotes(), '"open only', False),
    (WrapInQuotes(), "\u201ccurly\u201d", False),
    (NoCommas(), "No commas here.\nNone at all!", True),
    (NoCommas(), "one, two", False),
    (NoCommas(), "1,000", False),
    (NoCommas(), "", False),
    (NoCommas(), "   ", False),
    (Title(), "<<My Title>>\n\nSome text.", True),
    (Title(), "text <<a>> text", True),
    (Title(), "<< >>", False),
    (Title(), "<<broken\ntitle>>", False),
    (Title(), "<My Title>", False),
    (Title(), "No title.", False),
    (MaxSentences(2), "One. Two.", True),
    (MaxSentences(2), "Pi is 3.14 today. Yes!", True),               # a decimal point ends nothing
    (MaxSentences(2), 'He said "hi." Then left.', True),
    (MaxSentences(2), "Line one\nLine two", True),
    (MaxSentences(2), "One. Two. Three.", False),
    (MaxSentences(2), "Wait... what? Really!", False),
    (MaxSentences(2), "Line one\nline two\nline three", True),       # a line break ends no sentence
    (MaxSentences(2), "<<Title>>\n\nOne. Two.", True),              # the title runs into sentence one
    (MaxSentences(2), "* Tea.\n* Bread.\n* Milk.", False),
    (MaxSentences(2), "Option a. Option b. Option C. Done", False),  # only capitals are initials
    (MaxSentences(2), "Dr. Smith met J. Doe, e.g. at noon. Bye.", True),  # abbreviations, initials
    (MaxSentences(2), "", False),
    (MaxSentences(2), " \n ", False),
    (JsonFormat(), '{"a": 1}', True),
    (JsonFormat(), "  [1, 2]\n", True),
    (JsonFormat(), '```json\n{"a": 1}\n```', True),
    (JsonFormat(), "```\n[1]\n```", True),
    (JsonFormat(), '"just a string"', False),
    (JsonFormat(), "42", False),
    (JsonFormat(), "{'a': 1}", False),
    (JsonFormat(), '{"a": 1} and more', False),
    (JsonFormat(), "", False),
    (Postscript(), "Body.\n\nP.S. See you soon.", True),
    (Postscript(), "Body.\n  P.S. indented", True),
    (Postscript(), "Body.\nP.S.\nOn the next line.", True),
    (Postscript(), "Body. P.S. not on its own line", False),
    (Postscript(), "Body.\np.s. lower case", False),
    (Postscript(), "Body.\nPS: no dots", False),
    (Postscript(), "Body.\nP.S.", False),                            # no text after it
]


@pytest.mark.parametrize("constraint,response,expected", CASES,
                         ids=[f"{c.kind}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_checker(constraint, response, expected):
    assert constraint.check(response) is expected


def test_every_kind_has_positive_and_negative_cases():
    assert {c.kind for c, _, e in CASES if e} == set(vi.CONSTRAINTS) == {c.kind for c, _, e in CASES if not e}
    assert len(vi.CONSTRAINTS) == 15


@pytest.mark.parametrize("text,words,sentences", [
    ("", 0, 0),
    ("Hello world", 2, 1),
    ("Hi. Bye.", 2, 2),
    ("3.5 is a number.", 5, 1),
    ("Wait... what?", 2, 2),
    ("* a\n* b\n\n*", 2, 1),                   # line breaks are whitespace
    ('"Quoted." Next one!', 3, 2),
    ("e.g. this", 3, 1),                       # an abbreviation ends nothing
    ("Dr. Smith came. He sat.", 5, 2),
    ("J. R. R. Tolkien wrote it.", 6, 1),      # initials
    ("Visit example.com today. Now!", 5, 2),
    ("Title line\n\nFirst one. Second one", 6, 2),
    ("Hello!!! World?! (Yes.) Done", 4, 4),
    ("  \n\t", 0, 0),
    ("don't re-use it", 3, 1),
])
def test_counts(text, words, sentences):
    assert vi.count_words(text) == words
    assert vi.count_sentences(text) == sentences


def test_split_sentences_by_hand():
    assert vi.split_sentences("") == []
    assert vi.split_sentences("<<Notes>>\n\nRain fell. Was it cold? \"Yes!\" he said.\n* tea\n* bread") == [
        "<<Notes>>\n\nRain fell.", "Was it cold?", '"Yes!"', "he said.", "* tea\n* bread"]
    assert vi.split_sentences("Pi is 3.14. Mr. Lee, e.g. (Dr. Ray) agreed...  \n*\n") == [
        "Pi is 3.14.", "Mr. Lee, e.g. (Dr. Ray) agreed..."]  # the lone "*" is no sentence


def test_blank_response_fails_every_constraint():
    """IFEval scores a blank response as failing every instruction; so do the checkers."""
    examples = {}
    for constraint, _, _ in CASES:
        examples.setdefault(constraint.kind, constraint)
    assert set(examples) == set(vi.CONSTRAINTS)
    for constraint in examples.values():
        for blank in ("", " ", "\n\n", " \t\r\n"):
            assert constraint.check(blank) is False, (constraint, blank)
    task = VerifiableTask("Say something.", (MaxWords(5), NoCommas()))
    assert task.score("") == 0.0 and not task.passed("  ")


def test_renderings():
    assert MaxWords(30).render() == "Answer with at most 30 words."
    assert IncludeKeywords(("joy",)).render() == 'Include the keyword "joy" in the response.'
    assert IncludeKeywords(("a", "b", "c")).render() == 'Include the keywords "a", "b" and "c" in the response.'
    assert '"Hope this helps!"' in EndWith("Hope this helps!").render()
    for cls in vi.CONSTRAINTS.values():
        text = cls.sample(random.Random(0)).render()
        assert text[0].isupper() and text[-1] in '."' and "\n" not in text


def test_task_prompt_score_and_passed():
    task = VerifiableTask("Describe a rainy day.", (MaxWords(5), NoCommas()))
    assert task.prompt == ("Describe a rainy day. Answer with at most 5 words. "
                           "In your entire response, refrain from the use of any commas.")
    assert task.results("Gray, wet and calm.") == (True, False)
    assert task.score("Gray, wet and calm.") == 0.5 and not task.passed("Gray, wet and calm.")
    assert task.score("Gray and calm.") == 1.0 and task.passed("Gray and calm.")
    assert task.score("Gray, wet, windy, cold and calm.") == 0.0


def test_json_round_trip():
    rng = random.Random(1)
    for cls in vi.CONSTRAINTS.values():
        constraint = cls.sample(rng)
        row = json.loads(json.dumps(constraint.to_json()))
        assert row["type"] == cls.kind
        assert vi.constraint_from_json(row) == constraint
    task = VerifiableTask("Describe a rainy day.", (IncludeKeywords(("joy", "rest")), EndWith("Thanks for reading.")))
    row = json.loads(json.dumps(task.to_json()))
    assert row["constraints"][0] == {"type": "include_keywords", "keywords": ["joy", "rest"]}
    assert VerifiableTask.from_json(row) == task
    assert VerifiableTask.from_json({**row, "chosen": "x", "rejected": "y"}) == task   # extra keys ignored
    assert VerifiableTask.from_json({k: v for k, v in row.items() if k != "prompt"}) == task


@pytest.mark.parametrize("make", [
    lambda: vi.constraint_from_json({"type": "shout"}),
    lambda: vi.constraint_from_json({"type": "max_words"}),
    lambda: vi.constraint_from_json({"type": "max_words", "n": 3, "m": 4}),
    lambda: MaxWords(0),
    lambda: MaxWords(True),
    lambda: BulletPoints(2.0),
    lambda: IncludeKeywords(()),
    lambda: EndWith(" padded"),
    lambda: AvoidWord(""),
    lambda: VerifiableTask("Describe a rainy day.", ()),
    lambda: VerifiableTask.from_json({"instruction": "Describe a rainy day.", "prompt": "Something else.",
                                      "constraints": [{"type": "no_commas"}]}),
])
def test_invalid_input_raises(make):
    with pytest.raises(ValueError):
        make()


def test_compatible():
    assert vi.compatible(MaxWords(10), NoCommas())
    assert not vi.compatible(MaxWords(10), MaxWords(20))                   # one per kind
    assert not vi.compatible(MaxWords(10), MinWords(5))
    assert not vi.compatible(EndWith("Thanks for reading."), Lowercase())
    assert not vi.compatible(Lowercase(), EndWith("Thanks for reading."))  # symmetric
    assert not vi.compatible(AvoidWord("joy"), IncludeKeywords(("joy",)))
    assert not vi.compatible(StartWith("Just so!"), AvoidWord("just"))
    assert vi.compatible(AvoidWord("very"), IncludeKeywords(("every",)))


def test_vocabulary_never_contains_an_avoided_word():
    texts = (vi.KEYWORDS + vi.START_PHRASES + vi.END_PHRASES + vi.POSTSCRIPTS + vi.KEYWORD_SENTENCES
             + (vi.JSON_KEY,) + tuple(v for k, v in vi.AVOID_WORDS.items()))
    for word, sentence in vi.AVOID_WORDS.items():
        assert vi._has_word(sentence, word)
        assert [t for t in texts if vi._has_word(t, word) and t != sentence] == []


def test_make_tasks():
    tasks = vi.make_tasks(300, seed=3)
    assert tasks == vi.make_tasks(300, seed=3)
    assert tasks != vi.make_tasks(300, seed=4)
    assert len({t.prompt for t in tasks}) == 300
    assert {len(t.constraints) for t in tasks} == {1, 2}
    assert {t.instruction for t in tasks} <= set(vi.base_instructions())
    for task in tasks:
        cs = task.constraints
        assert all(vi.compatible(a, b) for i, a in enumerate(cs) for b in cs[i + 1:])
    triples = vi.make_tasks(50, seed=0, constraints_per_task=3, instructions=["Say hi.", "Say bye."])
    assert {len(t.constraints) for t in triples} == {3} and {t.instruction for t in triples} == {"Say hi.", "Say bye."}
    with pytest.raises(ValueError):
        vi.make_tasks(5, seed=0, constraints_per_task=(0, 2))
    with pytest.raises(ValueError):
        vi.make_tasks(5, seed=0, constraints_per_task=4)
    with pytest.raises(ValueError, match="distinct"):
        vi.make_tasks(1000, seed=0, constraints_per_task=1, instructions=["Say hi."])  # ~450 exist


@pytest.fixture(scope="module")
def rows():
    def read(name):
        with open(vi.ASSETS_DIR / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    return {name: read(name) for name in GENERATED}


def test_base_instructions_and_answers():
    instructions = vi.base_instructions()
    assert 280 <= len(instructions) <= 320 and len(set(instructions)) == len(instructions)
    assert all(i[-1] in ".?" and "\n" not in i and len(i.split()) <= 14 for i in instructions)
    answers = vi._seed_answers(vi.ASSETS_DIR / vi.SEED_ANSWERS)
    assert len(answers) == 40 and set(answers) <= set(instructions)


def test_seed_pairs_checked_from_their_json(rows):
    seed = rows[vi.SEED_PREFERENCES]
    assert len(seed) == vi.SEED_PAIRS == 200
    assert len({r["prompt"] for r in seed}) == len(seed)
    for row in seed:
        assert set(row) == {"prompt", "chosen", "rejected", "instruction", "constraints"}
        constraints = [vi.constraint_from_json(c) for c in row["constraints"]]
        assert 1 <= len(constraints) <= 2
        assert row["prompt"] == " ".join([row["instruction"]] + [c.render() for c in constraints])
        assert all(c.check(row["chosen"]) for c in constraints), row
        assert sum(not c.check(row["rejected"]) for c in constraints) == 1, row  # fails exactly one
        assert row["chosen"].strip() != row["rejected"].strip()


def test_splits_disjoint_by_instruction(rows):
    pool, heldout = rows[vi.PROMPT_POOL], rows[vi.HELDOUT]
    assert (len(pool), len(heldout)) == (600, 100)
    by_split = {name: {r["instruction"] for r in split} for name, split in rows.items()}
    seed, pool_set, held = by_split[vi.SEED_PREFERENCES], by_split[vi.PROMPT_POOL], by_split[vi.HELDOUT]
    assert not (seed & pool_set) and not (seed & held) and not (pool_set & held)
    assert len(held) == vi.HELDOUT_INSTRUCTIONS
    assert seed | pool_set | held == set(vi.base_instructions())
    for name in GENERATED:
        tasks = vi.load_tasks(vi.ASSETS_DIR / name)           # rebuilds every task and checks its prompt
        assert len({t.prompt for t in tasks}) == len(tasks) == len(rows[name])
        kinds = [c.kind for t in tasks for c in t.constraints]
        assert set(kinds) == set(vi.CONSTRAINTS)


def test_assets_regenerate_identically(tmp_path):
    assert vi.build_assets(tmp_path, seed=0)["prompt_pool.jsonl"] == 600
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (vi.ASSETS_DIR / name).read_bytes(), name


def test_seed_file_loads_as_preferences(tmp_path, rows):
    dataset = load_preferences(vi.ASSETS_DIR / vi.SEED_PREFERENCES, cache_dir=tmp_path / "cache")
    assert dataset.features == NORMALIZED_FEATURES                 # instruction/constraints are dropped
    assert len(dataset) == 200 and set(dataset["bad_reason"]) == {None}
    first = dataset[0], rows[vi.SEED_PREFERENCES][0]
    assert first[0]["prompt"] == [{"role": "user", "content": first[1]["prompt"]}]
    assert (first[0]["chosen"], first[0]["rejected"]) == (first[1]["chosen"], first[1]["rejected"])
