"""OneSearch generator: vocabulary layout, behaviour uid (spec §1.5), input layout (§1.6), sliding windows, memory
injection, both backbones' forward and constrained generation."""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jax_hd.decoding import prefix_tree as pt
from jax_hd.models import bart, qformer, qwen2
from jax_hd.onesearch import model as M

LEVELS = (8, 4, 4, 16, 16)
OFFSETS = (0, 8, 12, 16, 32)
VOCAB = M.Vocab(50, LEVELS, OFFSETS, ("age:18-23", "gender:male"))
LAYOUT = M.LayoutConfig(max_query_tokens=4, max_recent=2, recent_query_tokens=2, num_memory=3, max_profile_tokens=2)
CODES = np.array([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [7, 3, 3, 15, 15], [7, 3, 3, 15, 14]])


def test_vocab_layout():
    specials = [VOCAB.special(n) for n in M.SPECIAL_TOKENS + M.TASK_TOKENS]
    profile = [VOCAB.profile(v) for v in VOCAB.profile_values]
    sids = VOCAB.sid_tokens(np.array([[0, 0, 0, 0, 0], [7, 3, 3, 15, 15]])).reshape(-1).tolist()
    assert specials[0] == 50 and profile == [specials[-1] + 1, specials[-1] + 2]
    assert VOCAB.sid_offset == profile[-1] + 1
    assert min(sids) == VOCAB.sid_offset and max(sids) == VOCAB.sid_offset + sum(LEVELS) - 1
    assert VOCAB.vocab_size % 8 == 0 and VOCAB.vocab_size >= VOCAB.sid_offset + sum(LEVELS)
    np.testing.assert_array_equal(VOCAB.sid_codes(VOCAB.sid_tokens(CODES)), CODES)
    assert (VOCAB.sid_codes(np.full((1, 5), 3)) == -1).all()  # text tokens are no SID codes
    with pytest.raises(ValueError, match="outside"):
        VOCAB.sid_tokens(np.array([[8, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="unknown profile value"):
        VOCAB.profile("gender:robot")


def test_weighted_sid_hand_values():
    e1, e2 = math.exp(1.0), math.exp(math.sqrt(2.0))
    np.testing.assert_allclose(M.position_weights(2), [e1 / (e1 + e2), e2 / (e1 + e2)])
    # 2 * 0.3982 + 4 * 0.6018 = 3.204 -> 4;  6 * 0.3982 + 0 * 0.6018 = 2.389 -> 3;  equal codes stay exact.
    codes = np.array([[2, 6, 5, 1, 0], [4, 0, 5, 1, 0]])
    np.testing.assert_array_equal(M.weighted_sid(codes), [4, 3, 5, 1, 0])
    uid = M.behaviour_uid(codes, codes[:1])
    np.testing.assert_array_equal(uid, [[4, 3, 5, 1, 0], [2, 6, 5, 1, 0]])
    # The most recent item weighs most: three items, the last one dominates.
    assert M.position_weights(3).argmax() == 2
    with pytest.raises(ValueError, match="non-empty"):
        M.weighted_sid(np.zeros((0, 5)))


def test_behaviour_uid_centroid_mode():
    calls = []

    def encode_fn(x):
        calls.append(x.copy())
        return np.array([[1, 2, 3, 4, 5]])

    emb = np.array([[1.0, 0.0], [0.0, 1.0]])
    uid = M.behaviour_uid(
        CODES[:2], CODES[:1], mode="centroid", encode_fn=encode_fn, short_embeddings=emb, long_embeddings=emb[:1]
    )
    assert uid.shape == (2, 5) and len(calls) == 2
    np.testing.assert_allclose(calls[0][0], M.position_weights(2) @ emb, rtol=1e-6)
    with pytest.raises(ValueError, match="needs encode_fn"):
        M.behaviour_uid(CODES[:2], CODES[:1], mode="centroid")
    with pytest.raises(ValueError, match="not one of"):
        M.behaviour_uid(CODES[:2], CODES[:1], mode="hash")


def test_build_input_segments_on_a_hand_example():
    uid = np.stack([CODES[0], CODES[1]])
    ids, seg = M.build_input(
        VOCAB, LAYOUT, uid=uid, query_ids=[5, 6, 7, 8, 9, 10], query_sid=CODES[2],
        recent_queries=[([1], CODES[0]), ([2, 3, 4], CODES[1]), ([11, 12], CODES[3])],
        recent_items=[CODES[0], CODES[1], CODES[2]], profile=["gender:male", "age:18-23"],
    )  # fmt: skip
    names = [M.SEGMENTS[s] for s in seg]
    spans = {}
    for i, name in enumerate(names):
        spans.setdefault(name, []).append(i)
    bos, sep, eos, mem = (VOCAB.special(n) for n in ("[BOS]", "[SEP]", "[EOS]", "[MEM]"))
    assert ids[0] == bos and ids[-1] == eos
    assert spans["uid"] == list(range(1, 11))
    np.testing.assert_array_equal(ids[1:11], VOCAB.sid_tokens(uid).reshape(-1))
    assert ids[11] == sep and spans["query"] == [12, 13, 14, 15]  # truncated to max_query_tokens
    assert ids[12:16].tolist() == [5, 6, 7, 8]
    assert spans["query_sid"] == list(range(17, 22))
    # The latest max_recent=2 recent queries, each 2 text tokens + 5 SID tokens.
    assert spans["recent_queries"] == list(range(23, 37))
    assert ids[23:25].tolist() == [2, 3] and ids[30:32].tolist() == [11, 12]
    np.testing.assert_array_equal(ids[32:37], VOCAB.sid_tokens(CODES[3]))
    assert spans["recent_items"] == list(range(38, 48))
    np.testing.assert_array_equal(ids[38:48], VOCAB.sid_tokens(CODES[1:3]).reshape(-1))
    assert spans["memory"] == [49, 50, 51] and (ids[49:52] == mem).all()
    assert ids[spans["profile"]].tolist() == [VOCAB.profile("gender:male"), VOCAB.profile("age:18-23")]
    assert [i for i, n in enumerate(names) if n == "special" and ids[i] == sep] == [11, 16, 22, 37, 48, 52]
    assert len(ids) <= LAYOUT.input_length(VOCAB.num_levels) == len(ids)  # every budget full: the maximum
    # Cold user without uid, no context.
    ids, seg = M.build_input(VOCAB, LAYOUT, uid=None, query_ids=[5], query_sid=CODES[0])
    assert ids[1] == VOCAB.special("[NOUID]") and (ids == mem).sum() == 3
    with pytest.raises(ValueError, match="uid must be"):
        M.build_input(VOCAB, LAYOUT, uid=CODES[0], query_ids=[5], query_sid=CODES[0])


def test_task_input_target_and_padding():
    prompt = M.build_task_input(VOCAB, M.LayoutConfig(max_task_tokens=3), "[Q2SID]", [4, 5, 6, 7])
    assert prompt.tolist() == [VOCAB.special("[BOS]"), VOCAB.special("[Q2SID]"), 4, 5, 6, VOCAB.special("[EOS]")]
    layout = M.LayoutConfig(max_target_tokens=4)
    assert M.build_target(VOCAB, layout, [1, 2, 3, 4, 5], eos=True).tolist() == [1, 2, 3, VOCAB.special("[EOS]")]
    assert M.build_target(VOCAB, layout, [1, 2], eos=False).tolist() == [1, 2]
    x, m = M.pad_rows([np.array([1, 2]), np.array([3])], 3)
    assert x.tolist() == [[1, 2, 0], [3, 0, 0]] and m.sum() == 3
    with pytest.raises(ValueError, match="row 1"):
        M.pad_rows([np.array([1]), np.array([1, 2, 3, 4])], 3)


def test_keyword_segment_teacher_prompt_and_user_task_input():
    sep, eos, kw = VOCAB.special("[SEP]"), VOCAB.special("[EOS]"), VOCAB.special("[KW]")
    assert M.keyword_tokens(VOCAB, [[1, 2], [3], [4, 5, 6]], 6) == [1, 2, sep, 3]  # whole keywords only
    assert M.keyword_tokens(VOCAB, [[1, 2, 3, 4, 5]], 3) == [1, 2, 3]  # a too-long first keyword is cut
    layout = dataclasses.replace(LAYOUT, max_keyword_tokens=6)
    assert layout.input_length(VOCAB.num_levels) == LAYOUT.input_length(VOCAB.num_levels) + 7
    uid = np.stack([CODES[0], CODES[1]])
    student, _ = M.build_input(
        VOCAB, layout, uid=uid, query_ids=[5, 6, 7, 8], query_sid=CODES[2],
        recent_queries=[([1, 2], CODES[0])] * 2, recent_items=[CODES[0]] * 2, profile=["gender:male", "age:18-23"],
    )  # fmt: skip
    short = M.add_keywords(VOCAB, layout, student, [[9, 10], [], [11], [12, 13, 14]])
    assert short.tolist() == student[:-1].tolist() + [kw, 9, 10, sep, 11, eos]  # [12, 13, 14] does not fit
    teacher = M.add_keywords(VOCAB, layout, student, [[9, 10], [11], [12]])
    assert teacher.tolist() == student[:-1].tolist() + [kw, 9, 10, sep, 11, sep, 12, eos]
    assert len(teacher) == layout.input_length(VOCAB.num_levels)  # full budgets: the longest teacher prompt
    np.testing.assert_array_equal(M.add_keywords(VOCAB, layout, student, []), student)  # no keywords: unchanged
    with pytest.raises(ValueError, match="must end with"):
        M.add_keywords(VOCAB, layout, student[:-1], [[9]])
    ids = M.build_user_task_input(
        VOCAB, LAYOUT, "[Q2PKW]", [5, 6, 7, 8, 9], recent_queries=[([1, 2, 3], CODES[0])], profile=["gender:male"]
    )
    assert ids.tolist() == [
        VOCAB.special("[BOS]"), VOCAB.special("[Q2PKW]"), 5, 6, 7, 8, sep, 1, 2, *VOCAB.sid_tokens(CODES[0]).tolist(),
        sep, VOCAB.profile("gender:male"), eos,
    ]  # fmt: skip
    assert len(ids) <= LAYOUT.input_length(VOCAB.num_levels)


@pytest.mark.parametrize("n,window,expected", [(7, 3, 6), (1, 5, 0), (0, 5, 0), (5, 10, 4)])
def test_sliding_window_counts(n, window, expected):
    seq = list(range(100, 100 + n))
    examples = M.sliding_window_examples(seq, window)
    assert len(examples) == expected
    for t, (prefix, nxt) in enumerate(examples, start=1):
        assert nxt == seq[t] and prefix == seq[max(0, t - window) : t] and 1 <= len(prefix) <= window
    with pytest.raises(ValueError):
        M.sliding_window_examples(seq, 0)


def test_inject_memory_and_left_align():
    embeds = jnp.zeros((2, 5, 3))
    ids = jnp.array([[1, 9, 9, 2, 9], [9, 1, 1, 1, 1]])
    mem = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3) + 1
    out = M.inject_memory(embeds, ids, mem, 9)
    chex.assert_trees_all_close(out[0, 1], mem[0, 0])
    chex.assert_trees_all_close(out[0, 2], mem[0, 1])
    chex.assert_trees_all_close(out[0, 4], mem[0, 2])
    chex.assert_trees_all_close(out[1, 0], mem[1, 0])
    assert float(jnp.abs(out[0, 0]).sum()) == 0 and float(jnp.abs(out[1, 1:]).sum()) == 0
    tokens, mask = M.left_align(jnp.array([[5, 6, 0, 0], [7, 8, 9, 1]]), jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool))
    assert tokens.tolist() == [[0, 0, 5, 6], [7, 8, 9, 1]] and mask[0].tolist() == [False, False, True, True]


def _config(backbone):
    qf = qformer.QFormerConfig.tiny(
        num_query_tokens=3, encoder_hidden_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    kw = (
        dict(bart=bart.BartConfig.tiny(vocab_size=VOCAB.vocab_size, pad_token_id=0))
        if backbone == "bart"
        else dict(qwen2=qwen2.Qwen2Config.tiny(vocab_size=VOCAB.vocab_size, num_hidden_layers=1))
    )
    return M.OneSearchConfig(backbone, qf, VOCAB.special("[MEM]"), VOCAB.special("[DEC]"), **kw)


@functools.cache
def _params(backbone):
    return nn.unbox(M.init_params(_config(backbone), jax.random.PRNGKey(0)))


def _batch():
    rows = []
    for i in range(2):
        ids, _ = M.build_input(
            VOCAB,
            LAYOUT,
            uid=np.stack([CODES[i], CODES[i + 1]]),
            query_ids=[3 + i, 4],
            query_sid=CODES[i],
            recent_items=[CODES[2]],
            profile=["gender:male"],
        )
        rows.append(ids if i == 0 else ids[:-3])
    x, m = M.pad_rows(rows, LAYOUT.input_length(5))
    memory = np.random.default_rng(0).normal(size=(2, 9, 16)).astype(np.float32)
    return x, m, memory


@pytest.mark.parametrize("backbone", M.BACKBONES)
def test_forward_memory_matters_and_constrained_generation(backbone):
    cfg, params = _config(backbone), _params(backbone)
    x, m, memory = _batch()
    labels = VOCAB.sid_tokens(CODES[:2])
    apply = jax.jit(lambda p, mem, lab: M.OneSearchModel(cfg).apply({"params": p}, x, m, mem, lab))
    logits = apply(params, memory, labels)
    chex.assert_shape(logits, (2, 5, VOCAB.vocab_size))
    chex.assert_tree_all_finite(logits)

    # The long-sequence memory enters through the [MEM] slots (tiny at init, but connected: non-zero gradient).
    def memory_loss(mem):
        out = M.OneSearchModel(cfg).apply({"params": params}, x, m, mem, labels)
        return M.sequence_loss(out, labels, np.ones_like(labels, bool))[0]

    assert float(jnp.abs(jax.jit(jax.grad(memory_loss))(memory)).max()) > 0
    loss, acc = M.sequence_loss(logits, labels, np.ones_like(labels, bool))
    assert 0 < float(loss) < 2 * math.log(VOCAB.vocab_size) and 0 <= float(acc) <= 1

    tree = pt.build_prefix_tree(CODES, LEVELS, level_offsets=VOCAB.sid_token_offsets, vocab_size=VOCAB.vocab_size)
    out = jax.jit(lambda p: M.generate(cfg, p, x, m, memory, num_beams=6, tree=tree, num_levels=5))(params)
    valid = np.asarray(out.valid)
    assert valid.sum(axis=1).tolist() == [4, 4]  # 4 distinct valid SIDs; the other 2 beams are dead
    seqs = np.asarray(out.sequences)[valid]
    assert (np.asarray(pt.lookup(tree, seqs)) >= 0).all()
    # The best beam's score is the model's teacher-forced log-probability of that SID.
    best = np.asarray(out.sequences)[:, 0]
    lp = jax.nn.log_softmax(apply(params, memory, best), -1)
    score = np.take_along_axis(np.asarray(lp), best[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(score, np.asarray(out.scores)[:, 0], rtol=1e-4, atol=1e-4)


def test_config_errors():
    qf = qformer.QFormerConfig.tiny(num_query_tokens=3, encoder_hidden_size=16)
    with pytest.raises(ValueError, match="backbone"):
        M.OneSearchConfig("t5", qf, 1, 2)
    with pytest.raises(ValueError, match="needs its config"):
        M.OneSearchConfig("bart", qf, 1, 2)
    cfg = _config("bart")
    with pytest.raises(ValueError, match="memory must be"):
        M.OneSearchModel(cfg).apply(
            {"params": _params("bart")}, jnp.zeros((1, 4, 16)), method=M.OneSearchModel.memory_embeddings
        )


def test_sid_restricted_log_softmax_hand_example():
    sid_range = (3, 6)  # tokens 3, 4, 5 are SID tokens of a 7-token vocabulary
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7)), jnp.float32)
    labels = jnp.array([[4, 1, 0], [5, 3, 2]])  # SID, text, pad / SID, SID, text
    lp = np.asarray(M.sid_restricted_log_softmax(logits, labels, sid_range))
    full = np.asarray(jax.nn.log_softmax(logits, -1))
    sid = np.asarray(logits)[..., 3:6] - np.log(np.exp(np.asarray(logits)[..., 3:6]).sum(-1, keepdims=True))
    for b, t in ((0, 0), (1, 0), (1, 1)):  # SID labels: a softmax over the SID tokens, nothing on the others
        np.testing.assert_allclose(lp[b, t, 3:6], sid[b, t], rtol=1e-5, atol=1e-6)
        assert np.exp(lp[b, t, [0, 1, 2, 6]]).max() == 0
    for b, t in ((0, 1), (0, 2), (1, 2)):  # text / pad labels: the full vocabulary
        np.testing.assert_allclose(lp[b, t], full[b, t], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(M.sid_restricted_log_softmax(logits, labels, None), full, rtol=1e-6)
    # text_targets_too: text labels are scored over the non-SID tokens; pad positions keep the full vocabulary.
    split = np.asarray(M.sid_restricted_log_softmax(logits, labels, sid_range, text_targets_too=True))
    np.testing.assert_allclose(split[:, 0], lp[:, 0], rtol=1e-6)
    text = np.asarray(logits)[..., [0, 1, 2, 6]]
    text_lp = text - np.log(np.exp(text).sum(-1, keepdims=True))
    for b, t in ((0, 1), (1, 2)):
        np.testing.assert_allclose(split[b, t, [0, 1, 2, 6]], text_lp[b, t], rtol=1e-5, atol=1e-6)
        assert np.exp(split[b, t, 3:6]).max() == 0
    np.testing.assert_allclose(split[0, 2], full[0, 2], rtol=1e-5, atol=1e-6)

    # No gradient reaches a non-SID logit from a SID target (what collapsed the tied text embeddings).
    def nll(z):
        lp = M.sid_restricted_log_softmax(z, labels, sid_range)
        return -jnp.take_along_axis(lp, labels[..., None], -1).sum()

    g = np.asarray(jax.grad(nll)(logits))
    assert np.abs(g[0, 0, [0, 1, 2, 6]]).max() == 0 and np.abs(g[1, :2][:, [0, 1, 2, 6]]).max() == 0
    assert np.abs(g[0, 1, [0, 2, 6]]).min() > 0  # a text target still pushes down every other token
    masked = np.asarray(M.mask_non_sid(logits, sid_range))
    np.testing.assert_array_equal(masked[..., 3:6], np.asarray(logits)[..., 3:6])
    assert (masked[..., [0, 1, 2, 6]] == M.NEG_LOGIT).all()
    assert VOCAB.sid_range == (VOCAB.sid_offset, VOCAB.sid_offset + sum(LEVELS))


@pytest.mark.parametrize("backbone", M.BACKBONES)
def test_sid_softmax_in_forward_and_unconstrained_decoding(backbone):
    cfg = dataclasses.replace(_config(backbone), sid_token_range=VOCAB.sid_range)
    params = _params(backbone)
    x, m, memory = _batch()
    labels = VOCAB.sid_tokens(CODES[:2])
    logits = M.OneSearchModel(cfg).apply({"params": params}, x, m, memory, labels)
    full = M.OneSearchModel(_config(backbone)).apply({"params": params}, x, m, memory, labels)
    np.testing.assert_allclose(
        jax.nn.log_softmax(logits, -1), M.sid_restricted_log_softmax(full, labels, VOCAB.sid_range), atol=1e-5
    )
    # Unconstrained beams hold SID tokens only, and their scores are the SID-restricted log-probs.
    out = jax.jit(lambda p: M.generate(cfg, p, x, m, memory, num_beams=4, tree=None, num_levels=5))(params)
    seqs = np.asarray(out.sequences)
    lo, hi = VOCAB.sid_range
    assert ((seqs >= lo) & (seqs < hi)).all()
    best = seqs[:, 0]
    lp = np.asarray(jax.nn.log_softmax(M.OneSearchModel(cfg).apply({"params": params}, x, m, memory, best), -1))
    score = np.take_along_axis(lp, best[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(score, np.asarray(out.scores)[:, 0], rtol=1e-4, atol=1e-4)
    # Sampled rollouts' behaviour log-probs equal the teacher-forced ones (ratio 1 on the first policy update).
    tokens, logp = jax.jit(
        lambda p: M.sample_sids(cfg, p, x, m, memory, jax.random.PRNGKey(0), num_samples=2, tree=None, num_levels=5)
    )(params)
    rows = np.asarray(tokens).reshape(4, 5)
    assert ((rows >= lo) & (rows < hi)).all()
    rep = functools.partial(np.repeat, repeats=2, axis=0)
    tf = jax.nn.log_softmax(M.OneSearchModel(cfg).apply({"params": params}, rep(x), rep(m), rep(memory), rows), -1)
    tf = np.take_along_axis(np.asarray(tf), rows[..., None], -1)[..., 0]
    np.testing.assert_allclose(tf, np.asarray(logp).reshape(4, 5), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sid_token_range"):
        dataclasses.replace(_config(backbone), sid_token_range=(5, VOCAB.vocab_size + 1))


def test_untied_output_layer():
    base = _config("bart")
    cfg = dataclasses.replace(base, bart=dataclasses.replace(base.bart, tie_word_embeddings=False))
    params = nn.unbox(M.init_params(cfg, jax.random.PRNGKey(0)))
    assert params["backbone"]["lm_head"].shape == params["backbone"]["shared"]["embedding"].shape
    x, m, memory = _batch()
    labels = VOCAB.sid_tokens(CODES[:2])

    def loss(p):
        out = M.OneSearchModel(cfg).apply({"params": p}, x, m, memory, labels)
        return M.sequence_loss(out, labels, np.ones_like(labels, bool))[0]

    g = jax.grad(loss)(params)["backbone"]
    # The output softmax trains lm_head; the input table only gets gradient at the tokens that are read.
    read = np.concatenate([x.reshape(-1), labels.reshape(-1), [VOCAB.special("[DEC]")]])
    unread = np.setdiff1d(np.arange(VOCAB.vocab_size), read)
    assert np.abs(np.asarray(g["lm_head"])[unread]).max() > 0
    assert np.abs(np.asarray(g["shared"]["embedding"])[unread]).max() == 0
    with pytest.raises(ValueError, match="untied"):
        cfg.bart.to_hf_dict()
