"""E-commerce catalog data: catalogs, query logs and user behaviour sequences (real formats + a simulated world).

The module has four parts (spec `onesearch.md` §3.4, §5).

* **Common columnar types** (numpy arrays, one row per item / user / session / event): `Catalog`, `UserTable`,
  `QueryLog` (sessions with their impressions in CSR form: clicked / ordered flags and 0-3 relevance labels per
  impression), `RelevanceJudgments` ((query, item) -> 0-3), `UserHistory` (per-user time-ordered events) and
  `SequenceExamples` (history -> next item). Items are referred to by their row in the catalog (int32).
* **Readers**, each validating every row. Errors are `CatalogDataError` (a `ValueError`) naming the file and the
  line (jsonl / literal files) or the 0-based data row (parquet / csv); a missing file is
  `CatalogFileNotFoundError` (also a `FileNotFoundError`). Files ending in `.gz` (or starting with the gzip magic
  bytes) are decompressed.
  - KuaiSearch (`read_kuaisearch(root)` and one reader per file): `items.jsonl`, `users.jsonl`, `recall.jsonl`,
    `rank.jsonl`, `relevance.jsonl` with the field names of the demo release.
  - Amazon 2014 5-core (`read_amazon_2014`): `reviews_<Cat>_5.json(.gz)` (JSON lines) and `meta_<Cat>.json(.gz)`
    whose lines are Python dict literals, parsed with `ast.literal_eval` (never `eval`: a line such as
    `__import__('os')` is rejected as a malformed literal).
  - Amazon 2018 5-core (`read_amazon_2018`): `<Cat>_5.json(.gz)` and `meta_<Cat>.json(.gz)`, strict JSON lines.
  - Amazon ESCI shopping queries (`read_esci`): `shopping_queries_dataset_examples` and `..._products` as
    `.parquet` or `.csv`; E/S/C/I -> 3/2/1/0.
* **Embedded default** `simulated_world(seed)`: a catalog of 20,000 items in a 3-level category tree (8 x 4 x 4),
  with brands, colour / material / size / style attributes, prices and titles generated from them; users with
  latent category / brand / colour / price preferences; a Zipf-distributed set of query intents (simple, question,
  negation, substitute), each with a keyword "thought"; sessions whose impressions come from a relevance-aware
  ranker and whose clicks and orders follow a relevance x preference choice model; train / val / test split by time
  and cold items launched after the training period. Built with vectorised numpy, deterministically per seed.
  `write_kuaisearch(world, dir)` writes it in the KuaiSearch layout, which `read_kuaisearch` reads back.
* **Splits and grain pipelines**: `leave_one_out` (TIGER protocol), `history_from_log`, `recent_context`,
  `query_log_dataset` and `sequence_dataset` (index-based `grain.MapDataset`s, checkpointable).

Assumptions where the spec or the public demo data do not settle a field (KuaiSearch):

* Item ids, user ids and session ids may be JSON ints or strings; all are kept as strings (`"17"`).
* `users.jsonl` location fields are taken to be `frequent_country`, `frequent_province`, `frequent_city`
  (the spec only says "frequent country/province/city"); all user fields but `user_id` are optional.
* `relevance.jsonl`'s label field is `score` (spec); `label` (what KuaiSearch's `relevance/data/process.py` reads)
  is accepted too. Rows carry no item id in the release: an item is matched by exact `item_title` when that title
  is unique in the catalog, else left unmatched (row -1). Our writer adds `item_id`, which is then used.
* `recall.jsonl`: purchased items must be impressed; a purchase counts as a click (orders are a subset of clicks).
  `split` values `train` / `val` / `valid` / `test` (`valid` is read as `val`). `time_index` is the timestamp
  (the simulator writes minutes since the start of the log).
* Extension fields, optional on read and written by our writer: items `price`, `attributes` ({name: value}),
  `description`; recall rows `query_type`, `keywords`, `p_keywords` (the simulator's thought).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import grain
import numpy as np

from jax_hd.data.cir import _indexed  # (item index, valid) stream: shuffle / repeat / pad to whole batches

SPLITS: tuple[str, ...] = ("train", "val", "test")
QUERY_TYPES: tuple[str, ...] = ("simple", "question", "negation", "substitute")
"""Simulator query types; `question`, `negation` and `substitute` are the complex ones (spec §2.3)."""
COMPLEX_QUERY_TYPES: tuple[str, ...] = QUERY_TYPES[1:]
ESCI_RELEVANCE: dict[str, int] = {"E": 3, "S": 2, "C": 1, "I": 0}
"""ESCI label -> relevance tier (Exact 3, Substitute 2, Complement 1, Irrelevant 0); our mapping, not the papers'."""
ACTION_REVIEW, ACTION_CLICK, ACTION_ORDER = 0, 1, 2
"""`UserHistory.actions` codes."""


class CatalogDataError(ValueError):
    """A catalog / log file is malformed or inconsistent. The message names the file and the line or row."""


class CatalogFileNotFoundError(CatalogDataError, FileNotFoundError):
    """An expected data file does not exist. The message names the path."""


# ----------------------------------------------------------------------------------------------------------------------
# Columnar types
# ----------------------------------------------------------------------------------------------------------------------


def _str_array(values: Sequence[str]) -> np.ndarray:
    """Strings as a numpy unicode array (`<U1` when empty)."""
    return np.asarray(list(values), dtype=np.str_) if len(values) else np.zeros((0,), dtype="<U1")


def _check_len(name: str, array: np.ndarray, n: int) -> None:
    if len(array) != n:
        raise ValueError(f"{name}: expected {n} rows, got {len(array)}")


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """Items, one row each.

    Attributes:
      item_ids: `[items]` str, unique.
      titles: `[items]` str, non-empty (an item's main text).
      category_paths: `[items, depth]` str, coarse -> fine; '' pads shorter paths.
      brands: `[items]` str ('' unknown).
      attribute_names: names of the attribute columns (e.g. colour, material, size, style).
      attribute_values: `[items, len(attribute_names)]` str ('' unknown).
      prices: `[items]` float32 in the dataset's currency units; NaN unknown.
      sellers: `[items]` str ('' unknown).
      descriptions: `[items]` str ('' none).
    """

    item_ids: np.ndarray
    titles: np.ndarray
    category_paths: np.ndarray
    brands: np.ndarray
    attribute_names: tuple[str, ...]
    attribute_values: np.ndarray
    prices: np.ndarray
    sellers: np.ndarray
    descriptions: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("titles", "category_paths", "brands", "attribute_values", "prices", "sellers", "descriptions"):
            _check_len(f"Catalog.{name}", getattr(self, name), n)
        if self.category_paths.ndim != 2 or self.attribute_values.ndim != 2:
            raise ValueError("Catalog.category_paths and attribute_values must be 2-D")
        if self.attribute_values.shape[1] != len(self.attribute_names):
            raise ValueError(
                f"Catalog.attribute_values has {self.attribute_values.shape[1]} columns for "
                f"{len(self.attribute_names)} attribute_names"
            )

    def __len__(self) -> int:
        return len(self.item_ids)

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """item id -> row."""
        return {item_id: row for row, item_id in enumerate(self.item_ids.tolist())}

    def rows(self, item_ids: Sequence[str], *, where: str = "") -> np.ndarray:
        """Rows `[n]` int32 of `item_ids`; an unknown id raises `CatalogDataError` prefixed with `where`."""
        row_of = self.row_of
        out = np.empty(len(item_ids), np.int32)
        for i, item_id in enumerate(item_ids):
            row = row_of.get(item_id)
            if row is None:
                raise CatalogDataError(f"{where}unknown item id {item_id!r} (not in the catalog)")
            out[i] = row
        return out

    def attribute(self, name: str) -> np.ndarray:
        """`[items]` str values of one attribute."""
        if name not in self.attribute_names:
            raise KeyError(f"no attribute {name!r}; the catalog has {self.attribute_names}")
        return self.attribute_values[:, self.attribute_names.index(name)]

    def item_text(self, row: int) -> str:
        """One line of text for embedding: title | brand | category path | attributes."""
        parts = [str(self.titles[row])]
        if self.brands[row]:
            parts.append(f"brand: {self.brands[row]}")
        path = [c for c in self.category_paths[row].tolist() if c]
        if path:
            parts.append(" > ".join(path))
        attrs = [
            f"{k}: {v}" for k, v in zip(self.attribute_names, self.attribute_values[row].tolist(), strict=True) if v
        ]
        if attrs:
            parts.append(", ".join(attrs))
        return " | ".join(parts)


def make_catalog(
    item_ids: Sequence[str],
    titles: Sequence[str],
    *,
    category_paths: Sequence[Sequence[str]] | None = None,
    brands: Sequence[str] | None = None,
    attributes: Sequence[Mapping[str, str]] | None = None,
    prices: Sequence[float] | None = None,
    sellers: Sequence[str] | None = None,
    descriptions: Sequence[str] | None = None,
    where: Sequence[str] | None = None,
) -> Catalog:
    """A `Catalog` from per-item Python values, validating ids (unique) and titles (non-empty).

    `where[i]` (e.g. `"items.jsonl: line 7"`) locates item i in error messages. Attribute columns are the union of
    the attribute names, in first-seen order.
    """
    n = len(item_ids)
    where = where or [f"item {i}" for i in range(n)]
    seen: dict[str, str] = {}
    for i, item_id in enumerate(item_ids):
        if item_id in seen:
            raise CatalogDataError(f"{where[i]}: duplicate item id {item_id!r} (first at {seen[item_id]})")
        seen[item_id] = where[i]
        if not str(titles[i]).strip():
            raise CatalogDataError(f"{where[i]}: item {item_id!r} has no text (empty title)")
    paths = category_paths or [()] * n
    depth = max((len(p) for p in paths), default=0)
    path_array = np.full((n, depth), "", dtype=object)
    for i, p in enumerate(paths):
        path_array[i, : len(p)] = list(p)
    attributes = attributes or [{}] * n
    names: dict[str, None] = {}
    for a in attributes:
        names.update(dict.fromkeys(a))
    attr_array = np.array([[a.get(k, "") for k in names] for a in attributes], dtype=object).reshape(n, len(names))
    return Catalog(
        item_ids=_str_array(item_ids),
        titles=_str_array([str(t).strip() for t in titles]),
        category_paths=path_array.astype(np.str_) if depth else np.zeros((n, 0), "<U1"),
        brands=_str_array(brands if brands is not None else [""] * n),
        attribute_names=tuple(names),
        attribute_values=attr_array.astype(np.str_) if names else np.zeros((n, 0), "<U1"),
        prices=np.asarray(prices if prices is not None else [math.nan] * n, np.float32).reshape(n),
        sellers=_str_array(sellers if sellers is not None else [""] * n),
        descriptions=_str_array(descriptions if descriptions is not None else [""] * n),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class UserTable:
    """Users, one row each: `user_ids` `[users]` str (unique) and profile columns `[users]` str ('' unknown)."""

    user_ids: np.ndarray
    genders: np.ndarray
    age_buckets: np.ndarray
    countries: np.ndarray
    provinces: np.ndarray
    cities: np.ndarray

    def __post_init__(self) -> None:
        for name in ("genders", "age_buckets", "countries", "provinces", "cities"):
            _check_len(f"UserTable.{name}", getattr(self, name), len(self.user_ids))

    def __len__(self) -> int:
        return len(self.user_ids)

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """user id -> row."""
        return {user_id: row for row, user_id in enumerate(self.user_ids.tolist())}


@dataclasses.dataclass(frozen=True, eq=False)
class QueryLog:
    """Search sessions (one query each) with their impressions in CSR form.

    Session columns `[sessions]`: session_ids str, user_ids str, queries str, timestamps int64 (time_index units;
    minutes in the simulator), splits str (`train` / `val` / `test`), query_types str ('' unknown), and per-session
    tuples `keywords` (the intent's core keywords) and `preference_keywords` (user-calibrated), () when unknown.
    Impression columns `[impressions]`, session s owning `impression_offsets[s]:impression_offsets[s + 1]` in display
    order: impressed_items int32 (catalog rows), clicked bool, ordered bool (ordered implies clicked), relevance
    int8 (0-3, -1 unknown).
    """

    session_ids: np.ndarray
    user_ids: np.ndarray
    queries: np.ndarray
    timestamps: np.ndarray
    splits: np.ndarray
    impression_offsets: np.ndarray
    impressed_items: np.ndarray
    clicked: np.ndarray
    ordered: np.ndarray
    relevance: np.ndarray
    query_types: np.ndarray
    keywords: tuple[tuple[str, ...], ...]
    preference_keywords: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.session_ids)
        for name in ("user_ids", "queries", "timestamps", "splits", "query_types", "keywords", "preference_keywords"):
            _check_len(f"QueryLog.{name}", getattr(self, name), n)
        _check_len("QueryLog.impression_offsets", self.impression_offsets, n + 1)
        m = int(self.impression_offsets[-1])
        for name in ("impressed_items", "clicked", "ordered", "relevance"):
            _check_len(f"QueryLog.{name}", getattr(self, name), m)
        if np.any(self.ordered & ~self.clicked):
            raise ValueError("QueryLog: an ordered impression is not clicked")

    def __len__(self) -> int:
        return len(self.session_ids)

    @property
    def num_impressions(self) -> np.ndarray:
        """`[sessions]` int64."""
        return np.diff(self.impression_offsets)

    @property
    def impression_session(self) -> np.ndarray:
        """`[impressions]` int64: the session row of each impression."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.num_impressions)

    def impressions(self, session: int) -> slice:
        return slice(int(self.impression_offsets[session]), int(self.impression_offsets[session + 1]))

    def select(self, mask_or_rows: np.ndarray) -> QueryLog:
        """The sessions selected by a `[sessions]` bool mask or row indices, in the given order."""
        rows = np.asarray(mask_or_rows)
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        counts = self.num_impressions[rows]
        starts = self.impression_offsets[rows]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        gather = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])
        return QueryLog(
            session_ids=self.session_ids[rows],
            user_ids=self.user_ids[rows],
            queries=self.queries[rows],
            timestamps=self.timestamps[rows],
            splits=self.splits[rows],
            impression_offsets=offsets,
            impressed_items=self.impressed_items[gather],
            clicked=self.clicked[gather],
            ordered=self.ordered[gather],
            relevance=self.relevance[gather],
            query_types=self.query_types[rows],
            keywords=tuple(self.keywords[r] for r in rows.tolist()),
            preference_keywords=tuple(self.preference_keywords[r] for r in rows.tolist()),
        )

    def split(self, name: str) -> QueryLog:
        """The sessions of one split (`train` / `val` / `test`)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.select(self.splits == name)


