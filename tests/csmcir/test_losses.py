import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_hd.core import sharding
from jax_hd.csmcir import losses
from jax_hd.csmcir import memory_bank as mb

B, K, D, M = 4, 3, 8, 16
TEMP = 0.2


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def logsumexp(x: list[float]) -> float:
    x = np.asarray(x, np.float64)
    return float(x.max() + np.log(np.exp(x - x.max()).sum()))


def sim(q: np.ndarray, t: np.ndarray) -> float:
    """max_k <q, t_k> for one query [D] and one multi-token target [K, D], written as a loop."""
    return max(float(np.dot(q.astype(np.float64), tk)) for tk in t)


def reference_loss(q, t, ids, temp, mask_dup=True, bank_terms=None):
    """Per-query python loop: -l_ii + logsumexp(in-batch negatives (dups dropped) + positive + bank terms)."""
    per_query = []
    for i in range(len(q)):
        terms = [sim(q[i], t[j]) / temp for j in range(len(q)) if j == i or not (mask_dup and ids[j] == ids[i])]
        if bank_terms is not None:
            terms += list(bank_terms[i])
        per_query.append(logsumexp(terms) - sim(q[i], t[i]) / temp)
    return float(np.mean(per_query))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    q = unit(rng.normal(size=(B, D)))
    t = unit(rng.normal(size=(B, K, D)))
    ids = np.array([10, 11, 10, 12], np.int32)  # queries 0 and 2 share a target image
    return q, t, ids


@pytest.fixture(scope="module")
def bank():
    rng = np.random.default_rng(1)
    n = 12
    feats = np.zeros((M, K, D), np.float32)
    feats[:n] = unit(rng.normal(size=(n, K, D)))
    ids = np.full((M,), -1, np.int32)
    ids[:n] = [10, 20, 21, 11, 22, 23, 24, 12, 25, 26, 27, 28]  # three false negatives for the batch
    steps = np.zeros((M,), np.int32)
    steps[:n] = np.arange(n)
    return mb.MemoryBank(jnp.asarray(feats), jnp.asarray(ids), jnp.asarray(steps), jnp.int32(n))


def test_max_token_similarity(batch):
    q, t, _ = batch
    got = losses.max_token_similarity(jnp.asarray(q), jnp.asarray(t).astype(jnp.bfloat16))
    assert got.dtype == jnp.float32 and got.shape == (B, B)
    expected = [
        [sim(q[i], np.asarray(jnp.asarray(t[j]).astype(jnp.bfloat16), np.float32)) for j in range(B)] for i in range(B)
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_token_similarity"):
        losses.max_token_similarity(jnp.asarray(q), jnp.asarray(t[:, 0]))


@pytest.mark.parametrize("mask_dup", [True, False])
def test_in_batch_loss_matches_python(batch, mask_dup):
    q, t, ids = batch
    loss, metrics = losses.contrastive_loss(
        jnp.asarray(q), jnp.asarray(t), jnp.asarray(ids), jnp.float32(TEMP), mask_batch_duplicates=mask_dup
    )
    np.testing.assert_allclose(loss, reference_loss(q, t, ids, TEMP, mask_dup), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], loss)
    expected_negatives = (B - 1) - (2 / B if mask_dup else 0)  # queries 0 and 2 lose one negative each
    np.testing.assert_allclose(metrics["num_negatives"], expected_negatives)
    logits = np.array([[sim(q[i], t[j]) for j in range(B)] for i in range(B)])
    if mask_dup:
        logits[0, 2] = logits[2, 0] = -np.inf
    np.testing.assert_allclose(metrics["batch_acc"], np.mean(logits.argmax(-1) == np.arange(B)))


def test_duplicate_mask_changes_loss(batch):
    q, t, ids = batch
    a, _ = losses.contrastive_loss(jnp.asarray(q), jnp.asarray(t), jnp.asarray(ids), jnp.float32(TEMP))
    b, _ = losses.contrastive_loss(jnp.asarray(q), jnp.asarray(t), jnp.asarray([0, 1, 2, 3]), jnp.float32(TEMP))
    assert float(a) < float(b)


