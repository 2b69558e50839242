"""Qwen2 / Qwen2.5 decoder-only LM: GQA with QKV bias, RoPE, RMSNorm, SwiGLU, and a fixed-size KV cache.

Matches `transformers.Qwen2ForCausalLM` (eager attention). Parameter layouts are chosen so HF conversion
(`hf_import.py`) is a transpose and a head split:

  embed_tokens/embedding        [vocab, hidden]             ("vocab", "embed")
  layers_i/self_attn/q_proj     kernel [hidden, heads, head_dim], bias [heads, head_dim]
  layers_i/self_attn/{k,v}_proj kernel [hidden, kv_heads, head_dim], bias [kv_heads, head_dim]
  layers_i/self_attn/o_proj     kernel [heads, head_dim, hidden]
  layers_i/mlp/{gate,up}_proj   kernel [hidden, inter];  mlp/down_proj kernel [inter, hidden]
  layers_i/{input,post_attention}_layernorm, norm   scale [hidden]
  lm_head                       kernel [hidden, vocab]      (only when embeddings are untied)

One code path serves full-sequence scoring, prefill and decode: keys live in "slots" (the sequence itself
without a cache, the cache slots with one), each key slot has a validity bit, and a query at slot q attends
to valid key slots s <= q. Positions are explicit (`positions_from_mask`), so left padding works.

`Qwen2Config.copy_head` (off for every released checkpoint) adds a pointer-generator output (See et al., 2017,
"Get To The Point"): one RoPE attention head over the final hidden states of the context puts its attention mass
on the context's token ids, and a sigmoid gate mixes that copy distribution with the LM head's softmax. It gives a
tiny policy trained from scratch on a CPU the copying that pretrained LLMs do with induction heads; with it the
"logits" the model returns are the log-probabilities of the mixture (already normalised).

  copy_head/{query,key}  kernel [hidden, head_dim];  copy_head/gate  kernel [hidden, 1], bias [1]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding

Array = jax.Array
DType = Any

# Logical axes of the KV cache's k/v `[layers, batch, max_len, kv_heads, head_dim]` and validity bits.
CACHE_AXES = ("layers", "batch", "length", "kv_heads", "kv")
CACHE_VALID_AXES = ("batch", "length")
COPY_CACHE_AXES = ("batch", "length", "kv")
_MASK_VALUE = float(np.finfo(np.float32).min)  # finite: fully masked rows give a uniform softmax, not NaN
_INIT_STDDEV = 0.02  # HF initializer_range


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Model shape (HF `config.json` field names) plus JAX-side fields: dtypes, remat and `logits_chunk_size`
    (0: `token_logprobs` materialises `[batch, seq, vocab]` logits at once; n > 0: n positions at a time, so a
    151k-token vocabulary never needs the full logits tensor in the forward or the backward pass)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    dtype: DType = jnp.float32  # activations
    param_dtype: DType = jnp.float32
    remat: bool = False  # rematerialise each decoder layer in the backward pass
    logits_chunk_size: int = 0
    copy_head: bool = False  # pointer-generator output (module docstring); not an HF field

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # jnp.float32, "bfloat16", ... -> np.dtype, so configs compare equal
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.logits_chunk_size < 0:
            raise ValueError(f"logits_chunk_size must be >= 0, got {self.logits_chunk_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # Shapes of the released checkpoints (HF config.json). max_position_embeddings follows the Instruct
    # releases (32768); some base checkpoints (1.5B, 7B) declare 131072. It does not change the weights.
    @classmethod
    def qwen2_5_0_5b(cls, **overrides: Any) -> Qwen2Config:
        return cls(**{**_PRESETS["qwen2_5_0_5b"], **overrides})

    @classmethod
    def qwen2_5_1_5b(cls, **overrides: Any) -> Qwen2Config:
        return cls(**{**_PRESETS["qwen2_5_1_5b"], **overrides})

    @classmethod
    def qwen2_5_3b(cls, **overrides: Any) -> Qwen2Config:
        return cls(**{**_PRESETS["qwen2_5_3b"], **overrides})

    @classmethod
    def qwen2_5_7b(cls, **overrides: Any) -> Qwen2Config:
        return cls(**{**_PRESETS["qwen2_5_7b"], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> Qwen2Config:
        """A seconds-to-compile model for tests (every dimension divisible by 2)."""
        return cls(**{**_PRESETS["tiny"], **overrides})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> Qwen2Config:
        """From an HF Qwen2 `config.json` dict (transformers 4.x or 5.x layout); `overrides` set JAX-side fields.

        Raises ValueError for features this implementation does not have (sliding window, RoPE scaling).
        """
        if d.get("model_type", "qwen2") != "qwen2":
            raise ValueError(f"config.json: model_type {d.get('model_type')!r} is not 'qwen2'")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        if d.get("use_sliding_window", False):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        rope = dict(d.get("rope_parameters") or {})
        scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
        if rope_type != "default":
            raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
        heads = int(d["num_attention_heads"])
        if d.get("head_dim") not in (None, int(d["hidden_size"]) // heads):
            raise ValueError(f"config.json: head_dim {d['head_dim']} != hidden_size / num_attention_heads")
        fields = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        )
        return cls(**{**fields, **overrides})

    def to_hf_dict(self, torch_dtype: DType | None = None) -> dict[str, Any]:
        """An HF `config.json` dict readable by transformers 4.x and 5.x (`torch_dtype` default: param_dtype)."""
        dtype_name = jnp.dtype(torch_dtype or self.param_dtype).name
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # transformers 4.x
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # transformers 5.x
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "attention_dropout": 0.0,
            "initializer_range": _INIT_STDDEV,
            "use_cache": True,
            "torch_dtype": dtype_name,  # transformers 4.x
            "dtype": dtype_name,  # transformers 5.x
        }


_QWEN2_5_COMMON = dict(rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768)
_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2_5_0_5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, **_QWEN2_5_COMMON,
    ),
    "qwen2_5_1_5b": dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, **_QWEN2_5_COMMON,
    ),
    "qwen2_5_3b": dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, **_QWEN2_5_COMMON,
    ),
    "qwen2_5_7b": dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, **_QWEN2_5_COMMON,
    ),
    "tiny": dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=512,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# KV cache.


@flax.struct.dataclass
class KVCache:
    """Fixed-size KV cache shared by all layers; every row writes at the same slot `end`.

    k, v:  `[layers, batch, max_len, kv_heads, head_dim]` (post-RoPE keys).
    valid: `[batch, max_len]` bool, which slots hold real (non-padding) tokens.
    end:   int32 scalar, the next slot to write.
    copy_k, tokens: with `copy_head`, the copy head's post-RoPE keys `[batch, max_len, head_dim]` and each slot's
      token id `[batch, max_len]` int32; None without it.
    """

    k: Array
    v: Array
    valid: Array
    end: Array
    copy_k: Array | None = None
    tokens: Array | None = None

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def next_positions(self) -> Array:
        """`[batch]` int32: RoPE position of each row's next token (its number of real tokens so far)."""
        return jnp.sum(self.valid, axis=1, dtype=jnp.int32)