@dataclasses.dataclass(frozen=True, eq=False)
class RelevanceJudgments:
    """Graded (query, item) relevance, one row per judgment, all `[judgments]`: queries str, item_titles str,
    item_rows int32 (catalog row, -1 unmatched), labels int8 (0-3), splits str ('' when the source has none)."""

    queries: np.ndarray
    item_titles: np.ndarray
    item_rows: np.ndarray
    labels: np.ndarray
    splits: np.ndarray

    def __post_init__(self) -> None:
        for name in ("item_titles", "item_rows", "labels", "splits"):
            _check_len(f"RelevanceJudgments.{name}", getattr(self, name), len(self.queries))

    def __len__(self) -> int:
        return len(self.queries)


@dataclasses.dataclass(frozen=True, eq=False)
class UserHistory:
    """Per-user behaviour sequences ordered by time (oldest first).

    `user_ids` `[users]` str; user u owns events `offsets[u]:offsets[u + 1]` (`offsets` `[users + 1]` int64). Event
    columns `[events]`: items int32 (catalog rows), timestamps int64, queries str ('' when the event has none, e.g.
    a review), actions int8 (`ACTION_REVIEW` / `ACTION_CLICK` / `ACTION_ORDER`).
    """

    user_ids: np.ndarray
    offsets: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray
    queries: np.ndarray
    actions: np.ndarray

    def __post_init__(self) -> None:
        _check_len("UserHistory.offsets", self.offsets, len(self.user_ids) + 1)
        for name in ("items", "timestamps", "queries", "actions"):
            _check_len(f"UserHistory.{name}", getattr(self, name), int(self.offsets[-1]))

    def __len__(self) -> int:
        return len(self.user_ids)

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        return {user_id: row for row, user_id in enumerate(self.user_ids.tolist())}

    def sequence(self, user: int) -> np.ndarray:
        """`[events]` int32 item rows of one user, oldest first."""
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def recent(self, user: int, before: int, k: int) -> slice:
        """The (at most) `k` latest events of `user` with timestamp < `before`, as a slice into the event columns."""
        start, stop = int(self.offsets[user]), int(self.offsets[user + 1])
        end = start + int(np.searchsorted(self.timestamps[start:stop], before, side="left"))
        return slice(max(start, end - k), end)


def _history(
    user_ids: Sequence[str] | np.ndarray,
    event_users: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    queries: np.ndarray,
    actions: np.ndarray,
) -> UserHistory:
    """Groups events (event_users = user row per event) by user, ordered by (time, input order)."""
    order = np.lexsort((np.arange(len(items)), timestamps, event_users))
    counts = np.bincount(event_users, minlength=len(user_ids))
    return UserHistory(
        user_ids=_str_array(list(user_ids)) if not isinstance(user_ids, np.ndarray) else user_ids,
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        items=items[order].astype(np.int32),
        timestamps=timestamps[order].astype(np.int64),
        queries=queries[order],
        actions=actions[order].astype(np.int8),
    )


def history_from_log(log: QueryLog, *, splits: Sequence[str] = SPLITS) -> UserHistory:
    """Per-user click / order sequences from the sessions of `splits` (an ordered item is one ACTION_ORDER event;
    within a session events keep display order). Users are those of the log, sorted."""
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"splits must be among {SPLITS}, got {s!r}")
    users, user_rows = np.unique(log.user_ids, return_inverse=True)
    session_of = log.impression_session
    keep = log.clicked & np.isin(log.splits, list(splits))[session_of]
    sessions = session_of[keep]
    return _history(
        users,
        user_rows[sessions],
        log.impressed_items[keep],
        log.timestamps[sessions],
        log.queries[sessions],
        np.where(log.ordered[keep], ACTION_ORDER, ACTION_CLICK),
    )


def recent_context(log: QueryLog, history: UserHistory, *, k: int = 5) -> dict[str, np.ndarray]:
    """Each session's short behaviour context from strictly earlier events (spec §1.5: window 5).

    Returns `recent_items` `[sessions, k]` int32 (clicked item rows, oldest first, -1 padded at the end),
    `recent_queries` `[sessions, k]` str (their queries, '' padded) and `num_recent` `[sessions]` int32.
    """
    recent_items = np.full((len(log), k), -1, np.int32)
    recent_queries = np.full((len(log), k), "", dtype=object)
    num_recent = np.zeros(len(log), np.int32)
    row_of = history.row_of
    for s, (user_id, t) in enumerate(zip(log.user_ids.tolist(), log.timestamps.tolist(), strict=True)):
        user = row_of.get(user_id)
        if user is None:
            continue
        window = history.recent(user, t, k)
        n = window.stop - window.start
        recent_items[s, :n] = history.items[window]
        recent_queries[s, :n] = history.queries[window]
        num_recent[s] = n
    return {"recent_items": recent_items, "recent_queries": recent_queries.astype(np.str_), "num_recent": num_recent}


def cold_item_mask(catalog: Catalog, log: QueryLog, *, train_split: str = "train") -> np.ndarray:
    """`[items]` bool: items never impressed in the sessions of `train_split`."""
    train = log.split(train_split)
    mask = np.ones(len(catalog), bool)
    mask[train.impressed_items] = False
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# Leave-one-out sequences (TIGER protocol)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SequenceExamples:
    """History -> next item examples: user_rows `[n]` int32 (rows of the `UserHistory`), histories `[n, H]` int32
    (item rows, oldest first, -1 padded at the end), history_lengths `[n]` int32, targets `[n]` int32."""

    user_rows: np.ndarray
    histories: np.ndarray
    history_lengths: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def _examples(sequences: Sequence[np.ndarray], users: list[int], positions: list[int], max_history: int):
    histories = np.full((len(users), max_history), -1, np.int32)
    lengths = np.zeros(len(users), np.int32)
    targets = np.zeros(len(users), np.int32)
    for i, (u, t) in enumerate(zip(users, positions, strict=True)):
        seq = sequences[u]
        past = seq[max(0, t - max_history) : t]
        histories[i, : len(past)] = past
        lengths[i] = len(past)
        targets[i] = seq[t]
    return SequenceExamples(np.asarray(users, np.int32), histories, lengths, targets)


def leave_one_out(history: UserHistory, *, max_history: int = 20) -> dict[str, SequenceExamples]:
    """TIGER / P5 protocol: per user (events sorted by time) the last item is the test target, the second-last the
    validation target, and every earlier item (from the second on) a training target; histories are the at most
    `max_history` preceding items. Users with fewer than 3 events give no val/test example (their items from the
    second on are training targets).

    Returns {"train", "val", "test"} -> `SequenceExamples`.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    sequences = [history.sequence(u) for u in range(len(history))]
    idx: dict[str, tuple[list[int], list[int]]] = {s: ([], []) for s in SPLITS}
    for u, seq in enumerate(sequences):
        n = len(seq)
        last_train = n - 2 if n >= 3 else n  # exclusive end of training targets
        for t in range(1, last_train):
            idx["train"][0].append(u)
            idx["train"][1].append(t)
        if n >= 3:
            idx["val"][0].append(u)
            idx["val"][1].append(n - 2)
            idx["test"][0].append(u)
            idx["test"][1].append(n - 1)
    return {s: _examples(sequences, users, pos, max_history) for s, (users, pos) in idx.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Reading helpers
# ----------------------------------------------------------------------------------------------------------------------


def _open_text(path: str) -> IO[str]:
    if not os.path.isfile(path):
        raise CatalogFileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(2)
    if path.endswith(".gz") or magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines."""
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
    except (UnicodeDecodeError, OSError, EOFError) as e:
        if isinstance(e, CatalogFileNotFoundError):
            raise
        raise CatalogDataError(f"{path}: unreadable ({type(e).__name__}: {e})") from e


def _json_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) per JSON line; `where` is "<path>: line <n>"."""
    for number, line in _lines(path):
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CatalogDataError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(row, dict):
            raise CatalogDataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def parse_python_literal(text: str, where: str) -> dict[str, Any]:
    """One Python dict literal (an Amazon 2014 meta line), parsed with `ast.literal_eval` (no code runs)."""
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise CatalogDataError(f"{where}: malformed Python literal ({type(e).__name__}: {e})") from e
    if not isinstance(value, dict):
        raise CatalogDataError(f"{where}: expected a dict literal, got {type(value).__name__}")
    return value


def _literal_rows(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in _lines(path):
        yield f"{path}: line {number}", parse_python_literal(line, f"{path}: line {number}")


_MISSING = object()


def _get(row: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> Any:
    value = row.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise CatalogDataError(f"{where}: missing field {key!r}")
        return default
    return value


def _text(row: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> str:
    value = _get(row, key, where, default)
    if not isinstance(value, str):
        raise CatalogDataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _ident(value: Any, key: str, where: str) -> str:
    """An id given as a JSON int or non-empty string -> str."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise CatalogDataError(f"{where}: field {key!r} must be an int or non-empty string id, got {value!r}")
    return str(value).strip()


def _id(row: Mapping[str, Any], key: str, where: str) -> str:
    return _ident(_get(row, key, where), key, where)


