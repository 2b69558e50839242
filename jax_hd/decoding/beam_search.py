"""Batched beam search over fixed-length IDs inside `jit`, optionally constrained by a `PrefixTree`.

Decoder interface: `step_fn(carry, tokens [batch * beams]) -> (logits [batch * beams, vocab], carry)` feeds one
token per row and returns the next-token logits. `beam_search` starts from the logits of the first ID token
(`first_logits [batch, vocab]`, e.g. from a prompt prefill, with a `carry` of `batch` rows), expands the carry
to `batch * beams` rows and reorders its rows by beam parent with `gather_fn(carry, rows [batch * beams])`
(default: `gather_rows`, axis 0 of every non-scalar leaf; `gather_kv_cache` for `qwen2.KVCache`).

Per level, each live beam's candidates are read from the tree (all codes of a dense level, the
`max_branch[l]` CSR slots otherwise; the `beams` best tokens of the whole vocabulary when unconstrained),
scored with the model's log-softmax (over the full vocabulary, so scores are the model's sequence
log-probabilities), and the best `beams` of `beams x candidates` survive (`lax.top_k`). Invalid slots score
`NEG_INF` (large, finite). When fewer valid continuations exist than beams, the extra beams are flagged
invalid: their sequences are -1, scores `NEG_INF`, and their rows feed `dead_token` to the model; valid beams
are distinct sequences. Beams come sorted by score. The first level runs in Python; the others in one
`lax.scan` (the decoder is traced once) with a `lax.switch` over the per-level candidate widths.

`qwen2_beam_search` is the adapter for `jax_hd.models.qwen2`: prefill the left-padded prompt once, then decode
with the KV cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jax_hd.decoding import prefix_tree as pt
from jax_hd.decoding.sampling import NEG_INF, ApplyFn
from jax_hd.models import qwen2

Array = jax.Array
StepFn = Callable[[Any, Array], tuple[Array, Any]]
GatherFn = Callable[[Any, Array], Any]


@flax.struct.dataclass
class BeamSearchOutput:
    """sequences `[batch, beams, num_levels]` int32 token ids (-1 for invalid beams); scores `[batch, beams]`
    float32 sum of log-probs (`NEG_INF` if invalid), descending; valid `[batch, beams]` bool; leaf_ids
    `[batch, beams]` int32 leaf index in the tree (-1 if invalid or unconstrained)."""

    sequences: Any
    scores: Any
    valid: Any
    leaf_ids: Any


def gather_rows(carry: Any, rows: Array) -> Any:
    """Takes rows `[n]` of axis 0 of every non-scalar leaf of `carry`."""
    return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows, axis=0), carry)


def gather_kv_cache(cache: qwen2.KVCache, rows: Array) -> qwen2.KVCache:
    """Takes batch rows `[n]` of a `qwen2.KVCache` (k/v batch axis 1, valid axis 0)."""
    return cache.replace(
        k=jnp.take(cache.k, rows, axis=1), v=jnp.take(cache.v, rows, axis=1), valid=jnp.take(cache.valid, rows, axis=0)
    )


def _candidates(
    tree: pt.PrefixTree | None, state: Array, logprobs: Array, level: int, num_beams: int
) -> tuple[Array, Array, Array]:
    """(tokens, next_states, token log-probs), each `[batch, k, width]`, for beams' `logprobs [batch, k, vocab]`."""
    if tree is None:
        token_logprobs, tokens = jax.lax.top_k(logprobs, min(num_beams, logprobs.shape[-1]))
        return tokens.astype(jnp.int32), jnp.zeros(tokens.shape, jnp.int32), token_logprobs
    tokens, next_states = pt.candidates(tree, state, level)
    return tokens, next_states, jnp.take_along_axis(logprobs, tokens, axis=-1)