def init_cache(config: Qwen2Config, batch: int, max_len: int, dtype: DType | None = None) -> KVCache:
    """An empty cache (`dtype` default: `config.dtype`). Jit it with `cache_shardings` to create it sharded."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    dtype = dtype or config.dtype
    copy = config.copy_head
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        valid=jnp.zeros((batch, max_len), bool),
        end=jnp.zeros((), jnp.int32),
        copy_k=jnp.zeros((batch, max_len, config.head_dim), dtype) if copy else None,
        tokens=jnp.zeros((batch, max_len), jnp.int32) if copy else None,
    )


def cache_shardings(mesh: Mesh, rules: sharding.Rules | None = None, *, copy_head: bool = False) -> KVCache:
    """NamedShardings of a `KVCache` from its logical axes (`CACHE_AXES`); `copy_head` as the config's."""
    kv = NamedSharding(mesh, sharding.logical_to_spec(CACHE_AXES, rules))
    valid = NamedSharding(mesh, sharding.logical_to_spec(CACHE_VALID_AXES, rules))
    copy_k = NamedSharding(mesh, sharding.logical_to_spec(COPY_CACHE_AXES, rules)) if copy_head else None
    return KVCache(k=kv, v=kv, valid=valid, end=NamedSharding(mesh, P()), copy_k=copy_k,
                   tokens=valid if copy_head else None)


