"""OneSearch multi-stage SFT (spec onesearch.md §1.7) on the simulated world or a real log (`config.data.source`:
KuaiSearch, Amazon 2014 / 2018 reviews, ESCI; `onesearch.sources` says what each provides and how gaps are filled).

Pipeline (`prepare` builds everything on the host, deterministically per seed):

1. texts -> embeddings: items' titles and the log's distinct queries, with the real all-MiniLM-L6-v2
   (`sid.embedder="minilm"`, cached in the workdir) or a hashed bag of words / character trigrams
   (`"hashed"`, tests); queries and items share one RQ-OPQ tokenizer (`semantic_ids.fit_transform` on their union).
2. text tokenizer: a small byte-level BPE trained locally on titles, queries and category names
   (`data.tokenizer.train_bpe_tokenizer`; no hub download), extended by `model.Vocab` with special, task, profile and
   SID tokens.
3. stage data, each example a prompt `[L_in]`, labels `[L_out]` and (stage 3) the long behaviour sequences
   `[3, max_long]` (entity ids: items, then queries offset by `num_items`; -1 padded):
   * stage 1, semantic alignment: query -> SID_q, SID_q -> query, title -> SID_i, SID_i -> title,
     query/title -> category path, SID_i -> category path;
   * stage 2, co-occurrence: query <-> clicked title, SID_q <-> SID_i of train clicks;
   * stage 3, personalisation: `model.build_input` for every (train session, clicked item) with the session's
     earlier context (`catalog.recent_context`), + sliding-window samples over users' train click sequences.
   The 9 long-sequence vectors (per-level RQ centroid sums of the click / order / search streams; the search
   stream, RSU in the paper, is taken to be the user's earlier queries quantised by the same codebooks) are summed
   per batch on the host (`long_memory`).
4. `train`: the three stages in order, each its own orbax run under `<workdir>/stage<k>/` (resumable; a finished
   stage is skipped), a fresh optimizer per stage, evaluation (`evaluate.evaluate_pairs`) after each stage.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh

from jax_hd.core import checkpoint, metrics, sharding, train_state
from jax_hd.core import config as config_lib
from jax_hd.core.metrics import write_json
from jax_hd.data import catalog as catalog_lib
from jax_hd.data.tokenizer import train_bpe_tokenizer
from jax_hd.decoding import prefix_tree as pt
from jax_hd.models import bart, qformer, qwen2
from jax_hd.onesearch import alignment, diagnostics, distill, evaluate, semantic_ids
from jax_hd.onesearch import keywords as keywords_lib
from jax_hd.onesearch import model as model_lib
from jax_hd.onesearch import sources as sources_lib

SFT_STAGES = ("stage1", "stage2", "stage3")
ALIGN_STAGES = ("dpo", "rl")
STAGES = SFT_STAGES + ALIGN_STAGES
SFT_KEYS = ("input_ids", "input_mask", "memory", "labels", "label_mask")
SID_SOFTMAX = ("sid", "split", "full")
"""config.model.sid_softmax: "sid" scores SID targets by a softmax over the SID tokens (`model.restrict_sid_logits`),
"split" also text targets over the non-SID tokens, "full" everything over the whole vocabulary (the pre-issue-21
behaviour, which collapses the text-token embeddings)."""
F = config_lib.Field
SCHEMA = {
    "seed": F(int, low=0),
    "mesh.data": F(int, low=-1),
    "mesh.fsdp": F(int, low=-1),
    "mesh.tensor": F(int, low=-1),
    "distributed.mode": F(str, choices=("auto", "always", "never")),
    "data.source": F(str, choices=sources_lib.SOURCES),
    "data.root": F(str),
    "data.reviews_path": F(str),
    "data.meta_path": F(str),
    "data.examples_path": F(str),
    "data.products_path": F(str),
    "data.locale": F(str),
    "data.esci_version": F(str, choices=sources_lib.ESCI_VERSIONS),
    "data.esci_substitute_clicks": F(bool),
    "data.skip_bad_items": F(bool),
    "data.num_items": F(int, positive=True),
    "data.num_users": F(int, positive=True),
    "data.num_sessions": F(int, positive=True),
    "data.num_intents": F(int, positive=True),
    "data.bpe_vocab_size": F(int, low=260),
    "data.max_long": F(int, positive=True),
    "data.sliding_window": F(bool),
    "data.max_examples": F(int, positive=True),
    "data.stage3_replay": F(float, low=0.0),
    "sid.embedder": F(str, choices=("minilm", "hashed")),
    "sid.embed_dim": F(int, positive=True),
    "sid.rq_sizes": F((tuple, list)),
    "sid.opq_codebook_size": F(int, low=2),
    "sid.opq_subspaces": F(int, positive=True),
    "sid.use_opq": F(bool),
    "sid.last_level_mode": F(str, choices=semantic_ids.LAST_LEVEL_MODES),
    "sid.kmeans_iters": F(int, positive=True),
    "sid.opq_iters": F(int, positive=True),
    "sid.uid_mode": F(str, choices=model_lib.UID_MODES),
    "sid.keyword_fusion": F(bool),
    "sid.keyword_weight": F(float, low=0.0, high=1.0),
    "sid.keyword_pool_size": F(int, positive=True),
    "layout.max_query_tokens": F(int, positive=True),
    "layout.max_recent": F(int, low=0),
    "layout.recent_query_tokens": F(int, low=0),
    "layout.num_memory": F(int, positive=True),
    "layout.max_task_tokens": F(int, positive=True),
    "layout.max_target_tokens": F(int, low=2),
    "layout.max_keyword_tokens": F(int, positive=True),
    "cot.enabled": F(bool),
    "cot.keyword_file": F(str),
    "cot.max_keywords": F(int, low=1, high=8),
    "cot.teacher_keywords": F(str, choices=("preference", "core")),
    "align.enabled": F(bool),
    "align.max_prompts": F(int, positive=True),
    "align.max_truth": F(int, positive=True),
    "align.num_negatives": F(int, positive=True),
    "align.ctr_prior_strength": F(float, positive=True),
    "distill.mode": F(str, choices=distill.MODES),
    "distill.kl_weight": F(float, low=0.0),
    "distill.temperature": F(float, positive=True),
    "distill.rdrop_weight": F(float, low=0.0),
    "distill.fgm_epsilon": F(float, low=0.0),
    "distill.fgm_kl": F(bool),
    "distill.focal_gamma": F(float, low=0.0),
    "distill.focal_scale": F(float, positive=True),
    "distill.ema_decay": F(float, low=0.0, high=1.0),
    "dpo.steps": F(int, low=0),
    "dpo.lr": F(float, positive=True),
    "dpo.warmup_steps": F(int, low=0),
    "dpo.batch_size": F(int, positive=True),
    "dpo.beta": F(float, positive=True),
    "dpo.use_reward_gap_weight": F(bool),
    "dpo.reward_gap_alpha": F(float, low=0.0),
    "dpo.sft_weight": F(float, low=0.0),
    "dpo.chosen_regularisation": F(bool),
    "rl.steps": F(int, low=0),
    "rl.lr": F(float, positive=True),
    "rl.warmup_steps": F(int, low=0),
    "rl.prompts_per_step": F(int, positive=True),
    "rl.num_samples": F(int, low=2),
    "rl.temperature": F(float, positive=True),
    "rl.advantage": F(str, choices=alignment.ADVANTAGES),
    "rl.gate": F(str, choices=alignment.GATES),
    "rl.position_weights": F((tuple, list)),
    "rl.item_advantage_weight": F(float, low=0.0),
    "rl.sft_weight": F(float, low=0.0),
    "rl.kl_coef": F(float, low=0.0),
    "rl.clip_eps": F(float, positive=True),
    "rl.order_value": F(float),
    "rl.click_value": F(float),
    "table.enabled": F(bool),
    "table.dpo_steps": F(int, positive=True),
    "table.rl_steps": F(int, positive=True),
    "model.backbone": F(str, choices=model_lib.BACKBONES),
    "model.sid_softmax": F(str, choices=SID_SOFTMAX),
    "model.tie_embeddings": F(bool),
    "model.d_model": F(int, positive=True),
    "model.encoder_layers": F(int, positive=True),
    "model.decoder_layers": F(int, positive=True),
    "model.heads": F(int, positive=True),
    "model.ffn_dim": F(int, positive=True),
    "model.dropout": F(float, low=0.0, high=1.0),
    "model.qformer_layers": F(int, positive=True),
    "model.qformer_heads": F(int, positive=True),
    "model.qformer_hidden": F(int, positive=True),
    "trainer.batch_size": F(int, positive=True),
    "trainer.lr": F(float, positive=True),
    "trainer.warmup_steps": F(int, low=0),
    "trainer.weight_decay": F(float, low=0.0),
    "trainer.grad_clip_norm": F(float, positive=True),
    "trainer.stage1_steps": F(int, positive=True),
    "trainer.stage2_steps": F(int, positive=True),
    "trainer.stage3_steps": F(int, positive=True),
    "trainer.log_every": F(int, positive=True),
    "trainer.checkpoint_every": F(int, positive=True),
    "trainer.keep_checkpoints": F(int, positive=True),
    "trainer.async_checkpoint": F(bool),
    "eval.num_beams": F(int, positive=True),
    "eval.top_k": F(int, positive=True),
    "eval.max_pairs": F(int, positive=True),
    "eval.batch_size": F(int, positive=True),
    "eval.unconstrained_pairs": F(int, low=0),
    "eval.long_tail_max_count": F(int, low=0),
    "eval.leave_one_out_users": F(int, low=0),
    "eval.every_stage": F(bool),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    config_lib.validate(config, SCHEMA)
    sources_lib.check_source_config(config)
    for stage in ALIGN_STAGES:
        if config[stage].steps and not config.align.enabled:
            raise config_lib.ConfigError(f"config.{stage}.steps={config[stage].steps} needs config.align.enabled=True")
    if config.rl.kl_coef:
        raise config_lib.ConfigError(
            "config.rl.kl_coef > 0 is not supported by the trainer (the released code's beta "
            "is 0); alignment.policy_loss takes ref_logp for custom loops"
        )
    if config.distill.mode != "off" and not config.cot.enabled:
        logging.warning(
            "distill.mode=%s without cot.enabled: no keyword prompts, the teacher reads the student's "
            "prompt and the KL is 0",
            config.distill.mode,
        )
    if config.eval.top_k > config.eval.num_beams * 64:
        raise config_lib.ConfigError(f"config.eval.top_k={config.eval.top_k} is far beyond the beam width")


# ----------------------------------------------------------------------------------------------------------
# Embeddings and tokenizers.


def hashed_embeddings(texts: Sequence[str], dim: int, seed: int = 0) -> np.ndarray:
    """Deterministic lexical embeddings `[n, dim]` float32: signed hashes of words and character trigrams, L2-normed."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(",", " ").split():
            grams = [word] + [word[j : j + 3] for j in range(max(1, len(word) - 2))]
            for g in grams:
                h = zlib.crc32(f"{seed}:{g}".encode())
                out[i, h % dim] += 1.0 if (h >> 16) & 1 else -1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)


def embed_texts(texts: Sequence[str], config: ml_collections.ConfigDict, cache_dir: str | None) -> np.ndarray:
    """`[n, d]` embeddings of `texts` with `config.sid.embedder`; MiniLM results are cached as `.npy` in `cache_dir`."""
    if config.sid.embedder == "hashed":
        return hashed_embeddings(texts, config.sid.embed_dim, config.seed)
    digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"minilm_{digest}.npy") if cache_dir else None
    if path and os.path.exists(path):
        return np.load(path)
    from jax_hd.retrieval.dense import Encoder

    x = np.asarray(Encoder.minilm().encode(list(texts)), np.float32)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        np.save(path, x)
    return x


