"""BLIP-2 ViT and Q-Former: parity with transformers on every path, HF import/export, sharding, presets."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.models import hf_import, qformer, vit

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # max abs difference to transformers (fp32)
BATCH = 4  # divisible by data * fsdp of the test mesh
TEXT_LEN = 6
VISION = vit.ViTConfig.tiny()
QFORMER = qformer.QFormerConfig.tiny()
# Right-padded text (BERT tokenizers pad right): lengths 6, 4, 2, 5.
TEXT_MASK = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 5 + [0]], np.int32)
# Image-feature padding (HF and LAVIS pass all ones; masked keys must still be ignored).
IMAGE_MASK = np.ones((BATCH, VISION.num_positions), np.int32)
IMAGE_MASK[1, -5:] = 0
IMAGE_MASK[3, 3:9] = 0


@functools.cache
def _vision_fn(config: vit.ViTConfig):
    return jax.jit(lambda params, images: vit.VisionTransformer(config).apply({"params": params}, images))


@functools.cache
def _qformer_fn(config: qformer.QFormerConfig):
    """Jitted `QFormer.__call__` by keyword; which inputs are given selects the path (one compile each)."""
    model = qformer.QFormer(config)

    def forward(params, **inputs):
        return model.apply({"params": params}, **inputs)

    return jax.jit(forward)


def _max_diff(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)))


def _report(name: str, diff: float) -> None:
    print(f"[blip2 parity] {name}: max abs diff {diff:.3g}")  # shown with `pytest -s`
    assert diff <= TOLERANCE, f"{name}: max abs diff {diff} > {TOLERANCE}"


@pytest.fixture(scope="module")
def hf_model():
    """A tiny `Blip2ForImageTextRetrieval` (the `Salesforce/blip2-itm-vit-g` layout: ViT, query tokens,
    text embeddings, Q-Former with the text branch, heads) with every parameter randomised: norms around 1,
    biases non-zero, including the k third of the ViT's `qkv.bias` (which our model drops)."""
    hf_config = transformers.Blip2Config(
        vision_config=VISION.to_hf_dict(),
        qformer_config=QFORMER.to_hf_dict(),
        num_query_tokens=QFORMER.num_query_tokens,
        image_text_hidden_size=16,
    )
    torch.manual_seed(0)
    model = transformers.Blip2ForImageTextRetrieval(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name.lower() and name.endswith("weight")
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if is_norm else 0.0))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("blip2_hf"))
    hf_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(hf_dir):
    vision_config, vision_params = hf_import.load_blip2_vision(hf_dir)
    qformer_config, qformer_params = hf_import.load_blip2_qformer(hf_dir)
    return vision_config, vision_params, qformer_config, qformer_params


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    images = rng.randn(BATCH, VISION.image_size, VISION.image_size, 3).astype(np.float32)
    input_ids = rng.randint(1, QFORMER.vocab_size, (BATCH, TEXT_LEN)).astype(np.int32)
    input_ids[TEXT_MASK == 0] = QFORMER.pad_token_id
    image_features = rng.randn(BATCH, VISION.num_positions, VISION.hidden_size).astype(np.float32)
    return dict(images=images, input_ids=input_ids, image_features=image_features)


def _t(x: np.ndarray):
    return torch.from_numpy(np.asarray(x))


def _hf_qformer(model, query_tokens, input_ids, text_mask, image_features, image_mask) -> np.ndarray:
    """HF's three Q-Former passes as `Blip2ForImageTextRetrieval` makes them (ITM: queries + text with
    `query_length`; ITC text: `query_length=0`; ITC image: query tokens only)."""
    with torch.no_grad():
        ids = None if input_ids is None else _t(input_ids).long()
        embeddings = model.embeddings(input_ids=ids, query_embeds=query_tokens)
        num_queries = 0 if query_tokens is None else query_tokens.shape[1]
        mask = None
        if text_mask is not None:
            mask = _t(text_mask).long()
            if num_queries:
                mask = torch.cat([torch.ones(mask.shape[0], num_queries, dtype=torch.long), mask], dim=1)
        out = model.qformer(
            query_embeds=embeddings,
            query_length=num_queries,
            attention_mask=mask,
            encoder_hidden_states=None if image_features is None else _t(image_features),
            encoder_attention_mask=None if image_mask is None else _t(image_mask).long(),
        )
    return out.last_hidden_state.numpy()


