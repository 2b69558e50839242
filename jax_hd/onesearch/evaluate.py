"""OneSearch offline evaluation (spec onesearch.md §1.9, §5): HR@K, MRR@K, NDCG@K, valid-ID rate, slices.

Definitions (item level; the paper's exact ones are UNKNOWN, these are the standard ones):
* a ranking is `[n, K]` item ids (-1 padding), best first; the rank of the target is its 1-based position, 0 when
  absent;
* HR@K = mean 1[0 < rank <= K]; MRR@K = mean 1/rank (0 beyond K); NDCG@K (one relevant item) = mean
  1/log2(rank + 1) (0 beyond K);
* generated SIDs map to items through the collision table (`semantic_ids.collision_table`, items of a colliding
  leaf ordered by popularity, OneRetrieval's option): beams in score order, each contributing its leaf's items,
  duplicates dropped, cut at K;
* valid-ID rate: fraction of generated SIDs (unconstrained decoding) that are the SID of some item.
TIGER protocol (`tiger_leave_one_out`): per user the last item is the test target, the history the at most 20
items before it (`catalog.leave_one_out`); HR@{5,10} and NDCG@{5,10}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jax_hd.data import catalog as catalog_lib
from jax_hd.onesearch import semantic_ids


def target_ranks(rankings: Any, targets: Any) -> np.ndarray:
    """1-based rank of `targets [n]` in `rankings [n, K]` (0 when absent). `[n]` int64."""
    rankings = np.asarray(rankings)
    targets = np.asarray(targets)
    if rankings.ndim != 2 or rankings.shape[0] != targets.shape[0]:
        raise ValueError(f"rankings {rankings.shape} must be [n, K] for {targets.shape[0]} targets")
    hit = rankings == targets[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0).astype(np.int64)


def hit_rate(ranks: Any, k: int) -> float:
    ranks = np.asarray(ranks)
    return float(np.mean((ranks > 0) & (ranks <= k))) if ranks.size else float("nan")


def mrr(ranks: Any, k: int) -> float:
    ranks = np.asarray(ranks, np.float64)
    if not ranks.size:
        return float("nan")
    return float(np.mean(np.where((ranks > 0) & (ranks <= k), 1.0 / np.maximum(ranks, 1), 0.0)))


def ndcg(ranks: Any, k: int) -> float:
    ranks = np.asarray(ranks, np.float64)
    gain = np.where((ranks > 0) & (ranks <= k), 1.0 / np.log2(np.maximum(ranks, 1) + 1.0), 0.0)
    return float(np.mean(gain)) if ranks.size else float("nan")


def ranking_metrics(
    rankings: Any,
    targets: Any,
    ks: Sequence[int] = (10,),
    slices: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """`{'hr@k', 'mrr@k', 'ndcg@k', 'num': n, '<slice>': {... same on the slice's rows ..., 'num'}}`."""
    ranks = target_ranks(rankings, targets)

    def block(r: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"num": int(r.size)}
        for k in ks:
            out.update({f"hr@{k}": hit_rate(r, k), f"mrr@{k}": mrr(r, k), f"ndcg@{k}": ndcg(r, k)})
        return out

    result = block(ranks)
    for name, mask in (slices or {}).items():
        mask = np.asarray(mask, bool)
        if mask.shape != ranks.shape:
            raise ValueError(f"slice {name!r} has shape {mask.shape}, expected {ranks.shape}")
        result[name] = block(ranks[mask])
    return result


def _leaf_index(collisions: semantic_ids.CollisionTable) -> dict[bytes, int]:
    codes = np.ascontiguousarray(collisions.leaf_codes.astype(np.int64))
    return {row.tobytes(): i for i, row in enumerate(codes)}


def items_from_sids(codes: Any, collisions: semantic_ids.CollisionTable, k: int) -> np.ndarray:
    """Ranked items `[n, k]` (-1 padded) from generated SIDs `codes [n, beams, L]` (best beam first; rows with a -1
    code or no matching item contribute nothing)."""
    codes = np.asarray(codes, np.int64)
    if codes.ndim != 3 or codes.shape[2] != collisions.leaf_codes.shape[1]:
        raise ValueError(f"codes must be [n, beams, {collisions.leaf_codes.shape[1]}], got {codes.shape}")
    index = _leaf_index(collisions)
    out = np.full((codes.shape[0], k), -1, np.int64)
    for i in range(codes.shape[0]):
        ranked: list[int] = []
        seen: set[int] = set()
        for sid in codes[i]:
            leaf = index.get(np.ascontiguousarray(sid).tobytes()) if (sid >= 0).all() else None
            if leaf is None:
                continue
            for item in collisions.items_of(leaf).tolist():
                if item not in seen:
                    seen.add(item)
                    ranked.append(item)
            if len(ranked) >= k:
                break
        out[i, : min(k, len(ranked))] = ranked[:k]
    return out


def valid_id_rate(codes: Any, collisions: semantic_ids.CollisionTable) -> float:
    """Fraction of generated SIDs `codes [..., L]` that belong to an item."""
    codes = np.asarray(codes, np.int64).reshape(-1, collisions.leaf_codes.shape[1])
    if not len(codes):
        return float("nan")
    index = _leaf_index(collisions)
    return float(np.mean([(row >= 0).all() and np.ascontiguousarray(row).tobytes() in index for row in codes]))


def popularity_rankings(per_query_items: Sequence[Sequence[int]], item_clicks: Any, k: int) -> np.ndarray:
    """Popularity baseline `[n, k]`: the items most clicked for each request's query (given, best first), then
    the globally most clicked items."""
    global_top = np.argsort(-np.asarray(item_clicks), kind="stable")[: 2 * k].tolist()
    out = np.full((len(per_query_items), k), -1, np.int64)
    for i, items in enumerate(per_query_items):
        ranked = list(dict.fromkeys(list(items) + global_top))[:k]
        out[i, : len(ranked)] = ranked
    return out


def tiger_leave_one_out(
    history: catalog_lib.UserHistory,
    rank_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
    *,
    ks: Sequence[int] = (5, 10),
    max_history: int = 20,
    max_users: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """TIGER protocol on e.g. Amazon 5-core users: `rank_fn(histories [n, H] (-1 padded, oldest first),
    lengths [n]) -> rankings [n, K]` is scored on each user's last item (HR@k, NDCG@k, MRR@k)."""
    test = catalog_lib.leave_one_out(history, max_history=max_history)["test"]
    rows = np.arange(len(test))
    if max_users is not None and len(rows) > max_users:
        rows = np.sort(np.random.default_rng(seed).permutation(len(test))[:max_users])
    if not len(rows):
        raise ValueError("no user has the 3 events the leave-one-out protocol needs")
    rankings = np.asarray(rank_fn(test.histories[rows], test.history_lengths[rows]))
    return ranking_metrics(rankings, test.targets[rows], ks)