def keyword_pool(log: catalog_lib.QueryLog, max_size: int) -> list[str]:
    """The KHQE keyword pool (spec §1.3): core keywords of train sessions with a click, by descending session count
    (the paper's page views; ties alphabetical), at most `max_size`; empty when the log has no keywords."""
    clicked = np.zeros(len(log), bool)
    clicked[log.impression_session[log.clicked]] = True
    counts: dict[str, int] = {}
    for s in np.flatnonzero(clicked & (log.splits == "train")).tolist():
        for kw in dict.fromkeys(log.keywords[s]):
            counts[kw] = counts.get(kw, 0) + 1
    return [kw for kw, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))][:max_size]


def keyword_enhanced(
    texts: Sequence[str],
    embeddings: np.ndarray,
    pool: Sequence[str],
    config: ml_collections.ConfigDict,
    cache_dir: str | None,
) -> tuple[np.ndarray, float]:
    """KHQE fusion (spec §1.3): `(normalize((1 - w) e + w mean(e_kw)) [n, d], share of texts with a keyword)`, the
    keywords of a text being the pool entries it contains (`semantic_ids.match_keywords`: the query side's
    Aho-Corasick match; for item titles it stands in for the paper's offline Qwen-VL pick from the pool)."""
    matched = [semantic_ids.match_keywords(t, pool) for t in texts]
    vocab = sorted({kw for kws in matched for kw in kws})
    if not vocab:
        return embeddings, 0.0
    index = {kw: i for i, kw in enumerate(vocab)}
    ids = [index[kw] for kws in matched for kw in kws]
    offsets = np.concatenate([[0], np.cumsum([len(kws) for kws in matched])])
    fused = semantic_ids.fuse_keywords(
        embeddings, embed_texts(vocab, config, cache_dir), offsets, ids, weight=config.sid.keyword_weight
    )
    return fused, float(np.mean([bool(kws) for kws in matched]))