def positions_from_mask(attention_mask: Array) -> Array:
    """RoPE positions `[batch, seq]` int32 for a (left-)padded `attention_mask` `[batch, seq]`: cumsum - 1."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ----------------------------------------------------------------------------------------------------------
# Building blocks.


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], axes: tuple[str, ...]) -> Array:
    """A parameter created with logical axis names, cast to the activation dtype."""
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, module.config.param_dtype)
    return jnp.asarray(value, module.config.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """HF `rotate_half` RoPE in fp32. x: `[batch, seq, heads, head_dim]`, positions: `[batch, seq]`."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask_for_slots(key_valid: Array, query_slots: Array) -> Array:
    """`[batch, seq, slots]` bool: query at slot `query_slots[t]` sees valid key slots s <= it.

    key_valid: `[batch, slots]` bool; query_slots: `[seq]` int32.
    """
    slots = jnp.arange(key_valid.shape[1], dtype=jnp.int32)
    causal = slots[None, :] <= query_slots[:, None]  # [seq, slots]
    return key_valid[:, None, :] & causal[None]


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention with an fp32 softmax.

    q: `[batch, seq, heads, head_dim]`; k, v: `[batch, slots, kv_heads, head_dim]`; mask: `[batch, seq, slots]`.
    Query head h uses kv head h // (heads / kv_heads), as HF's `repeat_kv`. Returns `[batch, seq, heads, head_dim]`.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, seq, heads, head_dim)


class RMSNorm(nn.Module):
    """HF Qwen2RMSNorm: normalise in fp32, cast back, scale. `[..., hidden] -> [..., hidden]`."""

    config: Qwen2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones_init(), (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.rms_norm_eps)
        return scale * normed.astype(self.config.dtype)


class Linear(nn.Module):
    """`einsum(equation, x, kernel)` (+ a bias over the kernel's output axes `kernel_shape[1:]`)."""

    config: Qwen2Config
    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.normal(_INIT_STDDEV)
        y = jnp.einsum(self.equation, x, _param(self, "kernel", init, self.kernel_shape, self.kernel_axes))
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros_init(), self.kernel_shape[1:], self.kernel_axes[1:])
        return y


def _write_cache(cache: KVCache, layer: int, k: Array, v: Array) -> tuple[KVCache, Array, Array]:
    """Writes `k, v` `[batch, seq, kv_heads, head_dim]` at slots `[end, end + seq)` of layer `layer`.

    Returns the updated cache and this layer's keys/values over all slots `[batch, max_len, kv_heads, head_dim]`.
    """
    start = (layer, 0, cache.end, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), start)
    cache_k = nn.with_logical_constraint(cache_k, CACHE_AXES)
    cache_v = nn.with_logical_constraint(cache_v, CACHE_AXES)
    return cache.replace(k=cache_k, v=cache_v), cache_k[layer].astype(k.dtype), cache_v[layer].astype(v.dtype)


