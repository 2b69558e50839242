"""CSMCIR evaluation: chunked top-k, FashionIQ (both protocols), CIRR (reference exclusion, subset), CIRCO mAP@K,
and the test-server submission files. Expected numbers are worked out by hand in the comments."""

import json

import numpy as np
import pytest

from jax_hd.csmcir import evaluate as ev

# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------

GALLERY_60 = np.asarray([f"img{i:02d}" for i in range(60)])


def scores_from_orders(orders: list[list[int]], num_gallery: int) -> np.ndarray:
    """`[num_queries, num_gallery]` scores whose descending order starts with each `orders[q]`; the rest of the
    gallery follows in ascending index order. All scores distinct (no ties)."""
    scores = np.zeros((len(orders), num_gallery), np.float32)
    for row, head in enumerate(orders):
        full = list(head) + [i for i in range(num_gallery) if i not in set(head)]
        scores[row, full] = np.arange(num_gallery, 0, -1)
    return scores


def brute_force_top_k(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    scores = scores.astype(np.float64).copy()
    if exclude is not None:
        for row, cols in enumerate(exclude.reshape(len(scores), -1)):
            scores[row, cols[cols >= 0]] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def assert_no_near_ties(scores: np.ndarray, k: int, gap: float = 1e-5) -> None:
    """The float32 kernel and the float64 reference can only disagree on near-ties around the top k + 1."""
    head = -np.sort(-scores, axis=1)[:, : k + 1]
    assert np.min(head[:, :-1] - head[:, 1:]) > gap, "test data has near-ties; pick another seed"


# ---------------------------------------------------------------------------------------------------------------
# Ranking
# ---------------------------------------------------------------------------------------------------------------


def test_top_k_gallery_matches_brute_force_with_chunking_and_exclusion():
    rng = np.random.default_rng(0)
    num_queries, num_gallery, dim, k = 37, 300, 16, 20  # 37 is not a multiple of the chunk size 8
    queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
    gallery = rng.normal(size=(num_gallery, dim)).astype(np.float32)
    exclude = np.where(rng.random(num_queries) < 0.5, rng.integers(0, num_gallery, num_queries), ev.NO_EXCLUSION)
    scores = queries.astype(np.float64) @ gallery.T.astype(np.float64)
    assert_no_near_ties(scores, k + 1)

    top_scores, top_indices = ev.top_k_gallery(queries, gallery, k, query_chunk_size=8)
    np.testing.assert_array_equal(top_indices, brute_force_top_k(scores, k))
    np.testing.assert_allclose(top_scores, np.take_along_axis(scores, top_indices, 1), rtol=1e-5, atol=1e-5)
    assert top_scores.dtype == np.float32 and top_indices.dtype == np.int32

    _, excluded_indices = ev.top_k_gallery(queries, gallery, k, exclude_indices=exclude, query_chunk_size=8)
    np.testing.assert_array_equal(excluded_indices, brute_force_top_k(scores, k, exclude))
    for row in np.nonzero(exclude >= 0)[0]:
        assert exclude[row] not in excluded_indices[row]

    # Two exclusion slots per query, -1 padded.
    two = np.stack([exclude, np.where(exclude >= 0, (exclude + 1) % num_gallery, ev.NO_EXCLUSION)], axis=1)
    _, two_indices = ev.top_k_gallery(queries, gallery, k, exclude_indices=two, query_chunk_size=5)
    np.testing.assert_array_equal(two_indices, brute_force_top_k(scores, k, two))


def test_top_k_gallery_multi_vector_gallery_scores_max_over_tokens():
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(9, 8)).astype(np.float32)
    gallery = rng.normal(size=(50, 4, 8)).astype(np.float32)  # [num_gallery, tokens, dim]
    scores = np.einsum("qd,ntd->qnt", queries.astype(np.float64), gallery.astype(np.float64)).max(-1)
    assert_no_near_ties(scores, 10)
    _, top_indices = ev.top_k_gallery(queries, gallery, 10, query_chunk_size=4)
    np.testing.assert_array_equal(top_indices, brute_force_top_k(scores, 10))


