"""Beam search: equals brute force / a Python beam search on a toy decoder, dead beams, unconstrained mode,
one compile for several batches, and the Qwen2 adapter against teacher forcing."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jax_hd.decoding import beam_search as bs
from jax_hd.decoding import prefix_tree as pt
from jax_hd.decoding.sampling import NEG_INF
from jax_hd.models import qwen2

VOCAB = 16
HASH = 97  # rows of the toy decoder's logits table
TABLE = np.random.default_rng(0).normal(0.0, 2.0, (HASH, VOCAB)).astype(np.float32)


def toy_hash(h, token):
    return (h * 7 + token + 1) % HASH


def toy_step(carry, tokens):
    """Logits depend on the whole prefix through a running hash: beam reordering must be right."""
    h = toy_hash(carry["h"], tokens)
    return jnp.asarray(TABLE)[h], {"h": h, "steps": carry["steps"] + 1}


def toy_logprob(h0: int, sequence) -> float:
    h, total = h0, 0.0
    for token in sequence:
        logits = TABLE[h].astype(np.float64)
        total += logits[token] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
        h = toy_hash(h, token)
    return total


def reference_beam_search(h0: int, allowed, num_levels: int, num_beams: int):
    """Python beam search: keep the best `num_beams` valid prefixes per level. allowed(prefix) -> tokens."""
    beams = [((), 0.0)]
    for _ in range(num_levels):
        expanded = [(p + (t,), toy_logprob(h0, p + (t,))) for p, _ in beams for t in allowed(p)]
        beams = sorted(expanded, key=lambda x: -x[1])[:num_beams]
    return beams


@functools.partial(jax.jit, static_argnames=("num_beams", "num_levels"))
def toy_search(h0, tree, *, num_beams, num_levels=None):
    carry = {"h": h0, "steps": jnp.zeros(h0.shape, jnp.int32)}
    return bs.beam_search(
        toy_step, carry, jnp.asarray(TABLE)[h0], num_beams=num_beams, tree=tree, num_levels=num_levels
    )


def make_tree(codes, dense_levels=1):
    return pt.build_prefix_tree(
        np.asarray(codes), (4, 4, 4), level_offsets=(2, 6, 10), vocab_size=VOCAB, dense_levels=dense_levels
    )


CODES = np.random.default_rng(1).integers(0, 4, (14, 3))
H0 = jnp.asarray([3, 50, 11], jnp.int32)


def trie_allowed(codes, offsets):
    sequences = {tuple(o + c for o, c in zip(offsets, row, strict=True)) for row in np.asarray(codes).tolist()}
    return sequences, lambda p: sorted({s[len(p)] for s in sequences if s[: len(p)] == p})


@pytest.mark.parametrize("dense_levels", [0, 3])
def test_exhaustive_beams_equal_brute_force_top_k(dense_levels):
    tree = make_tree(CODES, dense_levels)
    num_beams = max(tree.num_states[:-1])  # Enough beams to keep every valid prefix: the search is exhaustive.
    out = jax.device_get(toy_search(H0, tree, num_beams=num_beams))
    sequences, _ = trie_allowed(CODES, tree.level_offsets)
    for b, h0 in enumerate(np.asarray(H0).tolist()):
        ranked = sorted(((toy_logprob(h0, s), s) for s in sequences), reverse=True)[:num_beams]
        k = len(ranked)
        assert out.valid[b].sum() == k
        np.testing.assert_allclose(out.scores[b, :k], [s for s, _ in ranked], rtol=1e-5)
        assert [tuple(s) for s in out.sequences[b, :k].tolist()] == [s for _, s in ranked]
        assert (out.scores[b, k:] == NEG_INF).all() and (out.sequences[b, k:] == -1).all()
        np.testing.assert_array_equal(out.leaf_ids[b, :k], pt.lookup(tree, out.sequences[b, :k]))


def test_small_beams_equal_python_beam_search():
    tree = make_tree(CODES)
    out = jax.device_get(toy_search(H0, tree, num_beams=3))
    _, allowed = trie_allowed(CODES, tree.level_offsets)
    for b, h0 in enumerate(np.asarray(H0).tolist()):
        expected = reference_beam_search(h0, allowed, 3, 3)
        assert [tuple(s) for s in out.sequences[b].tolist()] == [s for s, _ in expected]
        np.testing.assert_allclose(out.scores[b], [s for _, s in expected], rtol=1e-5)
        assert out.valid[b].all()


def test_more_beams_than_valid_ids_flags_the_rest():
    tree = make_tree([[1, 2, 3], [1, 0, 3]])
    out = jax.device_get(toy_search(H0, tree, num_beams=8))
    np.testing.assert_array_equal(out.valid.sum(1), [2, 2, 2])
    assert out.valid[:, :2].all()
    for b in range(3):
        assert {tuple(s) for s in out.sequences[b, :2].tolist()} == {(3, 8, 13), (3, 6, 13)}
        assert out.scores[b, 0] >= out.scores[b, 1] > NEG_INF / 2
    assert (out.sequences[:, 2:] == -1).all() and (out.scores[:, 2:] == NEG_INF).all()
    assert (out.leaf_ids[:, 2:] == -1).all() and set(out.leaf_ids[:, :2].ravel()) == {0, 1}


def test_unconstrained_equals_exhaustive_top_k_and_valid_id_rate():
    out = jax.device_get(toy_search(H0, None, num_beams=VOCAB, num_levels=2))  # Keeps all V prefixes: exhaustive.
    for b, h0 in enumerate(np.asarray(H0).tolist()):
        ranked = sorted(((toy_logprob(h0, s), s) for s in itertools.product(range(VOCAB), repeat=2)), reverse=True)
        assert [tuple(s) for s in out.sequences[b].tolist()] == [s for _, s in ranked[:VOCAB]]
        np.testing.assert_allclose(out.scores[b], [s for s, _ in ranked[:VOCAB]], rtol=1e-5)
    assert out.valid.all() and (out.leaf_ids == -1).all()
    # Same shapes as the constrained mode; the valid-ID rate against a tree of 2-token IDs.
    codes = np.asarray(out.sequences[0, :5])  # Shared vocabulary: codes are tokens.
    tree = pt.build_prefix_tree(codes, (VOCAB, VOCAB), level_offsets=(0, 0), vocab_size=VOCAB)
    rate = float(pt.valid_id_rate(out.sequences, tree))
    expected = np.mean([tuple(s) in {tuple(c) for c in codes.tolist()} for s in out.sequences.reshape(-1, 2).tolist()])
    assert rate == pytest.approx(expected) and 0 < rate < 1
    wide = jax.device_get(toy_search(H0, None, num_beams=VOCAB + 4, num_levels=1))  # More beams than sequences.
    assert wide.sequences.shape == (3, VOCAB + 4, 1)
    assert wide.valid[:, :VOCAB].all() and not wide.valid[:, VOCAB:].any()
    assert [sorted(s) for s in wide.sequences[:, :VOCAB, 0].tolist()] == [list(range(VOCAB))] * 3


def test_one_compile_for_several_batches():
    tree = make_tree(CODES)

    @functools.partial(jax.jit, static_argnames="num_beams")
    def search(tree, h0, *, num_beams):
        carry = {"h": h0, "steps": jnp.zeros(h0.shape, jnp.int32)}
        return bs.beam_search(toy_step, carry, jnp.asarray(TABLE)[h0], num_beams=num_beams, tree=tree)

    results = [search(tree, jnp.asarray(h), num_beams=4) for h in ([1, 2, 3], [4, 5, 6], [7, 8, 9])]
    assert search._cache_size() == 1
    assert all(bool(r.valid.all()) for r in results)
    assert not np.array_equal(results[0].sequences, results[1].sequences)


def test_bad_arguments():
    tree = make_tree(CODES)
    carry = {"h": H0, "steps": H0}
    with pytest.raises(ValueError, match="num_levels"):
        bs.beam_search(toy_step, carry, jnp.asarray(TABLE)[H0], num_beams=2)
    with pytest.raises(ValueError, match="vocab"):
        bs.beam_search(toy_step, carry, jnp.zeros((3, VOCAB + 1)), num_beams=2, tree=tree)


# ----------------------------------------------------------------------------------------------------------
# Qwen2 adapter.

CONFIG = qwen2.Qwen2Config.tiny(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
PROMPTS = [[5, 17, 33, 2, 8, 9], [40, 41, 3]]
PROMPT_LEN = 8
QWEN_SIZES = (6, 5, 4)


@pytest.fixture(scope="module")
def qwen():
    # Random weights without compiling the Flax init: shapes from eval_shape, values from numpy. The scale
    # (0.15 vs HF's 0.02) gives non-uniform next-token distributions.
    shapes = nn.unbox(jax.eval_shape(functools.partial(qwen2.init_params, CONFIG), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            np.ones(x.shape, np.float32)
            if path[-1].key == "scale"
            else rng.normal(0.0, 0.15, x.shape).astype(np.float32)
        ),
        shapes,
    )
    codes = np.random.default_rng(2).integers(0, 4, (30, 3))
    tree = pt.build_prefix_tree(
        codes,
        QWEN_SIZES,
        level_offsets=pt.default_offsets(QWEN_SIZES, 40),
        vocab_size=CONFIG.vocab_size,
        dense_levels=1,
    )
    tokens = np.zeros((len(PROMPTS), PROMPT_LEN), np.int32)
    mask = np.zeros((len(PROMPTS), PROMPT_LEN), bool)
    for b, p in enumerate(PROMPTS):
        tokens[b, PROMPT_LEN - len(p) :], mask[b, PROMPT_LEN - len(p) :] = p, True
    search = jax.jit(functools.partial(bs.qwen2_beam_search, CONFIG), static_argnames=("num_beams", "num_levels"))
    return params, tree, tokens, mask, search


@jax.jit
def teacher_forced_logprobs(params, tokens, mask, sequences):
    """`[batch, beams]` sum of log p(sequence | prompt) from one full forward without a cache.

    tokens, mask: the left-padded prompts `[batch, prompt_len]`; sequences `[batch, beams, levels]`.
    """
    batch, beams, levels = sequences.shape
    ids = jnp.concatenate([jnp.repeat(tokens, beams, axis=0), sequences.reshape(batch * beams, levels)], axis=1)
    full_mask = jnp.concatenate([jnp.repeat(mask, beams, axis=0), jnp.ones((batch * beams, levels), bool)], axis=1)
    logits, _ = qwen2.Qwen2LM(CONFIG).apply({"params": params}, ids, qwen2.positions_from_mask(full_mask), full_mask)
    logprobs = jax.nn.log_softmax(logits[:, -levels - 1 : -1], axis=-1)
    picked = jnp.take_along_axis(logprobs, ids[:, -levels:, None], axis=-1)[..., 0]
    return picked.sum(-1).reshape(batch, beams)


def test_qwen2_constrained_beams_are_valid_and_scored_by_the_model(qwen):
    params, tree, tokens, mask, search = qwen
    out = jax.device_get(search(params, tokens, mask, num_beams=4, tree=tree))
    assert out.sequences.shape == (2, 4, 3) and out.valid.all()
    assert float(pt.valid_id_rate(out.sequences, tree)) == 1.0
    for b in range(len(PROMPTS)):
        assert len({tuple(s) for s in out.sequences[b].tolist()}) == 4
        assert (np.diff(out.scores[b]) <= 0).all()
    np.testing.assert_allclose(out.scores, teacher_forced_logprobs(params, tokens, mask, out.sequences), atol=2e-4)
    assert not np.array_equal(out.sequences[0], out.sequences[1])


def test_qwen2_unconstrained_has_the_same_shapes_and_model_scores(qwen):
    params, tree, tokens, mask, search = qwen
    out = jax.device_get(search(params, tokens, mask, num_beams=4, num_levels=3))
    assert out.sequences.shape == (2, 4, 3) and out.valid.all()
    np.testing.assert_allclose(out.scores, teacher_forced_logprobs(params, tokens, mask, out.sequences), atol=2e-4)
