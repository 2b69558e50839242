"""Multi-turn search rollouts: generate -> parse `<search>` -> retrieve -> append documents -> ... -> `<answer>`.

The loop of Search-R1's `LLMGenerationManager.run_llm_loop` (spec 5.4), batched over every rollout of a step:

1. every active rollout generates one segment, cut after its first `</search>` (else its first `</answer>`);
2. the first `<search>...</search>` or `<answer>...</answer>` of the segment is the action: an answer ends the
   rollout; a search sends the query to the engine (all searching rollouts in one request) and appends the
   observation block (`<information>` for Search-R1, `<documents>` for AutoRefine); anything else appends the
   invalid-action hint and the rollout stays active;
3. after `max_turns` turns, rollouts still active generate once more with search disabled.

Differences from the reference, on purpose: the sampled tokens are kept as sampled (cut after the token that
completes the stop string) rather than decoded and re-tokenized, so the policy's log-probs stay those of the
tokens it produced; and the loss mask is an explicit boolean per token (`policy_mask`), never derived from
pad ids. A query containing a tag (`<search>a <answer>`, nested or malformed tags) is an invalid action.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import numpy as np

from jax_hd.data.qa import PROMPT_TEMPLATES, make_prompt
from jax_hd.decoding import sampling
from jax_hd.retrieval import Passage
from jax_hd.retrieval.client import SearchClient, format_observation

ACTION_PATTERN = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
TAG_PATTERN = re.compile(r"</?(search|answer|think|information|documents|refine)>")

INVALID_ACTION_HINT = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n"
)

OBSERVATION_TAGS = {"search_r1": "information", "autorefine": "documents"}


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """dialect: "search_r1" or "autorefine" (tags, template and observation block).
    max_turns: generation turns with search enabled, before the final search-disabled turn.
    topk: passages per search.
    max_segment_tokens: tokens generated per turn.
    max_observation_tokens: an observation longer than this is cut per document and keeps its closing tag
      (`encode_observation`; counted in the stats).
    max_response_tokens: the whole response (generated + observations) budget; a rollout that reaches it stops.
    """

    dialect: str = "autorefine"
    max_turns: int = 4
    topk: int = 3
    max_segment_tokens: int = 256
    max_observation_tokens: int = 512
    max_response_tokens: int = 2048

    def __post_init__(self):
        if self.dialect not in PROMPT_TEMPLATES:
            raise ValueError(f"dialect must be one of {sorted(PROMPT_TEMPLATES)}, got {self.dialect!r}")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Policy(Protocol):
    def generate(
        self, contexts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_strings: Sequence[str]
    ) -> list[list[int]]:
        """One continuation per context, ending right after the first stop string it produced (if any)."""
        ...


@dataclasses.dataclass(frozen=True)
class SearchStep:
    """One search action. Spans are `[start, end)` token indices into the trajectory's `response_ids`."""

    query: str
    query_span: tuple[int, int]
    observation_span: tuple[int, int]
    passages: tuple[Passage, ...]
    failed: bool


@dataclasses.dataclass
class Trajectory:
    """A finished rollout. `policy_mask[i]` is True iff the policy generated `response_ids[i]`."""

    prompt_ids: list[int]
    response_ids: list[int] = dataclasses.field(default_factory=list)
    policy_mask: list[bool] = dataclasses.field(default_factory=list)
    steps: list[SearchStep] = dataclasses.field(default_factory=list)
    answer: str | None = None
    num_turns: int = 0
    num_invalid: int = 0
    truncated: bool = False
    active: bool = True

    def append(self, ids: Sequence[int], by_policy: bool) -> tuple[int, int]:
        start = len(self.response_ids)
        self.response_ids.extend(int(i) for i in ids)
        self.policy_mask.extend([by_policy] * len(ids))
        return start, len(self.response_ids)


