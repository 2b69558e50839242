"""The set of valid semantic-ID sequences as a prefix tree of arrays, usable inside `jit` (STATIC's layout).

Items have fixed-length codes `codes [num_items, num_levels]`, level l's code in `[0, level_sizes[l])`.

Token layout. The model emits level l's code c as the token `level_offsets[l] + c`. The default offsets give
every level its own namespace after `base_offset` (`offset[l] = base_offset + sum(level_sizes[:l])`, e.g.
OneSearch's `<a_*><b_*><c_*><d_*>` tokens appended to a text vocabulary); equal offsets (e.g. all 0) give one
shared code vocabulary. `vocab_size` is the model's vocabulary (default: just large enough).

States. The tree state before emitting level l's token is the id of the emitted prefix among the distinct
length-l prefixes in lexicographic order (level 0: the root, state 0; after the last level: the leaf id, the
index of the full code among the distinct codes in lexicographic order, which a leaf -> items table can map to
items). -1 is the dead state (an invalid prefix). Because prefixes are numbered lexicographically, the
children of state s at level l are the contiguous states `[indptr[s], indptr[s + 1])` of level l + 1.

Tables, per level l (the transitions from length-l prefixes):
* l < dense_levels: `dense[l] [num_states[l], level_sizes[l]]` int32, the next state or -1 (memory
  num_states[l] x level_sizes[l]: use it for the first, narrow levels);
* l >= dense_levels: CSR, `indptr[l] [num_states[l] + 1]` and `codes[l] [num_states[l + 1]]` (the children's
  codes, sorted within each state). The (token, next_state) pair of edge j is
  `(level_offsets[l] + codes[l][j], j)`, so only the token column is stored. A state has at most
  `max_branch[l]` children (static), so a jitted step gathers a fixed `[..., max_branch[l]]` candidate set.
Memory is O(num_items x num_levels) below the dense levels.

Levels passed to the functions below may be Python ints (static, the cheapest) or traced int32 scalars (a
`lax.switch` over the levels; level `num_levels` means "complete": no valid continuation).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_hd.decoding.sampling import NEG_INF

Array = jax.Array


@flax.struct.dataclass
class PrefixTree:
    """Valid ID sequences as per-level transition tables (see the module docstring).

    dense:  one `[num_states[l], level_sizes[l]]` int32 table per level l < dense_levels.
    indptr: one `[num_states[l] + 1]` int32 array per level l >= dense_levels.
    codes:  one `[num_states[l + 1]]` int32 array per level l >= dense_levels.
    """

    dense: tuple[Array, ...]
    indptr: tuple[Array, ...]
    codes: tuple[Array, ...]
    level_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)
    level_offsets: tuple[int, ...] = flax.struct.field(pytree_node=False)
    vocab_size: int = flax.struct.field(pytree_node=False)
    dense_levels: int = flax.struct.field(pytree_node=False)
    max_branch: tuple[int, ...] = flax.struct.field(pytree_node=False)  # per level, children of the widest state
    num_states: tuple[int, ...] = flax.struct.field(pytree_node=False)  # per level 0..num_levels (last: leaves)
    num_items: int = flax.struct.field(pytree_node=False)

    @property
    def num_levels(self) -> int:
        return len(self.level_sizes)

    @property
    def num_leaves(self) -> int:
        """Distinct valid sequences."""
        return self.num_states[-1]

    def candidate_width(self, level: int) -> int:
        """Static number of candidate slots per state at `level` (the code width if dense, else max_branch)."""
        return self.level_sizes[level] if level < self.dense_levels else self.max_branch[level]


def num_bytes(tree: PrefixTree) -> int:
    """Bytes of all tables."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bytes_per_item(tree: PrefixTree) -> float:
    """Table bytes per input item (duplicates included)."""
    return num_bytes(tree) / tree.num_items


def root_state(shape: Sequence[int] = ()) -> Array:
    """The state before the first token, `[*shape]` int32 zeros."""
    return jnp.zeros(tuple(shape), jnp.int32)


def default_offsets(level_sizes: Sequence[int], base_offset: int = 0) -> tuple[int, ...]:
    """Per-level token namespaces: `offset[l] = base_offset + sum(level_sizes[:l])`."""
    return tuple(int(base_offset + x) for x in np.concatenate([[0], np.cumsum(level_sizes)[:-1]]))


