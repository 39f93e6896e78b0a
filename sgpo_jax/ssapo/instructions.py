"""Verifiable instructions: IFEval-style constraints with programmatic checkers.

Offline there are no human preference labels, so seed labels and the evaluation metric come from
checkers, never from the policy's own judgment. A :class:`VerifiableTask` is an everyday base
instruction plus one or more constraints; its prompt is the instruction followed by the
constraints' natural-language renderings, and ``task.score(response)`` is the fraction of
constraints a response meets (``task.passed(response)``: all of them)::

    task = VerifiableTask("Describe a foggy morning.", (MaxWords(30), NoCommas()))
    task.prompt         # "Describe a foggy morning. Answer with at most 30 words. In your entire
                        #  response, refrain from the use of any commas."
    task.score(text)    # in [0, 1]
    tasks = make_tasks(100, seed=0)   # 1-2 compatible constraints each, bundled instructions
    row = task.to_json(); VerifiableTask.from_json(row) == task

Constraint types (``type`` is the JSON tag; matching rules are exact and documented per class):

================  ========================================================================
type              met when the response ...
================  ========================================================================
max_words         has at most ``n`` words (:func:`count_words`)
min_words         has at least ``n`` words
include_keywords  contains every keyword as a whole word, case-insensitively
avoid_word        does not contain ``word`` as a whole word, case-insensitively
lowercase         has letters and none of them is upper case (``str.islower``)
uppercase         has letters and none of them is lower case (``str.isupper``)
end_with          ends with ``phrase`` exactly (case-sensitive; trailing whitespace ignored)
start_with        starts with ``phrase`` exactly (case-sensitive; leading whitespace ignored)
bullet_points     has exactly ``n`` lines that start with ``"* "`` (after optional indentation)
wrap_in_quotes    starts and ends with ``"`` (surrounding whitespace ignored)
no_commas         contains no ``,``
title             contains a one-line title in double angular brackets, ``<<like this>>``
max_sentences     has at most ``n`` sentences (:func:`split_sentences`: ``.``/``!``/``?`` boundaries)
json_format       parses as a JSON object or array (a ```` ```json ```` fence is allowed)
postscript        has a line starting with ``P.S.`` followed by some text
================  ========================================================================

An empty or whitespace-only response fails every constraint (as in IFEval's evaluation).

Differences from IFEval's checkers (Zhou et al. 2023, ``instruction_following_eval``; the metric
here is strict only, IFEval also reports a "loose" variant that retries with the first or last
line or the ``*`` markup removed):

================  ====================================  ============================================================
type              IFEval counterpart                    difference
================  ====================================  ============================================================
max_words         ``length_constraints:number_words``,  IFEval: strictly less than ``n``; words are runs of word
                  relation "less than"                  characters (``don't`` is 2 words). Here: at most ``n``;
                                                        ``don't`` and ``well-known`` are one word each
min_words         ``length_constraints:number_words``,  same relation (at least ``n``); words as above
                  relation "at least"
include_keywords  ``keywords:existence``                IFEval: case-insensitive *substring* search (the keyword
                                                        as a regex: ``rest`` matches ``restful``). Here: whole words
avoid_word        ``keywords:forbidden_words``          equivalent (whole word, case-insensitive); IFEval takes a
                                                        list of words
lowercase         ``change_case:english_lowercase``     IFEval also requires langdetect to say English; no language
                                                        check here
uppercase         ``change_case:english_capital``       as lowercase
end_with          ``startend:end_checker``              IFEval: case-insensitive, and the phrase may complete a
                                                        longer word. Here: case-sensitive, whole words
start_with        none                                  IFEval has no "start with this phrase" checker
bullet_points     ``detectable_format:``                IFEval counts ``*`` and ``-`` bullets. Here: only ``* text``
                  ``number_bullet_lists``
wrap_in_quotes    ``startend:quotation``                equivalent
no_commas         ``punctuation:no_comma``              equivalent
title             ``detectable_format:title``           IFEval allows ``<`` and ``>`` inside the brackets; here not
max_sentences     ``length_constraints:``               IFEval: strictly less than ``n``, counted by nltk's punkt
                  ``number_sentences``,                 model (learned abbreviations; initials and ellipses decided
                  relation "less than"                  from context). Here: at most ``n``, :func:`split_sentences`
                                                        (fixed abbreviation list, capital initials). Both treat line
                                                        breaks as plain whitespace
json_format       ``detectable_format:json_format``     IFEval accepts any JSON value (a bare string or number too)
                                                        after stripping code fences. Here: only an object or array
postscript        ``detectable_content:postscript``     IFEval: case-insensitive, ``P. S.`` allowed, no text needed
                                                        after the marker. Here: ``P.S.`` at a line start, then text
================  ====================================  ============================================================

Bundled data (``sgpo_jax/assets``, see its README): ``base_instructions.txt`` (hand-written
everyday requests) and ``seed_answers.jsonl`` (hand-written answers to 40 of them) are the
sources; :func:`build_assets` turns them, deterministically, into ``seed_preferences.jsonl``
(checker-labelled preference pairs), ``prompt_pool.jsonl`` (tasks for self-annotation rounds)
and ``heldout.jsonl`` (evaluation tasks), three splits with disjoint base instructions.
Regenerate with ``python -m sgpo_jax.ssapo.instructions``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar, Union

from sgpo_jax.console import say
from sgpo_jax.training.workdir import write_file

__all__ = [
    "ASSETS_DIR", "AvoidWord", "BulletPoints", "CONSTRAINTS", "Constraint", "EndWith", "HELDOUT", "IncludeKeywords",
    "JsonFormat", "Lowercase", "MaxSentences", "MaxWords", "MinWords", "NoCommas", "PROMPT_POOL", "Postscript",
    "SEED_PREFERENCES", "StartWith", "Title", "Uppercase", "VerifiableTask", "WrapInQuotes", "base_instructions",
    "build_assets", "compatible", "constraint_from_json", "count_sentences", "count_words", "load_tasks", "make_tasks",
    "split_sentences", "ABBREVIATIONS",
]

ASSETS_DIR = Path(__file__).parent.parent / "assets"
BASE_INSTRUCTIONS = "base_instructions.txt"
SEED_ANSWERS = "seed_answers.jsonl"
SEED_PREFERENCES = "seed_preferences.jsonl"
PROMPT_POOL = "prompt_pool.jsonl"
HELDOUT = "heldout.jsonl"

# Sizes of the generated splits (build_assets).
SEED_PAIRS = 200
POOL_TASKS = 600
HELDOUT_TASKS = 100
HELDOUT_INSTRUCTIONS = 50

# Vocabulary the task sampler draws parameters from. No avoided word occurs in any keyword,
# phrase or response template below (tested), so every sampled combination is satisfiable.
KEYWORDS = ("balance", "calm", "care", "comfort", "curiosity", "effort", "energy", "freedom", "friendship", "habit",
            "health", "joy", "kindness", "nature", "patience", "planning", "practice", "rest", "routine", "time")
AVOID_WORDS = {  # word -> a natural sentence that uses it (how seed rejections break the constraint)
    "always": "I always enjoy it.",
    "good": "That is a good place to begin.",
    "great": "It can be a great experience.",
    "just": "Just give it a try.",
    "lot": "It helps a lot.",
    "maybe": "Maybe try it this week.",
    "nice": "It is a nice way to spend an afternoon.",
    "really": "It really makes a difference.",
    "stuff": "There is plenty of fun stuff to discover.",
    "thing": "The best thing is to start small.",
    "very": "It is very easy to get started.",
}
START_PHRASES = ("Happy to help!", "Here is my answer:", "Here you go:", "Of course!", "Sure!")
END_PHRASES = ("Hope this helps!", "Is there anything else I can help with?",
               "Let me know if you have other questions.", "Thanks for reading.", "That is all for now.")
POSTSCRIPTS = ("P.S. I hope you enjoy trying this out!", "P.S. Let me know how it goes.", "P.S. Thank you for asking!")
KEYWORD_SENTENCES = ("It helps to keep {} in mind.", "In the end it comes down to {}.", "Remember to make room for {}.")
JSON_KEY = "answer"

_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_BULLET = re.compile(r"^[ \t]*\*[ \t]+\S", re.M)
_TITLE = re.compile(r"<<[^<>\n]*[^\s<>][^<>\n]*>>")
_POSTSCRIPT = re.compile(r"^[ \t]*P\.S\.\s*\w", re.M)
_JSON_FENCE = re.compile(r"^```(?:json)?[ \t]*\n(.*)\n[ \t]*```$", re.S | re.I)


def count_words(text: str) -> int:
    """Words are runs of letters, digits and underscores, joined by inner apostrophes or hyphens
    (``don't``, ``well-known``: one word each; ``3.5``: two); punctuation and markup (``*``, ``<<``)
    are not words."""
    return len(_WORD.findall(text))


# Words before a period that does not end a sentence: titles and Latin abbreviations (a subset of
# the abbreviations punkt's English model knows). Single capital letters (initials) count too.
ABBREVIATIONS = frozenset({"dr", "e.g", "i.e", "jr", "mr", "mrs", "ms", "prof", "sr", "st", "vs", "a.m", "p.m", "u.s"})


def _abbreviation_before(text: str, end: re.Match) -> bool:
    """Whether the sentence-end candidate ``end`` is a single ``.`` after an abbreviation or an
    initial (``Dr. Smith``, ``e.g. tea``, ``J. Smith``)."""
    if end.group(0) != ".":
        return False
    token = re.search(r"\S*$", text[:end.start()]).group(0).lstrip("\"'(\u201c\u2018[")
    return token.lower() in ABBREVIATIONS or (len(token) == 1 and token.isupper())


def split_sentences(text: str) -> List[str]:
    """The sentences of ``text``, stripped, in order (IFEval-style: no line-based splitting).

    A sentence ends at a run of ``.``, ``!`` or ``?`` (closing quotes or brackets may follow) that
    is followed by whitespace or the end of the text, except a single ``.`` after an abbreviation
    in :data:`ABBREVIATIONS` (any case) or after a single capital letter (an initial). Line breaks
    are whitespace like any other: a title line or bullet items without end punctuation run on
    into the next sentence, as with the punkt tokenizer IFEval uses. Pieces without a letter or
    digit (a lone ``*``, stray punctuation) are not sentences. ``3.5`` and ``example.com`` do not
    end one; an ellipsis followed by a space does."""
    sentences, start = [], 0
    for end in _SENTENCE_END.finditer(text):
        if not _abbreviation_before(text, end):
            sentences.append(text[start:end.end()].strip())
            start = end.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if re.search(r"\w", s)]


def count_sentences(text: str) -> int:
    """The number of sentences, ``len(split_sentences(text))`` (0 for blank text)."""
    return len(split_sentences(text))


def _has_word(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` as a whole word (not inside a longer word), case-insensitively."""
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text, re.I) is not None


