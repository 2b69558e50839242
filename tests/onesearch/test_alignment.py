"""OneSearch alignment (spec §1.7, §2.6): listwise S-DPO on hand values, DPO reduction, the composite item reward,
prefix rewards / TPMA advantages / prefix gates on a hand-computed G=3, L=5 group, degenerate groups, the policy
loss vs a direct per-token computation, constrained sampling (`model.sample_sids`) for both backbones, and the
2-item toys: DPO and TPMA steps raise the preferred item's probability."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from jax_hd.core import sharding, train_state
from jax_hd.decoding import prefix_tree as pt
from jax_hd.models import bart, qformer, qwen2
from jax_hd.onesearch import alignment as A
from jax_hd.onesearch import model as M
from jax_hd.onesearch import trainer

LEVELS = (8, 4, 4, 16, 16)
OFFSETS = (0, 8, 12, 16, 32)
VOCAB = M.Vocab(50, LEVELS, OFFSETS, ("gender:male",))
LAYOUT = M.LayoutConfig(max_query_tokens=4, max_recent=1, recent_query_tokens=1, num_memory=3, max_profile_tokens=1)
CODES = np.array([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [7, 3, 3, 15, 15], [7, 3, 3, 15, 14]])
RULES = sharding.DEFAULT_RULES


# ----------------------------------------------------------------------------------------------------------
# S-DPO.


def test_sdpo_hand_case():
    # Row 0: chosen ratio 1, rejected ratios -1, 0 (and a masked third); row 1 has no valid negative.
    pi_c, ref_c = jnp.array([-1.0, -4.0]), jnp.array([-2.0, -4.0])
    pi_r = jnp.array([[-3.0, -2.0, 50.0], [-1.0, -1.0, -1.0]])
    ref_r = jnp.array([[-2.0, -2.0, -2.0], [-1.0, -1.0, -1.0]])
    valid = jnp.array([[True, True, False], [False, False, False]])
    cfg = A.DPOConfig(beta=0.5)
    loss, metrics = A.sdpo_loss(pi_c, pi_r, ref_c, ref_r, valid, cfg)
    # beta * (rejected - chosen) = (-1, -0.5); -log sigmoid(-log sum exp) = log(1 + sum exp).
    row0 = math.log(1 + math.exp(-1.0) + math.exp(-0.5))
    np.testing.assert_allclose(float(loss), row0 / 2, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), 1.0)  # 0.5 > -0.5, 0 (row 1 not counted)

    # Reward-gap weight: r_chosen 3, r_rejected (1, 2): w = (2^-1.5 + 1, 1^-1.5 + 1) = (1.35355, 2).
    cfg_w = A.DPOConfig(beta=0.5, use_reward_gap_weight=True, reward_gap_alpha=1.5)
    rw_c, rw_r = jnp.array([3.0, 3.0]), jnp.array([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    loss_w, _ = A.sdpo_loss(pi_c, pi_r, ref_c, ref_r, valid, cfg_w, rw_c, rw_r)
    w0 = 2.0**-1.5 + 1.0
    np.testing.assert_allclose(float(loss_w), math.log(1 + math.exp(-1.0 * w0) + math.exp(-0.5 * 2.0)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="reward_chosen"):
        A.sdpo_loss(pi_c, pi_r, ref_c, ref_r, valid, cfg_w)

    # Chosen regularisation (policy below the reference by 1 adds 1 inside) and the SFT anchor (mean token NLL).
    cfg_r = A.DPOConfig(beta=0.5, chosen_regularisation=True, sft_weight=0.5)
    pi_c2 = jnp.array([-3.0, -4.0])  # chosen ratio -1, reg 1: bracket (-1 + 1 + 1, 0 + 1 + 1) = (1, 2)
    loss_r, m = A.sdpo_loss(pi_c2, pi_r, ref_c, ref_r, valid, cfg_r, chosen_length=jnp.array([5, 4]))
    expected = math.log(1 + math.exp(0.5) + math.exp(1.0)) / 2 + 0.5 * (3 / 5 + 4 / 4) / 2
    np.testing.assert_allclose(float(loss_r), expected, rtol=1e-6)
    # No NaN from a non-positive reward gap or a row without negatives; gradients finite.
    grads = jax.grad(lambda p: A.sdpo_loss(pi_c, p, ref_c, ref_r, valid, cfg_w, rw_c, rw_r + 5.0)[0])(pi_r)
    chex.assert_tree_all_finite(grads)
    assert float(jnp.abs(grads[1]).sum()) == 0 and float(jnp.abs(grads[0, 2])) == 0


def test_single_negative_is_standard_dpo():
    rng = np.random.default_rng(0)
    pi_c, ref_c = rng.normal(size=6), rng.normal(size=6)
    pi_r, ref_r = rng.normal(size=(6, 1)), rng.normal(size=(6, 1))
    cfg = A.DPOConfig(beta=0.3)
    loss, _ = A.sdpo_loss(*map(jnp.asarray, (pi_c, pi_r, ref_c, ref_r)), jnp.ones((6, 1), bool), cfg)
    margin = (pi_c - ref_c) - (pi_r[:, 0] - ref_r[:, 0])
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-0.3 * margin))), rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Rewards and TPMA advantages.


def test_item_reward_hand_values():
    cfg = A.TPMAConfig()
    r = A.item_reward([2, 1, 3, 0], [1.7, -0.2, 0.5, 0.25], [True, False, False, True], [True, True, False, False], cfg)
    np.testing.assert_allclose(np.asarray(r), [2 + 1 + 4, 1 + 0 + 3, 3 + 0.5, 0 + 0.25 + 4])


TRUTHS = jnp.array([[1, 2, 3, 4, 5], [1, 7, 3, 0, 0], [0, 0, 0, 0, 0]])
TRUTH_MASK = jnp.array([True, True, False])  # the third truth is padding: rollouts matching it earn nothing
ROLLOUTS = jnp.array([[1, 2, 3, 4, 5], [1, 7, 9, 0, 5], [6, 2, 3, 4, 0]])
S = 2 / math.sqrt(3)  # the unbiased std of (2, 2, 0) and of (2, 0, 2); 1 / sqrt(3) that of (1, 0, 0)


def test_prefix_rewards_and_tpma_hand_example():
    w = jnp.array([2.0, 2.0, 2.0, 1.0, 1.0])
    weighted, unweighted = A.prefix_rewards(ROLLOUTS, TRUTHS, TRUTH_MASK, w)
    # o1 = t1 exactly; o2 matches t2 at 1,2,4 (and t1 at 1,5); o3 matches t1 at 2,3,4 (and t2 at 3,5).
    np.testing.assert_allclose(weighted, [[2, 4, 6, 7, 8], [2, 4, 4, 5, 5], [0, 2, 4, 5, 5]])
    np.testing.assert_allclose(unweighted, [[1, 2, 3, 4, 5], [1, 2, 2, 3, 3], [0, 1, 2, 3, 3]])

    fig = (2.0, 2.0, 2.0, 1.0, 1.0)  # the method figure's weights (the default is the code's (2, 2, 1, 1, 0))
    cfg = A.TPMAConfig(num_samples=3, position_weights=fig)
    adv, gate = A.tpma_advantages(ROLLOUTS, TRUTHS, TRUTH_MASK, jnp.zeros(3), cfg)
    # Marginals (2,2,2,1,1), (2,2,0,1,0), (0,2,2,1,0), normalised per position across the 3 rollouts.
    a, b = (2 / 3) / S, (-4 / 3) / S
    expected = [
        [a, 0, a, 0, (2 / 3) * math.sqrt(3)],
        [a, 0, b, 0, (-1 / 3) * math.sqrt(3)],
        [b, 0, a, 0, (-1 / 3) * math.sqrt(3)],
    ]
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gate, [[1, 1, 1, 1, 1], [1, 1, 1, 2 / 3, 3 / 4], [1, 0, 1 / 2, 2 / 3, 3 / 4]], rtol=1e-6)

    _, strict = A.tpma_advantages(
        ROLLOUTS, TRUTHS, TRUTH_MASK, jnp.zeros(3), A.TPMAConfig(num_samples=3, gate="strict")
    )
    np.testing.assert_allclose(strict, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    _, none = A.tpma_advantages(ROLLOUTS, TRUTHS, TRUTH_MASK, jnp.zeros(3), A.TPMAConfig(num_samples=3, gate="none"))
    assert (np.asarray(none) == 1).all()

    # + w_item x group-normalised item reward; the literal weights (2, 2, 1, 1, 0) change the marginals.
    rewards = jnp.array([7.0, 4.0, 0.0])
    item_cfg = A.TPMAConfig(num_samples=3, position_weights=fig, item_advantage_weight=0.5)
    adv_item, _ = A.tpma_advantages(ROLLOUTS, TRUTHS, TRUTH_MASK, rewards, item_cfg)
    z = (np.array([7.0, 4.0, 0.0]) - 11 / 3) / np.std([7.0, 4.0, 0.0], ddof=1)
    np.testing.assert_allclose(adv_item, np.asarray(expected) + 0.5 * z[:, None], rtol=1e-5, atol=1e-6)
    lit = A.TPMAConfig(num_samples=3)  # the default: the authors' tpma.py weights (2, 2, 1, 1, 0)
    assert lit.position_weights == (2.0, 2.0, 1.0, 1.0, 0.0)
    adv_lit, _ = A.tpma_advantages(ROLLOUTS, TRUTHS, TRUTH_MASK, rewards, lit)
    assert np.abs(np.asarray(adv_lit)[:, 4]).max() == 0  # weight 0 at the last position: no marginal there

    # Batched over prompts == per prompt.
    batch_adv, batch_gate = A.tpma_advantages_batch(
        jnp.stack([ROLLOUTS, ROLLOUTS[::-1]]), jnp.stack([TRUTHS, TRUTHS]), jnp.stack([TRUTH_MASK, TRUTH_MASK]),
        jnp.zeros((2, 3)), cfg,
    )  # fmt: skip
    np.testing.assert_allclose(batch_adv[0], adv, atol=1e-6)
    np.testing.assert_allclose(batch_adv[1], np.asarray(adv)[::-1], atol=1e-6)
    np.testing.assert_allclose(batch_gate[1], np.asarray(gate)[::-1])


@pytest.mark.parametrize("gate", ["fraction", "strict"])
def test_gate_zeroes_positions_after_a_wrong_prefix(gate):
    rollouts = jnp.array([[9, 9, 3, 4, 5], [1, 9, 9, 9, 9], [1, 2, 3, 4, 5]])
    _, g = A.tpma_advantages(rollouts, TRUTHS, TRUTH_MASK, jnp.zeros(3), A.TPMAConfig(num_samples=3, gate=gate))
    g = np.asarray(g)
    assert g[0, 0] == 1 and (g[0, 1:2] == 0).all()  # a wrong first token: no credit for the second one
    assert (g[2] == 1).all()
    if gate == "strict":
        assert (g[0, 1:] == 0).all() and g[1].tolist() == [1, 1, 0, 0, 0]
    else:  # fraction: later positions get the share of right earlier ones
        np.testing.assert_allclose(g[0], [1, 0, 0, 1 / 3, 2 / 4])
        np.testing.assert_allclose(g[1], [1, 1, 1 / 2, 1 / 3, 1 / 4])


@pytest.mark.parametrize("advantage", ["position", "sequence"])
def test_degenerate_groups_give_zero_advantages_and_finite_loss(advantage):
    cfg = A.TPMAConfig(num_samples=4, item_advantage_weight=0.5, advantage=advantage)
    for rollouts in (jnp.tile(ROLLOUTS[:1], (4, 1)), jnp.full((4, 5), -1)):
        adv, gate = A.tpma_advantages(rollouts, TRUTHS, TRUTH_MASK, jnp.full(4, 3.0), cfg)
        assert np.abs(np.asarray(adv)).max() == 0 and np.isfinite(np.asarray(gate)).all()
    np.testing.assert_array_equal(A.sequence_advantages(jnp.full((2, 4), 3.0), cfg.eps), 0.0)
    logp = jnp.full((1, 4, 5), -0.7)
    loss, metrics = A.policy_loss(logp, logp, jnp.zeros((1, 4, 5)), jnp.ones((1, 4, 5)), jnp.ones((1, 4, 5)), cfg)
    assert float(loss) == 0 and all(np.isfinite(float(v)) for v in metrics.values())
    grads = jax.grad(
        lambda lp: A.policy_loss(lp, logp, jnp.zeros((1, 4, 5)), jnp.ones((1, 4, 5)), jnp.ones((1, 4, 5)), cfg)[0]
    )(logp)
    assert float(jnp.abs(grads).max()) == 0


def test_policy_loss_matches_a_direct_computation():
    rng = np.random.default_rng(1)
    shape = (2, 3, 5)
    logp, old, ref = (jnp.asarray(-rng.uniform(0.1, 3.0, shape), jnp.float32) for _ in range(3))
    adv, gate = jnp.asarray(rng.normal(size=shape), jnp.float32), jnp.asarray(rng.uniform(size=shape), jnp.float32)
    mask = jnp.asarray(rng.uniform(size=shape) > 0.3)
    n = float(mask.sum())
    kl = np.clip(np.exp(ref - logp) - (ref - logp) - 1, -10.0, 10.0)  # k3, clamped at kl_clamp

    cfg = A.TPMAConfig(num_samples=3, kl_coef=0.1)
    loss, _ = A.policy_loss(logp, old, adv, gate, mask, cfg, ref_logp=ref)
    direct = np.sum(np.where(mask, -gate * np.exp(logp - old) * adv + 0.1 * kl, 0.0)) / n
    np.testing.assert_allclose(float(loss), direct, rtol=1e-5)
    # The log ratio is clamped (no clipping otherwise).
    loss_c, _ = A.policy_loss(logp + 30.0, old, adv, gate, mask, A.TPMAConfig(num_samples=3, log_ratio_clamp=2.0))
    np.testing.assert_allclose(float(loss_c), np.sum(np.where(mask, -gate * math.exp(2.0) * adv, 0)) / n, rtol=1e-5)

    # Sequence mode: PPO-clipped surrogate with a [b, G] advantage broadcast over the positions, no gate.
    seq_adv = jnp.asarray(rng.normal(size=shape[:2]), jnp.float32)
    cfg_s = A.TPMAConfig(num_samples=3, advantage="sequence", clip_eps=0.2)
    loss_s, _ = A.policy_loss(logp, old, seq_adv, gate, mask, cfg_s)
    ratio, a = np.exp(logp - old), np.asarray(seq_adv)[..., None]
    per_token = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
    np.testing.assert_allclose(float(loss_s), np.sum(np.where(mask, per_token, 0)) / n, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ValueError, match="gate"):
        A.TPMAConfig(gate="binary")
    with pytest.raises(ValueError, match="advantage"):
        A.TPMAConfig(advantage="token")
    with pytest.raises(ValueError, match="num_samples"):
        A.TPMAConfig(num_samples=1)
    with pytest.raises(ValueError, match="beta"):
        A.DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match="position_weights"):
        A.tpma_advantages(ROLLOUTS[:, :4], TRUTHS[:, :4], TRUTH_MASK, jnp.zeros(3), A.TPMAConfig(num_samples=3))


# ----------------------------------------------------------------------------------------------------------
# Model: sampling and the toys.


def _config(backbone):
    qf = qformer.QFormerConfig.tiny(
        num_query_tokens=3, encoder_hidden_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_hidden_layers=1, cross_attention_frequency=1,
    )  # fmt: skip
    kw = (
        dict(bart=bart.BartConfig.tiny(vocab_size=VOCAB.vocab_size, pad_token_id=0, encoder_layers=1, decoder_layers=1))
        if backbone == "bart"
        else dict(qwen2=qwen2.Qwen2Config.tiny(vocab_size=VOCAB.vocab_size, num_hidden_layers=1))
    )
    return M.OneSearchConfig(backbone, qf, VOCAB.special("[MEM]"), VOCAB.special("[DEC]"), **kw)


@functools.cache
def _params(backbone):
    return nn.unbox(M.init_params(_config(backbone), jax.random.PRNGKey(0)))


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ids, _ = M.build_input(
            VOCAB, LAYOUT, uid=None, query_ids=rng.integers(3, 50, size=1 + i % 4).tolist(), query_sid=CODES[i % 4],
            profile=["gender:male"] if i % 2 else [],
        )  # fmt: skip
        rows.append(ids)
    x, m = M.pad_rows(rows, LAYOUT.input_length(5))
    return x, m, rng.normal(size=(n, 9, 16)).astype(np.float32)


def _tree(codes):
    return pt.build_prefix_tree(codes, LEVELS, level_offsets=VOCAB.sid_token_offsets, vocab_size=VOCAB.vocab_size)


# The 2-item toy: catalogue {A, B}, A preferred. BATCH prompts on a 2-device data mesh.
ITEM_A, ITEM_B = CODES[0], CODES[1]
BATCH, G = 8, 4
TOY_TREE = _tree(np.stack([ITEM_A, ITEM_B]))
TPMA = A.TPMAConfig(num_samples=G, item_advantage_weight=0.5, sft_weight=0.0)  # no SFT pull toward A: TPMA alone


@pytest.fixture(scope="module")
def toy_data():
    """The toy's prompts, DPO batch, and the compiled bart sampler (shared with the sampling test)."""
    cfg = _config("bart")
    x, m, memory = _prompts(BATCH, seed=3)
    a_tok, b_tok = VOCAB.sid_tokens(ITEM_A), VOCAB.sid_tokens(ITEM_B)
    dpo_batch = {
        "input_ids": x, "input_mask": m, "memory": memory,
        "chosen": np.tile(a_tok, (BATCH, 1)), "chosen_mask": np.ones((BATCH, 5), bool),
        "rejected": np.tile(np.stack([b_tok, b_tok]), (BATCH, 1, 1)),
        "rejected_mask_tokens": np.ones((BATCH, 2, 5), bool),
        "rejected_valid": np.tile([True, False], (BATCH, 1)),  # the second negative is padding
    }  # fmt: skip
    return dict(
        cfg=cfg, x=x, m=m, memory=memory, a_tok=a_tok, dpo_batch=dpo_batch,
        sample=A.make_sample_fn(cfg, TOY_TREE, 5, TPMA),
    )  # fmt: skip


