"""OneSearch generator: (user, query, behaviour context) -> item semantic-ID tokens (spec onesearch.md §1.5, §1.6).

Vocabulary (`Vocab`): the text tokenizer's ids `[0, text_vocab_size)` (pad 0), then the special tokens
(`SPECIAL_TOKENS`, the SFT task tokens `TASK_TOKENS`), the profile tokens (one per gender / age-bucket value), then the
SID tokens: level l, code c is `sid_offset + level_offsets[l] + c` (`semantic_ids.SemanticIDConfig.level_offsets`:
one namespace per level, the OPQ codes after the RQ ones). The size is rounded up to `pad_to_multiple` so the
vocabulary shards evenly over the `tensor` axis.

Personalised input layout (spec §1.6; `build_input`), every segment separated by `[SEP]`:

    [BOS] uid (2 x L SID tokens) [SEP] query text [SEP] SID_q (L) [SEP] (recent query text + its SID) x <=5 [SEP]
    recent item SIDs x <=5 [SEP] [MEM] x N_M [SEP] profile tokens [EOS]

The self-distillation teacher prompt (V2, spec §2.5; `add_keywords`) inserts `[KW] kw1 [SEP] kw2 ...` (at most
`LayoutConfig.max_keyword_tokens`) before the final `[EOS]`; the V2 CoT tasks (`COT_TASK_TOKENS`) with user info use
`build_user_task_input`.

The N_M `[MEM]` slots are replaced by the Q-Former's outputs over the 9 long-sequence vectors (per-level centroid
sums of the click / order / search streams, `memory [batch, 9, memory_dim]`), so they enter the backbone as input
embeddings. The behaviour user id (spec §1.5, `behaviour_uid`): SID_short || SID_long with
`SID = ceil(sum_i lambda_i SID(s_i))` per code position, `lambda_i = exp(sqrt(i)) / sum_t exp(sqrt(t))`, i = 1 the
oldest item (assumption: i grows toward the most recent), or, with `mode="centroid"`, the SID of the weighted mean
embedding (the spec's suggested alternative).

Backbones (`OneSearchConfig.backbone`): "bart" (the encoder reads the prompt, the decoder emits the target) or
"qwen2" (decoder-only: prompt, `[DEC]`, target; the `[MEM]` embeddings are injected by intercepting the
backbone's `embed_tokens`, so `qwen2.py` needs no change).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jax_hd.decoding import beam_search as beam_search_lib
from jax_hd.decoding import prefix_tree as pt
from jax_hd.models import bart, qformer, qwen2

Array = jax.Array
NEG_LOGIT = -1e9
"""Logit of a token excluded from a softmax (finite: fully masked rows stay NaN-free; exp underflows to 0)."""

SPECIAL_TOKENS = ("[BOS]", "[SEP]", "[EOS]", "[MEM]", "[DEC]", "[NOUID]", "[KW]")
COT_TASK_TOKENS = ("[Q2KW]", "[QSID2KWSID]", "[Q2PKW]", "[QSID2PKWSID]")
"""OneSearch-V2's keyword CoT tasks in SFT stage 1 (spec §2.3): query -> keywords, SID_q -> keyword SIDs,
query + user info -> P_keywords, SID_q + user info -> P_keyword SIDs."""
TASK_TOKENS = (
    "[Q2SID]", "[SID2Q]", "[I2SID]", "[SID2I]", "[TEXT2CAT]", "[SID2CAT]",  # stage 1
    "[Q2I]", "[I2Q]", "[QSID2ISID]", "[ISID2QSID]",  # stage 2
    *COT_TASK_TOKENS,  # stage 1, V2 (config.cot.enabled)
)  # fmt: skip
SEGMENTS = (
    "special", "uid", "query", "query_sid", "recent_queries", "recent_items", "memory", "profile", "task", "keywords"
)  # fmt: skip
UID_MODES = ("code_average", "centroid")
BACKBONES = ("bart", "qwen2")


# ----------------------------------------------------------------------------------------------------------
# Vocabulary.


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token id layout (see the module docstring). `profile_values` are strings such as `gender:male`."""

    text_vocab_size: int
    level_sizes: tuple[int, ...]
    level_offsets: tuple[int, ...]
    profile_values: tuple[str, ...] = ()
    pad_id: int = 0
    pad_to_multiple: int = 8

    def __post_init__(self):
        if len(self.level_sizes) != len(self.level_offsets):
            raise ValueError(f"level_sizes {self.level_sizes} and level_offsets {self.level_offsets} differ in length")
        if self.text_vocab_size < 1:
            raise ValueError(f"text_vocab_size must be positive, got {self.text_vocab_size}")

    def special(self, name: str) -> int:
        names = SPECIAL_TOKENS + TASK_TOKENS
        if name not in names:
            raise KeyError(f"unknown special token {name!r}")
        return self.text_vocab_size + names.index(name)

    def profile(self, value: str) -> int:
        """Token of a profile value; an unknown value raises ValueError naming it."""
        if value not in self.profile_values:
            raise ValueError(f"unknown profile value {value!r}; known: {self.profile_values}")
        return self.text_vocab_size + len(SPECIAL_TOKENS) + len(TASK_TOKENS) + self.profile_values.index(value)

    @property
    def sid_offset(self) -> int:
        return self.text_vocab_size + len(SPECIAL_TOKENS) + len(TASK_TOKENS) + len(self.profile_values)

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def sid_token_offsets(self) -> tuple[int, ...]:
        """Token id of code 0 per level (`prefix_tree.build_prefix_tree(level_offsets=...)`)."""
        return tuple(self.sid_offset + o for o in self.level_offsets)

    @property
    def sid_range(self) -> tuple[int, int]:
        """`(first, end)`: the SID tokens are the ids `first <= id < end` (every level, OPQ codes included)."""
        return self.sid_offset, self.sid_offset + sum(self.level_sizes)

    @property
    def vocab_size(self) -> int:
        used = self.sid_offset + sum(self.level_sizes)
        return -(-used // self.pad_to_multiple) * self.pad_to_multiple

    def sid_tokens(self, codes: Any) -> np.ndarray:
        """Codes `[..., L]` -> token ids `[..., L]` int32 (ValueError for a code outside its level)."""
        codes = np.asarray(codes, np.int64)
        if codes.shape[-1] != self.num_levels:
            raise ValueError(f"SID codes have {codes.shape[-1]} levels, the vocabulary {self.num_levels}")
        if codes.size and ((codes < 0) | (codes >= np.asarray(self.level_sizes))).any():
            bad = codes.reshape(-1, self.num_levels)[
                ((codes < 0) | (codes >= np.asarray(self.level_sizes))).reshape(-1, self.num_levels).any(1)
            ][0]
            raise ValueError(f"SID codes {bad.tolist()} outside the level sizes {self.level_sizes}")
        return (codes + np.asarray(self.sid_token_offsets)).astype(np.int32)

    def sid_codes(self, tokens: Any) -> np.ndarray:
        """Token ids `[..., L]` -> codes `[..., L]` (-1 where a token is not of its level)."""
        codes = np.asarray(tokens, np.int64) - np.asarray(self.sid_token_offsets)
        ok = (codes >= 0) & (codes < np.asarray(self.level_sizes))
        return np.where(ok, codes, -1).astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Behaviour user id (spec §1.5).


def position_weights(n: int) -> np.ndarray:
    """`lambda_i = exp(sqrt(i)) / sum_t exp(sqrt(t))`, i = 1..n (i = n the most recent). `[n]` float64."""
    if n < 1:
        raise ValueError(f"need at least one item, got {n}")
    w = np.exp(np.sqrt(np.arange(1, n + 1, dtype=np.float64)))
    return w / w.sum()


def weighted_sid(codes: Any) -> np.ndarray:
    """`ceil(sum_i lambda_i codes_i)` per position of `codes [n, L]` (oldest first) -> `[L]` int32."""
    codes = np.asarray(codes, np.float64)
    if codes.ndim != 2 or codes.shape[0] == 0:
        raise ValueError(f"codes must be a non-empty [n, L] array, got shape {codes.shape}")
    mean = position_weights(codes.shape[0]) @ codes
    return np.ceil(mean - 1e-9).astype(np.int32)  # the tolerance keeps exact integers (all codes equal) exact


def behaviour_uid(
    short_codes: Any,
    long_codes: Any,
    *,
    mode: str = "code_average",
    encode_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    short_embeddings: Any = None,
    long_embeddings: Any = None,
) -> np.ndarray:
    """uid = SID_short || SID_long, `[2, L]` int32 codes.

    short_codes / long_codes: `[m, L]` / `[n, L]` item SIDs, oldest first (both non-empty; the caller applies the
      cold-user fallback). mode "code_average" is the spec's formula (`weighted_sid`); "centroid" encodes the
      `position_weights`-weighted mean of `short_embeddings` / `long_embeddings` `[m | n, d]` with `encode_fn`
      (`[1, d] -> [1, L]` codes, e.g. `semantic_ids.encode`).
    """
    if mode == "code_average":
        return np.stack([weighted_sid(short_codes), weighted_sid(long_codes)])
    if mode == "centroid":
        if encode_fn is None or short_embeddings is None or long_embeddings is None:
            raise ValueError("uid mode 'centroid' needs encode_fn, short_embeddings and long_embeddings")
        rows = []
        for e in (np.asarray(short_embeddings, np.float64), np.asarray(long_embeddings, np.float64)):
            mean = (position_weights(e.shape[0]) @ e)[None].astype(np.float32)
            rows.append(np.asarray(encode_fn(mean))[0])
        return np.stack(rows).astype(np.int32)
    raise ValueError(f"uid mode {mode!r} is not one of {UID_MODES}")


# ----------------------------------------------------------------------------------------------------------
# Input layout (spec §1.6).


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Segment budgets of the personalised prompt (tokens).

    max_query_tokens: query text; max_recent: recent queries and recent items (spec: 5);
    recent_query_tokens: text tokens per recent query (0: its SID only); num_memory: Q-Former outputs N_M (3);
    max_task_tokens: content of a stage-1/2 task prompt; max_target_tokens: decoder targets (text + [EOS]);
    max_keyword_tokens: the teacher prompt's keyword segment `[KW] kw1 [SEP] kw2 ...` without its `[KW]`
    (`add_keywords`; 0: no teacher prompts, the V1 layout).
    """

    max_query_tokens: int = 12
    max_recent: int = 5
    recent_query_tokens: int = 4
    num_memory: int = 3
    max_profile_tokens: int = 2
    max_task_tokens: int = 24
    max_target_tokens: int = 16
    max_keyword_tokens: int = 0

    def input_length(self, num_levels: int) -> int:
        """Longest prompt `build_input` (+ `add_keywords`) / `build_task_input` / `build_user_task_input` can
        produce."""
        personal = (
            1 + 2 * num_levels + 1 + self.max_query_tokens + 1 + num_levels + 1
            + self.max_recent * (self.recent_query_tokens + num_levels) + 1
            + self.max_recent * num_levels + 1 + self.num_memory + 1 + self.max_profile_tokens + 1
        )  # fmt: skip
        keywords = 1 + self.max_keyword_tokens if self.max_keyword_tokens else 0
        return max(personal + keywords, self.max_task_tokens + 3)


def build_input(
    vocab: Vocab,
    layout: LayoutConfig,
    *,
    uid: Any | None,
    query_ids: Sequence[int],
    query_sid: Any,
    recent_queries: Sequence[tuple[Sequence[int], Any]] = (),
    recent_items: Sequence[Any] = (),
    profile: Sequence[str] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """The personalised prompt `(token ids [n] int32, segment ids [n] int8 (index into SEGMENTS))`.

    uid: `[2, L]` codes (None: a single `[NOUID]` token); query_ids: text tokens (truncated to
    `max_query_tokens`); query_sid: `[L]` codes; recent_queries: (text tokens, `[L]` codes) oldest first;
    recent_items: `[L]` codes oldest first (both keep the latest `max_recent`); profile: profile values.
    """
    ids: list[int] = []
    seg: list[int] = []

    def put(tokens: Sequence[int] | np.ndarray, segment: str) -> None:
        tokens = [int(t) for t in np.asarray(tokens, np.int64).reshape(-1)]
        ids.extend(tokens)
        seg.extend([SEGMENTS.index(segment)] * len(tokens))

    sep = [vocab.special("[SEP]")]
    put([vocab.special("[BOS]")], "special")
    if uid is None:
        put([vocab.special("[NOUID]")], "uid")
    else:
        uid = np.asarray(uid)
        if uid.shape != (2, vocab.num_levels):
            raise ValueError(f"uid must be [2, {vocab.num_levels}] codes, got shape {uid.shape}")
        put(vocab.sid_tokens(uid).reshape(-1), "uid")
    put(sep, "special")
    put(list(query_ids)[: layout.max_query_tokens], "query")
    put(sep, "special")
    put(vocab.sid_tokens(query_sid), "query_sid")
    put(sep, "special")
    for text, sid in list(recent_queries)[-layout.max_recent :] if layout.max_recent else []:
        put(list(text)[: layout.recent_query_tokens], "recent_queries")
        put(vocab.sid_tokens(sid), "recent_queries")
    put(sep, "special")
    for sid in list(recent_items)[-layout.max_recent :] if layout.max_recent else []:
        put(vocab.sid_tokens(sid), "recent_items")
    put(sep, "special")
    put([vocab.special("[MEM]")] * layout.num_memory, "memory")
    put(sep, "special")
    put([vocab.profile(p) for p in list(profile)[: layout.max_profile_tokens]], "profile")
    put([vocab.special("[EOS]")], "special")
    return np.asarray(ids, np.int32), np.asarray(seg, np.int8)


def build_task_input(vocab: Vocab, layout: LayoutConfig, task: str, content: Sequence[int]) -> np.ndarray:
    """A stage-1/2 prompt `[BOS] [TASK] content [EOS]` (content truncated to `max_task_tokens`). `[n]` int32."""
    body = [int(t) for t in list(content)[: layout.max_task_tokens]]
    return np.asarray([vocab.special("[BOS]"), vocab.special(task), *body, vocab.special("[EOS]")], np.int32)


def build_user_task_input(
    vocab: Vocab,
    layout: LayoutConfig,
    task: str,
    content: Sequence[int],
    *,
    recent_queries: Sequence[tuple[Sequence[int], Any]] = (),
    profile: Sequence[str] = (),
) -> np.ndarray:
    """A CoT prompt with user info (`[Q2PKW]` / `[QSID2PKWSID]`): `[BOS] [TASK] content [SEP] (recent query text +
    its SID) x <= max_recent [SEP] profile tokens [EOS]`, segments truncated as in `build_input` (content to
    `max_query_tokens`). `[n]` int32."""
    ids = [vocab.special("[BOS]"), vocab.special(task), *[int(t) for t in list(content)[: layout.max_query_tokens]]]
    ids.append(vocab.special("[SEP]"))
    for text, sid in list(recent_queries)[-layout.max_recent :] if layout.max_recent else []:
        ids += [int(t) for t in list(text)[: layout.recent_query_tokens]] + vocab.sid_tokens(sid).tolist()
    ids.append(vocab.special("[SEP]"))
    ids += [vocab.profile(p) for p in list(profile)[: layout.max_profile_tokens]]
    ids.append(vocab.special("[EOS]"))
    return np.asarray(ids, np.int32)


def keyword_tokens(vocab: Vocab, keywords: Sequence[Sequence[int]], max_tokens: int) -> list[int]:
    """`kw1 [SEP] kw2 [SEP] ...` (keywords as token ids) keeping whole keywords within `max_tokens` (a first keyword
    longer than that is cut)."""
    out: list[int] = []
    sep = vocab.special("[SEP]")
    for kw in keywords:
        piece = ([sep] if out else []) + [int(t) for t in kw]
        if len(out) + len(piece) > max_tokens:
            if not out:
                out = piece[:max_tokens]
            break
        out += piece
    return out


def add_keywords(vocab: Vocab, layout: LayoutConfig, prompt: Any, keywords: Sequence[Sequence[int]]) -> np.ndarray:
    """The self-distillation teacher prompt (spec §2.5): `prompt` (ending in `[EOS]`) with `[KW] kw1 [SEP] kw2 ...`
    (`keyword_tokens`, `layout.max_keyword_tokens`) inserted before its `[EOS]`; no keywords -> `prompt`
    unchanged. `[n]` int32."""
    prompt = np.asarray(prompt, np.int32)
    body = keyword_tokens(vocab, [k for k in keywords if len(k)], layout.max_keyword_tokens)
    if not body:
        return prompt
    if not len(prompt) or prompt[-1] != vocab.special("[EOS]"):
        raise ValueError("add_keywords: the prompt must end with [EOS]")
    kw = np.asarray([vocab.special("[KW]"), *body], np.int32)
    return np.concatenate([prompt[:-1], kw, prompt[-1:]])


def build_target(vocab: Vocab, layout: LayoutConfig, tokens: Sequence[int], *, eos: bool) -> np.ndarray:
    """Decoder labels: `tokens` (+ `[EOS]` for text targets), truncated to `max_target_tokens`. `[n]` int32."""
    body = [int(t) for t in tokens][: layout.max_target_tokens - int(eos)]
    return np.asarray(body + ([vocab.special("[EOS]")] if eos else []), np.int32)


def pad_rows(rows: Sequence[np.ndarray], length: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads rows to `[n, length]` int32 with a bool mask; ValueError naming a row that does not fit."""
    out = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"row {i} has {len(r)} tokens, more than the padded length {length}")
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


