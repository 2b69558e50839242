"""BART encoder-decoder (`transformers.BartForConditionalGeneration`), optionally mBART's pre-LN variant.

Matches HF (eager attention, fp32): token embeddings shared by encoder, decoder and the tied LM head (times
`sqrt(d_model)` with `scale_embedding`), learned positions with BART's offset of 2 (position p reads row
p + 2), `layernorm_embedding`, post-LN layers (`normalize_before=True`: mBART's pre-LN layers plus a final
`layer_norm` in encoder and decoder), exact-erf GELU, logits `hidden @ shared.T + final_logits_bias`.
Parameter layouts are chosen so HF conversion (`hf_import.load_bart`) is a transpose and a head split:

  shared/embedding                               [vocab, d_model]           ("vocab", "embed")
  final_logits_bias                              [vocab]                    ("vocab",)
  {encoder,decoder}/embed_positions/embedding    [max_positions + 2, d]     (None, "embed")
  {encoder,decoder}/layernorm_embedding          scale, bias [d]
  {encoder,decoder}/layer_norm                   scale, bias [d]            (normalize_before only)
  .../layers_i/{self_attn,encoder_attn}/{q,k,v}_proj   kernel [d, heads, head_dim], bias [heads, head_dim]
  .../layers_i/{self_attn,encoder_attn}/out_proj       kernel [heads, head_dim, d], bias [d]
  .../layers_i/fc1 kernel [d, ffn], bias [ffn];  fc2 kernel [ffn, d], bias [d]
  .../layers_i/{self_attn,encoder_attn,final}_layer_norm   scale, bias [d]

Decoding keeps a `BartCache`: a preallocated self-attention KV cache (`[layers, rows, max_len, heads, head_dim]`,
rows = batch * beams) and the cross-attention K/V computed once from the encoder output, stored per batch
element (`[layers, batch, src_len, heads, head_dim]`), not per beam. Decoder positions follow HF: the t-th
decoder token (t counted from 0, padding included) has position t.

Dropout (`dropout` after embeddings, attention and FFN outputs; `activation_dropout` inside the FFN) runs when
`deterministic=False` with a `"dropout"` rng; `attention_dropout` (on attention probabilities) is not applied.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding
from jax_hd.models import bert, qwen2

Array = jax.Array
DType = Any

POSITION_OFFSET = 2  # BART/mBART learned positions: position p reads embedding row p + 2
CACHE_AXES = qwen2.CACHE_AXES  # ("layers", "batch", "length", "kv_heads", "kv")
CACHE_MASK_AXES = ("batch", "length")
_INIT_STDDEV = 0.02  # HF init_std
_MODEL_TYPES = {False: "bart", True: "mbart"}  # by normalize_before
_ARCHITECTURES = {False: "BartForConditionalGeneration", True: "MBartForConditionalGeneration"}


@dataclasses.dataclass(frozen=True)
class BartConfig:
    """Model shape and special tokens (HF `config.json` field names) plus JAX-side fields.

    `normalize_before` is mBART (HF `model_type: "mbart"`); `layer_norm_eps` is torch's `nn.LayerNorm` default.
    """

    vocab_size: int
    d_model: int
    encoder_layers: int
    decoder_layers: int
    encoder_attention_heads: int
    decoder_attention_heads: int
    encoder_ffn_dim: int
    decoder_ffn_dim: int
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = False
    normalize_before: bool = False
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2
    decoder_start_token_id: int = 2
    dropout: float = 0.1
    activation_dropout: float = 0.0
    attention_dropout: float = 0.0  # kept for the HF round trip; not applied
    layer_norm_eps: float = 1e-5
    dtype: DType = jnp.float32  # activations (LayerNorm statistics, softmax and logits are fp32)
    param_dtype: DType = jnp.float32
    tie_word_embeddings: bool = True  # False: a separate `lm_head [vocab, d_model]` (not in HF BART checkpoints)

    def __post_init__(self):
        for name in ("dtype", "param_dtype"):  # jnp.float32, "bfloat16", ... -> np.dtype, so configs compare equal
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)))
        for heads_field in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, heads_field)
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} not divisible by {heads_field} {heads}")
        if self.activation_function not in bert._ACTIVATIONS:
            raise ValueError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"choose from {sorted(bert._ACTIVATIONS)}"
            )

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0

    @classmethod
    def bart_base(cls, **overrides: Any) -> BartConfig:
        """facebook/bart-base (768-d, 6+6 layers, 12 heads, ~140M params): OneSearch's online backbone."""
        return cls(**{**_PRESETS["bart_base"], **overrides})

    @classmethod
    def bart_large(cls, **overrides: Any) -> BartConfig:
        """facebook/bart-large (1024-d, 12+12 layers, 16 heads)."""
        return cls(**{**_PRESETS["bart_large"], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> BartConfig:
        """A seconds-to-compile model for tests (every dimension divisible by 2)."""
        return cls(**{**_PRESETS["tiny"], **overrides})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> BartConfig:
        """From an HF BART / mBART `config.json` dict; `overrides` set JAX-side fields (dtype, param_dtype).

        Raises ValueError for variants this implementation does not have (untied embeddings).
        """
        model_type = d.get("model_type", "bart")
        if model_type not in _MODEL_TYPES.values():
            raise ValueError(f"config.json: model_type {model_type!r} is not 'bart' or 'mbart'")
        if not d.get("tie_word_embeddings", True):
            raise ValueError("config.json: tie_word_embeddings=false is not supported (shared embeddings only)")
        eos = d.get("eos_token_id", 2)
        fields = dict(
            vocab_size=int(d["vocab_size"]),
            d_model=int(d["d_model"]),
            encoder_layers=int(d["encoder_layers"]),
            decoder_layers=int(d["decoder_layers"]),
            encoder_attention_heads=int(d["encoder_attention_heads"]),
            decoder_attention_heads=int(d["decoder_attention_heads"]),
            encoder_ffn_dim=int(d["encoder_ffn_dim"]),
            decoder_ffn_dim=int(d["decoder_ffn_dim"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 1024)),
            activation_function=str(d.get("activation_function", "gelu")),
            scale_embedding=bool(d.get("scale_embedding", False)),
            normalize_before=model_type == "mbart",
            pad_token_id=int(d.get("pad_token_id", 1)),
            bos_token_id=int(d.get("bos_token_id", 0)),
            eos_token_id=int(eos[0] if isinstance(eos, (list, tuple)) else eos),
            decoder_start_token_id=int(d.get("decoder_start_token_id", 2)),
            dropout=float(d.get("dropout", 0.1)),
            activation_dropout=float(d.get("activation_dropout", 0.0)),
            attention_dropout=float(d.get("attention_dropout", 0.0)),
        )
        return cls(**{**fields, **overrides})

    def to_hf_dict(self, torch_dtype: DType | None = None) -> dict[str, Any]:
        """An HF `config.json` dict for `(M)BartForConditionalGeneration` (`torch_dtype` default: param_dtype)."""
        if not self.tie_word_embeddings:
            raise ValueError("an untied lm_head (tie_word_embeddings=False) has no HF BART counterpart")
        dtype_name = jnp.dtype(torch_dtype or self.param_dtype).name
        return {
            "architectures": [_ARCHITECTURES[self.normalize_before]],
            "model_type": _MODEL_TYPES[self.normalize_before],
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "encoder_layers": self.encoder_layers,
            "decoder_layers": self.decoder_layers,
            "encoder_attention_heads": self.encoder_attention_heads,
            "decoder_attention_heads": self.decoder_attention_heads,
            "encoder_ffn_dim": self.encoder_ffn_dim,
            "decoder_ffn_dim": self.decoder_ffn_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "activation_function": self.activation_function,
            "scale_embedding": self.scale_embedding,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "forced_eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "dropout": self.dropout,
            "activation_dropout": self.activation_dropout,
            "attention_dropout": self.attention_dropout,
            "encoder_layerdrop": 0.0,
            "decoder_layerdrop": 0.0,
            "init_std": _INIT_STDDEV,
            "is_encoder_decoder": True,
            "tie_word_embeddings": True,
            "use_cache": True,
            "torch_dtype": dtype_name,  # transformers 4.x
            "dtype": dtype_name,  # transformers 5.x
        }


_PRESETS: dict[str, dict[str, Any]] = {
    "bart_base": dict(
        vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
    ),
    "bart_large": dict(
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024,
    ),
    "tiny": dict(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        dropout=0.0,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Cache.


@flax.struct.dataclass
class BartCache:
    """Decoder state for incremental decoding; every row writes its self-attention K/V at the same slot `end`.

    k, v:        `[decoder_layers, rows, max_len, heads, head_dim]` self-attention keys/values (rows = batch * beams,
                 row b * beams + j is beam j of batch element b).
    valid:       `[rows, max_len]` bool, which self-attention slots hold real tokens.
    end:         int32 scalar, the next slot to write (= the next decoder position).
    cross_k, cross_v: `[decoder_layers, batch, src_len, heads, head_dim]` cross-attention keys/values.
    cross_mask:  `[batch, src_len]` bool, the encoder's attention mask.
    """

    k: Array
    v: Array
    valid: Array
    end: Array
    cross_k: Array
    cross_v: Array
    cross_mask: Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def num_beams(self) -> int:
        return self.k.shape[1] // self.cross_k.shape[1]


def cache_shardings(mesh: Mesh, rules: sharding.Rules | None = None) -> BartCache:
    """NamedShardings of a `BartCache` from its logical axes (`CACHE_AXES`, `CACHE_MASK_AXES`)."""
    kv = NamedSharding(mesh, sharding.logical_to_spec(CACHE_AXES, rules))
    mask = NamedSharding(mesh, sharding.logical_to_spec(CACHE_MASK_AXES, rules))
    return BartCache(k=kv, v=kv, valid=mask, end=NamedSharding(mesh, P()), cross_k=kv, cross_v=kv, cross_mask=mask)


def gather_cache(cache: BartCache, rows: Array) -> BartCache:
    """The cache with self-attention rows `rows` `[n]` (expanding a `batch`-row cache to its beams, or reordering
    beams by parent): `beam_search.beam_search(..., gather_fn=gather_cache)`.

    The cross-attention K/V stay per batch element, so with `n = batch * beams` row b * beams + j must take a
    row of batch element b (`[b * beams0, (b + 1) * beams0)` of a cache with `beams0` beams per element).
    """
    return cache.replace(
        k=jnp.take(cache.k, rows, axis=1), v=jnp.take(cache.v, rows, axis=1), valid=jnp.take(cache.valid, rows, axis=0)
    )


def shift_tokens_right(labels: Array, pad_token_id: int, decoder_start_token_id: int) -> Array:
    """HF's `shift_tokens_right`: `[batch, seq]` -> `[start, labels[:, :-1]]`, with -100 replaced by `pad_token_id`.

    (mBART's variant, which rotates the last non-pad token to the front, is not this one.)
    """
    labels = jnp.asarray(labels)
    start = jnp.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
    shifted = jnp.concatenate([start, labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, pad_token_id, shifted)


# ----------------------------------------------------------------------------------------------------------
# Building blocks. Linear, LayerNorm and the attention kernels are those of `bert.py` / `qwen2.py`.


def _cross_attention(q: Array, k: Array, v: Array, key_mask: Array) -> Array:
    """q: `[batch * beams, seq, heads, head_dim]`; k, v: `[batch, src, heads, head_dim]`; key_mask `[batch, src]`.

    The beams of one batch element attend to its encoder states. Returns `[batch * beams, seq, heads, head_dim]`.
    """
    rows, seq, heads, head_dim = q.shape
    batch = k.shape[0]
    if rows % batch:
        raise ValueError(f"{rows} decoder rows are not a multiple of the encoder batch {batch}")
    out = bert.dot_product_attention(q.reshape(batch, rows // batch * seq, heads, head_dim), k, v, key_mask)
    return out.reshape(rows, seq, heads, head_dim)


class Attention(nn.Module):
    """BART multi-head attention projections (all with biases); the attention itself is done by the caller."""

    config: BartConfig
    num_heads: int

    def setup(self):
        cfg = self.config
        head_dim = cfg.d_model // self.num_heads
        shape, axes = (cfg.d_model, self.num_heads, head_dim), ("embed", "heads", "kv")
        proj = functools.partial(bert.Linear, cfg, "bld,dhk->blhk", shape, axes, bias_rank=2)
        self.q_proj, self.k_proj, self.v_proj = proj(), proj(), proj()
        self.out_proj = bert.Linear(cfg, "blhk,hkd->bld", shape[1:] + shape[:1], axes[1:] + axes[:1])

    def query(self, x: Array) -> Array:
        """`[batch, seq, d] -> [batch, seq, heads, head_dim]`."""
        return nn.with_logical_constraint(self.q_proj(x), ("batch", "length", "heads", "kv"))

    def key_value(self, x: Array) -> tuple[Array, Array]:
        """`[batch, seq, d] -> ([batch, seq, heads, head_dim],) * 2`."""
        axes = ("batch", "length", "heads", "kv")
        return nn.with_logical_constraint(self.k_proj(x), axes), nn.with_logical_constraint(self.v_proj(x), axes)

    def output(self, out: Array) -> Array:
        """`[batch, seq, heads, head_dim] -> [batch, seq, d]`."""
        return self.out_proj(nn.with_logical_constraint(out, ("batch", "length", "heads", "kv")))


def _dropout(module: nn.Module, x: Array, rate: float, deterministic: bool) -> Array:
    """Inverted dropout with the module's `"dropout"` rng (a function, so setup-style modules can use it)."""
    if deterministic or rate == 0.0:
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _ffn_linears(config: BartConfig, ffn_dim: int) -> tuple[Callable[..., bert.Linear], Callable[..., bert.Linear]]:
    """Constructors of `fc1` `[d, ffn]` and `fc2` `[ffn, d]` (the caller names them)."""
    shape, axes = (config.d_model, ffn_dim), ("embed", "mlp")
    return (
        functools.partial(bert.Linear, config, "bld,df->blf", shape, axes),
        functools.partial(bert.Linear, config, "blf,fd->bld", shape[::-1], axes[::-1]),
    )


def _ffn(module: nn.Module, fc1: nn.Module, fc2: nn.Module, x: Array, deterministic: bool) -> Array:
    """`fc2(drop(act(fc1(x))))`, `[batch, seq, d] -> [batch, seq, d]`."""
    cfg = module.config
    h = nn.with_logical_constraint(bert._ACTIVATIONS[cfg.activation_function](fc1(x)), ("batch", "length", "mlp"))
    return fc2(_dropout(module, h, cfg.activation_dropout, deterministic))


def _residual(module: nn.Module, x: Array, norm: nn.Module, fn: Callable[[Array], Array], deterministic: bool) -> Array:
    """Post-LN `norm(x + drop(fn(x)))`, or pre-LN `x + drop(fn(norm(x)))` with `normalize_before`."""
    cfg = module.config
    if cfg.normalize_before:
        out = x + _dropout(module, fn(norm(x)), cfg.dropout, deterministic)
    else:
        out = norm(x + _dropout(module, fn(x), cfg.dropout, deterministic))
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))


class EncoderLayer(nn.Module):
    """Bidirectional self-attention block then FFN block. `[batch, seq, d] -> [batch, seq, d]`."""

    config: BartConfig

    @nn.compact
    def __call__(self, x: Array, key_mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        attn = Attention(cfg, cfg.encoder_attention_heads, name="self_attn")

        def self_attention(h: Array) -> Array:
            return attn.output(bert.dot_product_attention(attn.query(h), *attn.key_value(h), key_mask))

        norm = functools.partial(bert.LayerNorm, cfg)
        x = _residual(self, x, norm(name="self_attn_layer_norm"), self_attention, deterministic)
        fc1, fc2 = _ffn_linears(cfg, cfg.encoder_ffn_dim)
        ffn = functools.partial(_ffn, self, fc1(name="fc1"), fc2(name="fc2"), deterministic=deterministic)
        return _residual(self, x, norm(name="final_layer_norm"), ffn, deterministic)


def _positions_embed(config: BartConfig, name: str | None = None) -> nn.Embed:
    init = nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), (None, "embed"))
    return nn.Embed(
        config.max_position_embeddings + POSITION_OFFSET,
        config.d_model,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        embedding_init=init,
        name=name,
    )


class Encoder(nn.Module):
    """Positions + layernorm_embedding + encoder layers (+ final layer_norm for mBART)."""

    config: BartConfig

    @nn.compact
    def __call__(self, inputs_embeds: Array, attention_mask: Array, deterministic: bool) -> Array:
        """inputs_embeds `[batch, seq, d]` (already scaled), attention_mask `[batch, seq]` -> `[batch, seq, d]`."""
        cfg = self.config
        positions = jnp.arange(inputs_embeds.shape[1], dtype=jnp.int32)[None] + POSITION_OFFSET
        x = inputs_embeds + _positions_embed(cfg, "embed_positions")(positions)
        x = bert.LayerNorm(cfg, name="layernorm_embedding")(x)
        x = nn.with_logical_constraint(_dropout(self, x, cfg.dropout, deterministic), ("batch", "length", "embed"))
        key_mask = nn.with_logical_constraint(attention_mask.astype(bool), ("batch", "length"))
        for i in range(cfg.encoder_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(x, key_mask, deterministic)
        if cfg.normalize_before:
            x = bert.LayerNorm(cfg, name="layer_norm")(x)
        return x


class DecoderLayer(nn.Module):
    """Causal self-attention (optionally through the cache), cross-attention, FFN; each a residual block."""

    config: BartConfig
    layer_index: int

    def setup(self):
        cfg = self.config
        self.self_attn = Attention(cfg, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = bert.LayerNorm(cfg)
        self.encoder_attn = Attention(cfg, cfg.decoder_attention_heads)
        self.encoder_attn_layer_norm = bert.LayerNorm(cfg)
        fc1, fc2 = _ffn_linears(cfg, cfg.decoder_ffn_dim)
        self.fc1, self.fc2 = fc1(), fc2()
        self.final_layer_norm = bert.LayerNorm(cfg)

    def cross_key_value(self, encoder_hidden: Array) -> tuple[Array, Array]:
        """Cross-attention K/V `[batch, src, heads, head_dim]` of `encoder_hidden` `[batch, src, d]`."""
        return self.encoder_attn.key_value(encoder_hidden)

    def __call__(
        self,
        x: Array,
        self_mask: Array,
        cross_kv: tuple[Array, Array],
        cross_mask: Array,
        cache: BartCache | None,
        deterministic: bool,
    ) -> tuple[Array, BartCache | None]:
        """x: `[rows, seq, d]`; self_mask: `[rows, seq, slots]`; cross_kv from `cross_key_value`; cross_mask
        `[batch, src]`. With a cache, writes this layer's K/V at slots `[end, end + seq)`."""

        def self_attention(h: Array) -> Array:
            nonlocal cache
            k, v = self.self_attn.key_value(h)
            if cache is not None:
                cache, k, v = qwen2._write_cache(cache, self.layer_index, k, v)
            return self.self_attn.output(qwen2.dot_product_attention(self.self_attn.query(h), k, v, self_mask))

        def cross_attention(h: Array) -> Array:
            return self.encoder_attn.output(_cross_attention(self.encoder_attn.query(h), *cross_kv, cross_mask))

        x = _residual(self, x, self.self_attn_layer_norm, self_attention, deterministic)
        x = _residual(self, x, self.encoder_attn_layer_norm, cross_attention, deterministic)
        ffn = functools.partial(_ffn, self, self.fc1, self.fc2, deterministic=deterministic)
        return _residual(self, x, self.final_layer_norm, ffn, deterministic), cache


class Decoder(nn.Module):
    """Positions + layernorm_embedding + decoder layers (+ final layer_norm for mBART)."""

    config: BartConfig

    def setup(self):
        cfg = self.config
        self.embed_positions = _positions_embed(cfg)
        self.layernorm_embedding = bert.LayerNorm(cfg)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.decoder_layers)]
        if cfg.normalize_before:
            self.layer_norm = bert.LayerNorm(cfg)

    def cross_key_values(self, encoder_hidden: Array) -> tuple[Array, Array]:
        """Every layer's cross-attention K/V, stacked: `([decoder_layers, batch, src, heads, head_dim],) * 2`."""
        k, v = zip(*(layer.cross_key_value(encoder_hidden) for layer in self.layers), strict=True)
        return tuple(nn.with_logical_constraint(jnp.stack(x), CACHE_AXES) for x in (k, v))

    def __call__(
        self,
        inputs_embeds: Array,
        positions: Array,
        self_mask: Array,
        cross_k: Array,
        cross_v: Array,
        cross_mask: Array,
        cache: BartCache | None,
        deterministic: bool,
    ) -> tuple[Array, BartCache | None]:
        """inputs_embeds `[rows, seq, d]` (scaled), positions `[seq]` int32. Returns `([rows, seq, d], cache)`."""
        x = inputs_embeds + self.embed_positions(positions + POSITION_OFFSET)[None]
        x = _dropout(self, self.layernorm_embedding(x), self.config.dropout, deterministic)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        for i, layer in enumerate(self.layers):
            x, cache = layer(x, self_mask, (cross_k[i], cross_v[i]), cross_mask, cache, deterministic)
        if self.config.normalize_before:
            x = self.layer_norm(x)
        return x, cache


class Bart(nn.Module):
    """BART / mBART for conditional generation. See the module docstring for the parameter tree.

    Methods (call through `apply(..., method=Bart.<name>)`): `embed_tokens`, `encode`, `decode`, `init_cache`;
    `__call__` is encode + teacher-forced decode.
    """

    config: BartConfig

    def setup(self):
        cfg = self.config
        self.shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), ("vocab", "embed")),
        )
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",))
        self.final_logits_bias = self.param("final_logits_bias", bias_init, (cfg.vocab_size,), cfg.param_dtype)
        if not cfg.tie_word_embeddings:
            head_init = nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), ("vocab", "embed"))
            self.lm_head = self.param("lm_head", head_init, (cfg.vocab_size, cfg.d_model), cfg.param_dtype)

    def embed_tokens(self, input_ids: Array) -> Array:
        """Scaled token embeddings `[batch, seq, d]` of `input_ids` `[batch, seq]` (HF's `embed_tokens`)."""
        x = self.shared(input_ids) * jnp.asarray(self.config.embed_scale, self.config.dtype)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def encode(
        self,
        input_ids: Array | None,
        attention_mask: Array,
        inputs_embeds: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Encoder last hidden states `[batch, src, d]` in `config.dtype`.

        Args:
          input_ids: `[batch, src]` int32 (padding anywhere; `src <= max_position_embeddings`), or None when
            `inputs_embeds` is given.
          attention_mask: `[batch, src]` bool/int, nonzero for real tokens.
          inputs_embeds: optional `[batch, src, d]` input embeddings used instead of `embed_tokens(input_ids)`
            (e.g. token embeddings with injected feature vectors); not scaled here.
          deterministic: False applies dropout (needs a `"dropout"` rng).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("encode: pass input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        src = inputs_embeds.shape[1]
        if src > self.config.max_position_embeddings:
            raise ValueError(
                f"source length {src} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        return self.encoder(inputs_embeds, attention_mask, deterministic)

    def init_cache(
        self, encoder_hidden: Array, encoder_mask: Array, max_decode_len: int, num_beams: int = 1
    ) -> BartCache:
        """An empty decoder cache for `max_decode_len` tokens and `batch * num_beams` rows, with the cross-attention
        K/V of `encoder_hidden` `[batch, src, d]` (mask `encoder_mask` `[batch, src]`) computed once."""
        cfg = self.config
        if not 0 < max_decode_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_decode_len {max_decode_len} not in [1, {cfg.max_position_embeddings}]")
        cross_k, cross_v = self.decoder.cross_key_values(encoder_hidden)
        rows = encoder_hidden.shape[0] * num_beams
        heads = cfg.decoder_attention_heads
        shape = (cfg.decoder_layers, rows, max_decode_len, heads, cfg.d_model // heads)
        zeros = nn.with_logical_constraint(jnp.zeros(shape, cfg.dtype), CACHE_AXES)
        return BartCache(
            k=zeros,
            v=zeros,
            valid=nn.with_logical_constraint(jnp.zeros((rows, max_decode_len), bool), CACHE_MASK_AXES),
            end=jnp.zeros((), jnp.int32),
            cross_k=cross_k,
            cross_v=cross_v,
            cross_mask=nn.with_logical_constraint(encoder_mask.astype(bool), CACHE_MASK_AXES),
        )

    def decode(
        self,
        decoder_input_ids: Array,
        encoder_hidden: Array | None = None,
        encoder_mask: Array | None = None,
        cache: BartCache | None = None,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
    ) -> tuple[Array, BartCache | None]:
        """Decoder logits.

        Args:
          decoder_input_ids: `[rows, seq]` int32 (teacher forcing: `shift_tokens_right(labels, ...)`).
          encoder_hidden, encoder_mask: `[batch, src, d]`, `[batch, src]` (rows == batch); unused with a cache.
          cache: None for a full causal forward at positions `[0, seq)`. Otherwise the tokens take slots and
            positions `[end, end + seq)` (the caller keeps `end + seq <= max_len`: `dynamic_update_slice` would
            clamp silently) and attend to every valid earlier slot plus the cached cross K/V.
          decoder_attention_mask: `[rows, seq]`, False for padded decoder keys (default: all real).
          deterministic: False applies dropout (needs a `"dropout"` rng).
        Returns:
          logits `[rows, seq, vocab]` float32 and the cache advanced by `seq` (None without a cache).
        """
        cfg = self.config
        rows, seq = decoder_input_ids.shape
        dec_mask = (
            jnp.ones((rows, seq), bool) if decoder_attention_mask is None else decoder_attention_mask.astype(bool)
        )
        if cache is None:
            if encoder_hidden is None or encoder_mask is None:
                raise ValueError("decode without a cache needs encoder_hidden and encoder_mask")
            if seq > cfg.max_position_embeddings:
                raise ValueError(f"decoder length {seq} exceeds max_position_embeddings {cfg.max_position_embeddings}")
            cross_k, cross_v = self.decoder.cross_key_values(encoder_hidden)
            cross_mask = encoder_mask.astype(bool)
            key_valid, positions = dec_mask, jnp.arange(seq, dtype=jnp.int32)
        else:
            if seq > cache.max_len:
                raise ValueError(f"{seq} new tokens do not fit a cache of length {cache.max_len}")
            cross_k, cross_v, cross_mask = cache.cross_k, cache.cross_v, cache.cross_mask
            key_valid = jax.lax.dynamic_update_slice(cache.valid, dec_mask, (0, cache.end))
            key_valid = nn.with_logical_constraint(key_valid, CACHE_MASK_AXES)
            positions = cache.end + jnp.arange(seq, dtype=jnp.int32)
            cache = cache.replace(valid=key_valid)
        self_mask = qwen2.attention_mask_for_slots(key_valid, positions)
        x, cache = self.decoder(
            self.embed_tokens(decoder_input_ids),
            positions,
            self_mask,
            cross_k,
            cross_v,
            cross_mask,
            cache,
            deterministic,
        )
        head = jnp.asarray(self.shared.embedding if cfg.tie_word_embeddings else self.lm_head, cfg.dtype)
        logits = jnp.einsum("bld,vd->blv", x, head, preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(
            logits + self.final_logits_bias.astype(jnp.float32), ("batch", "length", "vocab")
        )
        if cache is not None:
            cache = cache.replace(end=cache.end + seq)
        return logits, cache

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array,
        decoder_input_ids: Array,
        decoder_attention_mask: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """Teacher-forced logits `[batch, tgt, vocab]` float32 (`input_ids`, `attention_mask`: `[batch, src]`)."""
        encoder_hidden = self.encode(input_ids, attention_mask, deterministic=deterministic)
        logits, _ = self.decode(
            decoder_input_ids, encoder_hidden, attention_mask, None, decoder_attention_mask, deterministic
        )
        return logits


def init_params(config: BartConfig, rng: Array) -> Any:
    """Randomly initialised params (the `"params"` collection, `nn.LogicallyPartitioned` leaves).

    `sharding.sharded_init(functools.partial(init_params, config), rng, mesh=mesh)` creates them sharded.
    Apply with `Bart(config).apply({"params": params}, input_ids, attention_mask, decoder_input_ids)`.
    """
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Bart(config).init(rng, tokens, tokens.astype(bool), tokens)["params"]


def make_step_fn(
    model: Bart,
    params: Any,
    encoder_hidden: Array,
    encoder_mask: Array,
    max_decode_len: int,
    num_beams: int = 1,
) -> tuple[Callable[[BartCache, Array], tuple[Array, BartCache]], BartCache]:
    """The one-token decoder interface for (beam) search: `(step_fn, carry)`.

    `step_fn(carry, tokens)` feeds `tokens` `[rows]` int32 at the next decoder position and returns
    `(logits [rows, vocab] float32, carry)`. `carry` is an empty `BartCache` of `batch * num_beams` rows (row
    b * num_beams + j: beam j of batch element b) with room for `max_decode_len` tokens, the decoder start
    token included, and the cross-attention K/V of `encoder_hidden` `[batch, src, d]` computed once.
    Call it inside the jitted function, so `params` and `encoder_hidden` are traced, not baked-in constants.
    With `jax_hd.decoding.beam_search` (which expands a `batch`-row carry to the beams itself)::

        step_fn, carry = make_step_fn(model, params, encoder_hidden, encoder_mask, num_levels + 1)
        start = jnp.full((batch,), config.decoder_start_token_id, jnp.int32)
        first_logits, carry = step_fn(carry, start)
        out = beam_search.beam_search(step_fn, carry, first_logits, num_beams=k, tree=tree, gather_fn=gather_cache)
    """
    variables = {"params": params}
    carry = model.apply(variables, encoder_hidden, encoder_mask, max_decode_len, num_beams, method=Bart.init_cache)

    def step_fn(cache: BartCache, tokens: Array) -> tuple[Array, BartCache]:
        logits, cache = model.apply(variables, tokens[:, None], cache=cache, method=Bart.decode)
        return logits[:, 0], cache

    return step_fn, carry


def extend_vocab(
    params: Any,
    config: BartConfig,
    num_new_tokens: int,
    rng: Array,
    init: str = "mean",
    pad_to_multiple_of: int | None = None,
) -> tuple[Any, BartConfig]:
    """Appends embedding rows (e.g. semantic-ID tokens) after the existing vocabulary, as HF's
    `resize_token_embeddings` does: old rows and logits are unchanged, `final_logits_bias` grows with zeros.

    Args:
      params: the `"params"` collection (unboxed); not modified.
      num_new_tokens: rows to add (the new ids are `[config.vocab_size, config.vocab_size + num_new_tokens)`).
      rng: PRNG key for the new rows.
      init: "mean" (HF's default `mean_resizing=True`: rows drawn from N(mean, 1e-9 * cov) of the old rows,
        i.e. essentially the mean embedding; the mean itself when that covariance is not positive definite) or
        "normal" (N(0, 0.02^2), HF's `_init_weights`).
      pad_to_multiple_of: round the new vocabulary size up to a multiple of this (e.g. the `tensor` mesh axis,
        so the vocabulary shards evenly); the padding rows are initialised the same way.
    Returns:
      `(params, config)` with `vocab_size` increased.
    """
    if num_new_tokens < 0:
        raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
    new_size = config.vocab_size + num_new_tokens
    if pad_to_multiple_of:
        new_size = -(-new_size // pad_to_multiple_of) * pad_to_multiple_of
    added = new_size - config.vocab_size
    old = jnp.asarray(params["shared"]["embedding"])
    if old.shape[0] != config.vocab_size:
        raise ValueError(f"params shared/embedding has {old.shape[0]} rows, config.vocab_size is {config.vocab_size}")
    old32 = old.astype(jnp.float32)
    if init == "mean":
        mean = jnp.mean(old32, axis=0)
        centered = old32 - mean
        chol = jnp.linalg.cholesky(1e-9 * (centered.T @ centered) / old.shape[0])
        noise = jax.random.normal(rng, (added, old.shape[1]), jnp.float32) @ chol.T
        new = mean + jnp.where(jnp.all(jnp.isfinite(chol)), noise, 0.0)  # cholesky gives NaN when not PD
    elif init == "normal":
        new = _INIT_STDDEV * jax.random.normal(rng, (added, old.shape[1]), jnp.float32)
    else:
        raise ValueError(f"extend_vocab: init {init!r} is not 'mean' or 'normal'")
    bias = jnp.asarray(params["final_logits_bias"])
    out = dict(params)
    out["shared"] = {**params["shared"], "embedding": jnp.concatenate([old, new.astype(old.dtype)])}
    out["final_logits_bias"] = jnp.concatenate([bias, jnp.zeros((added,), bias.dtype)])
    return out, dataclasses.replace(config, vocab_size=new_size)


def param_count(params: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) params tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))