def test_configs_round_trip_through_hf(loaded):
    vision_config, _, qformer_config, _ = loaded
    assert vision_config == VISION
    assert qformer_config == QFORMER
    assert vit.ViTConfig.from_hf_dict(VISION.to_hf_dict()) == VISION
    assert qformer.QFormerConfig.from_hf_dict(QFORMER.to_hf_dict(), num_query_tokens=8) == QFORMER
    # HF's defaults are ViT-g/14 and the BLIP-2 Q-Former (minus the text branch and [DEC]).
    assert vit.ViTConfig.from_hf_dict({}) == vit.ViTConfig.eva_vit_g()
    assert qformer.QFormerConfig.from_hf_dict(transformers.Blip2Config().to_dict()) == qformer.QFormerConfig.blip2(
        vocab_size=30522, use_qformer_text_input=False
    )


def test_vision_matches_transformers(hf_model, loaded, inputs):
    vision_config, vision_params, _, _ = loaded
    ours = _vision_fn(vision_config)(vision_params, inputs["images"])
    chex.assert_shape(ours, (BATCH, VISION.num_positions, VISION.hidden_size))
    with torch.no_grad():
        theirs = hf_model.vision_model(pixel_values=_t(inputs["images"].transpose(0, 3, 1, 2))).last_hidden_state
    _report("vision last_hidden_state", _max_diff(ours, theirs.numpy()))


def test_qformer_query_path_matches_transformers(hf_model, loaded, inputs):
    _, _, config, params = loaded
    ours = _qformer_fn(config)(params, image_features=inputs["image_features"], image_attention_mask=IMAGE_MASK)
    chex.assert_shape(ours, (BATCH, QFORMER.num_query_tokens, QFORMER.hidden_size))
    query_tokens = hf_model.query_tokens.expand(BATCH, -1, -1)
    theirs = _hf_qformer(hf_model, query_tokens, None, None, inputs["image_features"], IMAGE_MASK)
    _report("Q-Former queries (masked image)", _max_diff(ours, theirs))


def test_qformer_multimodal_path_matches_transformers(hf_model, loaded, inputs):
    """Queries + text: HF's layout (queries first, text positions from 0, one LayerNorm over the
    concatenation, query/text feed-forward routing) is LAVIS's; both are checked against HF here.

    Without an image mask: HF builds the cross-attention mask for all `num_query + text_len` rows, which
    fails to broadcast against the query-only cross-attention unless the mask is all ones (then HF drops it),
    as in every BLIP-2 head. The query path test covers a padded image mask.
    """
    _, _, config, params = loaded
    ours = _qformer_fn(config)(
        params, input_ids=inputs["input_ids"], text_attention_mask=TEXT_MASK, image_features=inputs["image_features"]
    )
    chex.assert_shape(ours, (BATCH, QFORMER.num_query_tokens + TEXT_LEN, QFORMER.hidden_size))
    query_tokens = hf_model.query_tokens.expand(BATCH, -1, -1)
    theirs = _hf_qformer(hf_model, query_tokens, inputs["input_ids"], TEXT_MASK, inputs["image_features"], None)
    _report("Q-Former queries + text", _max_diff(ours, theirs))


def test_qformer_text_path_matches_transformers(hf_model, loaded, inputs):
    _, _, config, params = loaded
    ours = _qformer_fn(config)(params, input_ids=inputs["input_ids"], text_attention_mask=TEXT_MASK)
    chex.assert_shape(ours, (BATCH, TEXT_LEN, QFORMER.hidden_size))
    theirs = _hf_qformer(hf_model, None, inputs["input_ids"], TEXT_MASK, None, None)
    _report("Q-Former text only", _max_diff(ours, theirs))


