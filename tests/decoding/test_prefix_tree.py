"""Prefix tree of valid IDs: tables equal a Python trie, CSR bounds and memory, masking and sampling helpers."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_hd.core import sharding
from jax_hd.decoding import prefix_tree as pt
from jax_hd.decoding.sampling import NEG_INF

SIZES = (5, 4, 6, 3)


def random_codes(seed: int, num_items: int = 60, sizes=SIZES) -> np.ndarray:
    """Random codes with many shared prefixes (small code ranges) and explicit duplicates."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, min(s, 3 + level), num_items) for level, s in enumerate(sizes)], axis=1)
    return np.concatenate([codes, codes[rng.integers(0, num_items, 10)]])


def python_trie(codes: np.ndarray, offsets) -> dict[tuple[int, ...], set[int]]:
    """prefix (token tuple) -> set of valid next tokens."""
    children = collections.defaultdict(set)
    for row in codes.tolist():
        tokens = [o + c for o, c in zip(offsets, row, strict=True)]
        for level in range(len(tokens)):
            children[tuple(tokens[:level])].add(tokens[level])
    return children


def numpy_children(tree: pt.PrefixTree, state: int, level: int) -> list[tuple[int, int]]:
    """(token, next_state) pairs of a state read straight from the tables."""
    offset = tree.level_offsets[level]
    if level < tree.dense_levels:
        row = np.asarray(tree.dense[level])[state]
        return [(offset + int(c), int(row[c])) for c in np.flatnonzero(row >= 0)]
    csr = level - tree.dense_levels
    indptr, codes = np.asarray(tree.indptr[csr]), np.asarray(tree.codes[csr])
    return [(offset + int(codes[j]), j) for j in range(indptr[state], indptr[state + 1])]