def _continues_word(left: str, right: str) -> bool:
    """Whether the last character of ``left`` and the first of ``right`` belong to one word."""
    return bool(left) and bool(right) and left[-1].isalnum() and right[0].isalnum()


def _word_list(words: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _phrase(value: str, name: str) -> None:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(f"{name} must be a non-empty string without surrounding whitespace, got {value!r}")


@dataclass
class _Style:
    """How a seed response is written (see :func:`_respond`); constraints fill it in."""

    sentences: Tuple[str, ...]
    title: str
    show_title: bool = False
    keyword_sentence: Optional[str] = None
    avoid: Optional[str] = None
    extra: List[str] = field(default_factory=list)
    start: Optional[str] = None
    end: Optional[str] = None
    bullets: Optional[int] = None
    postscript: Optional[str] = None
    case: Optional[str] = None
    no_commas: bool = False
    json: bool = False
    quotes: bool = False


class Constraint:
    """A verifiable constraint: an immutable dataclass with a JSON tag :attr:`kind`.

    ``render()`` is the instruction text, ``check(response)`` the checker (subclasses implement
    ``_check``; :meth:`check` fails blank responses first). ``to_json()`` gives
    ``{"type": kind, **fields}``; :func:`constraint_from_json` inverts it. Subclasses register
    themselves in :data:`CONSTRAINTS` under their ``kind``.
    """

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        CONSTRAINTS[cls.kind] = cls

    def render(self) -> str:
        raise NotImplementedError

    def check(self, response: str) -> bool:
        """Whether ``response`` meets the constraint; an empty or whitespace-only response meets
        none (IFEval's evaluation does the same: ``response.strip() and check_following(response)``)."""
        return bool(response.strip()) and self._check(response)

    def _check(self, response: str) -> bool:
        """The constraint's own test of a non-blank ``response``."""
        raise NotImplementedError

    def required_text(self) -> Tuple[str, ...]:
        """Text every compliant response contains (an :class:`AvoidWord` must not clash with it)."""
        return ()

    @classmethod
    def sample(cls, rng: random.Random) -> "Constraint":
        """A random instance with parameters from this module's vocabulary."""
        return cls()

    def to_json(self) -> Dict[str, object]:
        row: Dict[str, object] = {"type": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            row[f.name] = list(value) if isinstance(value, tuple) else value
        return row

    def _shape(self, style: _Style, comply: bool, rng: random.Random) -> None:
        """Makes ``style`` meet (``comply``) or naturally ignore this constraint. Length constraints
        do nothing here: :func:`_respond` searches over the number of sentences instead."""


CONSTRAINTS: Dict[str, Type[Constraint]] = {}


@dataclass(frozen=True)
class MaxWords(Constraint):
    """At most ``n`` words (:func:`count_words`)."""

    n: int
    kind: ClassVar[str] = "max_words"

    def __post_init__(self):
        _positive_int(self.n, "n")

    def render(self) -> str:
        return f"Answer with at most {self.n} words."

    def _check(self, response: str) -> bool:
        return count_words(response) <= self.n

    @classmethod
    def sample(cls, rng):
        return cls(rng.choice((20, 30, 40)))


@dataclass(frozen=True)
class MinWords(Constraint):
    """At least ``n`` words (:func:`count_words`)."""

    n: int
    kind: ClassVar[str] = "min_words"

    def __post_init__(self):
        _positive_int(self.n, "n")

    def render(self) -> str:
        return f"Answer with at least {self.n} words."

    def _check(self, response: str) -> bool:
        return count_words(response) >= self.n

    @classmethod
    def sample(cls, rng):
        return cls(rng.choice((30, 40, 50)))


@dataclass(frozen=True)
class IncludeKeywords(Constraint):
    """Every keyword occurs as a whole word, case-insensitively (``"rest"`` is not met by ``"restful"``)."""

    keywords: Tuple[str, ...]
    kind: ClassVar[str] = "include_keywords"

    def __post_init__(self):
        object.__setattr__(self, "keywords", tuple(self.keywords))
        if not self.keywords:
            raise ValueError("keywords must not be empty")
        for keyword in self.keywords:
            _phrase(keyword, "a keyword")

    def render(self) -> str:
        noun = "keyword" if len(self.keywords) == 1 else "keywords"
        quoted = _word_list(['"' + keyword + '"' for keyword in self.keywords])
        return f"Include the {noun} {quoted} in the response."

    def _check(self, response: str) -> bool:
        return all(_has_word(response, keyword) for keyword in self.keywords)

    def required_text(self):
        return self.keywords

    @classmethod
    def sample(cls, rng):
        return cls(tuple(rng.sample(KEYWORDS, rng.randint(1, 2))))

    def _shape(self, style, comply, rng):
        if comply:
            style.keyword_sentence = rng.choice(KEYWORD_SENTENCES).format(_word_list(self.keywords))


@dataclass(frozen=True)
class AvoidWord(Constraint):
    """``word`` does not occur as a whole word, case-insensitively (``"very"`` is met by ``"every"``)."""

    word: str
    kind: ClassVar[str] = "avoid_word"

    def __post_init__(self):
        _phrase(self.word, "word")

    def render(self) -> str:
        return f'Do not include the word "{self.word}" in the response.'

    def _check(self, response: str) -> bool:
        return not _has_word(response, self.word)

    @classmethod
    def sample(cls, rng):
        return cls(rng.choice(sorted(AVOID_WORDS)))

    def _shape(self, style, comply, rng):
        if comply:
            style.avoid = self.word
        else:
            style.extra.append(AVOID_WORDS[self.word])


@dataclass(frozen=True)
class Lowercase(Constraint):
    """Letters only in lower case, and at least one letter (``str.islower``)."""

    kind: ClassVar[str] = "lowercase"

    def render(self) -> str:
        return ("Your entire response should be in English, and in all lowercase letters. "
                "No capital letters are allowed.")

    def _check(self, response: str) -> bool:
        return response.islower()

    def _shape(self, style, comply, rng):
        if comply:
            style.case = "lower"


@dataclass(frozen=True)
class Uppercase(Constraint):
    """Letters only in upper case, and at least one letter (``str.isupper``)."""

    kind: ClassVar[str] = "uppercase"

    def render(self) -> str:
        return "Your entire response should be in English, and in all capital letters."

    def _check(self, response: str) -> bool:
        return response.isupper()

    def _shape(self, style, comply, rng):
        if comply:
            style.case = "upper"


@dataclass(frozen=True)
class EndWith(Constraint):
    """The response, trailing whitespace removed, ends with ``phrase`` exactly (case-sensitive), and
    the phrase does not complete a longer word (``"...Hope this helps!"`` meets ``"helps!"``, but
    ``"Thanks"`` does not meet ``"hanks"``)."""

    phrase: str
    kind: ClassVar[str] = "end_with"

    def __post_init__(self):
        _phrase(self.phrase, "phrase")

    def render(self) -> str:
        return f'Finish your response with this exact phrase: "{self.phrase}". No other words should follow it.'

    def _check(self, response: str) -> bool:
        text = response.rstrip()
        head = text[:len(text) - len(self.phrase)]
        return text.endswith(self.phrase) and not _continues_word(head, self.phrase)

    def required_text(self):
        return (self.phrase,)

    @classmethod
    def sample(cls, rng):
        return cls(rng.choice(END_PHRASES))

    def _shape(self, style, comply, rng):
        if comply:
            style.end = self.phrase


@dataclass(frozen=True)
class StartWith(Constraint):
    """The response, leading whitespace removed, starts with ``phrase`` exactly (case-sensitive), and
    the phrase is not the start of a longer word (``"Sure"`` is not met by ``"Surely"``)."""

    phrase: str
    kind: ClassVar[str] = "start_with"

    def __post_init__(self):
        _phrase(self.phrase, "phrase")

    def render(self) -> str:
        return f'Start your response with the exact phrase "{self.phrase}".'

    def _check(self, response: str) -> bool:
        text = response.lstrip()
        return text.startswith(self.phrase) and not _continues_word(self.phrase, text[len(self.phrase):])

    def required_text(self):
        return (self.phrase,)

    @classmethod
    def sample(cls, rng):
        return cls(rng.choice(START_PHRASES))

    def _shape(self, style, comply, rng):
        if comply:
            style.start = self.phrase


@dataclass(frozen=True)
class BulletPoints(Constraint):
    """Exactly ``n`` markdown bullets: lines that start, after optional spaces or tabs, with ``*``,
    blanks and some text. ``-`` bullets, numbered lists and ``**bold**`` lines do not count."""

    n: int
    kind: ClassVar[str] = "bullet_points"

    def __post_init__(self):
        _positive_int(self.n, "n")

    def render(self) -> str:
        return (f"Your answer must contain exactly {self.n} bullet points, "
                'each on its own line starting with the markdown bullet "* ".')

    def _check(self, response: str) -> bool:
        return len(_BULLET.findall(response)) == self.n

    @classmethod
    def sample(cls, rng):
        return cls(rng.choice((2, 3, 4)))

    def _shape(self, style, comply, rng):
        style.bullets = self.n if comply else self.n + 1


@dataclass(frozen=True)
class WrapInQuotes(Constraint):
    """The response, surrounding whitespace removed, starts and ends with a straight double quote
    (``"``; curly quotes do not count) and is more than one character long."""

    kind: ClassVar[str] = "wrap_in_quotes"

    def render(self) -> str:
        return "Wrap your entire response with double quotation marks."

    def _check(self, response: str) -> bool:
        text = response.strip()
        return len(text) >= 2 and text[0] == text[-1] == '"'

    def _shape(self, style, comply, rng):
        style.quotes = comply


@dataclass(frozen=True)
class NoCommas(Constraint):
    """No ASCII comma ``,`` anywhere."""

    kind: ClassVar[str] = "no_commas"

    def render(self) -> str:
        return "In your entire response, refrain from the use of any commas."

    def _check(self, response: str) -> bool:
        return "," not in response

    def _shape(self, style, comply, rng):
        style.no_commas = comply


@dataclass(frozen=True)
class Title(Constraint):
    """A title on one line in double angular brackets, with some non-blank text: ``<<Ocean Notes>>``
    (``<< >>`` and a title broken across lines do not count)."""

    kind: ClassVar[str] = "title"

    def render(self) -> str:
        return "Your answer must contain a title, wrapped in double angular brackets, such as <<poem of joy>>."

    def _check(self, response: str) -> bool:
        return _TITLE.search(response) is not None

    def _shape(self, style, comply, rng):
        style.show_title = comply


@dataclass(frozen=True)
class MaxSentences(Constraint):
    """At most ``n`` sentences (:func:`count_sentences`)."""

    n: int
    kind: ClassVar[str] = "max_sentences"

    def __post_init__(self):
        _positive_int(self.n, "n")

    def render(self) -> str:
        return f"Answer in at most {self.n} sentences."

    def _check(self, response: str) -> bool:
        return count_sentences(response) <= self.n

    @classmethod
    def sample(cls, rng):
        return cls(rng.choice((2, 3, 4)))


@dataclass(frozen=True)
class JsonFormat(Constraint):
    """The response parses as a JSON object or array (a bare string or number does not count); it
    may be wrapped in a markdown fence, ```` ```json ```` (or ```` ``` ````) on the first line and
    ```` ``` ```` on the last."""

    kind: ClassVar[str] = "json_format"

    def render(self) -> str:
        return "Wrap your entire output in JSON format."

    def _check(self, response: str) -> bool:
        text = response.strip()
        fenced = _JSON_FENCE.match(text)
        try:
            value = json.loads(fenced.group(1) if fenced else text)
        except ValueError:
            return False
        return isinstance(value, (dict, list))

    def _shape(self, style, comply, rng):
        style.json = comply


@dataclass(frozen=True)
class Postscript(Constraint):
    """A line that starts (after optional spaces or tabs) with ``P.S.`` and continues with some text
    (case-sensitive: ``p.s.`` and ``PS`` do not count)."""

    kind: ClassVar[str] = "postscript"

    def render(self) -> str:
        return "At the end of your response, please explicitly add a postscript starting with P.S."

    def _check(self, response: str) -> bool:
        return _POSTSCRIPT.search(response) is not None

    def required_text(self):
        return ("P.S.",)

    def _shape(self, style, comply, rng):
        if comply:
            style.postscript = rng.choice(POSTSCRIPTS)


# Kinds that are never combined: contradictory (lowercase and an exact phrase with capitals),
# or satisfiable only in contrived ways (bullets inside JSON, fifty words in two sentences).
_CONFLICTS = frozenset(frozenset(pair) for pair in [
    ("max_words", "min_words"), ("min_words", "max_sentences"),
    ("lowercase", "uppercase"), ("lowercase", "end_with"), ("lowercase", "start_with"), ("lowercase", "postscript"),
    ("uppercase", "end_with"), ("uppercase", "start_with"),
    ("wrap_in_quotes", "start_with"), ("wrap_in_quotes", "end_with"), ("wrap_in_quotes", "json_format"),
    ("wrap_in_quotes", "bullet_points"),
    ("json_format", "bullet_points"), ("json_format", "title"), ("json_format", "postscript"),
    ("json_format", "start_with"), ("json_format", "end_with"),
    ("bullet_points", "max_sentences"), ("max_sentences", "postscript"),
])


def compatible(a: Constraint, b: Constraint) -> bool:
    """Whether ``a`` and ``b`` may appear in one task: different kinds, not a conflicting pair,
    and no avoided word inside the other's required text."""
    if a.kind == b.kind or frozenset((a.kind, b.kind)) in _CONFLICTS:
        return False
    return not any(isinstance(x, AvoidWord) and any(_has_word(t, x.word) for t in y.required_text())
                   for x, y in ((a, b), (b, a)))


def constraint_from_json(row: Dict[str, object]) -> Constraint:
    """Inverse of ``Constraint.to_json``; raises ``ValueError`` on an unknown type or bad fields."""
    row = dict(row)
    kind = row.pop("type", None)
    if kind not in CONSTRAINTS:
        raise ValueError(f"unknown constraint type {kind!r}; known: {sorted(CONSTRAINTS)}")
    cls = CONSTRAINTS[kind]
    try:
        return cls(**{name: tuple(v) if isinstance(v, list) else v for name, v in row.items()})
    except TypeError as err:
        raise ValueError(f"bad fields for {kind!r}: {sorted(row)} ({err})") from err


@dataclass(frozen=True)
class VerifiableTask:
    """A base instruction and its constraints (at least one)."""

    instruction: str
    constraints: Tuple[Constraint, ...]

    def __post_init__(self):
        object.__setattr__(self, "constraints", tuple(self.constraints))
        _phrase(self.instruction, "instruction")
        if not self.constraints:
            raise ValueError("a task needs at least one constraint")

    @property
    def prompt(self) -> str:
        """The base instruction followed by the constraints' renderings, space-separated."""
        return " ".join((self.instruction,) + tuple(c.render() for c in self.constraints))

    def results(self, response: str) -> Tuple[bool, ...]:
        """Each constraint's checker on ``response``, in order."""
        return tuple(c.check(response) for c in self.constraints)

    def score(self, response: str) -> float:
        """The fraction of constraints ``response`` meets."""
        results = self.results(response)
        return sum(results) / len(results)

    def passed(self, response: str) -> bool:
        """Whether ``response`` meets every constraint."""
        return all(self.results(response))

    def to_json(self) -> Dict[str, object]:
        return {"instruction": self.instruction, "prompt": self.prompt,
                "constraints": [c.to_json() for c in self.constraints]}

    @classmethod
    def from_json(cls, row: Dict[str, object]) -> "VerifiableTask":
        """Rebuilds a task from ``instruction`` and ``constraints``; other keys (``chosen``, ...) are
        ignored. A ``prompt``, if present, must equal the rebuilt one (``ValueError`` otherwise)."""
        task = cls(row["instruction"], tuple(constraint_from_json(c) for c in row["constraints"]))
        if "prompt" in row and row["prompt"] != task.prompt:
            raise ValueError(f"prompt {row['prompt']!r} does not match its instruction and constraints "
                             f"({task.prompt!r})")
        return task


def load_tasks(path: Union[str, Path]) -> List[VerifiableTask]:
    """The tasks of a JSONL file of task rows (``prompt_pool.jsonl``, ``heldout.jsonl``, or the
    seed preference rows, whose ``chosen``/``rejected`` are ignored)."""
    with open(path, encoding="utf-8") as f:
        return [VerifiableTask.from_json(json.loads(line)) for line in f if line.strip()]


def base_instructions(path: Union[str, Path] = ASSETS_DIR / BASE_INSTRUCTIONS) -> List[str]:
    """The bundled base instructions (or those of ``path``), one per non-blank line."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _sample_constraints(rng: random.Random, count: int, usage: Dict[str, int]) -> Tuple[Constraint, ...]:
    """``count`` pairwise compatible constraints of distinct kinds. Each is of a compatible kind
    used least so far (``usage``, updated here; ties broken at random), so every kind is about
    equally frequent in any split. Never stuck for ``count <= 3``: include_keywords, avoid_word and
    no_commas conflict with no kind, and the vocabulary has no avoided word in a keyword or phrase."""
    chosen: List[Constraint] = []
    while len(chosen) < count:
        kinds = [k for k in sorted(CONSTRAINTS)
                 if all(k != c.kind and frozenset((k, c.kind)) not in _CONFLICTS for c in chosen)]
        least = min(usage.get(k, 0) for k in kinds)
        kind = rng.choice([k for k in kinds if usage.get(k, 0) == least])
        usage[kind] = usage.get(kind, 0) + 1
        chosen.append(CONSTRAINTS[kind].sample(rng))
    return tuple(chosen)


def _task_stream(instructions: Sequence[str], rng: random.Random,
                 per_task: Tuple[int, int]) -> Iterator[VerifiableTask]:
    """Endless random tasks; each pass visits every instruction once, in a fresh random order."""
    order, usage = list(instructions), {}
    while True:
        rng.shuffle(order)
        for instruction in order:
            yield VerifiableTask(instruction, _sample_constraints(rng, rng.randint(*per_task), usage))


_T = TypeVar("_T")


def _distinct(n: int, stream: Iterator[VerifiableTask], build: Callable[[VerifiableTask], Optional[_T]]) -> List[_T]:
    """``build(task)`` for the first ``n`` tasks of ``stream`` with new prompts where it is not None."""
    seen, out = set(), []
    for attempt, task in enumerate(stream):
        if len(out) == n:
            break
        if attempt >= 20 * n + 1000:
            raise ValueError(f"could only draw {len(out)} of {n} distinct tasks; use more base instructions")
        if task.prompt not in seen:
            item = build(task)
            if item is not None:
                seen.add(task.prompt)
                out.append(item)
    return out


def make_tasks(n: int, seed: int, constraints_per_task: Union[int, Tuple[int, int]] = (1, 2),
               instructions: Optional[Sequence[str]] = None) -> List[VerifiableTask]:
    """``n`` distinct random tasks, deterministic in ``seed``.

    Args:
      n: how many tasks (distinct prompts).
      seed: the random seed; equal arguments give equal tasks on every platform.
      constraints_per_task: the number of constraints per task, or an inclusive range ``(lo, hi)``
        drawn uniformly per task; between 1 and 3.
      instructions: base instructions (default: :func:`base_instructions`); every pass over them
        uses each once, so they are used evenly.
    """
    lo, hi = (constraints_per_task, constraints_per_task) if isinstance(constraints_per_task, int) \
        else constraints_per_task
    if not 1 <= lo <= hi <= 3:
        raise ValueError(f"constraints_per_task must lie within 1..3, got {constraints_per_task!r}")
    instructions = base_instructions() if instructions is None else list(instructions)
    if not instructions:
        raise ValueError("no base instructions")
    return _distinct(n, _task_stream(instructions, random.Random(f"tasks:{seed}"), (lo, hi)), lambda task: task)


# ----------------------------------------------------------------------------------------------
# Seed preference pairs and the bundled assets.


@dataclass(frozen=True)
class _SeedAnswer:
    """A hand-written answer to a base instruction: a title and its sentences, in order."""

    instruction: str
    title: str
    sentences: Tuple[str, ...]


def _write(style: _Style, k: int) -> Optional[str]:
    """The response ``style`` describes using (at most) its first ``k`` content sentences, or None
    if the bullets cannot be filled. Layout: start phrase, title, body (prose or bullets),
    postscript, end phrase, as blank-line separated paragraphs; or ``{"answer": body}`` as JSON."""
    content = [s for s in style.sentences if style.avoid is None or not _has_word(s, style.avoid)]
    tail = ([style.keyword_sentence] if style.keyword_sentence else []) + style.extra
    if style.bullets is None:
        body = " ".join(content[:k] + tail)
    else:
        take = style.bullets - len(tail)
        if not 0 <= take <= len(content):
            return None
        body = "\n".join("* " + s for s in content[:take] + tail)
    if style.json:
        text = json.dumps({JSON_KEY: body}, ensure_ascii=False, indent=2)
    else:
        title = f"<<{style.title}>>" if style.show_title else None
        text = "\n\n".join(p for p in (style.start, title, body, style.postscript, style.end) if p)
    if style.no_commas:
        text = text.replace(",", "")
    if style.case == "lower":
        text = text.lower()
    elif style.case == "upper":
        text = text.upper()
    return f'"{text}"' if style.quotes else text


def _respond(task: VerifiableTask, answer: _SeedAnswer, key: str, violate: Optional[int]) -> Optional[str]:
    """The longest response written from ``answer`` that meets every constraint of ``task`` except
    the one at index ``violate``, which it must fail; None if there is none. Template choices are
    seeded per constraint by ``key``, so a chosen and a rejected response share them."""
    style = _Style(answer.sentences, answer.title)
    for i, constraint in enumerate(task.constraints):
        constraint._shape(style, i != violate, random.Random(f"{key}:{constraint.kind}"))
    wanted = tuple(i != violate for i in range(len(task.constraints)))
    for k in range(len(answer.sentences), 0, -1):
        text = _write(style, k)
        if text is not None and task.results(text) == wanted:
            return text
    return None


def _seed_pair(task: VerifiableTask, answer: _SeedAnswer, key: str) -> Optional[Tuple[str, str]]:
    """(chosen, rejected): chosen meets every constraint; rejected is the same answer written
    naturally with one constraint (the first feasible in a seeded random order) ignored, so it
    fails exactly that one."""
    chosen = _respond(task, answer, key, None)
    if chosen is None:
        return None
    order = list(range(len(task.constraints)))
    random.Random(key).shuffle(order)
    for i in order:
        rejected = _respond(task, answer, key, i)
        if rejected is not None:
            return chosen, rejected
    return None


def _seed_answers(path: Path) -> Dict[str, _SeedAnswer]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["instruction"]: _SeedAnswer(r["instruction"], r["title"], tuple(r["sentences"])) for r in rows}


def build_assets(directory: Union[str, Path] = ASSETS_DIR, seed: int = 0) -> Dict[str, int]:
    """Writes the generated assets into ``directory`` from the bundled sources; deterministic.

    * ``seed_preferences.jsonl``: :data:`SEED_PAIRS` rows ``{prompt, chosen, rejected, instruction,
      constraints}`` over the base instructions that have a hand-written answer
      (``seed_answers.jsonl``). Tasks have 1-2 constraints; ``chosen`` meets all, ``rejected``
      fails exactly one (see :func:`_seed_pair`); tasks no answer can meet are skipped.
    * ``heldout.jsonl``: :data:`HELDOUT_TASKS` task rows ``{instruction, prompt, constraints}`` over
      :data:`HELDOUT_INSTRUCTIONS` of the remaining instructions (a seeded random choice).
    * ``prompt_pool.jsonl``: :data:`POOL_TASKS` task rows over all the others.

    Returns the number of rows written per file name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    answers = _seed_answers(ASSETS_DIR / SEED_ANSWERS)
    instructions = base_instructions()
    missing = sorted(set(answers) - set(instructions))
    if missing:
        raise ValueError(f"seed answers for instructions not in {BASE_INSTRUCTIONS}: {missing}")
    rest = [i for i in instructions if i not in answers]
    random.Random(f"split:{seed}").shuffle(rest)
    splits = {HELDOUT: (rest[:HELDOUT_INSTRUCTIONS], HELDOUT_TASKS),
              PROMPT_POOL: (rest[HELDOUT_INSTRUCTIONS:], POOL_TASKS)}

    def seed_row(task: VerifiableTask) -> Optional[Dict[str, object]]:
        pair = _seed_pair(task, answers[task.instruction], f"{seed}:{task.prompt}")
        return None if pair is None else {"prompt": task.prompt, "chosen": pair[0], "rejected": pair[1],
                                          "instruction": task.instruction,
                                          "constraints": [c.to_json() for c in task.constraints]}

    rows = {SEED_PREFERENCES: _distinct(SEED_PAIRS, _task_stream(sorted(answers), random.Random(f"seed:{seed}"),
                                                                 (1, 2)), seed_row)}
    for name, (split, count) in splits.items():
        stream = _task_stream(sorted(split), random.Random(f"{name}:{seed}"), (1, 2))
        rows[name] = _distinct(count, stream, VerifiableTask.to_json)
    for name, file_rows in rows.items():
        write_file(directory / name, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in file_rows))
    return {name: len(file_rows) for name, file_rows in rows.items()}


def cli() -> None:
    """``python -m sgpo_jax.ssapo.instructions [--directory=DIR] [--seed=0]``: regenerates the
    verifiable-instruction assets (:func:`build_assets`) and says how many rows each file got."""
    from absl import app, flags

    flags.DEFINE_string("directory", str(ASSETS_DIR), "output directory (default: the bundled assets)")
    flags.DEFINE_integer("seed", 0, "task sampling seed")

    def main(argv) -> None:
        del argv
        for name, count in build_assets(flags.FLAGS.directory, flags.FLAGS.seed).items():
            say(f"{Path(flags.FLAGS.directory) / name}: {count} rows")

    app.run(main)


if __name__ == "__main__":
    cli()
