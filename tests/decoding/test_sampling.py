import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_hd.core import sharding
from jax_hd.decoding import sampling

VOCAB = 12
PAD = 0


def markov_apply(params, tokens, positions, attention_mask, cache):
    """A 'language model' whose next-token logits depend only on the current token: params[token]."""
    del positions, attention_mask
    return params[tokens], {"end": cache["end"] + tokens.shape[1]}


def init_cache(batch, max_len):
    del batch, max_len
    return {"end": jnp.zeros((), jnp.int32)}


def chain_logits(successor):
    """Deterministic chain: token t is followed by successor[t] (logit 10 vs 0)."""
    return jnp.asarray(10.0 * np.eye(VOCAB)[np.asarray(successor)], jnp.float32)


# 1 -> 2 -> 3 -> 4 -> 5 -> 6 -> 7 -> 8 -> 9 -> 10 -> 11 -> 1 ... ; pad (0) -> 1.
CHAIN = chain_logits([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1])
CONFIG = sampling.SamplerConfig(prompt_buckets=(8, 16), new_token_buckets=(8, 16), pad_id=PAD)


@pytest.fixture(scope="module")
def sampler():
    return sampling.Sampler(markov_apply, init_cache, CONFIG)


def test_filter_logits_top_k_and_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1], [0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]))
    out = sampling.filter_logits(logits, jnp.array([2, 0, 0]), jnp.array([1.0, 0.6, 1.0]))
    kept = np.asarray(out > -1e29)
    np.testing.assert_array_equal(kept, [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(out[kept], logits[kept])
    # top_p below the first token's mass keeps exactly that token.
    assert np.asarray(sampling.filter_logits(logits, jnp.array([0, 0, 0]), jnp.full(3, 0.01)) > -1e29).sum() == 3


def test_greedy_tokens_and_logprobs():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, VOCAB))
    tokens, logprobs = sampling.sample_tokens(
        jax.random.PRNGKey(1), logits, jnp.zeros(4), jnp.zeros(4, jnp.int32), jnp.ones(4)
    )
    np.testing.assert_array_equal(tokens, jnp.argmax(logits, -1))
    np.testing.assert_allclose(logprobs, jnp.max(jax.nn.log_softmax(logits), -1), rtol=1e-6)