class Attention(nn.Module):
    """GQA self-attention with QKV bias and RoPE; with a cache, attends over (and writes into) its slots."""

    config: Qwen2Config
    layer_index: int

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, cache: KVCache | None) -> tuple[Array, KVCache | None]:
        """x: `[batch, seq, hidden]`, positions: `[batch, seq]`, mask: `[batch, seq, slots]`.

        Returns `([batch, seq, hidden], cache)`.
        """
        cfg = self.config
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim, hidden = cfg.head_dim, cfg.hidden_size
        q_axes, kv_axes = ("batch", "length", "heads", "kv"), ("batch", "length", "kv_heads", "kv")

        def project(name: str, n: int, axes: tuple[str, str]) -> Array:
            shape, names = (hidden, n, head_dim), ("embed", *axes)
            return Linear(cfg, "bld,dhk->blhk", shape, names, use_bias=True, name=name)(x)

        q = project("q_proj", heads, ("heads", "kv"))
        k = project("k_proj", kv_heads, ("kv_heads", "kv"))
        v = project("v_proj", kv_heads, ("kv_heads", "kv"))
        q = nn.with_logical_constraint(rope(q, positions, cfg.rope_theta), q_axes)
        k = nn.with_logical_constraint(rope(k, positions, cfg.rope_theta), kv_axes)
        v = nn.with_logical_constraint(v, kv_axes)
        if cache is not None:
            cache, k, v = _write_cache(cache, self.layer_index, k, v)
        out = nn.with_logical_constraint(dot_product_attention(q, k, v, mask), q_axes)
        o_proj = Linear(cfg, "blhk,hkd->bld", (heads, head_dim, hidden), ("heads", "kv", "embed"), name="o_proj")
        return o_proj(out), cache


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`, `[batch, seq, hidden] -> [batch, seq, hidden]`."""

    config: Qwen2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        shape, axes = (cfg.hidden_size, cfg.intermediate_size), ("embed", "mlp")
        gate = Linear(cfg, "bld,df->blf", shape, axes, name="gate_proj")(x)
        up = Linear(cfg, "bld,df->blf", shape, axes, name="up_proj")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return Linear(cfg, "blf,fd->bld", shape[::-1], axes[::-1], name="down_proj")(h)


class DecoderLayer(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    config: Qwen2Config
    layer_index: int

    @nn.compact
    def __call__(self, x: Array, positions: Array, mask: Array, cache: KVCache | None) -> tuple[Array, KVCache | None]:
        cfg = self.config
        residual_axes = ("batch", "length", "embed")
        h, cache = Attention(cfg, self.layer_index, name="self_attn")(
            RMSNorm(cfg, name="input_layernorm")(x), positions, mask, cache
        )
        x = nn.with_logical_constraint(x + h, residual_axes)
        h = MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x))
        return nn.with_logical_constraint(x + h, residual_axes), cache


class CopyHead(nn.Module):
    """The pointer half of `copy_head`: one RoPE attention head over the context's final hidden states whose
    attention weights become a distribution over the attended tokens' ids, and the gate that mixes it in."""

    config: Qwen2Config

    @nn.compact
    def __call__(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """x: `[batch, seq, hidden]` final-norm hidden states; positions `[batch, seq]`.

        Returns post-RoPE queries and keys `[batch, seq, head_dim]` and the copy gate logit `[batch, seq]`.
        """
        cfg = self.config
        shape, axes = (cfg.hidden_size, 1, cfg.head_dim), ("embed", None, "kv")
        q = Linear(cfg, "bld,dhk->blhk", shape, axes, name="query")(x)
        k = Linear(cfg, "bld,dhk->blhk", shape, axes, name="key")(x)
        gate = Linear(cfg, "bld,dk->blk", (cfg.hidden_size, 1), ("embed", None), use_bias=True, name="gate")(x)
        return rope(q, positions, cfg.rope_theta)[:, :, 0], rope(k, positions, cfg.rope_theta)[:, :, 0], gate[..., 0]


def mix_copy_distribution(
    lm_logits: Array, queries: Array, keys: Array, key_tokens: Array, mask: Array, gate_logit: Array
) -> Array:
    """Log-probabilities `[batch, seq, vocab]` of `(1 - g) softmax(lm_logits) + g copy`, g = sigmoid(gate_logit).

    lm_logits `[batch, seq, vocab]`; queries `[batch, seq, d]`; keys `[batch, slots, d]`; key_tokens
    `[batch, slots]` int; mask `[batch, seq, slots]` bool (which slots each query may copy from); gate_logit
    `[batch, seq]`. copy[b, t, v] is the attention weight on the slots holding token v.
    """
    scores = jnp.einsum("btd,bsd->bts", queries, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(mask, scores * queries.shape[-1] ** -0.5, _MASK_VALUE)
    attention = jax.nn.softmax(scores, axis=-1)
    batch, seq, _ = attention.shape
    rows = jnp.arange(batch)[:, None, None]
    cols = jnp.arange(seq)[None, :, None]
    copy = jnp.zeros(lm_logits.shape, jnp.float32).at[rows, cols, key_tokens[:, None, :]].add(attention)
    gate = jax.nn.sigmoid(gate_logit.astype(jnp.float32))[..., None]
    mixture = (1.0 - gate) * jax.nn.softmax(lm_logits.astype(jnp.float32), axis=-1) + gate * copy
    return jnp.log(mixture + 1e-30)


class Qwen2LM(nn.Module):
    """Qwen2 causal LM. See the module docstring for the parameter tree."""

    config: Qwen2Config

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array,
        attention_mask: Array,
        cache: KVCache | None = None,
        *,
        return_hidden: bool = False,
        logits_start: int = 0,
    ) -> tuple[Array, KVCache | None]:
        """Logits for `tokens`, optionally appending them to `cache`.

        Args:
          tokens: `[batch, seq]` int32.
          positions: `[batch, seq]` int32 RoPE positions (`positions_from_mask`, continued while decoding).
          attention_mask: `[batch, seq]` bool, True for real tokens.
          cache: None for a full-sequence forward (causal over the real tokens of `tokens`). Otherwise the
            tokens go to slots `[end, end + seq)` (the caller keeps `end + seq <= max_len`:
            `dynamic_update_slice` would clamp silently) and attend to every valid earlier slot.
          return_hidden: return the final-norm hidden states `[batch, seq, hidden]` instead of the logits (score
            them with `lm_head_kernel` + `token_logprobs`, which never holds the whole `[batch, seq, vocab]`).
            Not with `copy_head` (its output needs the copy attention: use `logits_start`, or `score_tokens`).
          logits_start: static; the logits of positions `[logits_start, seq)` only.
        Returns:
          logits `[batch, seq - logits_start, vocab]` float32 (with `copy_head`, normalised log-probabilities), or
          the hidden states, and the cache with `end + seq` (None without a cache).
        """
        cfg = self.config
        seq = tokens.shape[1]
        attention_mask = attention_mask.astype(bool)
        if cache is None:
            key_valid, query_slots = attention_mask, jnp.arange(seq, dtype=jnp.int32)
        else:
            if seq > cache.max_len:
                raise ValueError(f"{seq} new tokens do not fit a cache of length {cache.max_len}")
            key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.end))
            key_valid = nn.with_logical_constraint(key_valid, CACHE_VALID_AXES)
            query_slots = cache.end + jnp.arange(seq, dtype=jnp.int32)
            cache = cache.replace(valid=key_valid)
        mask = attention_mask_for_slots(key_valid, query_slots)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), ("vocab", "embed")),
            name="embed_tokens",
        )
        x = nn.with_logical_constraint(embed(tokens), ("batch", "length", "embed"))
        layer_cls = nn.remat(DecoderLayer) if cfg.remat else DecoderLayer
        for i in range(cfg.num_hidden_layers):
            x, cache = layer_cls(cfg, i, name=f"layers_{i}")(x, positions, mask, cache)
        x = RMSNorm(cfg, name="norm")(x)
        if cfg.copy_head:
            if return_hidden:
                raise ValueError("return_hidden is not available with copy_head; use logits_start")
            copy_q, copy_k, gate_logit = CopyHead(cfg, name="copy_head")(x, positions)
            if cache is None:
                copy_keys, key_tokens = copy_k, tokens
            else:
                copy_keys = jax.lax.dynamic_update_slice(cache.copy_k, copy_k.astype(cache.copy_k.dtype),
                                                         (0, cache.end, 0))
                key_tokens = jax.lax.dynamic_update_slice(cache.tokens, tokens.astype(jnp.int32), (0, cache.end))
                cache = cache.replace(copy_k=copy_keys, tokens=key_tokens)
        x = x[:, logits_start:]

        if cfg.tie_word_embeddings:
            head, equation = jnp.asarray(embed.embedding, cfg.dtype), "bld,vd->blv"
        else:
            init = nn.initializers.normal(_INIT_STDDEV)
            head = _param(self, "lm_head", init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))
            equation = "bld,dv->blv"
        if cache is not None:
            cache = cache.replace(end=cache.end + seq)
        if return_hidden:
            return x, cache
        logits = jnp.einsum(equation, x, head, preferred_element_type=jnp.float32)
        if cfg.copy_head:
            logits = mix_copy_distribution(logits, copy_q[:, logits_start:], copy_keys.astype(copy_q.dtype),
                                           key_tokens, mask[:, logits_start:], gate_logit[:, logits_start:])
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits, cache


def lm_head_kernel(params: Any, config: Qwen2Config) -> Array:
    """The output projection `[hidden, vocab]` of (unboxed) `params`: the tied input embedding or `lm_head`."""
    if config.tie_word_embeddings:
        return jnp.asarray(params["embed_tokens"]["embedding"], config.dtype).T
    return jnp.asarray(params["lm_head"], config.dtype)


def token_logprobs(
    hidden: Array, head: Array, targets: Array, chunk_size: int = 0, *, with_entropy: bool = False
) -> tuple[Array, Array | None]:
    """fp32 `log softmax(hidden @ head)[targets]` per position, and optionally the entropy of each position.

    hidden: `[batch, len, hidden]` (the positions that predict `targets`); head: `[hidden, vocab]`; targets:
    `[batch, len]` int. `chunk_size > 0` scores `chunk_size` positions at a time under `jax.checkpoint`, so neither
    the forward nor the backward pass holds more than `[batch, chunk_size, vocab]` logits; 0 scores all at once.
    Returns (log-probs `[batch, len]`, entropy `[batch, len]` or None).
    """

    def score(h: Array, t: Array) -> tuple[Array, Array]:
        logits = jnp.einsum("bld,dv->blv", h, head, preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        log_norm = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0] - log_norm
        if not with_entropy:
            return picked, jnp.zeros_like(picked)
        probs = jnp.exp(logits - log_norm[..., None])
        return picked, log_norm - jnp.sum(probs * logits, axis=-1)

    length = targets.shape[1]
    if chunk_size <= 0 or chunk_size >= length:
        logprobs, entropy = score(hidden, targets)
    else:
        num_chunks = -(-length // chunk_size)
        pad = num_chunks * chunk_size - length
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        t = jnp.pad(targets, ((0, 0), (0, pad)))

        def to_chunks(x: Array) -> Array:  # [b, n * c, ...] -> [n, b, c, ...]
            return jnp.moveaxis(x.reshape(x.shape[0], num_chunks, chunk_size, *x.shape[2:]), 1, 0)

        logprobs, entropy = jax.lax.map(lambda ht: jax.checkpoint(score)(*ht), (to_chunks(h), to_chunks(t)))
        logprobs, entropy = (jnp.moveaxis(x, 0, 1).reshape(targets.shape[0], -1)[:, :length]
                             for x in (logprobs, entropy))
    return logprobs, entropy if with_entropy else None


def score_tokens(
    model: Qwen2LM, params: Any, tokens: Array, mask: Array, num_scored: int, *, with_entropy: bool = False
) -> tuple[Array, Array | None]:
    """fp32 log-probability (and optionally entropy) `[batch, num_scored]` of the last `num_scored` tokens of each
    row of `tokens` `[batch, seq]` given the tokens before them (`mask` `[batch, seq]` bool, left padding allowed).

    Projects only the scored positions onto the vocabulary (`logits_chunk_size` at a time without `copy_head`).
    """
    config = model.config
    seq = tokens.shape[1]
    if not 0 < num_scored < seq:
        raise ValueError(f"num_scored must be in [1, {seq - 1}], got {num_scored}")
    positions = positions_from_mask(mask)
    targets = tokens[:, seq - num_scored :]
    if config.copy_head:
        logits, _ = model.apply({"params": params}, tokens, positions, mask, logits_start=seq - num_scored - 1)
        log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1) if with_entropy else None
        return picked, entropy
    hidden, _ = model.apply({"params": params}, tokens, positions, mask, return_hidden=True)
    return token_logprobs(hidden[:, seq - num_scored - 1 : -1], lm_head_kernel(params, config), targets,
                          config.logits_chunk_size, with_entropy=with_entropy)


def init_params(config: Qwen2Config, rng: Array) -> Any:
    """Randomly initialised params (the `"params"` collection, `nn.LogicallyPartitioned` leaves).

    `jax.eval_shape(functools.partial(init_params, config), rng)` gives the abstract tree for
    `sharding.logical_shardings`; `sharding.sharded_init(functools.partial(init_params, config), rng, mesh=mesh)`
    creates them sharded.
    Apply with `Qwen2LM(config).apply({"params": params}, tokens, positions, attention_mask, cache)`.
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Qwen2LM(config).init(rng, tokens, tokens, tokens.astype(bool))["params"]


def param_count(params: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) params tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))
