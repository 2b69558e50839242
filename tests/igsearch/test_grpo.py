import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_hd.igsearch import grpo


def test_group_advantages_unbiased_std():
    rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv = grpo.group_advantages(rewards, group_size=4)
    # Group 1: mean 0.5, unbiased std sqrt(1/3) -> +-0.8660.
    np.testing.assert_allclose(adv[:4], np.array([1, -1, -1, 1]) * 0.5 / (np.sqrt(1 / 3) + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(adv[4:], 0.0)  # All equal: exactly zero, no NaN.
    np.testing.assert_allclose(grpo.group_advantages(jnp.array([2.0, -1.0]), 1), [2.0 / (1 + 1e-6), -1 / (1 + 1e-6)])
    with pytest.raises(ValueError, match="do not form groups of 3"):
        grpo.group_advantages(rewards, 3)


def _case():
    # Two groups of G=2; rollout 0 has steps 0 and 1, rollout 2 has step 0; query tokens marked by step index.
    step_ig = jnp.array([[0.8, -0.4], [0.0, 0.0], [0.2, 0.0], [0.0, 0.0]])
    step_mask = jnp.array([[True, True], [False, False], [True, False], [False, False]])
    qidx = jnp.array([[-1, 0, 0, -1, 1, -1], [-1] * 6, [0, 0, -1, -1, -1, -1], [-1, 0, -1, -1, -1, -1]])
    return step_ig, step_mask, qidx


def test_additive_modulation_keeps_a_gradient_when_every_rollout_fails():
    step_ig, step_mask, qidx = _case()
    adv = grpo.group_advantages(jnp.zeros(4), 2)  # Every rollout failed: outcome advantages all zero.
    config = grpo.GRPOConfig(group_size=2, ig_coef=0.5)
    tok = grpo.token_advantages(adv, step_ig, step_mask, qidx, config)
    expected = np.zeros((4, 6))
    expected[0, 1:3], expected[0, 4], expected[2, 0:2] = 0.4, -0.2, 0.1
    # Row 3 has a query token for step 0 but no IG for it (no valid documents): untouched.
    np.testing.assert_allclose(tok, expected, atol=1e-7)
    multiplicative = grpo.token_advantages(adv, step_ig, step_mask, qidx,
                                           grpo.GRPOConfig(group_size=2, ig_mode="multiplicative"))
    np.testing.assert_array_equal(multiplicative, 0.0)
    none = grpo.token_advantages(jnp.arange(4.0), step_ig, step_mask, qidx, grpo.GRPOConfig(group_size=2,
                                                                                             ig_mode="none"))
    np.testing.assert_array_equal(none, np.repeat(np.arange(4.0)[:, None], 6, 1))

    # A non-zero gradient reaches the query tokens' log-probs through the surrogate.
    def loss(lp):
        return grpo.grpo_loss(lp, jnp.zeros_like(lp), jax.lax.stop_gradient(lp), lp, tok, jnp.ones_like(lp),
                              grpo.GRPOConfig(group_size=2, kl_coef=0.0, entropy_coef=0.0))[0]

    grad = jax.grad(loss)(jnp.zeros((4, 6)))
    assert np.all(grad[0, 1:3] < 0) and grad[0, 4] > 0 and np.all(grad[1] == 0)


def test_ig_transforms():
    step_ig, step_mask, _ = _case()
    cfg = lambda t: grpo.GRPOConfig(group_size=2, ig_transform=t, ig_clip=0.5)  # noqa: E731
    np.testing.assert_allclose(grpo.transform_step_ig(step_ig, step_mask, cfg("clip"))[0], [0.5, -0.4])
    np.testing.assert_allclose(grpo.transform_step_ig(step_ig, step_mask, cfg("tanh"))[0], np.tanh([0.8, -0.4]),
                               rtol=1e-6)
    group = grpo.transform_step_ig(step_ig, step_mask, cfg("group_std"))
    np.testing.assert_allclose(group[0], [1.0, -1.0], atol=1e-5)  # Two steps in group 0: +-1.
    np.testing.assert_allclose(group[2:], 0.0, atol=1e-6)  # One step in group 1: standardises to 0.
    batch = grpo.transform_step_ig(step_ig, step_mask, cfg("batch_std"))
    values = np.array([0.8, -0.4, 0.2])
    np.testing.assert_allclose([batch[0, 0], batch[0, 1], batch[2, 0]], (values - values.mean()) / values.std(),
                               atol=1e-5)
    assert np.all(np.asarray(batch)[~np.asarray(step_mask)] == 0)


def test_loss_equals_a_direct_per_token_computation():
    rng = np.random.default_rng(0)
    lp, old, ref = (rng.normal(-1.0, 0.3, (3, 5)) for _ in range(3))
    ent, adv = rng.uniform(0, 2, (3, 5)), rng.normal(size=(3, 5))
    mask = rng.uniform(size=(3, 5)) < 0.7
    config = grpo.GRPOConfig(group_size=3, clip_eps=0.2, kl_coef=0.01, entropy_coef=0.001)
    loss, metrics = grpo.grpo_loss(*(jnp.asarray(x) for x in (lp, ent, old, ref, adv, mask)), config)
    total, kl_total, ent_total = 0.0, 0.0, 0.0
    for i, j in zip(*np.nonzero(mask), strict=True):
        ratio = np.exp(lp[i, j] - old[i, j])
        total += max(-adv[i, j] * ratio, -adv[i, j] * np.clip(ratio, 0.8, 1.2))
        d = ref[i, j] - lp[i, j]
        kl_total += np.clip(np.exp(d) - d - 1, -10, 10)
        ent_total += ent[i, j]
    n = mask.sum()
    np.testing.assert_allclose(loss, total / n + 0.01 * kl_total / n - 0.001 * ent_total / n, rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl_total / n, rtol=1e-5)
    empty, _ = grpo.grpo_loss(*(jnp.asarray(x) for x in (lp, ent, old, ref, adv, np.zeros_like(mask))), config)
    assert float(empty) == 0.0


def test_token_logprobs_and_entropy():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
    lp, ent = grpo.token_logprobs_and_entropy(logits, jnp.array([[0, 2]]))
    np.testing.assert_allclose(lp, np.log([[0.5, 1 / 3]]), rtol=1e-6)
    np.testing.assert_allclose(ent, [[-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)), np.log(3)]], rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="ig_mode"):
        grpo.GRPOConfig(ig_mode="bonus")
    with pytest.raises(ValueError, match="ig_transform"):
        grpo.GRPOConfig(ig_transform="z")