def _select(
    tree: pt.PrefixTree | None, num_beams: int, level: int, logprobs: Array, scores: Array, state: Array
) -> tuple[Array, Array, Array, Array]:
    """One beam step at static `level`.

    logprobs `[batch, k, vocab]`, scores `[batch, k]`, state `[batch, k]` -> (parent, token, next state, score),
    each `[batch, num_beams]`; invalid beams have token -1, state -1 and score NEG_INF.
    """
    batch, k = scores.shape
    tokens, next_states, token_logprobs = _candidates(tree, state, logprobs, level, num_beams)
    width = tokens.shape[-1]
    ok = (next_states >= 0) & (scores > NEG_INF / 2)[..., None]
    total = jnp.where(ok, scores[..., None] + token_logprobs, NEG_INF).reshape(batch, k * width)
    if k * width < num_beams:
        total = jnp.pad(total, ((0, 0), (0, num_beams - k * width)), constant_values=NEG_INF)
    top, index = jax.lax.top_k(total, num_beams)
    index = jnp.minimum(index, k * width - 1)
    valid = top > NEG_INF / 2
    token = jnp.take_along_axis(tokens.reshape(batch, -1), index, axis=1)
    next_state = jnp.take_along_axis(next_states.reshape(batch, -1), index, axis=1)
    return (
        index // width,
        jnp.where(valid, token, -1),
        jnp.where(valid, next_state, -1),
        jnp.where(valid, top, NEG_INF),
    )


def beam_search(
    step_fn: StepFn,
    carry: Any,
    first_logits: Array,
    *,
    num_beams: int,
    tree: pt.PrefixTree | None = None,
    num_levels: int | None = None,
    gather_fn: GatherFn = gather_rows,
    dead_token: int = 0,
    length_normalize: bool = False,
) -> BeamSearchOutput:
    """Beam search for `num_levels`-token IDs; call it inside `jit` (`step_fn`, `gather_fn` and ints static).

    Args:
      step_fn: `(carry, tokens [batch * beams]) -> (logits [batch * beams, vocab], carry)`.
      carry: decoder state for `batch` rows (expanded to `batch * num_beams` rows by `gather_fn`).
      first_logits: `[batch, vocab]` logits of the first ID token.
      num_beams: beams per batch row.
      tree: valid IDs; None decodes unconstrained (then `num_levels` is required).
      num_levels: ID length (default `tree.num_levels`).
      gather_fn: `(carry, rows [n]) -> carry` taking rows of the carry.
      dead_token: token fed to the decoder for invalid beams.
      length_normalize: divide scores by the ID length (off: all IDs have the same length).
    """
    if tree is not None:
        if num_levels not in (None, tree.num_levels):
            raise ValueError(f"num_levels {num_levels} != tree.num_levels {tree.num_levels}")
        if first_logits.shape[-1] != tree.vocab_size:
            raise ValueError(f"logits vocabulary {first_logits.shape[-1]} != tree vocab_size {tree.vocab_size}")
        num_levels = tree.num_levels
    if num_levels is None or num_levels < 1:
        raise ValueError(f"num_levels must be >= 1 (got {num_levels}); pass it when tree is None")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    batch = first_logits.shape[0]
    select = functools.partial(_select, tree, num_beams)
    batch_base = (jnp.arange(batch, dtype=jnp.int32) * num_beams)[:, None]

    logprobs = jax.nn.log_softmax(first_logits.astype(jnp.float32), axis=-1)[:, None]
    root = jnp.zeros((batch, 1), jnp.int32)
    _, token, state, scores = select(0, logprobs, jnp.zeros((batch, 1), jnp.float32), root)
    sequences = jnp.full((batch, num_beams, num_levels), -1, jnp.int32).at[:, :, 0].set(token)
    carry = gather_fn(carry, jnp.repeat(jnp.arange(batch, dtype=jnp.int32), num_beams))  # Rows -> beams.
    rows = jnp.arange(batch * num_beams, dtype=jnp.int32)

    def body(loop, level):
        carry, rows, token, state, scores, sequences = loop
        # Reorder by the previous level's parents (lazily: the last level's reorder would be wasted).
        carry = jax.lax.cond(level > 1, gather_fn, lambda c, _: c, carry, rows)
        logits, carry = step_fn(carry, jnp.where(token >= 0, token, dead_token).reshape(-1))
        logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(batch, num_beams, -1)
        branches = [functools.partial(select, lv) for lv in range(1, num_levels)]
        parent, token, state, scores = jax.lax.switch(level - 1, branches, logprobs, scores, state)
        sequences = jnp.take_along_axis(sequences, parent[..., None], axis=1)
        sequences = jax.lax.dynamic_update_slice_in_dim(sequences, token[..., None], level, axis=2)
        return (carry, (batch_base + parent).reshape(-1), token, state, scores, sequences), None

    if num_levels > 1:
        loop = (carry, rows, token, state, scores, sequences)
        loop, _ = jax.lax.scan(body, loop, jnp.arange(1, num_levels, dtype=jnp.int32))
        _, _, token, state, scores, sequences = loop
    valid = token >= 0
    sequences = jnp.where(valid[..., None], sequences, -1)
    if length_normalize:
        scores = jnp.where(valid, scores / num_levels, NEG_INF)
    leaf_ids = state if tree is not None else jnp.full(state.shape, -1, jnp.int32)
    return BeamSearchOutput(sequences=sequences, scores=scores, valid=valid, leaf_ids=leaf_ids)


