"""Dense retrieval: a BERT-family `Encoder` and an exact inner-product `DenseIndex` (jit matmul + top-k).

The index holds the passage embeddings `[num_passages, dim]` on device, optionally sharded over every
device of a mesh along the passage axis. A search scores a fixed-size chunk of passages at a time
(`lax.scan`, keeping a running top-k), so memory is `[queries, chunk]` whatever the corpus size; with a
mesh each device takes the top-k of its own shard and the per-shard winners are merged with one more
top-k. Ties go to the lower passage index everywhere, so sharded and unsharded searches agree.

Search-R1's reference index is e5-base-v2 (mean pooling, normalised, "query: " / "passage: " prefixes,
queries cut at 256 tokens) over wiki-18 with a flat inner-product FAISS index; the same set-up here is
`Encoder.from_pretrained(e5_dir, query_prefix="query: ", passage_prefix="passage: ")` + `DenseIndex.build`.
The embedded default encoder is all-MiniLM-L6-v2 (`Encoder.minilm()`).

Corpora are read with `bm25.read_corpus` (Search-R1 jsonl).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.models import bert, hf_import
from jax_hd.retrieval import Passage
from jax_hd.retrieval.bm25 import PASSAGES_FILE, Corpus, read_corpus, write_corpus

EMBEDDINGS_FILE = "embeddings.npy"
DENSE_META_FILE = "dense_index.json"
_MASK_SCORE = float(np.finfo(np.float32).min)  # score of padding rows: finite, below any real score


def _bucket(n: int, buckets: Sequence[int], what: str) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {buckets[-1]}")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _to_host(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


# ----------------------------------------------------------------------------------------------------------
# Encoder.


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Text -> embedding pipeline around a `bert.BertEncoder`.

    pooling, normalize: `bert.pool` mode and L2 normalisation (from the model dir's sentence-transformers
      `modules.json` in `Encoder.from_pretrained`).
    max_length: tokens per text after truncation, [CLS]/[SEP] included.
    query_prefix, passage_prefix: prepended to queries / passages (E5: "query: " / "passage: ").
    batch_buckets: padded batch sizes (ascending); the largest is the encoding batch.
    length_buckets: padded lengths (ascending); lengths >= max_length are replaced by max_length itself.
    Encoding compiles at most `len(batch_buckets) * len(effective length buckets)` programs.
    """

    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 256
    query_prefix: str = ""
    passage_prefix: str = ""
    batch_buckets: tuple[int, ...] = (1, 8, 64)
    length_buckets: tuple[int, ...] = (16, 32, 64, 128, 256)

    def __post_init__(self):
        object.__setattr__(self, "batch_buckets", tuple(int(b) for b in self.batch_buckets))
        object.__setattr__(self, "length_buckets", tuple(int(b) for b in self.length_buckets))
        if self.pooling not in bert.POOLING_MODES:
            raise ValueError(f"pooling {self.pooling!r} is not one of {bert.POOLING_MODES}")
        if self.max_length < 2:
            raise ValueError(f"max_length must hold [CLS] and [SEP], got {self.max_length}")
        for name in ("batch_buckets", "length_buckets"):
            buckets = getattr(self, name)
            if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] <= 0:
                raise ValueError(f"{name} must be positive, ascending and distinct, got {buckets}")

    @property
    def lengths(self) -> tuple[int, ...]:
        """The padded lengths actually used: buckets below `max_length`, then `max_length`."""
        return (*(b for b in self.length_buckets if b < self.max_length), self.max_length)