@pytest.fixture(scope="module")
def toy(toy_data):
    """+ the 2-device mesh, optimizer, state layout and the P(A) probe."""
    cfg = toy_data["cfg"]
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:2])
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=0.0)
    )
    shardings = trainer.state_shardings(cfg, tx, mesh, RULES)

    def build(p, r):
        return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r, extra={})

    reference = A.make_reference_fn(cfg)

    def prob_a(params):
        """Mean over prompts of P(A) within the catalogue {A, B} (what constrained decoding sees)."""
        lp_a, lp_b = reference(params, toy_data["dpo_batch"])
        return float(np.mean(jax.nn.sigmoid(lp_a - lp_b[:, 0])))

    return dict(
        toy_data, mesh=mesh, tx=tx, shardings=shardings, init=jax.jit(build, out_shardings=shardings),
        reference=reference, prob_a=prob_a,
    )  # fmt: skip


@pytest.mark.parametrize("backbone", M.BACKBONES)
def test_sample_sids_valid_and_logprobs_match_teacher_forcing(backbone, toy_data):
    toy = toy_data
    cfg, params = _config(backbone), _params(backbone)
    x, m, memory = toy["x"], toy["m"], toy["memory"]
    # bart reuses the toy's compiled sampler; qwen2 samples from a 4-item tree.
    tree = TOY_TREE if backbone == "bart" else _tree(CODES)
    sample = toy["sample"] if backbone == "bart" else A.make_sample_fn(cfg, tree, 5, TPMA)
    tokens, logp = sample(params, x, m, memory, jax.random.PRNGKey(1), jnp.float32(1.0))
    chex.assert_shape(tokens, (BATCH, G, 5))
    chex.assert_shape(logp, (BATCH, G, 5))
    assert (np.asarray(pt.lookup(tree, tokens)) >= 0).all()
    assert len({tuple(r) for r in np.asarray(tokens).reshape(-1, 5).tolist()}) > 1  # a sample, not an argmax
    labels = np.asarray(tokens).reshape(BATCH * G, 5)
    rep = functools.partial(np.repeat, repeats=G, axis=0)
    logits = jax.jit(lambda p: M.OneSearchModel(cfg).apply({"params": p}, rep(x), rep(m), rep(memory), labels))(params)
    np.testing.assert_allclose(
        np.asarray(logp).reshape(BATCH * G, 5), np.asarray(A.token_logprobs(logits, labels)), rtol=1e-4, atol=1e-4
    )