def test_image_text_scores_match_transformers(hf_model, hf_dir, loaded, inputs):
    """End to end through `Blip2ForImageTextRetrieval.forward`: ViT -> Q-Former -> heads, ITM and ITC."""
    vision_config, vision_params, config, params = loaded
    heads = hf_import.load_blip2_heads(hf_dir)
    assert sorted(heads) == ["itm_head", "text_projection", "vision_projection"]
    image_embeds = _vision_fn(vision_config)(vision_params, inputs["images"])
    forward = _qformer_fn(config)
    dense = lambda x, head: x @ heads[head]["kernel"] + heads[head]["bias"]  # noqa: E731
    normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731

    multimodal = np.asarray(
        forward(params, input_ids=inputs["input_ids"], text_attention_mask=TEXT_MASK, image_features=image_embeds)
    )
    itm = dense(multimodal[:, : config.num_query_tokens], "itm_head").mean(axis=1)
    all_ones = np.ones(image_embeds.shape[:2], np.int32)  # what HF passes
    query_out = np.asarray(forward(params, image_features=image_embeds, image_attention_mask=all_ones))
    image_feats = normalize(dense(query_out, "vision_projection"))
    text = np.asarray(forward(params, input_ids=inputs["input_ids"], text_attention_mask=TEXT_MASK))
    text_feat = normalize(dense(text[:, 0], "text_projection"))
    itc = np.einsum("iqd,td->itq", image_feats, text_feat).max(-1)

    hf_inputs = dict(
        pixel_values=_t(inputs["images"].transpose(0, 3, 1, 2)),
        input_ids=_t(inputs["input_ids"]).long(),
        attention_mask=_t(TEXT_MASK).long(),
    )
    with torch.no_grad():
        hf_itm = hf_model(**hf_inputs, use_image_text_matching_head=True).logits_per_image.numpy()
        hf_itc = hf_model(**hf_inputs, use_image_text_matching_head=False).logits_per_image.numpy()
    _report("ITM logits", _max_diff(itm, hf_itm))
    _report("ITC similarities", _max_diff(itc, hf_itc))


def test_state_dict_round_trip(hf_model, hf_dir, loaded):
    """Our params -> HF names and layouts reproduce the checkpoint (the ViT's k bias is written as zeros)."""
    vision_config, vision_params, qformer_config, qformer_params = loaded
    heads = hf_import.load_blip2_heads(hf_dir)
    ours = hf_import.blip2_state_dict(vision_config, vision_params, qformer_config, qformer_params, heads)
    theirs = {name: t.numpy() for name, t in hf_model.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    for name, expected in theirs.items():
        if name.endswith("self_attn.qkv.bias"):
            expected = expected.copy()
            expected[VISION.hidden_size : 2 * VISION.hidden_size] = 0
        np.testing.assert_array_equal(ours[name], expected, err_msg=name)
    # A state dict loads like a directory.
    _, params = hf_import.load_blip2_qformer(ours, config=qformer_config)
    chex.assert_trees_all_equal(params, qformer_params)


def test_saved_checkpoint_loads_in_transformers(loaded, inputs, hf_dir, tmp_path):
    vision_config, vision_params, qformer_config, qformer_params = loaded
    heads = hf_import.load_blip2_heads(hf_dir)
    hf_import.save_blip2(str(tmp_path), vision_config, vision_params, qformer_config, qformer_params, heads=heads)
    model = transformers.Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        theirs = model.vision_model(pixel_values=_t(inputs["images"].transpose(0, 3, 1, 2))).last_hidden_state
    ours = _vision_fn(vision_config)(vision_params, inputs["images"])
    _report("vision after save_blip2 -> from_pretrained", _max_diff(ours, theirs.numpy()))
    assert vit.ViTConfig.from_hf_dict(model.config.to_dict()) == vision_config
    assert qformer.QFormerConfig.from_hf_dict(model.config.to_dict()) == qformer_config


def test_mismatched_tensors_name_the_key(hf_model, loaded):
    vision_config, _, qformer_config, _ = loaded
    state = {name: t.numpy() for name, t in hf_model.state_dict().items()}
    key = "qformer.encoder.layer.2.crossattention.attention.key.weight"  # [hidden, encoder_hidden] = [32, 48]
    wrong = dict(state, **{key: np.zeros((32, 47), np.float32)})
    with pytest.raises(ValueError, match=rf"{key} has shape \(32, 47\), expected \(32, 48\)"):
        hf_import.load_blip2_qformer(wrong, config=qformer_config)
    key = "vision_model.encoder.layers.1.self_attn.qkv.bias"
    missing = {name: x for name, x in state.items() if name != key}
    with pytest.raises(ValueError, match=rf"missing tensor {key} \(expected shape \(144,\)\)"):
        hf_import.load_blip2_vision(missing, config=vision_config)
    # Text-branch tensors are unexpected for a query-only config; other models' tensors are ignored.
    with pytest.raises(ValueError, match=r"unexpected tensors \['embeddings.position_embeddings.weight'"):
        hf_import.load_blip2_qformer(state, config=dataclasses.replace(qformer_config, use_qformer_text_input=False))
    with pytest.raises(ValueError, match="needs `config`"):
        hf_import.load_blip2_vision(state)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_sharded_load_and_forward_match_single_device(hf_dir, loaded, inputs, mesh):
    vision_config, vision_params, qformer_config, qformer_params = loaded
    single_vision = _vision_fn(vision_config)(vision_params, inputs["images"])
    single_query = _qformer_fn(qformer_config)(
        qformer_params, input_ids=inputs["input_ids"], text_attention_mask=TEXT_MASK, image_features=single_vision
    )

    abstract_vision = jax.eval_shape(functools.partial(vit.init_params, vision_config), jax.random.key(0))
    abstract_qformer = jax.eval_shape(functools.partial(qformer.init_params, qformer_config), jax.random.key(0))
    vision_shardings = sharding.logical_shardings(abstract_vision, mesh)
    qformer_shardings = sharding.logical_shardings(abstract_qformer, mesh)
    _, sharded_vision = hf_import.load_blip2_vision(hf_dir, shardings=vision_shardings)
    _, sharded_qformer = hf_import.load_blip2_qformer(hf_dir, shardings=qformer_shardings)
    qkv = sharded_vision["layers_0"]["self_attn"]["qkv"]["kernel"]
    assert qkv.sharding.spec == P("fsdp", None, "tensor", None)  # [embed, 3, heads, kv]
    assert sharded_qformer["embeddings"]["word_embeddings"]["embedding"].sharding.spec == P("tensor", "fsdp")
    chex.assert_trees_all_equal(jax.device_get(sharded_vision), jax.device_get(vision_params))
    chex.assert_trees_all_equal(jax.device_get(sharded_qformer), jax.device_get(qformer_params))

    def forward(vision_params, qformer_params, images, input_ids, text_mask):
        features = vit.VisionTransformer(vision_config).apply({"params": vision_params}, images)
        return qformer.QFormer(qformer_config).apply(
            {"params": qformer_params}, input_ids=input_ids, text_attention_mask=text_mask, image_features=features
        )

    batch = sharding.shard_batch((inputs["images"], inputs["input_ids"], TEXT_MASK), mesh)
    out_sharding = sharding.batch_sharding(mesh, 3)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        sharded = jax.jit(forward, out_shardings=out_sharding)(sharded_vision, sharded_qformer, *batch)
    assert sharded.sharding.spec == P(("data", "fsdp"), None, None)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single_query), atol=1e-5, rtol=0)