def build_prefix_tree(
    codes: np.ndarray,
    level_sizes: Sequence[int],
    *,
    level_offsets: Sequence[int] | None = None,
    vocab_size: int | None = None,
    dense_levels: int = 2,
) -> PrefixTree:
    """Compiles `codes [num_items, num_levels]` (duplicates allowed) into a `PrefixTree` (numpy, vectorised).

    level_offsets: token id of code 0 per level (default `default_offsets(level_sizes)`).
    vocab_size: the model's vocabulary size (default `max(level_offsets + level_sizes)`).
    dense_levels: how many leading levels get dense tables (the rest CSR), in [0, num_levels].
    """
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must be a non-empty [num_items, num_levels] array, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    num_items, num_levels = codes.shape
    level_sizes = tuple(int(s) for s in level_sizes)
    if len(level_sizes) != num_levels or min(level_sizes) < 1:
        raise ValueError(f"level_sizes {level_sizes} must give a positive size for each of the {num_levels} levels")
    offsets = default_offsets(level_sizes) if level_offsets is None else tuple(int(o) for o in level_offsets)
    if len(offsets) != num_levels or min(offsets) < 0:
        raise ValueError(f"level_offsets {offsets} must give a non-negative offset for each of the {num_levels} levels")
    needed = max(o + s for o, s in zip(offsets, level_sizes, strict=True))
    vocab_size = needed if vocab_size is None else int(vocab_size)
    if vocab_size < needed:
        raise ValueError(f"vocab_size {vocab_size} < {needed} needed by level_offsets + level_sizes")
    if not 0 <= dense_levels <= num_levels:
        raise ValueError(f"dense_levels {dense_levels} must be in [0, {num_levels}]")
    bad = (codes < 0) | (codes >= np.asarray(level_sizes))
    if bad.any():
        row, level = np.argwhere(bad)[0]
        raise ValueError(f"codes row {row}, level {level}: code {codes[row, level]} outside [0, {level_sizes[level]})")

    codes = codes.astype(np.int32)
    ordered = codes[np.lexsort(codes.T[::-1])]
    # first_diff[i]: the first level where sorted row i differs from row i - 1 (num_levels if equal).
    differs = ordered[1:] != ordered[:-1]
    first_diff = np.concatenate([[0], np.where(differs.any(1), differs.argmax(1), num_levels)])

    dense, indptr, csr_codes, max_branch = [], [], [], []
    num_states = [1]
    parent = np.zeros(num_items, np.int64)  # state id (at level l) of each sorted row's length-l prefix
    for level in range(num_levels):
        starts = first_diff <= level  # row i starts a new length-(level + 1) prefix
        child = np.cumsum(starts) - 1
        child_parent, child_code = parent[starts], ordered[starts, level]
        counts = np.bincount(child_parent, minlength=num_states[level])
        max_branch.append(int(counts.max()))
        if level < dense_levels:
            table = np.full((num_states[level], level_sizes[level]), -1, np.int32)
            table[child_parent, child_code] = np.arange(len(child_code), dtype=np.int32)
            dense.append(table)
        else:
            indptr.append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
            csr_codes.append(child_code.astype(np.int32))
        num_states.append(len(child_code))
        parent = child
    return PrefixTree(
        dense=tuple(jnp.asarray(t) for t in dense),
        indptr=tuple(jnp.asarray(t) for t in indptr),
        codes=tuple(jnp.asarray(t) for t in csr_codes),
        level_sizes=level_sizes,
        level_offsets=offsets,
        vocab_size=vocab_size,
        dense_levels=dense_levels,
        max_branch=tuple(max_branch),
        num_states=tuple(num_states),
        num_items=num_items,
    )


# ----------------------------------------------------------------------------------------------------------
# Per-level lookups (static level).


def candidates(tree: PrefixTree, state: Array, level: int) -> tuple[Array, Array]:
    """The continuations of each state at static `level`, in a fixed number of slots.

    state: `[...]` int32 (-1: dead). Returns (tokens `[..., W]` int32, next_states `[..., W]` int32 with -1
    for empty slots), W = `tree.candidate_width(level)`; valid slots are sorted by token.
    """
    if not 0 <= level < tree.num_levels:
        raise ValueError(f"level {level} outside [0, {tree.num_levels})")
    state = jnp.asarray(state, jnp.int32)
    alive = (state >= 0)[..., None]
    offset = tree.level_offsets[level]
    if level < tree.dense_levels:
        next_states = jnp.take(tree.dense[level], jnp.maximum(state, 0), axis=0)
        tokens = jnp.broadcast_to(offset + jnp.arange(tree.level_sizes[level], dtype=jnp.int32), next_states.shape)
        return tokens, jnp.where(alive, next_states, -1)
    csr = level - tree.dense_levels
    indptr, codes = tree.indptr[csr], tree.codes[csr]
    start = jnp.take(indptr, jnp.maximum(state, 0))
    count = jnp.take(indptr, jnp.maximum(state, 0) + 1) - start
    slot = jnp.arange(tree.max_branch[level], dtype=jnp.int32)
    edge = start[..., None] + slot
    ok = alive & (slot < count[..., None])
    tokens = offset + jnp.take(codes, edge, mode="fill", fill_value=0)
    return jnp.where(ok, tokens, offset), jnp.where(ok, edge, -1)


