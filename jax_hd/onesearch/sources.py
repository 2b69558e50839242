"""Data sources of the OneSearch trainer (`config.data.source`): each turns its files into a `SourceData`, the catalogue
and search log (with splits) that `trainer.prepare` builds SIDs, the three SFT stages, alignment data and evaluation
from.

* `simulated`: the embedded world, the richest signals: impressions, clicks, orders, user profiles, each query's
  category (its latent intent's path, for [TEXT2CAT]), keyword thoughts (cot), and relevance of ANY item to a session
  (the simulator's intents; the RL reward's R_Rel).
* `kuaisearch` (`read_kuaisearch(data.root)`): `recall.jsonl` sessions as they are (impressions, clicks, purchases,
  splits); profiles from `users.jsonl` when present (else none); a query's category = the path of its most clicked
  train item (`clicked_category`; queries without one skip [TEXT2CAT]); keywords from the optional `keywords` /
  `p_keywords` fields; relevance = the `relevance.jsonl` labels, unjudged pairs 0.
* `amazon2014` / `amazon2018` (reviews + meta, 5-core; TIGER protocol): one session per review, the reviewed item its
  single clicked impression (`review_log`), every query the placeholder `REVIEW_QUERY`, leave-one-out splits (last
  review test, second-last val). Missing: queries, orders, exposure, profiles, query categories, keywords, relevance
  (0): those tasks, streams and reward terms are empty; the test split is the protocol's test set and
  `eval.leave_one_out_users` adds Recall / NDCG @5 / @K on it.
* `esci` (`read_esci`): one session per query (`esci_log`): its judged products impressed, Exact clicked and ordered,
  Substitute clicked when `data.esci_substitute_clicks`, relevance E/S/C/I = 3/2/1/0, the examples' train / test
  split; an anonymous user per session, so no profile or history (personalisation is empty); no categories (ESCI
  products have none: no [TEXT2CAT] / [SID2CAT]) and no keywords.

Orders: Amazon has none (its order test set is empty); ESCI's "order" test set is the Exact products of the test
queries (its "click" set adds the Substitutes when they count as clicks). Cold items: never impressed in the train
split (`catalog.cold_item_mask`; the simulator's own mask, identical by construction).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_collections
import numpy as np

from jax_hd.core import config as config_lib
from jax_hd.data import catalog as catalog_lib

SOURCES = ("simulated", "kuaisearch", "amazon2014", "amazon2018", "esci")
SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "simulated": (),
    "kuaisearch": ("root",),
    "amazon2014": ("reviews_path", "meta_path", "skip_bad_items"),
    "amazon2018": ("reviews_path", "meta_path", "skip_bad_items"),
    "esci": ("examples_path", "products_path", "locale", "esci_version", "esci_substitute_clicks", "skip_bad_items"),
}
"""`config.data` fields each source reads (besides `source`)."""
READER_FIELDS = tuple(dict.fromkeys(f for fields in SOURCE_FIELDS.values() for f in fields))
"""Every source-specific `config.data` field."""
REQUIRED_PATHS: dict[str, tuple[tuple[str, str], ...]] = {
    "kuaisearch": (("root", "the KuaiSearch directory (items.jsonl, recall.jsonl; users/relevance optional)"),),
    "amazon2014": (
        ("reviews_path", "reviews_<Category>_5.json(.gz)"),
        ("meta_path", "meta_<Category>.json(.gz), Python-literal lines"),
    ),
    "amazon2018": (("reviews_path", "<Category>_5.json(.gz)"), ("meta_path", "meta_<Category>.json(.gz)")),
    "esci": (
        ("examples_path", "shopping_queries_dataset_examples.parquet (or .csv)"),
        ("products_path", "shopping_queries_dataset_products.parquet (or .csv)"),
        ("locale", "a product_locale such as 'us'"),
    ),
}
REVIEW_QUERY = "next item"
"""The query text of every Amazon review session. Reviews carry no query (TIGER protocol: the request is the user's
history), so all sessions share this placeholder. Not the reviewed item's category: that would put the target's
category into its own request."""
ESCI_VERSIONS = ("small", "large", "all")


@dataclasses.dataclass(frozen=True, eq=False)
class SourceData:
    """What `trainer.prepare` reads from a source.

    catalog: the items. log: search sessions with impressions, clicks, orders, relevance (-1 unknown) and
    train / val / test splits; every session has a (possibly placeholder) query. users: profiles (None: no profile
    tokens). query_category: query -> category path text (" > "-joined) for the [TEXT2CAT] task (a query absent
    here gets no such task). cold_items `[items]` bool: never impressed in the train split. world: the simulated
    world behind the log (its latent intents score any item's relevance), None for real logs.
    """

    name: str
    catalog: catalog_lib.Catalog
    log: catalog_lib.QueryLog
    users: catalog_lib.UserTable | None
    query_category: dict[str, str]
    cold_items: np.ndarray
    world: catalog_lib.SimulatedWorld | None = None


def check_source_config(config: ml_collections.ConfigDict) -> None:
    """Clear `ConfigError`s for an unknown `data.source` or a path it needs left empty."""
    d = config.data
    if d.source not in SOURCES:
        raise config_lib.ConfigError(f"config.data.source must be one of {SOURCES}, got {d.source!r}")
    for field, what in REQUIRED_PATHS.get(d.source, ()):
        if not str(d[field]).strip():
            raise config_lib.ConfigError(f"config.data.source={d.source!r} needs config.data.{field}: {what}")


def unused_source_fields(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """`data.*` fields that do not shape this config's data (`source` itself too when simulated), so that the
    simulated configs' stage fingerprints do not depend on the real-log fields."""
    used = SOURCE_FIELDS[config.data.source]
    return tuple(f for f in READER_FIELDS if f not in used) + (("source",) if config.data.source == "simulated" else ())


def path_text(path: np.ndarray) -> str:
    """One category path row `[depth]` ('' padded) as "a > b > c" ('' when empty)."""
    return " > ".join(c for c in path.tolist() if c)


def simulated_query_category(world: catalog_lib.SimulatedWorld) -> dict[str, str]:
    """query -> the category path of the latent intent of its first session."""
    tree, out = world.tree, {}
    for q, intent in zip(world.log.queries.tolist(), world.session_intents.tolist(), strict=True):
        leaf = int(world.intents.leaves[intent])
        l2 = int(tree.leaf_parent[leaf])
        path = (tree.l1_names[tree.l2_parent[l2]], tree.l2_names[l2], tree.leaf_names[leaf])
        out.setdefault(q, " > ".join(path))
    return out


def clicked_category(catalog: catalog_lib.Catalog, log: catalog_lib.QueryLog, split: str = "train") -> dict[str, str]:
    """query -> the category path of its most clicked item in `split` (ties: the lower catalog row); queries with no
    click there, or whose top item has no category, are absent."""
    part = log.split(split)
    clicked = part.clicked
    if not clicked.any():
        return {}
    names, q = np.unique(part.queries, return_inverse=True)
    n = len(catalog)
    keys, counts = np.unique(
        q[part.impression_session[clicked]] * n + part.impressed_items[clicked], return_counts=True
    )
    order = np.lexsort((keys % n, -counts, keys // n))  # per query: most clicks first, then the lower row
    out: dict[str, str] = {}
    for k in keys[order].tolist():
        query = str(names[k // n])
        if query not in out:
            text = path_text(catalog.category_paths[k % n])
            out[query] = text
    return {query: text for query, text in out.items() if text}


def review_log(history: catalog_lib.UserHistory, query: str = REVIEW_QUERY) -> catalog_lib.QueryLog:
    """Reviews as search sessions (TIGER protocol): one session per event, its item the single clicked impression
    (never ordered), query `query`, timestamp the event's index (reviews are dated to the day; the index keeps each
    user's order strict); per user the last event is `test`, the second-last `val` (users with >= 3 events, as
    `catalog.leave_one_out`), the rest `train`. Users keep their ids."""
    n = int(history.offsets[-1])
    lengths = np.diff(history.offsets)
    user_rows = np.repeat(np.arange(len(history)), lengths)
    from_end = history.offsets[user_rows + 1] - 1 - np.arange(n)
    enough = lengths[user_rows] >= 3
    splits = np.where(enough & (from_end == 0), "test", np.where(enough & (from_end == 1), "val", "train"))
    users = history.user_ids[user_rows]
    empty: tuple[tuple[str, ...], ...] = ((),) * n
    return catalog_lib.QueryLog(
        session_ids=np.asarray([f"{u}#{i}" for u, i in zip(users.tolist(), range(n), strict=True)], np.str_),
        user_ids=users,
        queries=np.full(n, query),
        timestamps=np.arange(n, dtype=np.int64),
        splits=splits.astype(np.str_),
        impression_offsets=np.arange(n + 1, dtype=np.int64),
        impressed_items=history.items.astype(np.int32),
        clicked=np.ones(n, bool),
        ordered=np.zeros(n, bool),
        relevance=np.full(n, -1, np.int8),
        query_types=np.full(n, ""),
        keywords=empty,
        preference_keywords=empty,
    )


def esci_log(data: catalog_lib.EsciData, *, substitute_clicks: bool = False) -> catalog_lib.QueryLog:
    """ESCI judgments as search sessions: one per query id (first-seen order), its judged products impressed in
    file order (a repeated product keeps its first label), relevance E/S/C/I = 3/2/1/0, Exact clicked and ordered,
    Substitute clicked when `substitute_clicks`; user `esci:<query id>` (anonymous, one session each), timestamp the
    session's index, split the examples' `split` column (required)."""
    j = data.judgments
    if len(j) and not all(j.splits.tolist()):
        raise catalog_lib.CatalogDataError("ESCI examples: no 'split' column (the train / test split is needed)")
    sessions: dict[str, dict] = {}
    for qid, query, item, label, split in zip(
        data.query_ids.tolist(), j.queries.tolist(), j.item_rows.tolist(), j.labels.tolist(), j.splits.tolist(),
        strict=True,
    ):  # fmt: skip
        s = sessions.setdefault(qid, {"query": query, "split": split, "items": {}})
        if split != s["split"]:
            raise catalog_lib.CatalogDataError(
                f"ESCI examples: query id {qid!r} is in splits {s['split']!r} and {split!r}"
            )
        s["items"].setdefault(item, label)
    click_labels = (3, 2) if substitute_clicks else (3,)
    rows = []
    for t, (qid, s) in enumerate(sessions.items()):
        items, labels = list(s["items"]), list(s["items"].values())
        rows.append(
            {
                "session_id": qid,
                "user_id": f"esci:{qid}",
                "query": s["query"],
                "timestamp": t,
                "split": "val" if s["split"] in ("val", "valid") else s["split"],
                "impressed_items": items,
                "clicked": [y in click_labels for y in labels],
                "ordered": [y == 3 for y in labels],
                "relevance": labels,
            }
        )
    bad = sorted({r["split"] for r in rows} - set(catalog_lib.SPLITS))
    if bad:
        raise catalog_lib.CatalogDataError(f"ESCI examples: column 'split' must be train / test, got {bad[0]!r}")
    return catalog_lib._build_log(rows)


def simulated_world_of(config: ml_collections.ConfigDict) -> catalog_lib.SimulatedWorld:
    """The simulated world of `config.seed` / `config.data.num_*`."""
    d = config.data
    return catalog_lib.simulated_world(
        config.seed, num_items=d.num_items, num_users=d.num_users, num_sessions=d.num_sessions,
        num_intents=d.num_intents,
    )  # fmt: skip


def simulated_source(config: ml_collections.ConfigDict) -> SourceData:
    world = simulated_world_of(config)
    return SourceData(
        "simulated", world.catalog, world.log, world.users, simulated_query_category(world), world.cold_items, world
    )


def kuaisearch_source(config: ml_collections.ConfigDict) -> SourceData:
    data = catalog_lib.read_kuaisearch(config.data.root)
    cat, log = data.catalog, data.log
    return SourceData(
        "kuaisearch", cat, log, data.users, clicked_category(cat, log), catalog_lib.cold_item_mask(cat, log)
    )


def amazon_source(config: ml_collections.ConfigDict) -> SourceData:
    d = config.data
    read = catalog_lib.read_amazon_2014 if d.source == "amazon2014" else catalog_lib.read_amazon_2018
    lenient = dict(missing_text="skip", duplicate_items="first", unknown_items="skip") if d.skip_bad_items else {}
    data = read(d.reviews_path, d.meta_path, **lenient)
    log = review_log(data.history)
    return SourceData(d.source, data.catalog, log, None, {}, catalog_lib.cold_item_mask(data.catalog, log))


def esci_source(config: ml_collections.ConfigDict) -> SourceData:
    d = config.data
    data = catalog_lib.read_esci(
        d.examples_path, d.products_path, locale=d.locale, version=None if d.esci_version == "all" else d.esci_version,
        missing_text="skip" if d.skip_bad_items else "error",
    )  # fmt: skip
    log = esci_log(data, substitute_clicks=d.esci_substitute_clicks)
    return SourceData("esci", data.catalog, log, None, {}, catalog_lib.cold_item_mask(data.catalog, log))


LOADERS: dict[str, Callable[[ml_collections.ConfigDict], SourceData]] = {
    "simulated": simulated_source,
    "kuaisearch": kuaisearch_source,
    "amazon2014": amazon_source,
    "amazon2018": amazon_source,
    "esci": esci_source,
}


def load_source(config: ml_collections.ConfigDict) -> SourceData:
    """The `SourceData` of `config.data.source` (files are read here; a missing one raises
    `catalog.CatalogFileNotFoundError` naming it)."""
    check_source_config(config)
    return LOADERS[config.data.source](config)


@dataclasses.dataclass(frozen=True, eq=False)
class RelevanceTable:
    """Judged 0-3 relevance per (query row, item) from a log's labelled impressions (the highest label of a pair);
    unjudged pairs score 0. keys `[pairs]` int64 sorted (query row * num_items + item), labels `[pairs]` int8."""

    keys: np.ndarray
    labels: np.ndarray
    num_items: int

    def __call__(self, query_rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """`[n, c]` int8 labels of items `[n, c]` (catalog rows; negative -> 0) for query rows `[n]`."""
        items = np.asarray(items, np.int64)
        q = np.asarray(query_rows, np.int64).reshape(-1, *([1] * (items.ndim - 1)))
        if not len(self.keys):
            return np.zeros(items.shape, np.int8)
        keys = q * self.num_items + np.maximum(items, 0)
        slot = np.clip(np.searchsorted(self.keys, keys), 0, len(self.keys) - 1)
        found = (self.keys[slot] == keys) & (items >= 0)
        return np.where(found, self.labels[slot], 0).astype(np.int8)


def relevance_table(log: catalog_lib.QueryLog, query_row: dict[str, int], num_items: int) -> RelevanceTable:
    """The `RelevanceTable` of every labelled impression of `log` (`query_row` maps its queries to rows)."""
    labelled = np.flatnonzero(log.relevance >= 0)
    q = np.asarray([query_row[x] for x in log.queries.tolist()], np.int64)[log.impression_session[labelled]]
    keys = q * num_items + log.impressed_items[labelled]
    order = np.lexsort((-log.relevance[labelled].astype(np.int64), keys))  # per key: highest label first
    keys, labels = keys[order], log.relevance[labelled][order]
    first = np.concatenate([[True], keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, bool)
    return RelevanceTable(keys[first], labels[first].astype(np.int8), num_items)
