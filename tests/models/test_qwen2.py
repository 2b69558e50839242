"""Qwen2 LM and HF import/export: parity with transformers, KV cache, sharded loading, validation, presets."""

import copy
import dataclasses
import functools
import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.models import hf_import, qwen2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Left-padded batch of 3: lengths 8, 5, 3.
MASK = np.array([[1] * 8, [0] * 3 + [1] * 5, [0] * 5 + [1] * 3], bool)


@functools.cache
def _forward(config: qwen2.Qwen2Config):
    """Jitted full-sequence forward -> logits `[batch, seq, vocab]`."""
    model = qwen2.Qwen2LM(config)
    return jax.jit(lambda params, tokens, positions, mask: model.apply({"params": params}, tokens, positions, mask)[0])


@functools.cache
def _step(config: qwen2.Qwen2Config):
    """Jitted cached forward -> (logits, cache); compiles once per `seq`."""
    model = qwen2.Qwen2LM(config)
    return jax.jit(
        lambda params, tokens, positions, mask, cache: model.apply({"params": params}, tokens, positions, mask, cache)
    )


def _tokens(shape, seed=0, vocab=128):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def _ours(config, params, tokens, mask):
    positions = qwen2.positions_from_mask(mask)
    return np.asarray(_forward(config)(params, tokens, positions, mask))


def _hf_logits(model, tokens, mask):
    positions = np.array(qwen2.positions_from_mask(mask))
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(tokens).long(),
            attention_mask=torch.from_numpy(mask).long(),
            position_ids=torch.from_numpy(positions).long(),
        )
    return out.logits.numpy()


def _hf_model(config: qwen2.Qwen2Config, seed: int):
    """A transformers Qwen2 model with every parameter randomised (norms around 1, biases non-zero)."""
    hf_config = transformers.Qwen2Config(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")},
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def _random_params(config: qwen2.Qwen2Config, seed: int):
    """Params of the model's shapes, every leaf random (norm scales around 1, biases non-zero)."""
    abstract = nn.unbox(jax.eval_shape(functools.partial(qwen2.init_params, config), jax.random.key(0)))
    rng = np.random.RandomState(seed)
    flat = {
        path: (1.0 if path[-1] == "scale" else 0.0) + 0.1 * rng.randn(*x.shape).astype(np.float32)
        for path, x in traverse_util.flatten_dict(abstract).items()
    }
    return jax.device_put(traverse_util.unflatten_dict(flat))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_checkpoint(request, tmp_path_factory):
    """(HF model, checkpoint dir written by `save_pretrained`); the untied one is split into several shards."""
    tied = request.param
    config = qwen2.Qwen2Config.tiny(tie_word_embeddings=tied)
    model = _hf_model(config, seed=int(tied))
    path = str(tmp_path_factory.mktemp("hf_tied" if tied else "hf_untied"))
    model.save_pretrained(path, **({} if tied else {"max_shard_size": "40KB"}))
    return model, path


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory):
    config = qwen2.Qwen2Config.tiny(tie_word_embeddings=False)
    model = _hf_model(config, seed=7)
    path = str(tmp_path_factory.mktemp("hf_single"))
    model.save_pretrained(path)
    return model, path