@pytest.mark.parametrize(
    "cfg",
    [
        mb.BankConfig(size=M, entropy_mode="none"),
        mb.BankConfig(size=M, entropy_mode="weight", tau_age=5.0, max_age=8),
        mb.BankConfig(size=M, entropy_mode="topk", topk=4),
    ],
    ids=["none", "weight-aged", "topk"],
)
def test_bank_loss_matches_python(batch, bank, cfg):
    q, t, ids = batch
    step = 12
    loss, metrics = losses.contrastive_loss(
        jnp.asarray(q),
        jnp.asarray(t),
        jnp.asarray(ids),
        jnp.float32(TEMP),
        bank=bank,
        bank_config=cfg,
        step=jnp.int32(step),
    )
    bank_l, valid, _ = mb.bank_logits(jnp.asarray(q), bank, jnp.asarray(ids), step, jnp.float32(TEMP), cfg)
    bank_terms = [np.asarray(bank_l)[i][np.asarray(valid)[i]] for i in range(B)]
    np.testing.assert_allclose(loss, reference_loss(q, t, ids, TEMP, True, bank_terms), rtol=1e-5)
    np.testing.assert_allclose(metrics["num_negatives"], (B - 1) - 2 / B + np.asarray(valid).sum(-1).mean())
    assert {"bank_valid_fraction", "bank_entropy", "bank_false_negatives", "bank_mean_age"} <= set(metrics)
    if cfg.entropy_mode == "none" and cfg.max_age == 0:
        # Hand-checked: every filled entry except each query's own target id is a negative, unweighted.
        bank_feats, bank_ids = np.asarray(bank.feats), np.asarray(bank.ids)
        direct = [
            [sim(q[i], bank_feats[j]) / TEMP for j in range(M) if bank_ids[j] >= 0 and bank_ids[j] != ids[i]]
            for i in range(B)
        ]
        np.testing.assert_allclose(loss, reference_loss(q, t, ids, TEMP, True, direct), rtol=1e-5)
        np.testing.assert_allclose(metrics["bank_false_negatives"], 1.0)  # each query has one same-id entry


def test_empty_bank_equals_in_batch_loss(batch):
    q, t, ids = batch
    cfg = mb.BankConfig(size=M, entropy_mode="weight")
    empty = mb.init_bank(cfg, tokens=K, dim=D)
    args = (jnp.asarray(q), jnp.asarray(t), jnp.asarray(ids), jnp.float32(TEMP))
    with_bank, metrics = losses.contrastive_loss(*args, bank=empty, bank_config=cfg, step=jnp.int32(0))
    in_batch, _ = losses.contrastive_loss(*args)
    np.testing.assert_allclose(with_bank, in_batch, rtol=1e-6)
    assert all(np.isfinite(v) for v in metrics.values())
    grad = jax.grad(lambda x: losses.contrastive_loss(x, *args[1:], bank=empty, bank_config=cfg, step=0)[0])(args[0])
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
    disabled, _ = losses.contrastive_loss(*args, bank=empty, bank_config=mb.BankConfig(size=0), step=0)
    np.testing.assert_allclose(disabled, in_batch, rtol=1e-6)


@pytest.mark.parametrize("mode", ["none", "weight", "topk"])
def test_gradients_finite(batch, bank, mode):
    q, t, ids = batch
    cfg = mb.BankConfig(size=M, entropy_mode=mode, topk=3, tau_age=2.0)

    def loss_fn(query, temp):
        return losses.contrastive_loss(
            query,
            jnp.asarray(t),
            jnp.asarray(ids),
            temp,
            bank=bank,
            bank_config=cfg,
            step=jnp.int32(12),
            symmetric_weight=0.5,
        )[0]

    gq, gt = jax.grad(loss_fn, argnums=(0, 1))(jnp.asarray(q), jnp.float32(TEMP))
    assert np.isfinite(np.asarray(gq)).all() and np.abs(np.asarray(gq)).sum() > 0
    assert np.isfinite(float(gt))


def test_symmetric_term(batch):
    q, t, ids = batch
    weight = 0.5
    loss, metrics = losses.contrastive_loss(
        jnp.asarray(q), jnp.asarray(t), jnp.asarray(ids), jnp.float32(TEMP), symmetric_weight=weight
    )
    t2q = []
    for j in range(B):
        terms = [sim(q[i], t[j]) / TEMP for i in range(B) if i == j or ids[i] != ids[j]]
        t2q.append(logsumexp(terms) - sim(q[j], t[j]) / TEMP)
    np.testing.assert_allclose(metrics["loss_t2q"], np.mean(t2q), rtol=1e-5)
    np.testing.assert_allclose(loss, reference_loss(q, t, ids, TEMP) + weight * np.mean(t2q), rtol=1e-5)


def test_contrastive_loss_errors(batch, bank):
    q, t, ids = batch
    args = (jnp.asarray(q), jnp.asarray(t), jnp.asarray(ids), jnp.float32(TEMP))
    with pytest.raises(ValueError, match="bank_config.size"):
        losses.contrastive_loss(*args, bank=bank, bank_config=mb.BankConfig(size=2 * M), step=0)
    with pytest.raises(ValueError, match="`step` is required"):
        losses.contrastive_loss(*args, bank=bank, bank_config=mb.BankConfig(size=M))
    with pytest.raises(ValueError, match="target_ids"):
        losses.contrastive_loss(*args[:2], jnp.asarray(ids[:2]), args[3])


