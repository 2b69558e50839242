"""OneSearch generator: (user, query, behaviour context) -> item semantic-ID tokens (spec onesearch.md §1.5, §1.6).

Vocabulary (`Vocab`): the text tokenizer's ids `[0, text_vocab_size)` (pad 0), then the special tokens
(`SPECIAL_TOKENS`, the SFT task tokens `TASK_TOKENS`), the profile tokens (one per gender / age-bucket value), then the
SID tokens: level l, code c is `sid_offset + level_offsets[l] + c` (`semantic_ids.SemanticIDConfig.level_offsets`:
one namespace per level, the OPQ codes after the RQ ones). The size is rounded up to `pad_to_multiple` so the
vocabulary shards evenly over the `tensor` axis.

Personalised input layout (spec §1.6; `build_input`), every segment separated by `[SEP]`:

    [BOS] uid (2 x L SID tokens) [SEP] query text [SEP] SID_q (L) [SEP] (recent query text + its SID) x <=5 [SEP]
    recent item SIDs x <=5 [SEP] [MEM] x N_M [SEP] profile tokens [EOS]

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

SPECIAL_TOKENS = ("[BOS]", "[SEP]", "[EOS]", "[MEM]", "[DEC]", "[NOUID]")
TASK_TOKENS = (
    "[Q2SID]", "[SID2Q]", "[I2SID]", "[SID2I]", "[TEXT2CAT]", "[SID2CAT]",  # stage 1
    "[Q2I]", "[I2Q]", "[QSID2ISID]", "[ISID2QSID]",  # stage 2
)  # fmt: skip
SEGMENTS = ("special", "uid", "query", "query_sid", "recent_queries", "recent_items", "memory", "profile", "task")
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
    max_task_tokens: content of a stage-1/2 task prompt; max_target_tokens: decoder targets (text + [EOS]).
    """

    max_query_tokens: int = 12
    max_recent: int = 5
    recent_query_tokens: int = 4
    num_memory: int = 3
    max_profile_tokens: int = 2
    max_task_tokens: int = 24
    max_target_tokens: int = 16

    def input_length(self, num_levels: int) -> int:
        """Longest prompt `build_input` / `build_task_input` can produce."""
        personal = (
            1 + 2 * num_levels + 1 + self.max_query_tokens + 1 + num_levels + 1
            + self.max_recent * (self.recent_query_tokens + num_levels) + 1
            + self.max_recent * num_levels + 1 + self.num_memory + 1 + self.max_profile_tokens + 1
        )  # fmt: skip
        return max(personal, self.max_task_tokens + 3)


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
    pad_token_id from the `Vocab`."""

    backbone: str
    qformer: qformer.QFormerConfig
    mem_token_id: int
    decoder_start_token_id: int
    pad_token_id: int = 0
    bart: bart.BartConfig | None = None
    qwen2: qwen2.Qwen2Config | None = None
    num_memory_vectors: int = 9

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone {self.backbone!r} is not one of {BACKBONES}")
        if getattr(self, self.backbone) is None:
            raise ValueError(f"backbone {self.backbone!r} needs its config (OneSearchConfig.{self.backbone})")
        if not 0 <= self.mem_token_id < self.vocab_size:
            raise ValueError(f"mem_token_id {self.mem_token_id} outside the vocabulary {self.vocab_size}")

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

    def encode(self, input_ids: Array, input_mask: Array, memory: Array, deterministic: bool = True) -> Array:
        """BART encoder states `[b, n, d]` of the prompt with the memory injected."""
        embeds = self.backbone.embed_tokens(input_ids)
        memory_embeds = self.memory_embeddings(memory, deterministic)
        embeds = inject_memory(embeds, input_ids, memory_embeds, self.config.mem_token_id)
        return self.backbone.encode(None, input_mask, inputs_embeds=embeds, deterministic=deterministic)

    def __call__(
        self,
        input_ids: Array,
        input_mask: Array,
        memory: Array,
        labels: Array,
        deterministic: bool = True,
    ) -> Array:
        """Teacher-forced logits `[b, t, vocab]` float32 for `labels [b, t]` (right-padded with pad_token_id).

        input_ids / input_mask: right-padded prompts `[b, n]`; memory `[b, 9, memory_dim]`.
        """
        cfg = self.config
        decoder_inputs = bart.shift_tokens_right(labels, cfg.pad_token_id, cfg.decoder_start_token_id)
        if cfg.backbone == "bart":
            hidden = self.encode(input_ids, input_mask, memory, deterministic)
            logits, _ = self.backbone.decode(decoder_inputs, hidden, input_mask, deterministic=deterministic)
            return logits
        memory_embeds = self.memory_embeddings(memory, deterministic)
        tokens = jnp.concatenate([input_ids, decoder_inputs], axis=1)
        mask = jnp.concatenate([input_mask.astype(bool), jnp.ones(decoder_inputs.shape, bool)], axis=1)
        with nn.intercept_methods(_embed_interceptor(memory_embeds, cfg.mem_token_id)):
            logits, _ = self.backbone(tokens, qwen2.positions_from_mask(mask), mask)
        return logits[:, input_ids.shape[1] :]


def _embed_interceptor(memory_embeds: Array, mem_token_id: int):
    """A Flax method interceptor that injects `memory_embeds` at `[MEM]` tokens of `embed_tokens` calls."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and getattr(context.module, "name", None) == "embed_tokens":
            ids = args[0]
            if ids.ndim == 2 and ids.shape[0] == memory_embeds.shape[0]:
                out = inject_memory(out, ids, memory_embeds, mem_token_id)
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
    memory_embeds = model.apply(variables, memory, method=OneSearchModel.memory_embeddings)
    start = jnp.full((batch, 1), config.decoder_start_token_id, jnp.int32)
    tokens, mask = left_align(
        jnp.concatenate([input_ids, start], axis=1),
        jnp.concatenate([input_mask.astype(bool), jnp.ones((batch, 1), bool)], axis=1),
    )
    lm = qwen2.Qwen2LM(config.qwen2)
    prompt_len = tokens.shape[1]

    def apply_fn(p, toks, positions, m, cache):
        if toks.shape[1] == prompt_len:  # the prefill: inject the memory at the [MEM] slots
            with nn.intercept_methods(_embed_interceptor(memory_embeds, config.mem_token_id)):
                return lm.apply({"params": p}, toks, positions, m, cache)
        return lm.apply({"params": p}, toks, positions, m, cache)

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


def param_count(params: Any) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))