def _static_mask(tree: PrefixTree, state: Array, level: int) -> Array:
    tokens, next_states = candidates(tree, state, level)
    offset, vocab = tree.level_offsets[level], tree.vocab_size
    if level < tree.dense_levels:  # Candidates are the whole code range: place it into the vocabulary.
        width = tree.level_sizes[level]
        pad = [(0, 0)] * state.ndim + [(offset, vocab - offset - width)]
        return jnp.pad(next_states >= 0, pad)
    flat_tokens = tokens.reshape(-1, tokens.shape[-1])
    rows = jnp.arange(flat_tokens.shape[0])[:, None]
    mask = jnp.zeros((flat_tokens.shape[0], vocab), bool)
    mask = mask.at[rows, flat_tokens].max(next_states.reshape(flat_tokens.shape) >= 0, mode="drop")
    return mask.reshape(*state.shape, vocab)


def _static_next(tree: PrefixTree, state: Array, level: int, token: Array) -> Array:
    if level < tree.dense_levels:
        code = token - tree.level_offsets[level]
        in_range = (code >= 0) & (code < tree.level_sizes[level]) & (state >= 0)
        table = tree.dense[level]
        next_state = table[jnp.clip(state, 0, table.shape[0] - 1), jnp.clip(code, 0, table.shape[1] - 1)]
        return jnp.where(in_range, next_state, -1)
    tokens, next_states = candidates(tree, state, level)
    match = (tokens == token[..., None]) & (next_states >= 0)
    return jnp.max(jnp.where(match, next_states, -1), axis=-1)


def _dispatch(tree: PrefixTree, level: int | Array, fn, dead_fn):
    """fn(static level) for a Python int level, else a `lax.switch` over the levels (+ the complete level)."""
    if isinstance(level, int | np.integer):
        if not 0 <= level <= tree.num_levels:
            raise ValueError(f"level {level} outside [0, {tree.num_levels}]")
        return dead_fn() if level == tree.num_levels else fn(int(level))
    branches = [lambda lv=lv: fn(lv) for lv in range(tree.num_levels)] + [dead_fn]
    return jax.lax.switch(jnp.clip(jnp.asarray(level, jnp.int32), 0, tree.num_levels), branches)


# ----------------------------------------------------------------------------------------------------------
# Public per-step API (static or traced level).


def valid_token_mask(tree: PrefixTree, state: Array, level: int | Array) -> Array:
    """`[..., vocab]` bool: the tokens that extend each state's prefix at `level` (state `[...]` int32)."""
    state = jnp.asarray(state, jnp.int32)
    return _dispatch(
        tree, level, lambda lv: _static_mask(tree, state, lv), lambda: jnp.zeros((*state.shape, tree.vocab_size), bool)
    )


def next_state(tree: PrefixTree, state: Array, level: int | Array, token: Array) -> Array:
    """`[...]` int32: the state after appending `token [...]` to `state [...]` at `level` (-1 if invalid)."""
    state, token = jnp.broadcast_arrays(jnp.asarray(state, jnp.int32), jnp.asarray(token, jnp.int32))
    return _dispatch(
        tree, level, lambda lv: _static_next(tree, state, lv, token), lambda: jnp.full(state.shape, -1, jnp.int32)
    )


advance = next_state


def constrain_logits(logits: Array, tree: PrefixTree, state: Array, level: int | Array) -> Array:
    """Sets logits `[..., vocab]` of tokens that do not extend `state [...]` at `level` to a large finite negative.

    For constrained sampling: mask, sample, then `advance(tree, state, level, token)`. A dead state (or
    `level == num_levels`) masks every token.
    """
    if logits.shape[-1] != tree.vocab_size:
        raise ValueError(f"logits vocabulary {logits.shape[-1]} != tree vocab_size {tree.vocab_size}")
    return jnp.where(valid_token_mask(tree, state, level), logits, jnp.asarray(NEG_INF, logits.dtype))


def lookup(tree: PrefixTree, sequences: Array) -> Array:
    """Leaf id of each token sequence `[..., num_levels]` (-1 if it is not a valid ID). `[...]` int32."""
    sequences = jnp.asarray(sequences, jnp.int32)
    if sequences.shape[-1] != tree.num_levels:
        raise ValueError(f"sequences have {sequences.shape[-1]} tokens, the tree has {tree.num_levels} levels")
    state = root_state(sequences.shape[:-1])
    for level in range(tree.num_levels):
        state = _static_next(tree, state, level, sequences[..., level])
    return state


def valid_id_rate(sequences: Array, tree: PrefixTree, where: Array | None = None) -> Array:
    """Fraction of sequences `[..., num_levels]` that are valid IDs (over `where [...]` if given). Scalar."""
    valid = lookup(tree, sequences) >= 0
    if where is None:
        return jnp.mean(valid)
    where = jnp.asarray(where, bool)
    return jnp.sum(valid & where) / jnp.maximum(jnp.sum(where), 1)
