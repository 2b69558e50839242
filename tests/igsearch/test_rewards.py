"""Answer normalisation, EM / cover-EM / F1, answer extraction, format checks and the outcome reward."""

from __future__ import annotations

import numpy as np
import pytest

from jax_hd.igsearch import rewards
from jax_hd.igsearch.rewards import (
    cover_exact_match,
    exact_match,
    extract_answer,
    extract_refine,
    f1_score,
    is_valid_format,
    is_valid_sequence,
    normalize_answer,
    outcome_reward,
    score_outcome,
)

# ----------------------------------------------------------------------------------------------------------------
# Normalisation and metrics.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ça va?!", "ça va"),
        ("The Beatles", "beatles"),
        ("  A   tale of\tTwo  Cities. ", "tale of two cities"),
        ("Theatre, anthem; another", "theatre anthem another"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("rock-n-roll", "rocknroll"),
        ("«Señor» ¿qué?", "«señor» ¿qué"),  # only ASCII punctuation is removed, as in qa_em.py
        ("ÉCOLE", "école"),
        ("the", ""),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match() -> None:
    assert exact_match("The Beatles", ["beatles"]) == 1.0
    assert exact_match("beatles", "The Beatles!") == 1.0  # a single gold string is one gold answer
    assert exact_match("Ça va?!", ["ça va"]) == 1.0
    assert exact_match("ca va", ["ça va"]) == 0.0  # accents are not stripped
    assert exact_match("Paris", ["Lyon", "paris.", "Marseille"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Paris", []) == 0.0
    assert exact_match("Paris", np.array(["Lyon", "Paris"], dtype=object)) == 1.0  # parquet columns


def test_cover_exact_match() -> None:
    assert cover_exact_match("It was the Beatles, of course.", ["beatles"]) == 1.0
    assert cover_exact_match("Paris", ["Paris, France"]) == 0.0
    assert cover_exact_match("no idea", ["Lyon", "idea"]) == 1.0
    assert cover_exact_match("not sure", ["no"]) == 1.0  # character substring, as in the reference
    assert cover_exact_match("anything", ["The"]) == 0.0  # gold normalising to "" never covers
    assert cover_exact_match("anything", []) == 0.0


def test_f1_score() -> None:
    assert f1_score("The Beatles", ["beatles"]) == 1.0
    assert f1_score("the big cat", ["cat"]) == pytest.approx(2 / 3)
    assert f1_score("Paris France", ["Paris", "Paris, France"]) == 1.0  # max over golds
    assert f1_score("New York City", ["new york", "york"]) == pytest.approx(0.8)
    assert f1_score("cat cat", ["cat"]) == pytest.approx(2 / 3)  # multiset overlap
    assert f1_score("Lyon", ["Paris"]) == 0.0
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("yes", ["yes"]) == 1.0
    assert f1_score("yes indeed", ["yes"]) == 0.0  # yes/no gold with a different prediction
    assert f1_score("no", ["no way"]) == 0.0  # yes/no prediction with a different gold
    assert f1_score("Paris", []) == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Extraction.


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>no idea</think>", None),
        ("<answer> Paris </answer>", "Paris"),
        ("<answer>Lyon</answer> wait <answer>\nParis\n</answer>", "Paris"),
        ("<answer>Lyon</answer><answer>Paris</answer><answer>Nice</answer>", "Nice"),
        ("<answer></answer>", ""),
        ("<answer>a <answer>b</answer></answer>", "a <answer>b"),  # nested: first opening to first closing
        ("<answer>Paris", None),  # unclosed
        ("Paris</answer>", None),  # stray closing tag
        ("<answer>Lyon</answer><answer>Paris", "Lyon"),  # last complete pair wins
        ("<ANSWER>Paris</ANSWER>", None),  # tags are case-sensitive
    ],
)
def test_extract_answer(response: str, expected: str | None) -> None:
    assert extract_answer(response) == expected


def test_extraction_uses_the_response_only() -> None:
    prompt = "Answer inside <answer> and </answer>, e.g. <answer> Beijing </answer>. Question: capital of France?"
    response = "<think>It is Paris.</think><answer>Paris</answer>"
    assert extract_answer(response) == "Paris"  # one match suffices in the response
    assert extract_answer("<think>I do not know</think>") is None  # the prompt's example is never seen
    assert extract_answer(prompt) == "Beijing"  # which is why callers must not pass the prompt
    assert outcome_reward("<think>?</think>", ["Beijing"]) == 0.0


def test_extract_refine() -> None:
    assert extract_refine("<answer>x</answer>") is None
    assert extract_refine("<refine> Paris is big </refine>...<refine>in France</refine>") == "Paris is big  in France"


# ----------------------------------------------------------------------------------------------------------------
# Format checks.

SEARCH_R1_RESPONSE = (
    "<think>I need the capital.</think>\n<search> capital of France </search>"
    "\n\n<information>Doc 1(Title: \"Paris\") Paris is the capital of France.</information>\n\n"
    "<think>It is Paris.</think>\n<answer> Paris </answer>"
)
AUTOREFINE_RESPONSE = (
    "<think>I need the capital.</think><search> capital of France </search>"
    "\n\n<documents>Doc 1(Title: \"Paris\") Paris is the capital of France.</documents>\n\n"
    "<refine>Paris is the capital of France.</refine><answer> Paris </answer>"
)


def test_is_valid_format_per_dialect() -> None:
    assert is_valid_format(SEARCH_R1_RESPONSE, "search_r1")
    assert not is_valid_format(SEARCH_R1_RESPONSE, "autorefine")  # no <refine>
    assert is_valid_format(AUTOREFINE_RESPONSE, "autorefine")
    assert is_valid_format(AUTOREFINE_RESPONSE, rewards.SEARCH_R1)  # counts only: refine/documents are ignored
    assert not is_valid_format("", "search_r1")
    assert not is_valid_format("<think>x</think><answer>Paris</answer>", "search_r1")  # never searched
    assert not is_valid_format(SEARCH_R1_RESPONSE.replace("</think>", "", 1), "search_r1")  # unbalanced
    assert not is_valid_format(SEARCH_R1_RESPONSE + "<information>", "search_r1")  # unbalanced observation
    with pytest.raises(ValueError, match="unknown dialect"):
        is_valid_format(SEARCH_R1_RESPONSE, "react")


def test_is_valid_sequence_per_dialect() -> None:
    assert is_valid_sequence(SEARCH_R1_RESPONSE, "search_r1")
    assert is_valid_sequence("<think>easy</think><answer>Paris</answer>\n", "search_r1")  # searching is optional
    assert is_valid_sequence(AUTOREFINE_RESPONSE, "autorefine")
    two_searches = AUTOREFINE_RESPONSE.replace(
        "<answer>", "<think>More.</think><search>q2</search><documents>d</documents><refine>r</refine><answer>")
    assert is_valid_sequence(two_searches, "autorefine")
    assert not is_valid_sequence(AUTOREFINE_RESPONSE, "search_r1")  # other dialect's tags
    assert not is_valid_sequence(SEARCH_R1_RESPONSE, "autorefine")
    invalid = [
        "<answer>Paris</answer>",  # must think first
        "<think>x</think>",  # no answer
        "<think>x</think><answer>Paris</answer> trailing",  # text after the answer
        "<think>x</think> stray text <answer>Paris</answer>",  # text between blocks
        "<think>x<answer>Paris</answer></think>",  # nested
        "<think>x</think><search>q</search><answer>Paris</answer>",  # search without observation
        "<think>x</think><answer>Paris</answer><answer>Lyon</answer>",  # nothing may follow the answer
        SEARCH_R1_RESPONSE.replace("<think>It is Paris.</think>\n", ""),  # Search-R1 thinks after information
        SEARCH_R1_RESPONSE.replace("\n<answer>", "\nMy previous action is invalid.\n<answer>"),
    ]
    for response in invalid:
        assert not is_valid_sequence(response, "search_r1"), response


# ----------------------------------------------------------------------------------------------------------------
# Outcome reward.


def test_outcome_reward_em_and_f1() -> None:
    assert outcome_reward(SEARCH_R1_RESPONSE, ["Paris"], kind="em", refine_bonus=0.0) == 1.0
    assert outcome_reward(SEARCH_R1_RESPONSE, ["Lyon"], kind="em", refine_bonus=0.0) == 0.0
    partial = SEARCH_R1_RESPONSE.replace("<answer> Paris </answer>", "<answer>Paris France</answer>")
    assert outcome_reward(partial, ["Paris"], kind="em") == 0.0
    assert outcome_reward(partial, ["Paris"], kind="f1") == pytest.approx(2 / 3)
    assert outcome_reward("<think>x</think>", ["Paris"], kind="em") == 0.0
    with pytest.raises(ValueError, match="kind"):
        outcome_reward(SEARCH_R1_RESPONSE, ["Paris"], kind="bleu")


def test_refine_bonus() -> None:
    wrong_answer = AUTOREFINE_RESPONSE.replace("<answer> Paris </answer>", "<answer> Lyon </answer>")
    score = score_outcome(wrong_answer, ["Paris"])  # defaults: F1, refine bonus 0.1, format bonus 0
    assert score.reward == pytest.approx(0.1) and score.answer == "Lyon" and score.answer_score == 0.0
    assert score.refine_hit and score.format_ok
    assert outcome_reward(wrong_answer, ["Paris"], refine_bonus=0.0) == 0.0
    assert outcome_reward(wrong_answer, ["Paris"], kind="em", refine_bonus=0.25) == pytest.approx(0.25)
    assert outcome_reward(wrong_answer, ["Berlin"]) == 0.0  # refine does not cover the gold
    # A correct answer gets its score, never score + bonus.
    assert outcome_reward(AUTOREFINE_RESPONSE, ["Paris"]) == 1.0
    # No answer at all: no bonus, even if the refine covers the gold (reference behaviour).
    no_answer = AUTOREFINE_RESPONSE.replace("<answer> Paris </answer>", "")
    assert outcome_reward(no_answer, ["Paris"]) == 0.0
    assert score_outcome(no_answer, ["Paris"]).refine_hit


def test_format_bonus() -> None:
    wrong_answer = AUTOREFINE_RESPONSE.replace("<answer> Paris </answer>", "<answer> Lyon </answer>")
    assert outcome_reward(wrong_answer, ["Berlin"], format_bonus=0.2) == pytest.approx(0.2)
    assert outcome_reward(wrong_answer, ["Paris"], format_bonus=0.2) == pytest.approx(0.3)
    unformatted = "<answer>Lyon</answer>"
    assert outcome_reward(unformatted, ["Paris"], format_bonus=0.2, dialect="search_r1") == 0.0