_FIRST_LAYER = ("query_tokens", "embeddings", "layernorm", "layer_0")


def _one_layer(config: qformer.QFormerConfig, params):
    """The first layer alone (cross-attention, both feed-forwards): the same code paths, a third of the compile."""
    return dataclasses.replace(config, num_hidden_layers=1), {k: v for k, v in params.items() if k in _FIRST_LAYER}


def test_remat_gives_the_same_gradients(loaded, inputs):
    """Remat recomputes each layer in the backward pass: same values and gradients."""
    config, params = _one_layer(*loaded[2:])
    features = inputs["image_features"]

    def loss(params, config):
        return jnp.sum(qformer.QFormer(config).apply({"params": params}, image_features=features) ** 2)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    plain, remat = grad(params, config), grad(params, dataclasses.replace(config, remat=True))
    chex.assert_trees_all_close(remat, plain, atol=1e-4, rtol=1e-4)


def test_dropout_and_frozen_backbone(loaded, inputs):
    vision_config, vision_params = loaded[:2]
    config, params = _one_layer(*loaded[2:])
    features = inputs["image_features"]

    @jax.jit
    def dropped(params, rng):
        model = qformer.QFormer(config)
        return model.apply({"params": params}, image_features=features, deterministic=False, rngs={"dropout": rng})

    # Different dropout rngs, different outputs. ("rbg" keys: XLA:CPU compiles their bits 4x faster than threefry's.)
    one, two = (dropped(params, jax.random.key(seed, impl="rbg")) for seed in (1, 2))
    assert _max_diff(one, two) > 1e-2

    frozen_config = dataclasses.replace(vision_config, frozen=True)

    def vision_loss(params):
        return jnp.sum(vit.VisionTransformer(frozen_config).apply({"params": params}, inputs["images"]) ** 2)

    grads = jax.jit(jax.grad(vision_loss))(vision_params)
    assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_invalid_inputs_raise(loaded, inputs):
    vision_config, vision_params, config, params = loaded

    def trace(module, params, *args, **kwargs):  # shapes only: the checks run while tracing
        return jax.eval_shape(lambda: module.apply({"params": params}, *args, **kwargs))

    with pytest.raises(ValueError, match=r"images must be \[batch, 28, 28, 3\]"):
        trace(vit.VisionTransformer(vision_config), vision_params, inputs["images"][:, :14])
    model = qformer.QFormer(config)
    override = np.zeros((4, config.hidden_size), np.float32)
    with pytest.raises(ValueError, match="queries need image features"):
        trace(model, params, query_tokens_override=override, input_ids=inputs["input_ids"])
    with pytest.raises(ValueError, match="disagree on the batch size"):
        trace(model, params, input_ids=inputs["input_ids"][:2], image_features=inputs["image_features"])
    with pytest.raises(ValueError, match=r"attention mask has shape \(4, 5\), expected \(4, 6\)"):
        trace(model, params, input_ids=inputs["input_ids"], text_attention_mask=TEXT_MASK[:, :5])
    with pytest.raises(ValueError, match="use_qformer_text_input=False"):
        trace(
            qformer.QFormer(dataclasses.replace(config, use_qformer_text_input=False)),
            params,
            input_ids=inputs["input_ids"],
        )


