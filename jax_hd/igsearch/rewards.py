"""Outcome rewards for search-augmented QA: answer normalisation, EM, cover-EM, F1, answer extraction, format checks.

Pure Python, no JAX. Metric semantics follow Search-R1 / AutoRefine `qa_em.py` (spec §5.5):

* `normalize_answer`: SQuAD normalisation exactly as `qa_em.py`: lowercase, delete ASCII punctuation
  (`string.punctuation`; non-ASCII punctuation such as `«` or `¿` is kept), replace the words a/an/the by a space,
  collapse whitespace. Accents are kept ("Ça" -> "ça").
* `exact_match`: 1.0 if the normalised prediction equals any normalised gold answer.
* `cover_exact_match` (subEM): 1.0 if any normalised gold is a character substring of the normalised prediction
  (so gold "no" covers "not sure", as in the reference). One deviation: a gold that normalises to "" (e.g. "The")
  is skipped, where the reference would count it as contained in every prediction.
* `f1_score`: token-overlap F1, max over golds; 0 for a gold/prediction pair where either side is yes/no/noanswer
  and they differ.

Extraction convention (spec §5.5 gotcha): every function here takes the **response only** (all generated segments
and observations after the prompt), never prompt + response, so one `<answer>` match is enough. The reference
decodes prompt + response and requires two matches because the prompt holds an example answer; both conventions
pick the same answer for a response, ours just cannot be fooled by the prompt's example.

Dialects: Search-R1 (`<think>`, `<search>`, `<information>`, `<answer>`) and AutoRefine / IG-Search (`<think>`,
`<search>`, `<documents>`, `<refine>`, `<answer>`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import string
from collections.abc import Iterable

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_REFINE_RE = re.compile(r"<refine>(.*?)</refine>", re.DOTALL)
_YES_NO = frozenset({"yes", "no", "noanswer"})

GoldAnswers = str | Iterable[str]


# ----------------------------------------------------------------------------------------------------------------
# Normalisation and metrics.


def normalize_answer(text: str) -> str:
    """SQuAD normalisation as in Search-R1's `qa_em.py`: lower, drop ASCII punctuation, drop a/an/the, fix spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def as_gold_list(golden_answers: GoldAnswers) -> list[str]:
    """Gold answers as a list of strings: a single string becomes a one-element list (numpy arrays work too)."""
    if isinstance(golden_answers, str):
        return [golden_answers]
    return [str(answer) for answer in golden_answers]


def exact_match(prediction: str, golden_answers: GoldAnswers) -> float:
    """1.0 if the normalised prediction equals the normalised form of any gold answer, else 0.0."""
    normalized_prediction = normalize_answer(prediction)
    return float(any(normalize_answer(gold) == normalized_prediction for gold in as_gold_list(golden_answers)))


def cover_exact_match(prediction: str, golden_answers: GoldAnswers) -> float:
    """subEM: 1.0 if a non-empty normalised gold answer is a substring of the normalised prediction, else 0.0."""
    normalized_prediction = normalize_answer(prediction)
    golds = (normalize_answer(gold) for gold in as_gold_list(golden_answers))
    return float(any(gold and gold in normalized_prediction for gold in golds))


def _token_f1(normalized_prediction: str, normalized_gold: str) -> float:
    """Token-overlap F1 of two normalised strings with the reference's yes/no/noanswer rule."""
    if (normalized_prediction in _YES_NO or normalized_gold in _YES_NO) and normalized_prediction != normalized_gold:
        return 0.0
    prediction_tokens = normalized_prediction.split()
    gold_tokens = normalized_gold.split()
    num_same = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golden_answers: GoldAnswers) -> float:
    """Token-overlap F1 between the normalised prediction and each gold answer, max over golds (0.0 if none)."""
    normalized_prediction = normalize_answer(prediction)
    return max((_token_f1(normalized_prediction, normalize_answer(gold)) for gold in as_gold_list(golden_answers)),
               default=0.0)