@pytest.mark.parametrize("prompt_shape", ["QH", "1QH", "BQH"])
def test_sprc_losses_match_direct(batch, prompt_shape):
    q, t, _ = batch
    rng = np.random.default_rng(2)
    rtc_q = unit(rng.normal(size=(B, D)))
    n_query, hidden = 5, 6
    fusion_tokens = rng.normal(size=(B, n_query, hidden)).astype(np.float32)
    prompt = rng.normal(size=(n_query, hidden)).astype(np.float32)
    prompt_arg = {"QH": prompt, "1QH": prompt[None], "BQH": np.broadcast_to(prompt, (B, n_query, hidden))}[prompt_shape]
    got = losses.sprc_losses(
        jnp.asarray(q),
        jnp.asarray(rtc_q),
        jnp.asarray(t),
        jnp.float32(TEMP),
        jnp.asarray(fusion_tokens),
        jnp.asarray(prompt_arg),
    )

    def cross_entropy(query):  # torch F.cross_entropy(sim / temp, arange(B)), mean reduction
        return np.mean(
            [logsumexp([sim(query[i], t[j]) / TEMP for j in range(B)]) - sim(query[i], t[i]) / TEMP for i in range(B)]
        )

    # F.mse_loss(fusion[:, :32].mean(1), prompt_tokens.expand(B, ...).mean(1)): mean over [B, H].
    align = np.mean((fusion_tokens.mean(1) - prompt[None].mean(1)) ** 2)
    np.testing.assert_allclose(got["itc"], cross_entropy(q), rtol=1e-5)
    np.testing.assert_allclose(got["rtc"], cross_entropy(rtc_q), rtol=1e-5)
    np.testing.assert_allclose(got["align"], align, rtol=1e-5)
    # Batch-duplicate masking does not apply to SPRC: itc equals the unmasked in-batch InfoNCE.
    unmasked, _ = losses.contrastive_loss(jnp.asarray(q), jnp.asarray(t), jnp.arange(B), jnp.float32(TEMP))
    np.testing.assert_allclose(got["itc"], unmasked, rtol=1e-5)


def test_sprc_align_stops_prompt_gradient():
    fusion_tokens, prompt = jnp.ones((2, 3, 4)), jnp.zeros((3, 4))
    q, t = jnp.ones((2, 4)) / 2, jnp.ones((2, 1, 4)) / 2

    def align(f, p):
        return losses.sprc_losses(q, q, t, jnp.float32(0.07), f, p)["align"]

    gf, gp = jax.grad(align, argnums=(0, 1))(fusion_tokens, prompt)
    np.testing.assert_array_equal(gp, 0.0)
    np.testing.assert_allclose(gf, 2 * 1.0 / (2 * 4) / 3)  # d/df mean((mean_Q f - 0)^2) over [B=2, H=4]


# --- the train-step pattern: loss + enqueue in one jitted function ---------------------------------------


def test_jitted_loss_and_enqueue_compile_once_without_host_transfer():
    cfg = mb.BankConfig(size=M, entropy_mode="weight", tau_age=10.0, warmup_steps=1)
    traces = []

    def train_step(bank, query, targets, target_ids, step, temp):
        traces.append(1)

        def loss_fn(q):
            return losses.contrastive_loss(q, targets, target_ids, temp, bank=bank, bank_config=cfg, step=step)

        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(query)
        return mb.enqueue(bank, targets, target_ids, step), loss, grad, metrics

    step_fn = jax.jit(train_step, donate_argnums=0)
    rng = np.random.default_rng(3)
    inputs = [
        (
            jnp.asarray(unit(rng.normal(size=(B, D)))),
            jnp.asarray(unit(rng.normal(size=(B, K, D)))),
            jnp.asarray(rng.integers(0, 6, size=B), jnp.int32),
            jnp.int32(s),
            jnp.float32(0.1 + 0.01 * s),
        )
        for s in range(6)
    ]
    bank = mb.init_bank(cfg, tokens=K, dim=D)
    jax.block_until_ready((bank, inputs))
    outputs = []
    with jax.transfer_guard("disallow"):
        for args in inputs:
            bank, loss, grad, metrics = step_fn(bank, *args)
            outputs.append((loss, grad, metrics))
    assert len(traces) == 1 and step_fn._cache_size() == 1
    assert int(bank.ptr) == (6 * B) % M
    for loss, grad, _ in jax.device_get(outputs):
        assert np.isfinite(loss) and np.isfinite(grad).all()
    # Step 0 is in warm-up (bank ignored); from step 1 the bank adds negatives.
    assert float(outputs[0][2]["bank_valid_fraction"]) == 0.0
    assert float(outputs[2][2]["num_negatives"]) > float(outputs[0][2]["num_negatives"])


def test_contrastive_loss_sharded_matches_single_device(batch, bank):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    q, t, ids = batch
    cfg = mb.BankConfig(size=M, entropy_mode="topk", topk=5)

    def fn(bank, q, t, ids):
        return losses.contrastive_loss(q, t, ids, jnp.float32(TEMP), bank=bank, bank_config=cfg, step=jnp.int32(12))

    expected = jax.jit(fn)(bank, jnp.asarray(q), jnp.asarray(t), jnp.asarray(ids))
    bank_sh = jax.tree.map(
        lambda n: jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(n)),
        mb.bank_logical_axes(),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    got = jax.jit(fn)(
        jax.device_put(bank, bank_sh),
        jax.device_put(q, sharding.batch_sharding(mesh, 2)),
        jax.device_put(t, sharding.batch_sharding(mesh, 3)),
        jax.device_put(ids, sharding.batch_sharding(mesh)),
    )
    chex.assert_trees_all_close(jax.device_get(got), jax.device_get(expected), rtol=1e-6, atol=1e-6)