@jax.jit
def transitions(tree: pt.PrefixTree, states: jax.Array, level: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Through the jitted API at a traced level: (mask [n, vocab], next state of every token [n, vocab])."""
    tokens = jnp.arange(tree.vocab_size)[None, :]
    return pt.valid_token_mask(tree, states, level), pt.next_state(tree, states[:, None], level, tokens)


@pytest.mark.parametrize("dense_levels,shared_vocab", [(0, False), (2, False), (4, False), (1, True)])
def test_tables_equal_python_trie(dense_levels, shared_vocab):
    codes = random_codes(dense_levels)
    offsets = (0,) * len(SIZES) if shared_vocab else pt.default_offsets(SIZES, base_offset=7)
    vocab = max(o + s for o, s in zip(offsets, SIZES, strict=True)) + 3
    tree = pt.build_prefix_tree(codes, SIZES, level_offsets=offsets, vocab_size=vocab, dense_levels=dense_levels)
    trie = python_trie(codes, offsets)
    state_of = {(): 0}
    for level in range(len(SIZES)):
        prefixes = sorted(p for p in trie if len(p) == level)
        # Lexicographic state numbering: the i-th sorted prefix has state i.
        assert [state_of[p] for p in prefixes] == list(range(len(prefixes))) == list(range(tree.num_states[level]))
        assert tree.max_branch[level] == max(len(trie[p]) for p in prefixes)
        for p in prefixes:
            children = numpy_children(tree, state_of[p], level)
            assert [t for t, _ in children] == sorted(trie[p])  # Sorted by token.
            state_of.update({p + (t,): s for t, s in children})
        # The jitted API over every (state, token) pair and the dead state.
        states = np.full(64, -1, np.int32)
        states[: len(prefixes)] = np.arange(len(prefixes))
        expected = np.zeros((64, vocab), bool)
        for i, p in enumerate(prefixes):
            expected[i, sorted(trie[p])] = True
        mask, nxt = (np.asarray(x) for x in transitions(tree, jnp.asarray(states), jnp.int32(level)))
        np.testing.assert_array_equal(mask, expected)
        np.testing.assert_array_equal(nxt >= 0, expected)
        for i, p in enumerate(prefixes):
            assert all(nxt[i, t] == state_of[p + (t,)] for t in trie[p])
    leaves = sorted(p for p in state_of if len(p) == len(SIZES))
    assert tree.num_leaves == len(leaves) and [state_of[p] for p in leaves] == list(range(len(leaves)))
    seqs = np.asarray(codes) + np.asarray(offsets)
    np.testing.assert_array_equal(jax.jit(pt.lookup)(tree, seqs), [state_of[tuple(s)] for s in seqs.tolist()])


def test_complete_and_dead_states_mask_everything():
    tree = pt.build_prefix_tree(random_codes(0), SIZES)
    logits = jnp.linspace(-1.0, 1.0, tree.vocab_size)[None].repeat(3, 0)
    out = pt.constrain_logits(logits, tree, jnp.asarray([0, -1, 0]), 0)
    assert (out[1] == NEG_INF).all()
    np.testing.assert_array_equal(out[0] > NEG_INF / 2, pt.valid_token_mask(tree, jnp.zeros((), jnp.int32), 0))
    np.testing.assert_array_equal(out[0][out[0] > NEG_INF / 2], logits[0][out[0] > NEG_INF / 2])
    assert (pt.constrain_logits(logits, tree, jnp.zeros(3, jnp.int32), tree.num_levels) == NEG_INF).all()
    assert (pt.next_state(tree, 0, jnp.int32(tree.num_levels), tree.level_offsets[0]) == -1).all()


def test_csr_branching_bound_and_memory_linear_in_items():
    rng = np.random.default_rng(0)
    sizes = (64, 64, 64, 64, 64)
    codes = rng.integers(0, 64, (100_000, 5))
    codes[:, 1] %= 8  # uneven branching
    tree = pt.build_prefix_tree(codes, sizes, dense_levels=1)
    n, levels = codes.shape
    for csr, level in enumerate(range(1, levels)):
        counts = np.diff(np.asarray(tree.indptr[csr]))
        assert counts.max() == tree.max_branch[level] and counts.min() >= 1
        assert len(tree.codes[csr]) == tree.num_states[level + 1] <= n
    dense_bytes = 64 * 4
    assert pt.num_bytes(tree) <= dense_bytes + (levels - 1) * (8 * n + 4)
    assert pt.bytes_per_item(tree) == pt.num_bytes(tree) / n
    assert tree.max_branch[1] == 8 and tree.candidate_width(0) == 64 and tree.candidate_width(2) == tree.max_branch[2]


def test_valid_id_rate_and_lookup():
    codes = np.asarray([[0, 1, 2], [0, 1, 0], [2, 2, 2]])
    tree = pt.build_prefix_tree(codes, (3, 3, 3), dense_levels=1)  # tokens: level l code c -> 3 l + c
    sequences = jnp.asarray([[0, 4, 8], [0, 4, 6], [2, 5, 8], [0, 4, 7], [2, 4, 8], [6, 4, 8]])
    np.testing.assert_array_equal(pt.lookup(tree, sequences), [1, 0, 2, -1, -1, -1])
    assert float(pt.valid_id_rate(sequences, tree)) == pytest.approx(0.5)
    where = jnp.asarray([True, True, False, True, False, False])
    assert float(pt.valid_id_rate(sequences, tree, where)) == pytest.approx(2 / 3)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="row 1, level 2"):
        pt.build_prefix_tree(np.asarray([[0, 0, 0], [0, 1, 3]]), (2, 2, 3))
    with pytest.raises(ValueError, match="vocab_size"):
        pt.build_prefix_tree(np.zeros((2, 2), int), (4, 4), vocab_size=7)
    with pytest.raises(ValueError, match="dense_levels"):
        pt.build_prefix_tree(np.zeros((2, 2), int), (4, 4), dense_levels=3)
    with pytest.raises(ValueError, match="level_sizes"):
        pt.build_prefix_tree(np.zeros((2, 2), int), (4,))
    with pytest.raises(ValueError, match="non-empty"):
        pt.build_prefix_tree(np.zeros((0, 2), int), (4, 4))


def test_constrained_sampling_in_a_while_loop_yields_valid_ids_replicated_on_a_mesh():
    codes = random_codes(3)
    tree = pt.build_prefix_tree(codes, SIZES, dense_levels=1)
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    tree = jax.device_put(tree, jax.NamedSharding(mesh, jax.P()))
    batch, levels = 16, tree.num_levels

    @jax.jit
    def sample(tree, rng):
        def body(level, loop):
            state, tokens, rng = loop
            rng, key = jax.random.split(rng)
            logits = pt.constrain_logits(jnp.zeros((batch, tree.vocab_size)), tree, state, level)
            token = jax.random.categorical(key, logits).astype(jnp.int32)
            return pt.advance(tree, state, level, token), tokens.at[:, level].set(token), rng

        init = (pt.root_state((batch,)), jnp.zeros((batch, levels), jnp.int32), rng)
        state, tokens, _ = jax.lax.fori_loop(0, levels, body, init)
        return state, tokens

    state, tokens = sample(tree, jax.random.PRNGKey(0))
    assert (np.asarray(state) >= 0).all()
    np.testing.assert_array_equal(pt.lookup(tree, tokens), state)
    assert float(pt.valid_id_rate(tokens, tree)) == 1.0
    assert len({tuple(t) for t in np.asarray(tokens).tolist()}) > 1