# ----------------------------------------------------------------------------------------------------------------
# Extraction.


def extract_answer(response: str) -> str | None:
    """The stripped content of the last `<answer>…</answer>` in the response, or None if there is none.

    Matching is the reference's non-greedy `<answer>(.*?)</answer>` (DOTALL), so malformed tags behave as in
    Search-R1: an unclosed `<answer>` or a stray `</answer>` matches nothing; for nested tags
    (`<answer>a <answer>b</answer></answer>`) the match runs from the first opening to the first closing tag
    ("a <answer>b"), which then scores 0. Pass the response only, never the prompt (see the module docstring).
    """
    matches = _ANSWER_RE.findall(response)
    return matches[-1].strip() if matches else None


def extract_refine(response: str) -> str | None:
    """All `<refine>…</refine>` contents of the response joined by spaces and stripped (AutoRefine's
    `extract_refine`), or None if there is none."""
    matches = _REFINE_RE.findall(response)
    return " ".join(matches).strip() if matches else None


# ----------------------------------------------------------------------------------------------------------------
# Format checks.


@dataclasses.dataclass(frozen=True)
class Dialect:
    """The tag vocabulary of a rollout format.

    Attributes:
      name: "search_r1" or "autorefine".
      action_tags: tags the model writes; `is_valid_format` requires each at least once.
      observation_tag: tag around retrieved documents, inserted by the rollout.
      transitions: for `is_valid_sequence`, which block may follow which ("" is the start).
    """

    name: str
    action_tags: tuple[str, ...]
    observation_tag: str
    transitions: dict[str, frozenset[str]]


SEARCH_R1 = Dialect(
    name="search_r1",
    action_tags=("think", "search", "answer"),
    observation_tag="information",
    transitions={
        "": frozenset({"think"}),
        "think": frozenset({"search", "answer"}),
        "search": frozenset({"information"}),
        "information": frozenset({"think"}),
        "answer": frozenset(),
    },
)
AUTOREFINE = Dialect(
    name="autorefine",
    action_tags=("think", "search", "refine", "answer"),
    observation_tag="documents",
    transitions={
        "": frozenset({"think"}),
        "think": frozenset({"search", "answer"}),
        "search": frozenset({"documents"}),
        "documents": frozenset({"refine"}),
        "refine": frozenset({"think", "search", "answer"}),
        "answer": frozenset(),
    },
)
DIALECTS = {dialect.name: dialect for dialect in (SEARCH_R1, AUTOREFINE)}
_ALL_TAGS = sorted({tag for dialect in DIALECTS.values() for tag in dialect.transitions if tag})
_TAG_RE = re.compile(r"<(/?)(" + "|".join(_ALL_TAGS) + r")>")


def get_dialect(dialect: str | Dialect) -> Dialect:
    """A `Dialect` from its name ("search_r1" or "autorefine") or itself."""
    if isinstance(dialect, Dialect):
        return dialect
    if dialect not in DIALECTS:
        raise ValueError(f"unknown dialect {dialect!r}; expected one of {sorted(DIALECTS)}")
    return DIALECTS[dialect]


def is_valid_format(response: str, dialect: str | Dialect = "search_r1") -> bool:
    """Tag-count format check (AutoRefine's `validate_format`, per dialect).

    True iff the response is non-empty, every action tag of the dialect occurs at least once with as many
    closing as opening tags, and the observation tag is balanced too. Order is not checked: see `is_valid_sequence`.
    """
    spec = get_dialect(dialect)
    if not response:
        return False
    for tag in spec.action_tags:
        opened, closed = response.count(f"<{tag}>"), response.count(f"</{tag}>")
        if opened != closed or opened == 0:
            return False
    return response.count(f"<{spec.observation_tag}>") == response.count(f"</{spec.observation_tag}>")


