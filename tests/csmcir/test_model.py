"""CSMCIR dual tower: one shared Q-Former, tower variants, SPRC's image-less passes (parity with transformers
composed as SPRC composes them), temperature, sharding, frozen-ViT feature cache, HF BLIP-2 loading."""

import dataclasses
import functools
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util

from jax_hd.core import sharding
from jax_hd.csmcir import model
from jax_hd.models import hf_import, qformer, vit

# One layer (it cross-attends): every code path of the towers at a third of the tiny preset's compile time.
QFORMER = qformer.QFormerConfig.tiny(num_hidden_layers=1)
VISION = vit.ViTConfig.tiny(num_hidden_layers=1)  # 48 wide = QFORMER.encoder_hidden_size, 17 tokens
BASE = model.CSMCIRConfig.tiny(QFORMER)  # symmetric, one query pass, K = Q target tokens
# SPRC's asymmetric baseline, and its query side with CSMCIR's symmetric target.
SPRC = dataclasses.replace(BASE, symmetric=False, query_passes=2, use_prompt_tokens=True, sprc_ffn_routing=True)
SYMMETRIC_SPRC = dataclasses.replace(SPRC, symmetric=True)
NUM_Q = QFORMER.num_query_tokens
BATCH, IMAGE_LEN, TEXT_LEN, CAPTION_LEN = 4, VISION.num_positions, 6, 7
TEXT_MASK = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]], np.int32)
CAPTION_MASK = np.array([[1] * 7, [1] * 3 + [0] * 4, [1] * 7, [1] * 5 + [0] * 2], np.int32)


def _ids(rng: np.random.RandomState, mask: np.ndarray) -> np.ndarray:
    ids = rng.randint(1, QFORMER.vocab_size, mask.shape).astype(np.int32)
    ids[:, 0] = 2  # a fixed "[CLS]"
    return np.where(mask == 1, ids, QFORMER.pad_token_id).astype(np.int32)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    features = rng.randn(2, BATCH, IMAGE_LEN, QFORMER.encoder_hidden_size).astype(np.float32)
    return dict(
        ref=features[0],
        text_ids=_ids(rng, TEXT_MASK),
        text_mask=TEXT_MASK,
        tgt=features[1],
        caption_ids=_ids(rng, CAPTION_MASK),
        other_caption_ids=_ids(rng, CAPTION_MASK),
        caption_mask=CAPTION_MASK,
    )


def _args(inputs, caption_ids=None):
    caption_ids = inputs["caption_ids"] if caption_ids is None else caption_ids
    return (inputs["ref"], inputs["text_ids"], inputs["text_mask"], inputs["tgt"], caption_ids, inputs["caption_mask"])


