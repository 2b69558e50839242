"""BART / mBART encoder-decoder and HF import/export: parity with transformers, KV cache, sharding, vocab growth."""

import dataclasses
import functools
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util

from jax_hd.core import sharding
from jax_hd.models import bart, hf_import

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Encoder batch of 4 (right, left and no padding), decoder right-padded.
SRC_MASK = np.array([[1] * 9, [1] * 6 + [0] * 3, [0] * 4 + [1] * 5, [1] * 2 + [0] * 7], bool)
TGT_MASK = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 6, [1] * 3 + [0] * 3], bool)
VARIANTS = {
    "bart": dict(scale_embedding=False, normalize_before=False),
    "mbart": dict(scale_embedding=True, normalize_before=True, activation_function="gelu_new"),
}


def _tokens(shape, seed=0, vocab=128):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@functools.cache
def _forward(config: bart.BartConfig):
    """Jitted teacher-forced forward -> logits `[batch, tgt, vocab]`."""
    model = bart.Bart(config)
    return jax.jit(lambda p, src, src_mask, tgt, tgt_mask: model.apply({"params": p}, src, src_mask, tgt, tgt_mask))


@functools.cache
def _encode(config: bart.BartConfig):
    model = bart.Bart(config)
    return jax.jit(lambda p, src, src_mask: model.apply({"params": p}, src, src_mask, method=bart.Bart.encode))


def _hf_classes(config: bart.BartConfig):
    if config.normalize_before:
        return transformers.MBartConfig, transformers.MBartForConditionalGeneration
    return transformers.BartConfig, transformers.BartForConditionalGeneration


def _hf_model(config: bart.BartConfig, seed: int):
    """A transformers model with every parameter and `final_logits_bias` randomised (norms around 1)."""
    config_cls, model_cls = _hf_classes(config)
    skip = ("architectures", "model_type", "torch_dtype")
    hf_config = config_cls(
        **{k: v for k, v in config.to_hf_dict().items() if k not in skip}, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    model = model_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
        model.final_logits_bias.copy_(torch.randn_like(model.final_logits_bias))
    return model


def _random_params(config: bart.BartConfig, seed: int):
    """Params of the model's shapes, every leaf random (LayerNorm scales around 1, biases non-zero)."""
    abstract = nn.unbox(jax.eval_shape(functools.partial(bart.init_params, config), jax.random.key(0)))
    rng = np.random.RandomState(seed)
    flat = {
        path: (1.0 if path[-1] == "scale" else 0.0) + 0.1 * rng.randn(*x.shape).astype(np.float32)
        for path, x in traverse_util.flatten_dict(abstract).items()
    }
    return jax.device_put(traverse_util.unflatten_dict(flat))


def _hf_logits(model, src, src_mask, tgt, tgt_mask):
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(src).long(),
            attention_mask=torch.from_numpy(src_mask).long(),
            decoder_input_ids=torch.from_numpy(tgt).long(),
            decoder_attention_mask=torch.from_numpy(tgt_mask).long(),
        )
    return out.logits.numpy()


def _ours(config, params, src, src_mask, tgt, tgt_mask):
    return np.asarray(_forward(config)(params, src, src_mask, tgt, tgt_mask))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (HF model, our config, dir written by HF's `save_pretrained`, our params loaded from it)."""

    @functools.cache
    def make(variant):
        config = bart.BartConfig.tiny(**VARIANTS[variant])
        model = _hf_model(config, seed=len(variant))
        path = str(tmp_path_factory.mktemp(f"hf_{variant}"))
        model.save_pretrained(path)
        loaded_config, params = hf_import.load_bart(path)
        return model, loaded_config, path, params

    return make


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def hf_checkpoint(request, checkpoints):
    """Both variants (parity tests)."""
    return checkpoints(request.param)


@pytest.fixture(scope="module")
def bart_checkpoint(checkpoints):
    """The BART variant (everything that does not depend on the layer layout)."""
    return checkpoints("bart")


def test_logits_match_transformers_with_padding(hf_checkpoint):
    model, config, _, params = hf_checkpoint
    src, tgt = _tokens(SRC_MASK.shape, seed=1), _tokens(TGT_MASK.shape, seed=2)
    ours = _ours(config, params, src, SRC_MASK, tgt, TGT_MASK)
    ref = _hf_logits(model, src, SRC_MASK, tgt, TGT_MASK)
    assert ours.dtype == np.float32 and ours.shape == (4, 6, config.vocab_size)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours[TGT_MASK], ref[TGT_MASK], atol=1e-4, rtol=0)
    assert np.abs(ref[TGT_MASK]).max() > 1.0  # a meaningful comparison
    # Padding changes the logits (the masks are used), and padded source tokens' ids do not matter.
    unpadded = _ours(config, params, src, np.ones_like(SRC_MASK), tgt, TGT_MASK)
    assert np.abs(unpadded[1] - ours[1]).max() > 1e-3
    other_pad = np.where(SRC_MASK, src, _tokens(src.shape, seed=9))
    np.testing.assert_allclose(_ours(config, params, other_pad, SRC_MASK, tgt, TGT_MASK), ours, atol=1e-5)