# ----------------------------------------------------------------------------------------------------------
# Qwen2 (or any `sampling.ApplyFn` decoder with a `qwen2.KVCache`).


def lm_beam_search(
    apply_fn: ApplyFn,
    init_cache_fn: Callable[[int, int], qwen2.KVCache],
    params: Any,
    prompt_tokens: Array,
    prompt_mask: Array,
    *,
    num_beams: int,
    tree: pt.PrefixTree | None = None,
    num_levels: int | None = None,
    dead_token: int = 0,
) -> BeamSearchOutput:
    """Beam search after a left-padded prompt `prompt_tokens [batch, prompt_len]` (`prompt_mask` True = real).

    The prompt is prefilled once for `batch` rows; the KV cache (length prompt_len + num_levels - 1) is then
    expanded to the beams and reordered by beam parent at every level. Call inside `jit`.
    """
    batch, prompt_len = prompt_tokens.shape
    levels = tree.num_levels if tree is not None else num_levels
    if levels is None:
        raise ValueError("num_levels is required when tree is None")
    prompt_mask = prompt_mask.astype(bool)
    cache = init_cache_fn(batch, prompt_len + levels - 1)
    positions = qwen2.positions_from_mask(prompt_mask)
    logits, cache = apply_fn(params, prompt_tokens, positions, prompt_mask, cache)

    def step_fn(cache: qwen2.KVCache, tokens: Array) -> tuple[Array, qwen2.KVCache]:
        tokens = tokens[:, None]
        positions = cache.next_positions()[:, None]
        logits, cache = apply_fn(params, tokens, positions, jnp.ones(tokens.shape, bool), cache)
        return logits[:, -1], cache

    return beam_search(
        step_fn,
        cache,
        logits[:, -1],
        num_beams=num_beams,
        tree=tree,
        num_levels=levels,
        gather_fn=gather_kv_cache,
        dead_token=dead_token,
    )


def qwen2_beam_search(
    config: qwen2.Qwen2Config,
    params: Any,
    prompt_tokens: Array,
    prompt_mask: Array,
    *,
    num_beams: int,
    tree: pt.PrefixTree | None = None,
    num_levels: int | None = None,
) -> BeamSearchOutput:
    """`lm_beam_search` with `qwen2.Qwen2LM(config)`; jit with `config`, `num_beams`, `num_levels` static."""
    model = qwen2.Qwen2LM(config)

    def apply_fn(p, tokens, positions, mask, cache):
        return model.apply({"params": p}, tokens, positions, mask, cache)

    return lm_beam_search(
        apply_fn,
        functools.partial(qwen2.init_cache, config),
        params,
        prompt_tokens,
        prompt_mask,
        num_beams=num_beams,
        tree=tree,
        num_levels=num_levels,
    )
