"""OneSearch on real-log layouts (`config.data.source`): fixture directories in the official KuaiSearch, Amazon 2014 /
2018 and ESCI layouts, all written from one tiny simulated world; how each source becomes a search log; config errors;
and `trainer.train` end to end on each source at cpu_test size."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.configs import onesearch as configs
from jax_hd.core import sharding
from jax_hd.core.config import ConfigError
from jax_hd.data import catalog as cat
from jax_hd.onesearch import sources, trainer

ESCI_LABEL = {3: "E", 2: "S", 1: "C", 0: "I"}


@pytest.fixture(scope="module")
def world() -> cat.SimulatedWorld:
    d = configs.get_config("cpu_test").data
    return cat.simulated_world(
        0, num_items=d.num_items, num_users=d.num_users, num_sessions=d.num_sessions, num_intents=d.num_intents
    )


def _write_lines(path: str, lines: list[str]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _amazon(world: cat.SimulatedWorld, out: str, year: int) -> tuple[str, str]:
    """Reviews = the world's click histories (one review per click), meta = the reviewed items."""
    c, h = world.catalog, cat.history_from_log(world.log)
    users = np.repeat(h.user_ids, np.diff(h.offsets))
    reviews = [
        json.dumps({"reviewerID": f"U{u}", "asin": f"A{c.item_ids[i]}", "unixReviewTime": int(t) * 60, "overall": 5.0})
        for u, i, t in zip(users.tolist(), h.items.tolist(), h.timestamps.tolist(), strict=True)
    ]
    meta = []
    for i in sorted(set(h.items.tolist())):
        path, price = c.category_paths[i].tolist(), float(c.prices[i])
        if year == 2014:
            meta.append(repr({"asin": f"A{c.item_ids[i]}", "title": str(c.titles[i]), "price": price,
                              "categories": [path]}))  # fmt: skip
        else:
            meta.append(json.dumps({"asin": f"A{c.item_ids[i]}", "title": str(c.titles[i]), "price": f"${price:.2f}",
                                    "category": path}))  # fmt: skip
    names = ("reviews_Beauty_5.json", "meta_Beauty.json") if year == 2014 else ("Beauty_5.json", "meta_Beauty.json")
    return _write_lines(os.path.join(out, names[0]), reviews), _write_lines(os.path.join(out, names[1]), meta)