def sliding_window_examples(sequence: Sequence[int], window: int) -> list[tuple[list[int], int]]:
    """Sliding-window augmentation (spec §1.5): `(prefix, next)` for every position t >= 1 of `sequence`, the
    prefix being the at most `window` items before t. A length-n sequence gives n - 1 examples."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    seq = list(sequence)
    return [(seq[max(0, t - window) : t], seq[t]) for t in range(1, len(seq))]


# ----------------------------------------------------------------------------------------------------------
# Model.


@dataclasses.dataclass(frozen=True)
class OneSearchConfig:
    """backbone: "bart" (uses `bart`) or "qwen2" (uses `qwen2`); qformer: the long-sequence Q-Former
    (`num_query_tokens` = N_M, `encoder_hidden_size` = memory_dim); mem_token_id / decoder_start_token_id /
    pad_token_id from the `Vocab`; sid_token_range: `(first, end)` token ids of the SID tokens (`Vocab.sid_range`):
    when set, every target position whose label is a SID token is scored by a softmax over the SID tokens only
    (`restrict_sid_logits`) and decoding never emits a non-SID token; None: the full-vocabulary softmax everywhere
    (with tied embeddings it collapses the text-token embeddings, see `restrict_sid_logits`);
    restrict_text_targets: also score text targets over the non-SID tokens only (needs sid_token_range)."""

    backbone: str
    qformer: qformer.QFormerConfig
    mem_token_id: int
    decoder_start_token_id: int
    pad_token_id: int = 0
    bart: bart.BartConfig | None = None
    qwen2: qwen2.Qwen2Config | None = None
    num_memory_vectors: int = 9
    sid_token_range: tuple[int, int] | None = None
    restrict_text_targets: bool = False

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} is not one of {BACKBONES}")
        if getattr(self, self.backbone) is None:
            raise ValueError(f"backbone {self.backbone!r} needs its config (OneSearchConfig.{self.backbone})")
        if not 0 <= self.mem_token_id < self.vocab_size:
            raise ValueError(f"mem_token_id {self.mem_token_id} outside the vocabulary {self.vocab_size}")
        if self.sid_token_range is not None:
            lo, hi = self.sid_token_range
            if not 0 <= lo < hi <= self.vocab_size:
                raise ValueError(f"sid_token_range {self.sid_token_range} is not a range of [0, {self.vocab_size})")
        if self.restrict_text_targets and self.sid_token_range is None:
            raise ValueError("restrict_text_targets needs sid_token_range")

    @property
    def vocab_size(self) -> int:
        return self.bart.vocab_size if self.backbone == "bart" else self.qwen2.vocab_size

    @property
    def d_model(self) -> int:
        return self.bart.d_model if self.backbone == "bart" else self.qwen2.hidden_size

    @property
    def memory_dim(self) -> int:
        return self.qformer.encoder_hidden_size

    @property
    def num_memory(self) -> int:
        return self.qformer.num_query_tokens


def is_sid_token(tokens: Array, sid_range: tuple[int, int]) -> Array:
    """`tokens [...]` int -> `[...]` bool: the token is a SID token (`first <= token < end`)."""
    return (tokens >= sid_range[0]) & (tokens < sid_range[1])


def mask_non_sid(logits: Array, sid_range: tuple[int, int]) -> Array:
    """`logits [..., V]` with every non-SID token set to `NEG_LOGIT` (decoding: only SID tokens can be emitted)."""
    keep = is_sid_token(jnp.arange(logits.shape[-1]), sid_range)
    return jnp.where(keep, logits, jnp.asarray(NEG_LOGIT, logits.dtype))


def restrict_sid_logits(
    logits: Array, labels: Array, sid_range: tuple[int, int], text_targets_too: bool = False
) -> Array:
    """SID-restricted logits: at target positions whose label is a SID token, non-SID tokens get `NEG_LOGIT` (and,
    with `text_targets_too`, at positions whose label is a non-pad text / special token, the SID tokens do).

    logits `[b, t, V]` label-aligned (index j predicts `labels[:, j]`), labels `[b, t]`; other positions (text
    targets of stages 1-2, padding) keep the full vocabulary. A log-softmax of the result is the log-softmax over
    the SID tokens at SID positions, so every loss built on teacher-forced logits (SFT CE, distillation KL, DPO and
    policy log-probs) uses it. Why: with tied input/output embeddings, a full-vocabulary softmax at SID positions
    gives every text token the same "lower your logit" gradient each step; AdamW scales it to full-size steps and
    the text-token embeddings collapse onto one direction, after which the encoder ignores the request (issue 21).
    Masked entries get zero gradient. `text_targets_too` is the mirror image for the SID embeddings: text targets
    of stages 1-2 then never push the SID tokens' logits down. Label 0 (pad) is never restricted. Returns
    `[b, t, V]` in the dtype of `logits`.
    """
    sid_label = is_sid_token(labels, sid_range)[..., None]
    sid_vocab = is_sid_token(jnp.arange(logits.shape[-1]), sid_range)
    restrict = sid_label & ~sid_vocab
    if text_targets_too:
        restrict = restrict | ((~sid_label) & (labels != 0)[..., None] & sid_vocab)
    return jnp.where(restrict, jnp.asarray(NEG_LOGIT, logits.dtype), logits)


def sid_restricted_log_softmax(
    logits: Array, labels: Array, sid_range: tuple[int, int] | None, text_targets_too: bool = False
) -> Array:
    """`[b, t, V]` float32 log-probs: over the SID tokens at SID-label positions, the full vocabulary elsewhere (over
    the non-SID tokens at text-label positions with `text_targets_too`), everywhere the full vocabulary when
    `sid_range` is None. logits `[b, t, V]`, labels `[b, t]`."""
    if sid_range is not None:
        logits = restrict_sid_logits(logits, labels, sid_range, text_targets_too)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def inject_memory(token_embeds: Array, input_ids: Array, memory_embeds: Array, mem_token_id: int) -> Array:
    """Replaces the k-th `[MEM]` token of each row of `token_embeds [b, n, d]` by `memory_embeds [b, N_M, d]`[k]."""
    is_mem = input_ids == mem_token_id
    rank = jnp.clip(jnp.cumsum(is_mem, axis=1) - 1, 0, memory_embeds.shape[1] - 1)
    gathered = jnp.take_along_axis(memory_embeds.astype(token_embeds.dtype), rank[..., None], axis=1)
    return jnp.where(is_mem[..., None], gathered, token_embeds)


def left_align(tokens: Array, mask: Array) -> tuple[Array, Array]:
    """Moves each row's real tokens (`mask [b, n]`) to the right end, order kept: right- to left-padding."""
    order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
    return jnp.take_along_axis(tokens, order, axis=1), jnp.take_along_axis(mask, order, axis=1)