def test_query_tokens_override(loaded, inputs):
    """An override replaces the learned queries (per example, any number of them)."""
    _, _, config, params = loaded
    features = inputs["image_features"]
    learned = np.broadcast_to(np.asarray(params["query_tokens"]), (BATCH, config.num_query_tokens, config.hidden_size))
    override = np.concatenate([learned[:2], np.random.RandomState(1).randn(*learned[2:].shape)]).astype(np.float32)
    forward = _qformer_fn(config)
    out = forward(params, query_tokens_override=override, image_features=features, image_attention_mask=IMAGE_MASK)
    default = forward(params, image_features=features, image_attention_mask=IMAGE_MASK)
    np.testing.assert_allclose(out[:2], default[:2], atol=1e-6)
    assert _max_diff(out[2:], default[2:]) > 1e-2
    three = jax.eval_shape(
        lambda: qformer.QFormer(config).apply(
            {"params": params}, query_tokens_override=override[0, :3], image_features=features
        )
    )
    chex.assert_shape(three, (BATCH, 3, config.hidden_size))


# Expected counts from the architecture (`vit.expected_param_count`, `qformer.expected_param_count`):
#   ViT-g/14: patch 14*14*3*1408 + 1408, class 1408, positions 257*1408, 39 layers of
#     qkv 1408*4224 + q/v bias 2*1408 + projection 1408^2 + 1408 + fc1 1408*6144 + 6144 + fc2 6144*1408 + 1408
#     + 2 LayerNorms 4*1408 (= 25,248,768 each), post LayerNorm 2*1408            -> 985,897,344
#     (HF counts 39*1408 = 54,912 more: the always-zero k third of `qkv.bias`    -> 985,952,256)
#   Q-Former (BLIP-2): 12 layers of self-attention 2,363,904 + 2 feed-forwards of 4,723,968, 6 cross-attentions
#     of 3,346,944 (k/v from 1408), 32*768 queries, LayerNorm, word 30523*768 + position 512*768 embeddings
#                                                                                 -> 185,684,736
#     without the text branch (HF's captioning checkpoints)                      -> 105,162,240
@pytest.mark.parametrize(
    "config, count",
    [
        (vit.ViTConfig.eva_vit_g(), 985_897_344),
        (qformer.QFormerConfig.blip2(), 185_684_736),
        (qformer.QFormerConfig.blip2(use_qformer_text_input=False), 105_162_240),
    ],
    ids=["eva_vit_g", "qformer_blip2", "qformer_blip2_query_only"],
)
def test_preset_parameter_counts(config, count):
    module = vit if isinstance(config, vit.ViTConfig) else qformer
    abstract = jax.eval_shape(functools.partial(module.init_params, config), jax.random.key(0))
    assert vit.param_count(abstract) == module.expected_param_count(config) == count
