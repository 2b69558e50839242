"""OneSearch-V2 self-distillation (spec onesearch.md §2.5): the loss terms against numpy, label-position alignment,
FGM perturbation, R-Drop, the stop-gradient teacher, the prompt_delta input of the model, the EMA teacher, and the
jitted step (2-device mesh == 1 device; mode "off" == the plain SFT step). Tiny BART backbone (1+1 layers)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from experiments.configs import onesearch as configs
from jax_hd.core import sharding, train_state
from jax_hd.models import bart, qformer, qwen2
from jax_hd.onesearch import distill, trainer
from jax_hd.onesearch import model as M

LEVELS = (8, 4, 4, 16, 16)
VOCAB = M.Vocab(50, LEVELS, (0, 8, 12, 16, 32), ("gender:male",))
LAYOUT = M.LayoutConfig(max_query_tokens=8, max_recent=1, recent_query_tokens=1, num_memory=3, max_profile_tokens=1)
CODES = np.array([[0, 1, 2, 3, 4], [1, 2, 3, 4, 5], [7, 3, 3, 15, 15], [5, 0, 1, 9, 2]])
RULES = sharding.DEFAULT_RULES
ALL_ON = dict(kl_weight=0.1, rdrop_weight=0.5, fgm_epsilon=0.6, focal_gamma=3.0, focal_scale=2.0)


def _config(backbone="bart", dropout=0.0):
    qf = qformer.QFormerConfig.tiny(
        num_query_tokens=3,
        encoder_hidden_size=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_hidden_layers=1,
        cross_attention_frequency=1,
    )
    if backbone == "qwen2":
        kw = dict(qwen2=qwen2.Qwen2Config.tiny(vocab_size=VOCAB.vocab_size, num_hidden_layers=1))
    else:
        b = bart.BartConfig.tiny(
            vocab_size=VOCAB.vocab_size, pad_token_id=0, encoder_layers=1, decoder_layers=1, dropout=dropout
        )
        kw = dict(bart=b)
    return M.OneSearchConfig(backbone, qf, VOCAB.special("[MEM]"), VOCAB.special("[DEC]"), **kw)


@functools.cache
def _params(backbone="bart"):
    """Random params with weights large enough (N(0, 0.2) added) that the logits depend on the prompt."""

    @jax.jit
    def init(rng):
        params = nn.unbox(M.init_params(_config(backbone), rng))
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
        noisy = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
        return tree.unflatten(noisy)

    return init(jax.random.PRNGKey(0))


@functools.cache
def _batch(same_teacher=False):
    """4 examples; the teacher prompt has 3 extra keyword tokens after the query; row 3 has 3 of its 5 labels."""
    student, teacher = [], []
    for i in range(4):
        kw = dict(uid=None, query_sid=CODES[i], recent_items=[CODES[(i + 1) % 4]], profile=["gender:male"])
        student.append(M.build_input(VOCAB, LAYOUT, query_ids=[3 + i, 4], **kw)[0][: 20 - 2 * i])
        teacher.append(M.build_input(VOCAB, LAYOUT, query_ids=[3 + i, 4, 20 + i, 30, 40 - i], **kw)[0])
    x, m = M.pad_rows(student, 28)
    tx, tm = (x, m) if same_teacher else M.pad_rows(teacher, 28)
    labels = VOCAB.sid_tokens(CODES)
    label_mask = np.ones_like(labels, bool)
    labels[3, 3:], label_mask[3, 3:] = 0, False
    memory = np.random.default_rng(0).normal(size=(4, 9, 16)).astype(np.float32)
    return {
        "input_ids": x, "input_mask": m, "teacher_input_ids": tx, "teacher_input_mask": tm, "memory": memory,
        "labels": labels, "label_mask": label_mask,
    }  # fmt: skip


@functools.cache
def _loss_fn(dropout, cfg, train):
    model = M.OneSearchModel(_config(dropout=dropout))
    return jax.jit(functools.partial(distill.sdft_loss, model, cfg=cfg, train=train))


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_kl(zp, zq):
    lp, lq = _np_log_softmax(zp), _np_log_softmax(zq)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def _random_logits(seed, shape=(3, 4, 11)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2


MASK = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], bool)


# ----------------------------------------------------------------------------------------------------------
# Pure loss functions.


def test_token_cross_entropy_focal_matches_numpy():
    logits, labels = _random_logits(0), np.random.default_rng(1).integers(0, 11, (3, 4))
    plain = distill.token_cross_entropy(logits, labels, MASK)
    assert float(plain) == float(M.sequence_loss(logits, labels, MASK)[0])
    logp = np.take_along_axis(_np_log_softmax(logits.astype(np.float64)), labels[..., None], -1)[..., 0]
    expected = (2.0 * (1 - np.exp(logp)) ** 3 * -logp)[MASK].mean()
    focal = distill.token_cross_entropy(logits, labels, MASK, focal_gamma=3.0, focal_scale=2.0)
    np.testing.assert_allclose(float(focal), expected, rtol=1e-5)
    assert float(focal) < 2 * float(plain)  # the (1 - p)^gamma factor down-weights easy tokens
    np.testing.assert_allclose(
        float(distill.token_cross_entropy(logits, labels, MASK, 0.0, 2.0)), 2 * float(plain), rtol=1e-6
    )
    g = jax.grad(lambda z: distill.token_cross_entropy(z, labels, MASK, 0.5, 2.0))(jnp.asarray(logits))
    chex.assert_tree_all_finite(g)


def test_distill_kl_uses_exactly_the_label_positions():
    zt, zs = _random_logits(2), _random_logits(3)
    for tau in (1.0, 2.0):
        expected = _np_kl(zt / tau, zs / tau)[MASK].mean() * tau**2
        np.testing.assert_allclose(float(distill.distill_kl(zt, zs, MASK, tau)), expected, rtol=1e-5)
    # Whatever the logits hold at masked-out positions, nothing changes.
    zt2, zs2 = zt.copy(), zs.copy()
    zt2[~MASK] = np.nan
    zs2[~MASK] = 1e4 * _random_logits(4)[~MASK]
    assert float(distill.distill_kl(zt2, zs2, MASK)) == float(distill.distill_kl(zt, zs, MASK))
    # ...and each label position counts: moving one of them moves the value.
    zs3 = zs.copy()
    zs3[1, 0] += _random_logits(5)[1, 0]
    assert float(distill.distill_kl(zt, zs3, MASK)) != float(distill.distill_kl(zt, zs, MASK))
    assert float(distill.distill_kl(zs, zs, MASK)) == pytest.approx(0.0, abs=1e-7)
    g_teacher = jax.grad(lambda t: distill.distill_kl(t, zs, MASK))(jnp.asarray(zt))
    assert float(jnp.abs(g_teacher).max()) == 0.0  # stop-gradient teacher


def test_symmetric_kl_matches_numpy():
    za, zb = _random_logits(6), _random_logits(7)
    expected = (0.5 * (_np_kl(za, zb) + _np_kl(zb, za)))[MASK].mean()
    np.testing.assert_allclose(float(distill.symmetric_kl(za, zb, MASK)), expected, rtol=1e-5)
    assert float(distill.symmetric_kl(za, zb, MASK)) == pytest.approx(float(distill.symmetric_kl(zb, za, MASK)))
    assert float(distill.symmetric_kl(za, za, MASK)) == pytest.approx(0.0, abs=1e-7)


def test_fgm_perturbation_norm_and_pads():
    grad = np.random.default_rng(8).normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
    grad[2] = 0.0  # a row without gradient
    r = np.asarray(distill.fgm_perturbation(grad, mask, 0.6))
    assert np.isfinite(r).all()
    np.testing.assert_allclose(np.linalg.norm(r[:2].reshape(2, -1), axis=1), [0.6, 0.6], rtol=1e-5)
    assert (r[~mask] == 0).all() and (r[2] == 0).all()
    g0 = np.where(mask[0][:, None], grad[0], 0)
    np.testing.assert_allclose(r[0], 0.6 * g0 / np.linalg.norm(g0), rtol=1e-5)


def test_ema_update_formula():
    t = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(4.0)}}
    s = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(0.0)}}
    out = distill.ema_update(t, s, 0.9)
    chex.assert_trees_all_close(out, {"a": jnp.array([1.2, 1.6]), "b": {"c": jnp.array(3.6)}}, rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        distill.DistillConfig(mode="joint")
    with pytest.raises(ValueError, match="temperature"):
        distill.DistillConfig(temperature=0.0)
    with pytest.raises(ValueError, match="needs dropout"):
        distill.check_config(distill.DistillConfig(rdrop_weight=0.5), _config(dropout=0.0))
    with pytest.raises(ValueError, match="needs dropout"):
        distill.check_config(distill.DistillConfig(rdrop_weight=0.5), _config("qwen2"))
    with pytest.raises(ValueError, match="needs dropout"):  # sdft_loss checks too, before tracing anything
        distill.sdft_loss(M.OneSearchModel(_config()), {}, None, {}, jax.random.PRNGKey(1), distill.DistillConfig(
            rdrop_weight=0.5), True)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# The model's prompt_delta and the SDFT loss.


@pytest.mark.parametrize("backbone", M.BACKBONES)
def test_prompt_delta_enters_the_real_prompt_embeddings(backbone):
    cfg, params, b = _config(backbone), _params(backbone), _batch()
    model = M.OneSearchModel(cfg)
    shape = (*b["input_ids"].shape, cfg.d_model)
    noise = jax.random.normal(jax.random.PRNGKey(5), shape)

    def run(delta):
        return model.apply({"params": params}, b["input_ids"], b["input_mask"], b["memory"], b["labels"],
                           prompt_delta=delta)  # fmt: skip

    @jax.jit
    def outputs():
        on_pads = jnp.where(b["input_mask"][..., None], 0.0, noise)
        on_row0 = noise.at[1:].set(0.0)  # row 0's real and pad positions
        return run(None), run(jnp.zeros(shape)), run(on_pads), run(on_row0)

    plain, zero, on_pads, on_row0 = (np.asarray(x) for x in outputs())
    np.testing.assert_allclose(zero, plain, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(on_pads, plain, atol=1e-5, rtol=1e-5)  # pads are not attended to
    assert np.abs(on_row0[0] - plain[0]).max() > 1e-3  # real positions are
    np.testing.assert_allclose(on_row0[1:], plain[1:], atol=1e-5, rtol=1e-5)  # per example
    with pytest.raises(ValueError, match="prompt_delta"):
        jax.eval_shape(run, jnp.zeros((4, 3, cfg.d_model)))


def test_without_dropout_kl_and_rdrop_vanish_for_identical_inputs_and_fgm_raises_the_loss():
    """Dropout model, deterministic passes: identical teacher / student prompts give KL = 0; R-Drop is 0 without
    dropout; FGM follows the gradient of L_base, so (to first order) the perturbed loss is larger."""
    loss_fn = _loss_fn(0.1, distill.DistillConfig(mode="self", **ALL_ON), False)
    _, same = loss_fn(_params(), None, _batch(same_teacher=True), jax.random.PRNGKey(0))
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-7) and float(same["rdrop"]) == 0.0
    assert float(same["teacher_accuracy"]) == float(same["accuracy"])
    loss, m = loss_fn(_params(), None, _batch(), jax.random.PRNGKey(0))
    assert float(m["kl"]) > 1e-3  # the keyword clause changes the teacher's distribution
    assert float(m["rdrop"]) == 0.0
    assert float(m["adv"]) > float(m["ce"]) + 0.1 * float(m["kl"])
    np.testing.assert_allclose(float(loss), float(m["ce"]) + 0.1 * float(m["kl"]) + float(m["adv"]), rtol=1e-6)


def test_self_mode_teacher_gets_no_gradient():
    """d loss / d params == the gradient with the teacher logits precomputed as constants."""
    cfg = distill.DistillConfig(mode="self", kl_weight=0.5)
    params, b = _params(), _batch()
    model = M.OneSearchModel(_config())

    def constant_teacher_loss(p, teacher_logits):
        logits = model.apply({"params": p}, b["input_ids"], b["input_mask"], b["memory"], b["labels"])
        ce = distill.token_cross_entropy(logits, b["labels"], b["label_mask"])
        return ce + 0.5 * distill.distill_kl(teacher_logits, logits, b["label_mask"])

    @jax.jit
    def both(p):
        grads = jax.grad(lambda q: distill.sdft_loss(model, q, None, b, jax.random.PRNGKey(0), cfg, False)[0])(p)
        teacher_logits = model.apply({"params": p}, b["teacher_input_ids"], b["teacher_input_mask"], b["memory"],
                                     b["labels"])  # fmt: skip
        return grads, jax.grad(constant_teacher_loss)(p, teacher_logits)

    grads, expected = both(params)
    chex.assert_trees_all_close(grads, expected, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The jitted step.


@pytest.fixture(scope="module")
def tx():
    return trainer.make_optimizer(configs.get_config("cpu_test"))


def _init_state(model_config, tx, mesh, with_teacher):
    shardings = trainer.state_shardings(model_config, tx, mesh, RULES)
    if with_teacher:
        shardings = distill.teacher_shardings(shardings)

    def build(p, r):
        state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r, extra={})
        return distill.init_ema_teacher(state) if with_teacher else state

    with jax.set_mesh(mesh):
        state = jax.jit(build, out_shardings=shardings)(jax.device_get(_params()), jax.random.PRNGKey(3))
    return state, shardings


def _run(step, state, batch, mesh):
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        state, m = step(state, sharding.shard_batch(batch, mesh), np.float32(1e-2))
    return jax.device_get(state), jax.device_get(m)


def test_ema_step_on_2_devices_matches_1_device():
    # SGD: Adam would blow the (numerically zero) gradient noise of e.g. the key biases up to lr-sized updates.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    model_config = _config(dropout=0.1)
    cfg = distill.DistillConfig(mode="ema", ema_decay=0.9, **ALL_ON)
    out = {}
    for n in (1, 2):
        mesh = sharding.make_mesh({"data": n, "fsdp": 1, "tensor": 1}, jax.devices()[:n])
        state, shardings = _init_state(model_config, tx, mesh, with_teacher=True)
        step = distill.make_distill_step(model_config, tx, shardings, mesh, cfg)
        out[n] = _run(step, state, _batch(), mesh)
    (s1, m1), (s2, m2) = out[1], out[2]
    for k in ("loss", "ce", "kl", "rdrop", "adv", "accuracy", "teacher_accuracy", "grad_norm"):
        assert np.isfinite(m1[k]) and m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k
    # Every term is on (R-Drop: dropout is on in the student passes) and the total is eq. 8.
    assert m1["kl"] > 0 and m1["rdrop"] > 0 and m1["adv"] > 0
    expected = m1["ce"] + 0.1 * m1["kl"] + 0.5 * m1["rdrop"] + m1["adv"]
    assert m1["loss"] == pytest.approx(expected, rel=1e-6)
    chex.assert_trees_all_close(s1.params, s2.params, atol=2e-6, rtol=1e-5)
    # teacher <- 0.9 * teacher + 0.1 * student, after the update.
    chex.assert_trees_all_close(s1.extra["teacher"], distill.ema_update(_params(), s1.params, 0.9), atol=1e-7)
    chex.assert_trees_all_close(s2.extra["teacher"], s1.extra["teacher"], atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="teacher"):
        distill.make_distill_step(model_config, tx, trainer.state_shardings(model_config, tx, mesh, RULES), mesh, cfg)


def test_off_mode_is_the_plain_sft_step(tx):
    model_config = _config(dropout=0.1)  # dropout on, so the same rng must reach the same dropout masks
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch = {k: v for k, v in _batch().items() if not k.startswith("teacher_")}
    state, shardings = _init_state(model_config, tx, mesh, with_teacher=False)
    plain = trainer.make_train_step(model_config, tx, shardings, mesh)
    s_plain, m_plain = _run(plain, state, batch, mesh)
    state, _ = _init_state(model_config, tx, mesh, with_teacher=False)
    step = distill.make_distill_step(model_config, tx, shardings, mesh, distill.DistillConfig(mode="off"))
    s_off, m_off = _run(step, state, batch, mesh)
    assert "teacher_accuracy" not in m_off and m_off["kl"] == 0 and m_off["adv"] == 0
    for k in ("loss", "accuracy", "grad_norm"):
        assert m_off[k] == m_plain[k], k
    chex.assert_trees_all_equal(s_off.params, s_plain.params)
    chex.assert_trees_all_equal(s_off.opt_state, s_plain.opt_state)