class OneSearchModel(nn.Module):
    """Backbone (`backbone` submodule: `bart.Bart` or `qwen2.Qwen2LM`) + Q-Former over the long-sequence vectors.

    Methods: `memory_embeddings`, `encode` (bart), `__call__` (teacher-forced target logits).
    """

    config: OneSearchConfig

    def setup(self):
        cfg = self.config
        self.backbone = bart.Bart(cfg.bart) if cfg.backbone == "bart" else qwen2.Qwen2LM(cfg.qwen2)
        self.qformer = qformer.QFormer(cfg.qformer)
        self.memory_norm = nn.LayerNorm(epsilon=1e-5)
        self.memory_proj = nn.Dense(cfg.d_model, kernel_init=nn.initializers.normal(0.02))

    def memory_embeddings(self, memory: Array, deterministic: bool = True) -> Array:
        """`memory [b, 9, memory_dim]` (per-level centroid sums) -> `[b, N_M, d_model]`."""
        if memory.shape[1:] != (self.config.num_memory_vectors, self.config.memory_dim):
            raise ValueError(
                f"memory must be [batch, {self.config.num_memory_vectors}, {self.config.memory_dim}], "
                f"got {memory.shape}"
            )
        q = self.qformer(image_features=self.memory_norm(memory.astype(jnp.float32)), deterministic=deterministic)
        return self.memory_proj(q)

    def encode(
        self,
        input_ids: Array,
        input_mask: Array,
        memory: Array,
        deterministic: bool = True,
        prompt_delta: Array | None = None,
    ) -> Array:
        """BART encoder states `[b, n, d]` of the prompt with the memory injected (and `prompt_delta [b, n, d]`
        added to the input embeddings, when given)."""
        embeds = self.backbone.embed_tokens(input_ids)
        memory_embeds = self.memory_embeddings(memory, deterministic)
        embeds = inject_memory(embeds, input_ids, memory_embeds, self.config.mem_token_id)
        if prompt_delta is not None:
            embeds = embeds + prompt_delta.astype(embeds.dtype)
        return self.backbone.encode(None, input_mask, inputs_embeds=embeds, deterministic=deterministic)

    def __call__(
        self,
        input_ids: Array,
        input_mask: Array,
        memory: Array,
        labels: Array,
        deterministic: bool = True,
        prompt_delta: Array | None = None,
    ) -> Array:
        """Teacher-forced logits `[b, t, vocab]` float32 for `labels [b, t]` (right-padded with pad_token_id);
        SID-restricted at SID-label positions when `config.sid_token_range` is set (`restrict_sid_logits`).

        input_ids / input_mask: right-padded prompts `[b, n]`; memory `[b, 9, memory_dim]`; prompt_delta: optional
        `[b, n, d_model]` added to the prompt's input embeddings after the `[MEM]` injection (FGM, `distill.py`).
        """
        cfg = self.config
        decoder_inputs = bart.shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        if prompt_delta is not None and prompt_delta.shape != (*input_ids.shape, cfg.d_model):
            raise ValueError(f"prompt_delta must be {(*input_ids.shape, cfg.d_model)}, got {prompt_delta.shape}")
        if cfg.backbone == "bart":
            hidden = self.encode(input_ids, input_mask, memory, deterministic, prompt_delta)
            logits, _ = self.backbone.decode(decoder_inputs, hidden, input_mask, deterministic=deterministic)
            return self._restrict(logits, labels)
        memory_embeds = self.memory_embeddings(memory, deterministic)
        tokens = jnp.concatenate([input_ids, decoder_inputs], axis=1)
        mask = jnp.concatenate([input_mask.astype(bool), jnp.ones(decoder_inputs.shape, bool)], axis=1)
        delta = None
        if prompt_delta is not None:  # prompt positions only, not the decoder part
            delta = jnp.pad(prompt_delta, ((0, 0), (0, decoder_inputs.shape[1]), (0, 0)))
        with nn.intercept_methods(_embed_interceptor(memory_embeds, cfg.mem_token_id, delta)):
            logits, _ = self.backbone(tokens, qwen2.positions_from_mask(mask), mask)
        return self._restrict(logits[:, input_ids.shape[1] :], labels)

    def _restrict(self, logits: Array, labels: Array) -> Array:
        """`restrict_sid_logits` when the config has a SID range, else `logits` unchanged."""
        sid_range = self.config.sid_token_range
        if sid_range is None:
            return logits
        return restrict_sid_logits(logits, labels, sid_range, self.config.restrict_text_targets)


