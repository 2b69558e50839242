"""OneSearch KHQE semantic IDs: keyword-enhanced embeddings -> residual k-means (RQ) levels + an OPQ tail.

A semantic ID (SID) is `codes [num_items, num_levels]` int32 of *local* codes per level:
`len(rq_sizes)` residual k-means levels (paper: 4096, 1024, 512), then `opq_subspaces` product-quantizer codes
(paper: 2 x 256) of the final residual after a learnt rotation. Level l's token id in a shared vocabulary is
`level_offsets[l] + code`, so the OPQ codes share one namespace with the second one offset by +256, as in the
authors' `<a_3558><b_477><c_161><d_191><d_324>` (`sid_strings`). Queries and items are quantised with the
same codebooks (fit on their union).

Components (spec onesearch.md §1.3, §1.4, §5):

* `kmeans`: jitted Lloyd iterations, k-means++ init on a row sample, squared distances computed `chunk` rows
  at a time (memory O(chunk x k)), rows optionally sharded over every device of a mesh (`shard_map`; partial
  sums are `psum`-ed). Empty clusters are re-seeded at the points farthest from their centroid (the j-th
  empty cluster takes the j-th farthest point), so they are non-empty after the next assignment whenever
  there are enough distinct points. faiss (the authors' tool) splits the largest cluster instead.
* last RQ level modes (`LAST_LEVEL_MODES`; which one the paper's "l3 balanced" is: CONFLICT, see config):
  "global" (plain k-means), "per_parent_l2" / "per_parent_l1l2" (the released code: a separate k-means per
  level-2 parent / per (level-1, level-2) parent; parents with <= k points give every point its own
  centroid; emitted codes are local ids), "size_balanced" (OneRec-style balanced k-means: clusters take the
  ceil(N/k) nearest unassigned points in turn).
* OPQ on the last residual: centre (faiss `IVF1` = one coarse centroid, the mean), then alternate PQ
  k-means in the rotated space and orthogonal-Procrustes rotation updates (SVD), starting from OPQ's
  eigenvalue allocation (faiss starts from a random rotation).
* keyword enhancement: `e' = normalize((1 - w) e + w mean_j e_kw_j)`, w = 0.5; texts without keywords keep
  their raw embedding (the authors' `keyword_enhance.py`).
* `collision_table` (leaf -> items CSR), optional dedup digit (GRID/TIGER), `codebook_stats` (CUR/ICR).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LAST_LEVEL_MODES = ("global", "per_parent_l2", "per_parent_l1l2", "size_balanced")
_HIGHEST = jax.lax.Precision.HIGHEST
_DISTANCE_BUDGET = 1 << 22  # elements of one chunk's distance matrix (16 MB float32)


@dataclasses.dataclass(frozen=True)
class SemanticIDConfig:
    """How SIDs are built. Facts from the spec are defaults; UNKNOWN/CONFLICT items are documented fields.

    rq_sizes: codebook width per residual k-means level (paper ablation best: 4096, 1024, 512).
    last_level_mode: one of `LAST_LEVEL_MODES` for the last RQ level. CONFLICT: the paper's "+l3 balanced"
      is either the released code's per-parent sub-codebooks ("per_parent_l2" = its type 2, default here;
      "per_parent_l1l2" = type 1) or OneRec's size-constrained balanced k-means ("size_balanced").
    use_opq: append the OPQ tail (RQ-OPQ); False gives plain RQ-Kmeans codes.
    opq_subspaces, opq_codebook_size: 2 x 256 (faiss `OPQ2,IVF1,PQ2x8`).
    opq_iters: rotation/PQ alternations (faiss default 25 for OPQMatrix; spec suggests 5-10).
    kmeans_iters: Lloyd iterations per RQ level (authors: 25); opq_kmeans_iters: per PQ round (warm-started).
    max_points_per_centroid: train each k-means on at most k x this many sampled rows, then assign all rows
      (faiss `max_points_per_centroid`, authors: 10000).
    init_sample_per_centroid: k-means++ seeds from at most k x this many sampled rows.
    normalize_residuals: L2-normalise residuals after each global RQ level (authors' flag, default off;
      reconstruction errors then no longer measure x - x_hat).
    keyword_weight: w in `normalize((1 - w) e + w mean(e_kw))` (paper: 1/2); keyword_normalize: the final
      L2 normalisation of the released code.
    dedup_digit: `collision_table` users may append a disambiguation digit (`add_dedup_digit`); V1 has none
      (UNKNOWN how it maps a SID to one of several items), so default False.
    max_occupancy: fit refuses catalogues with more than `max_occupancy x prod(level sizes)` rows (with 1.0:
      more rows than distinct SIDs, so collisions are certain).
    batch_size: rows per distance chunk (None: `_DISTANCE_BUDGET // k`).
    seed: all randomness (k-means++ seeds, row samples, per-parent inits).
    """

    rq_sizes: tuple[int, ...] = (256, 64, 32)
    last_level_mode: str = "per_parent_l2"
    use_opq: bool = True
    opq_subspaces: int = 2
    opq_codebook_size: int = 256
    opq_iters: int = 8
    kmeans_iters: int = 25
    opq_kmeans_iters: int = 10
    max_points_per_centroid: int = 10000
    init_sample_per_centroid: int = 32
    normalize_residuals: bool = False
    keyword_weight: float = 0.5
    keyword_normalize: bool = True
    dedup_digit: bool = False
    max_occupancy: float = 1.0
    batch_size: int | None = None
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "rq_sizes", tuple(int(k) for k in self.rq_sizes))
        if not self.rq_sizes or any(k < 1 for k in self.rq_sizes):
            raise ValueError(f"rq_sizes must be a non-empty tuple of positive ints, got {self.rq_sizes}")
        if self.last_level_mode not in LAST_LEVEL_MODES:
            raise ValueError(f"last_level_mode {self.last_level_mode!r} is not one of {LAST_LEVEL_MODES}")
        need = {"per_parent_l2": 2, "per_parent_l1l2": 3}.get(self.last_level_mode, 1)
        if len(self.rq_sizes) < need:
            raise ValueError(f"last_level_mode {self.last_level_mode!r} needs >= {need} rq_sizes, got {self.rq_sizes}")
        for name in ("opq_subspaces", "opq_iters", "kmeans_iters", "opq_kmeans_iters", "max_points_per_centroid"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.opq_codebook_size < 2:
            raise ValueError(f"opq_codebook_size must be >= 2, got {self.opq_codebook_size}")
        if not 0.0 <= self.keyword_weight <= 1.0:
            raise ValueError(f"keyword_weight must be in [0, 1], got {self.keyword_weight}")
        if self.max_occupancy <= 0:
            raise ValueError(f"max_occupancy must be positive, got {self.max_occupancy}")

    @classmethod
    def paper(cls, **overrides: Any) -> SemanticIDConfig:
        """OneSearch V1: 4096-1024-512 RQ + OPQ 2 x 256 (6144 SID tokens)."""
        return cls(**{"rq_sizes": (4096, 1024, 512), **overrides})

    @classmethod
    def cpu_demo(cls, **overrides: Any) -> SemanticIDConfig:
        """~20k items on CPU: 256-64-32 RQ + OPQ 2 x 256."""
        return cls(**{"rq_sizes": (256, 64, 32), **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> SemanticIDConfig:
        """Tests: 8-4-4 RQ + OPQ 2 x 16, few iterations."""
        fields = dict(rq_sizes=(8, 4, 4), opq_codebook_size=16, opq_iters=3, kmeans_iters=8, opq_kmeans_iters=4)
        return cls(**{**fields, **overrides})

    @property
    def num_rq_levels(self) -> int:
        return len(self.rq_sizes)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Codes per SID position: RQ widths, then `opq_codebook_size` per OPQ sub-space."""
        return self.rq_sizes + ((self.opq_codebook_size,) * self.opq_subspaces if self.use_opq else ())

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """Token of level l, code c = `level_offsets[l] + c` (exclusive cumulative sums of `level_sizes`)."""
        return tuple(int(v) for v in np.concatenate([[0], np.cumsum(self.level_sizes)[:-1]]))

    @property
    def vocab_size(self) -> int:
        """New SID tokens (paper: 4096 + 1024 + 512 + 2 x 256 = 6144)."""
        return int(sum(self.level_sizes))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rq_sizes": list(self.rq_sizes)}