def test_encoder_hidden_states_match_transformers(hf_checkpoint):
    model, config, _, params = hf_checkpoint
    src = _tokens(SRC_MASK.shape, seed=3)
    ours = np.asarray(_encode(config)(params, src, SRC_MASK))
    with torch.no_grad():
        ref = model.get_encoder()(
            input_ids=torch.from_numpy(src).long(), attention_mask=torch.from_numpy(SRC_MASK).long()
        ).last_hidden_state.numpy()
    assert ours.shape == (4, 9, config.d_model)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_hf_checkpoint_loads_exactly(hf_checkpoint):
    model, config, _, params = hf_checkpoint
    assert config == bart.BartConfig.tiny(**VARIANTS["mbart" if config.normalize_before else "bart"])
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(params["shared"]["embedding"], state["model.shared.weight"])
    np.testing.assert_array_equal(params["final_logits_bias"], state["final_logits_bias"][0])
    q = params["decoder"]["layers_1"]["encoder_attn"]["q_proj"]
    np.testing.assert_array_equal(
        np.asarray(q["kernel"]).reshape(32, 32), state["model.decoder.layers.1.encoder_attn.q_proj.weight"].T
    )
    out = params["encoder"]["layers_0"]["self_attn"]["out_proj"]["kernel"]
    np.testing.assert_array_equal(
        np.asarray(out).reshape(32, 32), state["model.encoder.layers.0.self_attn.out_proj.weight"].T
    )
    assert ("layer_norm" in params["decoder"]) == config.normalize_before


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_bart_loads_in_transformers(variant, tmp_path):
    config = bart.BartConfig.tiny(**VARIANTS[variant])
    params = _random_params(config, seed=5)
    hf_import.save_bart(str(tmp_path), config, params, max_shard_bytes=40_000)
    assert os.path.exists(os.path.join(str(tmp_path), hf_import.SAFETENSORS_INDEX_FILE))  # sharded
    model = _hf_classes(config)[1].from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(model.config).__name__ == ("MBartConfig" if config.normalize_before else "BartConfig")
    src, tgt = _tokens(SRC_MASK.shape, seed=6), _tokens(TGT_MASK.shape, seed=7)
    ours = _ours(config, params, src, SRC_MASK, tgt, TGT_MASK)
    np.testing.assert_allclose(ours[TGT_MASK], _hf_logits(model, src, SRC_MASK, tgt, TGT_MASK)[TGT_MASK], atol=1e-4)
    np.testing.assert_array_equal(model.final_logits_bias.numpy()[0], np.asarray(params["final_logits_bias"]))
    _, again = hf_import.load_bart(str(tmp_path))
    chex.assert_trees_all_equal(again, jax.device_get(params))


def test_shift_tokens_right_matches_transformers():
    labels = np.array([[5, 6, 7, 2], [8, 9, -100, -100]], np.int64)
    ref = transformers.models.bart.modeling_bart.shift_tokens_right(torch.from_numpy(labels), 1, 2).numpy()
    np.testing.assert_array_equal(np.asarray(bart.shift_tokens_right(labels, 1, 2)), ref)