def _embed_interceptor(memory_embeds: Array, mem_token_id: int, delta: Array | None = None):
    """A Flax method interceptor that injects `memory_embeds` at `[MEM]` tokens of `embed_tokens` calls (then adds
    `delta [b, n, d]`, when given, to calls on `[b, n]` ids)."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and getattr(context.module, "name", None) == "embed_tokens":
            ids = args[0]
            if ids.ndim == 2 and ids.shape[0] == memory_embeds.shape[0]:
                out = inject_memory(out, ids, memory_embeds, mem_token_id)
                if delta is not None and delta.shape[:2] == ids.shape:
                    out = out + delta.astype(out.dtype)
        return out

    return interceptor


def init_params(config: OneSearchConfig, rng: Array, input_len: int = 4, target_len: int = 2) -> Any:
    """Random params (`nn.LogicallyPartitioned` leaves from the backbone; the Q-Former's are annotated too)."""
    ids = jnp.zeros((1, input_len), jnp.int32)
    memory = jnp.zeros((1, config.num_memory_vectors, config.memory_dim), jnp.float32)
    labels = jnp.zeros((1, target_len), jnp.int32)
    return OneSearchModel(config).init(rng, ids, ids > -1, memory, labels)["params"]


def sequence_loss(logits: Array, labels: Array, label_mask: Array) -> tuple[Array, Array]:
    """Mean token cross-entropy over `label_mask` and token accuracy; logits `[b, t, V]`, labels/mask `[b, t]`."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logprobs, labels[..., None], axis=-1)[..., 0]
    weight = label_mask.astype(jnp.float32)
    denom = jnp.maximum(weight.sum(), 1.0)
    accuracy = jnp.sum((jnp.argmax(logits, -1) == labels) * weight) / denom
    return jnp.sum(nll * weight) / denom, accuracy


def _decoder_only_prompt(
    model: OneSearchModel, variables: Any, input_ids: Array, input_mask: Array, memory: Array
) -> tuple[Array, Array, Array]:
    """Decoder-only decoding input: (memory embeddings `[b, N_M, d]`, the prompt + `[DEC]` left-aligned `[b, n + 1]`
    and its mask)."""
    batch = input_ids.shape[0]
    memory_embeds = model.apply(variables, memory, method=OneSearchModel.memory_embeddings)
    start = jnp.full((batch, 1), model.config.decoder_start_token_id, jnp.int32)
    tokens, mask = left_align(
        jnp.concatenate([input_ids, start], axis=1),
        jnp.concatenate([input_mask.astype(bool), jnp.ones((batch, 1), bool)], axis=1),
    )
    return memory_embeds, tokens, mask


def generate(
    config: OneSearchConfig,
    params: Any,
    input_ids: Array,
    input_mask: Array,
    memory: Array,
    *,
    num_beams: int,
    tree: pt.PrefixTree | None,
    num_levels: int,
) -> beam_search_lib.BeamSearchOutput:
    """Beam search for `num_levels` SID tokens (constrained by `tree`, or unconstrained with None); call in jit."""
    model = OneSearchModel(config)
    variables = {"params": params}
    batch = input_ids.shape[0]
    if config.backbone == "bart":
        hidden = model.apply(variables, input_ids, input_mask, memory, method=OneSearchModel.encode)
        step_fn, carry = bart.make_step_fn(
            bart.Bart(config.bart), params["backbone"], hidden, input_mask.astype(bool), num_levels + 1
        )
        step_fn = _sid_only_step(step_fn, config.sid_token_range)
        first_logits, carry = step_fn(carry, jnp.full((batch,), config.decoder_start_token_id, jnp.int32))
        return beam_search_lib.beam_search(
            step_fn,
            carry,
            first_logits,
            num_beams=num_beams,
            tree=tree,
            num_levels=num_levels,
            gather_fn=bart.gather_cache,
            dead_token=config.pad_token_id,
        )
    memory_embeds, tokens, mask = _decoder_only_prompt(model, variables, input_ids, input_mask, memory)
    lm = qwen2.Qwen2LM(config.qwen2)
    prompt_len = tokens.shape[1]

    def apply_fn(p, toks, positions, m, cache):
        if toks.shape[1] == prompt_len:  # the prefill: inject the memory at the [MEM] slots
            with nn.intercept_methods(_embed_interceptor(memory_embeds, config.mem_token_id)):
                logits, cache = lm.apply({"params": p}, toks, positions, m, cache)
        else:
            logits, cache = lm.apply({"params": p}, toks, positions, m, cache)
        if config.sid_token_range is not None:
            logits = mask_non_sid(logits, config.sid_token_range)
        return logits, cache

    return beam_search_lib.lm_beam_search(
        apply_fn,
        lambda b, n: qwen2.init_cache(config.qwen2, b, n),
        params["backbone"],
        tokens,
        mask,
        num_beams=num_beams,
        tree=tree,
        num_levels=num_levels,
        dead_token=config.pad_token_id,
    )


def _sid_only_step(step_fn: Callable, sid_range: tuple[int, int] | None) -> Callable:
    """`step_fn(carry, tokens) -> (logits [rows, V], carry)` with non-SID logits masked (`mask_non_sid`); unchanged
    when `sid_range` is None."""
    if sid_range is None:
        return step_fn

    def masked(carry, tokens):
        logits, carry = step_fn(carry, tokens)
        return mask_non_sid(logits, sid_range), carry

    return masked


def sample_sids(
    config: OneSearchConfig,
    params: Any,
    input_ids: Array,
    input_mask: Array,
    memory: Array,
    rng: Array,
    *,
    num_samples: int,
    tree: pt.PrefixTree | None,
    num_levels: int,
    temperature: float | Array = 1.0,
) -> tuple[Array, Array]:
    """G = num_samples ancestral samples per prompt, constrained to valid item SIDs by `tree` (None: free):
    tokens [b, G, L] int32 and their behaviour log-probs [b, G, L] float32 (under the temperature-1 policy).

    The log-probs are the log-softmax of the unconstrained logits over the full vocabulary, or over the SID tokens
    when `config.sid_token_range` is set (what teacher forcing with `OneSearchModel.__call__` gives), the samples
    are drawn from the tree-masked logits / `temperature` (a traced scalar is fine). Rows b * G + j of the decoder
    are sample j of prompt b. Call inside jit.
    """
    if num_samples < 1 or num_levels < 1:
        raise ValueError(f"num_samples {num_samples} and num_levels {num_levels} must be >= 1")
    if tree is not None and tree.num_levels != num_levels:
        raise ValueError(f"num_levels {num_levels} != tree.num_levels {tree.num_levels}")
    model = OneSearchModel(config)
    variables = {"params": params}
    batch = input_ids.shape[0]
    rows = batch * num_samples
    if config.backbone == "bart":
        hidden = model.apply(variables, input_ids, input_mask, memory, method=OneSearchModel.encode)
        step_fn, carry = bart.make_step_fn(
            bart.Bart(config.bart), params["backbone"], hidden, input_mask.astype(bool), num_levels + 1, num_samples
        )
        first_logits, carry = step_fn(carry, jnp.full((rows,), config.decoder_start_token_id, jnp.int32))
    else:
        memory_embeds, tokens, mask = _decoder_only_prompt(model, variables, input_ids, input_mask, memory)
        lm = qwen2.Qwen2LM(config.qwen2)
        cache = qwen2.init_cache(config.qwen2, batch, tokens.shape[1] + num_levels - 1)
        with nn.intercept_methods(_embed_interceptor(memory_embeds, config.mem_token_id)):
            logits, cache = lm.apply(
                {"params": params["backbone"]}, tokens, qwen2.positions_from_mask(mask), mask, cache
            )
        expand = jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_samples)
        first_logits = jnp.take(logits[:, -1], expand, axis=0)
        carry = beam_search_lib.gather_kv_cache(cache, expand)

        def step_fn(cache, toks):
            toks = toks[:, None]
            out, cache = lm.apply(
                {"params": params["backbone"]}, toks, cache.next_positions()[:, None], jnp.ones(toks.shape, bool), cache
            )
            return out[:, -1], cache

    def draw(logits, state, level, key):
        logits = logits.astype(jnp.float32)
        if config.sid_token_range is not None:  # the teacher-forced log-probs are SID-restricted too
            logits = mask_non_sid(logits, config.sid_token_range)
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        if tree is not None:
            logits = pt.constrain_logits(logits, tree, state, level)
            sampled = jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
            state = pt.advance(tree, state, level, sampled)
        else:
            sampled = jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)
        return sampled, jnp.take_along_axis(logprobs, sampled[:, None], axis=-1)[:, 0], state

    keys = jax.random.split(rng, num_levels)
    token, logp, state = draw(first_logits, pt.root_state((rows,)), 0, keys[0])

    def body(loop, xs):
        carry, token, state = loop
        level, key = xs
        logits, carry = step_fn(carry, token)
        token, logp, state = draw(logits, state, level, key)
        return (carry, token, state), (token, logp)

    tokens, logps = token[None], logp[None]
    if num_levels > 1:
        levels = jnp.arange(1, num_levels, dtype=jnp.int32)
        _, (rest, rest_logp) = jax.lax.scan(body, (carry, token, state), (levels, keys[1:]))
        tokens, logps = jnp.concatenate([tokens, rest]), jnp.concatenate([logps, rest_logp])
    return (
        tokens.T.reshape(batch, num_samples, num_levels),
        logps.T.reshape(batch, num_samples, num_levels).astype(jnp.float32),
    )


def param_count(params: Any) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))
