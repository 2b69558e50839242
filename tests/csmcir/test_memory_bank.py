import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.csmcir import memory_bank as mb

M, K, D, B = 16, 2, 4, 4


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def filled_bank(rng: np.random.Generator, ids, steps, m: int = M, k: int = K, d: int = D) -> mb.MemoryBank:
    """A bank whose first len(ids) rows hold random unit vectors with the given ids/steps (the rest empty)."""
    n = len(ids)
    feats = np.zeros((m, k, d), np.float32)
    feats[:n] = unit(rng.normal(size=(n, k, d)))
    all_ids = np.full((m,), -1, np.int32)
    all_ids[:n] = ids
    all_steps = np.zeros((m,), np.int32)
    all_steps[:n] = steps
    return mb.MemoryBank(jnp.asarray(feats), jnp.asarray(all_ids), jnp.asarray(all_steps), jnp.int32(n % m))


def np_bank_logits(q, bank: mb.MemoryBank, qids, step, temp, cfg: mb.BankConfig):
    """Direct float64 implementation of spec §6.4, row by row."""
    feats, ids, bsteps = (np.asarray(x, np.float64) for x in (bank.feats, bank.ids, bank.step))
    ids = ids.astype(int)
    q = np.asarray(q, np.float64)
    logits = np.einsum("bd,mkd->bmk", q, feats).max(-1) / temp
    age = step - bsteps
    live = ids >= 0
    if cfg.max_age > 0:
        live &= age <= cfg.max_age
    if step < cfg.warmup_steps:
        live &= False
    out = np.full(logits.shape, mb.MASKED_LOGIT)
    valid = np.zeros(logits.shape, bool)
    entropies = []
    for i in range(q.shape[0]):
        v = live & ((ids != qids[i]) if cfg.mask_false_negatives else True)
        n = v.sum()
        p = np.zeros(len(ids))
        if n:
            e = np.exp(logits[i, v] - logits[i, v].max())
            p[v] = e / e.sum()
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0)
        h = -plogp.sum() / np.log(n) if n > 1 else 0.0
        entropies.append(h)
        lw = -age / cfg.tau_age if cfg.tau_age > 0 else np.zeros(len(ids))
        if cfg.entropy_mode == "weight":
            g = 1 - h if cfg.entropy_weight == "peaked" else h
            lw = lw + np.log(np.clip(g, mb.MIN_GATE, 1.0))
        elif cfg.entropy_mode == "topk":
            candidates = np.flatnonzero(v)
            keep = candidates[np.argsort(plogp[candidates])[: cfg.topk]]  # most negative p log p first
            v = np.isin(np.arange(len(ids)), keep)
        out[i, v] = logits[i, v] + lw[v]
        valid[i] = v
    return out, valid, np.array(entropies)


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("size", -1),
        ("size", 4.0),
        ("tau_age", -1.0),
        ("tau_age", float("inf")),
        ("entropy_mode", "softmax"),
        ("entropy_weight", "sharp"),
        ("topk", 0),
        ("warmup_steps", -2),
        ("mask_false_negatives", 1),
        ("enqueue_eval_mode", "yes"),
        ("dtype", "float16"),
    ],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=f"BankConfig.{field}"):
        mb.BankConfig(**{field: value})


def test_config_defaults_valid():
    cfg = mb.BankConfig()
    assert cfg.enabled and not mb.BankConfig(size=0).enabled


# --- state, size check, enqueue -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_init_bank_is_empty(dtype):
    bank = mb.init_bank(mb.BankConfig(size=M, dtype=dtype), tokens=K, dim=D)
    chex.assert_shape(bank.feats, (M, K, D))
    assert bank.feats.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(bank.ids, -1)
    np.testing.assert_array_equal(bank.step, 0)
    assert bank.ptr.shape == () and int(bank.ptr) == 0 and bank.ptr.dtype == jnp.int32
    assert jax.tree.structure(mb.bank_logical_axes(), is_leaf=lambda x: isinstance(x, tuple)).num_leaves == 4