def _random_params(init_fn, seed: int = 0, temp: float = 0.07):
    """Params with the tree of `init_fn(rng)` (abstract: nothing runs), every weight random so no path is
    degenerate (LayerNorm scales around 1), `temp` set to `temp`. (`test_sharded_init_and_forward` checks
    the real initialisation.)"""
    abstract = nn.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
    rng = np.random.RandomState(seed)

    def randomise(path, x):
        if x.ndim == 0:
            return jnp.float32(temp)
        center = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(center + 0.1 * rng.randn(*x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(randomise, abstract)


@functools.cache
def _params(config: model.CSMCIRConfig, seed: int = 0):
    init = functools.partial(model.init_params, config, image_tokens=IMAGE_LEN, text_len=TEXT_LEN)
    return _random_params(init, seed, config.tau_init)


def _boxed(config: model.CSMCIRConfig, seed: int = 0):
    """`_params` in the boxed (`nn.LogicallyPartitioned`) tree `init_params` returns."""
    init = functools.partial(model.init_params, config, image_tokens=IMAGE_LEN, text_len=TEXT_LEN)
    abstract = jax.eval_shape(init, jax.random.key(0))
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda box, x: box.replace_boxed(x), abstract, _params(config, seed), is_leaf=is_box)


@functools.cache
def _forward(config: model.CSMCIRConfig, method: str | None = None):
    """Jitted `CSMCIR(config).apply` of `__call__` or of a method, compiled once per (config, method, shapes)."""
    return jax.jit(lambda params, *args: model.CSMCIR(config).apply({"params": params}, *args, method=method))


@functools.cache
def _qformer_fn():
    """Jitted `QFormer.__call__` by keyword; the inputs given and the flags select the pass."""

    def forward(params, allow_queries_without_image=False, query_ffn="query", queries_after_cls=False, **inputs):
        flags = dict(allow_queries_without_image=allow_queries_without_image, query_ffn=query_ffn)
        flags["queries_after_cls"] = queries_after_cls
        return qformer.QFormer(QFORMER).apply({"params": params}, **inputs, **flags)

    return jax.jit(forward, static_argnames=("allow_queries_without_image", "query_ffn", "queries_after_cls"))


def _apply(config, params, method: str, *args, **kwargs):
    return model.CSMCIR(config).apply({"params": params}, *args, method=method, **kwargs)


def _perturbed(params, path: tuple[str, ...], scale: float = 0.5):
    flat = traverse_util.flatten_dict(params)
    flat[path] = flat[path] + scale * np.random.RandomState(7).randn(*np.shape(flat[path])).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


def _changed(a, b) -> bool:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > 1e-3


def test_config_validation():
    with pytest.raises(ValueError, match="use_qformer_text_input must be True"):
        model.CSMCIRConfig.tiny(dataclasses.replace(QFORMER, use_qformer_text_input=False))
    with pytest.raises(ValueError, match="query_passes must be 1 or 2"):
        model.CSMCIRConfig.tiny(QFORMER, query_passes=3)
    with pytest.raises(ValueError, match="target_pool must be one of"):
        model.CSMCIRConfig.tiny(QFORMER, target_pool="mean")
    with pytest.raises(ValueError, match="needs symmetric=True"):
        model.CSMCIRConfig.tiny(QFORMER, symmetric=False, target_pool="cls")
    with pytest.raises(ValueError, match="tau_clamp"):
        model.CSMCIRConfig.tiny(QFORMER, tau_clamp=(0.5, 0.1))
    with pytest.raises(ValueError, match="tau_init"):
        model.CSMCIRConfig.tiny(QFORMER, tau_init=0.0)
    assert model.CSMCIRConfig.tiny(QFORMER, tau_clamp=[0.001, 0.5]).tau_clamp == (0.001, 0.5)  # ConfigDict lists
    blip2 = model.CSMCIRConfig.blip2()
    assert (blip2.embed_dim, blip2.qformer, blip2.num_targets_per_image) == (256, qformer.QFormerConfig.blip2(), 32)


def test_one_qformer_parameter_set(inputs):
    params = _params(BASE)
    assert set(params) == {"qformer", "text_proj", "vision_proj", "temp"}
    qformer_paths = set(traverse_util.flatten_dict(params["qformer"]))
    assert qformer_paths == set(hf_import.blip2_qformer_param_shapes(QFORMER))  # exactly one whole Q-Former
    forward = _forward(BASE)
    base = forward(params, *_args(inputs))
    # A Q-Former weight moves both towers; each projection only its own.
    for path, moves in [
        (("qformer", "layer_0", "attention", "query", "kernel"), {"query", "targets"}),
        (("qformer", "query_tokens"), {"query", "targets"}),
        (("text_proj", "kernel"), {"query"}),
        (("vision_proj", "kernel"), {"targets"}),
    ]:
        out = forward(_perturbed(params, path), *_args(inputs))
        assert {k for k in ("query", "targets") if _changed(out[k], base[k])} == moves, path


def test_shared_projection_is_one_dense(inputs):
    config = dataclasses.replace(BASE, share_projections=True)
    params = _params(config)
    assert set(params) == {"qformer", "text_proj", "temp"}  # the query side's text_proj is BASE's (tested above)
    encode = _forward(config, "encode_target")
    args = (inputs["tgt"], inputs["caption_ids"], inputs["caption_mask"])
    assert _changed(encode(_perturbed(params, ("text_proj", "kernel")), *args), encode(params, *args))
    heads = model.export_heads(params, config)
    assert heads["vision_projection"] is heads["text_projection"]


# (query_passes, target_pool, symmetric): the three that differ in what the towers compute (1 vs 2 passes is
# also compared directly in `test_two_passes_are_two_qformer_calls`).
def _check_unit_rows(x, shape):
    chex.assert_shape(x, shape)
    np.testing.assert_allclose(np.linalg.norm(x, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("config", [BASE, SYMMETRIC_SPRC], ids=["base", "symmetric_sprc"])
def test_forward_shapes_norms_and_caption_dependence(inputs, config):
    params = _params(config)
    out = _forward(config)(params, *_args(inputs))
    _check_unit_rows(out["query"], (BATCH, config.embed_dim))
    _check_unit_rows(out["targets"], (BATCH, NUM_Q, config.embed_dim))
    np.testing.assert_allclose(out["temperature"], config.tau_init, rtol=1e-6)
    if config.use_prompt_tokens:
        _check_unit_rows(out["rtc_query"], (BATCH, config.embed_dim))
        chex.assert_shape([out["fusion_tokens"], out["prompt_tokens"]], (BATCH, NUM_Q, QFORMER.hidden_size))
        np.testing.assert_array_equal(out["prompt_tokens"][1], params["prompt_tokens"])
    else:
        assert set(out) == {"query", "targets", "temperature"}
    other = _forward(config)(params, *_args(inputs, inputs["other_caption_ids"]))
    np.testing.assert_array_equal(other["query"], out["query"])
    assert all(_changed(o, t) for o, t in zip(other["targets"], out["targets"], strict=True))  # every caption differs


@pytest.mark.parametrize(
    "config, k",
    [(dataclasses.replace(BASE, target_pool="cls"), 1), (dataclasses.replace(SPRC, query_passes=1), NUM_Q)],
    ids=["symmetric_cls", "asymmetric"],
)
def test_target_variants(inputs, config, k):
    """`cls` pooling gives one vector per image; the asymmetric (SPRC) target ignores captions."""
    params = _params(config)
    encode = _forward(config, "encode_target")
    targets = encode(params, inputs["tgt"], inputs["caption_ids"], inputs["caption_mask"])
    other = encode(params, inputs["tgt"], inputs["other_caption_ids"], inputs["caption_mask"])
    _check_unit_rows(targets, (BATCH, k, config.embed_dim))
    assert k == config.num_targets_per_image
    if config.symmetric:
        assert all(_changed(o, t) for o, t in zip(other, targets, strict=True))
    else:
        np.testing.assert_array_equal(other, targets)
        np.testing.assert_array_equal(_forward(config, "encode_target")(params, inputs["tgt"]), targets)


def test_invalid_calls_raise(inputs):
    with pytest.raises(ValueError, match="needs caption_ids"):
        jax.eval_shape(lambda: _apply(BASE, _params(BASE), "encode_target", inputs["tgt"]))
    with pytest.raises(ValueError, match="needs use_prompt_tokens"):
        jax.eval_shape(lambda: _apply(BASE, _params(BASE), "encode_rtc", inputs["text_ids"], inputs["text_mask"]))


def test_two_passes_are_two_qformer_calls(inputs):
    """query_passes=2 (our routing) is the fused pass, then an image-less pass over its query outputs and the
    text; it differs from one pass. (SPRC's routing is checked against transformers below.)"""
    config = dataclasses.replace(BASE, query_passes=2)
    params = _params(BASE)  # the same tree: the number of passes adds no parameters
    args = (inputs["ref"], inputs["text_ids"], inputs["text_mask"])
    two = _forward(config, "encode_query")(params, *args)
    one = _forward(BASE)(params, *_args(inputs))["query"]
    assert _changed(two["query"], one)
    # The fused pass (whose query outputs are `fusion_tokens`) is checked against transformers below.
    second = _qformer_fn()(
        params["qformer"],
        query_tokens_override=two["fusion_tokens"],
        input_ids=args[1],
        text_attention_mask=args[2],
        allow_queries_without_image=True,
    )
    proj = params["text_proj"]
    expected = np.asarray(second[:, NUM_Q] @ proj["kernel"] + proj["bias"])
    np.testing.assert_allclose(two["query"], expected / np.linalg.norm(expected, axis=-1, keepdims=True), atol=1e-5)


def test_imageless_routing_and_layout_options(inputs):
    """The Q-Former's image-less options: the routing matters, the default still raises, misuse raises."""
    params = _params(BASE)["qformer"]
    queries = jnp.asarray(np.random.RandomState(3).randn(BATCH, NUM_Q, QFORMER.hidden_size), jnp.float32)
    run = functools.partial(
        _qformer_fn(), params, query_tokens_override=queries, input_ids=inputs["text_ids"],
        text_attention_mask=inputs["text_mask"],
    )  # fmt: skip
    ours, sprc = run(allow_queries_without_image=True), run(allow_queries_without_image=True, query_ffn="text")
    assert _changed(ours[:, :NUM_Q], sprc[:, :NUM_Q])
    with pytest.raises(ValueError, match="queries need image features"):
        run()
    with pytest.raises(ValueError, match="needs allow_queries_without_image"):
        run(query_ffn="text")
    with pytest.raises(ValueError, match="for passes without image_features"):
        run(allow_queries_without_image=True, image_features=inputs["ref"])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        long_ids = np.ones((BATCH, QFORMER.max_position_embeddings - NUM_Q + 1), np.int32)
        jax.eval_shape(
            lambda: qformer.QFormer(QFORMER).apply(
                {"params": params}, query_tokens_override=queries, input_ids=long_ids, queries_after_cls=True
            )
        )


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers' BLIP-2 modules composed as SPRC's `blip2_qformer_cir_align_prompt.py` composes
# LAVIS's: fused pass, image-less second pass, `no_img` prompt pass, target pass.


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Blip2Config(
        vision_config=VISION.to_hf_dict(),
        qformer_config=QFORMER.to_hf_dict(),
        num_query_tokens=NUM_Q,
        image_text_hidden_size=BASE.embed_dim,
    )
    torch.manual_seed(0)
    hf_model = transformers.Blip2ForImageTextRetrieval(hf_config).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            is_norm = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_norm else 0.0))
    path = str(tmp_path_factory.mktemp("blip2_hf"))
    hf_model.save_pretrained(path)
    return hf_model, path


def _sprc_reference(hf_model, inputs, prompt_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """SPRC's passes with transformers' modules: `query_length=0` without an image is SPRC's routing (every
    position through the text feed-forward, no cross-attention)."""
    import torch
    from torch.nn import functional as F

    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731
    ids, text_mask = t(inputs["text_ids"]).long(), t(inputs["text_mask"]).long()
    ones = torch.ones(BATCH, NUM_Q, dtype=torch.long)
    mask = torch.cat([ones, text_mask], dim=1)
    emb, qf = hf_model.embeddings, hf_model.qformer
    queries = hf_model.query_tokens.expand(BATCH, -1, -1)
    with torch.no_grad():
        fused = qf(
            query_embeds=emb(input_ids=ids, query_embeds=queries),
            query_length=NUM_Q,
            attention_mask=mask,
            encoder_hidden_states=t(inputs["ref"]),
        ).last_hidden_state
        second = qf(
            query_embeds=emb(input_ids=ids, query_embeds=fused[:, :NUM_Q]), query_length=0, attention_mask=mask
        ).last_hidden_state
        words = emb.word_embeddings(ids)
        prompt = t(prompt_tokens).expand(BATCH, -1, -1)
        no_img = torch.cat([words[:, :1], prompt, words[:, 1:]], dim=1)
        no_img = no_img + emb.position_embeddings(torch.arange(NUM_Q + TEXT_LEN))[None]
        rtc = qf(query_embeds=no_img, query_length=0, attention_mask=mask).last_hidden_state
        caption_ids, caption_mask = t(inputs["caption_ids"]).long(), t(inputs["caption_mask"]).long()
        target = qf(
            query_embeds=emb(input_ids=caption_ids, query_embeds=queries),
            query_length=NUM_Q,
            attention_mask=torch.cat([ones, caption_mask], dim=1),
            encoder_hidden_states=t(inputs["tgt"]),
        ).last_hidden_state
        text_proj = lambda h: F.normalize(hf_model.text_projection(h), dim=-1).numpy()  # noqa: E731
        return {
            "query_one_pass": text_proj(fused[:, NUM_Q]),
            "query_two_passes": text_proj(second[:, NUM_Q]),
            "rtc_query": text_proj(rtc[:, 0]),
            "fusion_tokens": fused[:, :NUM_Q].numpy(),
            "targets": F.normalize(hf_model.vision_projection(target[:, :NUM_Q]), dim=-1).numpy(),
        }


def test_sprc_passes_match_transformers(hf_checkpoint, inputs):
    hf_model, hf_dir = hf_checkpoint
    config = SYMMETRIC_SPRC
    params = model.load_blip2_into(_params(config), config, hf_dir)
    reference = _sprc_reference(hf_model, inputs, params["prompt_tokens"])
    out = _forward(config)(params, *_args(inputs))
    for name in ("rtc_query", "fusion_tokens", "targets"):
        np.testing.assert_allclose(out[name], reference[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(out["query"], reference["query_two_passes"], atol=1e-5)
    base_params = {k: v for k, v in params.items() if k != "prompt_tokens"}  # BASE: one pass, already compiled
    np.testing.assert_allclose(
        _forward(BASE)(base_params, *_args(inputs))["query"], reference["query_one_pass"], atol=1e-5
    )


# ----------------------------------------------------------------------------------------------------------
# Temperature.


def test_temperature_clamp_and_learn_tau():
    def temperature(config, params):
        return _apply(config, params, "temperature")

    clamped = dataclasses.replace(BASE, tau_init=1.0, tau_clamp=(0.001, 0.5))
    params = _params(clamped)  # temp = 1.0
    assert float(temperature(clamped, params)) == 0.5
    assert float(jax.grad(lambda p: temperature(clamped, p))(params)["temp"]) == 0.0  # clipped
    for learn_tau, grad in ((True, 1.0), (False, 0.0)):
        config = dataclasses.replace(BASE, learn_tau=learn_tau)
        grads = jax.grad(lambda p, c=config: 1.0 / temperature(c, p))(params)
        np.testing.assert_allclose(grads["temp"], -grad / float(params["temp"]) ** 2)
        mask = model.trainable_mask(params, config)
        assert mask["temp"] is learn_tau
        assert all(jax.tree.leaves({k: v for k, v in mask.items() if k != "temp"}))
    boxed = _boxed(BASE)
    assert jax.tree.structure(model.trainable_mask(boxed)) == jax.tree.structure(boxed)


# ----------------------------------------------------------------------------------------------------------
# Sharding and HF round trip.


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    """`save_blip2` of random tiny ViT + CSMCIR params (no temp, no prompt tokens: HF has neither)."""
    params = _params(BASE)
    vision_params = _random_params(functools.partial(vit.init_params, VISION), seed=5)
    path = str(tmp_path_factory.mktemp("blip2_ours"))
    heads = model.export_heads(params, BASE)
    hf_import.save_blip2(path, VISION, vision_params, QFORMER, params["qformer"], heads=heads)
    return path


def test_sharded_matches_single_device(inputs, mesh, blip2_dir):
    config = BASE
    init = functools.partial(model.init_params, config, image_tokens=IMAGE_LEN, text_len=TEXT_LEN)
    # ("rbg" keys: XLA:CPU compiles their bits 4x faster than threefry's.)
    sharded, shardings = sharding.sharded_init(init, jax.random.key(0, impl="rbg"), mesh=mesh)
    word = sharded["qformer"]["embeddings"]["word_embeddings"]["embedding"]
    assert word.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    sprc_init = functools.partial(model.init_params, SPRC, image_tokens=IMAGE_LEN, text_len=TEXT_LEN)
    sprc_shardings = sharding.logical_shardings(jax.eval_shape(sprc_init, jax.random.key(0)), mesh)
    assert sprc_shardings["prompt_tokens"].spec == jax.sharding.PartitionSpec(None, "fsdp")
    # The real initialisation: temp = tau_init, N(0, 0.02) weights, zero biases.
    assert sharded["temp"] == np.float32(config.tau_init)
    assert 0.015 < float(np.std(sharded["text_proj"]["kernel"])) < 0.025
    assert not np.any(np.asarray(sharded["text_proj"]["bias"]))
    # Loading keeps every leaf's sharding.
    sharded = model.load_blip2_into(sharded, config, blip2_dir)
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.is_equivalent_to(s, x.ndim), True), sharded, shardings)

    single = _forward(config)(jax.device_get(sharded), *_args(inputs))
    batch = sharding.shard_batch(_args(inputs), mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        out = jax.jit(lambda p, *a: model.CSMCIR(config).apply({"params": p}, *a))(sharded, *batch)
    assert out["query"].sharding.spec[0] == sharding.BATCH_AXES
    chex.assert_trees_all_close(jax.device_get(out), single, atol=1e-5)


def test_load_blip2_round_trip(blip2_dir, caplog):
    original = _params(BASE)
    fresh = _boxed(BASE, seed=9)
    with caplog.at_level(logging.INFO, logger="absl"):
        loaded = model.load_blip2_into(fresh, BASE, blip2_dir)
    assert isinstance(loaded["text_proj"]["kernel"], nn.LogicallyPartitioned)  # boxing kept
    loaded = nn.unbox(loaded)
    for name in ("qformer", "text_proj", "vision_proj"):
        chex.assert_trees_all_close(loaded[name], original[name], atol=0, rtol=0)
    assert loaded["temp"] == np.float32(BASE.tau_init)  # not in HF checkpoints: kept, and reported
    assert "kept as they were: ['temp']" in caplog.text
    assert "ignored: ['vision_model']" in caplog.text

    # Shared projection: only text_projection is read.
    shared = dataclasses.replace(BASE, share_projections=True)
    loaded = nn.unbox(model.load_blip2_into(_params(shared), shared, blip2_dir))
    chex.assert_trees_all_close(loaded["text_proj"], original["text_proj"], atol=0, rtol=0)


def test_load_blip2_errors(blip2_dir, tmp_path):
    params = _params(BASE)
    for config, message in [
        (dataclasses.replace(BASE, embed_dim=8), "embed_dim: checkpoint image_text_hidden_size 16, model 8"),
        (model.CSMCIRConfig.tiny(dataclasses.replace(QFORMER, layer_norm_eps=1e-6)), "layer_norm_eps"),
        (model.CSMCIRConfig.tiny(dataclasses.replace(QFORMER, num_query_tokens=4)), "num_query_tokens"),
        (model.CSMCIRConfig.tiny(), "num_hidden_layers: checkpoint 1, model 3"),
    ]:
        with pytest.raises(ValueError, match=message):
            model.load_blip2_into(params, config, blip2_dir)
    # An orphan tensor (CSMCIR's checkpoint has `token_importance`, spec §13.12): named, or logged if not strict.
    safetensors.numpy.save_file({"token_importance": np.ones(3, np.float32)}, str(tmp_path / "extra.safetensors"))
    for file in ("config.json", "model.safetensors"):
        (tmp_path / file).write_bytes(open(f"{blip2_dir}/{file}", "rb").read())
    with pytest.raises(ValueError, match=r"unexpected tensors \['token_importance'\]"):
        model.load_blip2_into(params, BASE, str(tmp_path))
    model.load_blip2_into(params, BASE, str(tmp_path), strict=False)
    # A params tree from another config.
    with pytest.raises(ValueError, match="params lack"):
        model.load_blip2_into(_params(dataclasses.replace(BASE, share_projections=True)), BASE, blip2_dir)


# ----------------------------------------------------------------------------------------------------------
# Frozen-ViT features.


def test_cache_image_features_matches_direct_calls_and_compiles_once(tmp_path):
    vision = vit.VisionTransformer(VISION)
    vision_params = _random_params(functools.partial(vit.init_params, VISION), seed=1)
    rng = np.random.RandomState(0)
    images = {name: rng.randn(VISION.image_size, VISION.image_size, 3).astype(np.float32) for name in "abcde"}
    traces = []

    @jax.jit
    def encode(batch):
        traces.append(batch.shape)
        return model.image_features(vision, vision_params, batch)

    ids = ["c", "a", "c", "b", "d", "e", "a"]  # 5 distinct: batches of 2, 2, 1 (+1 padding)
    cache = model.cache_image_features(encode, ids, images.__getitem__, batch_size=2)
    assert traces == [(2, VISION.image_size, VISION.image_size, 3)]
    assert cache.ids == ["c", "a", "b", "d", "e"] and len(cache) == 5
    assert cache.features.dtype == np.float16
    chex.assert_shape(cache.features, (5, VISION.num_positions, VISION.hidden_size))
    query = ["e", "a", "e"]
    direct = jax.jit(model.image_features, static_argnums=0)(
        vision, vision_params, np.stack([images[i] for i in query])
    )
    np.testing.assert_allclose(cache.lookup(query), direct, atol=2e-2, rtol=1e-2)  # fp16 storage
    with pytest.raises(ValueError, match=r"not in the feature cache, e.g. \['z'\]"):
        cache.lookup(["a", "z"])

    cache.save(str(tmp_path / "features.npy"))
    restored = model.FeatureCache.load(str(tmp_path / "features.npy"), mmap=True)
    np.testing.assert_array_equal(restored.lookup(query), cache.lookup(query))

    bad = dict(images, d=np.zeros((14, 14, 3), np.float32))
    with pytest.raises(ValueError, match=r"image 'd' has shape \(14, 14, 3\)"):
        model.cache_image_features(encode, ids, bad.__getitem__, batch_size=2)

    images_batch = np.stack([images["a"]])  # frozen: no gradient reaches the ViT
    vision_grads = jax.jit(jax.grad(lambda p: jnp.sum(model.image_features(vision, p, images_batch) ** 2)))(
        vision_params
    )
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(vision_grads))