def sid_config(config: ml_collections.ConfigDict) -> semantic_ids.SemanticIDConfig:
    s = config.sid
    return semantic_ids.SemanticIDConfig(
        rq_sizes=tuple(s.rq_sizes),
        last_level_mode=s.last_level_mode,
        use_opq=s.use_opq,
        opq_subspaces=s.opq_subspaces,
        opq_codebook_size=s.opq_codebook_size,
        opq_iters=s.opq_iters,
        kmeans_iters=s.kmeans_iters,
        opq_kmeans_iters=max(2, s.kmeans_iters // 2),
        seed=config.seed,
    )


def centroid_rows(
    sid_model: semantic_ids.SemanticIDModel, codes: np.ndarray
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Per RQ level, the centroid table `[k_l, d]` and each row's centroid index `[n, num_rq]` (RQ part only, spec
    §1.5: the long sequence uses no OPQ codes). A per-parent last level indexes the stacked parent centroids."""
    cfg = sid_model.config
    tables, rows = [], []
    for level in range(cfg.num_rq_levels):
        if level == cfg.num_rq_levels - 1 and sid_model.parent_books is not None:
            books = sid_model.parent_books
            if cfg.last_level_mode == "per_parent_l2":
                key = codes[:, level - 1].astype(np.int64)
            else:
                key = codes[:, level - 2].astype(np.int64) * cfg.rq_sizes[level - 1] + codes[:, level - 1]
            slot = np.clip(np.searchsorted(books.keys, key), 0, len(books.keys) - 1)
            tables.append(np.asarray(books.centroids, np.float32))
            rows.append(books.offsets[slot] + codes[:, level])
        else:
            tables.append(np.asarray(sid_model.rq_codebooks[level], np.float32))
            rows.append(codes[:, level].astype(np.int64))
    return tuple(tables), np.stack(rows, axis=1).astype(np.int32)


def long_memory(tables: Sequence[np.ndarray], entity_rows: np.ndarray, sequences: np.ndarray) -> np.ndarray:
    """The 9 long-sequence vectors: `sequences [b, S, n]` entity ids (-1 pad) -> `[b, S * R, d]` float32, row
    `s * R + l` = sum over stream s of the level-l centroids (R RQ levels)."""
    valid = (sequences >= 0)[..., None].astype(np.float32)
    rows = entity_rows[np.maximum(sequences, 0)]  # [b, S, n, R]
    sums = [(table[rows[..., level]] * valid).sum(axis=2) for level, table in enumerate(tables)]  # [b, S, d] each
    return np.stack(sums, axis=2).reshape(sequences.shape[0], -1, tables[0].shape[1]).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Data.


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """input_ids `[n, L_in]` int32 (right-padded), labels `[n, L_out]` int32 (pad 0), long `[n, 3, max_long]` int32
    entity ids (-1 pad), targets `[n]` int32 item rows (-1: not an item target), queries `[n]` str;
    teacher_input_ids `[n, L_in]` int32 (only with `config.cot.enabled`, else None): the self-distillation teacher
    prompt, the student's with the keyword segment (`model.add_keywords`); equal to input_ids where a row has no
    keywords (every stage-1/2 row)."""

    input_ids: np.ndarray
    labels: np.ndarray
    long: np.ndarray
    targets: np.ndarray
    queries: np.ndarray
    teacher_input_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: np.ndarray) -> Examples:
        teacher = None if self.teacher_input_ids is None else self.teacher_input_ids[rows]
        return Examples(
            self.input_ids[rows], self.labels[rows], self.long[rows], self.targets[rows], self.queries[rows], teacher
        )


def concat_examples(first: Examples, second: Examples) -> Examples:
    """Rows of `first` then `second` (same padded lengths; teacher prompts on both or neither)."""
    if (first.teacher_input_ids is None) != (second.teacher_input_ids is None):
        raise ValueError("concat_examples: teacher prompts on one side only")
    teacher = None
    if first.teacher_input_ids is not None:
        teacher = np.concatenate([first.teacher_input_ids, second.teacher_input_ids])
    return Examples(
        *(np.concatenate([getattr(first, f), getattr(second, f)]) for f in ("input_ids", "labels", "long", "targets")),
        np.concatenate([first.queries, second.queries]).astype(np.str_),
        teacher,
    )


BEHAVIOUR_LEVELS = ("search_order", "recommend_order", "click", "exposed", "same_category", "other_category")
"""Spec §1.7's six behaviour levels (weights `BEHAVIOUR_WEIGHTS`); DPO negatives come from the bottom three:
exposed-not-clicked, same category not exposed, a random item of another category."""
BEHAVIOUR_WEIGHTS = (2.0, 1.5, 1.0, 0.5, 0.2, 0.0)
NEGATIVE_LEVELS = (3, 4, 5)


@dataclasses.dataclass(frozen=True, eq=False)
class CtrTable:
    """Calibrated posterior CTR per (query, item) from the train log (spec §2.6 R_CTR).

    ctr = (clicks + a * prior) / (impressions + a) with a = `strength` and prior = the item's own calibrated CTR
    (item clicks + a * global CTR) / (item impressions + a), so unseen pairs fall back to the item, unseen items to
    the global rate. pair_keys `[pairs]` int64 sorted (query row * num_items + item), pair_clicks /
    pair_impressions `[pairs]` int64, item_prior `[items]` float64.
    """

    pair_keys: np.ndarray
    pair_clicks: np.ndarray
    pair_impressions: np.ndarray
    item_prior: np.ndarray
    strength: float
    num_items: int

    def __call__(self, query_rows: Any, items: Any) -> np.ndarray:
        """`[n, c]` float32 CTRs of items `[n, c]` (catalog rows; negative -> 0) for query rows `[n]`."""
        items = np.asarray(items, np.int64)
        q = np.asarray(query_rows, np.int64).reshape(-1, *([1] * (items.ndim - 1)))
        valid = items >= 0
        keys = q * self.num_items + np.maximum(items, 0)
        slot = np.clip(np.searchsorted(self.pair_keys, keys), 0, max(len(self.pair_keys) - 1, 0))
        found = (self.pair_keys[slot] == keys) if len(self.pair_keys) else np.zeros(keys.shape, bool)
        clicks = np.where(found, self.pair_clicks[slot] if len(self.pair_keys) else 0, 0)
        imps = np.where(found, self.pair_impressions[slot] if len(self.pair_keys) else 0, 0)
        prior = self.item_prior[np.maximum(items, 0)]
        ctr = (clicks + self.strength * prior) / (imps + self.strength)
        return np.where(valid, ctr, 0.0).astype(np.float32)


def ctr_table(log: catalog_lib.QueryLog, query_row: dict[str, int], num_items: int, strength: float) -> CtrTable:
    """The `CtrTable` of a (train) log; `query_row` maps every query of `log` to its row."""
    if strength <= 0:
        raise ValueError(f"ctr prior strength must be > 0, got {strength}")
    q = np.asarray([query_row[x] for x in log.queries.tolist()], np.int64)[log.impression_session]
    items = log.impressed_items.astype(np.int64)
    clicked = log.clicked.astype(np.int64)
    item_imps = np.bincount(items, minlength=num_items)
    item_clicks = np.bincount(items, weights=clicked, minlength=num_items)
    global_ctr = clicked.sum() / max(len(clicked), 1)
    item_prior = (item_clicks + strength * global_ctr) / (item_imps + strength)
    keys, inverse, imps = np.unique(q * num_items + items, return_inverse=True, return_counts=True)
    clicks = np.bincount(inverse, weights=clicked, minlength=len(keys)).astype(np.int64)
    return CtrTable(keys, clicks, imps.astype(np.int64), item_prior, float(strength), num_items)


@dataclasses.dataclass(frozen=True, eq=False)
class AlignData:
    """Behaviour-preference alignment data (spec §1.7 phase 2, §2.6), one row per sampled train session with a
    click (`n` rows).

    examples: the personalised prompts as in stage 3 (with teacher prompts when cot is on); labels / targets: the
      chosen item's SID / row. sessions `[n]` int64 rows of `world.log`; query_rows `[n]` int32 (`Setup.query_row`).
    truth `[n, T]` int32 item rows, ordered items first, then clicked ones (-1 pad); truth_ordered `[n, T]` bool.
    chosen `[n]` int32: the top behaviour item (= truth[:, 0]).
    negatives `[n, K]` int32 item rows (-1 pad) and negative_levels `[n, K]` int8 (index into BEHAVIOUR_LEVELS, -1
      pad): drawn round-robin from exposed-not-clicked, same category not exposed, random other category; never a
      truth item.
    ctr: the calibrated CTR table (`item_rewards`).
    relevance: judged (query, item) relevance of a real log (`item_rewards`); None for the simulated world, whose
      latent intents score any item.
    """

    examples: Examples
    sessions: np.ndarray
    query_rows: np.ndarray
    truth: np.ndarray
    truth_ordered: np.ndarray
    chosen: np.ndarray
    negatives: np.ndarray
    negative_levels: np.ndarray
    ctr: CtrTable
    relevance: sources_lib.RelevanceTable | None = None

    def __len__(self) -> int:
        return len(self.sessions)


@dataclasses.dataclass(eq=False)
class Setup:
    """Everything `prepare` builds on the host."""

    config: ml_collections.ConfigDict
    source: sources_lib.SourceData
    vocab: model_lib.Vocab
    layout: model_lib.LayoutConfig
    model_config: model_lib.OneSearchConfig
    sid_model: semantic_ids.SemanticIDModel
    item_codes: np.ndarray
    query_codes: np.ndarray
    query_row: dict[str, int]
    tables: tuple[np.ndarray, ...]
    entity_rows: np.ndarray
    tree: pt.PrefixTree
    collisions: semantic_ids.CollisionTable
    item_clicks: np.ndarray
    stages: dict[str, Examples]
    eval_sets: dict[str, Examples]
    eval_slices: dict[str, dict[str, np.ndarray]]
    popularity: dict[str, np.ndarray]
    loo: dict[str, np.ndarray] | None
    info: dict[str, Any]
    cache: dict[Any, Any] = dataclasses.field(default_factory=dict)
    align: AlignData | None = None

    @property
    def world(self) -> catalog_lib.SimulatedWorld | None:
        """The simulated world behind the data (None for a real log)."""
        return self.source.world

    @property
    def input_length(self) -> int:
        return self.stages["stage1"].input_ids.shape[1]


class _Tokens:
    """Cached BPE ids of strings."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {}

    def warm(self, texts: Sequence[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            for t, ids in zip(todo, self.tokenizer(todo, add_special_tokens=False)["input_ids"], strict=True):
                self.cache[t] = list(ids)

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            self.warm([text])
        return self.cache[text]


def build_model_config(
    config: ml_collections.ConfigDict, vocab: model_lib.Vocab, memory_dim: int, input_len: int
) -> model_lib.OneSearchConfig:
    """The generator's config from `config.model` / `config.layout` and the vocabulary."""
    m = config.model
    qf = qformer.QFormerConfig(
        vocab_size=8,
        hidden_size=m.qformer_hidden,
        num_hidden_layers=m.qformer_layers,
        num_attention_heads=m.qformer_heads,
        intermediate_size=2 * m.qformer_hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=8,
        cross_attention_frequency=1,
        encoder_hidden_size=memory_dim,
        num_query_tokens=config.layout.num_memory,
    )
    common = dict(
        backbone=m.backbone,
        qformer=qf,
        mem_token_id=vocab.special("[MEM]"),
        decoder_start_token_id=vocab.special("[DEC]"),
        pad_token_id=vocab.pad_id,
        num_memory_vectors=3 * len(config.sid.rq_sizes),
        sid_token_range=None if m.sid_softmax == "full" else vocab.sid_range,
        restrict_text_targets=m.sid_softmax == "split",
    )
    max_len = max(64, input_len + 2 * label_length(config, vocab.num_levels))
    if m.backbone == "bart":
        b = bart.BartConfig(
            vocab_size=vocab.vocab_size, d_model=m.d_model, encoder_layers=m.encoder_layers,
            decoder_layers=m.decoder_layers, encoder_attention_heads=m.heads, decoder_attention_heads=m.heads,
            encoder_ffn_dim=m.ffn_dim, decoder_ffn_dim=m.ffn_dim, max_position_embeddings=max_len,
            pad_token_id=vocab.pad_id, bos_token_id=vocab.special("[BOS]"), eos_token_id=vocab.special("[EOS]"),
            decoder_start_token_id=vocab.special("[DEC]"), dropout=m.dropout, tie_word_embeddings=m.tie_embeddings,
        )  # fmt: skip
        return model_lib.OneSearchConfig(bart=b, **common)
    q = qwen2.Qwen2Config(
        vocab_size=vocab.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
        num_hidden_layers=m.encoder_layers + m.decoder_layers, num_attention_heads=m.heads,
        num_key_value_heads=m.heads, rope_theta=10000.0, max_position_embeddings=max_len,
        tie_word_embeddings=m.tie_embeddings,
    )  # fmt: skip
    return model_lib.OneSearchConfig(qwen2=q, **common)


def label_length(config: ml_collections.ConfigDict, num_levels: int) -> int:
    """Padded label length: `layout.max_target_tokens`, grown with `cot.enabled` to hold `cot.max_keywords` keyword
    SIDs + [EOS] and a keyword text target of `layout.max_keyword_tokens` + [EOS]."""
    n = config.layout.max_target_tokens
    if config.cot.enabled:
        n = max(n, config.cot.max_keywords * num_levels + 1, config.layout.max_keyword_tokens + 1)
    return n


def simulated_world_of(config: ml_collections.ConfigDict) -> catalog_lib.SimulatedWorld:
    """The simulated world of `config.seed` / `config.data` (what `prepare` reads when `data.source="simulated"`)."""
    return sources_lib.simulated_world_of(config)


def _category_members(catalog: catalog_lib.Catalog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Items grouped by full category path: (category `[items]`, members sorted by category, offsets)."""
    _, category = np.unique(np.asarray(["\x1f".join(p) for p in catalog.category_paths.tolist()]), return_inverse=True)
    members = np.argsort(category, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(category))])
    return category, members, offsets


def draw_negatives(
    rng: np.random.Generator,
    exposed: np.ndarray,
    banned: set[int],
    chosen: int,
    category: np.ndarray,
    members: np.ndarray,
    offsets: np.ndarray,
    k: int,
) -> tuple[list[int], list[int]]:
    """`k` DPO negatives (item rows, behaviour levels), round-robin over the bottom levels (spec §1.7 phase 2):
    exposed-not-clicked `exposed` (display order), same category as `chosen` not exposed, random other category.
    Items in `banned` (the session's impressions and truth) are never drawn as unexposed negatives. Fewer than `k`
    when the levels run out."""
    c = int(category[chosen])
    same = members[offsets[c] : offsets[c + 1]]
    same = [int(i) for i in rng.permutation(same).tolist() if i not in banned][:k]
    other = rng.integers(0, len(category), 4 * k + 8)
    other = [int(i) for i in dict.fromkeys(other.tolist()) if category[i] != c and i not in banned][:k]
    pools = [[int(i) for i in exposed], same, other]
    items: list[int] = []
    levels: list[int] = []
    while len(items) < k and any(pools):
        for level, pool in zip(NEGATIVE_LEVELS, pools, strict=True):
            while pool and len(items) < k:
                item = pool.pop(0)
                if item not in items:
                    items.append(item)
                    levels.append(level)
                    break
    return items, levels


def _user_sessions(log: catalog_lib.QueryLog, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sessions grouped by user (`users [sessions]` int rows) in time order: (order `[sessions]`, offsets)."""
    order = np.lexsort((np.arange(len(log)), log.timestamps, users))
    counts = np.bincount(users, minlength=int(users.max(initial=-1)) + 1)
    return order, np.concatenate([[0], np.cumsum(counts)])


def prepare(config: ml_collections.ConfigDict, cache_dir: str | None = None) -> Setup:
    """Reads the data source (`sources.load_source`: the simulated world or a real log), builds SIDs, tokenizer,
    vocabulary and every stage's / evaluation set's examples."""
    t0 = time.time()
    d, lay, cot = config.data, config.layout, config.cot
    source = sources_lib.load_source(config)
    cat, log, users = source.catalog, source.log, source.users
    n_items = len(cat)
    queries = sorted(set(log.queries.tolist()))
    query_row = {q: i for i, q in enumerate(queries)}

    # 1. SIDs over items + queries (shared codebooks).
    titles = cat.titles.tolist()
    embeddings = embed_texts(titles + queries, config, cache_dir)
    keyword_coverage = 0.0
    if config.sid.keyword_fusion:
        pool = keyword_pool(log, config.sid.keyword_pool_size)
        embeddings, keyword_coverage = keyword_enhanced(titles + queries, embeddings, pool, config, cache_dir)
    sid_model, codes = semantic_ids.fit_transform(embeddings, sid_config(config))
    item_codes, query_codes = codes[:n_items], codes[n_items:]
    tables, entity_rows = centroid_rows(sid_model, codes)
    stats = semantic_ids.codebook_stats(item_codes, sid_model.level_sizes, num_rq_levels=len(config.sid.rq_sizes))

    # 2. Tokenizer and vocabulary.
    cat_texts = [" > ".join(c for c in row if c) for row in cat.category_paths.tolist()]
    tokenizer = train_bpe_tokenizer(titles + queries + cat_texts, vocab_size=d.bpe_vocab_size, extra_tokens=())
    tokens = _Tokens(tokenizer)
    tokens.warm(titles + queries + sorted(set(cat_texts)))
    profile_values = ()
    if users is not None:
        profile_values = tuple(
            sorted({f"gender:{g}" for g in users.genders.tolist()} | {f"age:{a}" for a in users.age_buckets})
        )
    vocab = model_lib.Vocab(len(tokenizer), sid_model.level_sizes, sid_model.level_offsets, profile_values)
    layout = model_lib.LayoutConfig(
        max_query_tokens=lay.max_query_tokens, max_recent=lay.max_recent, recent_query_tokens=lay.recent_query_tokens,
        num_memory=lay.num_memory, max_task_tokens=lay.max_task_tokens,
        max_target_tokens=label_length(config, vocab.num_levels),
        max_keyword_tokens=lay.max_keyword_tokens if cot.enabled else 0,
    )  # fmt: skip
    input_len = layout.input_length(vocab.num_levels)
    model_config = build_model_config(config, vocab, embeddings.shape[1], input_len)

    # Statistics from the train split: clicks per item, per (query, item).
    train = log.split("train")
    sess = train.impression_session
    clicked = train.clicked
    item_clicks = np.bincount(train.impressed_items[clicked], minlength=n_items).astype(np.int64)
    q_of_click = np.asarray([query_row[q] for q in train.queries[sess[clicked]].tolist()], np.int64)
    pair = q_of_click * n_items + train.impressed_items[clicked]
    uniq_pair, pair_counts = np.unique(pair, return_counts=True)
    query_clicks: dict[int, list[int]] = {}
    ranked_pairs = sorted(
        zip(uniq_pair.tolist(), pair_counts.tolist(), strict=True), key=lambda x: (x[0] // n_items, -x[1])
    )
    for p, _ in ranked_pairs:
        query_clicks.setdefault(p // n_items, []).append(p % n_items)
    global_top = np.argsort(-item_clicks, kind="stable")[: max(lay.max_recent, 1)].tolist()
    query_train_count = np.bincount([query_row[q] for q in train.queries.tolist()], minlength=len(queries))

    def fallback(query: str) -> list[int]:
        """Cold users: items most clicked for the query (spec §1.5), else globally."""
        return (query_clicks.get(query_row[query], []) + global_top)[: max(lay.max_recent, 1)]

    # Behaviour context per session and per history event.
    history = catalog_lib.history_from_log(log)
    user_of = history.row_of
    profile_row = users.row_of if users is not None else {}
    session_users = np.asarray([user_of.get(u, -1) for u in log.user_ids.tolist()])
    order, offsets = _user_sessions(log, np.maximum(session_users, 0))
    sess_times = log.timestamps[order]
    encode_fn = functools.partial(semantic_ids.encode, sid_model)

    def context_example(user_id: str, t: int, query: str, recent: list[int], recent_q: list[str], long_slice: slice):
        """(prompt ids, long entity ids [3, max_long]) for a request at time t."""
        h_items = history.items[long_slice][-d.max_long :]
        h_actions = history.actions[long_slice][-d.max_long :]
        u = user_of.get(user_id, -1)
        searches: list[int] = []
        if u >= 0:
            lo, hi = offsets[u], offsets[u + 1]
            end = lo + int(np.searchsorted(sess_times[lo:hi], t, side="left"))
            searches = [n_items + query_row[q] for q in log.queries[order[max(lo, end - d.max_long) : end]].tolist()]
        long = np.full((3, d.max_long), -1, np.int32)
        long[0, : len(h_items)] = h_items
        orders = h_items[h_actions == catalog_lib.ACTION_ORDER]
        long[1, : len(orders)] = orders
        long[2, : len(searches)] = searches
        short = recent if recent else fallback(query)
        long_items = h_items.tolist() if len(h_items) else short
        if config.sid.uid_mode == "centroid":
            uid = model_lib.behaviour_uid(
                item_codes[short], item_codes[long_items], mode="centroid", encode_fn=encode_fn,
                short_embeddings=embeddings[short], long_embeddings=embeddings[long_items],
            )  # fmt: skip
        else:
            uid = model_lib.behaviour_uid(item_codes[short], item_codes[long_items])
        ids, _ = model_lib.build_input(
            vocab, layout, uid=uid, query_ids=tokens(query), query_sid=query_codes[query_row[query]],
            recent_queries=[(tokens(q), query_codes[query_row[q]]) for q in recent_q if q in query_row],
            recent_items=[item_codes[i] for i in recent], profile=profile_of(user_id),
        )  # fmt: skip
        return ids, long

    context = catalog_lib.recent_context(log, history, k=max(lay.max_recent, 1))

    def profile_of(user_id: str) -> list[str]:
        p = profile_row.get(user_id)
        return [] if p is None else [f"gender:{users.genders[p]}", f"age:{users.age_buckets[p]}"]

    # V2 keyword thoughts per session (spec §2.3): the simulator's, or a keyword file's for this catalogue.
    core_kw: list[tuple[str, ...]] = []
    pref_kw: list[tuple[str, ...]] = []
    if cot.enabled:
        kw_file = None
        if cot.keyword_file:
            fingerprint = keywords_lib.catalogue_fingerprint(cat.item_ids.tolist())
            kw_file = keywords_lib.read_keyword_file(cot.keyword_file, catalogue=fingerprint)
        core_kw, pref_kw = keywords_lib.session_thoughts(log, kw_file)
    teacher_kw = pref_kw if cot.teacher_keywords == "preference" else core_kw

    def teacher_prompt(ids: np.ndarray, session: int) -> np.ndarray:
        """The student prompt + the session's keyword segment (unchanged for -1 / a session without keywords)."""
        if session < 0:
            return ids
        return model_lib.add_keywords(vocab, layout, ids, [tokens(k) for k in teacher_kw[session]])

    def session_prompt(s: int) -> tuple[np.ndarray, np.ndarray]:
        """(personalised prompt ids, long entity ids [3, max_long]) of log session `s`."""
        n = int(context["num_recent"][s])
        user_id, t, query = str(log.user_ids[s]), int(log.timestamps[s]), str(log.queries[s])
        u = user_of.get(user_id, -1)
        long_slice = history.recent(u, t, d.max_long) if u >= 0 else slice(0, 0)
        return context_example(
            user_id,
            t,
            query,
            context["recent_items"][s, :n].tolist(),
            context["recent_queries"][s, :n].tolist(),
            long_slice,
        )

    def session_examples(rows: np.ndarray, which: str, limit: int) -> tuple[list, list, list, list, list]:
        prompts, longs, targets, qs, sessions = [], [], [], [], []
        for s in rows.tolist():
            imp = log.impressions(s)
            flags = log.ordered[imp] if which == "order" else log.clicked[imp]
            items = log.impressed_items[imp][flags]
            if not len(items):
                continue
            ids, long = session_prompt(s)
            for item in items.tolist():
                prompts.append(ids)
                longs.append(long)
                targets.append(item)
                qs.append(str(log.queries[s]))
                sessions.append(s)
            if len(targets) >= limit:
                break
        return prompts, longs, targets, qs, sessions

    def pack(prompts, longs, labels, targets, qs, sessions=None) -> Examples:
        """Padded examples; with cot on, teacher prompts from `sessions` (log rows, -1 none; None: teacher ==
        student)."""
        x, _ = model_lib.pad_rows(prompts, input_len, vocab.pad_id)
        y, _ = model_lib.pad_rows(labels, layout.max_target_tokens, vocab.pad_id)
        long = np.stack(longs) if longs else np.full((len(prompts), 3, d.max_long), -1, np.int32)
        teacher = None
        if cot.enabled:
            teacher = x.copy()
            if sessions is not None:
                rows = [teacher_prompt(p, s) for p, s in zip(prompts, sessions, strict=True)]
                teacher, _ = model_lib.pad_rows(rows, input_len, vocab.pad_id)
        return Examples(x, y, long, np.asarray(targets, np.int32), np.asarray(qs, dtype=np.str_), teacher)

    rng = np.random.default_rng(config.seed)
    sid_tok = vocab.sid_tokens
    # V1 targets keep the configured length (identical rows with cot on); CoT targets use the grown label length.
    target = functools.partial(
        model_lib.build_target, vocab, dataclasses.replace(layout, max_target_tokens=lay.max_target_tokens)
    )
    task = functools.partial(model_lib.build_task_input, vocab, layout)

    # 3a. Stage 1: semantic alignment ([TEXT2CAT] / [SID2CAT] only where the source knows the category).
    query_cat = source.query_category
    tokens.warm(sorted(set(query_cat.values())))
    s1: list[tuple[np.ndarray, np.ndarray]] = []
    item_sample = rng.permutation(n_items)[: d.max_examples // 4]
    for i in item_sample.tolist():
        title, sid, cat_ids = tokens(titles[i]), sid_tok(item_codes[i]), tokens(cat_texts[i])
        s1 += [(task("[I2SID]", title), target(sid, eos=False)), (task("[SID2I]", sid), target(title, eos=True))]
        if cat_texts[i]:
            s1 += [
                (task("[TEXT2CAT]", title), target(cat_ids, eos=True)),
                (task("[SID2CAT]", sid), target(cat_ids, eos=True)),
            ]
    for q in queries:
        qi, sid = tokens(q), sid_tok(query_codes[query_row[q]])
        s1 += [(task("[Q2SID]", qi), target(sid, eos=False)), (task("[SID2Q]", sid), target(qi, eos=True))]
        if q in query_cat:
            s1.append((task("[TEXT2CAT]", qi), target(tokens(query_cat[q]), eos=True)))
    # 3b. Stage 2: co-occurrence of train clicks.
    s2: list[tuple[np.ndarray, np.ndarray]] = []
    for p in uniq_pair[rng.permutation(len(uniq_pair))[: d.max_examples // 4]].tolist():
        q, i = queries[p // n_items], p % n_items
        qi, title = tokens(q), tokens(titles[i])
        q_sid, i_sid = sid_tok(query_codes[query_row[q]]), sid_tok(item_codes[i])
        s2 += [
            (task("[Q2I]", qi), target(title, eos=True)),
            (task("[I2Q]", title), target(qi, eos=True)),
            (task("[QSID2ISID]", q_sid), target(i_sid, eos=False)),
            (task("[ISID2QSID]", i_sid), target(q_sid, eos=False)),
        ]

    def task_examples(pairs) -> Examples:
        pairs = [pairs[i] for i in rng.permutation(len(pairs))[: d.max_examples]]
        return pack([p for p, _ in pairs], [], [y for _, y in pairs], [-1] * len(pairs), [""] * len(pairs))

    # 3c. Stage 3: personalised samples + sliding windows over users' train click sequences.
    train_rows = np.flatnonzero(log.splits == "train")
    prompts, longs, targets3, qs3, sessions3 = session_examples(rng.permutation(train_rows), "click", d.max_examples)
    num_base = len(prompts)
    num_window = 0
    session_at: dict[tuple[str, int, str], int] = {}
    if cot.enabled:  # a history event's session, for its keywords
        keys = zip(log.user_ids.tolist(), log.timestamps.tolist(), log.queries.tolist(), strict=True)
        session_at = {key: s for s, key in enumerate(keys)}
    if d.sliding_window and lay.max_recent > 0:
        train_history = catalog_lib.history_from_log(log, splits=("train",))
        for u in rng.permutation(len(train_history)).tolist():
            if len(prompts) >= num_base + d.max_examples // 2:
                break
            lo = int(train_history.offsets[u])
            seq = train_history.sequence(u).tolist()
            user_id = str(train_history.user_ids[u])
            hu = user_of[user_id]
            for t, (prefix, nxt) in enumerate(model_lib.sliding_window_examples(seq, lay.max_recent), start=1):
                ev = lo + t
                when = int(train_history.timestamps[ev])
                query = str(train_history.queries[ev])
                prefix_q = train_history.queries[ev - len(prefix) : ev].tolist()
                long_end = int(history.offsets[hu]) + t  # train events come first in the user's full history
                long_slice = slice(max(int(history.offsets[hu]), long_end - d.max_long), long_end)
                ids, long = context_example(user_id, when, query, prefix, prefix_q, long_slice)
                prompts.append(ids)
                longs.append(long)
                targets3.append(nxt)
                qs3.append(query)
                sessions3.append(session_at.get((user_id, when, query), -1))
                num_window += 1
    labels3 = [target(sid_tok(item_codes[i]), eos=False) for i in targets3]
    stages = {
        "stage1": task_examples(s1),
        "stage2": task_examples(s2),
        "stage3": pack(prompts, longs, labels3, targets3, qs3, sessions3),
    }

    # 3d. V2: the four keyword CoT tasks join stage 1 (own rng: the V1 rows above are unchanged).
    num_cot = 0
    if cot.enabled:
        cot_rng = np.random.default_rng([config.seed, 0xC07])
        query_core: dict[str, tuple[str, ...]] = {}
        for q, kws in zip(log.queries.tolist(), core_kw, strict=True):
            if kws and q not in query_core:
                query_core[q] = kws[: cot.max_keywords]
        pkw_sessions = [s for s in cot_rng.permutation(train_rows).tolist() if pref_kw[s]][: d.max_examples // 4]
        kw_texts = sorted(
            {k for kws in query_core.values() for k in kws} | {k for s in pkw_sessions for k in pref_kw[s]}
        )
        kw_codes = {}
        if kw_texts:
            codes_kw = semantic_ids.encode(sid_model, embed_texts(kw_texts, config, cache_dir))
            kw_codes = dict(zip(kw_texts, codes_kw, strict=True))

        cot_target = functools.partial(model_lib.build_target, vocab, layout, eos=True)

        def kw_text(kws: Sequence[str]) -> np.ndarray:
            return cot_target(model_lib.keyword_tokens(vocab, [tokens(k) for k in kws], lay.max_keyword_tokens))

        def kw_sids(kws: Sequence[str]) -> np.ndarray:
            return cot_target(np.concatenate([sid_tok(kw_codes[k]) for k in kws[: cot.max_keywords]]))

        s1_cot: list[tuple[np.ndarray, np.ndarray]] = []
        for q in queries:
            if q in query_core:
                s1_cot += [
                    (task("[Q2KW]", tokens(q)), kw_text(query_core[q])),
                    (task("[QSID2KWSID]", sid_tok(query_codes[query_row[q]])), kw_sids(query_core[q])),
                ]
        # "User info" = the personalised layout's recent queries (text + SID) and profile tokens.
        for s in pkw_sessions:
            n = int(context["num_recent"][s])
            recent_q = [(tokens(x), query_codes[query_row[x]]) for x in context["recent_queries"][s, :n].tolist()]
            user_task = functools.partial(
                model_lib.build_user_task_input, vocab, layout, recent_queries=recent_q,
                profile=profile_of(str(log.user_ids[s])),
            )  # fmt: skip
            query = str(log.queries[s])
            s1_cot += [
                (user_task("[Q2PKW]", tokens(query)), kw_text(pref_kw[s])),
                (user_task("[QSID2PKWSID]", sid_tok(query_codes[query_row[query]])), kw_sids(pref_kw[s])),
            ]
        s1_cot = [s1_cot[i] for i in cot_rng.permutation(len(s1_cot))[: d.max_examples // 2]]
        num_cot = len(s1_cot)
        cot_ex = pack([p for p, _ in s1_cot], [], [y for _, y in s1_cot], [-1] * num_cot, [""] * num_cot)
        stages["stage1"] = concat_examples(stages["stage1"], cot_ex)

    # 3e. Stage-3 replay (own rng): personalised stage-3 rows mixed into stages 1 and 2 (`data.stage3_replay` x the
    # stage's size), so the encoder keeps reading the personalised prompt (issue 21: trained on task prompts only,
    # stages 1-2 leave a generator whose first SID token does not depend on the request, and stage 3 stays there).
    if d.stage3_replay > 0:
        replay_rng = np.random.default_rng([config.seed, 0x5E3])
        for stage in ("stage1", "stage2"):
            n = min(int(round(d.stage3_replay * len(stages[stage]))), len(stages["stage3"]))
            rows = np.sort(replay_rng.choice(len(stages["stage3"]), size=n, replace=False))
            stages[stage] = concat_examples(stages[stage], stages["stage3"].select(rows))

    # 4. Evaluation pairs (test split), slices and the popularity baseline.
    test_rows = np.flatnonzero(log.splits == "test")
    eval_sets, eval_slices, popularity = {}, {}, {}
    for which in ("click", "order"):
        p, lg, tg, qs, ss = session_examples(test_rows, which, config.eval.max_pairs)
        ex = pack(p, lg, [target(sid_tok(item_codes[i]), eos=False) for i in tg], tg, qs, ss)
        eval_sets[which] = ex
        q_counts = np.asarray([query_train_count[query_row[q]] for q in ex.queries.tolist()])
        eval_slices[which] = {
            "long_tail_query": q_counts <= config.eval.long_tail_max_count,
            "cold_item": source.cold_items[ex.targets],
        }
        popularity[which] = evaluate.popularity_rankings(
            [query_clicks.get(query_row[q], []) for q in ex.queries.tolist()], item_clicks, config.eval.top_k
        )

    # TIGER-protocol leave-one-out over users' full click histories (query: the target event's query).
    loo = None
    if config.eval.leave_one_out_users:
        test_ex = catalog_lib.leave_one_out(history, max_history=20)["test"]
        rows = rng.permutation(len(test_ex))[: config.eval.leave_one_out_users]
        lp, ll, lt = [], [], []
        for r in rows.tolist():
            u = int(test_ex.user_rows[r])
            n = int(test_ex.history_lengths[r])
            last = int(history.offsets[u + 1]) - 1  # the held-out event
            hist = test_ex.histories[r, :n].tolist()
            ids, long = context_example(
                str(history.user_ids[u]), int(history.timestamps[last]), str(history.queries[last]),
                hist[-max(lay.max_recent, 1) :], history.queries[last - min(n, lay.max_recent) : last].tolist(),
                slice(max(int(history.offsets[u]), last - d.max_long), last),
            )  # fmt: skip
            lp.append(ids)
            ll.append(long)
            lt.append(int(test_ex.targets[r]))
        loo_ex = pack(lp, ll, [target(sid_tok(item_codes[i]), eos=False) for i in lt], lt, [""] * len(lt))
        loo = {"input_ids": loo_ex.input_ids, "long": loo_ex.long, "targets": loo_ex.targets}

    # 5. Alignment data (own rng): train sessions with a click, their behaviour sets, DPO negatives, CTR table.
    align = None
    if config.align.enabled:
        al = config.align
        al_rng = np.random.default_rng([config.seed, 0xA11])
        category, members, cat_offsets = _category_members(cat)
        a_prompts, a_longs, a_sessions, a_truth, a_ordered, a_negs, a_levels = [], [], [], [], [], [], []
        for s in al_rng.permutation(train_rows).tolist():
            if len(a_sessions) >= al.max_prompts:
                break
            imp = log.impressions(s)
            items, clicked, ordered = log.impressed_items[imp], log.clicked[imp], log.ordered[imp]
            if not clicked.any():
                continue
            truth = list(dict.fromkeys(items[ordered].tolist() + items[clicked & ~ordered].tolist()))
            ids, long = session_prompt(s)
            negs, levels = draw_negatives(
                al_rng, items[~clicked], set(items.tolist()) | set(truth), truth[0], category, members, cat_offsets,
                al.num_negatives,
            )  # fmt: skip
            a_prompts.append(ids)
            a_longs.append(long)
            a_sessions.append(s)
            a_truth.append(truth[: al.max_truth])
            a_ordered.append([bool(t in set(items[ordered].tolist())) for t in truth[: al.max_truth]])
            a_negs.append(negs)
            a_levels.append(levels)
        n_al = len(a_sessions)

        def padded(rows: list[list], width: int, fill: Any, dtype: Any) -> np.ndarray:
            out = np.full((n_al, width), fill, dtype)
            for i, r in enumerate(rows):
                out[i, : len(r)] = r
            return out

        truth_arr = padded(a_truth, al.max_truth, -1, np.int32)
        chosen = truth_arr[:, 0] if n_al else np.zeros(0, np.int32)
        a_queries = [str(log.queries[s]) for s in a_sessions]
        a_labels = [target(sid_tok(item_codes[i]), eos=False) for i in chosen.tolist()]
        align = AlignData(
            examples=pack(a_prompts, a_longs, a_labels, chosen.tolist(), a_queries, a_sessions),
            sessions=np.asarray(a_sessions, np.int64),
            query_rows=np.asarray([query_row[q] for q in a_queries], np.int32),
            truth=truth_arr,
            truth_ordered=padded(a_ordered, al.max_truth, False, bool),
            chosen=chosen,
            negatives=padded(a_negs, al.num_negatives, -1, np.int32),
            negative_levels=padded(a_levels, al.num_negatives, -1, np.int8),
            ctr=ctr_table(train, query_row, n_items, al.ctr_prior_strength),
            relevance=None if source.world is not None else sources_lib.relevance_table(log, query_row, n_items),
        )

    tree = pt.build_prefix_tree(
        item_codes, vocab.level_sizes, level_offsets=vocab.sid_token_offsets, vocab_size=vocab.vocab_size
    )
    collisions = semantic_ids.collision_table(item_codes, popularity=item_clicks)
    info = {
        "source": source.name, "num_items": n_items, "num_queries": len(queries), "vocab_size": vocab.vocab_size,
        "text_vocab_size": vocab.text_vocab_size, "input_length": input_len, "sid_stats": stats,
        "keyword_coverage": round(keyword_coverage, 4),
        "stage_examples": {k: len(v) for k, v in stages.items()}, "stage3_base": num_base,
        "stage3_sliding_window": num_window, "eval_pairs": {k: len(v) for k, v in eval_sets.items()},
        "eval_slices": {k: {s: int(m.sum()) for s, m in v.items()} for k, v in eval_slices.items()},
        "prepare_seconds": round(time.time() - t0, 1),
    }  # fmt: skip
    if cot.enabled:
        s3 = stages["stage3"]
        info["cot"] = {
            "stage1_cot_examples": num_cot,
            "keyword_source": cot.keyword_file or keywords_lib.SIMULATOR_SOURCE,
            "stage3_rows_with_keywords": int((s3.teacher_input_ids != s3.input_ids).any(axis=1).sum()),
            "sessions_with_keywords": int(sum(bool(k) for k in teacher_kw)),
        }
    if align is not None:
        info["align_prompts"] = len(align)
    logging.info("onesearch data: %s", json.dumps(info))
    return Setup(
        config, source, vocab, layout, model_config, sid_model, item_codes, query_codes, query_row, tables,
        entity_rows, tree, collisions, item_clicks, stages, eval_sets, eval_slices, popularity, loo, info, align=align,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Batches.


@dataclasses.dataclass(frozen=True, eq=False)
class _Batch:
    """grain map: example rows `[b]` -> a training batch with the long-sequence memory."""

    examples: Examples
    tables: tuple[np.ndarray, ...]
    entity_rows: np.ndarray

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return make_batch(self.examples, np.asarray(rows), self.tables, self.entity_rows)


def make_batch(
    examples: Examples, rows: np.ndarray, tables: Sequence[np.ndarray], entity_rows: np.ndarray
) -> dict[str, np.ndarray]:
    """`{'input_ids', 'input_mask' [b, L_in], 'memory' [b, 9, d], 'labels', 'label_mask' [b, L_out]}` of `rows`,
    + `'teacher_input_ids', 'teacher_input_mask' [b, L_in]` when the examples carry teacher prompts (cot on)."""
    input_ids = examples.input_ids[rows]
    labels = examples.labels[rows]
    batch = {
        "input_ids": input_ids,
        "input_mask": input_ids != 0,
        "memory": long_memory(tables, entity_rows, examples.long[rows]),
        "labels": labels,
        "label_mask": labels != 0,
    }
    if examples.teacher_input_ids is not None:
        teacher = examples.teacher_input_ids[rows]
        batch.update(teacher_input_ids=teacher, teacher_input_mask=teacher != 0)
    return batch


def make_iterator(setup: Setup, stage: str, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Shuffled, repeated batches of one stage (checkpointable grain iterator)."""
    examples = setup.stages[stage]
    if len(examples) == 0:
        raise ValueError(f"{stage} has no training examples (check data.* sizes)")
    ds = (
        grain.MapDataset.range(len(examples))
        .shuffle(seed=seed)
        .repeat()
        .batch(batch_size, drop_remainder=True)
        .map(_Batch(examples, setup.tables, setup.entity_rows))
    )
    return iter(ds.to_iter_dataset())


def item_rewards(
    setup: Setup, rows: Any, items: Any, *, order_value: float = 4.0, click_value: float = 3.0
) -> dict[str, np.ndarray]:
    """Composite reward of ANY items for alignment prompts (spec §2.6): R_item = R_C&O + R_CTR + R_Rel.

    rows: `[n]` rows of `setup.align`; items: `[n, c]` catalog rows (-1: an invalid SID, scores 0 everywhere).
    Returns `[n, c]` float32 arrays 'relevance' (0-3: `catalog.intent_relevance` on the simulated world, a real log's
    judged labels otherwise, unjudged 0), 'ctr' (calibrated, clipped to
    [0, 1]), 'click_order' (`order_value` if ordered in the session, `click_value` if clicked, else 0) and 'total'.
    """
    align = setup.align
    if align is None:
        raise ValueError("item_rewards needs alignment data: set config.align.enabled=True")
    rows = np.asarray(rows, np.int64).reshape(-1)
    items = np.asarray(items, np.int64)
    if align.relevance is not None:
        relevance = align.relevance(align.query_rows[rows], items).astype(np.float32)
    else:
        relevance = catalog_lib.intent_relevance(setup.world, align.sessions[rows], items).astype(np.float32)
    ctr = np.clip(align.ctr(align.query_rows[rows], items), 0.0, 1.0)
    truth, ordered = align.truth[rows][:, None, :], align.truth_ordered[rows][:, None, :]
    hit = (items[..., None] == truth) & (truth >= 0) & (items[..., None] >= 0)
    click_order = np.where((hit & ordered).any(-1), order_value, np.where(hit.any(-1), click_value, 0.0))
    click_order = click_order.astype(np.float32)
    return {"relevance": relevance, "ctr": ctr, "click_order": click_order, "total": relevance + ctr + click_order}


# ----------------------------------------------------------------------------------------------------------
# Train state and step.


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clipped AdamW whose learning rate is a state entry set every step (`learning_rate`), so the three stages
    (different lengths, hence schedules) share one compiled step."""
    t = config.trainer
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip_norm),
        optax.inject_hyperparams(optax.adamw)(learning_rate=t.lr, weight_decay=t.weight_decay),
    )


def learning_rate(peak: float, warmup_steps: int, steps: int, step: int) -> float:
    """Warm-up to `peak` + cosine decay over a stage of `steps` updates, at update number `step` (0-based)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(min(warmup_steps, steps - 1), 1), max(steps, 2))
    return float(schedule(step))


def state_shardings(
    model_config: model_lib.OneSearchConfig, tx: optax.GradientTransformation, mesh: Mesh, rules: sharding.Rules
) -> train_state.TrainState:
    def init_fn(rng):
        return model_lib.init_params(model_config, rng), None

    abstract = train_state.abstract_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh, rules)
    return jax.tree.map(lambda x: x.sharding, abstract)


def init_model_params(model_config: model_lib.OneSearchConfig, seed: int, mesh: Mesh, rules: sharding.Rules) -> Any:
    params, _ = sharding.sharded_init(
        functools.partial(model_lib.init_params, model_config), jax.random.PRNGKey(seed), mesh=mesh, rules=rules
    )
    return params


def loss_fn(model: model_lib.OneSearchModel, params: Any, batch: dict[str, jax.Array], rng: jax.Array, train: bool):
    logits = model.apply(
        {"params": params}, batch["input_ids"], batch["input_mask"], batch["memory"], batch["labels"],
        deterministic=not train, rngs={"dropout": rng},
    )  # fmt: skip
    return model_lib.sequence_loss(logits, batch["labels"], batch["label_mask"])


def make_train_step(
    model_config: model_lib.OneSearchConfig,
    tx: optax.GradientTransformation,
    shardings: train_state.TrainState,
    mesh: Mesh,
):
    """Jitted `(state, batch, lr) -> (state, {'loss', 'accuracy', 'grad_norm'})`; state donated, layouts fixed.

    `lr` (float32 scalar) is written into the `inject_hyperparams` state of `make_optimizer`'s AdamW."""
    model = model_lib.OneSearchModel(model_config)
    dropout = model_config.bart.dropout if model_config.backbone == "bart" else 0.0

    def step(state: train_state.TrainState, batch: dict[str, jax.Array], lr: jax.Array):
        state, rng = state.replace(opt_state=optax.tree.set(state.opt_state, learning_rate=lr)).split_rng()
        grad_fn = jax.value_and_grad(functools.partial(loss_fn, model, train=dropout > 0), has_aux=True)
        (loss, accuracy), grads = grad_fn(state.params, batch, rng)
        state = state.apply_gradients(grads, tx)
        return state, {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}

    batch_shardings = {
        k: sharding.batch_sharding(mesh, n)
        for k, n in (("input_ids", 2), ("input_mask", 2), ("memory", 3), ("labels", 2), ("label_mask", 2))
    }
    return jax.jit(
        step, in_shardings=(shardings, batch_shardings, None), out_shardings=(shardings, None), donate_argnums=0
    )


def compiled(setup: Setup, mesh: Mesh, rules: sharding.Rules) -> dict[str, Any]:
    """The optimizer, state shardings, jitted init and train step, built once per (setup, mesh) and shared by the
    stages (so the step compiles once)."""
    key = ("train", id(mesh))
    if key not in setup.cache:
        tx = make_optimizer(setup.config)
        shardings = state_shardings(setup.model_config, tx, mesh, rules)

        def build(p, r):
            return train_state.TrainState(
                step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r, extra={}
            )

        setup.cache[key] = {
            "tx": tx,
            "shardings": shardings,
            "init": jax.jit(build, out_shardings=shardings),
            "step": make_train_step(setup.model_config, tx, shardings, mesh),
        }
    return setup.cache[key]


# ----------------------------------------------------------------------------------------------------------
# Evaluation glue.


def make_generate_fn(setup: Setup, num_beams: int, constrained: bool):
    """Jitted `(params, batch) -> sequences [b, beams, L] token ids` (constrained: valid item SIDs only)."""
    key = ("generate", num_beams, constrained)
    if key in setup.cache:
        return setup.cache[key]
    tree = setup.tree if constrained else None

    @jax.jit
    def run(params, input_ids, input_mask, memory):
        out = model_lib.generate(
            setup.model_config, params, input_ids, input_mask, memory,
            num_beams=num_beams, tree=tree, num_levels=setup.vocab.num_levels,
        )  # fmt: skip
        return out.sequences

    setup.cache[key] = run
    return run


def generate_codes(setup: Setup, generate_fn, params: Any, examples: Examples, batch_size: int) -> np.ndarray:
    """SID codes `[n, beams, L]` (-1 for invalid / non-SID tokens) generated for every example, in batches."""
    out = []
    for start in range(0, len(examples), batch_size):
        rows = np.arange(start, min(start + batch_size, len(examples)))
        padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        b = make_batch(examples, padded, setup.tables, setup.entity_rows)
        seqs = np.asarray(generate_fn(params, b["input_ids"], b["input_mask"], b["memory"]))[: len(rows)]
        out.append(np.where(seqs >= 0, setup.vocab.sid_codes(np.maximum(seqs, 0)), -1))
    return np.concatenate(out)


def evaluate_stage(setup: Setup, params: Any, mesh: Mesh, rules: sharding.Rules) -> dict[str, Any]:
    """HR@K / MRR@K / NDCG@K on click and order test pairs (constrained beams), slices, unconstrained valid-ID
    rate and (optionally) leave-one-out metrics."""
    e = setup.config.eval
    results: dict[str, Any] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        constrained = make_generate_fn(setup, e.num_beams, True)
        for which, ex in setup.eval_sets.items():
            if not len(ex):
                continue
            codes = generate_codes(setup, constrained, params, ex, e.batch_size)
            rankings = evaluate.items_from_sids(codes, setup.collisions, e.top_k)
            results[which] = evaluate.ranking_metrics(rankings, ex.targets, (e.top_k,), setup.eval_slices[which])
        if e.unconstrained_pairs and len(setup.eval_sets["click"]):
            ex = setup.eval_sets["click"].select(np.arange(min(e.unconstrained_pairs, len(setup.eval_sets["click"]))))
            free = make_generate_fn(setup, min(e.num_beams, 10), False)
            codes = generate_codes(setup, free, params, ex, e.batch_size)
            results["unconstrained"] = {
                "valid_id_rate": evaluate.valid_id_rate(codes, setup.collisions),
                "top1_valid_id_rate": evaluate.valid_id_rate(codes[:, :1], setup.collisions),
                "num_pairs": len(ex),
            }
        results["teacher_forced"] = teacher_forced_report(setup, params)
        results["relapse"] = {k: round(float(v), 6) for k, v in relapse_fn(setup)(params).items()}
        if setup.loo is not None and len(setup.loo["targets"]):
            n = len(setup.loo["targets"])
            ex = Examples(
                setup.loo["input_ids"], np.zeros((n, 1), np.int32), setup.loo["long"], setup.loo["targets"],
                np.asarray([""] * n),
            )  # fmt: skip
            codes = generate_codes(setup, constrained, params, ex, e.batch_size)
            rankings = evaluate.items_from_sids(codes, setup.collisions, e.top_k)
            results["leave_one_out"] = evaluate.ranking_metrics(rankings, ex.targets, (5, e.top_k))
    return results


TEACHER_FORCED_ROWS = 512
"""Rows of stage-3 train examples and of each test set scored by `teacher_forced_report`."""


def make_level_accuracy_fn(setup: Setup):
    """Jitted `(params, batch) -> [L] int32`: per SID level, how many rows' argmax (teacher-forced, the prefix given)
    equals the label; batch as `make_batch` (labels' first L tokens are the SID)."""
    key = ("level_accuracy",)
    if key not in setup.cache:
        model = model_lib.OneSearchModel(setup.model_config)
        levels = setup.vocab.num_levels

        @jax.jit
        def run(params, batch):
            logits = model.apply(
                {"params": params}, batch["input_ids"], batch["input_mask"], batch["memory"], batch["labels"]
            )
            hit = jnp.argmax(logits[:, :levels], -1) == batch["labels"][:, :levels]
            return jnp.sum(hit & batch["label_mask"][:, :levels], axis=0)

        setup.cache[key] = run
    return setup.cache[key]


def teacher_forced_report(setup: Setup, params: Any) -> dict[str, Any]:
    """Teacher-forced accuracy per SID level (level l given the true levels < l) on up to `TEACHER_FORCED_ROWS`
    stage-3 train rows ('train') and test click / order pairs, next to the share of the most common code per level
    among the train rows' targets ('majority_share', what a request-blind model gets at level 1)."""
    fn = make_level_accuracy_fn(setup)
    b = setup.config.eval.batch_size
    levels = setup.vocab.num_levels
    train = setup.stages["stage3"]
    sets = {"train": train.select(np.arange(min(TEACHER_FORCED_ROWS, len(train))))}
    for which, ex in setup.eval_sets.items():
        sets[which] = ex.select(np.arange(min(TEACHER_FORCED_ROWS, len(ex))))
    out: dict[str, Any] = {}
    for name, ex in sets.items():
        if not len(ex):
            continue
        hits = np.zeros(levels, np.int64)
        for start in range(0, len(ex), b):
            rows = np.arange(start, min(start + b, len(ex)))
            padded = np.concatenate([rows, np.full(b - len(rows), rows[-1])])
            batch = make_batch(ex, padded, setup.tables, setup.entity_rows)
            batch["label_mask"][len(rows) :] = False
            hits += np.asarray(fn(params, batch))
        out[name] = [round(float(h) / len(ex), 4) for h in hits]
    codes = setup.item_codes[sets["train"].targets[sets["train"].targets >= 0]]
    out["majority_share"] = [
        round(float(np.bincount(codes[:, lv]).max() / max(len(codes), 1)), 4) for lv in range(levels)
    ]
    return out


RELAPSE_ROWS = 64
"""Test click requests whose first-token logits `relapse_fn` compares."""


def relapse_fn(setup: Setup):
    """`params -> relapse metrics` (`diagnostics.relapse_metrics`) on a fixed probe batch: the first
    `RELAPSE_ROWS` test click requests (else stage-3 rows); text tokens are the BPE ids except pad."""
    key = ("relapse",)
    if key not in setup.cache:
        ex = setup.eval_sets.get("click")
        if ex is None or not len(ex):
            ex = setup.stages["stage3"]
        rows = np.arange(min(RELAPSE_ROWS, len(ex)))
        b = make_batch(ex, rows, setup.tables, setup.entity_rows)
        probe = {k: b[k] for k in ("input_ids", "input_mask", "memory")}
        vocab = setup.vocab
        first = vocab.sid_token_offsets[0]
        metrics_fn = functools.partial(
            diagnostics.relapse_metrics, setup.model_config, text_rows=(1, vocab.text_vocab_size),
            first_level=(first, first + vocab.level_sizes[0]),
        )  # fmt: skip
        fn = jax.jit(metrics_fn)
        setup.cache[key] = lambda params: fn(params, probe)
    return setup.cache[key]


# ----------------------------------------------------------------------------------------------------------
# The stages.

STAGE_FIELDS = {
    "stage1": ("trainer.stage1_steps",),
    "stage2": ("trainer.stage2_steps",),
    "stage3": ("trainer.stage3_steps", "distill"),
    "dpo": ("dpo", "align"),
    "rl": ("rl",),
}
"""Config fields read by one stage only; everything else that shapes training (data, SIDs, layout, model, cot,
optimiser) belongs to every stage."""
_NOT_TRAINING = ("preset", "mesh", "sharding_rules", "distributed", "eval", "trainer.log_every",
                 "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.async_checkpoint")  # fmt: skip


def _pop(tree: dict[str, Any], dotted: str) -> Any:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree[key]
    return tree.pop(leaf, None)


def active_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The three SFT stages, then "dpo" and "rl" when they have steps."""
    return SFT_STAGES + tuple(s for s in ALIGN_STAGES if config[s].steps > 0)


def stage_fingerprints(config: ml_collections.ConfigDict) -> dict[str, str]:
    """Per stage, a hash of every config field its params depend on (its own fields and all earlier stages'), so
    runs that share a prefix of stages (the rows of the incremental table) share those stages' checkpoints."""
    tree = json.loads(config.to_json_best_effort())
    for name in _NOT_TRAINING + tuple(f"data.{f}" for f in sources_lib.unused_source_fields(config)):
        _pop(tree, name)
    own = {stage: {f: _pop(tree, f) for f in fields} for stage, fields in STAGE_FIELDS.items()}
    digest = json.dumps(tree, sort_keys=True)
    out = {}
    for stage in STAGES:
        digest = hashlib.sha1((digest + json.dumps(own[stage], sort_keys=True)).encode()).hexdigest()[:10]
        out[stage] = digest
    return out


def stage_dir(config: ml_collections.ConfigDict, workdir: str, stage: str) -> str:
    """`<workdir>/<stage>-<fingerprint>`."""
    return os.path.join(workdir, f"{stage}-{stage_fingerprints(config)[stage]}")


def stage_steps(config: ml_collections.ConfigDict, stage: str) -> int:
    return int(config[stage].steps if stage in ALIGN_STAGES else config.trainer[f"{stage}_steps"])


def distill_config(config: ml_collections.ConfigDict) -> distill.DistillConfig:
    return distill.DistillConfig(**config.distill.to_dict())


def uses_distill_step(config: ml_collections.ConfigDict) -> bool:
    """Stage 3 needs `distill.make_distill_step` (a teacher, R-Drop, FGM or focal loss) rather than the plain step."""
    d = config.distill
    return d.mode != "off" or d.rdrop_weight > 0 or d.fgm_epsilon > 0 or d.focal_gamma > 0 or d.focal_scale != 1.0


def dpo_config(config: ml_collections.ConfigDict) -> alignment.DPOConfig:
    d = config.dpo
    return alignment.DPOConfig(
        beta=d.beta, reward_gap_alpha=d.reward_gap_alpha, use_reward_gap_weight=d.use_reward_gap_weight,
        sft_weight=d.sft_weight, chosen_regularisation=d.chosen_regularisation,
    )  # fmt: skip


def tpma_config(config: ml_collections.ConfigDict) -> alignment.TPMAConfig:
    r = config.rl
    return alignment.TPMAConfig(
        num_samples=r.num_samples, temperature=r.temperature, position_weights=tuple(r.position_weights),
        gate=r.gate, item_advantage_weight=r.item_advantage_weight, sft_weight=r.sft_weight, kl_coef=r.kl_coef,
        advantage=r.advantage, clip_eps=r.clip_eps, order_value=r.order_value, click_value=r.click_value,
    )  # fmt: skip


def _row_iterator(num_rows: int, batch_size: int, seed: int) -> grain.DatasetIterator:
    """A checkpointable, shuffled, repeated stream of `[batch_size]` row indices."""
    if num_rows < batch_size:
        raise ValueError(f"{num_rows} alignment prompts < batch size {batch_size}: raise align.max_prompts")
    ds = grain.MapDataset.range(num_rows).shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
    return iter(ds.to_iter_dataset())


def _sft_update(setup: Setup, stage: str, mesh: Mesh, rules: sharding.Rules, fns: dict[str, Any]):
    """(state transform, update) of an SFT stage: the plain step, or the distillation step in stage 3."""
    config = setup.config
    if stage != "stage3" or not uses_distill_step(config):
        step = fns["step"]
        return (lambda state: state), lambda state, batch, lr: step(state, {k: batch[k] for k in SFT_KEYS}, lr)
    cfg = distill_config(config)
    key = ("distill", id(mesh), cfg)
    if key not in setup.cache:
        shardings = distill.teacher_shardings(fns["shardings"]) if cfg.mode == "ema" else fns["shardings"]
        setup.cache[key] = distill.make_distill_step(setup.model_config, fns["tx"], shardings, mesh, cfg)
    step = setup.cache[key]

    def update(state, batch, lr):
        if "teacher_input_ids" not in batch:  # no keywords anywhere (cot off): the teacher reads the student prompt
            batch = {**batch, "teacher_input_ids": batch["input_ids"], "teacher_input_mask": batch["input_mask"]}
        return step(state, batch, lr)

    return (distill.init_ema_teacher if cfg.mode == "ema" else (lambda state: state)), update


def _dpo_batch(setup: Setup, rows: np.ndarray, cfg: alignment.DPOConfig) -> dict[str, np.ndarray]:
    """The DPO batch of alignment rows (without the reference log-probs): chosen = the top behaviour item's SID,
    rejected = the negatives' SIDs `[b, K, t]`."""
    align = setup.align
    b = make_batch(align.examples, rows, setup.tables, setup.entity_rows)
    negatives = align.negatives[rows]
    length = setup.vocab.num_levels
    rejected = np.zeros((*negatives.shape, b["labels"].shape[1]), np.int32)
    rejected[..., :length] = setup.vocab.sid_tokens(setup.item_codes[np.maximum(negatives, 0)])
    rejected *= (negatives >= 0)[..., None]
    batch = {
        "input_ids": b["input_ids"], "input_mask": b["input_mask"], "memory": b["memory"], "chosen": b["labels"],
        "chosen_mask": b["label_mask"], "rejected": rejected, "rejected_mask_tokens": rejected != 0,
        "rejected_valid": negatives >= 0,
    }  # fmt: skip
    if cfg.use_reward_gap_weight:
        rewards = item_rewards(setup, rows, np.concatenate([align.chosen[rows][:, None], negatives], 1))["total"]
        batch.update(reward_chosen=rewards[:, 0], reward_rejected=rewards[:, 1:])
    return batch


def _dpo_update(setup: Setup, mesh: Mesh, fns: dict[str, Any], reference_params: Any):
    cfg = dpo_config(setup.config)
    key = ("dpo", id(mesh), cfg)
    if key not in setup.cache:
        setup.cache[key] = (
            alignment.make_reference_fn(setup.model_config),
            alignment.make_dpo_step(setup.model_config, fns["tx"], fns["shardings"], mesh, cfg),
        )
    reference_fn, step = setup.cache[key]

    def update(state, rows, lr):
        batch = _dpo_batch(setup, rows, cfg)
        ref_chosen, ref_rejected = reference_fn(reference_params, sharding.shard_batch(batch, mesh))
        batch.update(ref_chosen=np.asarray(ref_chosen), ref_rejected=np.asarray(ref_rejected))
        return step(state, sharding.shard_batch(batch, mesh), lr)

    return update


def _rl_update(setup: Setup, mesh: Mesh, fns: dict[str, Any]):
    """One on-policy TPMA / GRPO update: sample G constrained SIDs per prompt with the current params, score them
    (each SID's most popular item, `item_rewards`), advantages (`alignment.tpma_batch`), one policy step."""
    config, align, vocab = setup.config, setup.align, setup.vocab
    cfg = tpma_config(config)
    if len(cfg.position_weights) != vocab.num_levels:
        raise config_lib.ConfigError(
            f"config.rl.position_weights has {len(cfg.position_weights)} entries for {vocab.num_levels} SID levels"
        )
    key = ("rl", id(mesh), cfg)
    if key not in setup.cache:
        setup.cache[key] = (
            alignment.make_sample_fn(setup.model_config, setup.tree, vocab.num_levels, cfg),
            alignment.make_policy_step(setup.model_config, fns["tx"], fns["shardings"], mesh, cfg),
        )
    sample_fn, step = setup.cache[key]
    seed_key = jax.random.PRNGKey(config.seed + 101)

    def update(state, rows, lr):
        b = make_batch(align.examples, rows, setup.tables, setup.entity_rows)
        inputs = sharding.shard_batch({k: b[k] for k in ("input_ids", "input_mask", "memory")}, mesh)
        rng = jax.random.fold_in(seed_key, state.step)
        tokens, old_logp = sample_fn(
            state.params, inputs["input_ids"], inputs["input_mask"], inputs["memory"], rng,
            np.float32(cfg.temperature),
        )  # fmt: skip
        tokens, old_logp = np.asarray(tokens), np.asarray(old_logp)
        n, g, length = tokens.shape
        codes = vocab.sid_codes(tokens)
        items = evaluate.items_from_sids(codes.reshape(n * g, 1, length), setup.collisions, 1).reshape(n, g)
        rewards = item_rewards(setup, rows, items, order_value=cfg.order_value, click_value=cfg.click_value)
        truth = align.truth[rows]
        truth_codes = [setup.item_codes[t[t >= 0]] for t in truth]
        adv = alignment.tpma_batch(vocab, tokens, truth_codes, rewards["total"], cfg)
        batch = {
            **{k: b[k] for k in ("input_ids", "input_mask", "memory")}, "rollouts": tokens, "old_logp": old_logp,
            "advantages": adv["advantages"], "gate": adv["gate"], "sft_labels": b["labels"],
            "sft_mask": b["label_mask"],
        }  # fmt: skip
        state, step_metrics = step(state, sharding.shard_batch(batch, mesh), lr)
        hit = ((items[..., None] == truth[:, None, :]) & (truth[:, None, :] >= 0)).any(-1)
        return state, {
            **step_metrics, "reward_mean": rewards["total"].mean(), "relevance_mean": rewards["relevance"].mean(),
            "truth_hit_rate": hit.mean(), "distinct_per_prompt": np.mean([len(set(r)) for r in items.tolist()]),
        }  # fmt: skip

    return update


def run_stage(
    setup: Setup,
    stage: str,
    params: Any,
    directory: str,
    mesh: Mesh,
    *,
    stop_at_step: int | None = None,
    evaluate_after: bool = True,
) -> tuple[Any, dict[str, Any] | None]:
    """Trains one stage from `params` in `directory` (resuming its checkpoints), returns `(params, results)`.

    SFT stages read `setup.stages[stage]` (stage 3 with self-distillation when configured); "dpo" and "rl" read
    `setup.align`, with `params` as the DPO reference. A stage whose checkpoint already holds its last step is not
    retrained. `stop_at_step` stops (after saving) at that step, as a preemption would: rerunning resumes. Results
    (None when stopped early or not evaluated) are also written to `<directory>/results.json`.
    """
    config = setup.config
    t = config.trainer
    rules = sharding.normalize_rules(config.sharding_rules)
    steps = stage_steps(config, stage)
    if stage in ALIGN_STAGES and setup.align is None:
        raise config_lib.ConfigError(f"stage {stage!r} needs alignment data: set config.align.enabled=True")
    os.makedirs(directory, exist_ok=True)
    fns = compiled(setup, mesh, rules)
    index = STAGES.index(stage)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = fns["init"](params, jax.random.PRNGKey(config.seed + 1 + index))
    if stage in SFT_STAGES:
        prepare_state, update = _sft_update(setup, stage, mesh, rules, fns)
        state = prepare_state(state)
        it = make_iterator(setup, stage, t.batch_size, config.seed + index)
        peak, warmup = t.lr, t.warmup_steps
    else:
        batch_size = config.dpo.batch_size if stage == "dpo" else config.rl.prompts_per_step
        it = _row_iterator(len(setup.align), batch_size, config.seed + index)
        update = _dpo_update(setup, mesh, fns, params) if stage == "dpo" else _rl_update(setup, mesh, fns)
        peak, warmup = config[stage].lr, config[stage].warmup_steps
    ckpt = checkpoint.Checkpointer(
        os.path.join(directory, "checkpoints"), save_every=t.checkpoint_every, keep=t.keep_checkpoints,
        async_save=t.async_checkpoint,
    )  # fmt: skip
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, it)
    start = int(state.step)
    last = steps if stop_at_step is None else min(steps, stop_at_step)
    results_path = os.path.join(directory, "results.json")
    if start >= steps and os.path.exists(results_path):
        ckpt.close()
        with open(results_path) as f:
            return state.params, json.load(f)
    console = {"dpo": ("loss", "reward_accuracy"), "rl": ("loss", "reward_mean")}.get(stage, ("loss", "accuracy"))
    writer = metrics.MetricWriter(directory, steps, start_step=start, console_keys=console)
    t0 = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        for step in range(start + 1, last + 1):
            lr = np.float32(learning_rate(peak, warmup, steps, step - 1))
            batch = next(it)
            batch = sharding.shard_batch(batch, mesh) if stage in SFT_STAGES else np.asarray(batch)
            state, step_metrics = update(state, batch, lr)
            if step % t.log_every == 0 or step == last:
                writer.write(step, {**step_metrics, **relapse_fn(setup)(state.params)})
            preempted = ckpt.should_stop(step)
            ckpt.save(step, state, it, config, force=preempted or step == last)
            if preempted:
                break
    writer.close()
    ckpt.close()
    if int(state.step) < steps:
        if stop_at_step is None:
            raise checkpoint.Preempted(f"{stage}: saved step {int(state.step)}")
        return state.params, None
    train_seconds = time.time() - t0
    if jax.process_index() == 0:
        metrics.plot_metrics(writer.jsonl_path, os.path.join(directory, "metrics.png"), list(console))
    if not evaluate_after:
        return state.params, None
    t1 = time.time()
    results = evaluate_stage(setup, state.params, mesh, rules)
    results.update(stage=stage, steps=steps, train_seconds=round(train_seconds, 1))
    results["eval_seconds"] = round(time.time() - t1, 1)
    write_json(results_path, results)
    return state.params, results


def _init_distributed(config: ml_collections.ConfigDict) -> None:
    d = config.distributed
    sharding.maybe_initialize_distributed(
        d.mode, d.coordinator_address or None, None if d.num_processes < 0 else d.num_processes,
        None if d.process_id < 0 else d.process_id,
    )  # fmt: skip


def run_stages(
    config: ml_collections.ConfigDict, workdir: str, setup: Setup, mesh: Mesh, *, evaluate_all: bool = True
) -> dict[str, Any]:
    """Every active stage in order, each in its fingerprinted directory (`stage_dir`); returns per-stage results
    (evaluated after every stage, or after the last one only)."""
    rules = sharding.normalize_rules(config.sharding_rules)
    params = init_model_params(setup.model_config, config.seed, mesh, rules)
    logging.info("model: %d parameters", model_lib.param_count(params))
    all_results: dict[str, Any] = {}
    stages = active_stages(config)
    for stage in stages:
        params, results = run_stage(
            setup, stage, params, stage_dir(config, workdir, stage), mesh,
            evaluate_after=evaluate_all or stage == stages[-1],
        )  # fmt: skip
        all_results[stage] = results
        logging.info("%s: %s", stage, json.dumps(summary_row(results)))
    return all_results


def train(
    config: ml_collections.ConfigDict, workdir: str, *, setup: Setup | None = None, mesh: Mesh | None = None
) -> dict[str, Any]:
    """The SFT stages (+ DPO, + RL when configured) with evaluation after each; writes `results.json` and
    `results.md` (table) to `workdir`.

    `setup` / `mesh` (tests) reuse an already prepared setup (and its compiled functions) and mesh."""
    check_config(config)
    _init_distributed(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh or sharding.make_mesh(config.mesh)
    setup = setup or prepare(config, cache_dir=os.path.join(workdir, "cache"))
    write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
    write_json(os.path.join(workdir, "data_info.json"), setup.info)
    all_results = {"data": setup.info, "popularity": popularity_results(setup)}
    all_results.update(run_stages(config, workdir, setup, mesh, evaluate_all=config.eval.every_stage))
    write_json(os.path.join(workdir, "results.json"), all_results)
    if jax.process_index() == 0:
        rows = [("popularity baseline", all_results["popularity"])]
        rows += [(f"after {s}", all_results[s]) for s in active_stages(config) if all_results[s]]
        with open(os.path.join(workdir, "results.md"), "w") as f:
            f.write(results_table(rows, config.eval.top_k))
    return all_results


def incremental_table(
    config: ml_collections.ConfigDict,
    workdir: str,
    rows: Sequence[tuple[str, dict[str, Any]]],
    *,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Spec §2.8's incremental table: each row is `config` + its (cumulative) overrides, trained through its last
    stage; rows share the checkpoints of the stages they have in common (`stage_fingerprints`). Writes
    `incremental.json` and `incremental.md` (ours next to the paper's numbers) to `workdir`."""
    _init_distributed(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = mesh or sharding.make_mesh(config.mesh)
    setups: dict[str, Setup] = {}
    table: list[tuple[str, dict[str, Any]]] = []
    out: dict[str, Any] = {}
    for label, overrides in rows:
        row_config = config.copy_and_resolve_references()
        row_config.update_from_flattened_dict(overrides)
        check_config(row_config)
        data_key = json.dumps({k: row_config[k].to_dict() for k in ("data", "sid", "layout", "model", "cot", "align")},
                              sort_keys=True, default=str) + str(row_config.seed)  # fmt: skip
        if data_key not in setups:
            setups[data_key] = prepare(row_config, cache_dir=os.path.join(workdir, "cache"))
        if not out:
            out["popularity"] = popularity_results(setups[data_key])
            table.append(("popularity baseline", out["popularity"]))
        setup = dataclasses.replace(setups[data_key], config=row_config)
        results = run_stages(row_config, workdir, setup, mesh, evaluate_all=False)
        last = active_stages(row_config)[-1]
        out[label] = {"overrides": overrides, "stage": last, **results[last]}
        table.append((label, results[last]))
        write_json(os.path.join(workdir, "incremental.json"), out)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "incremental.md"), "w") as f:
            f.write(results_table(table, config.eval.top_k, paper=PAPER_TABLE))
    return out


def incremental_rows(config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
    """The rows of spec §2.8's incremental table (+ a DPO row), each the cumulative overrides of `config` (a V1
    config): keyword CoT tasks, self-distillation, R-Drop 0.5, FGM 0.6, focal (gamma 3, scale 2), listwise DPO
    (`table.dpo_steps`), GRPO on R_item (`table.rl_steps`), then TPMA in place of GRPO's sequence advantage.
    Alignment data are built for every row (they do not change the SFT stages)."""
    t = config.table
    steps = [
        ("OneSearch (V1)", {"align.enabled": True}),
        ("+ CoT tasks", {"cot.enabled": True}),
        ("+ self-distillation", {"distill.mode": "self"}),
        ("+ R-Drop", {"distill.rdrop_weight": 0.5}),
        ("+ FGM", {"distill.fgm_epsilon": 0.6}),
        ("+ focal loss", {"distill.focal_gamma": 3.0, "distill.focal_scale": 2.0}),
        ("+ DPO", {"dpo.steps": t.dpo_steps}),
        ("+ GRPO", {"rl.steps": t.rl_steps, "rl.advantage": "sequence"}),
        ("+ TPMA", {"rl.advantage": "position"}),
    ]
    rows, overrides = [], {}
    for label, extra in steps:
        overrides = {**overrides, **extra}
        rows.append((label, overrides))
    return rows


PAPER_TABLE = {
    "OneSearch (V1)": (0.2231, 0.0728, 0.2046, 0.0985, 0.9491),
    "+ CoT tasks": (0.2266, 0.0731, 0.2094, 0.1008, 0.9456),
    "+ self-distillation": (0.2398, 0.0757, 0.2163, 0.1017, 0.9660),
    "+ R-Drop": (0.2398, 0.0760, 0.2168, 0.1045, 0.9653),
    "+ FGM": (0.2422, 0.0766, 0.2180, 0.1047, 0.9728),
    "+ focal loss": (0.2471, 0.0788, 0.2214, 0.1048, 0.9758),
    "+ GRPO": (0.2481, 0.0798, 0.2248, 0.1106, 0.9838),
    "+ TPMA": (0.2498, 0.0815, 0.2265, 0.1136, 0.9843),
}
"""OneSearch-V2 Table 5 (spec §2.8): click HR@10, click MRR@10, order HR@10, order MRR@10, click valid-SID rate."""


def popularity_results(setup: Setup) -> dict[str, Any]:
    k = setup.config.eval.top_k
    return {
        which: evaluate.ranking_metrics(setup.popularity[which], ex.targets, (k,), setup.eval_slices[which])
        for which, ex in setup.eval_sets.items()
        if len(ex)
    }


def summary_row(results: dict[str, Any] | None) -> dict[str, float]:
    if not results:
        return {}
    row = {}
    for which in ("click", "order"):
        for name, value in results.get(which, {}).items():
            if isinstance(value, float):
                row[f"{which}/{name}"] = round(value, 4)
    if "unconstrained" in results:
        row["valid_id_rate"] = round(results["unconstrained"]["valid_id_rate"], 4)
    return row


def results_table(
    rows: Sequence[tuple[str, dict[str, Any] | None]], k: int, *, paper: dict[str, Sequence[float]] | None = None
) -> str:
    """Markdown table of `(label, results)` rows: HR@K / MRR@K (click, order) and the unconstrained valid-ID rate;
    with `paper`, each row's paper numbers (same columns) follow in brackets where the label matches."""
    cols = [f"click HR@{k}", f"click MRR@{k}", f"order HR@{k}", f"order MRR@{k}", "valid-ID rate (unconstr.)"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, r in rows:
        r = r or {}
        vals = []
        for which in ("click", "order"):
            m = r.get(which, {})
            vals += [f"{m.get(f'hr@{k}', float('nan')):.4f}", f"{m.get(f'mrr@{k}', float('nan')):.4f}"]
        vals.append(f"{r['unconstrained']['valid_id_rate']:.4f}" if "unconstrained" in r else "-")
        if paper and label in paper:
            vals = [f"{v} ({p:.4f})" for v, p in zip(vals, paper[label], strict=True)]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"
