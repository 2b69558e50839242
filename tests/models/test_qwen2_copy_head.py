"""Qwen2 with the pointer-generator copy head: a normalised mixture, copying only from valid context, KV-cache
decoding and `score_tokens` equal to the full forward, sharded cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.models import qwen2

CONFIG = qwen2.Qwen2Config.tiny(vocab_size=64, tie_word_embeddings=True, copy_head=True)
# Left-padded batch of 3: lengths 8, 5, 3.
MASK = np.array([[1] * 8, [0] * 3 + [1] * 5, [0] * 5 + [1] * 3], bool)
TOKENS = np.random.RandomState(0).randint(0, 64, MASK.shape).astype(np.int32)


@functools.cache
def _params():
    return qwen2.init_params(CONFIG, jax.random.PRNGKey(0))


def _forward(params, tokens, mask, **kwargs):
    model = qwen2.Qwen2LM(CONFIG)
    return model.apply({"params": params}, tokens, qwen2.positions_from_mask(mask), mask, **kwargs)[0]


def test_the_mixture_is_normalised_and_the_copy_head_has_its_params():
    params = _params()
    assert set(params["copy_head"]) == {"query", "key", "gate"}
    logits = np.asarray(jax.jit(_forward)(params, TOKENS, MASK))
    np.testing.assert_allclose(jax.nn.logsumexp(logits, axis=-1)[MASK], 0.0, atol=1e-5)


def test_a_saturated_gate_copies_only_tokens_of_the_valid_context_so_far():
    params = jax.tree.map(lambda x: x, nn.unbox(_params()))
    params["copy_head"]["gate"]["bias"] = jnp.full((1,), 40.0)
    probs = np.exp(np.asarray(jax.jit(_forward)(params, TOKENS, MASK)))
    for b in range(3):
        for t in np.flatnonzero(MASK[b]):
            seen = set(TOKENS[b, : t + 1][MASK[b, : t + 1]].tolist())
            assert probs[b, t, sorted(seen)].sum() > 1 - 1e-5
            unseen = sorted(set(range(CONFIG.vocab_size)) - seen)
            assert probs[b, t, unseen].sum() < 1e-5


def test_cached_decoding_matches_the_full_forward():
    params = _params()
    prompt_mask = np.array([[1] * 6, [0] * 2 + [1] * 4, [0] * 4 + [1] * 2], bool)
    mask = np.concatenate([prompt_mask, np.ones((3, 4), bool)], axis=1)
    tokens = np.random.RandomState(1).randint(0, 64, mask.shape).astype(np.int32)
    positions = np.asarray(qwen2.positions_from_mask(mask))
    full = np.asarray(_forward(params, tokens, mask))
    model = qwen2.Qwen2LM(CONFIG)
    step = jax.jit(lambda p, t, pos, m, c: model.apply({"params": p}, t, pos, m, c))
    cache = qwen2.init_cache(CONFIG, batch=3, max_len=12)
    logits, cache = step(params, tokens[:, :6], positions[:, :6], prompt_mask, cache)
    np.testing.assert_allclose(np.asarray(logits)[prompt_mask], full[:, :6][prompt_mask], atol=1e-5, rtol=0)
    for t in range(6, 10):
        logits, cache = step(params, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.tokens)[:, :10], tokens)


def test_score_tokens_matches_the_full_forward_with_and_without_the_copy_head():
    for config in (CONFIG, qwen2.Qwen2Config.tiny(vocab_size=64, tie_word_embeddings=True, logits_chunk_size=2)):
        params = nn.unbox(qwen2.init_params(config, jax.random.PRNGKey(1)))
        model = qwen2.Qwen2LM(config)
        full = model.apply({"params": params}, TOKENS, qwen2.positions_from_mask(MASK), MASK)[0]
        log_probs = jax.nn.log_softmax(full, axis=-1)
        expected = np.take_along_axis(np.asarray(log_probs)[:, 4:7], TOKENS[:, 5:, None], axis=-1)[..., 0]
        expected_entropy = -np.sum(np.exp(log_probs[:, 4:7]) * log_probs[:, 4:7], axis=-1)
        picked, entropy = qwen2.score_tokens(model, params, TOKENS, MASK, 3, with_entropy=True)
        np.testing.assert_allclose(np.asarray(picked), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(entropy), expected_entropy, atol=1e-4, rtol=0)


def test_the_copy_cache_shards_over_the_batch():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    shardings = qwen2.cache_shardings(mesh, copy_head=True)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        cache = jax.jit(functools.partial(qwen2.init_cache, CONFIG, 8, 12), out_shardings=shardings)()
    assert cache.copy_k.sharding.spec[0] == ("data", "fsdp")
    assert cache.tokens.sharding.spec == P(("data", "fsdp"), None)
