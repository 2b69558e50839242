"""Tests for jax_hd.data.catalog: the simulated world, KuaiSearch / Amazon / ESCI readers, splits and grain glue."""

from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from jax_hd.data import catalog as cat

SMALL = dict(num_items=600, num_users=60, num_sessions=500, num_intents=150)


@pytest.fixture(scope="module")
def world() -> cat.SimulatedWorld:
    return cat.simulated_world(0)


@pytest.fixture(scope="module")
def small_world() -> cat.SimulatedWorld:
    return cat.simulated_world(1, **SMALL)


@pytest.fixture(scope="module")
def small_dir(small_world, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("kuaisearch"))
    cat.write_kuaisearch(small_world, out, with_rank=True)
    return out


def _session_counts(log: cat.QueryLog, values: np.ndarray) -> np.ndarray:
    """Per-session sums of a per-impression array."""
    return np.bincount(log.impression_session, weights=values.astype(np.float64), minlength=len(log))


# ----------------------------------------------------------------------------------------------------------------------
# Simulated world
# ----------------------------------------------------------------------------------------------------------------------


def test_default_world_catalog(world):
    c = world.catalog
    assert len(c) == 20_000 and len(world.users) == 5_000 and len(world.log) == 50_000
    assert c.category_paths.shape == (20_000, 3) and np.all(c.category_paths != "")
    # a tree: every level-2 name has one parent, every leaf one level-2 parent
    for child, parent in ((1, 0), (2, 1)):
        pairs = {(a, b) for a, b in zip(c.category_paths[:, child], c.category_paths[:, parent], strict=True)}
        assert len(pairs) == len({a for a, _ in pairs})
    assert len(set(c.category_paths[:, 0])) == 8 and len(set(c.category_paths[:, 2])) == 128
    assert c.attribute_names == ("colour", "material", "size", "style") and np.all(c.attribute_values != "")
    assert np.all(c.prices > 0) and len(set(c.brands.tolist())) > 50
    for i in range(0, 20_000, 997):  # titles are generated from the attributes
        title = c.titles[i]
        assert c.brands[i] in title and c.category_paths[i, 2] in title and c.attribute("colour")[i] in title
    np.testing.assert_allclose(world.user_l1_affinity.sum(1), 1.0, rtol=1e-5)


def test_world_is_deterministic_per_seed(small_world):
    again = cat.simulated_world(1, **SMALL)
    other = cat.simulated_world(2, **SMALL)
    for name in ("titles", "prices", "brands"):
        np.testing.assert_array_equal(getattr(small_world.catalog, name), getattr(again.catalog, name))
    for name in ("queries", "timestamps", "impressed_items", "clicked", "ordered", "relevance"):
        np.testing.assert_array_equal(getattr(small_world.log, name), getattr(again.log, name))
    assert small_world.log.preference_keywords == again.log.preference_keywords
    assert not np.array_equal(small_world.catalog.titles, other.catalog.titles)