def test_cached_decoding_matches_teacher_forcing(bart_checkpoint):
    _, config, _, params = bart_checkpoint
    src, tgt = _tokens(SRC_MASK.shape, seed=8), _tokens((4, 5), seed=10)
    full = _ours(config, params, src, SRC_MASK, tgt, np.ones(tgt.shape, bool))
    model = bart.Bart(config)
    # Row r of the cache after each step takes row `rotate[r]`: another beam of the same batch element.
    rotate = (np.arange(12) // 3) * 3 + (np.arange(12) + 1) % 3

    @jax.jit
    def decode_stepwise(params, src, src_mask, tokens):
        encoder_hidden = model.apply({"params": params}, src, src_mask, method=bart.Bart.encode)
        step_fn, carry = bart.make_step_fn(model, params, encoder_hidden, src_mask, 6)  # one spare slot
        carry = bart.gather_cache(carry, jnp.repeat(jnp.arange(4), 3))  # batch rows -> 3 beams each

        def body(cache, column):
            logits, cache = step_fn(cache, jnp.repeat(column, 3))
            return bart.gather_cache(cache, rotate), logits

        cache, logits = jax.lax.scan(body, carry, tokens.T)
        return jnp.moveaxis(logits, 0, 1), cache

    logits, cache = decode_stepwise(params, src, SRC_MASK, tgt)
    np.testing.assert_allclose(np.asarray(logits), full.repeat(3, axis=0), atol=1e-5, rtol=0)
    assert cache.num_beams == 3 and int(cache.end) == 5
    assert cache.k.shape == (2, 12, 6, 4, 8) and cache.cross_k.shape == (2, 4, 9, 4, 8)  # cross K/V not per beam
    np.testing.assert_array_equal(np.asarray(cache.valid), np.arange(6)[None].repeat(12, 0) < 5)


def test_constrained_beam_search_top_beam_is_the_teacher_forced_score(bart_checkpoint):
    beam_search = pytest.importorskip("jax_hd.decoding.beam_search")
    prefix_tree = pytest.importorskip("jax_hd.decoding.prefix_tree")
    _, config, _, params = bart_checkpoint
    codes = np.array([[3, 1, 2], [3, 1, 0], [0, 2, 2], [1, 1, 1], [3, 0, 2]], np.int32)
    offsets = np.array([10, 20, 30])
    tree = prefix_tree.build_prefix_tree(codes, (4, 4, 4), vocab_size=config.vocab_size, level_offsets=offsets)
    valid = {tuple(c + offsets) for c in codes}
    model = bart.Bart(config)
    src = _tokens(SRC_MASK.shape, seed=11)

    @jax.jit
    def search(params, src, src_mask, tree):
        encoder_hidden = model.apply({"params": params}, src, src_mask, method=bart.Bart.encode)
        step_fn, carry = bart.make_step_fn(model, params, encoder_hidden, src_mask, 4)
        first_logits, carry = step_fn(carry, jnp.full((src.shape[0],), config.decoder_start_token_id, jnp.int32))
        return beam_search.beam_search(
            step_fn, carry, first_logits, num_beams=3, tree=tree, gather_fn=bart.gather_cache
        )

    out = search(params, src, SRC_MASK, tree)
    sequences, scores = np.asarray(out.sequences), np.asarray(out.scores)
    assert np.asarray(out.valid).all()
    assert all(tuple(s) in valid for s in sequences.reshape(-1, 3))
    # Teacher forcing on [start, id[0], id[1]] padded to TGT_MASK's shape (causal: the padding does not matter).
    tgt = np.concatenate([np.full((4, 1), config.decoder_start_token_id), sequences[:, 0, :2], _tokens((4, 3))], 1)
    logprobs = jax.nn.log_softmax(_ours(config, params, src, SRC_MASK, tgt.astype(np.int32), TGT_MASK)[:, :3])
    teacher = np.take_along_axis(np.asarray(logprobs), sequences[:, 0, :, None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(scores[:, 0], teacher, atol=1e-4)


def _rewrite(src, dst, edit):
    """Copies checkpoint dir `src` (single file) to `dst`, applying `edit(tensors)` to its tensors."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    edit(tensors)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    return str(dst)


def test_mismatched_checkpoints_name_the_tensor(bart_checkpoint, tmp_path):
    _, config, path, params = bart_checkpoint
    config_path = os.path.join(_rewrite(path, tmp_path / "ffn", lambda t: None), "config.json")
    json.dump({**json.load(open(config_path)), "encoder_ffn_dim": 48}, open(config_path, "w"))
    fc1 = "model.encoder.layers.0.fc1.weight"
    with pytest.raises(ValueError, match=rf"tensor {fc1} has shape \(64, 32\), expected \(48, 32\)"):
        hf_import.load_bart(os.path.dirname(config_path))

    k_bias = "model.decoder.layers.1.encoder_attn.k_proj.bias"
    missing = _rewrite(path, tmp_path / "missing", lambda t: t.pop(k_bias))
    with pytest.raises(ValueError, match=rf"missing tensor {k_bias} \(expected shape \(32,\)\)"):
        hf_import.load_bart(missing)

    extra = _rewrite(path, tmp_path / "extra", lambda t: t.update({"model.encoder.extra.weight": np.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.encoder.extra.weight'\]"):
        hf_import.load_bart(extra)

    bad_params = jax.tree.map(lambda x: x, params)
    bad_params["decoder"]["layers_0"]["fc2"]["bias"] = np.zeros(31, np.float32)
    with pytest.raises(ValueError, match=r"param decoder/layers_0/fc2/bias has shape \(31,\), config expects \(32,\)"):
        hf_import.save_bart(str(tmp_path / "bad"), config, bad_params)


def test_older_layouts_tied_copies_and_missing_bias(bart_checkpoint, tmp_path):
    _, _, path, params = bart_checkpoint

    def old_export(t):  # tied copies stored, no final_logits_bias, fairseq version buffers
        for name in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight"):
            t[name] = t["model.shared.weight"]
        t.pop("final_logits_bias")
        t["model.encoder.version"] = np.zeros(1, np.float32)

    _, loaded = hf_import.load_bart(_rewrite(path, tmp_path / "old", old_export))
    expected = {**jax.device_get(params), "final_logits_bias": np.zeros(128, np.float32)}
    chex.assert_trees_all_equal(loaded, expected)

    def only_a_copy(t):  # deduplicated tied weights kept under the encoder's name
        t["model.encoder.embed_tokens.weight"] = t.pop("model.shared.weight")

    _, loaded = hf_import.load_bart(_rewrite(path, tmp_path / "copy", only_a_copy))
    chex.assert_trees_all_equal(loaded, jax.device_get(params))


def test_extend_vocab_keeps_old_logits(bart_checkpoint):
    _, config, _, params = bart_checkpoint
    new_params, new_config = bart.extend_vocab(params, config, 20, jax.random.key(0), pad_to_multiple_of=8)
    assert new_config.vocab_size == 152 and new_config == dataclasses.replace(config, vocab_size=152)
    embedding = np.asarray(new_params["shared"]["embedding"])
    old = np.asarray(params["shared"]["embedding"])
    np.testing.assert_array_equal(embedding[:128], old)
    np.testing.assert_array_equal(np.asarray(new_params["final_logits_bias"])[128:], 0.0)
    # HF's mean resizing: N(mean, 1e-9 cov) samples, i.e. the mean up to ~3e-5 of the spread, but distinct.
    np.testing.assert_allclose(embedding[128:], np.broadcast_to(old.mean(0), (24, 32)), atol=1e-3 * old.std())
    assert np.abs(embedding[129] - embedding[128]).max() > 0
    assert params["shared"]["embedding"].shape == (128, 32)  # not modified in place

    src, tgt = _tokens(SRC_MASK.shape, seed=12), _tokens(TGT_MASK.shape, seed=13)
    before = _ours(config, params, src, SRC_MASK, tgt, TGT_MASK)
    after = _ours(new_config, new_params, src, SRC_MASK, tgt, TGT_MASK)
    assert after.shape == (4, 6, 152)
    np.testing.assert_allclose(after[..., :128], before, atol=1e-5, rtol=0)
    new_tokens = tgt.copy()
    new_tokens[:, 2] = 140  # a new (semantic-ID) token as decoder input works
    assert np.isfinite(_ours(new_config, new_params, src, SRC_MASK, new_tokens, TGT_MASK)).all()

    normal, _ = bart.extend_vocab(params, config, 1000, jax.random.key(1), init="normal")
    assert abs(float(np.std(np.asarray(normal["shared"]["embedding"])[128:])) - 0.02) < 2e-3
    with pytest.raises(ValueError, match="init 'zeros'"):
        bart.extend_vocab(params, config, 2, jax.random.key(1), init="zeros")


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_sharded_load_and_forward_match_single_device(bart_checkpoint, mesh, monkeypatch):
    _, config, path, params = bart_checkpoint
    abstract = jax.eval_shape(functools.partial(bart.init_params, config), jax.random.key(0))
    shardings = sharding.logical_shardings(abstract, mesh)
    with monkeypatch.context() as patch:  # sharded loading reads slices, never whole tensors
        patch.setattr(hf_import.SafetensorsDir, "get", lambda *a: pytest.fail("read a whole tensor"))
        _, sharded = hf_import.load_bart(path, shardings=shardings)
    layer = sharded["decoder"]["layers_0"]
    assert layer["encoder_attn"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert layer["fc1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert sharded["shared"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    chex.assert_trees_all_equal(jax.device_get(sharded), jax.device_get(params))

    src, tgt = _tokens(SRC_MASK.shape, seed=14), _tokens(TGT_MASK.shape, seed=15)
    expected = _ours(config, params, src, SRC_MASK, tgt, TGT_MASK)
    batch = sharding.shard_batch({"src": src, "src_mask": SRC_MASK, "tgt": tgt, "tgt_mask": TGT_MASK}, mesh)
    model = bart.Bart(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        logits = jax.jit(lambda p, b: model.apply({"params": p}, b["src"], b["src_mask"], b["tgt"], b["tgt_mask"]))(
            sharded, batch
        )

        @functools.partial(jax.jit, out_shardings=(None, bart.cache_shardings(mesh)))
        def first_step(p, b):
            encoder_hidden = model.apply({"params": p}, b["src"], b["src_mask"], method=bart.Bart.encode)
            step_fn, carry = bart.make_step_fn(model, p, encoder_hidden, b["src_mask"], 4)
            return step_fn(carry, b["tgt"][:, 0])

        step_logits, cache = first_step(sharded, batch)
    assert logits.sharding.spec[0] == ("data", "fsdp")
    assert cache.k.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), None, "tensor", None)
    np.testing.assert_allclose(np.asarray(logits)[TGT_MASK], expected[TGT_MASK], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(step_logits), expected[:, 0], atol=1e-5, rtol=0)


def test_dropout_is_off_by_default_and_seeded_when_on(bart_checkpoint):
    _, config, _, params = bart_checkpoint
    model = bart.Bart(dataclasses.replace(config, dropout=0.3, activation_dropout=0.2))
    src = _tokens(SRC_MASK.shape, seed=16)

    @jax.jit
    def run(rng):
        encode = functools.partial(model.apply, {"params": params}, src, SRC_MASK, method=bart.Bart.encode)
        return encode(), encode(deterministic=False, rngs={"dropout": rng})

    (default, a), (_, b), (_, c) = run(jax.random.key(0)), run(jax.random.key(0)), run(jax.random.key(1))
    np.testing.assert_allclose(default, _encode(config)(params, src, SRC_MASK), atol=1e-6)
    np.testing.assert_array_equal(a, b)
    assert (
        np.abs(np.asarray(a) - np.asarray(default)).max() > 1e-2 and np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-2
    )


def test_config_round_trip_presets_and_errors():
    for config in (bart.BartConfig.bart_base(), bart.BartConfig.tiny(normalize_before=True, scale_embedding=True)):
        assert bart.BartConfig.from_hf_dict(config.to_hf_dict()) == config
    with pytest.raises(ValueError, match="tie_word_embeddings=false"):
        bart.BartConfig.from_hf_dict({**bart.BartConfig.tiny().to_hf_dict(), "tie_word_embeddings": False})
    with pytest.raises(ValueError, match="model_type 't5'"):
        bart.BartConfig.from_hf_dict({**bart.BartConfig.tiny().to_hf_dict(), "model_type": "t5"})
    with pytest.raises(ValueError, match="not divisible by decoder_attention_heads 5"):
        bart.BartConfig.tiny(decoder_attention_heads=5)
    tiny = bart.BartConfig.tiny()
    abstract = nn.unbox(jax.eval_shape(functools.partial(bart.init_params, tiny), jax.random.key(0)))
    encoder_hidden, encoder_mask = jnp.zeros((1, 3, 32)), jnp.ones((1, 3), bool)
    for bad_len in (0, 65):
        with pytest.raises(ValueError, match=rf"max_decode_len {bad_len} not in \[1, 64\]"):
            jax.eval_shape(
                lambda p, n=bad_len: bart.make_step_fn(bart.Bart(tiny), p, encoder_hidden, encoder_mask, n)[1], abstract
            )


@pytest.mark.parametrize("preset", ["bart_base"])
def test_preset_parameter_counts_match_transformers(preset):
    config = getattr(bart.BartConfig, preset)()
    abstract = jax.eval_shape(functools.partial(bart.init_params, config), jax.random.key(0))
    with torch.device("meta"):
        model = _hf_classes(config)[1](
            _hf_classes(config)[0](
                **{
                    k: v
                    for k, v in config.to_hf_dict().items()
                    if k not in ("architectures", "model_type", "torch_dtype")
                }
            )
        )
    hf_count = sum(p.numel() for p in model.parameters()) + model.final_logits_bias.numel()
    assert bart.param_count(abstract) == hf_count
    assert 139_000_000 < bart.param_count(abstract) < 141_000_000  # "~140M"