def encode_prompt(tokenizer: Any, question: str, dialect: str, use_chat_template: bool = True) -> list[int]:
    """Prompt ids: the template as one user message through the tokenizer's chat template when it has one."""
    text = make_prompt(question, dialect)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        # The template as text, then encoded: `tokenize=True` returns a BatchEncoding in transformers 5.
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def fair_shares(lengths: Sequence[int], budget: int) -> list[int]:
    """How many of each item's `lengths` to keep so that the total is at most `budget`: every item gets an equal
    share, and what a short item does not use goes to the longer ones (water-filling)."""
    shares = [0] * len(lengths)
    remaining = max(budget, 0)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for position, i in enumerate(order):
        shares[i] = min(lengths[i], remaining // (len(order) - position))
        remaining -= shares[i]
    return shares


def encode_observation(tokenizer: Tokenizer, body: str, tag: str, max_tokens: int) -> tuple[list[int], bool]:
    """Ids of the observation block `format_observation(body, tag)` and whether it had to be cut.

    A block longer than `max_tokens` is cut per document (each `Doc i(...)` line keeps a fair share of the
    budget, `fair_shares`), never across them, and always ends with its closing tag, so the policy sees every
    retrieved document's beginning and a well-formed block.
    """
    ids = list(tokenizer.encode(format_observation(body, tag), add_special_tokens=False))
    if len(ids) <= max_tokens:
        return ids, False
    head = list(tokenizer.encode(f"\n\n<{tag}>", add_special_tokens=False))
    tail = list(tokenizer.encode(f"</{tag}>\n\n", add_special_tokens=False))
    newline = list(tokenizer.encode("\n", add_special_tokens=False))
    documents = [list(tokenizer.encode(line, add_special_tokens=False))
                 for line in body.strip().split("\n") if line.strip()]
    separators = len(newline) * max(len(documents) - 1, 0)
    shares = fair_shares([len(d) for d in documents], max_tokens - len(head) - len(tail) - separators)
    kept = [document[:share] for document, share in zip(documents, shares, strict=True)]
    body_ids = [token for i, document in enumerate(kept) for token in (newline if i else []) + document]
    return (head + body_ids + tail)[:max_tokens], True


def cut_segment(text: str) -> str:
    """Search-R1's cut: after the first `</search>` if any, else after the first `</answer>`."""
    for tag in ("</search>", "</answer>"):
        if tag in text:
            return text[: text.index(tag) + len(tag)]
    return text


def parse_action(text: str) -> tuple[str | None, str, tuple[int, int]]:
    """(action, content, content char span) of the first `<search|answer>...</...>`; (None, "", (0, 0)) if none.

    A content that contains another tag is malformed: the action is None.
    """
    match = ACTION_PATTERN.search(text)
    if match is None or TAG_PATTERN.search(match.group(2)):
        return None, "", (0, 0)
    content = match.group(2)
    start = match.start(2) + (len(content) - len(content.lstrip()))
    return match.group(1), content.strip(), (start, start + len(content.strip()))


def char_span_to_token_span(tokenizer: Tokenizer, ids: Sequence[int], span: tuple[int, int]) -> tuple[int, int]:
    """Token indices `[i, j)` of `ids` whose decoded text covers the char span `[a, b)` of `decode(ids)`."""
    a, b = span
    ends = [len(tokenizer.decode(list(ids[: k + 1]))) for k in range(len(ids))]
    start = next((k for k, end in enumerate(ends) if end > a), len(ids))
    stop = next((k + 1 for k, end in enumerate(ends) if end >= b), len(ids))
    return start, max(start, stop)


def _token_count_within(tokenizer: Tokenizer, ids: Sequence[int], num_chars: int) -> int:
    """Smallest k such that decode(ids[:k]) has at least num_chars characters."""
    for k in range(len(ids) + 1):
        if len(tokenizer.decode(list(ids[:k]))) >= num_chars:
            return k
    return len(ids)


def run_rollouts(
    policy: Policy,
    client: SearchClient,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    config: RolloutConfig,
) -> tuple[list[Trajectory], dict[str, float]]:
    """Runs every prompt's rollout to its answer, its end of turn (a segment ending with the tokenizer's EOS
    without a search or an answer: no answer), its budget or the last turn; returns (trajectories, stats)."""
    trajectories = [Trajectory(prompt_ids=list(p)) for p in prompts]
    tag = OBSERVATION_TAGS[config.dialect]
    eos_id = getattr(tokenizer, "eos_token_id", None)
    stats = {"observations_truncated": 0.0, "search_failures": 0.0}

    def generate(active: list[Trajectory], stop_strings: Sequence[str]) -> list[list[int]]:
        budgets = [config.max_response_tokens - len(t.response_ids) for t in active]
        new_tokens = min(config.max_segment_tokens, max(budgets))
        contexts = [t.prompt_ids + t.response_ids for t in active]
        segments = policy.generate(contexts, max_new_tokens=new_tokens, stop_strings=stop_strings)
        return [seg[:budget] for seg, budget in zip(segments, budgets, strict=True)]

    for _ in range(config.max_turns):
        active = [t for t in trajectories if t.active]
        if not active:
            break
        segments = generate(active, ("</search>", "</answer>"))
        searching: list[tuple[Trajectory, str, tuple[int, int]]] = []
        for trajectory, segment in zip(active, segments, strict=True):
            text = tokenizer.decode(segment)
            kept = cut_segment(text)
            if len(kept) < len(text):
                segment = segment[: _token_count_within(tokenizer, segment, len(kept))]
                text = tokenizer.decode(segment)
            action, content, span = parse_action(text)
            start, _ = trajectory.append(segment, by_policy=True)
            trajectory.num_turns += 1
            if action == "answer":
                trajectory.answer, trajectory.active = content, False
            elif action == "search":
                token_span = char_span_to_token_span(tokenizer, segment, span)
                searching.append((trajectory, content, (start + token_span[0], start + token_span[1])))
            elif eos_id is not None and segment and segment[-1] == eos_id:  # Ended its turn: no answer.
                trajectory.active = False
            else:
                trajectory.num_invalid += 1
                trajectory.append(tokenizer.encode(INVALID_ACTION_HINT, add_special_tokens=False), by_policy=False)
        results = client.search_or_error([query for _, query, _ in searching], config.topk) if searching else []
        for (trajectory, query, query_span), result in zip(searching, results, strict=True):
            observation, cut = encode_observation(tokenizer, result.text, tag, config.max_observation_tokens)
            stats["observations_truncated"] += cut
            stats["search_failures"] += float(result.error)
            observation_span = trajectory.append(observation, by_policy=False)
            trajectory.steps.append(SearchStep(query, query_span, observation_span, result.passages, result.error))
        for trajectory in trajectories:
            if trajectory.active and len(trajectory.response_ids) >= config.max_response_tokens:
                trajectory.truncated, trajectory.active = True, False

    active = [t for t in trajectories if t.active]
    if active:  # One last turn with search disabled: an answer counts, a search is not run.
        for trajectory, segment in zip(active, generate(active, ("</answer>",)), strict=True):
            trajectory.append(segment, by_policy=True)
            trajectory.num_turns += 1
            action, content, _ = parse_action(tokenizer.decode(segment))
            trajectory.answer = content if action == "answer" else None
            trajectory.active = False
    for trajectory in trajectories:
        if len(trajectory.response_ids) > config.max_response_tokens:
            del trajectory.response_ids[config.max_response_tokens :]
            del trajectory.policy_mask[config.max_response_tokens :]
            trajectory.truncated = True
    n = max(len(trajectories), 1)
    stats.update(
        searches_per_rollout=sum(len(t.steps) for t in trajectories) / n,
        invalid_actions_per_rollout=sum(t.num_invalid for t in trajectories) / n,
        answer_rate=sum(t.answer is not None for t in trajectories) / n,
        policy_token_fraction=sum(sum(t.policy_mask) for t in trajectories) / max(
            sum(len(t.policy_mask) for t in trajectories), 1),
    )
    return trajectories, stats


def pack_trajectories(
    trajectories: Sequence[Trajectory], prompt_len: int, response_len: int, pad_id: int
) -> dict[str, np.ndarray]:
    """Fixed-shape arrays for the trainer: prompts left-padded, responses right-padded.

    Returns prompt_tokens/prompt_mask `[batch, prompt_len]`, response_tokens/response_mask/loss_mask/
    query_token_mask `[batch, response_len]` (loss_mask: policy tokens; query_token_mask: tokens of search
    queries; both boolean and always False on padding) and query_step_index `[batch, response_len]` int32 (the
    index into `trajectory.steps` of each query token, -1 elsewhere; what `grpo.token_advantages` takes).
    """
    batch = len(trajectories)
    out = {
        "prompt_tokens": np.full((batch, prompt_len), pad_id, np.int32),
        "prompt_mask": np.zeros((batch, prompt_len), bool),
        "response_tokens": np.full((batch, response_len), pad_id, np.int32),
        "response_mask": np.zeros((batch, response_len), bool),
        "loss_mask": np.zeros((batch, response_len), bool),
        "query_token_mask": np.zeros((batch, response_len), bool),
        "query_step_index": np.full((batch, response_len), -1, np.int32),
    }
    for b, t in enumerate(trajectories):
        if len(t.prompt_ids) > prompt_len or len(t.response_ids) > response_len:
            raise ValueError(f"row {b}: prompt {len(t.prompt_ids)} / response {len(t.response_ids)} tokens exceed "
                             f"{prompt_len} / {response_len}")
        out["prompt_tokens"][b, prompt_len - len(t.prompt_ids):] = t.prompt_ids
        out["prompt_mask"][b, prompt_len - len(t.prompt_ids):] = True
        n = len(t.response_ids)
        out["response_tokens"][b, :n] = t.response_ids
        out["response_mask"][b, :n] = True
        out["loss_mask"][b, :n] = t.policy_mask
        for index, step in enumerate(t.steps):
            out["query_token_mask"][b, step.query_span[0]:step.query_span[1]] = True
            out["query_step_index"][b, step.query_span[0]:step.query_span[1]] = index
    return out


class SamplerPolicy:
    """A `Policy` backed by `sampling.Sampler` (stop strings: early exit on device, exact cut on the host; the
    tokenizer's EOS token also ends a segment)."""

    def __init__(self, sampler: sampling.Sampler, params: Any, tokenizer: Any, rng: jax.Array,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0):
        self.sampler, self.params, self.tokenizer = sampler, params, tokenizer
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._rng, self._calls = rng, 0
        self._eos_id = getattr(tokenizer, "eos_token_id", None)

    def generate(
        self, contexts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_strings: Sequence[str]
    ) -> list[list[int]]:
        rng = jax.random.fold_in(self._rng, self._calls)
        self._calls += 1
        output = self.sampler.generate(
            self.params, contexts, max_new_tokens=max_new_tokens, rng=rng, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k,
            stop_sequences=sampling.stop_string_sequences(self.tokenizer, stop_strings),
            stop_token_ids=[] if self._eos_id is None else [self._eos_id],
        )
        output, _ = sampling.truncate_at_stop_strings(output, self.tokenizer, stop_strings, self.sampler.config.pad_id)
        return [output.tokens[b, : output.lengths[b]].tolist() for b in range(len(contexts))]