def test_check_bank_size():
    mb.check_bank_size(0, 32)
    mb.check_bank_size(4096, 128)
    with pytest.raises(ValueError) as err:
        mb.check_bank_size(100, 32)
    message = str(err.value)
    assert "dynamic_update_slice" in message and "clamp" in message
    assert "96 or 128" in message
    with pytest.raises(ValueError, match="e.g. 32 "):
        mb.check_bank_size(20, 32)
    with pytest.raises(ValueError, match="global batch"):
        mb.check_bank_size(64, 0)


def test_enqueue_order_wraparound_and_ptr():
    rng = np.random.default_rng(0)
    m = 8
    bank = mb.init_bank(mb.BankConfig(size=m), tokens=K, dim=D)
    batches = [unit(rng.normal(size=(B, K, D))) for _ in range(3)]
    enq = jax.jit(mb.enqueue)
    for step, feats in enumerate(batches):
        bank = enq(bank, jnp.asarray(feats), jnp.arange(B) + 10 * step, jnp.int32(step))
        assert int(bank.ptr) == ((step + 1) * B) % m
        if step == 0:
            np.testing.assert_array_equal(bank.ids, [10 * 0 + i for i in range(B)] + [-1] * B)
    # Batch 2 overwrote rows 0..3 (oldest first out); batch 1 still sits in rows 4..7.
    np.testing.assert_array_equal(bank.ids, [20, 21, 22, 23, 10, 11, 12, 13])
    np.testing.assert_array_equal(bank.step, [2, 2, 2, 2, 1, 1, 1, 1])
    np.testing.assert_allclose(bank.feats[:B], batches[2])
    np.testing.assert_allclose(bank.feats[B:], batches[1])


def test_enqueue_stops_gradient_and_casts():
    bank = mb.init_bank(mb.BankConfig(size=8, dtype="bfloat16"), tokens=K, dim=D)
    feats = jnp.ones((B, K, D))
    grad = jax.grad(lambda f: mb.enqueue(bank, f, jnp.arange(B), jnp.int32(0)).feats.astype(jnp.float32).sum())(feats)
    np.testing.assert_array_equal(grad, 0.0)
    assert mb.enqueue(bank, feats, jnp.arange(B), jnp.int32(0)).feats.dtype == jnp.bfloat16


def test_enqueue_shape_errors_and_disabled_bank():
    bank = mb.init_bank(mb.BankConfig(size=10), tokens=K, dim=D)
    with pytest.raises(ValueError, match="clamp"):
        mb.enqueue(bank, jnp.ones((B, K, D)), jnp.arange(B), jnp.int32(0))
    with pytest.raises(ValueError, match=r"feats must be \[B, 2, 4\]"):
        mb.enqueue(bank, jnp.ones((B, K + 1, D)), jnp.arange(B), jnp.int32(0))
    with pytest.raises(ValueError, match=r"ids must be \[4\]"):
        mb.enqueue(mb.init_bank(mb.BankConfig(size=8), K, D), jnp.ones((B, K, D)), jnp.arange(3), jnp.int32(0))
    empty = mb.init_bank(mb.BankConfig(size=0), tokens=K, dim=D)
    assert mb.enqueue(empty, jnp.ones((B, K, D)), jnp.arange(B), jnp.int32(0)) is empty


# --- masks, decay, warm-up, entropy ---------------------------------------------------------------------


def test_empty_bank_masks_everything_without_nan():
    cfg = mb.BankConfig(size=M, entropy_mode="weight")
    bank = mb.init_bank(cfg, tokens=K, dim=D)
    q = jnp.asarray(unit(np.random.default_rng(1).normal(size=(B, D))))
    logits, valid, stats = mb.bank_logits(q, bank, jnp.arange(B), jnp.int32(0), jnp.float32(0.07), cfg)
    assert not bool(valid.any())
    np.testing.assert_array_equal(logits, mb.MASKED_LOGIT)
    for name, value in stats.items():
        assert np.isfinite(value), name
    assert float(stats["bank_valid_fraction"]) == 0.0 and float(stats["bank_mean_age"]) == 0.0