def test_deterministic_chain_with_per_row_stops_and_lengths(sampler):
    prompts = [[1, 2], [5], [9, 10, 11], [3]]
    out = sampler.generate(
        jnp.asarray(CHAIN), prompts, max_new_tokens=[8, 8, 8, 2], rng=jax.random.PRNGKey(0),
        stop_token_ids=[[6], [9], [], [7]],
    )
    # Row 0 continues 3,4,5,6 and stops on 6; row 1: 6,7,8,9 stops on 9; row 2 never stops; row 3 hits its limit.
    np.testing.assert_array_equal(out.tokens[0], [3, 4, 5, 6, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(out.tokens[1], [6, 7, 8, 9, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(out.tokens[2], [1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(out.tokens[3], [4, 5, PAD, PAD, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(out.lengths, [4, 4, 8, 2])
    np.testing.assert_array_equal(out.finished, [True, True, False, False])
    assert np.all(out.logprobs[out.tokens == PAD] == 0.0)
    assert np.all((out.logprobs[out.tokens != PAD] < 0) & (out.logprobs[out.tokens != PAD] > -1e-3))


def test_stop_sequences_end_only_the_rows_that_complete_them(sampler):
    prompts = [[1], [1], [4]]
    out = sampler.generate(
        jnp.asarray(CHAIN), prompts, max_new_tokens=8, rng=jax.random.PRNGKey(0),
        stop_sequences=[[[4, 5]], [[5, 7]], [[6, 7, 8]]],
    )
    np.testing.assert_array_equal(out.lengths, [4, 8, 4])  # Row 1's sequence never occurs.
    np.testing.assert_array_equal(out.finished, [True, False, True])
    np.testing.assert_array_equal(out.tokens[0, :4], [2, 3, 4, 5])
    np.testing.assert_array_equal(out.tokens[2, :4], [5, 6, 7, 8])


def test_one_program_per_bucket_and_knobs_do_not_recompile():
    sampler = sampling.Sampler(markov_apply, init_cache, CONFIG)
    for prompts, max_new, temperature in [([[1, 2, 3]], 5, 0.0), ([[1] * 7, [2]], 8, 0.7), ([[4]], 3, 1.3)]:
        sampler.generate(jnp.asarray(CHAIN), prompts * 2, max_new_tokens=max_new, rng=jax.random.PRNGKey(0),
                         temperature=temperature, top_k=3, top_p=0.9)
    assert sampler.compiled_programs() == 2  # batch 2 and batch 4 (prompt bucket 8, new-token bucket 8).
    sampler.generate(jnp.asarray(CHAIN), [[1] * 9] * 4, max_new_tokens=9, rng=jax.random.PRNGKey(0))
    assert sampler.compiled_programs() == 3
    with pytest.raises(ValueError, match="prompt length 17 exceeds the largest bucket 16"):
        sampler.generate(jnp.asarray(CHAIN), [[1] * 17], max_new_tokens=2, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="empty prompt at row 1"):
        sampler.generate(jnp.asarray(CHAIN), [[1], []], max_new_tokens=2, rng=jax.random.PRNGKey(0))


def test_temperature_sampling_follows_the_model_distribution(sampler):
    probs = np.array([0.6, 0.3, 0.1])
    table = np.full((VOCAB, VOCAB), -1e9, np.float32)
    table[:, 1:4] = np.log(probs)
    rows = 512
    out = sampler.generate(jnp.asarray(table), [[1]] * rows, max_new_tokens=8, rng=jax.random.PRNGKey(3),
                           temperature=1.0)
    counts = collections.Counter(out.tokens.ravel().tolist())
    freq = np.array([counts[1], counts[2], counts[3]]) / out.tokens.size
    np.testing.assert_allclose(freq, probs, atol=0.03)
    np.testing.assert_allclose(out.logprobs, np.log(probs)[out.tokens - 1], rtol=1e-5)
    # top_k=1 and a tiny top_p both collapse to greedy, whatever the temperature.
    for knobs in ({"top_k": 1}, {"top_p": 1e-3}):
        out = sampler.generate(jnp.asarray(table), [[1]] * 8, max_new_tokens=8, rng=jax.random.PRNGKey(4),
                               temperature=2.0, **knobs)
        assert np.all(out.tokens == 1)


class CharTokenizer:
    """A character tokenizer over ids 1..11 ('a'..'k'), for the host-side stop-string logic."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - ord("a") + 1 for c in text if c.strip()]

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 1) for i in ids if i != PAD)


def test_stop_strings_on_device_and_exact_on_host(sampler):
    tokenizer = CharTokenizer()
    sequences = sampling.stop_string_sequences(tokenizer, ["def"])
    assert sequences == [[4, 5, 6]]
    out = sampler.generate(jnp.asarray(CHAIN), [[1], [7]], max_new_tokens=16, rng=jax.random.PRNGKey(0),
                           stop_sequences=sequences)
    # Row 1 runs h i j k a b c d e f: it completes "def" on device only after 10 tokens.
    np.testing.assert_array_equal(out.lengths, [5, 10])
    np.testing.assert_array_equal(out.finished, [True, True])
    # "jk" was never given to the device; the host cuts at its first occurrence.
    cut, texts = sampling.truncate_at_stop_strings(out, tokenizer, ["def", "jk"], PAD)
    assert texts == ["bcdef", "hijk"]
    np.testing.assert_array_equal(cut.lengths, [5, 4])
    np.testing.assert_array_equal(cut.finished, [True, True])
    assert np.all(cut.tokens[1, 4:] == PAD) and np.all(cut.logprobs[1, 4:] == 0)


def test_sharded_sampler_matches_single_device():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = sampling.Sampler(markov_apply, init_cache, CONFIG, mesh=mesh)
    single = sampling.Sampler(markov_apply, init_cache, CONFIG)
    table = jax.random.normal(jax.random.PRNGKey(0), (VOCAB, VOCAB))
    prompts = [[1, 2], [3], [4, 5, 6]]  # Padded to 4 rows for data*fsdp = 4.
    kwargs = dict(max_new_tokens=8, rng=jax.random.PRNGKey(5), temperature=0.8)
    a = sharded.generate(table, prompts, **kwargs)
    b = single.generate(table, prompts, **kwargs)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-6)
