"""Expert trajectories for the supervised warm start of a small policy on the embedded QA world.

A tiny policy trained from scratch does not know the AutoRefine format, so GRPO would start from rollouts that
never search. The warm start teaches the format with next-token cross-entropy on trajectories built here, in
exactly the token layout a rollout produces (`rollout.Trajectory`: policy segments cut after `</search>`, real
retrieved documents as loss-masked observations, query spans recorded):

    <think> ... </think>\\n<search> {query} </search>                       (policy)
    \\n\\n<documents>Doc 1(Title: ...) ...</documents>\\n\\n                    (observation, real BM25 results)
    <refine> {words of the retrieved sentence around the answer} </refine>\\n (policy)
    <answer> {gold answer} </answer><eos>                                  (policy)

Two-hop (`bridge_*`) questions search twice: first for the sentence about article A (refined to the sentence that
names the bridge article B), then for B's sentence (refined to the sentence holding the answer). The compact world's
questions (`compact_qa`) search for the article's name, and for the 2-hop ones then for the linked article's name.

The refine block is the supporting sentence, or a window of `refine_window_words` words of it around the target.
Queries are built from the question text: the quoted sentence(s) without the blank `___` and the bridge mask `X`,
prefixed by the article name the question gives, cut to `max_query_words` words. A question whose target sentence
is not in the retrieved (and possibly truncated) documents gets no expert trajectory: the warm start never shows
a refine or an answer that the documents do not support.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from jax_hd.data import compact_qa, qa
from jax_hd.igsearch import rollout
from jax_hd.retrieval.client import SearchClient

THINK_TEXT = "<think> I need to find this in the documents. </think>\n"
_IDENTIFY = re.compile(r'^Which .*? does this description refer to: "(.*)"\?$', re.DOTALL)
_CLOZE = re.compile(r'^Which \w+ fills the blank in this sentence about (.*?): "(.*)"\?$', re.DOTALL)
_BRIDGE = re.compile(
    r'^A sentence about (.*?) reads: "(.*)" Which \w+ fills the blank in this sentence about X: "(.*)"\?$', re.DOTALL
)
_DOC_PREFIX = re.compile(r"^Doc \d+ ?\( ?Title ?: .*?\) ")  # also as a word-level tokenizer decodes it
_OBSERVATION_TAG = re.compile(r"</?(documents|information)>")


@dataclasses.dataclass(frozen=True)
class Hop:
    """One expert search: the query and the text its refine sentence must contain (answer or bridge name)."""

    query: str
    target: str


def _query(words_from: Sequence[str], max_words: int) -> str:
    """Words of the pieces, without the blank `___` and the bridge mask `X`, cut to `max_words`."""
    words = [w for piece in words_from for w in piece.split() if "___" not in w and w.strip('.,;:"()') != "X"]
    return " ".join(words[:max_words])


def expert_hops(example: qa.QAExample, max_query_words: int) -> list[Hop]:
    """The searches of an expert trajectory for an embedded-world question (the question's first words as the
    query for any other question)."""
    answer = example.golden_answers[0]
    question = example.question
    match = compact_qa.MULTI_HOP_PATTERN.match(question)
    if match and len(example.gold_article_ids) == 2:
        bridge_name = qa.surface_title(example.gold_article_ids[1])
        return [Hop(_query([match.group(1)], max_query_words), bridge_name),
                Hop(_query([bridge_name], max_query_words), answer)]
    match = compact_qa.SINGLE_HOP_PATTERN.match(question)
    if match:
        return [Hop(_query([match.group(1)], max_query_words), answer)]
    if example.question_type.startswith("bridge") and len(example.gold_article_ids) == 2:
        match = _BRIDGE.match(question)
        if match:
            bridge_name = qa.surface_title(example.gold_article_ids[1])
            return [
                Hop(_query([match.group(1), match.group(2)], max_query_words), bridge_name),
                Hop(_query([bridge_name, match.group(3)], max_query_words), answer),
            ]
    match = _CLOZE.match(question)
    if match:
        return [Hop(_query([match.group(1), match.group(2)], max_query_words), answer)]
    match = _IDENTIFY.match(question)
    if match:
        return [Hop(_query([match.group(1)], max_query_words), answer)]
    return [Hop(_query([question.rstrip("?")], max_query_words), answer)]


def observation_sentences(observation_text: str) -> list[str]:
    """The sentences of an observation block's documents (`Doc i(Title: ...) text` lines)."""
    sentences = []
    for line in _OBSERVATION_TAG.sub("\n", observation_text).split("\n"):
        text = _DOC_PREFIX.sub("", line.strip())
        if text:
            sentences.extend(qa.split_sentences(text))
    return sentences