def _fresh_state(toy):
    with jax.set_mesh(toy["mesh"]), nn.logical_axis_rules(RULES):
        return toy["init"](_params("bart"), jax.random.PRNGKey(5))


@pytest.mark.slow  # end to end: 30 jitted DPO steps on the 2-item toy
def test_dpo_toy_raises_preferred_item(toy):
    state = _fresh_state(toy)
    batch = dict(toy["dpo_batch"])
    ref_chosen, ref_rejected = toy["reference"](state.params, batch)
    batch.update(ref_chosen=np.asarray(ref_chosen), ref_rejected=np.asarray(ref_rejected))
    step = A.make_dpo_step(toy["cfg"], toy["tx"], toy["shardings"], toy["mesh"], A.DPOConfig(beta=0.5))
    p0 = toy["prob_a"](state.params)
    losses = []
    with jax.set_mesh(toy["mesh"]), nn.logical_axis_rules(RULES):
        sharded = sharding.shard_batch(batch, toy["mesh"])
        for _ in range(30):
            state, metrics = step(state, sharded, np.float32(1e-3))
            losses.append(float(metrics["loss"]))
    p1 = toy["prob_a"](state.params)
    np.testing.assert_allclose(losses[0], math.log(2), rtol=1e-4)  # policy == reference at step 0
    assert losses[-1] < 0.5 * losses[0], losses
    assert p1 > p0 + 0.3 and p1 > 0.9, (p0, p1)
    assert int(state.step) == 30