def test_zipf_head_and_long_tail(world):
    counts = np.bincount(world.session_intents, minlength=len(world.intents))
    ranked = np.sort(counts)[::-1]
    head = ranked[: len(ranked) // 100].sum() / ranked.sum()
    used = counts[counts > 0]
    assert head > 0.3, head  # the top 1% of intents carry a large share of the traffic
    assert np.mean(used <= 2) > 0.3  # and a long tail of rare queries
    assert ranked[0] > 50 * np.median(used)


def test_log_invariants(world):
    log = world.log
    assert not np.any(log.ordered & ~log.clicked)
    assert set(np.unique(log.relevance).tolist()) <= {0, 1, 2, 3}
    keys = log.impression_session * len(world.catalog) + log.impressed_items
    assert len(np.unique(keys)) == len(keys)  # no item shown twice in a session
    rates = [log.clicked[log.relevance == r].mean() for r in range(4)]
    assert rates[3] > rates[2] > rates[1] and rates[3] > 5 * rates[0]
    assert log.ordered[log.relevance == 3].mean() > log.ordered[log.relevance == 1].mean()
    assert 0.5 < _session_counts(log, log.clicked).mean() < 4
    # time split
    times = {s: log.timestamps[log.splits == s] for s in cat.SPLITS}
    assert times["train"].max() < times["val"].min() <= times["val"].max() < times["test"].min()
    assert abs(len(times["train"]) / len(log) - 0.8) < 0.02
    # launches and cold items
    launch = world.item_launch_times[log.impressed_items]
    assert np.all(launch < log.timestamps[log.impression_session])
    train_items = log.split("train").impressed_items
    assert not np.any(world.cold_items[train_items]) and 0.01 < world.cold_items.mean() < 0.1
    assert np.any(world.cold_items[log.split("test").impressed_items])


def test_relevance_follows_intent_constraints(world):
    log, intents = world.log, world.intents
    intent = world.session_intents[log.impression_session]
    items = log.impressed_items
    same_leaf = world.item_leaves[items] == intents.leaves[intent]
    np.testing.assert_array_equal(same_leaf, log.relevance >= 2)
    neg = same_leaf & (intents.kinds[intent] == cat.K_NOT_COLOUR)
    np.testing.assert_array_equal(
        world.item_colours[items][neg] != intents.values[intent][neg], log.relevance[neg] == 3
    )
    sub = same_leaf & (intents.kinds[intent] == cat.K_SUBSTITUTE)
    ok = (world.item_brands[items] != intents.values[intent]) & (
        world.catalog.prices[items] < intents.price_limits[intent]
    )
    np.testing.assert_array_equal(ok[sub], log.relevance[sub] == 3)
    assert np.all(log.relevance[(world.item_leaves[items] != intents.leaves[intent])] <= 1)


def test_complex_queries_have_thoughts(world):
    log = world.log
    share = {t: np.mean(log.query_types == t) for t in cat.QUERY_TYPES}
    assert all(share[t] > 0.05 for t in cat.COMPLEX_QUERY_TYPES) and 0.2 < 1 - share["simple"] < 0.5
    assert all(1 <= len(k) <= 8 for k in log.keywords) and all(1 <= len(k) <= 5 for k in log.preference_keywords)
    intents = world.intents
    for j in range(len(intents)):
        kind, text, words = int(intents.kinds[j]), str(intents.texts[j]), intents.keywords[j]
        leaf = world.tree.leaf_names[intents.leaves[j]]
        assert words[0] in (leaf, text.split()[0]) or leaf in words
        if kind == cat.K_NOT_COLOUR:
            excluded = text.rsplit(" not ", 1)[1]
            assert excluded not in words and len(words) >= 3
        elif kind == cat.K_SUBSTITUTE:
            assert text.startswith("like ") and text.endswith(" but cheaper")
            assert world.brand_names[intents.values[j]] not in words
        elif kind == cat.K_PRICE_QUESTION:
            assert text.startswith("which ") and f"under {int(intents.price_limits[j])} dollars" in words
    # train sessions keep the interacted item's brand among the preference keywords (calibration, spec 2.3 step 3)
    train_clicked = np.flatnonzero((log.splits == "train") & (_session_counts(log, log.clicked) > 0))[:200]
    for s in train_clicked:
        imp = log.impressions(s)
        first = log.impressed_items[imp][log.ordered[imp]] if log.ordered[imp].any() else None
        item = first[0] if first is not None else log.impressed_items[imp][log.clicked[imp]][0]
        assert log.preference_keywords[s][0] == world.catalog.brands[item]


# ----------------------------------------------------------------------------------------------------------------------
# KuaiSearch layout: round trip and bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_write_read_round_trip(small_world, small_dir):
    data = cat.read_kuaisearch(small_dir)
    w = small_world
    for name in ("item_ids", "titles", "category_paths", "brands", "attribute_values", "prices", "sellers"):
        np.testing.assert_array_equal(getattr(data.catalog, name), getattr(w.catalog, name), err_msg=name)
    assert data.catalog.attribute_names == w.catalog.attribute_names
    for name in ("user_ids", "genders", "age_buckets", "countries", "provinces", "cities"):
        np.testing.assert_array_equal(getattr(data.users, name), getattr(w.users, name), err_msg=name)
    for name in (
        "session_ids",
        "user_ids",
        "queries",
        "timestamps",
        "splits",
        "impression_offsets",
        "impressed_items",
        "clicked",
        "ordered",
        "relevance",
        "query_types",
    ):
        np.testing.assert_array_equal(getattr(data.log, name), getattr(w.log, name), err_msg=name)
    assert data.log.keywords == w.log.keywords and data.log.preference_keywords == w.log.preference_keywords
    assert len(data.relevance) == len(w.relevance) and np.all(data.relevance.item_rows >= 0)
    rank = data.rank
    assert len(rank) == len(w.log.impressed_items)
    np.testing.assert_array_equal(rank.target_items, w.log.impressed_items)
    np.testing.assert_array_equal(rank.is_clicked, w.log.clicked)
    np.testing.assert_array_equal(rank.target_prices, w.catalog.prices[w.log.impressed_items])
    assert np.all(rank.item_stats[:, 1] <= rank.item_stats[:, 0]) and np.all(rank.user_stats >= 0)
    # recent clicks precede the session
    history = cat.history_from_log(w.log)
    s = int(np.argmax([len(r) for r in rank.recent_clicked]))
    assert len(rank.recent_clicked[s]) > 0
    user = history.row_of[str(rank.user_ids[s])]
    window = history.recent(user, int(rank.timestamps[s]), 20)
    assert rank.recent_clicked[s] == tuple(history.items[window].tolist())


def _write_lines(path: str, lines: list[str]) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _item(i, title="red cotton t-shirt"):
    return json.dumps({"item_id": i, "item_title": title, "brand_name": "Acme", "category_level1_name": "clothing"})


def _session(impressed, clicked=(), purchased=(), line_user=1):
    return json.dumps(
        {
            "user_id": line_user,
            "session_id": 7,
            "impressed_item_ids": list(impressed),
            "clicked_item_ids": list(clicked),
            "purchased_item_ids": list(purchased),
            "time_index": 5,
            "query": "t-shirt",
            "split": "train",
        }
    )


def _kuaisearch(tmp_path, items, recall, relevance=None) -> str:
    root = str(tmp_path)
    _write_lines(os.path.join(root, "items.jsonl"), items)
    _write_lines(os.path.join(root, "recall.jsonl"), recall)
    if relevance is not None:
        _write_lines(os.path.join(root, "relevance.jsonl"), relevance)
    return root


def test_kuaisearch_minimal_directory(tmp_path):
    root = _kuaisearch(
        tmp_path,
        [_item(1), _item("A2", "blue jeans")],
        [_session([1, "A2"], clicked=[1], purchased=["A2"])],
        relevance=[json.dumps({"query": "t-shirt", "item_title": "blue jeans", "label": 1})],
    )
    data = cat.read_kuaisearch(root)
    assert data.catalog.item_ids.tolist() == ["1", "A2"] and data.users is None and data.rank is None
    assert data.log.clicked.tolist() == [True, True] and data.log.ordered.tolist() == [False, True]
    assert data.log.relevance.tolist() == [-1, 1]  # matched by unique title, `label` accepted for `score`


@pytest.mark.parametrize(
    "items, recall, relevance, pattern",
    [
        ([_item(1), _item(2, "  ")], [_session([1])], None, r"items\.jsonl: line 2: item '2' has no text"),
        (
            [_item(1), _item(2), _item(1)],
            [_session([1])],
            None,
            r"items\.jsonl: line 3: duplicate item id '1' \(first at .*items\.jsonl: line 1\)",
        ),
        (
            [_item(1)],
            [_session([1]), _session([1, 9])],
            None,
            r"recall\.jsonl: line 2: field 'impressed_item_ids': unknown item id '9'",
        ),
        (
            [_item(1), _item(2)],
            [_session([1], clicked=[2])],
            None,
            r"recall\.jsonl: line 1: field 'clicked_item_ids': item '2' was not impressed",
        ),
        ([_item(1)], ["{not json"], None, r"recall\.jsonl: line 1: not valid JSON"),
        ([_item(1)], [_session([1]).replace('"train"', '"dev"')], None, r"recall\.jsonl: line 1: field 'split'"),
        (
            [_item(1)],
            [_session([1])],
            [json.dumps({"query": "q", "item_id": 1, "score": 5})],
            r"relevance\.jsonl: line 1: field 'score' must be a relevance label in 0..3",
        ),
        (
            [_item(1)],
            [_session([1])],
            [json.dumps({"query": "q", "item_id": 4, "score": 2})],
            r"relevance\.jsonl: line 1: field 'item_id': unknown item id '4'",
        ),
    ],
    ids=[
        "no_text",
        "duplicate_id",
        "unknown_item",
        "click_not_impressed",
        "bad_json",
        "bad_split",
        "bad_label",
        "relevance_unknown_item",
    ],
)
def test_kuaisearch_bad_input_names_file_and_line(tmp_path, items, recall, relevance, pattern):
    root = _kuaisearch(tmp_path, items, recall, relevance)
    with pytest.raises(cat.CatalogDataError, match=pattern):
        cat.read_kuaisearch(root)


def test_kuaisearch_missing_files(tmp_path):
    with pytest.raises(cat.CatalogFileNotFoundError, match="items.jsonl: file not found"):
        cat.read_kuaisearch(str(tmp_path))
    _write_lines(str(tmp_path / "items.jsonl"), [_item(1)])
    with pytest.raises(FileNotFoundError, match="recall.jsonl: file not found"):
        cat.read_kuaisearch(str(tmp_path))
    with pytest.raises(cat.CatalogFileNotFoundError, match="nowhere"):
        cat.read_kuaisearch(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------------------------
# Amazon 2014 / 2018 and ESCI
# ----------------------------------------------------------------------------------------------------------------------


def _reviews(path, rows):
    return _write_lines(
        path, [json.dumps({"reviewerID": u, "asin": a, "unixReviewTime": t, "overall": 5.0}) for u, a, t in rows]
    )


_REVIEWS = [("U1", "B2", 30), ("U1", "B1", 10), ("U2", "B1", 5), ("U1", "B3", 20)]
_META_2014 = [
    "{'asin': 'B1', 'title': \"Lily's rose lipstick\", 'price': 9.5, 'categories': [['Beauty', 'Makeup', 'Lips']]}",
    "{'asin': 'B2', 'description': 'a soft brush', 'brand': 'Acme', 'categories': [['Beauty', 'Tools']]}",
    "{'asin': 'B3', 'title': 'mascara', 'salesRank': {'Beauty': 12}, 'related': {'also_bought': ['B1']}}",
    "{'asin': 'B9', 'title': 'never reviewed'}",
]


def test_amazon_2014_literal_meta_and_sequences(tmp_path):
    data = cat.read_amazon_2014(
        _reviews(str(tmp_path / "reviews_Beauty_5.json.gz"), _REVIEWS),
        _write_lines(str(tmp_path / "meta_Beauty.json.gz"), _META_2014),
    )
    c = data.catalog
    assert c.item_ids.tolist() == ["B1", "B2", "B3"]  # reviewed items only, meta order
    assert c.titles.tolist() == ["Lily's rose lipstick", "a soft brush", "mascara"]  # description as fallback text
    assert c.category_paths[0].tolist() == ["Beauty", "Makeup", "Lips"] and c.category_paths[2].tolist() == ["", "", ""]
    assert c.prices[0] == 9.5 and np.isnan(c.prices[1]) and c.brands[1] == "Acme"
    h = data.history
    assert h.user_ids.tolist() == ["U1", "U2"]
    assert c.item_ids[h.sequence(0)].tolist() == ["B1", "B3", "B2"]  # sorted by unixReviewTime
    assert h.timestamps[h.offsets[0] : h.offsets[1]].tolist() == [10, 20, 30]


def test_amazon_2014_rejects_malicious_and_malformed_literals(tmp_path):
    reviews = _reviews(str(tmp_path / "r.json"), _REVIEWS)
    marker = tmp_path / "pwned"
    for bad in (
        f"__import__('os').system('touch {marker}')",
        "{'asin': 'B2', 'title': 'x'",
        "[1, 2]",
        "{'asin': 'B2', 'title': open('/etc/passwd').read()}",
    ):
        meta = _write_lines(str(tmp_path / "meta.json"), [_META_2014[0], bad])
        with pytest.raises(
            cat.CatalogDataError, match=r"meta\.json: line 2: (malformed Python literal|expected a dict)"
        ):
            cat.read_amazon_2014(reviews, meta)
    assert not marker.exists()
    with pytest.raises(cat.CatalogDataError, match=r"malformed Python literal"):
        cat.parse_python_literal("__import__('os')", "here")


def test_amazon_bad_input(tmp_path):
    reviews = _reviews(str(tmp_path / "r.json"), _REVIEWS)
    meta = _write_lines(str(tmp_path / "meta.json"), _META_2014[:2] + ["{'asin': 'B3', 'brand': 'Acme'}"])
    with pytest.raises(cat.CatalogDataError, match=r"meta\.json: line 3: item 'B3' has no text"):
        cat.read_amazon_2014(reviews, meta)
    skipped = cat.read_amazon_2014(reviews, meta, missing_text="skip")
    assert skipped.catalog.item_ids.tolist() == ["B1", "B2"] and len(skipped.history.items) == 3
    meta = _write_lines(str(tmp_path / "meta.json"), _META_2014[:2])
    with pytest.raises(cat.CatalogDataError, match=r"r\.json: line 4: unknown item id 'B3'"):
        cat.read_amazon_2014(reviews, meta)
    meta = _write_lines(str(tmp_path / "meta.json"), _META_2014 + [_META_2014[1]])
    with pytest.raises(cat.CatalogDataError, match=r"meta\.json: line 5: duplicate item id 'B2'"):
        cat.read_amazon_2014(reviews, meta)
    with pytest.raises(cat.CatalogFileNotFoundError, match="missing.json.gz: file not found"):
        cat.read_amazon_2014(reviews, str(tmp_path / "missing.json.gz"))
    bad_reviews = _write_lines(str(tmp_path / "r2.json"), [json.dumps({"reviewerID": "U1", "asin": "B1"})])
    with pytest.raises(cat.CatalogDataError, match=r"r2\.json: line 1: missing field 'unixReviewTime'"):
        cat.read_amazon_2014(bad_reviews, meta)


def test_amazon_2018_json_meta(tmp_path):
    reviews = _reviews(str(tmp_path / "Beauty_5.json"), _REVIEWS)
    rows = [
        {
            "asin": "B1",
            "title": "lipstick",
            "price": "$12.99",
            "category": ["Beauty", "Lips"],
            "description": ["a", "b"],
        },
        {"asin": "B2", "title": "brush", "price": "", "brand": "Acme"},
        {"asin": "B3", "title": "mascara", "price": ".a-box-inner{background-color:#fff}"},
    ]
    meta_lines = [json.dumps(r) for r in rows]
    data = cat.read_amazon_2018(reviews, _write_lines(str(tmp_path / "meta.json"), meta_lines))
    assert data.catalog.prices[0] == pytest.approx(12.99) and np.all(np.isnan(data.catalog.prices[1:]))
    assert data.catalog.descriptions[0] == "a b" and data.catalog.category_paths[0].tolist() == ["Beauty", "Lips"]
    dup = _write_lines(str(tmp_path / "meta2.json"), meta_lines + [meta_lines[0]])
    with pytest.raises(cat.CatalogDataError, match=r"meta2\.json: line 4: duplicate item id 'B1'"):
        cat.read_amazon_2018(reviews, dup)
    assert len(cat.read_amazon_2018(reviews, dup, duplicate_items="first").catalog) == 3


def _esci(tmp_path, fmt, examples_extra=(), products_extra=()):
    examples = {
        "example_id": [0, 1, 2, 3],
        "query": ["red shoes", "red shoes", "lamp", "lamp"],
        "query_id": [1, 1, 2, 2],
        "product_id": ["P1", "P2", "P3", "P1"],
        "product_locale": ["us", "us", "us", "jp"],
        "esci_label": ["E", "S", "I", "C"],
        "small_version": [1, 1, 1, 1],
        "large_version": [1, 1, 1, 1],
        "split": ["train", "train", "test", "train"],
    }
    products = {
        "product_id": ["P1", "P2", "P3", "P1"],
        "product_title": ["red sneaker", "red boot", "desk lamp", "akai"],
        "product_brand": ["Acme", None, "Lumo", "X"],
        "product_color": ["red", "red", None, "red"],
        "product_locale": ["us", "us", "us", "jp"],
    }
    for table, extra in ((examples, examples_extra), (products, products_extra)):
        for key, index, value in extra:
            table[key][index] = value
    paths = []
    for name, table in (("examples", examples), ("products", products)):
        path = str(tmp_path / f"shopping_queries_dataset_{name}.{fmt}")
        (pq.write_table if fmt == "parquet" else pa_csv.write_csv)(pa.table(table), path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_esci(tmp_path, fmt):
    data = cat.read_esci(*_esci(tmp_path, fmt))
    assert data.catalog.item_ids.tolist() == ["P1", "P2", "P3"]
    assert data.judgments.labels.tolist() == [3, 2, 0] and data.judgments.splits.tolist() == ["train", "train", "test"]
    assert data.catalog.attribute("color").tolist() == ["red", "red", ""] and data.catalog.brands[1] == ""


def test_esci_bad_input(tmp_path):
    ex, pr = _esci(tmp_path, "parquet", examples_extra=[("esci_label", 1, "X")])
    with pytest.raises(cat.CatalogDataError, match=r"examples\.parquet: row 1: column 'esci_label'"):
        cat.read_esci(ex, pr)
    ex, pr = _esci(tmp_path, "parquet", examples_extra=[("product_id", 2, "P7")])
    with pytest.raises(cat.CatalogDataError, match=r"examples\.parquet: row 2: unknown item id 'P7'"):
        cat.read_esci(ex, pr)
    ex, pr = _esci(tmp_path, "parquet", products_extra=[("product_id", 1, "P1")])
    with pytest.raises(cat.CatalogDataError, match=r"products\.parquet: row 1: duplicate item id 'P1'"):
        cat.read_esci(ex, pr)
    ex, pr = _esci(tmp_path, "parquet", products_extra=[("product_title", 2, None)])
    with pytest.raises(cat.CatalogDataError, match=r"products\.parquet: row 2: item 'P3' has no text"):
        cat.read_esci(ex, pr)
    pq.write_table(pa.table({"query": ["q"]}), ex)
    with pytest.raises(cat.CatalogDataError, match=r"examples\.parquet: missing column 'query_id'"):
        cat.read_esci(ex, pr)


# ----------------------------------------------------------------------------------------------------------------------
# Splits, histories and grain pipelines
# ----------------------------------------------------------------------------------------------------------------------


def _hand_history() -> cat.UserHistory:
    # user A: items 10..14 at times 1..5 (given out of order); user B: two items; user C: one item
    return cat._history(
        ["A", "B", "C"],
        np.array([0, 0, 1, 0, 0, 0, 1, 2]),
        np.array([12, 10, 20, 11, 14, 13, 21, 30]),
        np.array([3, 1, 1, 2, 5, 4, 2, 1]),
        np.array([""] * 8),
        np.zeros(8, np.int8),
    )


def test_leave_one_out_hand_built():
    history = _hand_history()
    assert history.sequence(0).tolist() == [10, 11, 12, 13, 14]
    splits = cat.leave_one_out(history, max_history=3)
    test, val, train = splits["test"], splits["val"], splits["train"]
    assert test.user_rows.tolist() == [0] and test.targets.tolist() == [14]
    assert test.histories.tolist() == [[11, 12, 13]] and test.history_lengths.tolist() == [3]  # capped at 3
    assert val.targets.tolist() == [13] and val.histories.tolist() == [[10, 11, 12]]
    # A trains on 11 and 12; B (2 items: no val/test) trains on 21; C (1 item) gives nothing
    assert train.user_rows.tolist() == [0, 0, 1] and train.targets.tolist() == [11, 12, 21]
    assert train.histories.tolist() == [[10, -1, -1], [10, 11, -1], [20, -1, -1]]
    assert history.recent(0, before=4, k=2) == slice(1, 3)  # events at times 2 and 3


def test_history_and_recent_context(small_world):
    log = small_world.log
    history = cat.history_from_log(log)
    assert len(history.items) == int(log.clicked.sum())
    for u in range(len(history)):
        assert np.all(np.diff(history.timestamps[history.offsets[u] : history.offsets[u + 1]]) >= 0)
    context = cat.recent_context(log, history, k=5)
    s = int(np.argmax(context["num_recent"]))
    n = context["num_recent"][s]
    assert n == 5 and np.all(context["recent_items"][s, n:] == -1)
    user = history.row_of[str(log.user_ids[s])]
    window = history.recent(user, int(log.timestamps[s]), 5)
    assert np.all(history.timestamps[window] < log.timestamps[s])
    np.testing.assert_array_equal(context["recent_items"][s, :n], history.items[window])


def test_query_log_dataset(small_world):
    log = small_world.log.split("val")
    context = cat.recent_context(log, cat.history_from_log(small_world.log))
    ds = cat.query_log_dataset(log, context=context, batch_size=8, max_impressions=12)
    batches = list(ds)
    assert sum(int(b["valid"].sum()) for b in batches) == len(log) and all(len(b["valid"]) == 8 for b in batches)
    first = batches[0]
    assert first["impressed_items"].shape == (8, 12) and first["impressed_items"].dtype == np.int32
    imp = log.impressions(0)
    n = imp.stop - imp.start
    np.testing.assert_array_equal(first["impressed_items"][0, :n], log.impressed_items[imp])
    assert np.all(first["impressed_items"][0, n:] == -1) and np.all(first["relevance"][0, n:] == -1)
    assert first["query"][0] == log.queries[0] and first["recent_items"].shape == (8, 5)
    shuffled = [int(e["index"]) for e in cat.query_log_dataset(log, shuffle_seed=3)]
    assert sorted(shuffled) == list(range(len(log))) and shuffled != sorted(shuffled)


def test_sequence_dataset():
    train = cat.leave_one_out(_hand_history(), max_history=3)["train"]
    batches = list(cat.sequence_dataset(train, batch_size=2))
    assert [b["valid"].tolist() for b in batches] == [[True, True], [True, False]]
    assert batches[0]["history"].shape == (2, 3) and batches[1]["target"][0] == 21


def test_catalog_validation_errors():
    with pytest.raises(cat.CatalogDataError, match=re.escape("item 1: duplicate item id 'a' (first at item 0)")):
        cat.make_catalog(["a", "a"], ["x", "y"])
    with pytest.raises(ValueError, match="impressions_per_session"):
        cat.simulated_world(0, num_items=300, impressions_per_session=30)
