"""OneSearch evaluation: metrics on hand-built rankings, SID -> item rankings through collisions, valid-ID rate,
popularity baseline, TIGER leave-one-out, and the bad-input errors of the data and tokenizer it relies on."""

import math

import numpy as np
import pytest

from jax_hd.data import catalog
from jax_hd.onesearch import evaluate, semantic_ids


def test_metrics_on_hand_rankings():
    rankings = np.array([[5, 3, 9], [1, 2, 3], [7, 8, 4], [2, -1, -1]])
    targets = np.array([3, 1, 6, 2])
    ranks = evaluate.target_ranks(rankings, targets)
    assert ranks.tolist() == [2, 1, 0, 1]
    assert evaluate.hit_rate(ranks, 1) == 0.5 and evaluate.hit_rate(ranks, 3) == 0.75
    assert evaluate.mrr(ranks, 3) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert evaluate.mrr(ranks, 1) == pytest.approx(0.5)
    assert evaluate.ndcg(ranks, 3) == pytest.approx((1 / math.log2(3) + 1 + 0 + 1) / 4)
    m = evaluate.ranking_metrics(rankings, targets, (1, 3), {"tail": np.array([True, False, True, False])})
    assert m["num"] == 4 and m["hr@3"] == 0.75 and m["mrr@1"] == 0.5
    assert m["tail"]["num"] == 2 and m["tail"]["hr@3"] == 0.5 and m["tail"]["mrr@3"] == 0.25
    with pytest.raises(ValueError, match="slice"):
        evaluate.ranking_metrics(rankings, targets, (1,), {"bad": np.ones(3, bool)})
    with pytest.raises(ValueError, match="rankings"):
        evaluate.target_ranks(rankings[:2], targets)


def test_items_from_sids_follows_beams_and_collision_popularity():
    codes = np.array([[0, 1], [0, 1], [1, 0], [2, 2]])  # items 0 and 1 collide on SID (0, 1)
    table = semantic_ids.collision_table(codes, popularity=np.array([1.0, 5.0, 0.0, 0.0]))
    beams = np.array(
        [
            [[0, 1], [2, 2], [1, 0]],  # leaf (0,1): item 1 (more popular) before item 0, then 3, then 2
            [[-1, 5], [3, 3], [1, 0]],  # invalid, unknown, then item 2
            [[2, 2], [2, 2], [0, 1]],  # a repeated SID adds nothing new
        ]
    )
    ranked = evaluate.items_from_sids(beams, table, 3)
    assert ranked.tolist() == [[1, 0, 3], [2, -1, -1], [3, 1, 0]]
    assert evaluate.valid_id_rate(beams, table) == pytest.approx(7 / 9)
    with pytest.raises(ValueError, match="codes must be"):
        evaluate.items_from_sids(beams[..., :1], table, 3)


def test_popularity_rankings():
    clicks = np.array([0, 10, 3, 7])
    out = evaluate.popularity_rankings([[2], [], [3, 1]], clicks, 3)
    assert out.tolist() == [[2, 1, 3], [1, 3, 2], [3, 1, 2]]


def _history(sequences):
    users, items, times = [], [], []
    for u, seq in enumerate(sequences):
        users += [u] * len(seq)
        items += seq
        times += list(range(len(seq)))
    n = len(items)
    return catalog._history(
        [f"u{u}" for u in range(len(sequences))], np.asarray(users), np.asarray(items), np.asarray(times),
        np.asarray([""] * n), np.full(n, catalog.ACTION_REVIEW),
    )  # fmt: skip


def test_tiger_leave_one_out_protocol():
    # Each user's next item is last + 1, except user 2 whose last item breaks the pattern.
    history = _history([[1, 2, 3, 4], [5, 6, 7], [8, 9, 0], [1, 2]])
    seen = {}

    def next_item_ranker(histories, lengths):
        seen["histories"], seen["lengths"] = histories.copy(), lengths.copy()
        last = histories[np.arange(len(histories)), lengths - 1]
        return np.stack([last + 1, last + 2], axis=1)

    m = evaluate.tiger_leave_one_out(history, next_item_ranker, ks=(1, 2))
    assert m["num"] == 3  # user 3 has fewer than 3 events
    assert m["hr@1"] == pytest.approx(2 / 3) and m["hr@2"] == pytest.approx(2 / 3)
    assert seen["lengths"].tolist() == [3, 2, 2]  # the test target is never in its own history
    assert seen["histories"][0, :3].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="3 events"):
        evaluate.tiger_leave_one_out(_history([[1, 2]]), next_item_ranker)


def test_bad_inputs_name_the_problem(tmp_path):
    # A log row naming an unknown item (catalog.py): the file and line are named.
    cat = catalog.make_catalog(["a", "b"], ["red shoe", "blue shoe"])
    path = tmp_path / "recall.jsonl"
    path.write_text(
        '{"user_id": 1, "session_id": 1, "impressed_item_ids": ["a"], "clicked_item_ids": [], '
        '"purchased_item_ids": [], "time_index": 0, "query": "shoe", "split": "train"}\n'
        '{"user_id": 1, "session_id": 2, "impressed_item_ids": ["zz"], "clicked_item_ids": [], '
        '"purchased_item_ids": [], "time_index": 1, "query": "shoe", "split": "train"}\n'
    )
    with pytest.raises(catalog.CatalogDataError, match=r"line 2.*zz"):
        catalog.read_kuaisearch_recall(str(path), cat)
    # Codebooks too small for the catalogue (semantic_ids).
    with pytest.raises(ValueError, match="too few"):
        semantic_ids.check_capacity(1000, semantic_ids.SemanticIDConfig(rq_sizes=(4, 2), use_opq=False))
