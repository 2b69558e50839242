"""Semantic IDs: k-means (recovery, empty-cluster repair, sharded == single device), RQ levels, OPQ vs PQ,
collision table, CUR/ICR on a hand-built table, keyword fusion, input errors, real MiniLM end to end."""

import jax
import numpy as np
import pytest

from jax_hd.core import sharding
from jax_hd.onesearch import semantic_ids as si

NUM_CENTERS, DIM = 6, 16


def _clustered(n: int, seed: int = 0, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(NUM_CENTERS, DIM)) * 10
    labels = rng.integers(0, NUM_CENTERS, n)
    return (centers[labels] + spread * rng.normal(size=(n, DIM))).astype(np.float32), labels


@pytest.fixture(scope="module")
def clustered():
    return _clustered(512)


@pytest.fixture(scope="module")
def tiny_fit(clustered):
    x, _ = clustered
    config = si.SemanticIDConfig.tiny()
    model, codes = si.fit_transform(x, config)
    return x, config, model, codes


def _is_one_to_one(labels: np.ndarray, assignment: np.ndarray) -> bool:
    pairs = set(zip(labels.tolist(), assignment.tolist(), strict=True))
    return len(pairs) == len(set(labels.tolist())) == len(set(assignment.tolist()))


def test_kmeans_recovers_well_separated_clusters(clustered):
    x, labels = clustered
    centroids, assignment = si.kmeans(x, NUM_CENTERS, iters=10, rng=jax.random.key(0), batch_size=64)
    assert centroids.shape == (NUM_CENTERS, DIM) and assignment.shape == (len(x),)
    assert _is_one_to_one(labels, assignment)  # purity 1.0 both ways
    for c in range(NUM_CENTERS):
        np.testing.assert_allclose(centroids[c], x[assignment == c].mean(axis=0), atol=1e-3)