# ----------------------------------------------------------------------------------------------------------
# Input checks and row layout.


def check_embeddings(x: Any, what: str = "embeddings") -> np.ndarray:
    """`x` as float32 `[N, d]`; ValueError for empty input, a wrong rank, or a NaN/inf row (named)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} must be [num_rows, dim], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {x.shape})")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"{what}: row {bad[0]} contains NaN or inf ({bad.size} bad rows: {bad[:5].tolist()})")
    return x


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _mesh_of(sharding: Mesh | NamedSharding | None) -> Mesh | None:
    if sharding is None or isinstance(sharding, Mesh):
        return sharding
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    raise ValueError(f"sharding must be a Mesh, a NamedSharding or None, got {type(sharding).__name__}")


def _chunk_size(k: int, batch_size: int | None) -> int:
    return int(batch_size) if batch_size else max(8, _DISTANCE_BUDGET // max(k, 1))


class _Rows(NamedTuple):
    x: jax.Array  # [padded, d], rows over every mesh axis (or one device)
    valid: jax.Array  # [padded] bool
    chunk: int


def _place_rows(x: np.ndarray, k: int, batch_size: int | None, mesh: Mesh | None) -> _Rows:
    """Pads rows to `shards x rows_per_shard` (a multiple of the chunk) and puts them on the mesh."""
    n, d = x.shape
    shards = 1 if mesh is None else mesh.size
    per_shard = -(-n // shards)
    chunk = min(_chunk_size(k, batch_size), _round_up(per_shard, 8))
    padded = _round_up(per_shard, chunk) * shards
    xp = np.zeros((padded, d), np.float32)
    xp[:n] = x
    valid = np.arange(padded) < n
    if mesh is None:
        return _Rows(jnp.asarray(xp), jnp.asarray(valid), chunk)
    axes = mesh.axis_names
    return _Rows(
        jax.device_put(xp, NamedSharding(mesh, P(axes, None))),
        jax.device_put(valid, NamedSharding(mesh, P(axes))),
        chunk,
    )


def _host_rng(rng: jax.Array) -> np.random.Generator:
    return np.random.default_rng(int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max)))


# ----------------------------------------------------------------------------------------------------------
# k-means.


def _nearest_pass(x: jax.Array, valid: jax.Array, centroids: jax.Array, chunk: int, with_stats: bool):
    """Nearest centroid of every row, `chunk` rows at a time.

    x: `[n, d]` (n a multiple of chunk); valid: `[n]`; centroids: `[k, d]`.
    Returns `((sums [k, d], counts [k]) or None, assignment [n] int32, sqdist [n])`; padding rows have
    sqdist -1 and contribute nothing to the sums.
    """
    n, d = x.shape
    k = centroids.shape[0]
    c_sq = jnp.sum(centroids * centroids, axis=-1)

    def step(carry, xs):
        xb, vb = xs
        d2 = jnp.sum(xb * xb, -1, keepdims=True) - 2.0 * jnp.dot(xb, centroids.T, precision=_HIGHEST) + c_sq[None]
        a = jnp.argmin(d2, axis=1).astype(jnp.int32)
        dmin = jnp.maximum(jnp.take_along_axis(d2, a[:, None], axis=1)[:, 0], 0.0)
        if with_stats:
            w = vb.astype(xb.dtype)
            sums, counts = carry
            carry = (sums + jax.ops.segment_sum(xb * w[:, None], a, k), counts + jax.ops.segment_sum(w, a, k))
        return carry, (a, jnp.where(vb, dmin, -1.0))

    init = (jnp.zeros((k, d), x.dtype), jnp.zeros((k,), x.dtype)) if with_stats else None
    xs = (x.reshape(n // chunk, chunk, d), valid.reshape(n // chunk, chunk))
    stats, (a, dmin) = jax.lax.scan(step, init, xs)
    return stats, a.reshape(n), dmin.reshape(n)


@functools.lru_cache(maxsize=32)
def _assign_program(mesh: Mesh | None, chunk: int):
    def local(x, valid, c):
        _, a, dmin = _nearest_pass(x, valid, c, chunk, with_stats=False)
        return a, dmin

    if mesh is not None:
        axes = mesh.axis_names
        local = jax.shard_map(
            local, mesh=mesh, in_specs=(P(axes, None), P(axes), P()), out_specs=(P(axes), P(axes)), check_vma=False
        )
    return jax.jit(local)


@functools.lru_cache(maxsize=32)
def _lloyd_program(mesh: Mesh | None, k: int, iters: int, chunk: int):
    """Jitted `iters` Lloyd steps (assign, mean update, empty-cluster re-seeding) from given centroids."""

    def local(x, valid, c):
        (sums, counts), _, dmin = _nearest_pass(x, valid, c, chunk, with_stats=True)
        if mesh is not None:
            sums, counts = jax.lax.psum((sums, counts), mesh.axis_names)
        far_d, far_i = jax.lax.top_k(dmin, min(k, x.shape[0]))  # this shard's farthest rows
        return sums, counts, far_d, x[far_i]

    if mesh is not None:
        axes = mesh.axis_names
        local = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(axes, None), P(axes), P()),
            out_specs=(P(), P(), P(axes), P(axes, None)),
            check_vma=False,
        )

    def update(x, valid, c):
        sums, counts, far_d, far_x = local(x, valid, c)
        _, order = jax.lax.top_k(far_d, k)  # global farthest rows, shard order = row order on ties
        empty = counts == 0
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        means = sums / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where(empty[:, None], far_x[order][rank], means)

    def run(x, valid, c):
        return jax.lax.fori_loop(0, iters, lambda _, c: update(x, valid, c), c)

    return jax.jit(run)


@functools.partial(jax.jit, static_argnames=("k",))
def _kmeans_pp(x: jax.Array, k: int, rng: jax.Array) -> jax.Array:
    """k-means++ seeds `[k, d]` from rows `x [S, d]` (uniform among rows when all distances are 0).

    Row i is drawn by inverse CDF of the squared distances with one pre-drawn uniform per step (a random
    draw inside the loop makes compiles several times slower).
    """
    s = x.shape[0]
    u = jax.random.uniform(rng, (k,))

    def sqdist(c):
        return jnp.sum(jnp.square(x - c[None]), axis=-1)

    def body(i, carry):
        c, d2 = carry
        cdf = jnp.cumsum(d2)
        total = cdf[-1]
        by_distance = jnp.sum(cdf <= u[i] * total).astype(jnp.int32)
        idx = jnp.minimum(jnp.where(total > 0, by_distance, (u[i] * s).astype(jnp.int32)), s - 1)
        return c.at[i].set(x[idx]), jnp.minimum(d2, sqdist(x[idx]))

    first = jnp.minimum((u[0] * s).astype(jnp.int32), s - 1)
    c0 = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
    c, _ = jax.lax.fori_loop(1, k, body, (c0, sqdist(x[first])))
    return c


def assign(
    x: Any, centroids: Any, *, batch_size: int | None = None, sharding: Mesh | NamedSharding | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid per row: `(assignment [N] int32, squared distance [N] float32)`.

    x: `[N, d]`; centroids: `[k, d]`; rows are scored `batch_size` at a time, sharded over `sharding`'s mesh.
    """
    x = check_embeddings(x, "x")
    centroids = np.asarray(centroids, np.float32)
    mesh = _mesh_of(sharding)
    rows = _place_rows(x, centroids.shape[0], batch_size, mesh)
    a, d2 = _assign_program(mesh, rows.chunk)(rows.x, rows.valid, jnp.asarray(centroids))
    n = x.shape[0]
    return np.asarray(a)[:n], np.asarray(d2)[:n]