def test_logits_match_transformers_with_left_padding(hf_checkpoint):
    model, path = hf_checkpoint
    config, params = hf_import.load_qwen2(path)
    assert config.tie_word_embeddings == model.config.tie_word_embeddings
    assert ("lm_head" in params) != config.tie_word_embeddings
    if not config.tie_word_embeddings:  # the importer read HF's own sharded layout
        weight_map = json.load(open(os.path.join(path, hf_import.SAFETENSORS_INDEX_FILE)))["weight_map"]
        assert len(set(weight_map.values())) > 2
    tokens = _tokens(MASK.shape)
    ours = _ours(config, params, tokens, MASK)
    ref = _hf_logits(model, tokens, MASK)
    assert ours.dtype == np.float32 and ours.shape == (3, 8, config.vocab_size)
    assert np.isfinite(ours).all()  # padding rows are harmless
    np.testing.assert_allclose(ours[MASK], ref[MASK], atol=1e-4, rtol=0)
    assert np.abs(ref[MASK]).max() > 1.0  # a meaningful comparison


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_through_transformers(tied, tmp_path):
    config = qwen2.Qwen2Config.tiny(tie_word_embeddings=tied)
    params = _random_params(config, seed=3)
    ours_dir, hf_dir = str(tmp_path / "ours"), str(tmp_path / "hf")
    hf_import.save_qwen2(ours_dir, config, params, max_shard_bytes=30_000)
    assert os.path.exists(os.path.join(ours_dir, hf_import.SAFETENSORS_INDEX_FILE))

    model = transformers.Qwen2ForCausalLM.from_pretrained(ours_dir, attn_implementation="eager").eval()
    assert model.config.tie_word_embeddings == tied
    tokens = _tokens(MASK.shape, seed=1)
    np.testing.assert_allclose(
        _ours(config, params, tokens, MASK)[MASK], _hf_logits(model, tokens, MASK)[MASK], atol=1e-4, rtol=0
    )

    model.save_pretrained(hf_dir)
    loaded_config, loaded = hf_import.load_qwen2(hf_dir)
    assert loaded_config == config
    chex.assert_trees_all_equal(loaded, jax.device_get(params))


def test_bfloat16_checkpoints(untied_checkpoint, tmp_path):
    model = copy.deepcopy(untied_checkpoint[0]).to(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "hf_bf16"))
    config, params = hf_import.load_qwen2(str(tmp_path / "hf_bf16"))
    assert config.param_dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    up = model.model.layers[1].mlp.up_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["layers_1"]["mlp"]["up_proj"]["kernel"], np.float32), up.T)

    hf_import.save_qwen2(str(tmp_path / "ours_bf16"), config, params)
    with safetensors.safe_open(str(tmp_path / "ours_bf16" / "model.safetensors"), framework="numpy") as f:
        assert f.get_tensor("model.norm.weight").dtype == ml_dtypes.bfloat16
    _, again = hf_import.load_qwen2(str(tmp_path / "ours_bf16"), dtype=jnp.float32)
    chex.assert_trees_all_equal(again, jax.tree.map(lambda x: np.asarray(x, np.float32), params))


def test_cached_decoding_matches_full_forward(untied_checkpoint):
    _, path = untied_checkpoint
    config, params = hf_import.load_qwen2(path)
    prompt_mask = np.array([[1] * 6, [0] * 2 + [1] * 4, [0] * 4 + [1] * 2], bool)
    num_new = 4
    mask = np.concatenate([prompt_mask, np.ones((3, num_new), bool)], axis=1)
    tokens = _tokens(mask.shape, seed=2)
    positions = np.asarray(qwen2.positions_from_mask(mask))
    full = _ours(config, params, tokens, mask)

    step = _step(config)
    cache = qwen2.init_cache(config, batch=3, max_len=12)
    logits, cache = step(params, tokens[:, :6], positions[:, :6], prompt_mask, cache)
    np.testing.assert_allclose(np.asarray(logits)[prompt_mask], full[:, :6][prompt_mask], atol=1e-5, rtol=0)
    for t in range(6, 6 + num_new):
        np.testing.assert_array_equal(np.asarray(cache.next_positions()), positions[:, t])
        logits, cache = step(params, tokens[:, t : t + 1], positions[:, t : t + 1], mask[:, t : t + 1], cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5, rtol=0)
    assert int(cache.end) == 10
    np.testing.assert_array_equal(np.asarray(cache.valid), np.pad(mask, ((0, 0), (0, 2))))
    assert step._cache_size() == 2  # one prefill and one decode compilation