def _ids(row: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> list[str]:
    value = _get(row, key, where, default)
    if not isinstance(value, list):
        raise CatalogDataError(f"{where}: field {key!r} must be a list of ids, got {type(value).__name__}")
    return [_ident(v, key, where) for v in value]


def _int(row: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> int:
    value = _get(row, key, where, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CatalogDataError(f"{where}: field {key!r} must be an integer, got {value!r}")
    return value


def _float(row: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> float:
    value = _get(row, key, where, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        if value is default:
            return value
        raise CatalogDataError(f"{where}: field {key!r} must be a finite number, got {value!r}")
    return float(value)


def _flag(row: Mapping[str, Any], key: str, where: str) -> bool:
    value = _get(row, key, where)
    if value not in (0, 1) or isinstance(value, float):
        raise CatalogDataError(f"{where}: field {key!r} must be 0 or 1, got {value!r}")
    return bool(value)


def _split(row: Mapping[str, Any], where: str) -> str:
    value = _text(row, "split", where).lower()
    value = "val" if value == "valid" else value
    if value not in SPLITS:
        raise CatalogDataError(f"{where}: field 'split' must be one of train/val/valid/test, got {value!r}")
    return value


def _label(value: Any, key: str, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or value not in (0, 1, 2, 3):
        raise CatalogDataError(f"{where}: field {key!r} must be a relevance label in 0..3, got {value!r}")
    return int(value)


def _keywords(row: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = _get(row, key, where, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogDataError(f"{where}: field {key!r} must be a list of strings")
    return tuple(value)


def _build_log(rows: list[dict[str, Any]]) -> QueryLog:
    """A QueryLog from per-session dicts with keys of the QueryLog columns (impressions as lists)."""
    counts = [len(r["impressed_items"]) for r in rows]

    def flat(key: str, dtype: Any) -> np.ndarray:
        return np.asarray([v for r in rows for v in r[key]], dtype).reshape(-1)

    return QueryLog(
        session_ids=_str_array([r["session_id"] for r in rows]),
        user_ids=_str_array([r["user_id"] for r in rows]),
        queries=_str_array([r["query"] for r in rows]),
        timestamps=np.asarray([r["timestamp"] for r in rows], np.int64).reshape(-1),
        splits=_str_array([r["split"] for r in rows]),
        impression_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        impressed_items=flat("impressed_items", np.int32),
        clicked=flat("clicked", bool),
        ordered=flat("ordered", bool),
        relevance=flat("relevance", np.int8),
        query_types=_str_array([r.get("query_type", "") for r in rows]),
        keywords=tuple(r.get("keywords", ()) for r in rows),
        preference_keywords=tuple(r.get("p_keywords", ()) for r in rows),
    )


# ----------------------------------------------------------------------------------------------------------------------
# KuaiSearch layout
# ----------------------------------------------------------------------------------------------------------------------

KUAISEARCH_FILES: tuple[str, ...] = ("items.jsonl", "users.jsonl", "recall.jsonl", "rank.jsonl", "relevance.jsonl")
_CATEGORY_LEVELS = 3


def read_kuaisearch_items(path: str) -> Catalog:
    """`items.jsonl`: item_id, item_title (non-empty), brand_id/brand_name, seller_id/seller_name,
    category_level{1,2,3}_id/_name (optional), and our optional price, attributes, description."""
    item_ids, titles, paths, brands, sellers, attrs, prices, descriptions, wheres = ([] for _ in range(9))
    for where, row in _json_rows(path):
        item_ids.append(_id(row, "item_id", where))
        titles.append(_text(row, "item_title", where, ""))
        paths.append([_text(row, f"category_level{k}_name", where, "") for k in range(1, _CATEGORY_LEVELS + 1)])
        brands.append(_text(row, "brand_name", where, ""))
        sellers.append(_text(row, "seller_name", where, ""))
        attributes = _get(row, "attributes", where, {})
        if not isinstance(attributes, dict) or not all(isinstance(v, str) for v in attributes.values()):
            raise CatalogDataError(f"{where}: field 'attributes' must be an object of strings")
        attrs.append(attributes)
        prices.append(_float(row, "price", where, math.nan))
        descriptions.append(_text(row, "description", where, ""))
        wheres.append(where)
    return make_catalog(
        item_ids,
        titles,
        category_paths=paths,
        brands=brands,
        attributes=attrs,
        prices=prices,
        sellers=sellers,
        descriptions=descriptions,
        where=wheres,
    )


def read_kuaisearch_users(path: str) -> UserTable:
    """`users.jsonl`: user_id (unique), gender, age_bucket, frequent_country/_province/_city (optional)."""
    cols: dict[str, list[str]] = {k: [] for k in ("user_id", "gender", "age_bucket", "country", "province", "city")}
    seen: dict[str, str] = {}
    for where, row in _json_rows(path):
        user_id = _id(row, "user_id", where)
        if user_id in seen:
            raise CatalogDataError(f"{where}: duplicate user id {user_id!r} (first at {seen[user_id]})")
        seen[user_id] = where
        cols["user_id"].append(user_id)
        for key, field in (
            ("gender", "gender"),
            ("age_bucket", "age_bucket"),
            ("country", "frequent_country"),
            ("province", "frequent_province"),
            ("city", "frequent_city"),
        ):
            value = _get(row, field, where, "")
            cols[key].append(str(value).strip())
    return UserTable(*(_str_array(cols[k]) for k in cols))


def read_kuaisearch_recall(path: str, catalog: Catalog, *, users: UserTable | None = None) -> QueryLog:
    """`recall.jsonl`, one session per line: user_id, session_id, impressed_item_ids, clicked_item_ids,
    purchased_item_ids (both subsets of the impressed items), time_index, query, split (+ optional query_type,
    keywords, p_keywords). Every item must be in `catalog` (and every user in `users`, when given)."""
    rows = []
    for where, row in _json_rows(path):
        user_id = _id(row, "user_id", where)
        if users is not None and user_id not in users.row_of:
            raise CatalogDataError(f"{where}: unknown user id {user_id!r} (not in users)")
        impressed = _ids(row, "impressed_item_ids", where)
        if len(set(impressed)) != len(impressed):
            raise CatalogDataError(f"{where}: field 'impressed_item_ids' repeats an item")
        items = catalog.rows(impressed, where=f"{where}: field 'impressed_item_ids': ")
        clicked = set(_ids(row, "clicked_item_ids", where, []))
        ordered = set(_ids(row, "purchased_item_ids", where, []))
        for key, chosen in (("clicked_item_ids", clicked), ("purchased_item_ids", ordered)):
            missing = sorted(chosen - set(impressed))
            if missing:
                catalog.rows(missing, where=f"{where}: field {key!r}: ")
                raise CatalogDataError(f"{where}: field {key!r}: item {missing[0]!r} was not impressed")
        query = _text(row, "query", where)
        if not query:
            raise CatalogDataError(f"{where}: field 'query' is empty")
        query_type = _text(row, "query_type", where, "")
        if query_type and query_type not in QUERY_TYPES:
            raise CatalogDataError(f"{where}: field 'query_type' must be one of {QUERY_TYPES}, got {query_type!r}")
        rows.append(
            {
                "session_id": _id(row, "session_id", where),
                "user_id": user_id,
                "query": query,
                "timestamp": _int(row, "time_index", where),
                "split": _split(row, where),
                "impressed_items": items,
                "clicked": [i in clicked or i in ordered for i in impressed],
                "ordered": [i in ordered for i in impressed],
                "relevance": [-1] * len(impressed),
                "query_type": query_type,
                "keywords": _keywords(row, "keywords", where),
                "p_keywords": _keywords(row, "p_keywords", where),
            }
        )
    return _build_log(rows)


def read_kuaisearch_relevance(path: str, catalog: Catalog) -> RelevanceJudgments:
    """`relevance.jsonl`: query, item_title, brand, seller_name, attr_value, score 0-3 (or `label`), optional item_id.

    With `item_id` the item must be in the catalog; without, the row is matched by a unique exact title (else -1).
    """
    unique_title: dict[str, int] = {}
    for row_index, title in enumerate(catalog.titles.tolist()):
        unique_title[title] = -1 if title in unique_title else row_index
    queries, titles, rows, labels = [], [], [], []
    for where, row in _json_rows(path):
        query = _text(row, "query", where)
        if not query:
            raise CatalogDataError(f"{where}: field 'query' is empty")
        title = _text(row, "item_title", where, "")
        if "item_id" in row:
            item_row = int(catalog.rows([_id(row, "item_id", where)], where=f"{where}: field 'item_id': ")[0])
        else:
            if not title:
                raise CatalogDataError(f"{where}: item has no text (no item_id and an empty item_title)")
            item_row = unique_title.get(title, -1)
        key = "score" if "score" in row else "label"
        queries.append(query)
        titles.append(title or str(catalog.titles[item_row]))
        rows.append(item_row)
        labels.append(_label(_get(row, key, where), key, where))
    return RelevanceJudgments(
        queries=_str_array(queries),
        item_titles=_str_array(titles),
        item_rows=np.asarray(rows, np.int32),
        labels=np.asarray(labels, np.int8),
        splits=_str_array([""] * len(queries)),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class RankRows:
    """`rank.jsonl` rows, one per impressed item, all `[rows]`: session_ids, user_ids, queries, splits,
    search_entrances str; timestamps int64; target_items int32 (catalog rows); target_prices float32;
    is_clicked, is_purchased bool; recent_clicked / recent_purchased: per-row tuples of catalog rows (oldest first);
    user_stats `[rows, 4]` float32 (show, click, order, gmv over 30 days); item_stats `[rows, 3]` float32
    (show, click, order over 30 days)."""

    session_ids: np.ndarray
    user_ids: np.ndarray
    queries: np.ndarray
    splits: np.ndarray
    search_entrances: np.ndarray
    timestamps: np.ndarray
    target_items: np.ndarray
    target_prices: np.ndarray
    is_clicked: np.ndarray
    is_purchased: np.ndarray
    recent_clicked: tuple[tuple[int, ...], ...]
    recent_purchased: tuple[tuple[int, ...], ...]
    user_stats: np.ndarray
    item_stats: np.ndarray

    def __len__(self) -> int:
        return len(self.session_ids)


USER_STAT_FIELDS = ("user_show_cnt_30d_hist", "user_click_cnt_30d_hist", "user_order_cnt_30d_hist", "user_gmv_30d_hist")
ITEM_STAT_FIELDS = ("item_show_cnt_30d_hist", "item_click_cnt_30d_hist", "item_order_cnt_30d_hist")


def _stats(row: Mapping[str, Any], key: str, fields: Sequence[str], where: str) -> list[float]:
    value = _get(row, key, where, {})
    if not isinstance(value, dict):
        raise CatalogDataError(f"{where}: field {key!r} must be an object")
    return [_float(value, f, f"{where}: field {key!r}", 0.0) for f in fields]


def read_kuaisearch_rank(path: str, catalog: Catalog) -> RankRows:
    """`rank.jsonl` (see `RankRows`); every target and recent item must be in `catalog`."""
    cols: dict[str, list[Any]] = {f.name: [] for f in dataclasses.fields(RankRows)}
    for where, row in _json_rows(path):
        cols["session_ids"].append(_id(row, "session_id", where))
        cols["user_ids"].append(_id(row, "user_id", where))
        cols["queries"].append(_text(row, "query", where))
        cols["splits"].append(_split(row, where))
        cols["search_entrances"].append(_text(row, "search_entrance", where, ""))
        cols["timestamps"].append(_int(row, "time_index", where))
        cols["target_items"].append(catalog.rows([_id(row, "target_item_id", where)], where=f"{where}: ")[0])
        cols["target_prices"].append(_float(row, "target_item_price", where, math.nan))
        cols["is_clicked"].append(_flag(row, "is_clicked", where))
        cols["is_purchased"].append(_flag(row, "is_purchased", where))
        for key, col in (
            ("recently_clicked_item_ids", "recent_clicked"),
            ("recently_purchased_item_ids", "recent_purchased"),
        ):
            ids = _ids(row, key, where, [])
            cols[col].append(tuple(catalog.rows(ids, where=f"{where}: field {key!r}: ").tolist()))
        cols["user_stats"].append(_stats(row, "user_statistical_features", USER_STAT_FIELDS, where))
        cols["item_stats"].append(_stats(row, "target_item_statistical_features", ITEM_STAT_FIELDS, where))
    return RankRows(
        session_ids=_str_array(cols["session_ids"]),
        user_ids=_str_array(cols["user_ids"]),
        queries=_str_array(cols["queries"]),
        splits=_str_array(cols["splits"]),
        search_entrances=_str_array(cols["search_entrances"]),
        timestamps=np.asarray(cols["timestamps"], np.int64),
        target_items=np.asarray(cols["target_items"], np.int32),
        target_prices=np.asarray(cols["target_prices"], np.float32),
        is_clicked=np.asarray(cols["is_clicked"], bool),
        is_purchased=np.asarray(cols["is_purchased"], bool),
        recent_clicked=tuple(cols["recent_clicked"]),
        recent_purchased=tuple(cols["recent_purchased"]),
        user_stats=np.asarray(cols["user_stats"], np.float32).reshape(-1, len(USER_STAT_FIELDS)),
        item_stats=np.asarray(cols["item_stats"], np.float32).reshape(-1, len(ITEM_STAT_FIELDS)),
    )


def attach_relevance(log: QueryLog, judgments: RelevanceJudgments, *, where: str = "relevance") -> QueryLog:
    """The log with each impression's label taken from `judgments` by (query text, item row); unjudged -> -1.
    Two different labels for the same (query, item) raise, naming `where` and the judgment row."""
    table: dict[tuple[str, int], int] = {}
    for i, (q, r, y) in enumerate(
        zip(judgments.queries.tolist(), judgments.item_rows.tolist(), judgments.labels.tolist(), strict=True)
    ):
        if r < 0:
            continue
        if table.setdefault((q, r), y) != y:
            raise CatalogDataError(f"{where}: row {i}: conflicting labels for query {q!r} and item row {r}")
    queries = log.queries[log.impression_session].tolist()
    labels = [table.get(key, -1) for key in zip(queries, log.impressed_items.tolist(), strict=True)]
    return dataclasses.replace(log, relevance=np.asarray(labels, np.int8).reshape(-1))


@dataclasses.dataclass(frozen=True, eq=False)
class KuaiSearchData:
    """A KuaiSearch-layout directory: catalog, users, log (relevance attached when `relevance.jsonl` exists),
    relevance judgments and rank rows (None when their file is absent)."""

    catalog: Catalog
    users: UserTable | None
    log: QueryLog
    relevance: RelevanceJudgments | None
    rank: RankRows | None


def read_kuaisearch(root: str) -> KuaiSearchData:
    """Reads `root/{items,recall}.jsonl` (required) and `users`, `relevance`, `rank` `.jsonl` (optional, each may
    also be `.jsonl.gz`)."""
    if not os.path.isdir(root):
        raise CatalogFileNotFoundError(f"{root}: KuaiSearch directory not found")

    def find(name: str, required: bool) -> str | None:
        for candidate in (name, name + ".gz"):
            if os.path.isfile(os.path.join(root, candidate)):
                return os.path.join(root, candidate)
        if required:
            raise CatalogFileNotFoundError(f"{os.path.join(root, name)}: file not found")
        return None

    catalog = read_kuaisearch_items(find("items.jsonl", True))
    users_path = find("users.jsonl", False)
    users = read_kuaisearch_users(users_path) if users_path else None
    recall_path = find("recall.jsonl", True)
    log = read_kuaisearch_recall(recall_path, catalog, users=users)
    relevance_path = find("relevance.jsonl", False)
    relevance = read_kuaisearch_relevance(relevance_path, catalog) if relevance_path else None
    if relevance is not None:
        log = attach_relevance(log, relevance, where=relevance_path)
    rank_path = find("rank.jsonl", False)
    rank = read_kuaisearch_rank(rank_path, catalog) if rank_path else None
    return KuaiSearchData(catalog, users, log, relevance, rank)


# ----------------------------------------------------------------------------------------------------------------------
# Amazon reviews (2014 and 2018 5-core)
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class AmazonData:
    """An Amazon category: the reviewed items (`catalog`, meta-file order) and per-user review sequences
    (`history`, ACTION_REVIEW events ordered by `unixReviewTime`, ties in file order; users sorted by id)
    with their star ratings `ratings` `[events]` float32 aligned with the history's event columns."""

    catalog: Catalog
    history: UserHistory
    ratings: np.ndarray


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _meta_2014(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    categories = _get(row, "categories", where, [])
    if not isinstance(categories, list) or not all(
        isinstance(c, list) and all(isinstance(x, str) for x in c) for c in categories
    ):
        raise CatalogDataError(f"{where}: field 'categories' must be a list of lists of strings")
    return {
        "title": _text(row, "title", where, ""),
        "description": _text(row, "description", where, ""),
        "brand": _text(row, "brand", where, ""),
        "price": _float(row, "price", where, math.nan),
        "path": categories[0] if categories else [],
    }


_PRICE = re.compile(r"\$?\s*([0-9][0-9,]*(?:\.[0-9]+)?)")


def _meta_2018(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    category = _get(row, "category", where, [])
    if not isinstance(category, list) or not all(isinstance(x, str) for x in category):
        raise CatalogDataError(f"{where}: field 'category' must be a list of strings")
    description = _get(row, "description", where, [])
    if isinstance(description, list) and all(isinstance(x, str) for x in description):
        description = " ".join(d.strip() for d in description if d.strip())
    elif not isinstance(description, str):
        raise CatalogDataError(f"{where}: field 'description' must be a string or a list of strings")
    price_text = _get(row, "price", where, "")
    if isinstance(price_text, (int, float)) and not isinstance(price_text, bool):
        price = float(price_text)
    elif isinstance(price_text, str):
        match = _PRICE.match(price_text.strip())
        price = float(match.group(1).replace(",", "")) if match else math.nan  # "" or e.g. ".a-box-inner{...}"
    else:
        raise CatalogDataError(f"{where}: field 'price' must be a string or a number, got {price_text!r}")
    return {
        "title": _text(row, "title", where, ""),
        "description": description.strip(),
        "brand": _text(row, "brand", where, ""),
        "price": price,
        "path": category,
    }


def _read_amazon(
    reviews_path: str,
    meta_path: str,
    meta_rows: Callable[[str], Iterator[tuple[str, dict[str, Any]]]],
    meta_fields: Callable[[Mapping[str, Any], str], dict[str, Any]],
    *,
    missing_text: str,
    duplicate_items: str,
    unknown_items: str,
) -> AmazonData:
    _check_choice("missing_text", missing_text, ("error", "skip"))
    _check_choice("duplicate_items", duplicate_items, ("error", "first"))
    _check_choice("unknown_items", unknown_items, ("error", "skip"))
    users, asins, times, ratings, lines = [], [], [], [], []
    for where, row in _json_rows(reviews_path):
        users.append(_id(row, "reviewerID", where))
        asins.append(_id(row, "asin", where))
        times.append(_int(row, "unixReviewTime", where))
        ratings.append(_float(row, "overall", where, math.nan))
        lines.append(where)
    reviewed = set(asins)
    items: dict[str, dict[str, Any]] = {}
    for where, row in meta_rows(meta_path):
        asin = _id(row, "asin", where)
        fields = meta_fields(row, where)  # validates every row, reviewed or not
        if asin in items:
            if duplicate_items == "error":
                raise CatalogDataError(f"{where}: duplicate item id {asin!r} (first at {items[asin]['where']})")
            continue
        if asin not in reviewed:
            items[asin] = {"where": where, "skip": True}
            continue
        fields["where"] = where
        fields["title"] = fields["title"] or fields["description"][:200]
        fields["skip"] = not fields["title"]
        if fields["skip"] and missing_text == "error":
            raise CatalogDataError(f"{where}: item {asin!r} has no text (no title and no description)")
        items[asin] = fields
    kept = [a for a, f in items.items() if not f["skip"]]
    catalog = make_catalog(
        kept,
        [items[a]["title"] for a in kept],
        category_paths=[items[a]["path"] for a in kept],
        brands=[items[a]["brand"] for a in kept],
        prices=[items[a]["price"] for a in kept],
        descriptions=[items[a]["description"] for a in kept],
        where=[items[a]["where"] for a in kept],
    )
    row_of = catalog.row_of
    keep_review = np.ones(len(asins), bool)
    for i, asin in enumerate(asins):
        if asin not in row_of:
            if asin in items:  # in the meta file but skipped for lack of text: drop its reviews
                keep_review[i] = False
            elif unknown_items == "error":
                raise CatalogDataError(f"{lines[i]}: unknown item id {asin!r} (not in {meta_path})")
            else:
                keep_review[i] = False
    kept_rows = np.flatnonzero(keep_review)
    user_ids, user_rows = np.unique(_str_array(users)[kept_rows], return_inverse=True)
    item_rows = np.asarray([row_of[asins[i]] for i in kept_rows.tolist()], np.int32)
    timestamps = np.asarray(times, np.int64)[kept_rows]
    ratings_array = np.asarray(ratings, np.float32)[kept_rows]
    order = np.lexsort((np.arange(len(kept_rows)), timestamps, user_rows))
    history = _history(
        user_ids,
        user_rows,
        item_rows,
        timestamps,
        _str_array([""] * len(kept_rows)),
        np.full(len(kept_rows), ACTION_REVIEW, np.int8),
    )
    return AmazonData(catalog, history, ratings_array[order])


def read_amazon_2014(
    reviews_path: str,
    meta_path: str,
    *,
    missing_text: str = "error",
    duplicate_items: str = "error",
    unknown_items: str = "error",
) -> AmazonData:
    """Amazon 2014 5-core (`reviews_<Cat>_5.json(.gz)`: JSON lines with reviewerID, asin, unixReviewTime, overall)
    and its meta file (`meta_<Cat>.json(.gz)`: one Python dict literal per line with asin, title, description,
    brand, price, categories; parsed with `ast.literal_eval`).

    The catalog keeps the reviewed items. An item's text is its title, else its description; an item with neither
    raises (`missing_text="skip"` drops it and its reviews). Duplicate meta asins raise (`duplicate_items="first"`
    keeps the first); a review naming an asin absent from the meta file raises (`unknown_items="skip"` drops it).
    """
    return _read_amazon(
        reviews_path,
        meta_path,
        _literal_rows,
        _meta_2014,
        missing_text=missing_text,
        duplicate_items=duplicate_items,
        unknown_items=unknown_items,
    )


def read_amazon_2018(
    reviews_path: str,
    meta_path: str,
    *,
    missing_text: str = "error",
    duplicate_items: str = "error",
    unknown_items: str = "error",
) -> AmazonData:
    """Amazon 2018 5-core (`<Cat>_5.json(.gz)`) and `meta_<Cat>.json(.gz)`, both strict JSON lines. Meta fields:
    asin, title, description (list of strings), brand, category (list), price (text such as "$12.99"; anything
    unparsable is NaN). Options as in `read_amazon_2014` (the 2018 meta files do contain duplicate asins:
    `duplicate_items="first"`)."""
    return _read_amazon(
        reviews_path,
        meta_path,
        _json_rows,
        _meta_2018,
        missing_text=missing_text,
        duplicate_items=duplicate_items,
        unknown_items=unknown_items,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Amazon ESCI shopping queries
# ----------------------------------------------------------------------------------------------------------------------

ESCI_EXAMPLE_COLUMNS = ("query_id", "query", "product_id", "product_locale", "esci_label")
ESCI_PRODUCT_COLUMNS = ("product_id", "product_title", "product_locale")


def _read_table(path: str, required: Sequence[str]) -> dict[str, list[Any]]:
    """A `.parquet` or `.csv` file as column lists, checking the required columns."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
        raise CatalogFileNotFoundError(f"{path}: file not found")
    try:
        if path.endswith(".parquet"):
            table = pq.read_table(path)
        elif path.endswith((".csv", ".csv.gz")):
            table = pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(strings_can_be_null=True))
        else:
            raise CatalogDataError(f"{path}: unsupported file type (expected .parquet or .csv)")
    except (pa.ArrowInvalid, OSError) as e:
        raise CatalogDataError(f"{path}: unreadable table ({e})") from e
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise CatalogDataError(f"{path}: missing column {missing[0]!r} (has {table.column_names})")
    return {name: table.column(name).to_pylist() for name in table.column_names}


@dataclasses.dataclass(frozen=True, eq=False)
class EsciData:
    """ESCI for one locale: the judged products (`catalog`) and the (query, product) labels as 0-3 relevance
    (`judgments`; `splits` from the examples' `split` column), plus `query_ids` `[judgments]` str."""

    catalog: Catalog
    judgments: RelevanceJudgments
    query_ids: np.ndarray


def read_esci(
    examples_path: str,
    products_path: str,
    *,
    locale: str = "us",
    version: str | None = "small",
    missing_text: str = "error",
) -> EsciData:
    """Amazon ESCI (`shopping_queries_dataset_examples` / `_products`, `.parquet` or `.csv`).

    Examples of `locale` (and with `small_version == 1` / `large_version == 1` for `version="small"` / `"large"`;
    None keeps all) become judgments, E/S/C/I -> 3/2/1/0. Products of the locale whose id is judged form the
    catalog; a duplicate (product_id, locale) raises, as does an example naming a product absent from the products
    file. A product with no title raises (`missing_text="skip"` drops it and its examples). Rows are 0-based data
    rows of the table.
    """
    _check_choice("version", str(version), ("small", "large", "None"))
    _check_choice("missing_text", missing_text, ("error", "skip"))
    ex = _read_table(examples_path, ESCI_EXAMPLE_COLUMNS + (() if version is None else (f"{version}_version",)))
    keep = [i for i, loc in enumerate(ex["product_locale"]) if loc == locale]
    if version is not None:
        flags = ex[f"{version}_version"]
        keep = [i for i in keep if flags[i] == 1]
    judged = {ex["product_id"][i] for i in keep}
    pr = _read_table(products_path, ESCI_PRODUCT_COLUMNS)
    product_rows: dict[str, int] = {}
    ids, titles, brands, colours, descriptions, wheres, dropped = [], [], [], [], [], [], set()
    n_products = len(pr["product_id"])
    for i in range(n_products):
        if pr["product_locale"][i] != locale:
            continue
        where = f"{products_path}: row {i}"
        pid = pr["product_id"][i]
        if not isinstance(pid, str) or not pid:
            raise CatalogDataError(f"{where}: column 'product_id' is empty")
        if pid in product_rows:
            raise CatalogDataError(f"{where}: duplicate item id {pid!r} (first at row {product_rows[pid]})")
        product_rows[pid] = i
        if pid not in judged:
            continue
        title = (pr["product_title"][i] or "").strip()
        if not title:
            if missing_text == "error":
                raise CatalogDataError(f"{where}: item {pid!r} has no text (empty product_title)")
            dropped.add(pid)
            continue
        ids.append(pid)
        titles.append(title)
        brands.append((pr.get("product_brand", [None] * n_products)[i] or "").strip())
        colours.append({"color": (pr.get("product_color", [None] * n_products)[i] or "").strip()})
        descriptions.append((pr.get("product_description", [None] * n_products)[i] or "").strip())
        wheres.append(where)
    catalog = make_catalog(ids, titles, brands=brands, attributes=colours, descriptions=descriptions, where=wheres)
    queries, query_ids, rows, labels, splits = [], [], [], [], []
    split_col = ex.get("split")
    for i in keep:
        where = f"{examples_path}: row {i}"
        pid = ex["product_id"][i]
        if pid in dropped:
            continue
        if pid not in catalog.row_of:
            raise CatalogDataError(f"{where}: unknown item id {pid!r} (not in {products_path} for locale {locale!r})")
        label = ex["esci_label"][i]
        if label not in ESCI_RELEVANCE:
            raise CatalogDataError(f"{where}: column 'esci_label' must be one of E/S/C/I, got {label!r}")
        query = (ex["query"][i] or "").strip() if isinstance(ex["query"][i], str) else ""
        if not query:
            raise CatalogDataError(f"{where}: column 'query' is empty")
        queries.append(query)
        query_ids.append(str(ex["query_id"][i]))
        rows.append(catalog.row_of[pid])
        labels.append(ESCI_RELEVANCE[label])
        splits.append(str(split_col[i]) if split_col is not None else "")
    judgments = RelevanceJudgments(
        queries=_str_array(queries),
        item_titles=catalog.titles[np.asarray(rows, np.int64)],
        item_rows=np.asarray(rows, np.int32),
        labels=np.asarray(labels, np.int8),
        splits=_str_array(splits),
    )
    return EsciData(catalog, judgments, _str_array(query_ids))


# ----------------------------------------------------------------------------------------------------------------------
# Embedded default: the simulated world
# ----------------------------------------------------------------------------------------------------------------------

# Category tree: 8 top categories x 4 subcategories x 4 product types (leaves).
_TREE: dict[str, dict[str, tuple[str, ...]]] = {
    "clothing": {
        "tops": ("t-shirt", "blouse", "sweater", "hoodie"),
        "bottoms": ("jeans", "chinos", "shorts", "leggings"),
        "dresses": ("maxi dress", "midi dress", "shirt dress", "wrap dress"),
        "outerwear": ("parka", "denim jacket", "raincoat", "blazer"),
    },
    "shoes": {
        "athletic shoes": ("running shoes", "trail shoes", "basketball shoes", "training shoes"),
        "casual shoes": ("sneakers", "loafers", "slip-ons", "canvas shoes"),
        "boots": ("ankle boots", "hiking boots", "rain boots", "chelsea boots"),
        "sandals": ("flip flops", "slides", "sport sandals", "wedge sandals"),
    },
    "home": {
        "bedding": ("duvet cover", "pillowcase", "bed sheet", "throw blanket"),
        "decor": ("table lamp", "wall clock", "flower vase", "picture frame"),
        "storage": ("storage box", "shoe rack", "laundry basket", "bookshelf"),
        "bath": ("bath towel", "bath mat", "shower curtain", "bathrobe"),
    },
    "kitchen": {
        "cookware": ("frying pan", "saucepan", "stock pot", "wok"),
        "tableware": ("dinner plate", "cereal bowl", "coffee mug", "wine glass"),
        "utensils": ("chef knife", "cutting board", "spatula", "peeler"),
        "small appliances": ("kettle", "toaster", "blender", "rice cooker"),
    },
    "electronics": {
        "audio": ("earbuds", "headphones", "bluetooth speaker", "soundbar"),
        "phone accessories": ("phone case", "phone charger", "power bank", "screen protector"),
        "computer accessories": ("keyboard", "mouse", "monitor stand", "usb hub"),
        "wearables": ("smartwatch", "fitness tracker", "smart ring", "watch strap"),
    },
    "beauty": {
        "skincare": ("face cream", "serum", "cleanser", "sunscreen"),
        "makeup": ("lipstick", "mascara", "foundation", "eyeshadow palette"),
        "hair care": ("shampoo", "conditioner", "hair oil", "hair dryer"),
        "fragrance": ("perfume", "body mist", "cologne", "scented candle"),
    },
    "sports": {
        "fitness": ("yoga mat", "dumbbells", "resistance bands", "jump rope"),
        "cycling": ("bike helmet", "cycling gloves", "bike light", "water bottle"),
        "camping": ("tent", "sleeping bag", "camping chair", "headlamp"),
        "swimming": ("swimsuit", "swim goggles", "swim cap", "beach towel"),
    },
    "toys": {
        "building toys": ("building blocks", "jigsaw puzzle", "model kit", "magnetic tiles"),
        "dolls and figures": ("doll", "plush toy", "action figure", "dollhouse"),
        "outdoor play": ("kite", "water gun", "kick scooter", "bubble machine"),
        "learning toys": ("science kit", "flash cards", "drawing board", "toy piano"),
    },
}
_COLOURS = ("black", "white", "red", "blue", "green", "grey", "pink", "beige", "navy", "yellow", "brown", "purple")
_MATERIALS = {
    "clothing": ("cotton", "linen", "wool", "polyester", "denim", "silk"),
    "shoes": ("leather", "canvas", "mesh", "suede", "rubber", "knit"),
    "home": ("cotton", "linen", "wood", "ceramic", "glass", "bamboo"),
    "kitchen": ("stainless steel", "cast iron", "ceramic", "glass", "bamboo", "aluminium"),
    "electronics": ("plastic", "aluminium", "silicone", "leather", "glass", "fabric"),
    "beauty": ("organic", "vegan", "mineral", "herbal", "fragrance-free", "natural"),
    "sports": ("nylon", "polyester", "neoprene", "foam", "steel", "rubber"),
    "toys": ("wood", "plastic", "plush", "cardboard", "silicone", "felt"),
}
_SIZES = {
    "clothing": ("XS", "S", "M", "L", "XL"),
    "shoes": ("36", "37", "38", "39", "40", "41", "42", "43", "44"),
}
_DEFAULT_SIZES = ("small", "medium", "large")
_STYLES = ("classic", "casual", "sporty", "vintage", "modern", "minimalist", "elegant", "cute")
_BASE_PRICE = {
    "clothing": 35.0,
    "shoes": 60.0,
    "home": 30.0,
    "kitchen": 28.0,
    "electronics": 45.0,
    "beauty": 18.0,
    "sports": 25.0,
    "toys": 20.0,
}
_MARKETING = ("", "", "", "new ", "2025 ", "best seller ", "hot sale ")
_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "tor",
    "zen",
    "lu",
    "no",
    "sa",
    "vi",
    "ter",
    "mar",
    "bel",
    "cor",
    "dan",
    "el",
    "fi",
    "gra",
    "hal",
    "ori",
    "pex",
    "qua",
    "sol",
    "tam",
    "ul",
    "wen",
    "xo",
    "yar",
    "zu",
)
_GENDERS = ("female", "male")
_AGE_BUCKETS = ("18-23", "24-30", "31-40", "41-50", "50+")
_PLACES = (
    ("China", "Beijing", "Beijing"),
    ("China", "Shanghai", "Shanghai"),
    ("China", "Guangdong", "Guangzhou"),
    ("China", "Guangdong", "Shenzhen"),
    ("China", "Zhejiang", "Hangzhou"),
    ("China", "Sichuan", "Chengdu"),
    ("China", "Hubei", "Wuhan"),
    ("China", "Jiangsu", "Nanjing"),
    ("China", "Shaanxi", "Xi'an"),
    ("China", "Hunan", "Changsha"),
)
_BRANDS_PER_L1 = 12
_MINUTES_PER_DAY = 1440

# Intent kinds: the constraint a query puts on items of its product type (leaf).
(
    K_LEAF,
    K_COLOUR,
    K_BRAND,
    K_MATERIAL,
    K_PRICE_QUESTION,
    K_STYLE_QUESTION,
    K_NOT_COLOUR,
    K_NOT_MATERIAL,
    K_SUBSTITUTE,
) = range(9)
INTENT_KINDS: tuple[str, ...] = (
    "leaf",
    "colour",
    "brand",
    "material",
    "price_question",
    "style_question",
    "not_colour",
    "not_material",
    "substitute",
)
_KIND_QUERY_TYPE = ("simple",) * 4 + ("question",) * 2 + ("negation",) * 2 + ("substitute",)
_SIMPLE_KIND_P = np.array([0.3, 0.3, 0.25, 0.15])
_COMPLEX_KIND_P = np.array([0.22, 0.18, 0.22, 0.13, 0.25])  # price_q, style_q, not_colour, not_material, substitute


@dataclasses.dataclass(frozen=True, eq=False)
class CategoryTree:
    """The simulator's 3-level tree: names per level and each node's parent (`l2_parent` `[l2]`, `leaf_parent`
    `[leaves]` int32)."""

    l1_names: tuple[str, ...]
    l2_names: tuple[str, ...]
    leaf_names: tuple[str, ...]
    l2_parent: np.ndarray
    leaf_parent: np.ndarray

    @property
    def depth(self) -> int:
        return 3


def category_tree() -> CategoryTree:
    """The fixed category tree of the simulated world (8 x 4 x 4 nodes)."""
    l1, l2, leaves, l2_parent, leaf_parent = [], [], [], [], []
    for a, (name1, children) in enumerate(_TREE.items()):
        l1.append(name1)
        for name2, leaf_names in children.items():
            l2_parent.append(a)
            l2.append(name2)
            for leaf in leaf_names:
                leaf_parent.append(len(l2) - 1)
                leaves.append(leaf)
    return CategoryTree(
        tuple(l1), tuple(l2), tuple(leaves), np.asarray(l2_parent, np.int32), np.asarray(leaf_parent, np.int32)
    )


@dataclasses.dataclass(frozen=True, eq=False)
class IntentTable:
    """Query intents, one row each (`[intents]`): texts str (the query), query_types str (`QUERY_TYPES`), kinds
    int8 (index into `INTENT_KINDS`), leaves int32 (product type), values int32 (constrained colour / material /
    style / brand index, -1 none), price_limits float32 (NaN none), popularity float64 (Zipf probability, sums to
    1), keywords (the core-keyword thought, <= 8 per intent)."""

    texts: np.ndarray
    query_types: np.ndarray
    kinds: np.ndarray
    leaves: np.ndarray
    values: np.ndarray
    price_limits: np.ndarray
    popularity: np.ndarray
    keywords: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass(frozen=True, eq=False)
class SimulatedWorld:
    """The embedded e-commerce world (KuaiSearch-like), see `simulated_world`.

    Attributes:
      catalog, users, log: as read from a KuaiSearch directory (`log.relevance` filled, thoughts in
        `log.keywords` / `log.preference_keywords`, `log.query_types`).
      relevance: one judgment per distinct (query, impressed item).
      intents: the query intents; `session_intents` `[sessions]` int32 maps each session to its intent.
      tree: the category tree; item latent columns `item_leaves`, `item_brands`, `item_colours`, `item_materials`,
        `item_styles` (int32 ids into `tree.leaf_names`, `brand_names`, `_COLOURS`, `material_names`, `_STYLES`),
        `item_quality` float32, `item_launch_times` int64 (-1: launched before the log starts).
      users' latent preferences: `user_l1_affinity` `[users, 8]` float32 (rows sum to 1), `user_brands`
        `[users, 8]` int32 (favourite brand per top category), `user_colours` `[users, 2]` int32,
        `user_price_shift` `[users]` float32 (preferred log-price offset from the product type's median).
      cold_items: `[items]` bool, never impressed in the train split (includes every item launched after it).
      split_times: (start of val, start of test) in minutes.
    """

    catalog: Catalog
    users: UserTable
    log: QueryLog
    relevance: RelevanceJudgments
    intents: IntentTable
    session_intents: np.ndarray
    tree: CategoryTree
    brand_names: tuple[str, ...]
    material_names: tuple[str, ...]
    item_leaves: np.ndarray
    item_brands: np.ndarray
    item_colours: np.ndarray
    item_materials: np.ndarray
    item_styles: np.ndarray
    item_quality: np.ndarray
    item_launch_times: np.ndarray
    user_l1_affinity: np.ndarray
    user_brands: np.ndarray
    user_colours: np.ndarray
    user_price_shift: np.ndarray
    cold_items: np.ndarray
    split_times: tuple[int, int]


def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        k = int(rng.integers(2, 4))
        name = "".join(_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), k)).capitalize()
        if name not in seen and len(name) >= 4:
            seen.add(name)
            names.append(name)
    return names


def _sample_rows(rng: np.random.Generator, cdf: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """One categorical draw per entry of `rows` from the row-wise CDFs `cdf` `[R, V]`."""
    u = rng.random(len(rows))
    return np.minimum((cdf[rows] < u[:, None]).sum(axis=1), cdf.shape[1] - 1).astype(np.int32)


def _pools(keys: np.ndarray, num_keys: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items grouped by an integer key: (items sorted by key, start `[num_keys]`, count `[num_keys]`)."""
    order = np.argsort(keys, kind="stable").astype(np.int32)
    sorted_keys = keys[order]
    start = np.searchsorted(sorted_keys, np.arange(num_keys), side="left")
    stop = np.searchsorted(sorted_keys, np.arange(num_keys), side="right")
    return order, start.astype(np.int64), (stop - start).astype(np.int64)


def _title(
    rng_values: Sequence[int], brand: str, colour: str, material: str, leaf: str, size: str, style: str, l1: str
) -> str:
    template, marketing = rng_values
    size_text = f"size {size}" if l1 in _SIZES else size
    forms = (
        f"{brand} {colour} {material} {leaf}, {style} style, {size_text}",
        f"{brand} {leaf} - {colour}, {material}, {size_text}",
        f"{style} {colour} {leaf} by {brand} ({material}, {size_text})",
        f"{brand} {style} {material} {leaf} in {colour}, {size_text}",
    )
    return _MARKETING[marketing] + forms[template]


def _top(counts: np.ndarray, exclude: int = -1, k: int = 3) -> list[int]:
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0 and i != exclude]
    return order[:k]


def _dedupe(words: Sequence[str], limit: int) -> tuple[str, ...]:
    return tuple(dict.fromkeys(w for w in words if w))[:limit]


def simulated_world(
    seed: int = 0,
    *,
    num_items: int = 20_000,
    num_users: int = 5_000,
    num_sessions: int = 50_000,
    num_intents: int = 4_000,
    impressions_per_session: int = 10,
    num_days: int = 30,
    complex_fraction: float = 0.35,
    zipf_exponent: float = 1.0,
    personalised_fraction: float = 0.7,
    cold_fraction: float = 0.03,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
) -> SimulatedWorld:
    """Builds the simulated e-commerce world, deterministically per `seed` (vectorised numpy; the default
    20k-item / 50k-session world takes a few seconds on one core).

    * Catalog: items spread over the 128 product types of `category_tree()` (log-normal type sizes), a brand from
      the top category's 12 (Zipf), colour (per-type Zipf), material, size, style, a price = type base x brand tier
      x noise, a latent quality, and a title generated from these.
    * Users: profile (gender, age bucket, city) and latent preferences (top-category affinity ~ Dirichlet(0.5),
      favourite brand per top category, two favourite colours, price offset); activity ~ log-normal.
    * Intents: `num_intents` distinct queries anchored on random items: simple (type; colour / brand / material +
      type) or, with probability `complex_fraction`, complex: question ("which <type> can i get for under <P>
      dollars", "what <type> suits a <style> style"), negation ("<type> not <colour>", "<type> without
      <material>"), substitute ("like <brand> <type> but cheaper"). Popularity is Zipf(`zipf_exponent`) over a
      random order. Each intent carries core keywords (type, explicit attributes, topic words consistent with the
      constraint, e.g. the most common other colours of a negation); each session adds 1-5 preference keywords
      (favourite brand / colour / price tier; in train sessions also the brand and colour of the clicked item).
    * Sessions: uniform times over `num_days`; a user (by activity) picks an intent, with probability
      `personalised_fraction` within a top category drawn from their affinity. The old system ranks 22 candidates
      (8 satisfying the constraint when it is a positive attribute, 6 of the type, 4 of the subcategory, 4 random;
      launched items only) by 1.5 x relevance + 0.4 x quality + Gumbel noise and shows the top
      `impressions_per_session`. Relevance (query, item): 3 = type matches and the constraint holds, 2 = type
      matches but not the constraint, 1 = same subcategory, 0 = otherwise. Click ~ sigmoid(1.3 (rel - 3) + pref +
      0.4 quality - 0.12 position - 0.7); order | click ~ sigmoid(0.8 (rel - 3) + 0.7 pref + 0.2 quality - 1.2),
      pref = 1.0 [favourite brand] + 0.5 [favourite colour] - 0.8 (log-price offset mismatch)^2.
    * Splits by time (`split_fractions`); `cold_fraction` of the items launch after the training period.
    """
    if num_items < 256 or num_users < 1 or num_sessions < 1 or num_intents < 1:
        raise ValueError("simulated_world needs num_items >= 256 and positive num_users, num_sessions, num_intents")
    if impressions_per_session < 1 or impressions_per_session > 22:
        raise ValueError(f"impressions_per_session must be in 1..22, got {impressions_per_session}")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or not math.isclose(sum(split_fractions), 1.0):
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}")
    rng = np.random.default_rng(seed)
    tree = category_tree()
    n_l1, n_leaves = len(tree.l1_names), len(tree.leaf_names)
    leaf_l1 = tree.l2_parent[tree.leaf_parent]
    material_names = tuple(dict.fromkeys(m for ms in _MATERIALS.values() for m in ms))
    l1_materials = np.array([[material_names.index(m) for m in _MATERIALS[n]] for n in tree.l1_names], np.int32)
    brand_names = tuple(_brand_names(rng, n_l1 * _BRANDS_PER_L1))
    brand_tier = np.exp(rng.normal(0.0, 0.35, len(brand_names))).astype(np.float32)
    brand_weights = 1.0 / np.arange(1, _BRANDS_PER_L1 + 1) ** 0.8
    brand_cdf = np.cumsum(brand_weights / brand_weights.sum())[None, :].repeat(n_l1, 0)

    # ---- items
    leaf_sizes = np.exp(rng.normal(0.0, 0.5, n_leaves))
    leaf_cdf = np.cumsum(leaf_sizes / leaf_sizes.sum())
    item_leaf = np.minimum(np.searchsorted(leaf_cdf, rng.random(num_items)), n_leaves - 1).astype(np.int32)
    item_l1 = leaf_l1[item_leaf]
    item_brand = (item_l1 * _BRANDS_PER_L1 + _sample_rows(rng, brand_cdf, item_l1)).astype(np.int32)
    colour_w = rng.permuted(np.tile(1.0 / np.arange(1, len(_COLOURS) + 1), (n_leaves, 1)), axis=1)
    item_colour = _sample_rows(rng, np.cumsum(colour_w / colour_w.sum(1, keepdims=True), axis=1), item_leaf)
    item_material = l1_materials[item_l1, rng.integers(0, l1_materials.shape[1], num_items)].astype(np.int32)
    item_style = rng.integers(0, len(_STYLES), num_items).astype(np.int32)
    leaf_base = np.array([_BASE_PRICE[tree.l1_names[a]] for a in leaf_l1]) * np.exp(rng.normal(0.0, 0.5, n_leaves))
    raw_price = leaf_base[item_leaf] * brand_tier[item_brand] * np.exp(rng.normal(0.0, 0.2, num_items))
    item_price = np.maximum(np.round(raw_price) - 0.01, 0.99).astype(np.float32)
    item_quality = rng.normal(0.0, 1.0, num_items).astype(np.float32)
    size_draw = rng.integers(0, 1 << 30, num_items)
    title_draw = np.stack([rng.integers(0, 4, num_items), rng.integers(0, len(_MARKETING), num_items)], 1)
    leaf_median = np.array(
        [np.median(item_price[item_leaf == f]) if np.any(item_leaf == f) else leaf_base[f] for f in range(n_leaves)],
        np.float32,
    )

    titles, sizes, paths, attrs = [], [], [], []
    for i in range(num_items):
        l1 = tree.l1_names[item_l1[i]]
        size_vocab = _SIZES.get(l1, _DEFAULT_SIZES)
        size = size_vocab[size_draw[i] % len(size_vocab)]
        leaf = tree.leaf_names[item_leaf[i]]
        colour, material, style = _COLOURS[item_colour[i]], material_names[item_material[i]], _STYLES[item_style[i]]
        titles.append(
            _title(title_draw[i].tolist(), brand_names[item_brand[i]], colour, material, leaf, size, style, l1)
        )
        sizes.append(size)
        paths.append((l1, tree.l2_names[tree.leaf_parent[item_leaf[i]]], leaf))
        attrs.append({"colour": colour, "material": material, "size": size, "style": style})
    catalog = make_catalog(
        [str(i + 1) for i in range(num_items)],
        titles,
        category_paths=paths,
        brands=[brand_names[b] for b in item_brand],
        attributes=attrs,
        prices=item_price,
        sellers=[f"{brand_names[b]} official store" for b in item_brand],
    )

    # ---- time, splits, launches
    horizon = num_days * _MINUTES_PER_DAY
    val_start = int(horizon * split_fractions[0])
    test_start = int(horizon * (split_fractions[0] + split_fractions[1]))
    launch = np.full(num_items, -1, np.int64)
    cold = rng.random(num_items) < cold_fraction
    launch[cold] = rng.integers(val_start, max(val_start + 1, horizon), int(cold.sum()))

    # ---- users
    affinity = rng.dirichlet(np.full(n_l1, 0.5), num_users).astype(np.float32)
    user_brands = np.arange(n_l1)[None, :] * _BRANDS_PER_L1 + _sample_rows(
        rng, brand_cdf, np.zeros(num_users * n_l1, np.int32)
    ).reshape(num_users, n_l1)
    user_colours = np.argsort(rng.random((num_users, len(_COLOURS))), axis=1)[:, :2].astype(np.int32)
    price_shift = rng.normal(0.0, 0.3, num_users).astype(np.float32)
    places = rng.integers(0, len(_PLACES), num_users)
    users = UserTable(
        user_ids=_str_array([str(u + 1) for u in range(num_users)]),
        genders=np.asarray(_GENDERS, np.str_)[rng.integers(0, 2, num_users)],
        age_buckets=np.asarray(_AGE_BUCKETS, np.str_)[rng.integers(0, len(_AGE_BUCKETS), num_users)],
        countries=np.asarray([p[0] for p in _PLACES], np.str_)[places],
        provinces=np.asarray([p[1] for p in _PLACES], np.str_)[places],
        cities=np.asarray([p[2] for p in _PLACES], np.str_)[places],
    )

    # ---- intents
    intents = _make_intents(
        rng,
        num_intents,
        complex_fraction,
        zipf_exponent,
        tree,
        brand_names,
        material_names,
        item_leaf,
        item_brand,
        item_colour,
        item_material,
        item_style,
        item_price,
        l1_materials,
    )

    # ---- sessions
    times = np.sort(rng.integers(0, horizon, num_sessions)).astype(np.int64)
    activity = np.exp(rng.normal(0.0, 1.0, num_users))
    session_user = np.minimum(
        np.searchsorted(np.cumsum(activity / activity.sum()), rng.random(num_sessions)), num_users - 1
    ).astype(np.int32)
    session_intent = _sample_intents(
        rng, intents, leaf_l1[intents.leaves], affinity, session_user, personalised_fraction, n_l1
    )
    splits = np.where(times < val_start, "train", np.where(times < test_start, "val", "test")).astype(np.str_)

    # ---- candidates and the old system's ranking
    kind = intents.kinds[session_intent]
    s_leaf = intents.leaves[session_intent]
    value = intents.values[session_intent]
    limit = intents.price_limits[session_intent]
    item_l2 = tree.leaf_parent[item_leaf]
    pool_keys = {
        K_COLOUR: (item_leaf * len(_COLOURS) + item_colour, n_leaves * len(_COLOURS), len(_COLOURS)),
        K_BRAND: (item_leaf * len(brand_names) + item_brand, n_leaves * len(brand_names), len(brand_names)),
        K_MATERIAL: (
            item_leaf * len(material_names) + item_material,
            n_leaves * len(material_names),
            len(material_names),
        ),
        K_STYLE_QUESTION: (item_leaf * len(_STYLES) + item_style, n_leaves * len(_STYLES), len(_STYLES)),
    }
    leaf_pool = _pools(item_leaf, n_leaves)
    l2_pool = _pools(item_l2, len(tree.l2_names))

    def draw(pool: tuple[np.ndarray, np.ndarray, np.ndarray], keys: np.ndarray, k: int) -> np.ndarray:
        order, start, count = pool
        c = np.maximum(count[keys], 1)[:, None]
        pos = start[keys][:, None] + np.minimum((rng.random((len(keys), k)) * c).astype(np.int64), c - 1)
        return order[np.minimum(pos, len(order) - 1)]

    exact = draw(leaf_pool, s_leaf, 8)
    for k_id, (keys, n_keys, width) in pool_keys.items():
        rows = np.flatnonzero(kind == k_id)
        if len(rows):
            exact[rows] = draw(_pools(keys, n_keys), s_leaf[rows] * width + value[rows], 8)
    candidates = np.concatenate(
        [
            exact,
            draw(leaf_pool, s_leaf, 6),
            draw(l2_pool, tree.leaf_parent[s_leaf], 4),
            rng.integers(0, num_items, (num_sessions, 4)),
        ],
        axis=1,
    ).astype(np.int32)
    rel = _relevance(
        kind,
        s_leaf,
        value,
        limit,
        candidates,
        item_leaf,
        item_l2,
        item_colour,
        item_brand,
        item_material,
        item_style,
        item_price,
        tree.leaf_parent,
    )
    score = 1.5 * rel + 0.4 * item_quality[candidates] + rng.gumbel(size=candidates.shape)
    order = np.argsort(candidates, axis=1, kind="stable")
    sorted_c = np.take_along_axis(candidates, order, 1)
    dup = np.zeros(candidates.shape, bool)
    np.put_along_axis(dup, order[:, 1:], sorted_c[:, 1:] == sorted_c[:, :-1], 1)
    invalid = dup | (launch[candidates] > times[:, None])
    score = np.where(invalid, -np.inf, score)
    top = np.argsort(-score, axis=1, kind="stable")[:, :impressions_per_session]
    shown = np.isfinite(np.take_along_axis(score, top, 1))
    imp_items = np.take_along_axis(candidates, top, 1)
    imp_rel = np.take_along_axis(rel, top, 1)

    # ---- clicks and orders
    u = session_user[:, None]
    pref = (
        1.0 * (user_brands[u, item_l1[imp_items]] == item_brand[imp_items])
        + 0.5 * (user_colours[u, 0] == item_colour[imp_items])
        + 0.5 * (user_colours[u, 1] == item_colour[imp_items])
        - np.minimum(
            0.8 * (np.log(item_price[imp_items] / leaf_median[item_leaf[imp_items]]) - price_shift[u]) ** 2, 2.0
        )
    )
    position = np.arange(impressions_per_session)[None, :]
    click_logit = 1.3 * (imp_rel - 3) + pref + 0.4 * item_quality[imp_items] - 0.12 * position - 0.7
    clicked = shown & (rng.random(imp_items.shape) < 1.0 / (1.0 + np.exp(-click_logit)))
    order_logit = 0.8 * (imp_rel - 3) + 0.7 * pref + 0.2 * item_quality[imp_items] - 1.2
    ordered = clicked & (rng.random(imp_items.shape) < 1.0 / (1.0 + np.exp(-order_logit)))

    counts = shown.sum(1)
    p_keywords = _preference_keywords(
        intents,
        session_intent,
        session_user,
        splits,
        imp_items,
        clicked,
        ordered,
        shown,
        user_brands,
        user_colours,
        price_shift,
        leaf_l1,
        brand_names,
        item_brand,
        item_colour,
    )
    log = QueryLog(
        session_ids=_str_array([str(s + 1) for s in range(num_sessions)]),
        user_ids=users.user_ids[session_user],
        queries=intents.texts[session_intent],
        timestamps=times,
        splits=splits,
        impression_offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        impressed_items=imp_items[shown].astype(np.int32),
        clicked=clicked[shown],
        ordered=ordered[shown],
        relevance=imp_rel[shown].astype(np.int8),
        query_types=intents.query_types[session_intent],
        keywords=tuple(intents.keywords[j] for j in session_intent.tolist()),
        preference_keywords=p_keywords,
    )
    pair = np.unique(
        session_intent[log.impression_session].astype(np.int64) * num_items + log.impressed_items, return_index=True
    )[1]
    relevance = RelevanceJudgments(
        queries=log.queries[log.impression_session[pair]],
        item_titles=catalog.titles[log.impressed_items[pair]],
        item_rows=log.impressed_items[pair],
        labels=log.relevance[pair],
        splits=_str_array([""] * len(pair)),
    )
    return SimulatedWorld(
        catalog=catalog,
        users=users,
        log=log,
        relevance=relevance,
        intents=intents,
        session_intents=session_intent,
        tree=tree,
        brand_names=brand_names,
        material_names=material_names,
        item_leaves=item_leaf,
        item_brands=item_brand,
        item_colours=item_colour,
        item_materials=item_material,
        item_styles=item_style,
        item_quality=item_quality,
        item_launch_times=launch,
        user_l1_affinity=affinity,
        user_brands=user_brands.astype(np.int32),
        user_colours=user_colours,
        user_price_shift=price_shift,
        cold_items=cold_item_mask(catalog, log),
        split_times=(val_start, test_start),
    )


def _relevance(
    kind,
    leaf,
    value,
    limit,
    items,
    item_leaf,
    item_l2,
    item_colour,
    item_brand,
    item_material,
    item_style,
    item_price,
    leaf_parent,
) -> np.ndarray:
    """`[sessions, candidates]` int8 relevance of candidate items to each session's intent (see `simulated_world`)."""
    k, v, lim = kind[:, None], value[:, None], limit[:, None]
    ok = np.select(
        [
            k == K_COLOUR,
            k == K_BRAND,
            k == K_MATERIAL,
            k == K_STYLE_QUESTION,
            k == K_NOT_COLOUR,
            k == K_NOT_MATERIAL,
            k == K_PRICE_QUESTION,
            k == K_SUBSTITUTE,
        ],
        [
            item_colour[items] == v,
            item_brand[items] == v,
            item_material[items] == v,
            item_style[items] == v,
            item_colour[items] != v,
            item_material[items] != v,
            item_price[items] <= lim,
            (item_brand[items] != v) & (item_price[items] < lim),
        ],
        default=True,
    )
    same_leaf = item_leaf[items] == leaf[:, None]
    same_l2 = item_l2[items] == leaf_parent[leaf][:, None]
    return np.where(same_leaf, np.where(ok, 3, 2), np.where(same_l2, 1, 0)).astype(np.int8)


def intent_relevance(world: SimulatedWorld, sessions: Any, items: Any) -> np.ndarray:
    """The simulator's 0-3 relevance of ANY items to sessions' latent intents (the reward's R_Rel, spec §2.6).

    sessions: `[s]` session rows of `world.log`; items: `[s, c]` catalog rows (a negative row, e.g. an invalid
    generated SID, scores 0 as an unknown item does). Returns `[s, c]` int8; on impressed items it equals
    `world.log.relevance`.
    """
    sessions = np.asarray(sessions, np.int64).reshape(-1)
    items = np.asarray(items, np.int64)
    if items.ndim != 2 or items.shape[0] != len(sessions):
        raise ValueError(f"items must be [sessions={len(sessions)}, candidates], got shape {items.shape}")
    n_items = len(world.catalog)
    if len(sessions) and (sessions.min() < 0 or sessions.max() >= len(world.log)):
        raise ValueError(f"session rows must be in [0, {len(world.log)}), got {sessions.min()}..{sessions.max()}")
    if items.size and items.max() >= n_items:
        raise ValueError(f"item rows must be < {n_items} (catalog size), got {items.max()}")
    intents = world.intents
    j = world.session_intents[sessions]
    tree = world.tree
    rel = _relevance(
        intents.kinds[j], intents.leaves[j], intents.values[j], intents.price_limits[j], np.maximum(items, 0),
        world.item_leaves, tree.leaf_parent[world.item_leaves], world.item_colours, world.item_brands,
        world.item_materials, world.item_styles, world.catalog.prices, tree.leaf_parent,
    )  # fmt: skip
    return np.where(items >= 0, rel, 0).astype(np.int8)


def _make_intents(
    rng,
    num_intents,
    complex_fraction,
    zipf_exponent,
    tree,
    brand_names,
    material_names,
    item_leaf,
    item_brand,
    item_colour,
    item_material,
    item_style,
    item_price,
    l1_materials,
) -> IntentTable:
    n_leaves = len(tree.leaf_names)
    colour_counts = np.zeros((n_leaves, len(_COLOURS)), np.int64)
    np.add.at(colour_counts, (item_leaf, item_colour), 1)
    material_counts = np.zeros((n_leaves, len(material_names)), np.int64)
    np.add.at(material_counts, (item_leaf, item_material), 1)
    brand_counts = np.zeros((n_leaves, len(brand_names)), np.int64)
    np.add.at(brand_counts, (item_leaf, item_brand), 1)
    brand_price = np.zeros((n_leaves, len(brand_names)))
    np.add.at(brand_price, (item_leaf, item_brand), item_price)
    brand_mean = np.where(brand_counts > 0, brand_price / np.maximum(brand_counts, 1), np.inf)

    def cheap_brands(leaf: int, below: float, exclude: int = -1) -> list[str]:
        """Up to 3 brands of the product type whose mean price is below `below`, cheapest first."""
        order = np.argsort(brand_mean[leaf], kind="stable")
        return [brand_names[b] for b in order if brand_mean[leaf, b] < below and b != exclude][:3]

    budget = 2 * num_intents + 64
    anchors = rng.integers(0, len(item_leaf), budget)
    is_complex = rng.random(budget) < complex_fraction
    kinds = np.where(is_complex, 4 + rng.choice(5, budget, p=_COMPLEX_KIND_P), rng.choice(4, budget, p=_SIMPLE_KIND_P))
    texts, out_kinds, leaves, values, limits, keywords = [], [], [], [], [], []
    seen: set[str] = set()
    for a, kind in zip(anchors.tolist(), kinds.tolist(), strict=True):
        if len(texts) == num_intents:
            break
        leaf = int(item_leaf[a])
        name = tree.leaf_names[leaf]
        l2 = tree.l2_names[tree.leaf_parent[leaf]]
        colour, brand = int(item_colour[a]), int(item_brand[a])
        material, style = int(item_material[a]), int(item_style[a])
        value, lim = -1, math.nan
        top_colours = [_COLOURS[c] for c in _top(colour_counts[leaf])]
        if kind == K_LEAF:
            text = name
            words = [name, l2] + [brand_names[b] for b in _top(brand_counts[leaf], k=2)]
        elif kind == K_COLOUR:
            value, text, words = colour, f"{_COLOURS[colour]} {name}", [_COLOURS[colour], name, l2]
        elif kind == K_BRAND:
            value, text, words = brand, f"{brand_names[brand].lower()} {name}", [brand_names[brand], name, l2]
        elif kind == K_MATERIAL:
            value = material
            text, words = f"{material_names[material]} {name}", [material_names[material], name, l2]
        elif kind == K_PRICE_QUESTION:
            lim = float(math.ceil(float(item_price[a]) / 10.0) * 10)
            text = f"which {name} can i get for under {int(lim)} dollars"
            words = [name, f"under {int(lim)} dollars", "budget"] + cheap_brands(leaf, lim) + [l2]
        elif kind == K_STYLE_QUESTION:
            value, text = style, f"what {name} suits a {_STYLES[style]} style"
            words = [_STYLES[style], name] + top_colours[:2] + [l2]
        elif kind == K_NOT_COLOUR:
            value, text = colour, f"{name} not {_COLOURS[colour]}"
            words = [name] + [_COLOURS[c] for c in _top(colour_counts[leaf], exclude=colour)] + [l2]
        elif kind == K_NOT_MATERIAL:
            value, text = material, f"{name} without {material_names[material]}"
            others = [m for m in _top(material_counts[leaf], exclude=material)]
            words = [name] + [material_names[m] for m in others] + [l2]
        else:  # K_SUBSTITUTE
            value, lim = brand, float(item_price[a])
            text = f"like {brand_names[brand].lower()} {name} but cheaper"
            words = [name, "cheaper alternative"] + cheap_brands(leaf, lim, exclude=brand) + [l2]
        if text in seen:
            continue
        seen.add(text)
        texts.append(text)
        out_kinds.append(kind)
        leaves.append(leaf)
        values.append(value)
        limits.append(lim)
        keywords.append(_dedupe(words, 8))
    ranks = rng.permutation(len(texts)) + 1.0
    popularity = ranks**-zipf_exponent
    kinds_array = np.asarray(out_kinds, np.int8)
    return IntentTable(
        texts=_str_array(texts),
        query_types=np.asarray(_KIND_QUERY_TYPE, np.str_)[kinds_array],
        kinds=kinds_array,
        leaves=np.asarray(leaves, np.int32),
        values=np.asarray(values, np.int32),
        price_limits=np.asarray(limits, np.float32),
        popularity=popularity / popularity.sum(),
        keywords=tuple(keywords),
    )


def _sample_intents(
    rng,
    intents: IntentTable,
    intent_l1: np.ndarray,
    affinity: np.ndarray,
    session_user: np.ndarray,
    personalised_fraction: float,
    n_l1: int,
) -> np.ndarray:
    """Per session: with probability `personalised_fraction` an intent of a top category drawn from the user's
    affinity (Zipf popularity within it), else an intent by global Zipf popularity."""
    n = len(session_user)
    global_cdf = np.cumsum(intents.popularity)
    chosen = np.minimum(np.searchsorted(global_cdf, rng.random(n) * global_cdf[-1]), len(intents) - 1)
    order = np.argsort(intent_l1, kind="stable")
    l1_sorted = intent_l1[order]
    mass = np.bincount(intent_l1, weights=intents.popularity, minlength=n_l1)
    within = np.cumsum(intents.popularity[order])
    block_start = np.concatenate([[0.0], np.cumsum(mass)])[l1_sorted]
    block_cdf = l1_sorted + (within - block_start) / mass[l1_sorted]  # in (l1, l1 + 1]
    user_l1 = _sample_rows(rng, np.cumsum(affinity, axis=1), session_user)
    personal = (rng.random(n) < personalised_fraction) & (mass[user_l1] > 0)
    picks = np.searchsorted(block_cdf, user_l1 + rng.random(n) * (1 - 1e-9) + 1e-12)
    picks = order[np.minimum(picks, len(order) - 1)]
    return np.where(personal, picks, chosen).astype(np.int32)


def _preference_keywords(
    intents,
    session_intent,
    session_user,
    splits,
    imp_items,
    clicked,
    ordered,
    shown,
    user_brands,
    user_colours,
    price_shift,
    leaf_l1,
    brand_names,
    item_brand,
    item_colour,
):
    """Per session 1-5 preference-calibrated keywords (spec §2.3 step 3)."""
    interacted = np.where(ordered.any(1), ordered.argmax(1), np.where(clicked.any(1), clicked.argmax(1), -1))
    out = []
    kinds, values, leaves = intents.kinds.tolist(), intents.values.tolist(), intents.leaves.tolist()
    for s, (j, u) in enumerate(zip(session_intent.tolist(), session_user.tolist(), strict=True)):
        kind, value, leaf = kinds[j], values[j], leaves[j]
        words = []
        if splits[s] == "train" and interacted[s] >= 0:  # training data keeps the ground truth's keywords
            item = imp_items[s, interacted[s]]
            words += [brand_names[item_brand[item]], _COLOURS[item_colour[item]]]
        brand = int(user_brands[u, leaf_l1[leaf]])
        if kind not in (K_BRAND,) and not (kind == K_SUBSTITUTE and brand == value):
            words.append(brand_names[brand])
        for c in user_colours[u].tolist():
            if kind not in (K_COLOUR,) and not (kind == K_NOT_COLOUR and c == value):
                words.append(_COLOURS[c])
                break
        if price_shift[u] < -0.15:
            words.append("budget")
        elif price_shift[u] > 0.15:
            words.append("premium")
        out.append(_dedupe(words, 5) or (intents.keywords[j][0],))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------------------
# Writing the KuaiSearch layout
# ----------------------------------------------------------------------------------------------------------------------


def _json_id(value: str) -> int | str:
    """Ids made of digits are written as JSON ints (as in the KuaiSearch release), others as strings."""
    return int(value) if value.isdigit() and not (len(value) > 1 and value[0] == "0") else value


def _enumerate_names(values: np.ndarray) -> dict[str, int]:
    """name -> 1-based id in sorted order ('' -> 0)."""
    return {name: i + 1 for i, name in enumerate(sorted(set(values.tolist()) - {""}))} | {"": 0}


def _write_jsonl(path: str, rows: Iterator[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _window_sums(
    groups: np.ndarray,
    times: np.ndarray,
    values: np.ndarray,
    query_groups: np.ndarray,
    query_times: np.ndarray,
    window: int,
) -> np.ndarray:
    """`[queries, V]` sums of `values` `[events, V]` over events of the same group with time in [t - window, t)."""
    big = int(max(times.max(initial=0), query_times.max(initial=0))) + window + 1
    keys = groups.astype(np.int64) * big + times
    order = np.argsort(keys, kind="stable")
    cum = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values[order], axis=0)])
    sorted_keys = keys[order]
    q = query_groups.astype(np.int64) * big + query_times
    hi = np.searchsorted(sorted_keys, q, side="left")
    lo = np.searchsorted(sorted_keys, q - window, side="left")
    return cum[hi] - cum[lo]


def _rank_rows(catalog: Catalog, log: QueryLog, *, recent: int = 20, window: int = 30 * _MINUTES_PER_DAY):
    """rank.jsonl rows (one per impression) with recent clicks / purchases and 30-day statistics from the log."""
    sessions = log.impression_session
    _, user_rows = np.unique(log.user_ids, return_inverse=True)
    history = history_from_log(log)
    show = log.num_impressions.astype(np.float64)
    clicks = np.bincount(sessions, weights=log.clicked, minlength=len(log))
    orders = np.bincount(sessions, weights=log.ordered, minlength=len(log))
    prices = np.nan_to_num(catalog.prices[log.impressed_items].astype(np.float64))
    gmv = np.bincount(sessions, weights=prices * log.ordered, minlength=len(log))
    user_stats = _window_sums(
        user_rows, log.timestamps, np.stack([show, clicks, orders, gmv], 1), user_rows, log.timestamps, window
    )
    item_stats = _window_sums(
        log.impressed_items,
        log.timestamps[sessions],
        np.stack([np.ones(len(sessions)), log.clicked, log.ordered], 1).astype(np.float64),
        log.impressed_items,
        log.timestamps[sessions],
        window,
    )
    ids = [_json_id(i) for i in catalog.item_ids.tolist()]
    for s in range(len(log)):
        events = history.recent(int(user_rows[s]), int(log.timestamps[s]), 10**9)
        items = history.items[events]
        bought = items[history.actions[events] == ACTION_ORDER]
        base = {
            "user_id": _json_id(str(log.user_ids[s])),
            "session_id": _json_id(str(log.session_ids[s])),
            "time_index": int(log.timestamps[s]),
            "search_entrance": "search_entrance_simulated",
            "recently_clicked_item_ids": [ids[i] for i in items[-recent:].tolist()],
            "recently_purchased_item_ids": [ids[i] for i in bought[-recent:].tolist()],
            "query": str(log.queries[s]),
            "user_statistical_features": dict(zip(USER_STAT_FIELDS, user_stats[s].round(2).tolist(), strict=True)),
            "split": str(log.splits[s]),
        }
        for k in range(*log.impressions(s).indices(len(log.impressed_items))):
            item = int(log.impressed_items[k])
            price = float(catalog.prices[item])
            yield {
                **base,
                "target_item_id": ids[item],
                "target_item_price": price if math.isfinite(price) else None,
                "is_clicked": int(log.clicked[k]),
                "is_purchased": int(log.ordered[k]),
                "target_item_statistical_features": dict(zip(ITEM_STAT_FIELDS, item_stats[k].tolist(), strict=True)),
            }


def write_kuaisearch(data: SimulatedWorld | KuaiSearchData, out_dir: str, *, with_rank: bool = False) -> None:
    """Writes `items.jsonl`, `users.jsonl` (when there are users), `recall.jsonl` and `relevance.jsonl` (and with
    `with_rank`, `rank.jsonl`: one row per impression, large) in the layout `read_kuaisearch` reads.

    Brand, seller and category ids are 1-based ranks of the sorted names. Relevance rows are `data.relevance`, else
    the distinct labelled (query, item) impressions of the log.
    """
    catalog, log = data.catalog, data.log
    os.makedirs(out_dir, exist_ok=True)
    brand_ids, seller_ids = _enumerate_names(catalog.brands), _enumerate_names(catalog.sellers)
    level_ids = [_enumerate_names(catalog.category_paths[:, k]) for k in range(catalog.category_paths.shape[1])]
    ids = [_json_id(i) for i in catalog.item_ids.tolist()]

    def items() -> Iterator[dict[str, Any]]:
        for i in range(len(catalog)):
            row: dict[str, Any] = {"item_id": ids[i], "item_title": str(catalog.titles[i])}
            brand, seller = str(catalog.brands[i]), str(catalog.sellers[i])
            row.update(brand_id=brand_ids[brand], brand_name=brand, seller_id=seller_ids[seller], seller_name=seller)
            for k, name in enumerate(catalog.category_paths[i].tolist()):
                row[f"category_level{k + 1}_id"] = level_ids[k][name]
                row[f"category_level{k + 1}_name"] = name
            if math.isfinite(float(catalog.prices[i])):
                row["price"] = float(catalog.prices[i])
            if catalog.attribute_names:
                row["attributes"] = dict(
                    zip(catalog.attribute_names, catalog.attribute_values[i].tolist(), strict=True)
                )
            if catalog.descriptions[i]:
                row["description"] = str(catalog.descriptions[i])
            yield row

    _write_jsonl(os.path.join(out_dir, "items.jsonl"), items())
    users = data.users
    if users is not None:
        _write_jsonl(
            os.path.join(out_dir, "users.jsonl"),
            (
                {
                    "user_id": _json_id(str(users.user_ids[u])),
                    "gender": str(users.genders[u]),
                    "age_bucket": str(users.age_buckets[u]),
                    "frequent_country": str(users.countries[u]),
                    "frequent_province": str(users.provinces[u]),
                    "frequent_city": str(users.cities[u]),
                }
                for u in range(len(users))
            ),
        )

    def sessions() -> Iterator[dict[str, Any]]:
        for s in range(len(log)):
            imp = log.impressions(s)
            items_s = [ids[i] for i in log.impressed_items[imp].tolist()]
            row = {
                "user_id": _json_id(str(log.user_ids[s])),
                "session_id": _json_id(str(log.session_ids[s])),
                "impressed_item_ids": items_s,
                "clicked_item_ids": [i for i, c in zip(items_s, log.clicked[imp].tolist(), strict=True) if c],
                "purchased_item_ids": [i for i, c in zip(items_s, log.ordered[imp].tolist(), strict=True) if c],
                "time_index": int(log.timestamps[s]),
                "query": str(log.queries[s]),
                "split": str(log.splits[s]),
            }
            if log.query_types[s]:
                row["query_type"] = str(log.query_types[s])
            if log.keywords[s] or log.preference_keywords[s]:
                row["keywords"] = list(log.keywords[s])
                row["p_keywords"] = list(log.preference_keywords[s])
            yield row

    _write_jsonl(os.path.join(out_dir, "recall.jsonl"), sessions())
    judgments = data.relevance
    if judgments is None:
        labelled = np.flatnonzero(log.relevance >= 0)
        key = np.unique(
            np.stack(
                [
                    np.unique(log.queries, return_inverse=True)[1][log.impression_session[labelled]],
                    log.impressed_items[labelled],
                ],
                1,
            ),
            axis=0,
            return_index=True,
        )[1]
        pick = labelled[key]
        judgments = RelevanceJudgments(
            queries=log.queries[log.impression_session[pick]],
            item_titles=catalog.titles[log.impressed_items[pick]],
            item_rows=log.impressed_items[pick],
            labels=log.relevance[pick],
            splits=_str_array([""] * len(pick)),
        )

    def relevance_rows() -> Iterator[dict[str, Any]]:
        for q, r, y in zip(
            judgments.queries.tolist(), judgments.item_rows.tolist(), judgments.labels.tolist(), strict=True
        ):
            if r < 0:
                continue
            attr = "; ".join(
                f"{k}: {v}" for k, v in zip(catalog.attribute_names, catalog.attribute_values[r], strict=True) if v
            )
            yield {
                "query": q,
                "item_id": ids[r],
                "item_title": str(catalog.titles[r]),
                "brand": str(catalog.brands[r]),
                "seller_name": str(catalog.sellers[r]),
                "attr_value": attr,
                "score": int(y),
            }

    _write_jsonl(os.path.join(out_dir, "relevance.jsonl"), relevance_rows())
    if with_rank:
        _write_jsonl(os.path.join(out_dir, "rank.jsonl"), _rank_rows(catalog, log))


# ----------------------------------------------------------------------------------------------------------------------
# grain pipelines
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _SessionElement:
    log: QueryLog
    max_impressions: int
    context: Mapping[str, np.ndarray] | None

    def __call__(self, item: tuple[int, bool]) -> dict[str, Any]:
        index, valid = item
        log, k = self.log, self.max_impressions
        imp = log.impressions(index)
        n = min(imp.stop - imp.start, k)
        imp = slice(imp.start, imp.start + n)

        def padded(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
            out = np.full((k,), fill, dtype)
            out[:n] = values[imp]
            return out

        element = {
            "index": np.int32(index),
            "valid": np.bool_(valid),
            "session_id": np.str_(log.session_ids[index]),
            "user_id": np.str_(log.user_ids[index]),
            "query": np.str_(log.queries[index]),
            "query_type": np.str_(log.query_types[index]),
            "keywords": np.str_("; ".join(log.keywords[index])),
            "preference_keywords": np.str_("; ".join(log.preference_keywords[index])),
            "timestamp": np.int64(log.timestamps[index]),
            "num_impressions": np.int32(n),
            "impressed_items": padded(log.impressed_items, -1, np.int32),
            "clicked": padded(log.clicked, False, bool),
            "ordered": padded(log.ordered, False, bool),
            "relevance": padded(log.relevance, -1, np.int8),
        }
        if self.context is not None:
            element["recent_items"] = self.context["recent_items"][index]
            element["num_recent"] = np.int32(self.context["num_recent"][index])
        return element


def query_log_dataset(
    log: QueryLog,
    *,
    max_impressions: int | None = None,
    context: Mapping[str, np.ndarray] | None = None,
    shuffle_seed: int | None = None,
    num_epochs: int | None = 1,
    batch_size: int | None = None,
    drop_remainder: bool = False,
) -> grain.MapDataset:
    """A grain pipeline over a log's sessions (select a split first with `log.split(name)`).

    Each element (leading `[batch]` axis when `batch_size` is set) is a dict of numpy values: index int32 (session
    row), valid bool (False on padding rows), session_id / user_id / query / query_type str, keywords /
    preference_keywords str ("; "-joined), timestamp int64, num_impressions int32, and `[max_impressions]`
    impressed_items int32 (catalog rows, -1 padded), clicked / ordered bool, relevance int8 (-1 padded / unknown);
    with `context` (from `recent_context` on the same log) also recent_items `[k]` int32 and num_recent int32.
    Sessions with more impressions than `max_impressions` (default: the log's maximum) are truncated.
    """
    if max_impressions is None:
        max_impressions = max(int(log.num_impressions.max(initial=0)), 1)
    if context is not None and len(context["recent_items"]) != len(log):
        raise ValueError(f"context has {len(context['recent_items'])} rows for a log of {len(log)} sessions")
    ds = _indexed(
        len(log), shuffle_seed=shuffle_seed, num_epochs=num_epochs, batch_size=batch_size, drop_remainder=drop_remainder
    )
    ds = ds.map(_SessionElement(log, max_impressions, context))
    return ds if batch_size is None else ds.batch(batch_size, drop_remainder=drop_remainder)


@dataclasses.dataclass(frozen=True, eq=False)
class _SequenceElement:
    examples: SequenceExamples

    def __call__(self, item: tuple[int, bool]) -> dict[str, Any]:
        index, valid = item
        ex = self.examples
        return {
            "index": np.int32(index),
            "valid": np.bool_(valid),
            "user_row": ex.user_rows[index],
            "history": ex.histories[index],
            "history_length": ex.history_lengths[index],
            "target": ex.targets[index],
        }


def sequence_dataset(
    examples: SequenceExamples,
    *,
    shuffle_seed: int | None = None,
    num_epochs: int | None = 1,
    batch_size: int | None = None,
    drop_remainder: bool = False,
) -> grain.MapDataset:
    """A grain pipeline over `leave_one_out` examples: index int32, valid bool, user_row int32, history `[H]` int32
    (-1 padded), history_length int32, target int32 (leading `[batch]` axis when batched; see `query_log_dataset`
    for padding of the last batch)."""
    ds = _indexed(
        len(examples),
        shuffle_seed=shuffle_seed,
        num_epochs=num_epochs,
        batch_size=batch_size,
        drop_remainder=drop_remainder,
    )
    ds = ds.map(_SequenceElement(examples))
    return ds if batch_size is None else ds.batch(batch_size, drop_remainder=drop_remainder)
