"""Composed image retrieval evaluation: chunked top-K ranking and the FashionIQ, CIRR and CIRCO metrics.

Two layers:

* **Ranking (JAX).** `top_k_gallery` scores queries against a gallery with a jitted matmul, chunked over queries
  with `lax.map`, and keeps only the top K gallery indices per query (`lax.top_k`), so a 100k-image gallery never
  needs a `[num_queries, num_gallery]` matrix at once. A per-query exclusion hook overwrites chosen gallery entries
  (the CIRR reference, the FashionIQ `fiq_val_union` reference) with `MASKED_SCORE` before the top-k.
  `gather_scores` scores a small candidate set per query (the CIRR `img_set` members).
* **Metrics (numpy).** Pure functions of ranked id arrays (`[num_queries, K]` of gallery image ids, ints or strings)
  and ground-truth ids; they return python floats in percent, as the papers report, under flat keys
  `"<dataset or protocol>/<row>/<metric>"` that `format_table` lays out.

Protocols (spec csmcir.md section 10 and 13.1):

* FashionIQ `fiq_original` (CSMCIR, SPRC, CLIP4Cir): gallery = the ordered `split.{cat}.val.json`, reference NOT
  excluded, every target exactly once in the gallery.
* FashionIQ `fiq_val_union` (ENCODER, PAIR, HINT "VAL split"): gallery = the ordered unique union, in annotation
  order, of each triplet's reference then target; the reference is removed from its query's ranking.
  The two give incomparable numbers, so every FashionIQ key carries the protocol name.
* CIRR: rank the whole split gallery, delete the reference, Recall@{1,5,10,50}; the subset ranking keeps the
  `img_set.members` in ranked order, reference removed (6 members -> 5 candidates), Recall_subset@{1,2,3};
  "avg" = (R@5 + R_subset@1) / 2.
* CIRCO: AP@K = sum_{n<=K} P@n * rel_n / min(|GT|, K), mAP@{5,10,25,50}; Recall@K against `target_img_id` only.

Tie-breaking: `lax.top_k` returns equal scores lowest gallery index first, which is what a stable descending sort
(`np.argsort(-scores, kind="stable")`) gives; query chunking does not change it. The official PyTorch scripts use
an unstable `torch.argsort`, so results can differ from theirs only on exactly tied scores.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Written over excluded gallery entries before the top-k: large and finite (never -inf, which breaks arithmetic).
MASKED_SCORE = float(np.finfo(np.float32).min)
NO_EXCLUSION = -1  # padding value of `exclude_indices`

FIQ_ORIGINAL = "fiq_original"
FIQ_VAL_UNION = "fiq_val_union"
FIQ_PROTOCOLS = (FIQ_ORIGINAL, FIQ_VAL_UNION)
FIQ_CATEGORIES = ("dress", "shirt", "toptee")
FIQ_KS = (10, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)

CIRR_VERSION = "rc2"
CIRR_METRIC_RECALL = "recall"
CIRR_METRIC_SUBSET = "recall_subset"
CIRR_LIST_LENGTH = {CIRR_METRIC_RECALL: 50, CIRR_METRIC_SUBSET: 3}
CIRR_MAX_FILE_BYTES = 5_000_000  # the server's "Maximum 5MB" (the decimal reading, the stricter one)
CIRCO_LIST_LENGTH = 50

_MAX_LISTED_ERRORS = 10


# ----------------------------------------------------------------------------------------------------------------
# Ranking (JAX)
# ----------------------------------------------------------------------------------------------------------------


def _query_gallery_scores(query_embeddings: jax.Array, gallery_embeddings: jax.Array) -> jax.Array:
    """Float32 similarity `[chunk, num_gallery]` of `[chunk, dim]` queries with a `[num_gallery, dim]` gallery, or
    `max_t <q, g_t>` with a multi-vector `[num_gallery, tokens, dim]` gallery (SPRC/CSMCIR target tokens)."""
    if gallery_embeddings.ndim == 2:
        return jnp.einsum("qd,nd->qn", query_embeddings, gallery_embeddings, preferred_element_type=jnp.float32)
    token_scores = jnp.einsum("qd,ntd->qnt", query_embeddings, gallery_embeddings, preferred_element_type=jnp.float32)
    return token_scores.max(axis=-1)


def _mask_and_top_k(scores: jax.Array, exclude_indices: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`scores [chunk, num_gallery]`, `exclude_indices [chunk, num_excluded]` (NO_EXCLUSION = none) ->
    top-k `(scores [chunk, k] float32, indices [chunk, k] int32)` after writing MASKED_SCORE over excluded entries."""
    num_rows, num_gallery = scores.shape
    # Out-of-range columns are dropped by the scatter, so NO_EXCLUSION (-1) must not wrap around to the last column.
    columns = jnp.where(exclude_indices < 0, num_gallery, exclude_indices)
    rows = jnp.arange(num_rows)[:, None]
    scores = scores.astype(jnp.float32).at[rows, columns].set(MASKED_SCORE, mode="drop")
    top_scores, top_indices = jax.lax.top_k(scores, k)
    return top_scores, top_indices.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_embeddings_chunked(
    query_chunks: jax.Array, gallery_embeddings: jax.Array, exclude_chunks: jax.Array, k: int
) -> tuple[jax.Array, jax.Array]:
    """`query_chunks [num_chunks, chunk, dim]`, `exclude_chunks [num_chunks, chunk, num_excluded]` ->
    `(scores, indices)` each `[num_chunks, chunk, k]`; one `[chunk, num_gallery]` score block live at a time."""

    def one_chunk(chunk: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        queries, exclude = chunk
        return _mask_and_top_k(_query_gallery_scores(queries, gallery_embeddings), exclude, k)

    return jax.lax.map(one_chunk, (query_chunks, exclude_chunks))


@functools.partial(jax.jit, static_argnames=("k",))
def _top_k_scores_chunked(score_chunks: jax.Array, exclude_chunks: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`score_chunks [num_chunks, chunk, num_gallery]` -> `(scores, indices)` each `[num_chunks, chunk, k]`."""
    return jax.lax.map(lambda chunk: _mask_and_top_k(chunk[0], chunk[1], k), (score_chunks, exclude_chunks))


@jax.jit
def _gather_scores_chunked(
    query_chunks: jax.Array, gallery_embeddings: jax.Array, candidate_chunks: jax.Array
) -> jax.Array:
    """`query_chunks [num_chunks, chunk, dim]`, `candidate_chunks [num_chunks, chunk, num_candidates]` ->
    `[num_chunks, chunk, num_candidates]` float32 scores of each query against its own candidates."""

    def one_chunk(chunk: tuple[jax.Array, jax.Array]) -> jax.Array:
        queries, candidates = chunk
        candidate_embeddings = gallery_embeddings[candidates]  # [chunk, num_candidates, (tokens,) dim]
        if candidate_embeddings.ndim == 3:
            return jnp.einsum("qd,qcd->qc", queries, candidate_embeddings, preferred_element_type=jnp.float32)
        token_scores = jnp.einsum("qd,qctd->qct", queries, candidate_embeddings, preferred_element_type=jnp.float32)
        return token_scores.max(axis=-1)

    return jax.lax.map(one_chunk, (query_chunks, candidate_chunks))


def _chunk_rows(array: np.ndarray | jax.Array, chunk_size: int, pad_value: float | int) -> jax.Array:
    """`[num_rows, ...]` -> `[num_chunks, chunk_size, ...]`, padding the last chunk with `pad_value`."""
    num_rows = array.shape[0]
    num_chunks = -(-num_rows // chunk_size)
    padding = [(0, num_chunks * chunk_size - num_rows)] + [(0, 0)] * (array.ndim - 1)
    padded = jnp.pad(jnp.asarray(array), padding, constant_values=pad_value)
    return padded.reshape((num_chunks, chunk_size) + tuple(array.shape[1:]))


def _exclusion_matrix(exclude_indices: np.ndarray | None, num_queries: int, num_gallery: int) -> np.ndarray:
    """`None`, `[num_queries]` or `[num_queries, num_excluded]` -> validated int32 `[num_queries, num_excluded]`."""
    if exclude_indices is None:
        return np.full((num_queries, 1), NO_EXCLUSION, np.int32)
    exclude = np.asarray(exclude_indices)
    if exclude.ndim == 1:
        exclude = exclude[:, None]
    if exclude.ndim != 2 or exclude.shape[0] != num_queries:
        raise ValueError(
            f"exclude_indices must be [num_queries={num_queries}] or [num_queries, E]; got {exclude.shape}"
        )
    if not np.issubdtype(exclude.dtype, np.integer):
        raise ValueError(f"exclude_indices must be integers, got dtype {exclude.dtype}")
    bad = (exclude < NO_EXCLUSION) | (exclude >= num_gallery)
    if bad.any():
        raise ValueError(
            f"exclude_indices must lie in [0, {num_gallery}) or be {NO_EXCLUSION}; bad values {exclude[bad][:5]}"
        )
    return exclude.astype(np.int32)


def _check_top_k_args(k: int, num_gallery: int, num_excluded: int, query_chunk_size: int) -> None:
    if query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be >= 1, got {query_chunk_size}")
    if k < 1 or k > num_gallery - num_excluded:
        # With k > num_gallery - num_excluded an excluded entry could come back at the tail of the top-k.
        raise ValueError(
            f"k={k} must be in [1, num_gallery - num_excluded] = [1, {num_gallery - num_excluded}] "
            f"(num_gallery={num_gallery}, {num_excluded} exclusion slot(s) per query)"
        )


def top_k_gallery(
    query_embeddings: np.ndarray | jax.Array,
    gallery_embeddings: np.ndarray | jax.Array,
    k: int,
    *,
    exclude_indices: np.ndarray | None = None,
    query_chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery entries per query by inner product, chunked over queries.

    Args:
      query_embeddings: `[num_queries, dim]` (unit-normalised for cosine, as the model emits them).
      gallery_embeddings: `[num_gallery, dim]`, or `[num_gallery, tokens, dim]` scored as `max_t <q, g_t>` (spec 5.3).
      k: entries kept per query; at most `num_gallery - num_excluded`.
      exclude_indices: `[num_queries]` or `[num_queries, num_excluded]` gallery indices whose score is set to
        `MASKED_SCORE` before the top-k (CIRR: the reference); `NO_EXCLUSION` (-1) pads / means none.
      query_chunk_size: queries scored per `lax.map` step; peak score memory is about
        `query_chunk_size * num_gallery * tokens * 4` bytes.

    Returns:
      `(top_scores [num_queries, k] float32, top_indices [num_queries, k] int32)`, scores descending; equal scores
      come lowest gallery index first. Map to ids with `np.asarray(gallery_ids)[top_indices]`.
    """
    query_embeddings = jnp.asarray(query_embeddings)
    gallery_embeddings = jnp.asarray(gallery_embeddings)
    if query_embeddings.ndim != 2 or gallery_embeddings.ndim not in (2, 3):
        raise ValueError(
            f"expected query [num_queries, dim] and gallery [num_gallery, (tokens,) dim]; "
            f"got {query_embeddings.shape} and {gallery_embeddings.shape}"
        )
    if query_embeddings.shape[-1] != gallery_embeddings.shape[-1]:
        raise ValueError(f"dim mismatch: query {query_embeddings.shape}, gallery {gallery_embeddings.shape}")
    num_queries, num_gallery = query_embeddings.shape[0], gallery_embeddings.shape[0]
    exclude = _exclusion_matrix(exclude_indices, num_queries, num_gallery)
    _check_top_k_args(k, num_gallery, 0 if exclude_indices is None else exclude.shape[1], query_chunk_size)
    chunk_size = min(query_chunk_size, num_queries)
    top_scores, top_indices = _top_k_embeddings_chunked(
        _chunk_rows(query_embeddings, chunk_size, 0),
        gallery_embeddings,
        _chunk_rows(exclude, chunk_size, NO_EXCLUSION),
        k,
    )
    return (
        np.asarray(top_scores).reshape(-1, k)[:num_queries],
        np.asarray(top_indices).reshape(-1, k)[:num_queries],
    )


def top_k_from_scores(
    scores: np.ndarray | jax.Array,
    k: int,
    *,
    exclude_indices: np.ndarray | None = None,
    query_chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k_gallery` for a precomputed similarity matrix `scores [num_queries, num_gallery]`.

    Returns `(top_scores [num_queries, k] float32, top_indices [num_queries, k] int32)`; same exclusion hook,
    same tie-breaking (lowest gallery index first).
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [num_queries, num_gallery], got {scores.shape}")
    num_queries, num_gallery = scores.shape
    exclude = _exclusion_matrix(exclude_indices, num_queries, num_gallery)
    _check_top_k_args(k, num_gallery, 0 if exclude_indices is None else exclude.shape[1], query_chunk_size)
    chunk_size = min(query_chunk_size, num_queries)
    top_scores, top_indices = _top_k_scores_chunked(
        _chunk_rows(scores, chunk_size, 0), _chunk_rows(exclude, chunk_size, NO_EXCLUSION), k
    )
    return (
        np.asarray(top_scores).reshape(-1, k)[:num_queries],
        np.asarray(top_indices).reshape(-1, k)[:num_queries],
    )


def gather_scores(
    query_embeddings: np.ndarray | jax.Array,
    gallery_embeddings: np.ndarray | jax.Array,
    candidate_indices: np.ndarray,
    *,
    query_chunk_size: int = 256,
) -> np.ndarray:
    """Scores of each query against its own candidates only (CIRR: the 6 `img_set` members).

    Args:
      query_embeddings: `[num_queries, dim]`.
      gallery_embeddings: `[num_gallery, dim]` or `[num_gallery, tokens, dim]` (max over tokens).
      candidate_indices: `[num_queries, num_candidates]` gallery indices.
      query_chunk_size: queries per `lax.map` step.

    Returns:
      `[num_queries, num_candidates]` float32, equal to the matching entries of the full similarity matrix.
    """
    query_embeddings = jnp.asarray(query_embeddings)
    gallery_embeddings = jnp.asarray(gallery_embeddings)
    candidates = np.asarray(candidate_indices)
    num_queries, num_gallery = query_embeddings.shape[0], gallery_embeddings.shape[0]
    if candidates.ndim != 2 or candidates.shape[0] != num_queries:
        raise ValueError(f"candidate_indices must be [num_queries={num_queries}, C]; got {candidates.shape}")
    if not np.issubdtype(candidates.dtype, np.integer) or (candidates < 0).any() or (candidates >= num_gallery).any():
        raise ValueError(f"candidate_indices must be integers in [0, {num_gallery})")
    if query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be >= 1, got {query_chunk_size}")
    chunk_size = min(query_chunk_size, num_queries)
    scores = _gather_scores_chunked(
        _chunk_rows(query_embeddings, chunk_size, 0),
        gallery_embeddings,
        _chunk_rows(candidates.astype(np.int32), chunk_size, 0),
    )
    return np.asarray(scores).reshape(-1, candidates.shape[1])[:num_queries]


def ids_to_indices(ids: Sequence[Any] | np.ndarray, gallery_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Gallery position of each id: `ids [...]` -> int32 `[...]`; raises naming the ids absent from the gallery.

    `gallery_ids [num_gallery]` must be unique (each image once in the gallery)."""
    gallery = np.asarray(gallery_ids)
    _check_unique(gallery, "gallery_ids")
    position = {item: index for index, item in enumerate(gallery.tolist())}
    flat = np.asarray(ids).reshape(-1).tolist()
    missing = sorted({str(item) for item in flat if item not in position})
    if missing:
        raise KeyError(f"{len(missing)} id(s) not in the gallery, e.g. {missing[:_MAX_LISTED_ERRORS]}")
    return np.asarray([position[item] for item in flat], np.int32).reshape(np.shape(ids))


# ----------------------------------------------------------------------------------------------------------------
# Ranked-list utilities (numpy)
# ----------------------------------------------------------------------------------------------------------------


def _check_unique(values: np.ndarray, name: str) -> None:
    unique, counts = np.unique(values, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name} has duplicates, e.g. {unique[counts > 1][:_MAX_LISTED_ERRORS].tolist()}")


def _as_rankings(ranked_ids: Any, target_ids: Any, name: str = "ranked_ids") -> tuple[np.ndarray, np.ndarray]:
    """Validates `ranked_ids [num_queries, K]` against per-query ids `[num_queries]` (same id kind)."""
    ranked, targets = np.asarray(ranked_ids), np.asarray(target_ids)
    if ranked.ndim != 2 or targets.ndim != 1 or ranked.shape[0] != targets.shape[0] or ranked.shape[0] == 0:
        raise ValueError(
            f"expected {name} [num_queries>0, K] and ids [num_queries]; got {ranked.shape}, {targets.shape}"
        )
    if (ranked.dtype.kind in "US") != (targets.dtype.kind in "US"):
        raise TypeError(f"{name} ({ranked.dtype}) and the per-query ids ({targets.dtype}) must both be str or numeric")
    return ranked, targets


def _check_rows_unique(ranked: np.ndarray, name: str) -> None:
    """Raises if any row of `ranked [num_queries, K]` repeats an id (rankings list each gallery image once)."""
    sorted_rows = np.sort(ranked, axis=1)
    repeated_rows = np.nonzero((sorted_rows[:, 1:] == sorted_rows[:, :-1]).any(axis=1))[0]
    if repeated_rows.size:
        raise ValueError(f"{name} repeats ids within rows {repeated_rows[:_MAX_LISTED_ERRORS].tolist()}")


def _check_excluded(ranked: np.ndarray, reference_ids: np.ndarray, name: str) -> None:
    rows = np.nonzero((ranked == reference_ids[:, None]).any(axis=1))[0]
    if rows.size:
        raise ValueError(
            f"{name} still contains the reference image in rows {rows[:_MAX_LISTED_ERRORS].tolist()}: rank with "
            "exclude_indices=<reference gallery index> or call remove_reference first"
        )


def remove_reference(ranked_ids: np.ndarray, reference_ids: np.ndarray, *, require_present: bool = False) -> np.ndarray:
    """Deletes each query's reference from its ranking, as SPRC/CLIP4Cir `compute_cirr_val_metrics` do.

    `ranked_ids [num_queries, K]`, `reference_ids [num_queries]` -> `[num_queries, K - 1]`. A row whose reference
    is not among its K entries loses its last entry instead, which is still exactly the top K-1 of the
    reference-free ranking. `require_present=True` raises for such rows (used for subsets, which always contain
    the reference in CIRR).
    """
    ranked, references = _as_rankings(ranked_ids, reference_ids)
    is_reference = ranked == references[:, None]
    count = is_reference.sum(axis=1)
    if (count > 1).any():
        raise ValueError(f"reference listed twice in rows {np.nonzero(count > 1)[0][:_MAX_LISTED_ERRORS].tolist()}")
    if require_present and (count == 0).any():
        raise ValueError(f"reference missing from rows {np.nonzero(count == 0)[0][:_MAX_LISTED_ERRORS].tolist()}")
    drop = is_reference.copy()
    drop[count == 0, -1] = True
    return ranked[~drop].reshape(ranked.shape[0], ranked.shape[1] - 1)


def rank_subset(member_ids: np.ndarray, member_scores: np.ndarray, reference_ids: np.ndarray) -> np.ndarray:
    """CIRR subset ranking from the members' scores: sort descending, delete the reference.

    `member_ids [num_queries, M]` (M=6 in CIRR), `member_scores [num_queries, M]` (e.g. from `gather_scores`),
    `reference_ids [num_queries]` -> `[num_queries, M - 1]` ranked candidates. Equal scores keep member order, so
    pass members in gallery-index order to match `filter_ranking_to_subset` on a full ranking even under ties.
    """
    members, references = _as_rankings(member_ids, reference_ids, "member_ids")
    scores = np.asarray(member_scores)
    if scores.shape != members.shape:
        raise ValueError(f"member_scores {scores.shape} must match member_ids {members.shape}")
    _check_rows_unique(members, "member_ids")
    order = np.argsort(-scores, axis=1, kind="stable")
    return remove_reference(np.take_along_axis(members, order, axis=1), references, require_present=True)


def filter_ranking_to_subset(ranked_ids: np.ndarray, member_ids: np.ndarray, reference_ids: np.ndarray) -> np.ndarray:
    """The official subset procedure on a FULL ranking: keep the ranked items that are `img_set` members.

    `ranked_ids [num_queries, N or N-1]` ranks the whole gallery (with or without the reference),
    `member_ids [num_queries, M]`, `reference_ids [num_queries]` -> `[num_queries, M - 1]` (reference removed).
    Raises if a row does not contain every non-reference member (i.e. the ranking was truncated).
    """
    ranked, references = _as_rankings(ranked_ids, reference_ids)
    members = np.asarray(member_ids)
    if members.ndim != 2 or members.shape[0] != ranked.shape[0]:
        raise ValueError(f"member_ids must be [num_queries={ranked.shape[0]}, M]; got {members.shape}")
    _check_rows_unique(members, "member_ids")
    missing_reference = np.nonzero(~(members == references[:, None]).any(axis=1))[0]
    if missing_reference.size:
        raise ValueError(
            f"reference is not an img_set member in rows {missing_reference[:_MAX_LISTED_ERRORS].tolist()}"
        )
    keep = (ranked[:, :, None] == members[:, None, :]).any(axis=2) & (ranked != references[:, None])
    short_rows = np.nonzero(keep.sum(axis=1) != members.shape[1] - 1)[0]
    if short_rows.size:
        raise ValueError(
            f"rows {short_rows[:_MAX_LISTED_ERRORS].tolist()} do not rank every img_set member: pass a full ranking "
            "or use rank_subset with gather_scores"
        )
    return ranked[keep].reshape(ranked.shape[0], members.shape[1] - 1)


# ----------------------------------------------------------------------------------------------------------------
# Metrics (numpy in, python floats out)
# ----------------------------------------------------------------------------------------------------------------


def recall_at_k(ranked_ids: np.ndarray, target_ids: np.ndarray, ks: Sequence[int] = CIRR_KS) -> dict[int, float]:
    """Recall@K in percent for single-target retrieval.

    Recall@K = 100 * (number of queries whose target is among the first K ranked ids) / num_queries (every query
    counts in the denominator, as in CLIP4Cir/SPRC).

    Args:
      ranked_ids: `[num_queries, K_max]` gallery ids, best first, no repeats within a row.
      target_ids: `[num_queries]` the single ground-truth id per query.
      ks: cut-offs, each in `[1, K_max]`.

    Returns:
      `{k: recall_percent}`.
    """
    ranked, targets = _as_rankings(ranked_ids, target_ids)
    bad_ks = [k for k in ks if not 1 <= k <= ranked.shape[1]]
    if bad_ks:
        raise ValueError(f"cut-offs {bad_ks} need rankings of at least that length; ranked_ids has {ranked.shape[1]}")
    _check_rows_unique(ranked, "ranked_ids")
    hits = ranked == targets[:, None]  # [num_queries, K_max], at most one True per row
    return {int(k): float(hits[:, :k].any(axis=1).mean() * 100.0) for k in ks}


# ---- FashionIQ ----


def _check_fiq_protocol(protocol: str) -> None:
    if protocol not in FIQ_PROTOCOLS:
        raise ValueError(f"unknown FashionIQ protocol {protocol!r}; expected one of {FIQ_PROTOCOLS}")


def fashioniq_gallery(
    protocol: str,
    reference_ids: Sequence[str],
    target_ids: Sequence[str],
    split_image_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """The retrieval gallery of one FashionIQ category under `protocol`, as `[num_gallery]` ids.

    * `fiq_original`: `split_image_ids` (the ordered `split.{cat}.val.json`) unchanged. Checks that the ids are
      unique and that every target occurs in it (exactly once), as SPRC asserts.
    * `fiq_val_union`: the ordered unique union, in annotation order, of each triplet's reference then target
      (first occurrence wins; `split_image_ids` is ignored).

    `reference_ids [num_queries]` are the triplets' `candidate` fields, `target_ids [num_queries]` their `target`s.
    """
    _check_fiq_protocol(protocol)
    if len(reference_ids) != len(target_ids):
        raise ValueError(f"{len(reference_ids)} references but {len(target_ids)} targets")
    if protocol == FIQ_VAL_UNION:
        pairs = [image for pair in zip(reference_ids, target_ids, strict=True) for image in pair]
        return np.asarray(list(dict.fromkeys(pairs)))
    if split_image_ids is None:
        raise ValueError(f"{FIQ_ORIGINAL} needs split_image_ids (the category's split.<cat>.val.json)")
    gallery = np.asarray(split_image_ids)
    _check_unique(gallery, "split_image_ids")
    missing = sorted(set(target_ids) - set(gallery.tolist()))
    if missing:
        raise ValueError(
            f"{len(missing)} target(s) are not in the {FIQ_ORIGINAL} gallery, e.g. {missing[:_MAX_LISTED_ERRORS]}"
        )
    return gallery


def fashioniq_exclude_indices(
    protocol: str, gallery_ids: Sequence[str] | np.ndarray, reference_ids: Sequence[str]
) -> np.ndarray | None:
    """`exclude_indices` for `top_k_gallery` under `protocol`: `None` for `fiq_original` (reference kept),
    the reference's gallery index `[num_queries]` for `fiq_val_union` (reference removed)."""
    _check_fiq_protocol(protocol)
    if protocol == FIQ_ORIGINAL:
        return None
    return ids_to_indices(np.asarray(reference_ids), gallery_ids)


def fashioniq_category_recalls(
    ranked_ids: np.ndarray,
    target_ids: np.ndarray,
    reference_ids: np.ndarray,
    protocol: str,
    ks: Sequence[int] = FIQ_KS,
) -> dict[int, float]:
    """FashionIQ Recall@{10, 50} (percent) of one category under `protocol`.

    Args:
      ranked_ids: `[num_queries, >=50]` gallery ids, best first, over `fashioniq_gallery(protocol, ...)`.
        `fiq_original`: the reference may appear (not excluded). `fiq_val_union`: it must not (rank with
        `fashioniq_exclude_indices` or apply `remove_reference`); checked.
      target_ids: `[num_queries]`.
      reference_ids: `[num_queries]` the triplets' `candidate` images.
      protocol: `fiq_original` or `fiq_val_union`.

    A `fiq_val_union` triplet whose reference equals its target can never be retrieved and counts as a miss.
    """
    _check_fiq_protocol(protocol)
    ranked, references = _as_rankings(ranked_ids, reference_ids)
    if protocol == FIQ_VAL_UNION:
        _check_excluded(ranked, references, "ranked_ids")
    return recall_at_k(ranked, target_ids, ks)


def fashioniq_summary(per_category: Mapping[str, Mapping[int, float]], protocol: str) -> dict[str, float]:
    """Per-category and averaged FashionIQ numbers under protocol-named keys.

    Args:
      per_category: `{category: {10: R@10, 50: R@50}}` from `fashioniq_category_recalls` (usually dress, shirt,
        toptee; the averages run over the categories given).
      protocol: recorded as the key prefix, because the two protocols' numbers are not comparable.

    Returns:
      `{f"{protocol}/{cat}/R@10", ".../R@50", ".../mean"}` per category, where mean = (R@10 + R@50) / 2, and
      `f"{protocol}/average/R@10"`, `".../R@50"` (means over categories) and `f"{protocol}/average/mean"` =
      (average R@10 + average R@50) / 2, the single number the papers report.
    """
    _check_fiq_protocol(protocol)
    if not per_category:
        raise ValueError("per_category is empty")
    results: dict[str, float] = {}
    for category, recalls in per_category.items():
        if category == "average" or any(k not in recalls for k in FIQ_KS):
            raise ValueError(f"category {category!r} needs recalls at {FIQ_KS}, got keys {sorted(recalls)}")
        for k in FIQ_KS:
            results[f"{protocol}/{category}/R@{k}"] = float(recalls[k])
        results[f"{protocol}/{category}/mean"] = float(np.mean([recalls[k] for k in FIQ_KS]))
    for k in FIQ_KS:
        results[f"{protocol}/average/R@{k}"] = float(np.mean([recalls[k] for recalls in per_category.values()]))
    results[f"{protocol}/average/mean"] = float(np.mean([results[f"{protocol}/average/R@{k}"] for k in FIQ_KS]))
    return results


# ---- CIRR ----


def cirr_metrics(
    ranked_ids: np.ndarray,
    target_ids: np.ndarray,
    reference_ids: np.ndarray,
    subset_ranked_ids: np.ndarray,
) -> dict[str, float]:
    """CIRR validation metrics (percent), after SPRC/CLIP4Cir `compute_cirr_val_metrics`.

    Args:
      ranked_ids: `[num_queries, >=50]` ids over the WHOLE split gallery with the reference already removed
        (`top_k_gallery(..., exclude_indices=reference_index)` or `remove_reference`); checked.
      target_ids: `[num_queries]` the `target_hard` images (single target; denominator = num_queries).
      reference_ids: `[num_queries]`.
      subset_ranked_ids: `[num_queries, >=3]` the `img_set.members` in ranked order without the reference
        (5 candidates in CIRR; `rank_subset` or `filter_ranking_to_subset`); each row must contain the target
        exactly once, as the official script asserts.

    Returns:
      `{"cirr/R@1", "cirr/R@5", "cirr/R@10", "cirr/R@50", "cirr/R_subset@1", "cirr/R_subset@2", "cirr/R_subset@3",
      "cirr/avg"}` with avg = (R@5 + R_subset@1) / 2.
    """
    ranked, references = _as_rankings(ranked_ids, reference_ids)
    subset, targets = _as_rankings(subset_ranked_ids, target_ids, "subset_ranked_ids")
    if subset.shape[0] != ranked.shape[0]:
        raise ValueError(f"subset_ranked_ids has {subset.shape[0]} rows, ranked_ids {ranked.shape[0]}")
    _check_excluded(ranked, references, "ranked_ids")
    _check_excluded(subset, references, "subset_ranked_ids")
    no_target = np.nonzero(~(subset == targets[:, None]).any(axis=1))[0]
    if no_target.size:
        raise ValueError(f"the target is not in the subset ranking of rows {no_target[:_MAX_LISTED_ERRORS].tolist()}")
    recalls = recall_at_k(ranked, targets, CIRR_KS)
    subset_recalls = recall_at_k(subset, targets, CIRR_SUBSET_KS)
    results = {f"cirr/R@{k}": value for k, value in recalls.items()}
    results.update({f"cirr/R_subset@{k}": value for k, value in subset_recalls.items()})
    results["cirr/avg"] = (recalls[5] + subset_recalls[1]) / 2.0
    return results


# ---- CIRCO ----


def _ground_truth_sets(gt_ids: Sequence[Sequence[Any]] | np.ndarray, num_queries: int, pad_id: Any) -> list[list]:
    if len(gt_ids) != num_queries:
        raise ValueError(f"gt_ids has {len(gt_ids)} rows for {num_queries} queries")
    sets = []
    for row, ids in enumerate(gt_ids):
        ids = [item for item in np.asarray(ids).reshape(-1).tolist() if pad_id is None or item != pad_id]
        if not ids:
            raise ValueError(f"query row {row} has no ground truth")
        if len(set(ids)) != len(ids):
            raise ValueError(f"query row {row} lists a ground truth twice: {ids}")
        sets.append(ids)
    return sets


def circo_average_precision(
    ranked_ids: np.ndarray,
    gt_ids: Sequence[Sequence[Any]] | np.ndarray,
    ks: Sequence[int] = CIRCO_KS,
    *,
    pad_id: Any = None,
) -> np.ndarray:
    """Per-query AP@K with multiple ground truths, exactly as CIRCO's `src/evaluation.py`.

    With rel_n = 1 if the n-th prediction is a ground truth and P@n = (hits in the first n) / n:
    `AP@K = sum_{n<=K} P@n * rel_n / min(|GT|, K)`.

    Args:
      ranked_ids: `[num_queries, >=max(ks)]` predictions, best first, unique within a row (checked).
      gt_ids: per query the `gt_img_ids` (ragged lists, or a padded `[num_queries, G]` array with `pad_id`).
      ks: cut-offs.
      pad_id: padding value to drop from `gt_ids` rows (SPRC pads to 23), or None.

    Returns:
      `[num_queries, len(ks)]` float64 in [0, 1].
    """
    ranked = np.asarray(ranked_ids)
    if ranked.ndim != 2 or ranked.shape[0] == 0:
        raise ValueError(f"ranked_ids must be [num_queries>0, K], got {ranked.shape}")
    bad_ks = [k for k in ks if not 1 <= k <= ranked.shape[1]]
    if bad_ks:
        raise ValueError(f"cut-offs {bad_ks} need rankings of at least that length; ranked_ids has {ranked.shape[1]}")
    _check_rows_unique(ranked, "ranked_ids")
    ground_truths = _ground_truth_sets(gt_ids, ranked.shape[0], pad_id)
    positions = np.arange(1, ranked.shape[1] + 1)
    average_precisions = np.zeros((ranked.shape[0], len(ks)))
    for row, (predictions, ground_truth) in enumerate(zip(ranked, ground_truths, strict=True)):
        relevant = np.isin(predictions, np.asarray(ground_truth))  # rel_n
        precision_at_hits = np.cumsum(relevant) * relevant / positions  # P@n * rel_n
        for column, k in enumerate(ks):
            average_precisions[row, column] = precision_at_hits[:k].sum() / min(len(ground_truth), k)
    return average_precisions


def circo_metrics(
    ranked_ids: np.ndarray,
    gt_ids: Sequence[Sequence[Any]] | np.ndarray,
    target_ids: np.ndarray | None = None,
    ks: Sequence[int] = CIRCO_KS,
    *,
    pad_id: Any = None,
) -> dict[str, float]:
    """CIRCO mAP@K (percent) and, if `target_ids` is given, Recall@K against `target_img_id` only.

    Args:
      ranked_ids: `[num_queries, >=max(ks)]` unique predictions (the official files hold the top 50).
      gt_ids: per query `gt_img_ids` (see `circo_average_precision`).
      target_ids: `[num_queries]` `target_img_id` (= `gt_img_ids[0]`), or None to skip the recalls.

    Returns:
      `{"circo/mAP@5", ..., "circo/mAP@50"}` (+ `"circo/R@5"`, ... when `target_ids` is given).
    """
    average_precisions = circo_average_precision(ranked_ids, gt_ids, ks, pad_id=pad_id)
    results = {f"circo/mAP@{k}": float(average_precisions[:, i].mean() * 100.0) for i, k in enumerate(ks)}
    if target_ids is not None:
        results.update({f"circo/R@{k}": value for k, value in recall_at_k(ranked_ids, target_ids, ks).items()})
    return results


# ----------------------------------------------------------------------------------------------------------------
# Test-server submissions
# ----------------------------------------------------------------------------------------------------------------


def validate_cirr_submission(
    submission: Mapping[str, Any],
    metric: str,
    *,
    expected_pair_ids: Iterable[int | str] | None = None,
    reference_ids: Mapping[str, str] | None = None,
    member_ids: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Checks one CIRR server file (spec 10, CIRR `Test-split_server.md`); raises ValueError listing the problems.

    Format: `{"version": "rc2", "metric": "recall" | "recall_subset", "<pairid>": [image names], ...}` with exactly
    50 (recall) or 3 (recall_subset) distinct names per pair id.

    Args:
      submission: the loaded dict.
      metric: the expected `"metric"` value.
      expected_pair_ids: if given, the pair ids must be exactly these (all test1 queries).
      reference_ids: `{pairid: reference name}`; if given, no list may contain its reference.
      member_ids: `{pairid: img_set members}`; if given, recall_subset lists must be drawn from the members.
    """
    if metric not in CIRR_LIST_LENGTH:
        raise ValueError(f"metric must be one of {sorted(CIRR_LIST_LENGTH)}, got {metric!r}")
    length = CIRR_LIST_LENGTH[metric]
    errors: list[str] = []
    if submission.get("version") != CIRR_VERSION:
        errors.append(f'"version" must be "{CIRR_VERSION}", got {submission.get("version")!r}')
    if submission.get("metric") != metric:
        errors.append(f'"metric" must be "{metric}", got {submission.get("metric")!r}')
    pair_ids = [key for key in submission if key not in ("version", "metric")]
    if not pair_ids:
        errors.append("no predictions")
    for pair_id in pair_ids:
        predictions = submission[pair_id]
        if not (isinstance(pair_id, str) and pair_id.isdigit() and str(int(pair_id)) == pair_id):
            errors.append(f"key {pair_id!r} is not a pair id (a decimal integer string)")
        if not isinstance(predictions, list) or not all(isinstance(name, str) for name in predictions):
            errors.append(f"pair {pair_id}: predictions must be a list of image-name strings")
            continue
        if len(predictions) != length:
            errors.append(f"pair {pair_id}: {len(predictions)} predictions, {metric} needs exactly {length}")
        if len(set(predictions)) != len(predictions):
            errors.append(f"pair {pair_id}: repeated predictions")
        if reference_ids is not None and reference_ids.get(pair_id) in predictions:
            errors.append(f"pair {pair_id}: the reference {reference_ids[pair_id]!r} is not excluded")
        if member_ids is not None and metric == CIRR_METRIC_SUBSET:
            allowed = set(member_ids.get(pair_id, ()))
            outside = [name for name in predictions if name not in allowed]
            if outside:
                errors.append(f"pair {pair_id}: {outside} are not img_set members")
    if expected_pair_ids is not None:
        expected = {str(int(pair_id)) for pair_id in expected_pair_ids}
        missing, extra = sorted(expected - set(pair_ids)), sorted(set(pair_ids) - expected)
        if missing:
            errors.append(f"{len(missing)} pair id(s) missing, e.g. {missing[:_MAX_LISTED_ERRORS]}")
        if extra:
            errors.append(f"{len(extra)} unexpected pair id(s), e.g. {extra[:_MAX_LISTED_ERRORS]}")
    if errors:
        shown = "\n  ".join(errors[:_MAX_LISTED_ERRORS])
        more = f"\n  ... and {len(errors) - _MAX_LISTED_ERRORS} more" if len(errors) > _MAX_LISTED_ERRORS else ""
        raise ValueError(f"invalid CIRR {metric} submission:\n  {shown}{more}")


def cirr_submission_dicts(
    pair_ids: Sequence[int] | np.ndarray,
    ranked_ids: np.ndarray,
    subset_ranked_ids: np.ndarray,
    reference_ids: np.ndarray,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two CIRR test-server dicts, built after reference removal (as SPRC's `cirr_test_submission.py`).

    Args:
      pair_ids: `[num_queries]` the `pairid`s of `cap.rc2.test1.json`.
      ranked_ids: `[num_queries, >=50]` image names over the whole test1 gallery, reference excluded.
      subset_ranked_ids: `[num_queries, >=3]` img_set members in ranked order, reference excluded.
      reference_ids: `[num_queries]` reference names (to check the exclusion).

    Returns:
      `(recall, recall_subset)`: `{"version": "rc2", "metric": "recall", "<pairid>": [top-50 names]}` and the same
      with `"metric": "recall_subset"` and the top 3. Both are validated.
    """
    ranked, references = _as_rankings(ranked_ids, reference_ids)
    subset = np.asarray(subset_ranked_ids)
    pair_keys = [str(int(pair_id)) for pair_id in np.asarray(pair_ids).tolist()]
    if len(pair_keys) != ranked.shape[0] or subset.shape[:1] != ranked.shape[:1]:
        raise ValueError(f"{len(pair_keys)} pair ids, {ranked.shape[0]} rankings, {subset.shape[0]} subset rankings")
    if len(set(pair_keys)) != len(pair_keys):
        raise ValueError("pair_ids has duplicates")
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": CIRR_METRIC_RECALL}
    recall_subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": CIRR_METRIC_SUBSET}
    recall_length, subset_length = CIRR_LIST_LENGTH[CIRR_METRIC_RECALL], CIRR_LIST_LENGTH[CIRR_METRIC_SUBSET]
    for key, row, subset_row in zip(pair_keys, ranked, subset, strict=True):
        recall[key] = [str(name) for name in row[:recall_length]]
        recall_subset[key] = [str(name) for name in subset_row[:subset_length]]
    reference_by_pair = dict(zip(pair_keys, (str(name) for name in references), strict=True))
    validate_cirr_submission(recall, CIRR_METRIC_RECALL, expected_pair_ids=pair_keys, reference_ids=reference_by_pair)
    validate_cirr_submission(
        recall_subset, CIRR_METRIC_SUBSET, expected_pair_ids=pair_keys, reference_ids=reference_by_pair
    )
    return recall, recall_subset


def _dump_json(payload: Mapping[str, Any], path: str, max_bytes: int | None = None) -> None:
    text = json.dumps(payload, sort_keys=True)
    if max_bytes is not None and len(text.encode("utf-8")) > max_bytes:
        raise ValueError(f"{path} would be {len(text.encode('utf-8'))} bytes, over the server's limit of {max_bytes}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_cirr_submission(
    out_dir: str, name: str, recall: Mapping[str, Any], recall_subset: Mapping[str, Any]
) -> tuple[str, str]:
    """Validates and writes `recall_submission_<name>.json` and `recall_subset_submission_<name>.json` (SPRC's
    names) into `out_dir`; each must stay under the server's 5 MB. Returns the two paths."""
    validate_cirr_submission(recall, CIRR_METRIC_RECALL)
    validate_cirr_submission(recall_subset, CIRR_METRIC_SUBSET)
    if set(recall) != set(recall_subset):
        raise ValueError("the recall and recall_subset submissions cover different pair ids")
    os.makedirs(out_dir, exist_ok=True)
    recall_path = os.path.join(out_dir, f"recall_submission_{name}.json")
    subset_path = os.path.join(out_dir, f"recall_subset_submission_{name}.json")
    _dump_json(recall, recall_path, CIRR_MAX_FILE_BYTES)
    _dump_json(recall_subset, subset_path, CIRR_MAX_FILE_BYTES)
    return recall_path, subset_path


def write_circo_submission(path: str, query_ids: Sequence[int] | np.ndarray, ranked_ids: np.ndarray) -> str:
    """Writes the CIRCO server file `{"<query id>": [top-50 COCO image ids]}` (all 800 test queries).

    `query_ids [num_queries]`, `ranked_ids [num_queries, >=50]` integer COCO ids; the top 50 of each row are
    written and must be unique. Returns `path`.
    """
    ranked = np.asarray(ranked_ids)
    keys = [str(int(query_id)) for query_id in np.asarray(query_ids).tolist()]
    if ranked.ndim != 2 or ranked.shape[0] != len(keys) or ranked.shape[1] < CIRCO_LIST_LENGTH:
        raise ValueError(f"ranked_ids must be [{len(keys)}, >={CIRCO_LIST_LENGTH}], got {ranked.shape}")
    if not np.issubdtype(ranked.dtype, np.integer):
        raise TypeError(f"CIRCO predictions are integer COCO ids, got dtype {ranked.dtype}")
    if len(set(keys)) != len(keys):
        raise ValueError("query_ids has duplicates")
    top = ranked[:, :CIRCO_LIST_LENGTH]
    _check_rows_unique(top, "ranked_ids[:, :50]")
    _dump_json({key: row.tolist() for key, row in zip(keys, top, strict=True)}, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _flatten(results: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name))
        else:
            flat[name] = value
    return flat


def _format_cell(value: Any) -> str:
    if isinstance(value, bool | str) or value is None:
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return str(value)


def format_table(results: Mapping[str, Any]) -> str:
    """Markdown tables of a results dict.

    Keys are split on "/" as `<table>/<row...>/<column>` (nested dicts are flattened the same way), e.g.
    `fiq_original/dress/R@10` -> table `fiq_original`, row `dress`, column `R@10`; `cirr/R@5` -> table `cirr`, one
    row named `cirr`; keys without "/" go to a `results` table. Floats print with 2 decimals, tables, rows and
    columns keep first-seen order, and missing cells are blank.
    """
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in _flatten(results).items():
        parts = key.split("/")
        table = parts[0] if len(parts) > 1 else "results"
        row = "/".join(parts[1:-1]) or table
        tables.setdefault(table, {}).setdefault(row, {})[parts[-1]] = value
    blocks = []
    for table, rows in tables.items():
        columns = list(dict.fromkeys(column for cells in rows.values() for column in cells))
        lines = [f"| {table} | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
        for row, cells in rows.items():
            lines.append(
                f"| {row} | " + " | ".join(_format_cell(cells[c]) if c in cells else "" for c in columns) + " |"
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