def test_tensor_map_slices_match_the_full_conversion():
    rng = np.random.RandomState(0)
    cases = [  # (map, flax shape, flax index)
        (hf_import.TensorMap("q", (1, 0), (1, 2)), (8, 4, 3), (slice(2, 6), slice(1, 3), slice(None))),
        (hf_import.TensorMap("o", (1, 0), (2, 1)), (4, 3, 8), (slice(0, 2), slice(1, 3), slice(4, 8))),
        (hf_import.TensorMap("b", (), (2,)), (4, 3), (slice(2, 4), slice(None))),
        (hf_import.TensorMap("e"), (6, 8), (slice(3, 6), slice(0, 4))),
    ]
    for m, flax_shape, index in cases:
        hf = rng.randn(*m.hf_shape(flax_shape)).astype(np.float32)
        np.testing.assert_array_equal(m.read(hf, flax_shape, index), m.to_flax(hf, flax_shape)[index])
        np.testing.assert_array_equal(m.to_hf(m.to_flax(hf, flax_shape)), hf)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_sharded_load_save_and_forward(untied_checkpoint, mesh, monkeypatch, tmp_path):
    _, path = untied_checkpoint
    config, params = hf_import.load_qwen2(path)
    abstract = jax.eval_shape(functools.partial(qwen2.init_params, config), jax.random.key(0))
    shardings = sharding.logical_shardings(abstract, mesh)
    with monkeypatch.context() as patch:  # sharded loading reads slices, never whole tensors
        patch.setattr(hf_import.SafetensorsDir, "get", lambda *a: pytest.fail("read a whole tensor"))
        _, sharded = hf_import.load_qwen2(path, shardings=shardings)

    flat_shardings = traverse_util.flatten_dict(shardings)
    for key, x in traverse_util.flatten_dict(sharded).items():
        assert x.sharding == flat_shardings[key], key
    layer = sharded["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert layer["self_attn"]["k_proj"]["bias"].sharding.spec == P("tensor", None)
    assert layer["self_attn"]["o_proj"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
    assert sharded["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert sharded["lm_head"].sharding.spec == P("fsdp", "tensor")
    q_shards = layer["self_attn"]["q_proj"]["kernel"].addressable_shards
    assert {s.data.shape for s in q_shards} == {(32, 2, 16)}
    chex.assert_trees_all_equal(jax.device_get(sharded), jax.device_get(params))
    hf_import.save_qwen2(str(tmp_path / "from_sharded"), config, sharded)
    chex.assert_trees_all_equal(hf_import.load_qwen2(str(tmp_path / "from_sharded"))[1], jax.device_get(params))

    mask = np.concatenate([MASK, MASK[1:2]])  # a batch of 4 divides data * fsdp
    tokens = _tokens(mask.shape, seed=4)
    positions = np.asarray(qwen2.positions_from_mask(mask))
    expected = _ours(config, params, tokens, mask)
    batch = sharding.shard_batch({"tokens": tokens, "positions": positions, "mask": mask}, mesh)
    model = qwen2.Qwen2LM(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        logits = jax.jit(lambda p, b: model.apply({"params": p}, b["tokens"], b["positions"], b["mask"])[0])(
            sharded, batch
        )
        cache_shardings = qwen2.cache_shardings(mesh)
        cache = jax.jit(functools.partial(qwen2.init_cache, config, 4, 12), out_shardings=cache_shardings)()
        prefill = jax.jit(
            lambda p, b, c: model.apply({"params": p}, b["tokens"], b["positions"], b["mask"], c),
            out_shardings=(None, cache_shardings),
        )
        cached_logits, cache = prefill(sharded, batch, cache)
    assert logits.sharding.spec[0] == ("data", "fsdp")
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    np.testing.assert_allclose(np.asarray(logits)[mask], expected[mask], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cached_logits)[mask], expected[mask], atol=1e-5, rtol=0)


def test_remat_gives_the_same_logits_and_gradients(untied_checkpoint):
    _, path = untied_checkpoint
    config, params = hf_import.load_qwen2(path)
    tokens = _tokens(MASK.shape, seed=5)
    positions = qwen2.positions_from_mask(MASK)

    def loss_and_grad(cfg):
        def loss(p):
            logits, _ = qwen2.Qwen2LM(cfg).apply({"params": p}, tokens, positions, MASK)
            return jnp.mean(jnp.where(MASK[..., None], jax.nn.log_softmax(logits), 0.0))

        return jax.jit(jax.value_and_grad(loss))(params)

    chex.assert_trees_all_close(
        loss_and_grad(dataclasses.replace(config, remat=True)), loss_and_grad(config), atol=1e-6, rtol=1e-4
    )


def _rewrite(src, dst, edit):
    """Copies checkpoint dir `src` (single file) to `dst`, applying `edit(tensors)` to its tensors."""
    shutil.copytree(src, dst)
    file = os.path.join(dst, "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    edit(tensors)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    return str(dst)


def test_mismatched_checkpoints_name_the_tensor(untied_checkpoint, tmp_path):
    _, path = untied_checkpoint
    up = "model.layers.1.mlp.up_proj.weight"
    missing = _rewrite(path, tmp_path / "missing", lambda t: t.pop(up))
    with pytest.raises(ValueError, match=rf"missing tensor {up} \(expected shape \(128, 64\)\)"):
        hf_import.load_qwen2(missing)

    bias = "model.layers.0.self_attn.k_proj.bias"
    wrong = _rewrite(path, tmp_path / "wrong", lambda t: t.update({bias: np.zeros(16, np.float32)}))
    with pytest.raises(ValueError, match=rf"tensor {bias} has shape \(16,\), expected \(32,\)"):
        hf_import.load_qwen2(wrong)

    extra = _rewrite(path, tmp_path / "extra", lambda t: t.update({"model.layers.0.extra.weight": np.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.0.extra.weight'\]"):
        hf_import.load_qwen2(extra)

    ignorable = _rewrite(
        path, tmp_path / "ignorable", lambda t: t.update({"model.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    )
    hf_import.load_qwen2(ignorable)

    config_path = os.path.join(_rewrite(path, tmp_path / "config", lambda t: None), "config.json")
    hf_config = json.load(open(config_path))
    json.dump({**hf_config, "intermediate_size": 96}, open(config_path, "w"))
    gate = "model.layers.0.mlp.gate_proj.weight"
    with pytest.raises(ValueError, match=rf"tensor {gate} has shape \(128, 64\), expected \(96, 64\)"):
        hf_import.load_qwen2(os.path.dirname(config_path))


def test_tied_checkpoint_ignores_a_stray_lm_head(tmp_path):
    config = qwen2.Qwen2Config.tiny(tie_word_embeddings=True)
    params = _random_params(config, seed=0)
    hf_import.save_qwen2(str(tmp_path / "tied"), config, params)
    stray = _rewrite(tmp_path / "tied", tmp_path / "stray", lambda t: t.update({"lm_head.weight": np.ones((128, 64))}))
    _, loaded = hf_import.load_qwen2(stray)
    chex.assert_trees_all_equal(loaded, jax.device_get(params))


def test_config_round_trip_and_unsupported_features():
    config = qwen2.Qwen2Config.qwen2_5_7b()
    assert qwen2.Qwen2Config.from_hf_dict(config.to_hf_dict()) == config
    legacy = {k: v for k, v in config.to_hf_dict().items() if k != "rope_parameters"}  # transformers 4.x layout
    assert qwen2.Qwen2Config.from_hf_dict(legacy, remat=True) == dataclasses.replace(config, remat=True)
    with pytest.raises(ValueError, match="use_sliding_window"):
        qwen2.Qwen2Config.from_hf_dict({**config.to_hf_dict(), "use_sliding_window": True})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        qwen2.Qwen2Config.from_hf_dict({**legacy, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="not divisible by num_key_value_heads"):
        qwen2.Qwen2Config.tiny(num_key_value_heads=3)


def _expected_count(c: qwen2.Qwen2Config) -> int:
    hd = c.head_dim
    attention = (
        c.hidden_size * c.num_attention_heads * hd * 2  # q, o
        + c.hidden_size * 2 * c.num_key_value_heads * hd  # k, v
        + (c.num_attention_heads + 2 * c.num_key_value_heads) * hd  # q, k, v biases
    )
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return embeddings + c.num_hidden_layers * layer + c.hidden_size


@pytest.mark.parametrize(
    "preset, count",
    [
        ("qwen2_5_0_5b", 494_032_768),
        ("qwen2_5_1_5b", 1_543_714_304),
        ("qwen2_5_3b", 3_085_938_688),
        ("qwen2_5_7b", 7_615_616_512),
    ],
)
def test_preset_parameter_counts(preset, count):
    config = getattr(qwen2.Qwen2Config, preset)()
    abstract = jax.eval_shape(functools.partial(qwen2.init_params, config), jax.random.key(0))
    assert qwen2.param_count(abstract) == _expected_count(config) == count


def test_bfloat16_activations_track_float32(untied_checkpoint):
    _, path = untied_checkpoint
    config, params = hf_import.load_qwen2(path)
    bf16 = dataclasses.replace(config, dtype=jnp.bfloat16)
    tokens = _tokens(MASK.shape, seed=6)
    logits = _ours(bf16, params, tokens, MASK)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits[MASK], _ours(config, params, tokens, MASK)[MASK], atol=0.1)
    cache = qwen2.init_cache(bf16, batch=3, max_len=8)
    assert cache.k.dtype == jnp.bfloat16
    cached, _ = _step(bf16)(params, tokens, qwen2.positions_from_mask(MASK), MASK, cache)
    np.testing.assert_allclose(np.asarray(cached)[MASK], logits[MASK], atol=0.05)


def test_load_tokenizer_reads_a_local_directory(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(str(tmp_path))
    assert hf_import.load_tokenizer(str(tmp_path))("hello world there")["input_ids"] == [1, 2, 0]


@pytest.mark.parametrize("tied", [False, True])
def test_chunked_token_logprobs_match_full_logits(tied):
    """`token_logprobs` over hidden states (any chunking, incl. a ragged last chunk) == log_softmax of the full
    logits, for values, entropies and gradients."""
    config = qwen2.Qwen2Config.tiny(tie_word_embeddings=tied)
    params = _random_params(config, seed=11)
    tokens = _tokens(MASK.shape, seed=12)
    positions = qwen2.positions_from_mask(MASK)
    model = qwen2.Qwen2LM(config)

    def reference(p):
        logits, _ = model.apply({"params": p}, tokens, positions, MASK)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]
        return picked, -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)

    def chunked(p, chunk):
        hidden, _ = model.apply({"params": p}, tokens, positions, MASK, return_hidden=True)
        return qwen2.token_logprobs(hidden[:, :-1], qwen2.lm_head_kernel(p, config), tokens[:, 1:], chunk,
                                    with_entropy=True)

    def objective(fn):
        def weighted(p):
            logprobs, entropy = fn(p)
            return jnp.sum(logprobs) + 0.3 * jnp.sum(entropy)

        return jax.jit(jax.value_and_grad(weighted))

    want = jax.jit(reference)(params)
    want_grad = objective(reference)(params)
    for chunk in (0, 3, MASK.shape[1] - 1):
        chex.assert_trees_all_close(jax.jit(functools.partial(chunked, chunk=chunk))(params), want, atol=2e-5)
        chex.assert_trees_all_close(objective(functools.partial(chunked, chunk=chunk))(params), want_grad,
                                    atol=2e-5, rtol=1e-4)
    no_entropy = qwen2.token_logprobs(jnp.zeros((1, 2, config.hidden_size)), jnp.zeros((config.hidden_size, 5)),
                                      jnp.zeros((1, 2), jnp.int32))
    assert no_entropy[1] is None
    np.testing.assert_allclose(no_entropy[0], np.full((1, 2), -np.log(5.0)), rtol=1e-6)
    with pytest.raises(ValueError, match="logits_chunk_size"):
        qwen2.Qwen2Config.tiny(logits_chunk_size=-1)