class Encoder:
    """Tokenizer + jitted BERT forward + pooling; texts -> float32 `[n, dim]` embeddings.

    Texts are tokenised, sorted by length, and encoded in batches padded to (batch, length) buckets, so a
    whole corpus compiles a handful of programs. With a mesh, batches are split over `data` x `fsdp` (every
    batch bucket must divide by it) and params placed by their logical axes.

    Args:
      model_config: the BERT shape.
      params: `bert.BertEncoder` params (e.g. from `hf_import.load_bert`).
      tokenizer: a transformers tokenizer (e.g. `hf_import.load_tokenizer(hf_dir)`).
      config: pooling, prefixes, buckets.
      mesh, rules: optional mesh and logical-axis rules (default `sharding.DEFAULT_RULES`).
    """

    def __init__(
        self,
        model_config: bert.BertConfig,
        params: Any,
        tokenizer: Any,
        config: EncoderConfig = EncoderConfig(),
        mesh: Mesh | None = None,
        rules: sharding.Rules | None = None,
    ):
        if config.max_length > model_config.max_position_embeddings:
            raise ValueError(
                f"max_length {config.max_length} exceeds the model's {model_config.max_position_embeddings} positions"
            )
        self.model_config = model_config
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = sharding.normalize_rules(rules)
        self.pad_id = int(tokenizer.pad_token_id or 0)
        params = nn.unbox(params)
        if mesh is not None:
            split = sharding.batch_parallelism(mesh)
            bad = [b for b in config.batch_buckets if b % split]
            if bad:
                raise ValueError(f"batch buckets {bad} are not divisible by the mesh's data*fsdp = {split}")
            abstract = jax.eval_shape(functools.partial(bert.init_params, model_config), jax.random.key(0))
            params = sharding.shard_params(params, sharding.logical_shardings(abstract, mesh, self.rules))
            self._batch_sharding = sharding.batch_sharding(mesh, 2)
        self.params = params
        model = bert.BertEncoder(model_config)

        def embed(params: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
            hidden = model.apply({"params": params}, input_ids, attention_mask)
            return bert.pool(hidden, attention_mask, config.pooling, config.normalize)

        self._embed: Callable[..., jax.Array] = jax.jit(embed)

    @classmethod
    def from_pretrained(
        cls,
        hf_dir: str,
        *,
        mesh: Mesh | None = None,
        rules: sharding.Rules | None = None,
        dtype: Any = None,
        **config_overrides: Any,
    ) -> Encoder:
        """Weights, tokenizer and sentence-transformers pooling settings from a local HF dir.

        `config_overrides` set `EncoderConfig` fields (e.g. `query_prefix="query: "` for E5); `dtype` sets the
        params' and activations' dtype (default: the checkpoint's, float32 for MiniLM); pooling is always fp32.
        """
        model_config, params = hf_import.load_bert(hf_dir, dtype=dtype, activation_dtype=dtype)
        pipeline = hf_import.read_sentence_pipeline(hf_dir)
        if pipeline["max_length"] is None:
            pipeline.pop("max_length")
        else:
            pipeline["max_length"] = min(int(pipeline["max_length"]), model_config.max_position_embeddings)
        config = EncoderConfig(**{**pipeline, **config_overrides})
        return cls(model_config, params, hf_import.load_tokenizer(hf_dir), config, mesh, rules)

    @classmethod
    def minilm(cls, **kwargs: Any) -> Encoder:
        """The embedded default: all-MiniLM-L6-v2 (mean pooling, normalised, 256 tokens), 384-d."""
        return cls.from_pretrained(bert.minilm_dir(), **kwargs)

    @property
    def dim(self) -> int:
        return self.model_config.hidden_size

    def compiled_programs(self) -> int:
        """How many encoder programs have been compiled so far (one per (batch, length) bucket used)."""
        return self._embed._cache_size()

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated to `max_length` ([CLS] ... [SEP])."""
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.config.max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def _run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return self._embed(self.params, input_ids, attention_mask)
        input_ids = jax.device_put(input_ids, self._batch_sharding)
        attention_mask = jax.device_put(attention_mask, self._batch_sharding)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return self._embed(self.params, input_ids, attention_mask)

    def encode(self, texts: Sequence[str], prefix: str = "", block_size: int = 65536) -> np.ndarray:
        """Embeddings of `prefix + text` for each text: float32 `[len(texts), dim]`, in input order.

        Texts are tokenised `block_size` at a time (bounded host memory for big corpora).
        """
        cfg = self.config
        out = np.zeros((len(texts), self.dim), np.float32)
        max_batch = cfg.batch_buckets[-1]
        for block_start in range(0, len(texts), block_size):
            block = [prefix + t for t in texts[block_start : block_start + block_size]]
            token_ids = self.tokenize(block)
            order = np.argsort([-len(ids) for ids in token_ids], kind="stable")  # longest first
            pending = []
            for start in range(0, len(order), max_batch):
                rows = order[start : start + max_batch]
                batch = _bucket(len(rows), cfg.batch_buckets, "batch")
                length = _bucket(len(token_ids[rows[0]]), cfg.lengths, "length")
                input_ids = np.full((batch, length), self.pad_id, np.int32)
                attention_mask = np.zeros((batch, length), np.int32)
                for r, row in enumerate(rows):
                    ids = token_ids[row]
                    input_ids[r, : len(ids)] = ids
                    attention_mask[r, : len(ids)] = 1
                pending.append((rows, self._run(input_ids, attention_mask)))  # dispatched asynchronously
            for rows, embeddings in pending:
                out[block_start + rows] = _to_host(embeddings)[: len(rows)]
            if len(texts) > block_size:
                logging.info("encoded %d / %d texts", min(block_start + block_size, len(texts)), len(texts))
        return out

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """`[len(queries), dim]` float32 with `config.query_prefix`."""
        return self.encode(queries, self.config.query_prefix)

    def encode_passages(self, passages: Sequence[str]) -> np.ndarray:
        """`[len(passages), dim]` float32 with `config.passage_prefix`."""
        return self.encode(passages, self.config.passage_prefix)


# ----------------------------------------------------------------------------------------------------------
# Exact top-k over a chunked, optionally sharded embedding matrix.


def chunked_top_k(
    queries: jax.Array, embeddings: jax.Array, offset: jax.Array | int, num_valid: int, k: int, chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Top-k inner products of `queries` against `embeddings`, `chunk` rows at a time.

    Args:
      queries: `[num_queries, dim]`.
      embeddings: `[rows, dim]`, rows a multiple of `chunk`; row r is passage `offset + r`.
      offset: int32 scalar, the global index of row 0.
      num_valid: passages with a global index >= num_valid are padding (never returned before real ones).
      k: results per query (may exceed `rows`: the surplus is padding with index -1).
      chunk: rows scored per step; bounds memory at `[num_queries, chunk]`.
    Returns:
      `(scores [num_queries, k] float32, indices [num_queries, k] int32)`, best first, ties to the lower index.
    """
    rows, dim = embeddings.shape
    if rows % chunk:
        raise ValueError(f"{rows} rows are not a multiple of chunk {chunk}")
    num_queries = queries.shape[0]
    queries = queries.astype(embeddings.dtype)
    chunk_k = min(k, chunk)

    def step(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, jax.Array]):
        best_scores, best_indices = carry
        block, start = xs
        scores = jnp.einsum("qd,cd->qc", queries, block, preferred_element_type=jnp.float32)  # [queries, chunk]
        index = offset + start + jnp.arange(chunk, dtype=jnp.int32)
        scores = jnp.where(index[None, :] < num_valid, scores, _MASK_SCORE)
        block_scores, block_pos = jax.lax.top_k(scores, chunk_k)
        # Earlier (lower-index) winners first: top_k keeps the first of equal scores.
        merged_scores = jnp.concatenate([best_scores, block_scores], axis=1)
        merged_indices = jnp.concatenate([best_indices, index[block_pos]], axis=1)
        top_scores, top_pos = jax.lax.top_k(merged_scores, k)
        return (top_scores, jnp.take_along_axis(merged_indices, top_pos, axis=1)), None

    init = (jnp.full((num_queries, k), _MASK_SCORE, jnp.float32), jnp.full((num_queries, k), -1, jnp.int32))
    starts = jnp.arange(0, rows, chunk, dtype=jnp.int32)
    (scores, indices), _ = jax.lax.scan(step, init, (embeddings.reshape(rows // chunk, chunk, dim), starts))
    return scores, indices


class DenseIndex:
    """Exact maximum-inner-product search over passage embeddings; implements `retrieval.Retriever`.

    Args:
      embeddings: `[num_passages, dim]` (numpy or memmap; normalised for cosine similarity).
      ids, contents: per passage, as in the corpus (Search-R1 `'"Title"\\ntext'` contents).
      encoder: turns query strings into embeddings (needed by `search`, not by `search_embeddings`).
      mesh: shard the passage axis over all of this mesh's devices; None: one device.
      chunk_size: passages scored per step per device (memory `[query_bucket, chunk_size]` float32).
      query_buckets: padded query batch sizes (one program per bucket and top-k); larger batches are split.
      dtype: on-device storage of the embeddings (float32; bfloat16 / float16 halve memory, scores stay fp32).
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str],
        contents: Sequence[str],
        *,
        encoder: Encoder | None = None,
        mesh: Mesh | None = None,
        chunk_size: int = 16384,
        query_buckets: Sequence[int] = (1, 8, 64, 512),
        dtype: Any = jnp.float32,
    ):
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be [num_passages, dim], got shape {embeddings.shape}")
        self.corpus = Corpus(tuple(ids), tuple(contents))
        if len(self.corpus) != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings for {len(self.corpus)} passages")
        if not len(self.corpus):
            raise ValueError("cannot build a dense index over an empty corpus")
        if encoder is not None and encoder.dim != embeddings.shape[1]:
            raise ValueError(f"encoder dim {encoder.dim} != embeddings dim {embeddings.shape[1]}")
        self.embeddings = embeddings
        self.encoder = encoder
        self.mesh = mesh
        self.query_buckets = tuple(sorted(int(b) for b in query_buckets))
        self.dtype = jnp.dtype(dtype)
        num, dim = embeddings.shape
        self.num_shards = 1 if mesh is None else mesh.size
        per_shard = -(-num // self.num_shards)
        self.chunk = min(int(chunk_size), _round_up(per_shard, 8))
        self.rows_per_shard = _round_up(per_shard, self.chunk)
        padded = self.rows_per_shard * self.num_shards
        if padded >= 2**31:
            raise ValueError(f"{num} passages exceed the int32 passage indices of the search programs")
        if mesh is None:
            self._sharding: jax.sharding.Sharding = SingleDeviceSharding(jax.devices()[0])
        else:
            self._sharding = NamedSharding(mesh, P(mesh.axis_names, None))

        def rows(index: tuple[slice, ...]) -> np.ndarray:
            start, stop, _ = index[0].indices(padded)
            block = np.zeros((stop - start, dim), self.dtype)
            real = np.asarray(embeddings[start : min(stop, num)])
            block[: real.shape[0]] = real.astype(self.dtype)
            return block

        self.device_embeddings = jax.make_array_from_callback((padded, dim), self._sharding, rows)
        self._programs: dict[int, Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]] = {}

    def __len__(self) -> int:
        return len(self.corpus)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @classmethod
    def build(cls, encoder: Encoder, corpus: Corpus, **kwargs: Any) -> DenseIndex:
        """Encodes every passage (`encoder.encode_passages`) and indexes it; kwargs go to `DenseIndex`."""
        embeddings = encoder.encode_passages(corpus.contents)
        return cls(embeddings, corpus.ids, corpus.contents, encoder=encoder, **kwargs)

    def _program(self, k: int) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        """The jitted search for top-`k` (compiles once per query bucket)."""
        if k not in self._programs:
            self._programs[k] = self._make_program(k)
        return self._programs[k]

    def _make_program(self, k: int) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
        num, chunk, rows_per_shard = len(self), self.chunk, self.rows_per_shard
        if self.mesh is None:
            return jax.jit(lambda q, e: chunked_top_k(q, e, jnp.int32(0), num, k, chunk))
        axes = self.mesh.axis_names

        def local(q: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array]:
            offset = jax.lax.axis_index(axes).astype(jnp.int32) * rows_per_shard
            return chunked_top_k(q, e, offset, num, k, chunk)

        per_shard = jax.shard_map(
            local, mesh=self.mesh, in_specs=(P(), P(axes, None)), out_specs=(P(None, axes), P(None, axes)),
            check_vma=False,
        )

        def search(q: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array]:
            scores, indices = per_shard(q, e)  # [queries, shards * k], shard order = index order
            top_scores, pos = jax.lax.top_k(scores, k)
            return top_scores, jnp.take_along_axis(indices, pos, axis=1)

        replicated = NamedSharding(self.mesh, P())
        return jax.jit(search, in_shardings=(replicated, self._sharding), out_shardings=(replicated, replicated))

    def compiled_programs(self) -> int:
        """Search programs compiled so far (one per query bucket and top-k used)."""
        return sum(fn._cache_size() for fn in self._programs.values())

    def search_embeddings(self, query_embeddings: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by inner product.

        Args:
          query_embeddings: `[num_queries, dim]`.
          topk: results per query (capped at the number of passages).
        Returns:
          `(scores [num_queries, k] float32, indices [num_queries, k] int64)`, best first, ties to the
          lower index; k = min(topk, num_passages).
        """
        if topk <= 0:
            raise ValueError(f"topk must be positive, got {topk}")
        query_embeddings = np.asarray(query_embeddings, np.float32)
        if query_embeddings.ndim != 2 or query_embeddings.shape[1] != self.dim:
            raise ValueError(f"query embeddings must be [num_queries, {self.dim}], got {query_embeddings.shape}")
        k = min(int(topk), len(self))
        program = self._program(k)
        num_queries = query_embeddings.shape[0]
        scores = np.zeros((num_queries, k), np.float32)
        indices = np.zeros((num_queries, k), np.int64)
        step = self.query_buckets[-1]
        for start in range(0, num_queries, step):
            block = query_embeddings[start : start + step]
            padded = np.zeros((_bucket(block.shape[0], self.query_buckets, "queries"), self.dim), np.float32)
            padded[: block.shape[0]] = block
            block_scores, block_indices = program(padded, self.device_embeddings)
            scores[start : start + block.shape[0]] = _to_host(block_scores)[: block.shape[0]]
            indices[start : start + block.shape[0]] = _to_host(block_indices)[: block.shape[0]]
        return scores, indices

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """The `topk` passages with the highest inner product with each encoded query, best first."""
        if self.encoder is None:
            raise ValueError("this DenseIndex has no encoder; pass encoder=... or use search_embeddings")
        if not len(queries):
            return []
        scores, indices = self.search_embeddings(self.encoder.encode_queries(queries), topk)
        return [
            [self.corpus.passage(int(i), s) for i, s in zip(row_indices, row_scores, strict=True)]
            for row_indices, row_scores in zip(indices, scores, strict=True)
        ]

    def save(self, directory: str) -> None:
        """Writes `embeddings.npy` (float32 or float16), `passages.jsonl` (Search-R1 format) and metadata."""
        os.makedirs(directory, exist_ok=True)
        embeddings = np.asarray(self.embeddings)
        if embeddings.dtype not in (np.float32, np.float16):
            embeddings = embeddings.astype(np.float32)
        np.save(os.path.join(directory, EMBEDDINGS_FILE), embeddings)
        write_corpus(os.path.join(directory, PASSAGES_FILE), self.corpus)
        meta = {"num_passages": len(self), "dim": self.dim, "dtype": embeddings.dtype.name}
        with open(os.path.join(directory, DENSE_META_FILE), "w") as f:
            json.dump(meta, f, indent=2)

    @classmethod
    def load(cls, directory: str, *, mmap: bool = True, **kwargs: Any) -> DenseIndex:
        """Reads an index written by `save`; kwargs (encoder, mesh, chunk_size, ...) go to `DenseIndex`."""
        meta_path = os.path.join(directory, DENSE_META_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{directory} is not a saved DenseIndex (no {DENSE_META_FILE})")
        with open(meta_path) as f:
            meta = json.load(f)
        embeddings = np.load(os.path.join(directory, EMBEDDINGS_FILE), mmap_mode="r" if mmap else None)
        corpus = read_corpus(os.path.join(directory, PASSAGES_FILE))
        expected = (meta["num_passages"], meta["dim"])
        if embeddings.shape != expected or len(corpus) != expected[0]:
            raise ValueError(
                f"{directory}: embeddings {embeddings.shape} / {len(corpus)} passages do not match metadata {expected}"
            )
        return cls(embeddings, corpus.ids, corpus.contents, **kwargs)