def test_age_masking_and_decay():
    rng = np.random.default_rng(2)
    bank = filled_bank(rng, ids=[100, 101, 102, 103], steps=[0, 5, 9, 10])
    q = jnp.asarray(unit(rng.normal(size=(2, D))))
    qids = jnp.asarray([0, 1])
    cfg = mb.BankConfig(size=M, max_age=5, tau_age=2.0, entropy_mode="none")
    logits, valid, stats = mb.bank_logits(q, bank, qids, jnp.int32(10), jnp.float32(0.5), cfg)
    np.testing.assert_array_equal(valid[0], [False, True, True, True] + [False] * (M - 4))  # age 10 > 5 masked
    sims = np.einsum("bd,mkd->bmk", np.asarray(q), np.asarray(bank.feats)).max(-1)
    ages = np.array([10, 5, 1, 0])
    np.testing.assert_allclose(logits[:, 1:4], sims[:, 1:4] / 0.5 - ages[1:4] / 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["bank_mean_age"], ages.mean())
    ref, ref_valid, _ = np_bank_logits(q, bank, np.asarray(qids), 10, 0.5, cfg)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-4)


def test_false_negative_masking_by_id():
    rng = np.random.default_rng(3)
    bank = filled_bank(rng, ids=[7, 8, 7, 9], steps=[0, 0, 0, 0])
    q = jnp.asarray(unit(rng.normal(size=(2, D))))
    qids = jnp.asarray([7, 5])
    on = mb.BankConfig(size=M, entropy_mode="none")
    _, valid, stats = mb.bank_logits(q, bank, qids, jnp.int32(1), jnp.float32(0.1), on)
    np.testing.assert_array_equal(valid[0, :4], [False, True, False, True])
    np.testing.assert_array_equal(valid[1, :4], [True, True, True, True])
    np.testing.assert_allclose(stats["bank_false_negatives"], (2 + 0) / 2)
    off = mb.BankConfig(size=M, entropy_mode="none", mask_false_negatives=False)
    _, valid, _ = mb.bank_logits(q, bank, qids, jnp.int32(1), jnp.float32(0.1), off)
    np.testing.assert_array_equal(valid[:, :4], True)


def test_warmup_ignores_but_fill_continues():
    rng = np.random.default_rng(4)
    cfg = mb.BankConfig(size=8, warmup_steps=3, entropy_mode="none")
    bank = mb.init_bank(cfg, tokens=K, dim=D)
    q = jnp.asarray(unit(rng.normal(size=(B, D))))
    for step in range(4):
        _, valid, _ = mb.bank_logits(q, bank, jnp.arange(B) + 50, jnp.int32(step), jnp.float32(0.1), cfg)
        if step < 3:
            assert not bool(valid.any())
        else:
            assert int(valid.sum()) == B * 8  # filled while warming up
        bank = mb.enqueue(bank, jnp.asarray(unit(rng.normal(size=(B, K, D)))), jnp.arange(B) + step * B, step)


@pytest.mark.parametrize(
    "cfg",
    [
        mb.BankConfig(size=M, entropy_mode="none"),
        mb.BankConfig(size=M, entropy_mode="weight", entropy_weight="peaked"),
        mb.BankConfig(size=M, entropy_mode="weight", entropy_weight="flat", tau_age=3.0, max_age=6),
        mb.BankConfig(size=M, entropy_mode="topk", topk=3),
        mb.BankConfig(size=M, entropy_mode="topk", topk=3, mask_false_negatives=False),
    ],
    ids=["none", "weight-peaked", "weight-flat-aged", "topk", "topk-no-fn-mask"],
)
def test_entropy_modes_match_numpy(cfg):
    rng = np.random.default_rng(5)
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    bank = filled_bank(rng, ids=ids, steps=np.arange(len(ids)))  # 5 empty rows
    q = unit(rng.normal(size=(B, D)))
    qids = np.array([1, 5, 8, 3])
    temp, step = 0.2, 11
    logits, valid, stats = jax.jit(mb.bank_logits, static_argnums=5)(
        jnp.asarray(q), bank, jnp.asarray(qids), jnp.int32(step), jnp.float32(temp), cfg
    )
    ref, ref_valid, ref_h = np_bank_logits(q, bank, qids, step, temp, cfg)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(stats["bank_entropy"], ref_h.mean(), rtol=1e-5)
    assert 0.0 < float(stats["bank_entropy"]) < 1.0
    if cfg.entropy_mode == "topk":
        np.testing.assert_array_equal(np.asarray(valid).sum(-1), cfg.topk)


