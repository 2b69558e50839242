"""Information gain (IG) of each search step: how much the step's retrieved documents raise log p(gold answer).

For search step t of a rollout with gold answer a* (spec §2.1):

    IG_t = score(a* | C_t^real) - (1/N) sum_j score(a* | C_t^rand,j)

where `score` is a head-weighted mean of teacher-forced gold-answer token log-probs under the ROLLOUT-TIME
params (no gradient), C_t^real is the context skeleton up to step t with its real (documents, refine) pair and
C_t^rand,j the same skeleton with that pair replaced by a random pair drawn from the batch.

Pipeline (host text -> one bucketed device pass -> host numbers):

1. `rollout_steps`: decode prompt + response, parse the response's `<search>`/`<documents>`/`<refine>` blocks
   (`parse_steps`) and keep the ones that are real observations of `trajectory.steps` (by token span);
2. `plan_sequences`: for every valid step, one REAL and N RANDOM context strings per gold variant
   (`build_context` + the answer prefix, joined to the gold as `answer_join` says), with random pairs from the
   batch-wide pool (`sample_pairs`);
3. `SequenceScorer`: context tokens (left-truncated, left-padded) + gold tokens (right-padded), sorted into
   (rows, context, answer) buckets and micro-batches, one jitted forward per micro-batch (`make_score_fn`:
   fp32 log-softmax, next-token log-prob of each gold token), sharded over `data` x `fsdp` with a mesh;
4. `weighted_score` per sequence, then `ig_from_scores`: IG per step, aggregated `r_ig`, diagnostics.

`step_ig_token_values` places each step's IG on its query tokens for the GRPO advantage modulation.

Where we differ from the reference `ig_reward.py` (only on malformed text; identical on well-formed rollouts):

* the assistant turn starts after the prompt's decoded text (we know the prompt), not at `<|im_start|>assistant`;
* the search block of a documents block is the nearest complete `<search>...</search>` before it and after the
  previous documents block (the reference pairs the i-th search with the i-th documents; the two agree whenever
  searches and documents alternate, but the invalid-action hint and an invalid search contain `<search>` blocks
  that shift the reference's pairing);
* a missing `</documents>` (an observation truncated to `max_observation_tokens`) is tolerated like a missing
  `</refine>` (spec §2.6): the block ends at the next agent tag and is closed synthetically (the reference's regex
  would glue it to the next observation's `</documents>`);
* a missing `</refine>` ends at the next `<search>`, `<answer>`, observation tag or `<refine>` (the reference needs
  a newline before `<search>`/`<answer>`);
* with trajectories, only documents blocks that are real observations count as steps (text the policy wrote
  inside `<documents>` tags is dropped like other free text), and failed searches are not scored nor pooled
  (`skip_failed_searches`);
* the N random pairs of a step are drawn once and shared by all gold variants (the reference draws per variant).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.decoding import sampling
from jax_hd.igsearch import rollout
from jax_hd.models import qwen2

AGGREGATIONS = ("mean", "sum", "max")
# How the scored gold answer meets its context (IGConfig.answer_join).
ANSWER_JOINS = ("reference", "space_joined")
REAL, RANDOM = "real", "random"
# Opening tags that end an unclosed observation block (spec §2.6 tolerance, extended to observations).
_AGENT_OPEN_TAGS = ("<think>", "<search>", "<answer>", "<refine>", "<documents>", "<information>")
# A complete search block that does not contain another `<search>` opening.
_SEARCH_BLOCK_RE = re.compile(r"<search>(?:(?!<search>).)*?</search>", re.DOTALL)

Gold = str | Sequence[str] | np.ndarray | Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class IGConfig:
    """Every knob of the IG reward; defaults are the reference code's (spec §2) unless noted.

    n_random: N, random (documents, refine) pairs per step (`n_random_per_step=3`).
    exclude_same_question: True (our default, the README's "random documents from other questions"): the random
      pool excludes every pair of the target's question (its group id, e.g. the GRPO uid), including its siblings
      and its own other steps. False reproduces the reference code: the batch-wide pool minus the identical pair
      (spec §2.4).
    min_documents_chars: a step is scored and pooled only if its documents content, tags stripped, has at least
      this many characters (spec §2.6).
    max_context_tokens: contexts (answer prefix included) keep their LAST this many tokens (left truncation).
    n_head_tokens, head_weight: the first `n_head_tokens` gold tokens weigh `head_weight`, the rest 1 (§2.2 step 4).
    max_gold_variants: how many of a question's gold answers are scored; IG uses the one with the best REAL score.
    aggregation: per-rollout `r_ig` from its step IGs: "mean" | "sum" | "max" (0.0 without steps).
    answer_prefix: appended to the context skeleton; it is part of the CONTEXT string (tokenized together with
      it) while the gold answer is tokenized on its own: its tokens are the only scored ones.
    answer_join: where the context ends and the scored text starts (`scoring_context` / `scored_answer`):
      "reference" (the authors' `ig_reward.py`, our default): the context ends with the whole `answer_prefix`
      ("...\n<answer> ") and the scored text is the gold as is ("George"). With a byte-level BPE tokenizer the
      context then ends with a lone-space token and the gold's first token has no leading space, a token layout
      a policy that writes "<answer> George" (one space-led word token " George") never produces.
      "space_joined": the context ends with `answer_prefix` without its trailing whitespace ("...\n<answer>") and
      the scored text is " " + gold (" George"): the tokens the policy itself writes after `<answer>`.
    dialect: "autorefine" (`<documents>` observations) or "search_r1" (`<information>`, no refine blocks).
    skip_failed_searches: steps whose search failed (`SearchStep.failed`, an error text in the observation) are not
      scored and not pooled, so a retrieval outage never penalises a query (ours; the reference cannot tell).
    seed: the random pool draws use `np.random.default_rng([seed, step])` for the caller's training `step`, so a
      resumed run draws the same pairs.
    context_buckets: allowed padded context lengths (max >= max_context_tokens).
    answer_buckets: allowed padded gold-answer lengths (a longer gold is scored on its first max(answer_buckets)
      tokens and counted in the diagnostics as `ig/answers_truncated`).
    micro_batch_size: rows per forward (rounded up to a multiple of data*fsdp); bounds memory: the model's logits
      alone take rows * (context + answer bucket) * vocab * 4 bytes, spread over the mesh.
    pad_id: id of padding tokens (masked out; any id works).
    """

    n_random: int = 3
    exclude_same_question: bool = True
    min_documents_chars: int = 10
    max_context_tokens: int = 4096
    n_head_tokens: int = 3
    head_weight: float = 3.0
    max_gold_variants: int = 1
    aggregation: str = "mean"
    answer_prefix: str = "\n<answer> "
    answer_join: str = "reference"
    dialect: str = "autorefine"
    skip_failed_searches: bool = True
    seed: int = 0
    context_buckets: tuple[int, ...] = (256, 512, 1024, 2048, 4096)
    answer_buckets: tuple[int, ...] = (8, 16, 32, 64, 128)
    micro_batch_size: int = 16
    pad_id: int = 0

    def __post_init__(self):
        object.__setattr__(self, "context_buckets", tuple(sorted(int(b) for b in self.context_buckets)))
        object.__setattr__(self, "answer_buckets", tuple(sorted(int(b) for b in self.answer_buckets)))
        checks = {
            "n_random >= 1": self.n_random >= 1,
            "min_documents_chars >= 0": self.min_documents_chars >= 0,
            "max_context_tokens >= 1": self.max_context_tokens >= 1,
            "n_head_tokens >= 0": self.n_head_tokens >= 0,
            "head_weight > 0": self.head_weight > 0,
            "max_gold_variants >= 1": self.max_gold_variants >= 1,
            "micro_batch_size >= 1": self.micro_batch_size >= 1,
            "context_buckets and answer_buckets are non-empty and positive": bool(
                self.context_buckets and self.answer_buckets and min(self.context_buckets + self.answer_buckets) > 0),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"IGConfig: expected {', '.join(failed)}; got {self}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"IGConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.answer_join not in ANSWER_JOINS:
            raise ValueError(f"IGConfig.answer_join must be one of {ANSWER_JOINS}, got {self.answer_join!r}")
        if self.dialect not in rollout.OBSERVATION_TAGS:
            raise ValueError(
                f"IGConfig.dialect must be one of {sorted(rollout.OBSERVATION_TAGS)}, got {self.dialect!r}")
        if self.context_buckets[-1] < self.max_context_tokens:
            raise ValueError(f"IGConfig: the largest context bucket {self.context_buckets[-1]} is below "
                             f"max_context_tokens {self.max_context_tokens}")

    @property
    def observation_tag(self) -> str:
        return rollout.OBSERVATION_TAGS[self.dialect]

    def scoring_context(self, skeleton: str) -> str:
        """The context string a gold answer is scored after: the skeleton + the answer prefix (`answer_join`)."""
        if self.answer_join == "space_joined":
            return skeleton + self.answer_prefix.rstrip()
        return skeleton + self.answer_prefix

    def scored_answer(self, gold: str) -> str:
        """The text whose tokens are scored for a gold answer (tokenized on its own, `answer_join`)."""
        return " " + gold if self.answer_join == "space_joined" else gold


# ----------------------------------------------------------------------------------------------------------------
# Text: parsing the response and building context skeletons (spec §2.3, §2.6).


@dataclasses.dataclass(frozen=True)
class StepBlocks:
    """The text blocks of one search step, verbatim with their tags.

    search: `<search>...</search>` ("" when no complete search block precedes the documents).
    documents: `<documents>...</documents>` (closed synthetically when the observation was truncated).
    refine: `<refine>...</refine>` ("" when the model wrote none; closed synthetically when unclosed).
    documents_start: char offset of the documents block in the response text.
    """

    search: str
    documents: str
    refine: str
    documents_start: int


def _first_of(text: str, needles: Sequence[str], start: int) -> int:
    """Smallest index >= start where one of `needles` occurs in `text`; len(text) when none does."""
    found = [i for i in (text.find(n, start) for n in needles) if i != -1]
    return min(found, default=len(text))


def _tolerant_blocks(text: str, tag: str, stops: Sequence[str]) -> list[tuple[int, int, str]]:
    """Every `<tag>` opening of `text` as (start, end, block text).

    The block is `<tag>...</tag>` verbatim when `</tag>` comes before any of `stops` and before the next `<tag>`;
    otherwise it ends there (or at the end of the text) and is closed synthetically: `<tag>` + stripped content +
    `</tag>` (the reference's treatment of a missing `</refine>`).
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    blocks = []
    for match in re.finditer(re.escape(opening), text):
        content_start = match.end()
        stop = _first_of(text, (opening, *stops), content_start)
        close = text.find(closing, content_start)
        if close != -1 and close < stop:
            end = close + len(closing)
            blocks.append((match.start(), end, text[match.start():end]))
        else:
            blocks.append((match.start(), stop, opening + text[content_start:stop].strip() + closing))
    return blocks


def strip_tags(block: str, tag: str) -> str:
    """The content of a `<tag>...</tag>` block: every `<tag>`/`</tag>` removed, whitespace stripped."""
    return block.replace(f"<{tag}>", "").replace(f"</{tag}>", "").strip()


def parse_steps(response_text: str, observation_tag: str = "documents") -> list[StepBlocks]:
    """The search steps of an assistant turn, in order: one per observation (`<documents>`) block.

    Each observation is paired with the first `<refine>` block that starts after it and before the next
    observation, and with the nearest complete `<search>` block before it (and after the previous observation).
    Free text between blocks (`<think>`, hints) is not part of any step.
    """
    text = response_text
    observations = _tolerant_blocks(text, observation_tag, _AGENT_OPEN_TAGS)
    refines = _tolerant_blocks(text, "refine", ("<search>", "<answer>", f"<{observation_tag}>"))
    searches = [(m.start(), m.end(), m.group()) for m in _SEARCH_BLOCK_RE.finditer(text)]
    steps = []
    for i, (start, end, documents) in enumerate(observations):
        previous_end = observations[i - 1][1] if i else 0
        next_start = observations[i + 1][0] if i + 1 < len(observations) else len(text)
        search = next((b for s, e, b in reversed(searches) if s >= previous_end and e <= start), "")
        refine = next((b for s, _, b in refines if end <= s < next_start), "")
        steps.append(StepBlocks(search=search, documents=documents, refine=refine, documents_start=start))
    return steps


def context_prefix(prompt_text: str, response_text: str, observation_tag: str = "documents") -> str:
    """The skeleton's first block: the prompt and the response up to its first `<search>`, trailing space stripped.

    Only the response is searched, so the prompt template's mentions of `<search>` are never taken for a step.
    Without any `<search>` (only possible for hand-written text) the cut is the first observation block.
    """
    cut = response_text.find("<search>")
    if cut == -1:
        cut = response_text.find(f"<{observation_tag}>")
    return (prompt_text + (response_text if cut == -1 else response_text[:cut])).rstrip()


def build_context(
    prefix: str, steps: Sequence[StepBlocks], target: int, replacement: tuple[str, str] | None = None
) -> str:
    """The context skeleton for scoring step `target` (spec §2.3), blocks joined by "\\n".

    prefix, then for every earlier step its search, documents and refine blocks, then the target's search block
    and either its own (documents, refine) pair (`replacement=None`, REAL) or `replacement = (documents, refine)`
    (RANDOM; both blocks replaced together). Later steps are dropped. Empty search/refine blocks are omitted.
    """
    blocks: list[str] = []
    for step in steps[:target]:
        blocks += [step.search, step.documents, step.refine]
    documents, refine = replacement if replacement is not None else (steps[target].documents, steps[target].refine)
    blocks += [steps[target].search, documents, refine]
    return "\n".join([prefix, *(block for block in blocks if block)])


# ----------------------------------------------------------------------------------------------------------------
# From trajectories to steps.


@dataclasses.dataclass(frozen=True)
class RolloutSteps:
    """What IG needs from one rollout.

    prefix: the skeleton prefix (`context_prefix`).
    blocks: the rollout's steps in order (context material for later steps, valid or not).
    step_indices: for each block, its index into `trajectory.steps` (the text position for text-only input).
    valid: for each block, whether it is scored and pooled (enough documents text, search not failed).
    """

    prefix: str
    blocks: tuple[StepBlocks, ...] = ()
    step_indices: tuple[int, ...] = ()
    valid: tuple[bool, ...] = ()


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """`tokenizer.decode(ids)` keeping special tokens (chat markup) when the tokenizer has that option."""
    try:
        return tokenizer.decode(list(ids), skip_special_tokens=False)
    except TypeError:
        return tokenizer.decode(list(ids))


def _is_valid(block: StepBlocks, failed: bool, config: IGConfig) -> bool:
    content = strip_tags(block.documents, config.observation_tag)
    return len(content) >= config.min_documents_chars and not (failed and config.skip_failed_searches)


def rollout_steps_from_text(
    prompt_text: str, response_text: str, config: IGConfig, failed: Sequence[bool] = ()
) -> RolloutSteps:
    """`RolloutSteps` of a decoded rollout; step i is the i-th observation block (`failed[i]`: its search failed)."""
    blocks = parse_steps(response_text, config.observation_tag)
    flags = (list(failed) + [False] * len(blocks))[: len(blocks)]
    return RolloutSteps(
        prefix=context_prefix(prompt_text, response_text, config.observation_tag),
        blocks=tuple(blocks),
        step_indices=tuple(range(len(blocks))),
        valid=tuple(_is_valid(b, f, config) for b, f in zip(blocks, flags, strict=True)),
    )


def rollout_steps(trajectory: rollout.Trajectory, tokenizer: Any, config: IGConfig) -> RolloutSteps:
    """`RolloutSteps` of a trajectory: text from `decode(prompt_ids + response_ids)`, steps matched to
    `trajectory.steps` by their observation token spans (an observation block the policy wrote is dropped)."""
    prompt, response = list(trajectory.prompt_ids), list(trajectory.response_ids)
    prompt_text = decode_text(tokenizer, prompt)
    full_text = decode_text(tokenizer, prompt + response)
    response_text = decode_text(tokenizer, response)
    base, base_chars = [], 0  # decode(base + response[:k]) has base_chars + (chars of the first k tokens).
    if full_text != prompt_text + response_text and full_text.startswith(prompt_text):
        # The joint decoding differs at the boundary: take the response part of the joint text.
        response_text, base, base_chars = full_text[len(prompt_text):], prompt, len(prompt_text)

    def char_offset(k: int) -> int:
        return len(decode_text(tokenizer, base + response[:k])) - base_chars

    observation_chars = [(char_offset(s.observation_span[0]), char_offset(s.observation_span[1]))
                         for s in trajectory.steps]
    blocks, indices, valid = [], [], []
    for block in parse_steps(response_text, config.observation_tag):
        index = next((i for i, (a, b) in enumerate(observation_chars) if a <= block.documents_start < b), None)
        if index is None or index in indices:
            continue
        blocks.append(block)
        indices.append(index)
        valid.append(_is_valid(block, trajectory.steps[index].failed, config))
    return RolloutSteps(context_prefix(prompt_text, response_text, config.observation_tag), tuple(blocks),
                        tuple(indices), tuple(valid))


# ----------------------------------------------------------------------------------------------------------------
# The random pool (spec §2.4).


@dataclasses.dataclass(frozen=True)
class PoolEntry:
    """A (documents, refine) pair of a valid step, with where it came from."""

    documents: str
    refine: str
    trajectory: int
    step: int  # index into that trajectory's `trajectory.steps`
    group: Hashable  # question id of that trajectory

    @property
    def pair(self) -> tuple[str, str]:
        return self.documents, self.refine


def build_pool(rollouts: Sequence[RolloutSteps], group_ids: Sequence[Hashable]) -> list[PoolEntry]:
    """Every valid step of every rollout in the batch, in (rollout, step) order."""
    return [
        PoolEntry(block.documents, block.refine, r, index, group_ids[r])
        for r, steps in enumerate(rollouts)
        for block, index, ok in zip(steps.blocks, steps.step_indices, steps.valid, strict=True)
        if ok
    ]


def pool_candidates(
    pool: Sequence[PoolEntry], pair: tuple[str, str], group: Hashable, exclude_same_question: bool
) -> tuple[list[int], int]:
    """Indices of the pool entries a step may draw from, and the fallback level used.

    Level 0: every entry whose pair differs from `pair` (by text, as the reference) and, when
    `exclude_same_question`, whose group differs from `group`. Level 1 (only with `exclude_same_question`, when
    level 0 is empty, e.g. a batch of one question): the reference rule, every entry whose pair differs. Level 2
    (nothing else exists): the whole pool, as the reference falls back to it (this may hold the identical pair,
    which gives IG = 0 for that draw).
    """
    different = [i for i, e in enumerate(pool) if e.pair != pair]
    if exclude_same_question:
        other_questions = [i for i in different if pool[i].group != group]
        if other_questions:
            return other_questions, 0
        if different:
            return different, 1
    elif different:
        return different, 0
    return list(range(len(pool))), 2


def sample_pairs(
    pool: Sequence[PoolEntry],
    pair: tuple[str, str],
    group: Hashable,
    n: int,
    exclude_same_question: bool,
    rng: np.random.Generator,
) -> tuple[list[PoolEntry], int]:
    """N random pool entries for a step (without replacement when there are >= N candidates, else with), and the
    fallback level (`pool_candidates`). Deterministic given the generator's state."""
    candidates, level = pool_candidates(pool, pair, group, exclude_same_question)
    picks = rng.choice(len(candidates), size=n, replace=len(candidates) < n)
    return [pool[candidates[int(i)]] for i in picks], level


# ----------------------------------------------------------------------------------------------------------------
# Scoring sequences and IG from their scores.


@dataclasses.dataclass(frozen=True)
class ScoringSequence:
    """One teacher-forced sequence: `context` (`IGConfig.scoring_context`) then `answer`, the scored text of a gold
    variant (`IGConfig.scored_answer`).

    trajectory, step: the scored step (`step` indexes `trajectory.steps`); variant: gold variant index;
    kind: REAL or RANDOM; source: (trajectory, step) whose (documents, refine) pair sits at the target step.
    """

    trajectory: int
    step: int
    variant: int
    kind: str
    context: str
    answer: str
    source: tuple[int, int]


def gold_variants(gold: Gold, max_variants: int) -> list[str]:
    """Gold answers as strings: a string, a list/array, or `{"target": [...]}`; the first `max_variants`."""
    target = gold["target"] if isinstance(gold, Mapping) and "target" in gold else gold
    if isinstance(target, str):
        return [target]
    if isinstance(target, (Sequence, np.ndarray)):
        return [str(t) for t in list(target)[:max_variants]]
    return [str(target)]


def plan_sequences(
    rollouts: Sequence[RolloutSteps],
    gold_answers: Sequence[Gold],
    config: IGConfig,
    rng: np.random.Generator,
    group_ids: Sequence[Hashable] | None = None,
) -> tuple[list[ScoringSequence], dict[str, float]]:
    """The REAL and N RANDOM sequences of every valid step and gold variant, and pool statistics.

    group_ids: one question id per rollout (e.g. the GRPO uid); default: every rollout is its own question.
    The N random pairs of a step are drawn once and shared by its gold variants.
    """
    if len(gold_answers) != len(rollouts):
        raise ValueError(f"{len(rollouts)} rollouts but {len(gold_answers)} gold answers")
    group_ids = list(range(len(rollouts))) if group_ids is None else list(group_ids)
    if len(group_ids) != len(rollouts):
        raise ValueError(f"{len(rollouts)} rollouts but {len(group_ids)} group ids")
    pool = build_pool(rollouts, group_ids)
    sequences: list[ScoringSequence] = []
    fallbacks = 0
    for r, steps in enumerate(rollouts):
        golds = gold_variants(gold_answers[r], config.max_gold_variants)
        for t, (block, index, ok) in enumerate(zip(steps.blocks, steps.step_indices, steps.valid, strict=True)):
            if not ok or not golds:
                continue
            randoms, level = sample_pairs(pool, (block.documents, block.refine), group_ids[r], config.n_random,
                                          config.exclude_same_question, rng)
            fallbacks += level > 0
            real = config.scoring_context(build_context(steps.prefix, steps.blocks, t))
            counterfactuals = [(config.scoring_context(build_context(steps.prefix, steps.blocks, t, e.pair)),
                                (e.trajectory, e.step)) for e in randoms]
            for v, gold in enumerate(golds):
                answer = config.scored_answer(gold)
                sequences.append(ScoringSequence(r, index, v, REAL, real, answer, (r, index)))
                sequences += [ScoringSequence(r, index, v, RANDOM, context, answer, source)
                              for context, source in counterfactuals]
    return sequences, {"ig/pool_size": float(len(pool)), "ig/pool_fallback_steps": float(fallbacks)}


def head_weights(length: int, n_head_tokens: int = 3, head_weight: float = 3.0) -> np.ndarray:
    """`[length]` weights summing to 1: `head_weight` for the first `n_head_tokens` tokens, 1 for the rest.

    E.g. length 4 -> [0.3, 0.3, 0.3, 0.1]. Equals the reference's "renormalise to mean 1, then average".
    """
    weights = np.ones(length, np.float64)
    weights[: min(n_head_tokens, length)] = head_weight
    return weights / max(weights.sum(), 1e-30)


def weighted_score(logprobs: np.ndarray, n_head_tokens: int = 3, head_weight: float = 3.0) -> float:
    """Head-weighted mean of a gold answer's token log-probs `[L]`; 0.0 when L = 0 (spec §2.2 step 4)."""
    logprobs = np.asarray(logprobs, np.float64)
    if logprobs.size == 0:
        return 0.0
    return float(np.sum(head_weights(logprobs.size, n_head_tokens, head_weight) * logprobs))


@dataclasses.dataclass
class IGResult:
    """IG of a batch of rollouts.

    step_igs[i]: IG of each scored step of rollout i, in step order ([] when none).
    step_indices[i]: the matching indices into `trajectories[i].steps` (map them to `query_span`s).
    r_ig: `[batch]` float32, each rollout's aggregated step IG (0.0 without scored steps).
    diagnostics: "ig/..." scalars (see `ig_from_scores`).
    step_real_scores[i]: the score of the gold answer with each scored step's real (documents, refine) pair (the
      best gold variant's), aligned with `step_igs[i]`; step_random_scores[i]: the N scores with random pairs
      behind each step's baseline. IG = real - mean(random), so a user can see why a step got its IG.
    """

    step_igs: list[list[float]]
    step_indices: list[list[int]]
    r_ig: np.ndarray
    diagnostics: dict[str, float]
    step_real_scores: list[list[float]] = dataclasses.field(default_factory=list)
    step_random_scores: list[list[list[float]]] = dataclasses.field(default_factory=list)


def aggregate(step_igs: Sequence[float], method: str = "mean") -> float:
    """A rollout's `r_ig` from its step IGs: mean | sum | max; 0.0 without steps."""
    if not step_igs:
        return 0.0
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; expected one of {AGGREGATIONS}")
    return float({"mean": np.mean, "sum": np.sum, "max": np.max}[method](step_igs))


def _summary(
    step_igs: np.ndarray, real: np.ndarray, baseline: np.ndarray, r_ig_scored: np.ndarray
) -> dict[str, float]:
    if step_igs.size == 0:
        return {k: 0.0 for k in ("ig/step_ig_mean", "ig/step_ig_std", "ig/step_ig_max", "ig/step_ig_min",
                                 "ig/logp_real_mean", "ig/logp_baseline_mean", "ig/n_search_steps",
                                 "ig/positive_ig_ratio", "ig/r_ig_mean")}
    return {
        "ig/step_ig_mean": float(step_igs.mean()),
        "ig/step_ig_std": float(step_igs.std()),
        "ig/step_ig_max": float(step_igs.max()),
        "ig/step_ig_min": float(step_igs.min()),
        "ig/logp_real_mean": float(real.mean()),
        "ig/logp_baseline_mean": float(baseline.mean()),
        "ig/n_search_steps": float(step_igs.size),
        "ig/positive_ig_ratio": float((step_igs > 0).mean()),
        "ig/r_ig_mean": float(r_ig_scored.mean()),
    }


def ig_from_scores(
    sequences: Sequence[ScoringSequence], scores: Sequence[float], num_rollouts: int, aggregation: str = "mean"
) -> IGResult:
    """IG per step = best variant's REAL score - mean of that variant's RANDOM scores (spec §2.1, §2.5).

    Diagnostics (the reference's names): step IG mean/std(population)/max/min, mean REAL and baseline scores over
    steps, "ig/n_search_steps" (steps scored), "ig/positive_ig_ratio", "ig/r_ig_mean" (over rollouts with at
    least one scored step, as the reference), and "ig/n_sequences" (sequences scored).
    """
    if len(scores) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(scores)} scores")
    grouped: dict[tuple[int, int], dict[str, dict[int, list[float]]]] = {}
    for seq, score in zip(sequences, scores, strict=True):
        entry = grouped.setdefault((seq.trajectory, seq.step), {REAL: {}, RANDOM: {}})
        entry[seq.kind].setdefault(seq.variant, []).append(float(score))
    step_igs: list[list[float]] = [[] for _ in range(num_rollouts)]
    step_indices: list[list[int]] = [[] for _ in range(num_rollouts)]
    step_real: list[list[float]] = [[] for _ in range(num_rollouts)]
    step_random: list[list[list[float]]] = [[] for _ in range(num_rollouts)]
    real_scores, baselines = [], []
    for (r, step), entry in sorted(grouped.items()):
        if not entry[REAL]:
            continue
        best = max(entry[REAL], key=lambda v: entry[REAL][v][0])  # first variant on ties, as the reference
        randoms = entry[RANDOM].get(best, [])
        if not randoms:
            continue
        real, baseline = entry[REAL][best][0], float(np.mean(randoms))
        step_igs[r].append(real - baseline)
        step_indices[r].append(step)
        step_real[r].append(real)
        step_random[r].append(list(randoms))
        real_scores.append(real)
        baselines.append(baseline)
    r_ig = np.array([aggregate(igs, aggregation) for igs in step_igs], np.float32)
    scored = np.array([bool(igs) for igs in step_igs], bool)
    diagnostics = _summary(np.array([ig for igs in step_igs for ig in igs]), np.array(real_scores),
                           np.array(baselines), r_ig[scored])
    diagnostics["ig/n_sequences"] = float(len(sequences))
    return IGResult(step_igs, step_indices, r_ig, diagnostics, step_real, step_random)


# ----------------------------------------------------------------------------------------------------------------
# Device: teacher-forced log-probs, bucketed and sharded.


class ScoreFn(Protocol):
    def __call__(self, params: Any, tokens: jax.Array, mask: jax.Array, num_scored: int | None = None) -> jax.Array:
        """tokens/mask `[batch, seq]` -> token log-probs `[batch, seq]` (`[batch, num_scored]`: the last ones)."""


def token_logprobs(logits: jax.Array, tokens: jax.Array, mask: jax.Array, num_scored: int | None = None) -> jax.Array:
    """`out[b, t] = log softmax(logits[b, t - 1])[tokens[b, t]]` in fp32, 0 where `mask` is False (and at t = 0).

    logits: `[batch, seq, vocab]`; tokens, mask: `[batch, seq]`. With `num_scored = k`, only the last k positions
    are computed and returned, `[batch, k]`. The log-softmax is fused as `logit - logsumexp(logits)`.
    """
    seq = tokens.shape[1]
    k = seq - 1 if num_scored is None else num_scored
    if not 0 < k < seq:
        raise ValueError(f"num_scored must be in [1, {seq - 1}], got {k}")
    logits = logits[:, seq - k - 1 : seq - 1].astype(jnp.float32)
    targets, target_mask = tokens[:, seq - k :], mask[:, seq - k :].astype(bool)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprobs = jnp.where(target_mask, picked - jax.nn.logsumexp(logits, axis=-1), 0.0)
    return logprobs if num_scored is not None else jnp.pad(logprobs, ((0, 0), (1, 0)))


def make_score_fn(apply_fn: Callable[..., tuple[jax.Array, Any]]) -> ScoreFn:
    """A `ScoreFn` from `apply_fn(params, tokens, positions, attention_mask) -> (logits, _)`.

    Positions are `cumsum(mask) - 1` clamped at 0, so left padding does not shift RoPE.
    """

    def score_fn(params: Any, tokens: jax.Array, mask: jax.Array, num_scored: int | None = None) -> jax.Array:
        mask = mask.astype(bool)
        logits, _ = apply_fn(params, tokens, qwen2.positions_from_mask(mask), mask)
        return token_logprobs(logits, tokens, mask, num_scored)

    return score_fn


def qwen2_score_fn(config: qwen2.Qwen2Config) -> ScoreFn:
    """A `ScoreFn` for `Qwen2LM(config)` with unboxed params that projects only the scored positions onto the
    vocabulary (`config.logits_chunk_size` at a time), never the whole `[batch, seq, vocab]`."""
    model = qwen2.Qwen2LM(config)

    def score_fn(params: Any, tokens: jax.Array, mask: jax.Array, num_scored: int | None = None) -> jax.Array:
        mask = mask.astype(bool)
        seq = tokens.shape[1]
        k = seq - 1 if num_scored is None else num_scored
        picked, _ = qwen2.score_tokens(model, params, tokens, mask, k)
        logprobs = jnp.where(mask[:, seq - k :], picked, 0.0)
        return logprobs if num_scored is not None else jnp.pad(logprobs, ((0, 0), (1, 0)))

    return score_fn


def pack_sequences(
    contexts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    rows: int,
    context_len: int,
    answer_len: int,
    pad_id: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """tokens, mask `[rows, context_len + answer_len]`: each context LEFT-padded to `context_len`, its answer right
    after it and right-padded to `answer_len`; rows beyond the sequences are all padding (mask False)."""
    tokens = np.full((rows, context_len + answer_len), pad_id, np.int32)
    mask = np.zeros((rows, context_len + answer_len), bool)
    for b, (context, answer) in enumerate(zip(contexts, answers, strict=True)):
        if not 0 < len(context) <= context_len or len(answer) > answer_len:
            raise ValueError(f"row {b}: context {len(context)} / answer {len(answer)} tokens do not fit "
                             f"{context_len} / {answer_len} (an empty context cannot be scored)")
        tokens[b, context_len - len(context) : context_len] = context
        tokens[b, context_len : context_len + len(answer)] = answer
        mask[b, context_len - len(context) : context_len + len(answer)] = True
    return tokens, mask


def length_bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """Smallest bucket >= n (`sampling.bucket`), raising with the IGConfig field to grow."""
    try:
        return sampling.bucket(n, buckets, what)
    except ValueError:
        raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}; add a bigger one to IGConfig"
                         ) from None


def row_bucket(n: int, multiple: int, max_rows: int) -> int:
    """Rows of a micro-batch holding n sequences: `multiple * 2**k >= n`, capped at `max_rows`."""
    rows = multiple
    while rows < n and rows < max_rows:
        rows *= 2
    return min(rows, max_rows)


class Scorer(Protocol):
    def __call__(
        self, params: Any, contexts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Log-probs of each answer's tokens given its context: one `[len(answer)]` array per sequence."""


class SequenceScorer:
    """Scores (context, answer) token sequences with one jitted forward per micro-batch.

    Sequences are grouped by their (context, answer) buckets, each group is cut into micro-batches of
    `micro_batch_size` rows (the last one to a power-of-two multiple of data*fsdp), so at most
    |row buckets| x |context buckets| x |answer buckets| programs are ever compiled. With a mesh the rows are
    sharded over `data` x `fsdp` and the model is traced under `jax.set_mesh(mesh)` and the logical-axis `rules`
    (params must already be placed, e.g. `sharding.shard_params(params, sharding.logical_shardings(...))`).
    """

    def __init__(self, score_fn: ScoreFn, config: IGConfig, mesh: Mesh | None = None,
                 rules: sharding.Rules | None = None):
        self.config, self.mesh = config, mesh
        self.rules = sharding.normalize_rules(rules)
        self._score_fn = score_fn
        self._programs: dict[int, Callable[..., jax.Array]] = {}
        self._multiple = 1 if mesh is None else sharding.batch_parallelism(mesh)
        self._max_rows = -(-config.micro_batch_size // self._multiple) * self._multiple

    def _program(self, answer_len: int) -> Callable[..., jax.Array]:
        if answer_len not in self._programs:
            fn = functools.partial(self._score_fn, num_scored=answer_len)
            if self.mesh is None:
                self._programs[answer_len] = jax.jit(fn)
            else:
                rows = sharding.batch_sharding(self.mesh, 2)
                self._programs[answer_len] = jax.jit(
                    fn, in_shardings=(None, rows, rows), out_shardings=NamedSharding(self.mesh, P()))
        return self._programs[answer_len]

    def compiled_programs(self) -> int:
        """How many distinct programs have been compiled so far (for tests and logs)."""
        return sum(fn._cache_size() for fn in self._programs.values())

    def _run(self, params: Any, tokens: np.ndarray, mask: np.ndarray, answer_len: int) -> jax.Array:
        program = self._program(answer_len)
        if self.mesh is None:
            return program(params, tokens, mask)
        rows = sharding.batch_sharding(self.mesh, 2)
        # Every process holds the whole (small) batch: build the global arrays from it, multi-host safe.
        tokens, mask = (jax.make_array_from_callback(x.shape, rows, lambda index, x=x: x[index])
                        for x in (tokens, mask))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return program(params, tokens, mask)

    def __call__(
        self, params: Any, contexts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Log-probs `[len(answer)]` (float32) of each answer's tokens after its context (ids, no special tokens).

        Contexts must be non-empty and fit the largest context bucket (the caller truncates them); empty answers
        get an empty array without any device work. All micro-batches are dispatched before one `device_get`.
        """
        cfg = self.config
        if len(contexts) != len(answers):
            raise ValueError(f"{len(contexts)} contexts but {len(answers)} answers")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (context, answer) in enumerate(zip(contexts, answers, strict=True)):
            if answer:  # An empty answer has no tokens to score.
                key = (length_bucket(len(context), cfg.context_buckets, "IG context length (context_buckets)"),
                       length_bucket(len(answer), cfg.answer_buckets, "IG gold answer length (answer_buckets)"))
                groups.setdefault(key, []).append(i)
        pending = []
        for (context_len, answer_len), members in sorted(groups.items()):
            for start in range(0, len(members), self._max_rows):
                chunk = members[start : start + self._max_rows]
                rows = row_bucket(len(chunk), self._multiple, self._max_rows)
                tokens, mask = pack_sequences([contexts[i] for i in chunk], [answers[i] for i in chunk], rows,
                                              context_len, answer_len, cfg.pad_id)
                pending.append((chunk, self._run(params, tokens, mask, answer_len)))  # Dispatched asynchronously.
        out = [np.zeros(0, np.float32) for _ in contexts]
        for chunk, logprobs in zip((c for c, _ in pending), jax.device_get([lp for _, lp in pending]), strict=True):
            for row, i in enumerate(chunk):
                out[i] = np.asarray(logprobs[row, : len(answers[i])], np.float32)
        return out


# ----------------------------------------------------------------------------------------------------------------
# End to end.


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def info_gain_for_rollouts(
    scorer: Scorer,
    params: Any,
    rollouts: Sequence[RolloutSteps],
    gold_answers: Sequence[Gold],
    tokenizer: Any,
    config: IGConfig,
    *,
    group_ids: Sequence[Hashable] | None = None,
    step: int = 0,
) -> IGResult:
    """IG of parsed rollouts (see `compute_info_gain`)."""
    rng = np.random.default_rng([config.seed, step])
    sequences, pool_stats = plan_sequences(rollouts, gold_answers, config, rng, group_ids)
    truncated = answers_truncated = 0
    max_answer_tokens = max(config.answer_buckets)
    scores: list[float] = []
    if sequences:  # A batch without valid steps never calls the model.
        contexts, answers = [], []
        for seq in sequences:
            context = _encode(tokenizer, seq.context)
            truncated += len(context) > config.max_context_tokens
            contexts.append(context[-config.max_context_tokens :])
            answer = _encode(tokenizer, seq.answer)
            answers_truncated += len(answer) > max_answer_tokens  # Scored on its first tokens, never raising.
            answers.append(answer[:max_answer_tokens])
        logprobs = scorer(params, contexts, answers)
        scores = [weighted_score(lp, config.n_head_tokens, config.head_weight) for lp in logprobs]
    result = ig_from_scores(sequences, scores, len(rollouts), config.aggregation)
    result.diagnostics.update(pool_stats, **{"ig/contexts_truncated": float(truncated),
                                             "ig/answers_truncated": float(answers_truncated)})
    return result


def compute_info_gain(
    scorer: Scorer,
    params: Any,
    trajectories: Sequence[rollout.Trajectory],
    gold_answers: Sequence[Gold],
    tokenizer: Any,
    config: IGConfig,
    *,
    group_ids: Sequence[Hashable] | None = None,
    step: int = 0,
) -> IGResult:
    """IG of every valid search step of a batch of rollouts, scored with the ROLLOUT-TIME `params`.

    Args:
      scorer: a `SequenceScorer` (or any `Scorer`).
      params: the behaviour policy's params (those that sampled `trajectories`); no gradient flows.
      trajectories: the batch's rollouts.
      gold_answers: one entry per trajectory: a string, a list of strings or `{"target": [...]}`.
      tokenizer: `encode(text, add_special_tokens=False)` and `decode(ids)`.
      config: `IGConfig`.
      group_ids: the question id of each trajectory (e.g. its GRPO uid), for `exclude_same_question`.
      step: the training step, seeding the random-pair draws with `config.seed`.
    Returns:
      `IGResult`; `step_indices` index each trajectory's `steps`.
    """
    rollouts = [rollout_steps(t, tokenizer, config) for t in trajectories]
    return info_gain_for_rollouts(scorer, params, rollouts, gold_answers, tokenizer, config, group_ids=group_ids,
                                  step=step)


def step_ig_token_values(
    result: IGResult, trajectories: Sequence[rollout.Trajectory], response_len: int
) -> np.ndarray:
    """`[batch, response_len]` float32: each scored step's IG on its query tokens (`SearchStep.query_span`), 0
    elsewhere; spans beyond `response_len` are clipped (the layout of `rollout.pack_trajectories`)."""
    values = np.zeros((len(trajectories), response_len), np.float32)
    for b, trajectory in enumerate(trajectories):
        for ig, index in zip(result.step_igs[b], result.step_indices[b], strict=True):
            start, end = trajectory.steps[index].query_span
            values[b, min(start, response_len) : min(end, response_len)] = ig
    return values