def kmeans(
    x: Any,
    k: int,
    *,
    iters: int = 25,
    rng: jax.Array,
    batch_size: int | None = None,
    sharding: Mesh | NamedSharding | None = None,
    init: Any = None,
    init_sample: int | None = None,
    max_points_per_centroid: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd k-means. Returns `(centroids [k, d] float32, assignment [N] int32)`.

    Args:
      x: `[N, d]` rows (N >= k).
      k: clusters.
      iters: Lloyd steps (assign + update); the returned assignment is a final pass with the final centroids.
      rng: a `jax.random.key`.
      batch_size: rows per distance chunk (memory `[batch_size, k]`); default `_DISTANCE_BUDGET // k`.
      sharding: a Mesh (or NamedSharding): rows are split over all its devices.
      init: `[k, d]` initial centroids (warm start); default k-means++ on `init_sample` sampled rows
        (default `min(N, 32 k)`).
      max_points_per_centroid: train on at most `k x` this many sampled rows (faiss), then assign all rows.
    """
    x = check_embeddings(x, "x")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of rows, got k={k} for {n} rows; use fewer centroids")
    mesh = _mesh_of(sharding)
    init_rng, sample_rng = jax.random.split(rng)
    host_rng = _host_rng(sample_rng)
    train = x
    if max_points_per_centroid and n > k * max_points_per_centroid:
        train = x[np.sort(host_rng.choice(n, k * max_points_per_centroid, replace=False))]
    if init is None:
        size = min(train.shape[0], init_sample or 32 * k)
        sample = train if size == train.shape[0] else train[np.sort(host_rng.choice(train.shape[0], size, False))]
        centroids = _kmeans_pp(jnp.asarray(sample), k, init_rng)
    else:
        centroids = jnp.asarray(np.asarray(init, np.float32))
        if centroids.shape != (k, x.shape[1]):
            raise ValueError(f"init centroids must be [{k}, {x.shape[1]}], got {centroids.shape}")
    rows = _place_rows(train, k, batch_size, mesh)
    centroids = _lloyd_program(mesh, k, int(iters), rows.chunk)(rows.x, rows.valid, centroids)
    centroids = np.asarray(centroids)
    assignment, _ = assign(x, centroids, batch_size=batch_size, sharding=mesh)
    return centroids, assignment


@functools.partial(jax.jit, static_argnames=("iters",))
def _balanced_lloyd(x: jax.Array, c: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
    n, k = x.shape[0], c.shape[0]
    cap = -(-n // k)

    def greedy(c):
        def body(j, assigned):
            d2 = jnp.sum(jnp.square(x - c[j][None]), axis=-1)
            score = jnp.where(assigned < 0, -d2, -jnp.inf)
            vals, idx = jax.lax.top_k(score, cap)
            return assigned.at[idx].set(jnp.where(vals > -jnp.inf, j, assigned[idx]))

        return jax.lax.fori_loop(0, k, body, jnp.full((n,), -1, jnp.int32))

    def update(_, c):
        a = greedy(c)
        counts = jax.ops.segment_sum(jnp.ones((n,), x.dtype), a, k)
        means = jax.ops.segment_sum(x, a, k) / jnp.maximum(counts, 1.0)[:, None]
        return jnp.where(counts[:, None] > 0, means, c)

    c = jax.lax.fori_loop(0, iters, update, c)
    return c, greedy(c)


def balanced_kmeans(x: Any, k: int, *, iters: int, rng: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """OneRec-style size-balanced k-means: `(centroids [k, d], assignment [N])`, every cluster <= ceil(N/k).

    Each step visits clusters in order; cluster j takes the ceil(N/k) unassigned rows nearest to it; then
    means are updated. O(k N d) per step on one device.
    """
    x = check_embeddings(x, "x")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"balanced k-means needs 1 <= k <= rows, got k={k} for {x.shape[0]} rows")
    c0 = _kmeans_pp(jnp.asarray(x[: min(x.shape[0], 32 * k)]), k, rng)
    c, a = _balanced_lloyd(jnp.asarray(x), c0, int(iters))
    return np.asarray(c), np.asarray(a)


# ----------------------------------------------------------------------------------------------------------
# Per-parent last level (the released code's "L3 balanced").


def _csr_program(k: int, chunk: int):
    @jax.jit
    def run(x, starts, sizes, centroids):
        n, d = x.shape

        def step(_, xs):
            xb, sb, zb = xs
            slots = jnp.arange(k, dtype=jnp.int32)
            cg = centroids[sb[:, None] + slots[None]]  # [chunk, k, d]
            d2 = jnp.sum(jnp.square(xb[:, None] - cg), axis=-1)
            d2 = jnp.where(slots[None] < zb[:, None], d2, jnp.inf)
            a = jnp.argmin(d2, axis=1).astype(jnp.int32)
            chosen = jnp.where((zb > 0)[:, None], jnp.take_along_axis(cg, a[:, None, None], axis=1)[:, 0], 0.0)
            return None, (a, chosen)

        xs = (x.reshape(-1, chunk, d), starts.reshape(-1, chunk), sizes.reshape(-1, chunk))
        _, (a, chosen) = jax.lax.scan(step, None, xs)
        return a.reshape(n), chosen.reshape(n, d)

    return run


_csr_programs = functools.lru_cache(maxsize=16)(_csr_program)


@functools.partial(jax.jit, static_argnames=("iters", "chunk"))
def _segmented_lloyd(x, seg, starts, c, *, iters, chunk):
    """k-means inside every segment at once.

    x: `[n, d]` rows sorted by segment (padding rows last, seg == B); seg: `[n]` int32; starts: `[B]` first row of
    each segment; c: `[B, k, d]` initial centroids (every segment has > k rows). Empty clusters are re-seeded at
    their segment's farthest rows. Returns `(centroids [B, k, d], local assignment [n])`.
    """
    n, d = x.shape
    b, k, _ = c.shape
    valid = seg < b
    seg_c = jnp.minimum(seg, b - 1)

    def nearest(c):
        c_sq = jnp.sum(c * c, axis=-1)

        def step(carry, xs):
            xb, sb, vb = xs
            cg = c[sb]
            dots = jnp.einsum("nd,nkd->nk", xb, cg, precision=_HIGHEST)
            d2 = jnp.sum(xb * xb, -1, keepdims=True) - 2.0 * dots + c_sq[sb]
            a = jnp.argmin(d2, axis=1).astype(jnp.int32)
            dmin = jnp.maximum(jnp.take_along_axis(d2, a[:, None], axis=1)[:, 0], 0.0)
            w = vb.astype(xb.dtype)
            flat = sb * k + a
            sums, counts = carry
            carry = (
                sums + jax.ops.segment_sum(xb * w[:, None], flat, b * k),
                counts + jax.ops.segment_sum(w, flat, b * k),
            )
            return carry, (a, jnp.where(vb, dmin, -1.0))

        init = (jnp.zeros((b * k, d), x.dtype), jnp.zeros((b * k,), x.dtype))
        xs = (x.reshape(-1, chunk, d), seg_c.reshape(-1, chunk), valid.reshape(-1, chunk))
        (sums, counts), (a, dmin) = jax.lax.scan(step, init, xs)
        return sums.reshape(b, k, d), counts.reshape(b, k), a.reshape(n), dmin.reshape(n)

    def update(_, c):
        sums, counts, _, dmin = nearest(c)
        order = jnp.lexsort((-dmin, seg))  # by segment, farthest first; segment blocks keep their positions
        empty = counts == 0
        rank = jnp.maximum(jnp.cumsum(empty, axis=1) - 1, 0)
        far_rows = order[jnp.minimum(starts[:, None] + rank, n - 1)]
        means = sums / jnp.maximum(counts, 1.0)[..., None]
        return jnp.where(empty[..., None], x[far_rows], means)

    c = jax.lax.fori_loop(0, iters, update, c)
    return c, nearest(c)[2]


class ParentCodebooks(NamedTuple):
    """Last-level sub-codebooks in CSR form: parent `keys[p]` owns `centroids[offsets[p]:offsets[p + 1]]`."""

    keys: np.ndarray  # [P] int64, ascending
    offsets: np.ndarray  # [P + 1] int64
    centroids: np.ndarray  # [T, d] float32, T <= number of fitted rows


def fit_per_parent(
    x: np.ndarray, parents: np.ndarray, k: int, *, iters: int, rng: jax.Array, batch_size: int | None = None
) -> tuple[ParentCodebooks, np.ndarray]:
    """A k-means of width k per parent (rows with equal `parents [N]`); returns codebooks and local codes [N].

    Parents with <= k rows give every row its own centroid (local code = rank in the parent); larger ones run
    a segmented Lloyd from k distinct random rows (faiss' default init). Unlike the released code, small
    parents are not padded with their mean (those centroids are never assigned in training).
    """
    n, d = x.shape
    parents = np.asarray(parents, np.int64)
    order = np.argsort(parents, kind="stable")
    keys, starts, counts = np.unique(parents[order], return_index=True, return_counts=True)
    sizes = np.minimum(counts, k)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    centroids = np.zeros((int(offsets[-1]), d), np.float32)
    local = np.zeros(n, np.int32)
    ranks = np.arange(n) - np.repeat(starts, counts)
    small = np.repeat(counts <= k, counts)
    rows = order[small]
    local[rows] = ranks[small]
    centroids[np.repeat(offsets[:-1], counts)[small] + ranks[small]] = x[rows]
    big = np.flatnonzero(counts > k)
    if big.size:
        host = _host_rng(rng)
        big_rows = np.concatenate([order[starts[p] : starts[p] + counts[p]] for p in big])
        seg = np.repeat(np.arange(big.size, dtype=np.int32), counts[big])
        seg_starts = np.concatenate([[0], np.cumsum(counts[big])[:-1]]).astype(np.int32)
        init = np.stack([x[order[starts[p] + host.choice(counts[p], k, replace=False)]] for p in big])
        chunk = min(int(batch_size or max(8, _DISTANCE_BUDGET // (k * d))), _round_up(big_rows.size, 8))
        padded = _round_up(big_rows.size, chunk)
        xb = np.zeros((padded, d), np.float32)
        xb[: big_rows.size] = x[big_rows]
        segp = np.full(padded, big.size, np.int32)
        segp[: big_rows.size] = seg
        c, a = _segmented_lloyd(
            jnp.asarray(xb),
            jnp.asarray(segp),
            jnp.asarray(seg_starts),
            jnp.asarray(init),
            iters=int(iters),
            chunk=chunk,
        )
        c, a = np.asarray(c), np.asarray(a)[: big_rows.size]
        local[big_rows] = a
        for i, p in enumerate(big):
            centroids[offsets[p] : offsets[p] + k] = c[i]
    return ParentCodebooks(keys, offsets, centroids), local


def assign_per_parent(
    x: np.ndarray, parents: np.ndarray, books: ParentCodebooks, k: int, *, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Local codes `[N]` and chosen centroids `[N, d]` under each row's parent codebook.

    A parent never seen in fitting has no codebook: code 0 and a zero centroid (the released code leaves an
    empty parent's centroids at zero).
    """
    n, d = x.shape
    parents = np.asarray(parents, np.int64)
    slot = np.clip(np.searchsorted(books.keys, parents), 0, max(len(books.keys) - 1, 0))
    found = books.keys[slot] == parents if len(books.keys) else np.zeros(n, bool)
    total = books.centroids.shape[0]
    starts = np.where(found, books.offsets[slot], total).astype(np.int32)
    sizes = np.where(found, books.offsets[slot + 1] - books.offsets[slot], 0).astype(np.int32)
    chunk = min(int(batch_size or max(8, _DISTANCE_BUDGET // (k * d))), _round_up(n, 8))
    padded = _round_up(n, chunk)
    xp = np.zeros((padded, d), np.float32)
    xp[:n] = x
    sp = np.full(padded, total, np.int32)
    sp[:n] = starts
    zp = np.zeros(padded, np.int32)
    zp[:n] = sizes
    table = np.concatenate([books.centroids, np.zeros((k, d), np.float32)])
    a, chosen = _csr_programs(k, chunk)(jnp.asarray(xp), jnp.asarray(sp), jnp.asarray(zp), jnp.asarray(table))
    return np.asarray(a)[:n], np.asarray(chosen)[:n]


# ----------------------------------------------------------------------------------------------------------
# OPQ.


class OPQ(NamedTuple):
    """Centred, rotated product quantizer: `x ~ mean + concat_m(codebooks[m][codes[:, m]]) @ rotation.T`."""

    mean: np.ndarray  # [d]
    rotation: np.ndarray  # [d, d] orthogonal
    codebooks: np.ndarray  # [M, K, d / M]
    errors: tuple[float, ...]  # mean squared error after each PQ round


def opq_encode(
    opq: OPQ, x: np.ndarray, *, batch_size: int | None = None, sharding: Mesh | NamedSharding | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`(codes [N, M] int32, reconstruction [N, d])` of rows `x [N, d]`."""
    m, _, ds = opq.codebooks.shape
    y = (x - opq.mean) @ opq.rotation
    codes = np.stack(
        [
            assign(y[:, i * ds : (i + 1) * ds], opq.codebooks[i], batch_size=batch_size, sharding=sharding)[0]
            for i in range(m)
        ],
        axis=1,
    )
    y_hat = np.concatenate([opq.codebooks[i][codes[:, i]] for i in range(m)], axis=1)
    return codes, y_hat @ opq.rotation.T + opq.mean


def eigenvalue_allocation(xc: np.ndarray, num_subspaces: int) -> np.ndarray:
    """OPQ's parametric initial rotation `[d, d]` (Ge et al. 2013): principal directions, largest variance
    first, each given to the sub-space with the smallest product of variances so far that still has room.

    Starting Procrustes from the identity can stall (a sub-space with no variance stays empty); faiss starts
    from a random rotation instead.
    """
    d = xc.shape[1]
    ds = d // num_subspaces
    cov = xc.astype(np.float64).T @ xc.astype(np.float64) / max(xc.shape[0] - 1, 1)
    variances, vectors = np.linalg.eigh(cov)
    log_var = np.log(np.maximum(variances, 1e-12))
    buckets: list[list[int]] = [[] for _ in range(num_subspaces)]
    load = np.zeros(num_subspaces)
    for j in np.argsort(-variances, kind="stable"):
        open_buckets = [b for b in range(num_subspaces) if len(buckets[b]) < ds]
        b = min(open_buckets, key=lambda i: (load[i], i))
        buckets[b].append(int(j))
        load[b] += log_var[j]
    return vectors[:, [j for bucket in buckets for j in bucket]].astype(np.float32)


def fit_opq(
    x: Any,
    *,
    num_subspaces: int = 2,
    codebook_size: int = 256,
    iters: int = 8,
    kmeans_iters: int = 10,
    rng: jax.Array,
    rotate: bool = True,
    batch_size: int | None = None,
    sharding: Mesh | NamedSharding | None = None,
) -> OPQ:
    """Optimised product quantisation of `x [N, d]` (d divisible by `num_subspaces`).

    R starts at `eigenvalue_allocation`. Rounds: PQ k-means per sub-space on `(x - mean) @ R` (warm-started
    after round 0), then the orthogonal Procrustes update `R = U V^T` with `U S V^T = svd((x - mean)^T Y_hat)`;
    `iters` rounds plus a final PQ round. `rotate=False` keeps R = I: plain PQ with the same k-means budget
    (the baseline). `errors` are the mean squared errors of each round.
    """
    x = check_embeddings(x, "OPQ input")
    n, d = x.shape
    if d % num_subspaces:
        raise ValueError(f"embedding dim {d} is not divisible by opq_subspaces {num_subspaces}")
    if codebook_size > n:
        raise ValueError(f"OPQ needs at least opq_codebook_size={codebook_size} rows, got {n}")
    ds = d // num_subspaces
    mean = x.mean(axis=0)
    xc = x - mean
    rotation = eigenvalue_allocation(xc, num_subspaces) if rotate else np.eye(d, dtype=np.float32)
    books: list[np.ndarray | None] = [None] * num_subspaces
    errors = []
    for round_ in range(iters + 1):
        y = xc @ rotation
        parts = []
        for i in range(num_subspaces):
            books[i], codes = kmeans(
                y[:, i * ds : (i + 1) * ds],
                codebook_size,
                iters=kmeans_iters,
                rng=jax.random.fold_in(rng, round_ * num_subspaces + i),
                init=books[i],
                batch_size=batch_size,
                sharding=sharding,
            )
            parts.append(books[i][codes])
        y_hat = np.concatenate(parts, axis=1)
        errors.append(float(np.mean(np.sum(np.square(y - y_hat), axis=1))))
        if rotate and round_ < iters:
            u, _, vt = np.linalg.svd(xc.astype(np.float64).T @ y_hat.astype(np.float64))
            rotation = (u @ vt).astype(np.float32)
    return OPQ(mean.astype(np.float32), rotation, np.stack(books).astype(np.float32), tuple(errors))


# ----------------------------------------------------------------------------------------------------------
# The tokenizer.


@dataclasses.dataclass(frozen=True)
class SemanticIDModel:
    """Fitted codebooks. Arrays only (`to_arrays` / `save` / `load`), so numpy or orbax can store them.

    rq_codebooks: `[k_l, d]` for every RQ level except a per-parent last level.
    parent_books: the per-parent last level (None in "global" / "size_balanced" modes).
    opq: the OPQ tail (None when `config.use_opq` is False).
    fit_info: training numbers (reconstruction errors per level, OPQ round errors).
    """

    config: SemanticIDConfig
    rq_codebooks: tuple[np.ndarray, ...]
    parent_books: ParentCodebooks | None
    opq: OPQ | None
    fit_info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    @property
    def dim(self) -> int:
        return int(self.rq_codebooks[0].shape[1])

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return self.config.level_sizes

    @property
    def level_offsets(self) -> tuple[int, ...]:
        return self.config.level_offsets

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"rq_codebook_{i}": c for i, c in enumerate(self.rq_codebooks)}
        if self.parent_books is not None:
            out.update(parent_keys=self.parent_books.keys, parent_offsets=self.parent_books.offsets)
            out["parent_centroids"] = self.parent_books.centroids
        if self.opq is not None:
            out.update(opq_mean=self.opq.mean, opq_rotation=self.opq.rotation, opq_codebooks=self.opq.codebooks)
            out["opq_errors"] = np.asarray(self.opq.errors, np.float64)
        return out

    def save(self, path: str) -> None:
        """`<path>.npz` arrays + `<path>.json` config."""
        np.savez(path + ".npz", **self.to_arrays())
        with open(path + ".json", "w") as f:
            json.dump({"config": self.config.to_dict(), "fit_info": self.fit_info}, f, indent=2)

    @classmethod
    def load(cls, path: str) -> SemanticIDModel:
        if not os.path.exists(path + ".json") or not os.path.exists(path + ".npz"):
            raise FileNotFoundError(f"{path}.npz / {path}.json: not a saved SemanticIDModel")
        with open(path + ".json") as f:
            meta = json.load(f)
        config = SemanticIDConfig(**meta["config"])
        arrays = dict(np.load(path + ".npz"))
        global_levels = sum(1 for key in arrays if key.startswith("rq_codebook_"))
        parent = None
        if "parent_keys" in arrays:
            parent = ParentCodebooks(arrays["parent_keys"], arrays["parent_offsets"], arrays["parent_centroids"])
        opq = None
        if "opq_mean" in arrays:
            errors = tuple(float(e) for e in arrays["opq_errors"])
            opq = OPQ(arrays["opq_mean"], arrays["opq_rotation"], arrays["opq_codebooks"], errors)
        books = tuple(arrays[f"rq_codebook_{i}"] for i in range(global_levels))
        return cls(config, books, parent, opq, meta.get("fit_info", {}))


def _per_parent_last(config: SemanticIDConfig) -> bool:
    return config.last_level_mode in ("per_parent_l2", "per_parent_l1l2")


def _parent_keys(config: SemanticIDConfig, codes: list[np.ndarray]) -> np.ndarray:
    if config.last_level_mode == "per_parent_l2":
        return codes[-1].astype(np.int64)
    return codes[-2].astype(np.int64) * config.rq_sizes[-2] + codes[-1].astype(np.int64)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)


def check_capacity(num_rows: int, config: SemanticIDConfig) -> None:
    """ValueError when the codebooks cannot give `num_rows` rows distinct SIDs (or a level has more centroids
    than rows to fit them), with suggested sizes."""
    capacity = math.prod(config.level_sizes)
    if num_rows > config.max_occupancy * capacity:
        rest = capacity // config.rq_sizes[0]
        first = math.ceil(num_rows / (config.max_occupancy * rest))
        suggestion = (first, *config.rq_sizes[1:])
        raise ValueError(
            f"codebooks {config.level_sizes} give {capacity} distinct SIDs, too few for {num_rows} rows at "
            f"max_occupancy={config.max_occupancy}; use e.g. rq_sizes={suggestion}, more levels or a larger "
            "opq_codebook_size"
        )
    global_levels = config.rq_sizes[:-1] if _per_parent_last(config) else config.rq_sizes
    too_wide = [k for k in global_levels if k > num_rows]
    if config.use_opq and config.opq_codebook_size > num_rows:
        too_wide.append(config.opq_codebook_size)
    if too_wide:
        raise ValueError(
            f"codebook widths {too_wide} exceed the {num_rows} rows to fit them; use widths <= {num_rows} "
            f"(e.g. rq_sizes={tuple(min(k, max(1, num_rows // 4)) for k in config.rq_sizes)})"
        )


def fit_transform(
    embeddings: Any, config: SemanticIDConfig = SemanticIDConfig(), *, mesh: Mesh | None = None
) -> tuple[SemanticIDModel, np.ndarray]:
    """Fits the tokenizer on `embeddings [N, d]` (pass queries and items together: they share codebooks).

    Returns the model and the fitted rows' codes `[N, L]` int32 (in "size_balanced" mode these are the
    capacity-respecting training assignments; `encode` uses nearest centroids). `mesh` shards the global
    k-means levels and the PQ k-means over rows.
    """
    x = check_embeddings(embeddings)
    n, d = x.shape
    check_capacity(n, config)
    if config.use_opq and d % config.opq_subspaces:
        raise ValueError(f"embedding dim {d} is not divisible by opq_subspaces={config.opq_subspaces}")
    rng = jax.random.key(config.seed)
    residual = x.copy()
    codes: list[np.ndarray] = []
    books: list[np.ndarray] = []
    parent_books = None
    errors = []
    for level, k in enumerate(config.rq_sizes):
        key = jax.random.fold_in(rng, level)
        last = level == config.num_rq_levels - 1
        if last and _per_parent_last(config):
            parent_books, local = fit_per_parent(
                residual,
                _parent_keys(config, codes),
                k,
                iters=config.kmeans_iters,
                rng=key,
                batch_size=config.batch_size,
            )
            slot = np.searchsorted(parent_books.keys, _parent_keys(config, codes))
            residual = residual - parent_books.centroids[parent_books.offsets[slot] + local]
        else:
            if last and config.last_level_mode == "size_balanced":
                centroids, local = balanced_kmeans(residual, k, iters=config.kmeans_iters, rng=key)
            else:
                centroids, local = kmeans(
                    residual,
                    k,
                    iters=config.kmeans_iters,
                    rng=key,
                    batch_size=config.batch_size,
                    sharding=mesh,
                    init_sample=config.init_sample_per_centroid * k,
                    max_points_per_centroid=config.max_points_per_centroid,
                )
            books.append(centroids)
            residual = residual - centroids[local]
            if config.normalize_residuals:
                residual = _normalize_rows(residual)
        codes.append(local.astype(np.int32))
        errors.append(float(np.mean(np.sum(np.square(residual), axis=1))))
    opq = None
    if config.use_opq:
        opq = fit_opq(
            residual,
            num_subspaces=config.opq_subspaces,
            codebook_size=config.opq_codebook_size,
            iters=config.opq_iters,
            kmeans_iters=config.opq_kmeans_iters,
            rng=jax.random.fold_in(rng, config.num_rq_levels),
            batch_size=config.batch_size,
            sharding=mesh,
        )
        opq_codes, recon = opq_encode(opq, residual, batch_size=config.batch_size, sharding=mesh)
        codes.extend(opq_codes.T)
        errors.append(float(np.mean(np.sum(np.square(residual - recon), axis=1))))
    info = {"num_rows": n, "dim": d, "reconstruction_error": errors}
    if opq is not None:
        info["opq_round_errors"] = list(opq.errors)
    model = SemanticIDModel(config, tuple(books), parent_books, opq, info)
    return model, np.stack(codes, axis=1).astype(np.int32)


def fit(embeddings: Any, config: SemanticIDConfig = SemanticIDConfig(), *, mesh: Mesh | None = None) -> SemanticIDModel:
    """`fit_transform(...)[0]`."""
    return fit_transform(embeddings, config, mesh=mesh)[0]


def encode_with_errors(
    model: SemanticIDModel, embeddings: Any, *, mesh: Mesh | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`(codes [N, L] int32, squared error [N, num_rq_levels (+1 with OPQ)])` after each quantisation stage."""
    config = model.config
    x = check_embeddings(embeddings)
    if x.shape[1] != model.dim:
        raise ValueError(f"embeddings have dim {x.shape[1]}, the model was fitted on dim {model.dim}")
    residual = x.copy()
    codes: list[np.ndarray] = []
    errors = []
    for level, k in enumerate(config.rq_sizes):
        if level == config.num_rq_levels - 1 and _per_parent_last(config):
            local, chosen = assign_per_parent(residual, _parent_keys(config, codes), model.parent_books, k)
            residual = residual - chosen
        else:
            centroids = model.rq_codebooks[level]
            local, _ = assign(residual, centroids, batch_size=config.batch_size, sharding=mesh)
            residual = residual - centroids[local]
            if config.normalize_residuals:
                residual = _normalize_rows(residual)
        codes.append(local.astype(np.int32))
        errors.append(np.sum(np.square(residual), axis=1))
    if model.opq is not None:
        opq_codes, recon = opq_encode(model.opq, residual, batch_size=config.batch_size, sharding=mesh)
        codes.extend(opq_codes.T)
        errors.append(np.sum(np.square(residual - recon), axis=1))
    return np.stack(codes, axis=1).astype(np.int32), np.stack(errors, axis=1)


def encode(model: SemanticIDModel, embeddings: Any, *, mesh: Mesh | None = None) -> np.ndarray:
    """SID codes `[N, L]` int32 (local codes per level) of queries or items `[N, d]`."""
    return encode_with_errors(model, embeddings, mesh=mesh)[0]


def sid_tokens(codes: np.ndarray, level_offsets: Sequence[int]) -> np.ndarray:
    """Shared-vocabulary token ids `[N, L]`: `level_offsets[l] + codes[:, l]`."""
    return np.asarray(codes, np.int64) + np.asarray(level_offsets, np.int64)[None]


def sid_strings(codes: np.ndarray, config: SemanticIDConfig) -> list[str]:
    """`<a_i><b_j><c_k><d_m><d_n>` strings: one letter per RQ level, OPQ codes share the next letter with the
    m-th sub-space offset by `m * opq_codebook_size` (the authors' +256)."""
    r = config.num_rq_levels
    letters = [chr(ord("a") + i) for i in range(r)] + [chr(ord("a") + r)] * (len(config.level_sizes) - r)
    shift = [0] * r + [m * config.opq_codebook_size for m in range(len(config.level_sizes) - r)]
    return ["".join(f"<{letters[j]}_{int(c) + shift[j]}>" for j, c in enumerate(row)) for row in np.asarray(codes)]


# ----------------------------------------------------------------------------------------------------------
# Collisions and metrics.


class CollisionTable(NamedTuple):
    """Leaf (distinct full SID) -> items, CSR. Leaves are sorted lexicographically by code.

    leaf_codes: `[U, L]`; leaf_offsets: `[U + 1]`; leaf_items: `[N]` item indices (or given ids) grouped by
    leaf, within a leaf by descending popularity then index; item_leaf: `[N]` leaf of each item row.
    """

    leaf_codes: np.ndarray
    leaf_offsets: np.ndarray
    leaf_items: np.ndarray
    item_leaf: np.ndarray

    @property
    def num_leaves(self) -> int:
        return int(self.leaf_codes.shape[0])

    def items_of(self, leaf: int) -> np.ndarray:
        return self.leaf_items[self.leaf_offsets[leaf] : self.leaf_offsets[leaf + 1]]

    def lookup(self, code: Sequence[int]) -> np.ndarray:
        """Items whose SID is `code` (empty when no item has it)."""
        code = np.asarray(code, self.leaf_codes.dtype)
        lo, hi = 0, self.num_leaves
        while lo < hi:  # lexicographic binary search
            mid = (lo + hi) // 2
            if tuple(self.leaf_codes[mid]) < tuple(code):
                lo = mid + 1
            else:
                hi = mid
        if lo < self.num_leaves and np.array_equal(self.leaf_codes[lo], code):
            return self.items_of(lo)
        return self.leaf_items[:0]


def _check_codes(codes: Any) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must be a non-empty [num_items, num_levels] array, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    return codes


def collision_table(codes: Any, item_ids: Sequence[Any] | None = None, popularity: Any = None) -> CollisionTable:
    """Groups items `[N]` by full SID `codes [N, L]`.

    item_ids: optional ids stored in `leaf_items` instead of row indices (ValueError on duplicates).
    popularity: optional `[N]` scores; within a leaf, more popular items come first (OneRetrieval's option
      for serving a colliding SID).
    """
    codes = _check_codes(codes)
    n = codes.shape[0]
    ids = np.arange(n)
    if item_ids is not None:
        ids = np.asarray(item_ids)
        if ids.shape != (n,):
            raise ValueError(f"item_ids must have one id per code row ({n}), got shape {ids.shape}")
        uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = np.flatnonzero(counts > 1)[0]
            rows = np.flatnonzero(ids == uniq[dup])[:5].tolist()
            dup_id = uniq[dup].item() if isinstance(uniq[dup], np.generic) else uniq[dup]
            raise ValueError(f"duplicate item id {dup_id!r} at rows {rows}")
    pop = np.zeros(n) if popularity is None else -np.asarray(popularity, np.float64)
    if pop.shape != (n,):
        raise ValueError(f"popularity must be [num_items] = [{n}], got shape {pop.shape}")
    order = np.lexsort((np.arange(n), pop, *codes.T[::-1]))
    sorted_codes = codes[order]
    new_leaf = np.ones(n, bool)
    new_leaf[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    starts = np.flatnonzero(new_leaf)
    item_leaf = np.empty(n, np.int64)
    item_leaf[order] = np.cumsum(new_leaf) - 1
    offsets = np.concatenate([starts, [n]]).astype(np.int64)
    return CollisionTable(sorted_codes[starts], offsets, ids[order], item_leaf)


def add_dedup_digit(codes: Any) -> np.ndarray:
    """`[N, L + 1]`: appends each item's rank (in row order) among items with the same SID (GRID/TIGER)."""
    codes = _check_codes(codes)
    table = collision_table(codes)
    n = codes.shape[0]
    rank = np.empty(n, np.int64)
    flat_rank = np.arange(n) - np.repeat(table.leaf_offsets[:-1], np.diff(table.leaf_offsets))
    rank[table.leaf_items] = flat_rank
    return np.concatenate([codes, rank[:, None].astype(codes.dtype)], axis=1)


def codebook_stats(
    codes: Any,
    level_sizes: Sequence[int],
    *,
    num_rq_levels: int | None = None,
    reconstruction_error: Any = None,
) -> dict[str, Any]:
    """SID quality numbers, definitions as in the authors' `test_cur_icr.py` (OneSearch Table 2).

    "CUR_L1: unique L1 codes used / k1; CUR_L1xL2: unique (L1, L2) path pairs used / (k1 * k2);
    CUR_Total: unique full SIDs / total_sid_space, total_sid_space = k1 * k2 * k3;
    ICR: items whose SID is unique (count=1) / N (one-to-one identifiability)."
    Here the full SID of CUR_total is the first `num_rq_levels` positions (default all), the SID of ICR is
    every position. Also: `cur_per_level[l]` = distinct length-(l+1) prefixes / prod(sizes[:l+1]);
    `collision_rate` = 1 - distinct SIDs / N (rows that cannot have a leaf of their own);
    `max_items_per_sid`; `reconstruction_error` = mean of the given per-row errors (e.g. `encode_with_errors`),
    per stage.
    """
    codes = _check_codes(codes)
    n, num_levels = codes.shape
    sizes = [int(s) for s in level_sizes]
    if len(sizes) != num_levels:
        raise ValueError(f"{len(sizes)} level_sizes for codes with {num_levels} levels")
    bad = np.flatnonzero(((codes < 0) | (codes >= np.asarray(sizes)[None])).any(axis=1))
    if bad.size:
        raise ValueError(f"codes row {bad[0]} has a code outside the level sizes {sizes}: {codes[bad[0]].tolist()}")
    r = num_levels if num_rq_levels is None else int(num_rq_levels)

    def distinct(depth: int) -> int:
        return int(np.unique(codes[:, :depth], axis=0).shape[0])

    cur = [distinct(level + 1) / math.prod(sizes[: level + 1]) for level in range(num_levels)]
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    per_item = counts[inverse.reshape(-1)]
    stats = {
        "num_items": n,
        "cur_l1": cur[0],
        "cur_l1xl2": cur[1] if num_levels > 1 else None,
        "cur_total": cur[r - 1],
        "cur_per_level": cur,
        "icr": float(np.mean(per_item == 1)),
        "distinct_sids": int(counts.size),
        "collision_rate": 1.0 - counts.size / n,
        "max_items_per_sid": int(counts.max()),
    }
    if reconstruction_error is not None:
        stats["reconstruction_error"] = np.asarray(reconstruction_error, np.float64).mean(axis=0).tolist()
    return stats


# ----------------------------------------------------------------------------------------------------------
# Keyword enhancement (spec 1.3).


def match_keywords(text: str, keyword_pool: Sequence[str]) -> list[str]:
    """Pool keywords occurring in `text` (lower-cased), longest first, dropping any match that is a substring
    of an already kept longer match (the released code's rule after its Aho-Corasick scan)."""
    lowered = text.lower()
    found = sorted({kw.lower() for kw in keyword_pool if kw and kw.lower() in lowered}, key=lambda s: (-len(s), s))
    kept: list[str] = []
    for kw in found:
        if not any(kw in longer for longer in kept):
            kept.append(kw)
    return kept


def fuse_keywords(
    embeddings: Any,
    keyword_embeddings: Any,
    keyword_offsets: Any,
    keyword_ids: Any,
    *,
    weight: float = 0.5,
    normalize: bool = True,
) -> np.ndarray:
    """Keyword-enhanced embeddings `[N, d]`: `normalize((1 - w) e_i + w mean_{j in kw(i)} e_kw_j)`.

    embeddings: `[N, d]`; keyword_embeddings: `[K, d]`; row i's keywords are
    `keyword_ids[keyword_offsets[i]:keyword_offsets[i + 1]]` (CSR, `keyword_offsets [N + 1]`).
    Rows without keywords keep their raw embedding.
    """
    e = check_embeddings(embeddings)
    kw = check_embeddings(keyword_embeddings, "keyword_embeddings") if len(keyword_ids) else None
    offsets = np.asarray(keyword_offsets, np.int64)
    ids = np.asarray(keyword_ids, np.int64)
    n = e.shape[0]
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != ids.size or (np.diff(offsets) < 0).any():
        raise ValueError(f"keyword_offsets must be a CSR index [N + 1] = [{n + 1}] over {ids.size} keyword ids")
    if ids.size == 0:
        return e.copy()
    if kw.shape[1] != e.shape[1] or ids.min() < 0 or ids.max() >= kw.shape[0]:
        raise ValueError(f"keyword ids must index keyword_embeddings {kw.shape} with dim {e.shape[1]}")
    counts = np.diff(offsets)
    sums = np.zeros_like(e)
    np.add.at(sums, np.repeat(np.arange(n), counts), kw[ids])
    has = counts > 0
    fused = (1.0 - weight) * e[has] + weight * sums[has] / counts[has, None]
    out = e.copy()
    out[has] = _normalize_rows(fused) if normalize else fused
    return out


def embed_with_keywords(
    texts: Sequence[str],
    encoder: Any = None,
    *,
    keywords: Sequence[Sequence[str]] | None = None,
    keyword_pool: Sequence[str] | None = None,
    weight: float = 0.5,
    normalize: bool = True,
) -> np.ndarray:
    """Keyword-enhanced text embeddings `[len(texts), dim]` with one encoder for texts and keywords.

    encoder: anything with `encode(texts) -> [n, dim]`; default the real all-MiniLM-L6-v2
      (`retrieval.dense.Encoder.minilm()`).
    keywords: per text (items: picked offline); else matched against `keyword_pool` (queries); else none.
    """
    if not len(texts):
        raise ValueError("embed_with_keywords: no texts")
    if encoder is None:
        from jax_hd.retrieval.dense import Encoder

        encoder = Encoder.minilm()
    if keywords is None:
        keywords = [match_keywords(t, keyword_pool) if keyword_pool else [] for t in texts]
    if len(keywords) != len(texts):
        raise ValueError(f"{len(keywords)} keyword lists for {len(texts)} texts")
    vocab = sorted({kw for kws in keywords for kw in kws})
    index = {kw: i for i, kw in enumerate(vocab)}
    ids = [index[kw] for kws in keywords for kw in dict.fromkeys(kws)]
    offsets = np.concatenate([[0], np.cumsum([len(dict.fromkeys(kws)) for kws in keywords])])
    text_embeddings = np.asarray(encoder.encode(list(texts)), np.float32)
    keyword_embeddings = np.asarray(encoder.encode(vocab), np.float32) if vocab else np.zeros((0, 0), np.float32)
    return fuse_keywords(text_embeddings, keyword_embeddings, offsets, ids, weight=weight, normalize=normalize)
