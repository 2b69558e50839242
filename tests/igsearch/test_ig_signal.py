"""The IG signal benchmark's core on the embedded wiki world with a tiny random Qwen2 (no SmolLM2): units, the
rollout layout of their trajectories, the deferred scoring against direct scoring, and the summary's structure."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from experiments.benchmarks import ig_signal
from jax_hd.data import qa
from jax_hd.data.tokenizer import train_bpe_tokenizer
from jax_hd.igsearch import info_gain, rollout
from jax_hd.models import qwen2
from jax_hd.retrieval import bm25
from jax_hd.retrieval.client import SearchClient


def test_auc_and_win_fraction():
    assert ig_signal.auc([3.0, 2.0], [1.0, 0.0]) == 1.0
    assert ig_signal.auc([0.0], [1.0]) == 0.0
    assert ig_signal.auc([1.0, 0.0], [1.0, 0.0]) == 0.5  # Ties count half.
    assert ig_signal.auc([], [1.0]) is None
    assert ig_signal.win_fraction([2.0, 0.0, np.nan, 1.0], [1.0, 1.0, 5.0, 1.0]) == pytest.approx(0.5)
    assert ig_signal.win_fraction([np.nan], [1.0]) is None
    assert ig_signal.context_buckets(300, 128) == (128, 256, 300)


@pytest.fixture(scope="module")
def setup():
    world = qa.embedded_qa_world(0)
    examples = world.splits["test"][1:4]  # Two single-hop questions and a bridge one.
    # BM25 over the questions' articles and 1000 others (seconds, not the whole corpus).
    gold_articles = {a for ex in examples for a in ex.gold_article_ids}
    corpus = [p for i, p in enumerate(world.corpus) if i < 1000 or p.article_id in gold_articles]
    client = SearchClient(retriever=bm25.BM25Index.build(bm25.Corpus(tuple(p.id for p in corpus),
                                                                     tuple(p.contents for p in corpus))))
    tokenizer = train_bpe_tokenizer([p.contents for p in corpus[:800]], vocab_size=512)
    model_config = qwen2.Qwen2Config.tiny(vocab_size=len(tokenizer), num_hidden_layers=1)
    params = nn.unbox(qwen2.init_params(model_config, jax.random.PRNGKey(0)))
    units = ig_signal.make_units(examples, ig_signal.corpus_words([p.contents for p in corpus[:200]]), 6, 0)
    config = rollout.RolloutConfig(dialect="autorefine", max_turns=2, topk=2, max_observation_tokens=48)
    trajectories = ig_signal.unit_trajectories(units, client, tokenizer, config)
    return tokenizer, model_config, params, examples, units, trajectories


def test_units_and_their_trajectories(setup):
    tokenizer, _, _, examples, units, trajectories = setup
    assert [u.num_hops for u in units] == [1, 1, 2, 2] and [u.hop for u in units] == [0, 0, 0, 1]
    bridge = units[3]
    assert bridge.prefix_queries == (units[2].queries["expert"],)
    assert units[0].queries["other_query"] == units[1].queries["expert"]  # The next question's expert query.
    assert len(units[0].queries["random_words"].split()) == len(units[0].queries["expert"].split())
    finals = ig_signal.make_units(examples, ["word"], 6, 0, hops="final")
    assert [(u.hop, u.num_hops) for u in finals] == [(0, 1), (0, 1), (1, 2)]
    for unit, by_kind in zip(units, trajectories, strict=True):
        for kind, trajectory in zip(ig_signal.KINDS, by_kind, strict=True):
            assert len(trajectory.steps) == unit.hop + 1
            step = trajectory.steps[-1]
            assert step.query == unit.queries[kind]
            assert tokenizer.decode(trajectory.response_ids[slice(*step.query_span)]).strip() == step.query
            start, end = step.observation_span
            assert not any(trajectory.policy_mask[start:end]) and end - start <= 48
            assert tokenizer.decode(trajectory.response_ids[start:end]).strip().endswith("</documents>")
        # Earlier hops are the expert's in every kind.
        assert len({tuple(t.response_ids[: t.steps[-1].query_span[0]]) for t in by_kind}) == 1


def test_measure_on_a_tiny_model(setup):
    tokenizer, model_config, params, _, units, trajectories = setup
    ig_config = info_gain.IGConfig(n_random=2, max_context_tokens=512, context_buckets=(256, 384, 512),
                                   answer_buckets=(8, 16), micro_batch_size=4, pad_id=0)
    scorer = info_gain.SequenceScorer(info_gain.qwen2_score_fn(model_config), ig_config)
    out = ig_signal.measure(units, trajectories, scorer, params, tokenizer, ig_config, batch_units=2, chunk=8,
                            log=lambda line: None)
    assert set(out["layouts"]) == set(info_gain.ANSWER_JOINS) and len(out["units"]) == len(units)
    json.dumps(out, allow_nan=False)  # Valid JSON: no NaN anywhere.
    assert out["scoring"]["sequences"] > 0
    for low, high in out["bootstrap"]["auc_all_95"].values():
        assert 0.0 <= low <= high <= 1.0
    for join, summary in out["layouts"].items():
        assert summary["scored_steps"] == {k: len(units) for k in ig_signal.KINDS}
        assert set(summary["mean_ig"]) == set(ig_signal.KINDS)
        for value in [*summary["auc"].values(), *summary["real_score_auc"].values(),
                      *summary["win_fraction"].values()]:
            assert 0.0 <= value <= 1.0
        assert out["ig_diagnostics"][join]["ig/n_search_steps"] > 0
        assert set(summary["by_num_hops"]) == {"1", "2"} and summary["by_num_hops"]["2"]["units"] == 2
        mean_expert = np.mean([r["ig"][join]["expert"] for r in out["units"]])
        assert summary["mean_ig"]["expert"] == pytest.approx(mean_expert)

    # The deferred two-pass scoring gives the IG that one direct pass of the scorer gives.
    rows, steps, golds, groups, b = ig_signal.ig_batches(units, trajectories, tokenizer, ig_config, 2)[1]
    config = dataclasses.replace(ig_config, answer_join="space_joined")
    direct = info_gain.info_gain_for_rollouts(scorer, params, steps, golds, tokenizer, config, group_ids=groups,
                                              step=b)
    for row, (u, k) in enumerate(rows):
        assert direct.step_indices[row] == [units[u].hop]  # Only the unit's hop is scored.
        expected = out["units"][u]["ig"]["space_joined"][ig_signal.KINDS[k]]
        assert direct.step_igs[row][0] == pytest.approx(expected, abs=1e-5)
    table = ig_signal.table(out["layouts"])
    assert "reference" in table and "space_joined" in table and "2-hop questions" in table
    # The JSON records (None for a step not scored) summarize like the in-memory ones.
    records = json.loads(json.dumps(out["units"]))
    records[0]["ig"]["reference"]["expert"] = None
    assert ig_signal.summarize(records, "reference")["scored_steps"]["expert"] == len(units) - 1