@pytest.mark.slow  # end to end: sample -> reward -> TPMA advantages -> step, 6 rounds
def test_tpma_toy_raises_preferred_item(toy):
    step = A.make_policy_step(toy["cfg"], toy["tx"], toy["shardings"], toy["mesh"], TPMA)
    reward_a, reward_b = (
        float(A.item_reward(3, 0.5, True, True, TPMA)),
        float(A.item_reward(0, 0.1, False, False, TPMA)),
    )
    state = _fresh_state(toy)
    p0 = toy["prob_a"](state.params)
    rng = jax.random.PRNGKey(7)
    mixed_groups = 0
    with jax.set_mesh(toy["mesh"]), nn.logical_axis_rules(RULES):
        for it in range(6):
            rng, key = jax.random.split(rng)
            tokens, old_logp = toy["sample"](state.params, toy["x"], toy["m"], toy["memory"], key, jnp.float32(1.0))
            tokens = np.asarray(tokens)
            is_a = (tokens == toy["a_tok"]).all(-1)
            adv = A.tpma_batch(VOCAB, tokens, [ITEM_A[None]] * BATCH, np.where(is_a, reward_a, reward_b), TPMA)
            # In a mixed group, B rollouts get a negative first-position advantage and a zero gate afterwards.
            for i in np.flatnonzero(is_a.any(1) & ~is_a.all(1)):
                mixed_groups += 1
                assert (adv["advantages"][i][~is_a[i], 0] < 0).all() and (adv["gate"][i][~is_a[i], 1:] == 0).all()
            batch = {
                "input_ids": toy["x"], "input_mask": toy["m"], "memory": toy["memory"], "rollouts": tokens,
                "old_logp": np.asarray(old_logp), **adv,
                "sft_labels": np.tile(toy["a_tok"], (BATCH, 1)), "sft_mask": np.ones((BATCH, 5), bool),
            }  # fmt: skip
            state, metrics = step(state, sharding.shard_batch(batch, toy["mesh"]), np.float32(3e-3))
            if it == 0:  # sampling params == policy params: ratio 1
                np.testing.assert_allclose(float(metrics["ratio"]), 1.0, rtol=1e-4)
    p1 = toy["prob_a"](state.params)
    assert mixed_groups > 0
    assert p1 > p0 + 0.2, (p0, p1)