def supporting_sentence(observation_text: str, target: str) -> str | None:
    """The first retrieved sentence that contains `target` (as normalised whole words), or None."""
    return next((s for s in observation_sentences(observation_text) if qa.answer_in_text(target, s)), None)


def snippet(sentence: str, target: str, window_words: int) -> str:
    """About `window_words` words of `sentence` centred on `target` (the whole sentence when `window_words <= 0` or
    the target does not occur verbatim, case aside)."""
    start = sentence.lower().find(target.lower())
    if window_words <= 0 or start < 0:
        return sentence
    end = start + len(target)
    half = max((window_words - len(target.split())) // 2, 0)
    before, after = sentence[:start].split(), sentence[end:].split()
    if not half:
        return sentence[start:end]
    return " ".join([*before[len(before) - half :], sentence[start:end], *after[:half]])


def _append_policy(trajectory: rollout.Trajectory, tokenizer: Any, text: str) -> tuple[int, list[int]]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    start, _ = trajectory.append(ids, by_policy=True)
    return start, ids


def expert_trajectories(
    examples: Sequence[qa.QAExample],
    client: SearchClient,
    tokenizer: Any,
    config: rollout.RolloutConfig,
    *,
    max_query_words: int = 12,
    refine_window_words: int = 0,
    use_chat_template: bool = True,
    dropped: list[tuple[str, str]] | None = None,
) -> list[rollout.Trajectory]:
    """Expert trajectories for the examples whose every hop's target sentence is retrieved (others are skipped).

    The refine block holds the supporting sentence, or only about `refine_window_words` words of it around the
    target when that is > 0 (a shorter copy for a tiny policy).
    All queries go to the search client in one batched call. Returns finished `Trajectory`s whose `answer` is the
    gold answer; the final segment ends with the tokenizer's EOS token. `dropped`, when given, receives
    `(example id, reason)` for every question left out.
    """
    plans = [expert_hops(ex, max_query_words) for ex in examples]
    queries = [hop.query for hops in plans for hop in hops]
    results = iter(client.search_or_error(queries, config.topk) if queries else [])
    tag = rollout.OBSERVATION_TAGS[config.dialect]
    out = []
    for example, hops in zip(examples, plans, strict=True):
        hop_results = [next(results) for _ in hops]
        trajectory = rollout.Trajectory(
            prompt_ids=rollout.encode_prompt(tokenizer, example.question, config.dialect, use_chat_template))
        prefix, ok = THINK_TEXT, True
        for hop, result in zip(hops, hop_results, strict=True):
            segment = f"{prefix}<search> {hop.query} </search>"
            start, ids = _append_policy(trajectory, tokenizer, segment)
            char_start = segment.index("<search> ") + len("<search> ")
            span = rollout.char_span_to_token_span(tokenizer, ids, (char_start, char_start + len(hop.query)))
            observation, _ = rollout.encode_observation(tokenizer, result.text, tag, config.max_observation_tokens)
            observation_span = trajectory.append(observation, by_policy=False)
            trajectory.steps.append(rollout.SearchStep(hop.query, (start + span[0], start + span[1]),
                                                       observation_span, result.passages, result.error))
            sentence = None if result.error else supporting_sentence(tokenizer.decode(observation), hop.target)
            if sentence is None:
                ok = False
                reason = (f"hop {len(trajectory.steps)}: search failed" if result.error else
                          f"hop {len(trajectory.steps)}: {hop.target!r} is not in the documents retrieved for "
                          f"{hop.query!r}")
                break
            prefix = f"<refine> {snippet(sentence, hop.target, refine_window_words)} </refine>\n"
        if not ok:
            if dropped is not None:
                dropped.append((example.id, reason))
            continue
        answer = example.golden_answers[0]
        _append_policy(trajectory, tokenizer, f"{prefix}<answer> {answer} </answer>")
        trajectory.append([tokenizer.eos_token_id], by_policy=True)
        trajectory.answer, trajectory.active, trajectory.num_turns = answer, False, len(hops) + 1
        if len(trajectory.response_ids) <= config.max_response_tokens:
            out.append(trajectory)
        elif dropped is not None:
            dropped.append((example.id, f"{len(trajectory.response_ids)} response tokens exceed "
                                        f"max_response_tokens = {config.max_response_tokens}"))
    return out


def copy_batch(
    rng: np.random.Generator, token_ids: np.ndarray, batch_size: int, length: int, span: int = 12
) -> dict[str, np.ndarray]:
    """A synthetic induction batch for the copy pre-training of a tiny policy: each row's prompt is `length` tokens
    drawn uniformly from `token_ids`, its response a `span`-token slice of the prompt starting at a random offset.
    The response's first token is given (not a loss token); every later one is the token that followed the previous
    one in the prompt, so the policy learns to find a token earlier in its context and copy what came next
    (an induction head), for every token of its vocabulary, including words that no training question uses.

    Returns the `trainer.SFT_KEYS` arrays: prompt_tokens/prompt_mask `[batch, length]`, response_tokens/
    response_mask/loss_mask `[batch, span]`.
    """
    if not 1 < span <= length:
        raise ValueError(f"span must be in (1, length={length}], got {span}")
    tokens = rng.choice(token_ids, size=(batch_size, length)).astype(np.int32)
    starts = rng.integers(0, length - span + 1, size=batch_size)
    response = tokens[np.arange(batch_size)[:, None], starts[:, None] + np.arange(span)]
    loss_mask = np.ones((batch_size, span), bool)
    loss_mask[:, 0] = False
    return {"prompt_tokens": tokens, "prompt_mask": np.ones((batch_size, length), bool),
            "response_tokens": response, "response_mask": np.ones((batch_size, span), bool), "loss_mask": loss_mask}


def _replace_subsequence(ids: list[int], old: Sequence[int], new: Sequence[int]) -> list[int]:
    """`ids` with every non-overlapping occurrence of `old` replaced by `new` (same length)."""
    out, i, n = list(ids), 0, len(old)
    while i + n <= len(out):
        if out[i : i + n] == list(old):
            out[i : i + n] = new
            i += n
        else:
            i += 1
    return out


def counterfactual_trajectory(
    trajectory: rollout.Trajectory, tokenizer: Any, token_ids: np.ndarray, rng: np.random.Generator
) -> rollout.Trajectory:
    """A copy of an expert trajectory whose entities (its queries and its answer) are renamed to random tokens of
    `token_ids` everywhere (question, queries, documents, refine, answer), one consistent renaming per entity.

    For a word-level tokenizer every span keeps its length, so the layout (masks, query and observation spans) is
    unchanged. Trained on such copies, a tiny policy cannot answer from memorised names and must copy: the warm
    start's remedy for memorising the train split's names instead of learning to read (compact world)."""
    entities = sorted({s.query for s in trajectory.steps if s.query} | {trajectory.answer or ""} - {""}, key=len,
                      reverse=True)
    prompt, response = list(trajectory.prompt_ids), list(trajectory.response_ids)
    answer = trajectory.answer
    for entity in entities:
        old = list(tokenizer.encode(entity, add_special_tokens=False))
        new = [int(t) for t in rng.choice(token_ids, size=len(old))]
        prompt, response = _replace_subsequence(prompt, old, new), _replace_subsequence(response, old, new)
        if entity == trajectory.answer:
            answer = tokenizer.decode(new)
    steps = [dataclasses.replace(s, query=tokenizer.decode(response[s.query_span[0] : s.query_span[1]]))
             for s in trajectory.steps]
    return dataclasses.replace(trajectory, prompt_ids=prompt, response_ids=response, steps=steps, answer=answer,
                               policy_mask=list(trajectory.policy_mask))
