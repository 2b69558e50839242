"""Exact-match evaluation of a search agent on QA benchmarks (the seven Search-R1 test sets or the embedded one).

Every question is rolled out (greedily by default) with `rollout.run_rollouts`; the answer is taken from the
response only (`rewards.extract_answer` semantics via the rollout's parsed action) and scored with EM against all
gold answers. Reported per data source and averaged over sources (the papers' "Avg." column is the unweighted
mean of the per-benchmark EMs): EM, F1, cover-EM, searches per question, invalid actions per question, the
fraction of questions answered, and the fraction of searches that failed.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from jax_hd.data.qa import QAExample
from jax_hd.igsearch import rewards, rollout
from jax_hd.retrieval.client import SearchClient

METRICS = ("em", "f1", "cover_em", "searches", "invalid_actions", "answered", "search_failures")


def score_trajectory(trajectory: rollout.Trajectory, golden_answers: Sequence[str]) -> dict[str, float]:
    """Per-question metrics of one finished rollout."""
    answer = trajectory.answer
    return {
        "em": rewards.exact_match(answer, golden_answers) if answer is not None else 0.0,
        "f1": rewards.f1_score(answer, golden_answers) if answer is not None else 0.0,
        "cover_em": rewards.cover_exact_match(answer, golden_answers) if answer is not None else 0.0,
        "searches": float(len(trajectory.steps)),
        "invalid_actions": float(trajectory.num_invalid),
        "answered": float(answer is not None),
        "search_failures": float(sum(step.failed for step in trajectory.steps)),
    }


def evaluate(
    policy: rollout.Policy,
    client: SearchClient,
    tokenizer: Any,
    examples: Sequence[QAExample],
    config: rollout.RolloutConfig,
    *,
    batch_size: int = 64,
    use_chat_template: bool = True,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Rolls out every example; returns ({source: {metric: mean}, "average": ...}, per-question records)."""
    records = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [rollout.encode_prompt(tokenizer, ex.question, config.dialect, use_chat_template) for ex in batch]
        trajectories, _ = rollout.run_rollouts(policy, client, tokenizer, prompts, config)
        for example, trajectory in zip(batch, trajectories, strict=True):
            records.append({
                "id": example.id,
                "data_source": example.data_source,
                "question": example.question,
                "golden_answers": list(example.golden_answers),
                "answer": trajectory.answer,
                "queries": [step.query for step in trajectory.steps],
                "response": tokenizer.decode(trajectory.response_ids),
                **score_trajectory(trajectory, example.golden_answers),
            })
    return summarize(records), records


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Means per data source (percent for em/f1/cover_em/answered) plus their unweighted average."""
    by_source: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in records:
        by_source[record["data_source"]].append(record)
    results = {}
    for source in sorted(by_source):
        rows = by_source[source]
        means = {m: sum(r[m] for r in rows) / len(rows) for m in METRICS}
        for m in ("em", "f1", "cover_em", "answered"):
            means[m] *= 100.0
        results[source] = {**means, "num_questions": float(len(rows))}
    if results:
        results["average"] = {
            m: sum(r[m] for r in results.values()) / len(results) for m in (*METRICS, "num_questions")
        }
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per data source and the average."""
    header = "| source | questions | EM | F1 | cover-EM | searches/q | invalid/q | answered % |"
    lines = [header, "|" + "---|" * 8]
    for source, r in results.items():
        lines.append(
            f"| {source} | {r['num_questions']:.0f} | {r['em']:.2f} | {r['f1']:.2f} | {r['cover_em']:.2f} | "
            f"{r['searches']:.2f} | {r['invalid_actions']:.2f} | {r['answered']:.1f} |"
        )
    return "\n".join(lines)