def _esci(world: cat.SimulatedWorld, out: str) -> tuple[str, str]:
    """Judgments = the world's labelled (query, impressed item) pairs, one query id per query text, every fifth query
    in the test split; products = the judged items."""
    log, c = world.log, world.catalog
    qid = {q: k for k, q in enumerate(dict.fromkeys(log.queries.tolist()))}
    pairs: dict[tuple[str, int], int] = {}
    for s in range(len(log)):
        imp = log.impressions(s)
        for i, y in zip(log.impressed_items[imp].tolist(), log.relevance[imp].tolist(), strict=True):
            pairs.setdefault((str(log.queries[s]), i), y)
    rows = list(pairs.items())
    examples = {
        "example_id": list(range(len(rows))),
        "query": [q for (q, _), _ in rows],
        "query_id": [qid[q] for (q, _), _ in rows],
        "product_id": [f"P{c.item_ids[i]}" for (_, i), _ in rows],
        "product_locale": ["us"] * len(rows),
        "esci_label": [ESCI_LABEL[y] for _, y in rows],
        "small_version": [1] * len(rows),
        "large_version": [1] * len(rows),
        "split": ["test" if qid[q] % 5 == 0 else "train" for (q, _), _ in rows],
    }
    items = sorted({i for (_, i), _ in rows})
    products = {
        "product_id": [f"P{c.item_ids[i]}" for i in items],
        "product_title": [str(c.titles[i]) for i in items],
        "product_brand": [str(c.brands[i]) for i in items],
        "product_color": [str(c.attribute("colour")[i]) for i in items],
        "product_locale": ["us"] * len(items),
    }
    paths = []
    for name, table in (("examples", examples), ("products", products)):
        paths.append(os.path.join(out, f"shopping_queries_dataset_{name}.parquet"))
        pq.write_table(pa.table(table), paths[-1])
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def data_dirs(world, tmp_path_factory) -> dict[str, dict[str, str]]:
    """source -> the `config.data` path fields of its fixture directory."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    ks = str(root / "kuaisearch")
    cat.write_kuaisearch(world, ks)
    out["kuaisearch"] = {"root": ks}
    for year in (2014, 2018):
        d = root / f"amazon{year}"
        d.mkdir()
        reviews, meta = _amazon(world, str(d), year)
        out[f"amazon{year}"] = {"reviews_path": reviews, "meta_path": meta}
    d = root / "esci"
    d.mkdir()
    examples, products = _esci(world, str(d))
    out["esci"] = {"examples_path": examples, "products_path": products}
    return out


def _config(source: str, paths: dict[str, str], **overrides):
    c = configs.get_config(f"cpu_test_{source}")
    c.data.update(paths)
    c.trainer.update(stage1_steps=2, stage2_steps=1, stage3_steps=2, checkpoint_every=2)
    c.eval.update(max_pairs=16, unconstrained_pairs=4, leave_one_out_users=8, every_stage=False)
    c.update_from_flattened_dict(overrides)
    return c


# ----------------------------------------------------------------------------------------------------------
# How each source becomes a log (no model).


def test_review_log_is_the_leave_one_out_protocol(world, data_dirs):
    data = cat.read_amazon_2014(**data_dirs["amazon2014"])
    log = sources.review_log(data.history)
    assert len(log) == len(data.history.items) and log.clicked.all() and not log.ordered.any()
    assert set(log.queries.tolist()) == {sources.REVIEW_QUERY}
    loo = cat.leave_one_out(data.history)
    for split in ("val", "test"):  # the split's sessions are exactly the protocol's targets, user by user
        part = log.split(split)
        users = data.history.row_of
        np.testing.assert_array_equal([users[u] for u in part.user_ids.tolist()], loo[split].user_rows)
        np.testing.assert_array_equal(part.impressed_items, loo[split].targets)
    # The history rebuilt from the log is the review history (same users, items, order).
    h = cat.history_from_log(log)
    np.testing.assert_array_equal(h.items, data.history.items)
    np.testing.assert_array_equal(h.offsets, data.history.offsets)


def test_esci_log(data_dirs):
    data = cat.read_esci(data_dirs["esci"]["examples_path"], data_dirs["esci"]["products_path"])
    log = sources.esci_log(data)
    assert len(set(log.user_ids.tolist())) == len(log) == len(set(data.query_ids.tolist()))
    assert set(log.splits.tolist()) == {"train", "test"}
    np.testing.assert_array_equal(log.clicked, log.relevance == 3)
    np.testing.assert_array_equal(log.ordered, log.relevance == 3)
    with_s = sources.esci_log(data, substitute_clicks=True)
    np.testing.assert_array_equal(with_s.clicked, with_s.relevance >= 2)
    np.testing.assert_array_equal(with_s.ordered, log.ordered)


def test_clicked_category_hand_built():
    c = cat.make_catalog(["a", "b", "c"], ["x", "y", "z"], category_paths=[["shoes", "boots"], ["home"], []])
    rows = [
        dict(session_id=str(k), user_id="u", query=q, timestamp=k, split=split, impressed_items=items,
             clicked=clicked, ordered=[False] * len(items), relevance=[-1] * len(items))
        for k, (q, split, items, clicked) in enumerate([
            ("boots", "train", [0, 1], [True, True]),
            ("boots", "train", [1, 0], [False, True]),
            ("lamp", "train", [1, 2], [True, False]),
            ("mystery", "train", [2], [True]),  # its top item has no category: no [TEXT2CAT]
            ("late", "test", [0], [True]),  # clicked only outside train
        ])
    ]  # fmt: skip
    log = cat._build_log(rows)
    assert sources.clicked_category(c, log) == {"boots": "shoes > boots", "lamp": "home"}


def test_prepare_on_each_real_source(data_dirs):
    for source, paths in data_dirs.items():
        setup = trainer.prepare(_config(source, paths, **{"align.enabled": source != "esci"}))
        assert setup.world is None and setup.info["source"] == source
        for stage in trainer.SFT_STAGES:
            assert len(setup.stages[stage]) > 0, (source, stage)
        assert len(setup.eval_sets["click"]) > 0
        vocab = setup.vocab
        cat_task = np.isin(setup.stages["stage1"].input_ids[:, 1], [vocab.special("[TEXT2CAT]")])
        if source == "esci":  # no categories, no users: no [TEXT2CAT], no profile tokens, Exact = order test set
            assert not cat_task.any() and vocab.profile_values == ()
            assert len(setup.eval_sets["order"]) > 0
        else:
            assert cat_task.any()
        if source.startswith("amazon"):  # one placeholder query; no orders
            assert setup.info["num_queries"] == 1 and len(setup.eval_sets["order"]) == 0
            assert len(setup.loo["targets"]) > 0
        if source == "kuaisearch":  # users.jsonl: profile tokens; relevance.jsonl: judged relevance in the reward
            assert vocab.profile_values
            a = setup.align
            r = trainer.item_rewards(setup, np.arange(4), a.truth[:4])
            assert (r["relevance"][a.truth[:4] >= 0] >= 2).all() and (r["click_order"][:, 0] >= 3).all()
        pop = trainer.popularity_results(setup)
        assert all(0.0 <= m["hr@10"] <= 1.0 and m["num"] > 0 for m in pop.values()) and "click" in pop


# ----------------------------------------------------------------------------------------------------------
# Config errors.


def test_config_errors(data_dirs, tmp_path):
    c = configs.get_config("cpu_test_kuaisearch")
    with pytest.raises(ConfigError, match=r"data.source='kuaisearch' needs config.data.root"):
        trainer.check_config(c)
    c = configs.get_config("cpu_test_esci")
    c.data.examples_path = data_dirs["esci"]["examples_path"]
    with pytest.raises(ConfigError, match=r"needs config.data.products_path"):
        trainer.check_config(c)
    c = configs.get_config("cpu_test")
    c.data.source = "amazon2023"
    with pytest.raises(ConfigError, match=r"data.source = 'amazon2023' is not one of"):
        trainer.check_config(c)
    c = _config("kuaisearch", {"root": str(tmp_path / "nowhere")})
    with pytest.raises(cat.CatalogFileNotFoundError, match="nowhere"):
        trainer.prepare(c)
    c = _config("amazon2018", {**data_dirs["amazon2018"], "meta_path": str(tmp_path / "meta.json")})
    with pytest.raises(cat.CatalogFileNotFoundError, match=r"meta.json: file not found"):
        trainer.prepare(c)
    with pytest.raises(ValueError, match="unknown preset 'cpu_test_nope'"):
        configs.get_config("cpu_test_nope")
    for preset in ("kuaisearch_paper", "amazon2014_beauty_tiger", "esci_paper"):
        with pytest.raises(ConfigError, match="needs config.data"):  # paper presets: paths from the command line
            trainer.check_config(configs.get_config(preset))


def test_simulated_fingerprints_ignore_the_real_log_fields():
    c = configs.get_config("cpu_test")
    base = trainer.stage_fingerprints(c)
    c.data.update(root="/x", reviews_path="/y", locale="jp", esci_substitute_clicks=True)
    assert trainer.stage_fingerprints(c) == base
    k = configs.get_config("cpu_test_kuaisearch")
    k.data.root = "/a"
    other = k.copy_and_resolve_references()
    other.data.root = "/b"
    assert trainer.stage_fingerprints(k) != base and trainer.stage_fingerprints(other) != trainer.stage_fingerprints(k)
    other.data.reviews_path = "/unused"
    other.data.root = "/a"
    assert trainer.stage_fingerprints(other) == trainer.stage_fingerprints(k)


# ----------------------------------------------------------------------------------------------------------
# End to end: the three SFT stages + evaluation on each source.


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def _finite(tree) -> bool:
    """Every float finite, except in blocks of an empty slice (`num` 0: NaN metrics)."""
    if isinstance(tree, dict):
        return tree.get("num") == 0 or all(_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_finite(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


_SLOW = pytest.mark.slow  # ~40 s each on 2 shared cores (a fresh model / beam-search compile per source)


@pytest.mark.parametrize(
    "source",
    [
        "amazon2014",  # the fast one: the path furthest from the simulated world (TIGER protocol, no queries / orders)
        pytest.param("amazon2018", marks=_SLOW),
        pytest.param("kuaisearch", marks=_SLOW),
        pytest.param("esci", marks=_SLOW),
    ],
)
def test_train_end_to_end(source, data_dirs, mesh, tmp_path):
    config = _config(source, data_dirs[source])
    results = trainer.train(config, str(tmp_path), mesh=mesh)
    r = results["stage3"]
    assert results["data"]["source"] == source and _finite(r)
    assert 0.0 <= r["click"]["hr@10"] <= 1.0 and r["click"]["num"] > 0
    assert 0.0 <= r["unconstrained"]["valid_id_rate"] <= 1.0
    assert results["popularity"]["click"]["num"] == r["click"]["num"]
    if source.startswith("amazon"):  # TIGER protocol: Recall (= HR) and NDCG @5 / @10 on every user's last review
        loo = r["leave_one_out"]
        assert loo["num"] > 0 and 0.0 <= loo["hr@5"] <= loo["hr@10"] <= 1.0 and "ndcg@10" in loo
        assert "order" not in r
    else:
        assert 0.0 <= r["order"]["hr@10"] <= 1.0 and r["order"]["num"] > 0
    assert "popularity baseline" in (tmp_path / "results.md").read_text()