def test_topk_keeps_exactly_k_or_all_valid():
    rng = np.random.default_rng(6)
    bank = filled_bank(rng, ids=np.arange(10) + 100, steps=np.zeros(10))
    q = jnp.asarray(unit(rng.normal(size=(B, D))))
    for k, expected in [(1, 1), (4, 4), (10, 10), (12, 10), (100, 10)]:
        cfg = mb.BankConfig(size=M, entropy_mode="topk", topk=k)
        _, valid, _ = mb.bank_logits(q, bank, jnp.arange(B), jnp.int32(0), jnp.float32(0.1), cfg)
        np.testing.assert_array_equal(np.asarray(valid).sum(-1), expected)
        assert not bool(valid[:, 10:].any())


def test_normalized_entropy_limits():
    valid = jnp.asarray([[True] * 4, [True, False, False, False], [False] * 4])
    p, h = mb.normalized_entropy(jnp.zeros((3, 4)), valid)
    np.testing.assert_allclose(h, [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(p.sum(-1), [1.0, 1.0, 0.0], atol=1e-6)


# --- sharding -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_sharded_init_places_bank_along_m(mesh):
    cfg = mb.BankConfig(size=32)
    bank, shardings = sharding.sharded_init(lambda: mb.boxed_bank(mb.init_bank(cfg, K, D)), mesh=mesh)
    assert isinstance(bank, mb.MemoryBank) and not isinstance(bank.feats, nn.LogicallyPartitioned)
    assert bank.feats.sharding.spec == P(("data", "fsdp"), None, None)
    assert bank.ids.sharding.spec == P(("data", "fsdp"))
    assert shardings.ptr.spec == P()
    assert len(bank.feats.addressable_shards) == 8 and bank.feats.addressable_shards[0].data.shape == (8, K, D)


def test_sharded_bank_matches_single_device(mesh):
    rng = np.random.default_rng(7)
    m, batch = 32, 8
    cfg = mb.BankConfig(size=m, entropy_mode="topk", topk=5, tau_age=4.0)
    host = filled_bank(rng, ids=rng.integers(0, 20, size=24), steps=rng.integers(0, 6, size=24), m=m)
    q, new = unit(rng.normal(size=(batch, D))), unit(rng.normal(size=(batch, K, D)))
    qids = rng.integers(0, 20, size=batch)

    def step_fn(bank, q, qids, new, step):
        logits, valid, stats = mb.bank_logits(q, bank, qids, step, jnp.float32(0.1), cfg)
        return mb.enqueue(bank, new, qids, step), logits, valid, stats

    args = (jnp.asarray(q), jnp.asarray(qids), jnp.asarray(new), jnp.int32(6))
    expected = jax.jit(step_fn)(jax.device_put(host, jax.devices()[0]), *args)

    bank_sh = jax.tree.map(
        lambda names: NamedSharding(mesh, sharding.logical_to_spec(names)),
        mb.bank_logical_axes(),
        is_leaf=lambda x: isinstance(x, tuple),
    )
    batch_sh = sharding.batch_sharding(mesh)
    sharded_fn = jax.jit(step_fn, out_shardings=(bank_sh, None, None, None))
    sharded_args = (
        jax.device_put(args[0], sharding.batch_sharding(mesh, 2)),
        jax.device_put(args[1], batch_sh),
        jax.device_put(args[2], sharding.batch_sharding(mesh, 3)),
        args[3],
    )
    sharded_bank = jax.device_put(host, bank_sh)
    assert sharded_bank.feats.addressable_shards[0].data.shape == (m // 4, K, D)
    got = sharded_fn(sharded_bank, *sharded_args)
    assert got[0].feats.sharding.spec == P(("data", "fsdp"), None, None)
    chex.assert_trees_all_close(jax.device_get(got), jax.device_get(expected), rtol=1e-6, atol=1e-6)

    # The enqueue writes locally: the [M, K, D] bank itself is never all-gathered.
    hlo = jax.jit(mb.enqueue, out_shardings=bank_sh).lower(sharded_bank, sharded_args[2], sharded_args[1], args[3])
    gathered = re.findall(r"= f32\[([\d,]+)\]\S* all-gather\(", hlo.compile().as_text())
    assert f"{m},{K},{D}" not in gathered, gathered