def test_empty_clusters_are_reseeded(clustered):
    x, _ = clustered
    # Pathological init: every centroid on the same point -> all but one cluster empty after step 1.
    init = np.repeat(x[:1], NUM_CENTERS, axis=0)
    _, assignment = si.kmeans(x, NUM_CENTERS, iters=10, rng=jax.random.key(1), batch_size=64, init=init)
    assert np.bincount(assignment, minlength=NUM_CENTERS).min() > 0
    # More clusters than distinct points: as many non-empty clusters as distinct points (the maximum).
    distinct = np.random.default_rng(2).normal(size=(4, DIM)).astype(np.float32)
    repeated = np.repeat(distinct, len(x) // 4, axis=0)  # same shapes as above: compiled programs are reused
    _, assignment = si.kmeans(repeated, NUM_CENTERS, iters=10, rng=jax.random.key(2), batch_size=64)
    assert len(np.unique(assignment)) == 4


def test_sharded_kmeans_equals_single_device(clustered):
    x, _ = clustered
    x = x[:500]  # not a multiple of 8 x chunk: exercises padding rows
    mesh = sharding.make_mesh({"data": 8})
    single = si.kmeans(x, NUM_CENTERS, iters=10, rng=jax.random.key(3), batch_size=64)
    sharded = si.kmeans(x, NUM_CENTERS, iters=10, rng=jax.random.key(3), batch_size=64, sharding=mesh)
    np.testing.assert_array_equal(single[1], sharded[1])
    np.testing.assert_allclose(single[0], sharded[0], atol=1e-4)
    # Assignment to other centroids (ties and near-ties included) is identical with rows sharded.
    centroids = x[:40:5] + 0.5
    single, sharded = si.assign(x, centroids, batch_size=64), si.assign(x, centroids, batch_size=64, sharding=mesh)
    for a, b in zip(single, sharded, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tiny_fit_codes_errors_and_save(tiny_fit, tmp_path):
    x, config, model, codes = tiny_fit
    assert codes.shape == (len(x), 5) and codes.dtype == np.int32
    assert (codes >= 0).all() and (codes < np.asarray(config.level_sizes)).all()
    assert config.level_offsets == (0, 8, 12, 16, 32) and config.vocab_size == 48
    errors = model.fit_info["reconstruction_error"]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors  # each level reduces the error
    encoded, per_row = si.encode_with_errors(model, x)
    np.testing.assert_array_equal(encoded, codes)  # queries and items share the codebooks: same path
    np.testing.assert_allclose(per_row.mean(axis=0), errors, rtol=1e-4)
    model.save(str(tmp_path / "sid"))
    np.testing.assert_array_equal(si.encode(si.SemanticIDModel.load(str(tmp_path / "sid")), x[:50]), codes[:50])
    strings = si.sid_strings(codes[:1], config)[0]
    assert strings == f"<a_{codes[0, 0]}><b_{codes[0, 1]}><c_{codes[0, 2]}><d_{codes[0, 3]}><d_{codes[0, 4] + 16}>"
    np.testing.assert_array_equal(si.sid_tokens(codes[:1], config.level_offsets)[0], codes[0] + [0, 8, 12, 16, 32])


@pytest.mark.parametrize("mode", ["global", "per_parent_l1l2", "size_balanced"])
def test_last_level_modes(clustered, mode):
    x, _ = clustered
    config = si.SemanticIDConfig.tiny(last_level_mode=mode, use_opq=False, max_occupancy=8)
    model, codes = si.fit_transform(x, config)
    errors = model.fit_info["reconstruction_error"]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert (codes[:, 2] < config.rq_sizes[2]).all()  # local last-level codes
    if mode == "size_balanced":  # every last-level cluster holds at most ceil(N / k) training rows
        assert np.bincount(codes[:, 2]).max() <= -(-len(x) // config.rq_sizes[2])
    else:
        np.testing.assert_array_equal(si.encode(model, x), codes)
    if mode == "per_parent_l1l2":
        assert set(model.parent_books.keys.tolist()) == set((codes[:, 0] * 4 + codes[:, 1]).tolist())


def test_opq_beats_plain_pq_on_anisotropic_data():
    rng = np.random.default_rng(4)
    # All variance in the first sub-space: plain PQ wastes its second codebook; a rotation spreads it.
    x = (rng.normal(size=(1024, 8)) * np.array([3, 3, 2, 2, 0.01, 0.01, 0.01, 0.01])).astype(np.float32)
    kwargs = dict(num_subspaces=2, codebook_size=16, iters=4, kmeans_iters=5, rng=jax.random.key(5), batch_size=128)
    opq = si.fit_opq(x, **kwargs)
    pq = si.fit_opq(x, rotate=False, **kwargs)
    np.testing.assert_allclose(pq.rotation, np.eye(8))
    np.testing.assert_allclose(opq.rotation.T @ opq.rotation, np.eye(8), atol=1e-5)
    assert opq.errors[-1] < 0.8 * pq.errors[-1], (opq.errors, pq.errors)
    codes, recon = si.opq_encode(opq, x)
    assert codes.shape == (1024, 2)
    np.testing.assert_allclose(np.mean(np.sum((x - recon) ** 2, axis=1)), opq.errors[-1], rtol=1e-3)


def test_collision_table_recovers_every_item(tiny_fit):
    x, config, _, codes = tiny_fit
    ids = np.array([f"item{i}" for i in range(len(x))])
    table = si.collision_table(codes, item_ids=ids)
    assert sorted(table.leaf_items.tolist()) == sorted(ids.tolist())
    for leaf in range(table.num_leaves):
        rows = [int(i[4:]) for i in table.items_of(leaf)]
        assert (codes[rows] == table.leaf_codes[leaf]).all()
    for row in range(0, len(x), 37):
        assert ids[row] in table.lookup(codes[row]).tolist()
        assert (table.leaf_codes[table.item_leaf[row]] == codes[row]).all()
    present = {tuple(c) for c in codes.tolist()}
    missing = next(c for c in ([a, 0, 0, 0, b] for a in range(8) for b in range(16)) if tuple(c) not in present)
    assert table.lookup(missing).size == 0
    # Hand-built collisions: popularity orders items inside a leaf; the dedup digit makes every SID unique.
    hand = np.array([[1, 2], [0, 1], [1, 2], [1, 2]])
    table = si.collision_table(hand, popularity=[0.0, 5.0, 1.0, 3.0])
    np.testing.assert_array_equal(table.leaf_codes, [[0, 1], [1, 2]])
    np.testing.assert_array_equal(table.leaf_offsets, [0, 1, 4])
    np.testing.assert_array_equal(table.items_of(1), [3, 2, 0])
    dedup = si.add_dedup_digit(hand)
    np.testing.assert_array_equal(dedup[:, 2], [0, 0, 1, 2])
    assert si.collision_table(dedup).num_leaves == 4


def test_codebook_stats_on_hand_built_codes():
    codes = np.array([[0, 0, 0], [0, 0, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]])
    stats = si.codebook_stats(codes, (2, 2, 2), num_rq_levels=2, reconstruction_error=[[2.0, 1.0]] * 5)
    assert stats["cur_l1"] == 1.0  # {0, 1} / 2
    assert stats["cur_l1xl2"] == 0.75  # {(0,0), (0,1), (1,1)} / 4
    assert stats["cur_total"] == 0.75  # over the 2 RQ levels
    assert stats["cur_per_level"][2] == 4 / 8
    assert stats["icr"] == 3 / 5 and stats["distinct_sids"] == 4
    assert stats["collision_rate"] == pytest.approx(1 / 5) and stats["max_items_per_sid"] == 2
    assert stats["reconstruction_error"] == [2.0, 1.0]
    with pytest.raises(ValueError, match="row 1"):
        si.codebook_stats([[0, 0], [0, 2]], (2, 2))


def test_keyword_enhancement_tiny_case():
    assert si.match_keywords("Nike Air running shoes for MEN", ["nike", "nike air", "air", "men", "shoe", "red"]) == [
        "nike air",
        "shoe",
        "men",
    ]
    e = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    kw = np.array([[0.0, 1.0], [0.0, -1.0]], np.float32)
    fused = si.fuse_keywords(e, kw, [0, 1, 1, 3], [0, 0, 1], weight=0.5)
    np.testing.assert_allclose(fused[0], np.array([0.5, 0.5]) / np.sqrt(0.5), atol=1e-6)  # normalize(e/2 + kw/2)
    np.testing.assert_allclose(fused[1], e[1])  # no keywords: raw embedding
    np.testing.assert_allclose(fused[2], e[2], atol=1e-6)  # keyword mean is 0 -> e/2, normalised
    unnormalised = si.fuse_keywords(e, kw, [0, 1, 1, 3], [0, 0, 1], weight=0.25, normalize=False)
    np.testing.assert_allclose(unnormalised[0], [0.75, 0.25])

    class Lookup:  # a stand-in encoder: one fixed vector per known string
        table = {"red shoe": [1.0, 0.0], "red": [0.0, 1.0], "blue hat": [0.0, -1.0]}

        def encode(self, texts):
            return np.array([self.table[t] for t in texts], np.float32)

    out = si.embed_with_keywords(["red shoe", "blue hat"], Lookup(), keyword_pool=["red", "green"])
    np.testing.assert_allclose(out, [[np.sqrt(0.5), np.sqrt(0.5)], [0.0, -1.0]], atol=1e-6)


def test_bad_input_errors(clustered):
    x, _ = clustered
    config = si.SemanticIDConfig.tiny()
    bad = x[:40].copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="row 17"):
        si.fit(bad, config)
    bad[17, 3] = np.inf
    with pytest.raises(ValueError, match="row 17"):
        si.kmeans(bad, 4, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="empty"):
        si.fit(np.zeros((0, DIM), np.float32), config)
    small = si.SemanticIDConfig.tiny(rq_sizes=(2, 2), use_opq=False, last_level_mode="global")
    with pytest.raises(ValueError, match=r"too few for 40 rows.*rq_sizes=\(20, 2\)"):
        si.fit(x[:40], small)
    with pytest.raises(ValueError, match="exceed the 10 rows"):
        si.fit(x[:10], config)  # 16 OPQ centroids for 10 rows
    with pytest.raises(ValueError, match="duplicate item id 'b' at rows \\[1, 3\\]"):
        si.collision_table(np.zeros((4, 2), np.int32), item_ids=["a", "b", "c", "b"])
    with pytest.raises(ValueError, match="last_level_mode"):
        si.SemanticIDConfig(last_level_mode="balanced")


TITLES = [
    "Apple iPhone 15 smartphone 128GB black",
    "Samsung Galaxy S23 android smartphone 256GB",
    "Xiaomi Redmi Note 12 smartphone dual SIM",
    "Google Pixel 8 phone with 5G",
    "Nike Air Zoom men's running shoes",
    "Adidas Ultraboost women's running sneakers",
    "Asics Gel trail running shoes waterproof",
    "New Balance 574 classic sneakers",
    "Stainless steel chef knife 8 inch",
    "Non-stick frying pan 28cm with lid",
    "Cast iron skillet pre-seasoned 12 inch",
    "Ceramic kitchen knife set with block",
    "Organic green tea bags 100 count",
    "Colombian medium roast ground coffee 1kg",
    "Earl grey black tea loose leaf",
    "Espresso coffee beans dark roast",
]


@pytest.mark.slow  # end to end with the real all-MiniLM-L6-v2 (~15 s of compiles on an idle 2-core machine)
def test_real_minilm_product_titles_end_to_end():
    from jax_hd.models import bert
    from jax_hd.retrieval.dense import Encoder

    try:
        bert.minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    encoder = Encoder.minilm(batch_buckets=(16,), length_buckets=(16,))
    pool = ["smartphone", "running shoes", "sneakers", "knife", "tea", "coffee", "pan"]
    items = si.embed_with_keywords(TITLES, encoder, keyword_pool=pool)
    queries = si.embed_with_keywords(["cheap android phone", "trail running shoes"], encoder, keyword_pool=pool)
    assert items.shape == (16, 384)
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, atol=1e-5)
    config = si.SemanticIDConfig.tiny(rq_sizes=(4, 2, 2), opq_codebook_size=4)
    model, codes = si.fit_transform(np.concatenate([queries, items]), config)  # queries + items: one codebook
    item_codes = codes[2:]
    table = si.collision_table(item_codes)
    assert sorted(table.leaf_items.tolist()) == list(range(16))
    # Level 1 groups similar titles: same-cluster pairs are more similar than cross-cluster pairs.
    sim = items @ items.T
    same = item_codes[:, :1] == item_codes[:, 0][None]
    off_diagonal = ~np.eye(16, dtype=bool)
    assert sim[same & off_diagonal].mean() > sim[~same].mean()
    # The running-shoe query lands in the level-1 cluster of a running-shoe title.
    query_codes = si.encode(model, queries)
    np.testing.assert_array_equal(query_codes, codes[:2])
    assert query_codes[1, 0] in item_codes[4:8, 0]
    stats = si.codebook_stats(item_codes, config.level_sizes, num_rq_levels=3)
    assert 0.0 < stats["icr"] <= 1.0