def test_top_k_from_scores_matches_argsort_and_tie_breaking_is_lowest_index_first():
    rng = np.random.default_rng(2)
    scores = np.stack([rng.permutation(100) for _ in range(13)]).astype(np.float32)  # distinct per row
    exclude = rng.integers(0, 100, 13)
    _, top_indices = ev.top_k_from_scores(scores, 30, exclude_indices=exclude, query_chunk_size=4)
    np.testing.assert_array_equal(top_indices, brute_force_top_k(scores, 30, exclude))
    # Documented tie rule: equal scores come lowest gallery index first (= a stable descending argsort).
    tied = np.asarray([[1.0, 3.0, 3.0, 2.0, 3.0]], np.float32)
    _, tied_indices = ev.top_k_from_scores(tied, 4)
    np.testing.assert_array_equal(tied_indices, [[1, 2, 4, 3]])


def test_top_k_rejects_bad_arguments():
    scores = np.zeros((2, 5), np.float32)
    with pytest.raises(ValueError, match="k=5"):
        ev.top_k_from_scores(scores, 5, exclude_indices=np.asarray([0, 1]))  # only 4 left after exclusion
    with pytest.raises(ValueError, match="exclude_indices"):
        ev.top_k_from_scores(scores, 2, exclude_indices=np.asarray([0, 5]))
    with pytest.raises(ValueError, match="dim mismatch"):
        ev.top_k_gallery(np.zeros((2, 3)), np.zeros((4, 5)), 2)


def test_gather_scores_equals_the_full_matrix_entries():
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(11, 8)).astype(np.float32)
    for gallery in (rng.normal(size=(40, 8)), rng.normal(size=(40, 3, 8))):
        gallery = gallery.astype(np.float32)
        full = np.einsum("qd,n...d->qn...", queries, gallery)
        full = full.max(-1) if gallery.ndim == 3 else full
        candidates = rng.integers(0, 40, (11, 6))
        gathered = ev.gather_scores(queries, gallery, candidates, query_chunk_size=4)
        np.testing.assert_allclose(gathered, np.take_along_axis(full, candidates, 1), rtol=1e-5, atol=1e-5)