def is_valid_sequence(response: str, dialect: str | Dialect = "search_r1") -> bool:
    """Strict structure check: the response is a whitespace-separated sequence of well-formed, unnested blocks
    that follows the dialect's transitions and ends with one `<answer>` block.

    Search-R1: `think (search information think)* answer`; AutoRefine: `think (search documents refine
    [think])* answer` with an optional `think` before each later search or the answer. Any text outside blocks
    (e.g. the rollout's invalid-action hint) or a tag of the other dialect makes the sequence invalid.
    """
    spec = get_dialect(dialect)
    state, open_tag, position = "", None, 0
    for match in _TAG_RE.finditer(response):
        closing, tag = match.group(1) == "/", match.group(2)
        if tag not in spec.transitions:
            return False
        if open_tag is None:
            if closing or response[position : match.start()].strip() or tag not in spec.transitions[state]:
                return False
            open_tag = tag
        else:
            if not closing or tag != open_tag:
                return False
            state, open_tag = tag, None
        position = match.end()
    return open_tag is None and state == "answer" and not response[position:].strip()


# ----------------------------------------------------------------------------------------------------------------
# Outcome reward.


@dataclasses.dataclass(frozen=True)
class OutcomeScore:
    """The outcome reward and its parts, for logging.

    Attributes:
      reward: the scalar reward.
      answer: the extracted answer, None if the response has none.
      answer_score: EM or F1 of the answer (0.0 without one).
      refine_hit: a gold answer is covered by the response's `<refine>` text (cover-EM).
      format_ok: `is_valid_format(response, dialect)`.
    """

    reward: float
    answer: str | None
    answer_score: float
    refine_hit: bool
    format_ok: bool


def score_outcome(
    response: str,
    golden_answers: GoldAnswers,
    kind: str = "f1",
    refine_bonus: float = 0.1,
    format_bonus: float = 0.0,
    dialect: str | Dialect = "autorefine",
) -> OutcomeScore:
    """The outcome reward with its parts; see `outcome_reward`."""
    if kind not in ("em", "f1"):
        raise ValueError(f'kind must be "em" or "f1", got {kind!r}')
    golds = as_gold_list(golden_answers)
    answer = extract_answer(response)
    refine_text = extract_refine(response)
    refine_hit = refine_text is not None and cover_exact_match(refine_text, golds) > 0
    format_ok = is_valid_format(response, dialect)
    if answer is None:
        return OutcomeScore(0.0, None, 0.0, refine_hit, format_ok)
    answer_score = exact_match(answer, golds) if kind == "em" else f1_score(answer, golds)
    if answer_score > 0:
        reward = answer_score
    else:
        reward = (format_bonus if format_ok else 0.0) + (refine_bonus if refine_hit else 0.0)
    return OutcomeScore(reward, answer, answer_score, refine_hit, format_ok)


def outcome_reward(
    response: str,
    golden_answers: GoldAnswers,
    kind: str = "f1",
    refine_bonus: float = 0.1,
    format_bonus: float = 0.0,
    dialect: str | Dialect = "autorefine",
) -> float:
    """Outcome reward of one response (spec §4.2), as AutoRefine's `compute_score_em` / `compute_score_f1`.

    * No `<answer>` in the response: 0.0 (no bonus either).
    * Otherwise the answer's EM (`kind="em"`) or F1 (`kind="f1"`) if it is > 0.
    * Otherwise `refine_bonus` if the `<refine>` blocks cover a gold answer (cover-EM), plus `format_bonus` if
      `is_valid_format(response, dialect)`.

    Defaults are AutoRefine's training recipe (F1, refine bonus 0.1, format bonus 0), the best available guess for
    IG-Search (spec §4.1). Search-R1's recipe is `kind="em", refine_bonus=0.0` (it has no `<refine>` anyway).
    """
    return score_outcome(response, golden_answers, kind, refine_bonus, format_bonus, dialect).reward