def test_ids_to_indices_names_missing_ids():
    np.testing.assert_array_equal(ev.ids_to_indices(["c", "a"], ["a", "b", "c"]), [2, 0])
    with pytest.raises(KeyError, match="zz"):
        ev.ids_to_indices(["a", "zz"], ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------
# Recall@K
# ---------------------------------------------------------------------------------------------------------------


def test_recall_at_k_hand_computed():
    # Target 1 sits at positions 2, 4 and 1 (1-based) of the three rankings.
    ranked = np.asarray([[3, 1, 2, 0], [0, 2, 3, 1], [1, 0, 3, 2]])
    recalls = ev.recall_at_k(ranked, np.asarray([1, 1, 1]), ks=(1, 2, 4))
    # R@1: query 2 only -> 1/3; R@2: queries 0, 2 -> 2/3; R@4: all -> 100.
    assert recalls == pytest.approx({1: 100 / 3, 2: 200 / 3, 4: 100.0})
    with pytest.raises(ValueError, match="at least that length"):
        ev.recall_at_k(ranked, np.asarray([1, 1, 1]), ks=(5,))
    with pytest.raises(ValueError, match="repeats ids"):
        ev.recall_at_k(np.asarray([[1, 1]]), np.asarray([1]), ks=(1,))
    with pytest.raises(TypeError, match="str or numeric"):
        ev.recall_at_k(np.asarray([["a", "b"]]), np.asarray([1]), ks=(1,))


# ---------------------------------------------------------------------------------------------------------------
# CIRR
# ---------------------------------------------------------------------------------------------------------------

# Three CIRR queries over a 60-image gallery (indices into GALLERY_60), built by hand:
#   q0: reference 0 ranked 1st, target 1 ranked 2nd          -> after deleting the reference the target is 1st.
#   q1: reference 10 ranked 1st, then the 49 lowest other indices (0-9, 11-19, 21-50), target 20 at full position
#       51                                                    -> after deletion it is 50th: in R@50, not in R@10.
#   q2: full order 0, 1, 7(ref), 2, 8(target), ...           -> after deletion [0, 1, 2, 8]: target 4th.
CIRR_REFERENCES = [0, 10, 7]
CIRR_TARGETS = [1, 20, 8]
CIRR_ORDERS = [
    [0, 1],
    [10] + [i for i in range(51) if i not in (10, 20)] + [20],
    [0, 1, 7, 2, 8],
]
# img_set members (6 each, contain reference and target). Subset rankings, reference removed (5 candidates):
#   q0: members 0..5            -> [1, 2, 3, 4, 5]       target 1st
#   q1: {10, 20, 30, 31, 55, 59} -> [30, 31, 20, 55, 59]  target 3rd (30, 31 rank above 20 in q1's order)
#   q2: {7, 8, 0, 40, 41, 42}    -> [0, 8, 40, 41, 42]    target 2nd
CIRR_MEMBERS = [[0, 1, 2, 3, 4, 5], [10, 20, 30, 31, 55, 59], [7, 8, 0, 40, 41, 42]]
CIRR_EXPECTED_SUBSETS = [[1, 2, 3, 4, 5], [30, 31, 20, 55, 59], [0, 8, 40, 41, 42]]
# R@1 = q0 = 33.33; R@5 = R@10 = q0, q2 = 66.67; R@50 = all = 100;
# R_subset@1 = q0 = 33.33; @2 = q0, q2 = 66.67; @3 = all = 100; avg = (R@5 + R_subset@1) / 2 = (66.67 + 33.33) / 2 = 50.
CIRR_EXPECTED = {
    "cirr/R@1": 100 / 3,
    "cirr/R@5": 200 / 3,
    "cirr/R@10": 200 / 3,
    "cirr/R@50": 100.0,
    "cirr/R_subset@1": 100 / 3,
    "cirr/R_subset@2": 200 / 3,
    "cirr/R_subset@3": 100.0,
    "cirr/avg": 50.0,
}


def _cirr_ids(indices) -> np.ndarray:
    return GALLERY_60[np.asarray(indices)]


def test_cirr_metrics_with_reference_exclusion_in_the_top_k():
    scores = scores_from_orders(CIRR_ORDERS, 60)
    _, top_indices = ev.top_k_from_scores(scores, 50, exclude_indices=np.asarray(CIRR_REFERENCES))
    member_scores = np.take_along_axis(scores, np.asarray(CIRR_MEMBERS), 1)
    subsets = ev.rank_subset(_cirr_ids(CIRR_MEMBERS), member_scores, _cirr_ids(CIRR_REFERENCES))
    np.testing.assert_array_equal(subsets, _cirr_ids(CIRR_EXPECTED_SUBSETS))
    assert subsets.shape == (3, 5)  # 6 members -> 5 candidates
    # q1's target moved from full position 51 to 50: the reference did not push it out of the top 50.
    assert _cirr_ids(top_indices)[1, 49] == GALLERY_60[20]

    results = ev.cirr_metrics(_cirr_ids(top_indices), _cirr_ids(CIRR_TARGETS), _cirr_ids(CIRR_REFERENCES), subsets)
    assert results == pytest.approx(CIRR_EXPECTED)


def test_cirr_official_procedure_on_the_full_ranking_gives_the_same_numbers():
    # SPRC: sort the whole gallery, delete the reference, keep members in ranked order.
    full = _cirr_ids(np.argsort(-scores_from_orders(CIRR_ORDERS, 60), axis=1, kind="stable"))
    references = _cirr_ids(CIRR_REFERENCES)
    ranked = ev.remove_reference(full, references)
    assert ranked.shape == (3, 59)
    subsets = ev.filter_ranking_to_subset(ranked, _cirr_ids(CIRR_MEMBERS), references)
    np.testing.assert_array_equal(subsets, _cirr_ids(CIRR_EXPECTED_SUBSETS))
    results = ev.cirr_metrics(ranked, _cirr_ids(CIRR_TARGETS), references, subsets)
    assert results == pytest.approx(CIRR_EXPECTED)

    # Deleting the reference from a truncated top-51 list gives the same top 50.
    truncated = ev.remove_reference(full[:, :51], references)
    np.testing.assert_array_equal(truncated, ranked[:, :50])

    # Without the deletion the reference would occupy rank 1: R@1 would drop to 0 and q1's target fall out of R@50.
    naive = ev.recall_at_k(full[:, :50], _cirr_ids(CIRR_TARGETS), ks=(1, 50))
    assert naive == pytest.approx({1: 0.0, 50: 200 / 3})
    with pytest.raises(ValueError, match="still contains the reference"):
        ev.cirr_metrics(full[:, :50], _cirr_ids(CIRR_TARGETS), references, subsets)


def test_cirr_subset_checks():
    members = _cirr_ids(CIRR_MEMBERS)
    references = _cirr_ids(CIRR_REFERENCES)
    with pytest.raises(ValueError, match="reference missing"):
        ev.rank_subset(members, np.zeros((3, 6)), _cirr_ids([59, 10, 7]))  # 59 is not in q0's members
    subsets = ev.rank_subset(members, np.zeros((3, 6)), references)  # all tied -> member order, reference removed
    np.testing.assert_array_equal(subsets[0], _cirr_ids([1, 2, 3, 4, 5]))
    wrong_targets = _cirr_ids([1, 20, 59])  # 59 is not a member of q2's set
    with pytest.raises(ValueError, match="not in the subset ranking"):
        ranked = _cirr_ids(np.tile([i for i in range(60) if i not in CIRR_REFERENCES][:50], (3, 1)))
        ev.cirr_metrics(ranked, wrong_targets, references, subsets)
    with pytest.raises(ValueError, match="do not rank every img_set member"):
        ev.filter_ranking_to_subset(_cirr_ids(np.tile(np.arange(10), (3, 1))), members, references)


# ---------------------------------------------------------------------------------------------------------------
# FashionIQ
# ---------------------------------------------------------------------------------------------------------------

# One category, three triplets (reference -> target): a -> b, c -> d, b -> e. Split gallery [a, b, c, d, e, f].
FIQ_REFERENCES = ["a", "c", "b"]
FIQ_TARGETS = ["b", "d", "e"]
FIQ_SPLIT = ["a", "b", "c", "d", "e", "f"]
# Scores by image id (higher is better):
#   q0 (a -> b): a .9, b .8            original [a, b, ...] target 2nd;  val_union (a removed) target 1st
#   q1 (c -> d): c .9, e .8, d .7      original target 3rd;              val_union [e, d, ...] target 2nd
#   q2 (b -> e): e .9                  target 1st in both
FIQ_SCORES = [{"a": 0.9, "b": 0.8}, {"c": 0.9, "e": 0.8, "d": 0.7}, {"e": 0.9}]


def _fiq_scores(gallery: np.ndarray) -> np.ndarray:
    # Unlisted images get small distinct scores (no ties).
    return np.asarray(
        [[row.get(image, -0.01 * i) for i, image in enumerate(gallery.tolist())] for row in FIQ_SCORES], np.float32
    )


def _fiq_recalls(protocol: str, ks: tuple[int, ...]) -> dict[int, float]:
    gallery = ev.fashioniq_gallery(protocol, FIQ_REFERENCES, FIQ_TARGETS, FIQ_SPLIT)
    exclude = ev.fashioniq_exclude_indices(protocol, gallery, FIQ_REFERENCES)
    _, top_indices = ev.top_k_from_scores(_fiq_scores(gallery), max(ks), exclude_indices=exclude)
    return ev.fashioniq_category_recalls(
        gallery[top_indices], np.asarray(FIQ_TARGETS), np.asarray(FIQ_REFERENCES), protocol, ks=ks
    )


def test_fashioniq_galleries_per_protocol():
    np.testing.assert_array_equal(
        ev.fashioniq_gallery(ev.FIQ_ORIGINAL, FIQ_REFERENCES, FIQ_TARGETS, FIQ_SPLIT), FIQ_SPLIT
    )
    # Union in annotation order, reference then target, first occurrence: a, b, c, d, (b), e. `f` is not in it.
    np.testing.assert_array_equal(
        ev.fashioniq_gallery(ev.FIQ_VAL_UNION, FIQ_REFERENCES, FIQ_TARGETS), ["a", "b", "c", "d", "e"]
    )
    assert ev.fashioniq_exclude_indices(ev.FIQ_ORIGINAL, FIQ_SPLIT, FIQ_REFERENCES) is None
    with pytest.raises(ValueError, match="not in the fiq_original gallery"):
        ev.fashioniq_gallery(ev.FIQ_ORIGINAL, FIQ_REFERENCES, FIQ_TARGETS, ["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicates"):
        ev.fashioniq_gallery(ev.FIQ_ORIGINAL, FIQ_REFERENCES, FIQ_TARGETS, FIQ_SPLIT + ["a"])
    with pytest.raises(ValueError, match="unknown FashionIQ protocol"):
        ev.fashioniq_gallery("val", FIQ_REFERENCES, FIQ_TARGETS)


def test_fashioniq_recalls_both_protocols_hand_computed():
    # fiq_original (reference kept): target ranks 2, 3, 1 -> R@1 = 1/3, R@2 = 2/3, R@3 = 100.
    assert _fiq_recalls(ev.FIQ_ORIGINAL, (1, 2, 3)) == pytest.approx({1: 100 / 3, 2: 200 / 3, 3: 100.0})
    # fiq_val_union (reference removed): target ranks 1, 2, 1 -> R@1 = 2/3, R@2 = 100.
    assert _fiq_recalls(ev.FIQ_VAL_UNION, (1, 2)) == pytest.approx({1: 200 / 3, 2: 100.0})
    # fiq_val_union refuses rankings that still hold the reference.
    with pytest.raises(ValueError, match="still contains the reference"):
        ev.fashioniq_category_recalls(
            np.asarray([["a", "b"]]), np.asarray(["b"]), np.asarray(["a"]), ev.FIQ_VAL_UNION, ks=(1,)
        )


def test_fashioniq_summary_averages_and_protocol_named_keys():
    per_category = {"dress": {10: 30.0, 50: 50.0}, "shirt": {10: 20.0, 50: 40.0}, "toptee": {10: 40.0, 50: 60.0}}
    summary = ev.fashioniq_summary(per_category, ev.FIQ_ORIGINAL)
    # Averages over categories: R@10 = (30+20+40)/3 = 30, R@50 = (50+40+60)/3 = 50; mean = (30+50)/2 = 40.
    assert summary["fiq_original/average/R@10"] == pytest.approx(30.0)
    assert summary["fiq_original/average/R@50"] == pytest.approx(50.0)
    assert summary["fiq_original/average/mean"] == pytest.approx(40.0)
    # Per-category means: dress (30+50)/2 = 40, shirt 30, toptee 50.
    assert [summary[f"fiq_original/{c}/mean"] for c in ev.FIQ_CATEGORIES] == pytest.approx([40.0, 30.0, 50.0])
    assert summary["fiq_original/shirt/R@50"] == 40.0
    assert len(summary) == 3 * 3 + 3
    union = ev.fashioniq_summary(per_category, ev.FIQ_VAL_UNION)
    assert not set(summary) & set(union)  # both protocols can share one results dict
    with pytest.raises(ValueError, match="needs recalls"):
        ev.fashioniq_summary({"dress": {10: 1.0}}, ev.FIQ_ORIGINAL)


# ---------------------------------------------------------------------------------------------------------------
# CIRCO
# ---------------------------------------------------------------------------------------------------------------


def _official_circo_ap(predictions: np.ndarray, gt_img_ids: list[int], rank: int) -> float:
    """Line-for-line transcription of CIRCO `src/evaluation.py`'s AP computation."""
    ap_labels = np.isin(predictions, gt_img_ids)
    precisions = np.cumsum(ap_labels, axis=0) * ap_labels
    precisions = precisions / np.arange(1, ap_labels.shape[0] + 1)
    return float(np.sum(precisions[:rank]) / min(len(gt_img_ids), rank))


def test_circo_average_precision_hand_computed():
    ranked = np.asarray(
        [
            [1, 9, 2, 3, 4, 5],  # GT {9}: rel 0 1 0 0 0 0; P@2 = 1/2. AP@2 = .5/min(1,2) = .5; AP@5 = .5/1 = .5
            [1, 2, 3, 4, 5, 6],  # GT {1,4}: rel 1 0 0 1; P@1 = 1, P@4 = 2/4. AP@2 = 1/2 = .5; AP@5 = 1.5/2 = .75
            [1, 99, 2, 3, 98, 10],  # 7 GT > K: rel 1 0 1 1 0 1; P@1 = 1, P@3 = 2/3, P@4 = 3/4.
            # AP@2 = 1/min(7,2) = .5; AP@5 = (1 + 2/3 + 3/4)/min(7,5) = (29/12)/5 = 29/60
            [1, 2, 3, 10, 11, 0],  # same 7 GT, first five all hits: AP@5 = (1+1+1+1+1)/min(7,5) = 1
        ]
    )
    ground_truths = [[9], [1, 4], [1, 2, 3, 10, 11, 12, 13], [1, 2, 3, 10, 11, 12, 13]]
    ap = ev.circo_average_precision(ranked, ground_truths, ks=(2, 5))
    np.testing.assert_allclose(ap, [[0.5, 0.5], [0.5, 0.75], [0.5, 29 / 60], [1.0, 1.0]])
    for row in range(4):
        for column, k in enumerate((2, 5)):
            assert ap[row, column] == pytest.approx(_official_circo_ap(ranked[row], ground_truths[row], k))

    results = ev.circo_metrics(ranked[:3], ground_truths[:3], np.asarray([9, 1, 1]), ks=(2, 5))
    # mAP@2 = (.5+.5+.5)/3 = 50; mAP@5 = (.5 + .75 + 29/60)/3 = 57.78. Target (= gt[0]) ranks 2, 1, 1 -> R@2 = 100.
    assert results == pytest.approx(
        {"circo/mAP@2": 50.0, "circo/mAP@5": 100 * (0.5 + 0.75 + 29 / 60) / 3, "circo/R@2": 100.0, "circo/R@5": 100.0}
    )
    # Padded ground truths (SPRC pads to 23) give the same numbers once the pad is dropped.
    padded = np.full((3, 23), -1)
    for row, ids in enumerate(ground_truths[:3]):
        padded[row, : len(ids)] = ids
    np.testing.assert_allclose(ev.circo_average_precision(ranked[:3], padded, (2, 5), pad_id=-1), ap[:3])


def test_circo_matches_the_official_formula_on_random_rankings():
    rng = np.random.default_rng(4)
    ranked = np.stack([rng.permutation(200)[:50] for _ in range(20)])
    ground_truths = [rng.choice(200, size=rng.integers(1, 15), replace=False).tolist() for _ in range(20)]
    ap = ev.circo_average_precision(ranked, ground_truths)  # ks = 5, 10, 25, 50
    expected = [[_official_circo_ap(ranked[q], ground_truths[q], k) for k in ev.CIRCO_KS] for q in range(20)]
    np.testing.assert_allclose(ap, expected)
    results = ev.circo_metrics(ranked, ground_truths)
    assert list(results) == ["circo/mAP@5", "circo/mAP@10", "circo/mAP@25", "circo/mAP@50"]
    np.testing.assert_allclose([results[f"circo/mAP@{k}"] for k in ev.CIRCO_KS], 100 * np.mean(expected, axis=0))
    with pytest.raises(ValueError, match="repeats ids"):
        ev.circo_average_precision(np.asarray([[1, 1, 2, 3, 4]]), [[1]], ks=(5,))
    with pytest.raises(ValueError, match="no ground truth"):
        ev.circo_average_precision(np.asarray([[1, 2, 3, 4, 5]]), [[-1]], ks=(5,), pad_id=-1)


# ---------------------------------------------------------------------------------------------------------------
# Submissions
# ---------------------------------------------------------------------------------------------------------------


def _cirr_submission() -> tuple[dict, dict]:
    _, top_indices = ev.top_k_from_scores(
        scores_from_orders(CIRR_ORDERS, 60), 50, exclude_indices=np.asarray(CIRR_REFERENCES)
    )
    return ev.cirr_submission_dicts(
        np.asarray([12063, 7, 42]),
        _cirr_ids(top_indices),
        _cirr_ids(CIRR_EXPECTED_SUBSETS),
        _cirr_ids(CIRR_REFERENCES),
    )


def test_cirr_submission_round_trip(tmp_path):
    recall, recall_subset = _cirr_submission()
    assert recall["version"] == "rc2" and recall["metric"] == "recall"
    assert recall_subset["version"] == "rc2" and recall_subset["metric"] == "recall_subset"
    assert len(recall["12063"]) == 50 and recall["12063"][0] == "img01"  # reference img00 excluded
    assert recall_subset["7"] == ["img30", "img31", "img20"]

    recall_path, subset_path = ev.write_cirr_submission(str(tmp_path), "demo", recall, recall_subset)
    assert recall_path.endswith("recall_submission_demo.json")
    assert subset_path.endswith("recall_subset_submission_demo.json")
    with open(recall_path, encoding="utf-8") as f:
        loaded_recall = json.load(f)
    with open(subset_path, encoding="utf-8") as f:
        loaded_subset = json.load(f)
    assert loaded_recall == recall and loaded_subset == recall_subset
    references = {"12063": "img00", "7": "img10", "42": "img07"}
    members = {key: list(_cirr_ids(m)) for key, m in zip(["12063", "7", "42"], CIRR_MEMBERS, strict=True)}
    ev.validate_cirr_submission(loaded_recall, "recall", expected_pair_ids=[12063, 7, 42], reference_ids=references)
    ev.validate_cirr_submission(loaded_subset, "recall_subset", reference_ids=references, member_ids=members)


@pytest.mark.parametrize(
    "mutate, metric, message",
    [
        (lambda s: s.__setitem__("version", "rc1"), "recall", '"version" must be "rc2"'),
        (lambda s: s.__setitem__("metric", "recall_subset"), "recall", '"metric" must be "recall"'),
        (lambda s: s["7"].pop(), "recall", "49 predictions, recall needs exactly 50"),
        (lambda s: s["7"].__setitem__(1, s["7"][0]), "recall", "repeated predictions"),
        (lambda s: s["7"].__setitem__(0, "img10"), "recall", "reference 'img10' is not excluded"),
        (lambda s: s.pop("42"), "recall", "1 pair id(s) missing"),
        (lambda s: s.__setitem__("pair9", s["7"]), "recall", "not a pair id"),
        (lambda s: s["7"].append("img58"), "recall_subset", "4 predictions, recall_subset needs exactly 3"),
        (lambda s: s["7"].__setitem__(2, "img58"), "recall_subset", "not img_set members"),
    ],
)
def test_cirr_submission_validation_errors(mutate, metric, message):
    recall, recall_subset = _cirr_submission()
    submission = json.loads(json.dumps(recall if metric == "recall" else recall_subset))
    mutate(submission)
    references = {"12063": "img00", "7": "img10", "42": "img07"}
    members = {key: list(_cirr_ids(m)) for key, m in zip(["12063", "7", "42"], CIRR_MEMBERS, strict=True)}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ev.validate_cirr_submission(
            submission, metric, expected_pair_ids=[12063, 7, 42], reference_ids=references, member_ids=members
        )


def test_cirr_submission_builder_and_writer_refuse_bad_input(tmp_path, monkeypatch):
    scores = scores_from_orders(CIRR_ORDERS, 60)
    _, unmasked = ev.top_k_from_scores(scores, 50)  # reference NOT excluded
    with pytest.raises(ValueError, match="is not excluded"):
        ev.cirr_submission_dicts(
            [12063, 7, 42], _cirr_ids(unmasked), _cirr_ids(CIRR_EXPECTED_SUBSETS), _cirr_ids(CIRR_REFERENCES)
        )
    recall, recall_subset = _cirr_submission()
    monkeypatch.setattr(ev, "CIRR_MAX_FILE_BYTES", 100)
    with pytest.raises(ValueError, match="over the server's limit"):
        ev.write_cirr_submission(str(tmp_path), "big", recall, recall_subset)


def test_circo_submission_round_trip(tmp_path):
    ranked = np.stack([np.random.default_rng(q).permutation(1000)[:60] for q in range(3)])
    path = ev.write_circo_submission(str(tmp_path / "circo.json"), [0, 1, 2], ranked)
    with open(path, encoding="utf-8") as f:
        loaded = json.load(f)
    assert list(loaded) == ["0", "1", "2"] and loaded["1"] == ranked[1, :50].tolist()
    with pytest.raises(ValueError, match=">=50"):
        ev.write_circo_submission(str(tmp_path / "short.json"), [0, 1, 2], ranked[:, :49])


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def test_format_table_groups_by_dataset_and_row():
    per_category = {"dress": {10: 30.0, 50: 50.0}, "shirt": {10: 20.0, 50: 40.0}, "toptee": {10: 40.0, 50: 60.0}}
    results = {**ev.fashioniq_summary(per_category, ev.FIQ_ORIGINAL), **CIRR_EXPECTED, "backbone": "eva_vit_g"}
    table = ev.format_table(results)
    assert "| fiq_original | R@10 | R@50 | mean |" in table
    assert "| average | 30.00 | 50.00 | 40.00 |" in table
    assert "| cirr | 33.33 | 66.67 | 66.67 | 100.00 | 33.33 | 66.67 | 100.00 | 50.00 |" in table
    assert "| results | backbone |" in table and "| results | eva_vit_g |" in table
    assert ev.format_table({"circo": {"mAP@5": 12.345, "queries": 220}}).splitlines()[-1] == "| circo | 12.35 | 220 |"
