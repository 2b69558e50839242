"""BLIP-2 Q-Former, computed as `transformers.Blip2QFormerModel` (+ `Blip2TextEmbeddings`) computes it.

A BERT encoder whose input is `[queries; text]`: learned query tokens (no position embeddings) followed by
word + absolute position embeddings of the text (positions from 0), then one LayerNorm + dropout over the
concatenation. In every layer, self-attention is bidirectional over all positions (masked for padding only);
layers `i % cross_attention_frequency == 0` then cross-attend from the query slice only to the image
features; query positions go through their own feed-forward (`intermediate_query`/`output_query`), text
positions through the text one (`intermediate`/`output`). Without queries (the text encoder of ITC) there is
no cross-attention and every position uses the text feed-forward.

HF vs LAVIS (`lavis/models/blip2_models/Qformer.py`, used by SPRC): identical computation. LAVIS's
`BertEmbeddings` adds word + position embeddings to the text, prepends the query embeddings, then applies
`bert.embeddings.LayerNorm` + dropout; HF moves that LayerNorm into `Blip2QFormerModel.layernorm` and the
word/position tables into a top-level `embeddings` module. LAVIS routes the feed-forward on
`query_length > 0` as HF does. SPRC changed that routing to "an image is present", so in its image-less
passes queries use the text feed-forward. By default we implement HF/LAVIS (a pass with queries but no image
raises); `allow_queries_without_image=True` runs such a pass (no cross-attention anywhere), with the query
slots in the query feed-forward (`query_ffn="query"`) or, as SPRC does, in the text one (`query_ffn="text"`).
`queries_after_cls=True` is SPRC's `no_img=True` embedding layout (its prompt-token pass):
`[CLS, queries, text[1:]]` with position embeddings over the whole sequence (positions from 0, queries
included), no image.

Parameter tree:

  query_tokens                             [num_query_tokens, hidden]                (None, "embed")
  embeddings/word_embeddings/embedding     [vocab, hidden]        } only with
  embeddings/position_embeddings/embedding [max_positions, hidden] } use_qformer_text_input
  layernorm                                scale, bias [hidden]
  layer_i/attention/{query,key,value}      kernel [hidden, heads, head_dim], bias [heads, head_dim]
  layer_i/attention/output                 kernel [heads, head_dim, hidden], bias [hidden]
  layer_i/attention/layer_norm             scale, bias [hidden]
  layer_i/crossattention/...               as attention; key/value kernels [encoder_hidden, heads, head_dim]
  layer_i/feed_forward_query/intermediate  kernel [hidden, inter], bias [inter]
  layer_i/feed_forward_query/output        kernel [inter, hidden], bias [hidden]
  layer_i/feed_forward_query/layer_norm    scale, bias [hidden]
  layer_i/feed_forward/...                 the text feed-forward, only with use_qformer_text_input
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jax_hd.models import vit
from jax_hd.models.vit import HEAD_AXES, RESIDUAL_AXES, dense, layer_norm

Array = jax.Array
DType = Any
_INIT_STDDEV = 0.02


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
    """Model shape (HF `Blip2QFormerConfig` field names and defaults, plus `num_query_tokens` from
    `Blip2Config`) and JAX-side fields.

    use_qformer_text_input: whether the model has a text branch (word/position embeddings and the text
      feed-forward). HF's default is False (the captioning checkpoints); BLIP-2 stage 1 / ITM / CIR need True.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    use_qformer_text_input: bool = False
    num_query_tokens: int = 32
    dtype: DType = jnp.float32  # activations
    param_dtype: DType = jnp.float32
    remat: bool = False  # rematerialise each layer in the backward pass

    def __post_init__(self):
        vit.canonicalize_dtypes(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        vit.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @classmethod
    def blip2(cls, **overrides: Any) -> QFormerConfig:
        """BLIP-2 stage-1 Q-Former (`Salesforce/blip2-itm-vit-g`): BERT-base, 32 queries, cross-attention
        every 2nd layer to 1408-wide ViT-g features, vocab 30522 + `[DEC]`, with the text branch."""
        return cls(**{**_PRESETS["blip2"], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> QFormerConfig:
        """A seconds-to-compile model for tests (3 layers: cross-attention in layers 0 and 2)."""
        return cls(**{**_PRESETS["tiny"], **overrides})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> QFormerConfig:
        """From an HF `Blip2QFormerConfig` dict, or a whole `Blip2Config` dict (its `qformer_config`, its
        `num_query_tokens`, and `encoder_hidden_size` = the vision width, as `Blip2Config` sets it).

        Missing fields take HF's defaults; `overrides` set the rest (e.g. `num_query_tokens`, dtype, remat).
        """
        top: Mapping[str, Any] = {}
        if "qformer_config" in d:
            top, d = d, d["qformer_config"] or {}
        if d.get("model_type", "blip_2_qformer") != "blip_2_qformer":
            raise ValueError(f"config: model_type {d.get('model_type')!r} is not 'blip_2_qformer'")
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in _HF_FIELDS and f.name in d}
        if top:
            fields["num_query_tokens"] = top.get("num_query_tokens", 32)
            vision = top.get("vision_config") or {}
            fields["encoder_hidden_size"] = vision.get("hidden_size", fields.get("encoder_hidden_size", 1408))
        if fields.get("pad_token_id") is None:
            fields.pop("pad_token_id", None)
        return cls(**{**fields, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `Blip2QFormerConfig` dict (`num_query_tokens` belongs to the enclosing `Blip2Config`)."""
        return {"model_type": "blip_2_qformer", **{name: getattr(self, name) for name in _HF_FIELDS}}


_HF_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "layer_norm_eps",
    "pad_token_id", "cross_attention_frequency", "encoder_hidden_size", "use_qformer_text_input",
)  # fmt: skip
_PRESETS: dict[str, dict[str, Any]] = {
    # [spec 4]: 12 layers, hidden 768, 12 heads, FFN 3072, GELU, eps 1e-12, 512 positions, vocab 30523,
    # cross-attention every 2nd layer to the 1408-wide ViT-g, 32 queries.
    "blip2": dict(
        vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        hidden_act="gelu", max_position_embeddings=512, layer_norm_eps=1e-12, cross_attention_frequency=2,
        encoder_hidden_size=1408, use_qformer_text_input=True, num_query_tokens=32,
    ),
    "tiny": dict(
        vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        hidden_act="gelu", max_position_embeddings=64, layer_norm_eps=1e-12, cross_attention_frequency=2,
        encoder_hidden_size=48, use_qformer_text_input=True, num_query_tokens=8,
    ),
}  # fmt: skip


class Attention(nn.Module):
    """BERT attention + `SelfOutput`: `layer_norm(x + output(attend(x -> context)))`.

    Self-attention when `context` is `x`; cross-attention (keys/values from `encoder_hidden_size`-wide image
    features) when `cross` is set.
    """

    config: QFormerConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x: Array, context: Array, context_mask: Array, deterministic: bool) -> Array:
        """x: `[batch, q_len, hidden]`; context: `[batch, k_len, hidden or encoder_hidden]`;
        context_mask: `[batch, k_len]` bool. Returns `[batch, q_len, hidden]`."""
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        proj_axes = ("embed", "heads", "kv")
        q = dense(cfg, (heads, head_dim), proj_axes, "query")(x)
        k = dense(cfg, (heads, head_dim), proj_axes, "key")(context)
        v = dense(cfg, (heads, head_dim), proj_axes, "value")(context)
        q, k, v = (nn.with_logical_constraint(t, HEAD_AXES) for t in (q, k, v))
        dropout = nn.Dropout(cfg.attention_probs_dropout_prob, deterministic=deterministic)
        out = vit.dot_product_attention(q, k, v, context_mask, dropout=dropout)
        out = nn.with_logical_constraint(out, HEAD_AXES)
        out = dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "output", contract=2)(out)
        out = nn.Dropout(cfg.hidden_dropout_prob, deterministic=deterministic)(out)
        out = layer_norm(cfg, cfg.layer_norm_eps, "layer_norm")(out + x)
        return nn.with_logical_constraint(out, RESIDUAL_AXES)


class FeedForward(nn.Module):
    """BERT `Intermediate` + `Output`: `layer_norm(x + output(act(intermediate(x))))`."""

    config: QFormerConfig

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        """`[batch, seq, hidden] -> [batch, seq, hidden]`."""
        cfg = self.config
        h = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x)
        h = nn.with_logical_constraint(vit.activation(cfg.hidden_act)(h), ("batch", "length", "mlp"))
        h = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(h)
        h = nn.Dropout(cfg.hidden_dropout_prob, deterministic=deterministic)(h)
        out = layer_norm(cfg, cfg.layer_norm_eps, "layer_norm")(h + x)
        return nn.with_logical_constraint(out, RESIDUAL_AXES)


class Layer(nn.Module):
    """One Q-Former layer over `[queries; text]` (HF `Blip2QFormerLayer`)."""

    config: QFormerConfig
    layer_index: int
    # Image-less passes (see `QFormer.__call__`): queries allowed without image features, where the query
    # slots start, and which feed-forward they use ("query", or "text" as SPRC routes them).
    queries_without_image: bool = False
    query_start: int = 0
    query_ffn: str = "query"

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array,
        image_features: Array | None,
        image_mask: Array | None,
        num_queries: int,
        deterministic: bool,
    ) -> Array:
        """x: `[batch, num_queries + text_len, hidden]`, mask: `[batch, num_queries + text_len]` bool;
        image_features: `[batch, image_len, encoder_hidden]` (needed when `num_queries > 0` and this layer
        cross-attends), image_mask: `[batch, image_len]` bool. Returns the new `x`."""
        cfg = self.config
        x = Attention(cfg, name="attention")(x, x, mask, deterministic)
        if num_queries == 0 or (image_features is None and self.query_ffn == "text"):
            return FeedForward(cfg, name="feed_forward")(x, deterministic)
        start, stop = self.query_start, self.query_start + num_queries
        queries = x[:, start:stop]
        if cfg.has_cross_attention(self.layer_index):
            if image_features is not None:
                queries = Attention(cfg, cross=True, name="crossattention")(
                    queries, image_features, image_mask, deterministic
                )
            elif not self.queries_without_image:
                raise ValueError(f"layer {self.layer_index} cross-attends: queries need image features")
        out = FeedForward(cfg, name="feed_forward_query")(queries, deterministic)
        if x.shape[1] > num_queries:
            text = x[:, stop:] if start == 0 else jnp.concatenate([x[:, :start], x[:, stop:]], axis=1)
            text = FeedForward(cfg, name="feed_forward")(text, deterministic)
            if start == 0:
                out = jnp.concatenate([out, text], axis=1)
            else:
                out = jnp.concatenate([text[:, :start], out, text[:, start:]], axis=1)
        return nn.with_logical_constraint(out, RESIDUAL_AXES)


class QFormer(nn.Module):
    """BLIP-2 Q-Former with its query tokens and (optionally) text embeddings. See the module docstring."""

    config: QFormerConfig

    @nn.compact
    def __call__(
        self,
        query_tokens_override: Array | None = None,
        input_ids: Array | None = None,
        text_attention_mask: Array | None = None,
        image_features: Array | None = None,
        image_attention_mask: Array | None = None,
        *,
        deterministic: bool = True,
        allow_queries_without_image: bool = False,
        query_ffn: str = "query",
        queries_after_cls: bool = False,
    ) -> Array:
        """Hidden states of `[queries; text]` after the last layer.

        Queries take part when `image_features` or `query_tokens_override` is given (a pass with queries but
        no image raises, as in HF: cross-attention layers need the image):
          * image only: query features (BLIP-2's image tower), `[batch, num_query, hidden]`;
          * image + text: multimodal (joint self-attention, queries cross-attend), `[batch, num_query + len, hidden]`;
          * text only: the text encoder (no queries, no cross-attention), `[batch, len, hidden]`.

        Args:
          query_tokens_override: `[num_q, hidden]` or `[batch, num_q, hidden]` used instead of the learned
            `query_tokens` (which are still created, so the parameter tree does not change).
          input_ids: `[batch, text_len]` int token ids (needs `use_qformer_text_input`).
          text_attention_mask: `[batch, text_len]` (1/True for real tokens); default all ones.
          image_features: `[batch, image_len, encoder_hidden_size]`, e.g. the ViT output.
          image_attention_mask: `[batch, image_len]`; default all ones.
          deterministic: False enables dropout (needs a `"dropout"` rng).
          allow_queries_without_image: run a pass with queries but no `image_features` (no cross-attention
            anywhere) instead of raising; SPRC's second query pass and prompt-token pass.
          query_ffn: feed-forward of the query slots in such an image-less pass: "query" (their own, as with
            an image) or "text" (SPRC's routing: every position uses the text feed-forward).
          queries_after_cls: SPRC's `no_img=True` layout `[CLS, queries, text[1:]]`, position embeddings over
            the whole sequence; needs `input_ids` and queries, no image (implies the flag above). The output
            has that layout: `[batch, num_q + text_len, hidden]` with the `[CLS]` state at index 0.
        Returns:
          `[batch, num_q + text_len, hidden]` in `config.dtype`.
        """
        cfg = self.config
        if query_ffn not in ("query", "text"):
            raise ValueError(f"query_ffn must be 'query' or 'text', got {query_ffn!r}")
        imageless = allow_queries_without_image or queries_after_cls
        if query_ffn != "query" and not imageless:
            raise ValueError("query_ffn routes image-less passes: it needs allow_queries_without_image=True")
        if image_features is not None and imageless:
            raise ValueError("allow_queries_without_image / queries_after_cls are for passes without image_features")
        if queries_after_cls and (input_ids is None or query_tokens_override is None):
            raise ValueError("queries_after_cls needs input_ids and query_tokens_override")
        query_tokens = vit.param(
            self, "query_tokens", nn.initializers.normal(_INIT_STDDEV), (cfg.num_query_tokens, cfg.hidden_size),
            (None, "embed"),
        )  # fmt: skip
        if query_tokens_override is not None:
            query_tokens = jnp.asarray(query_tokens_override, cfg.dtype)
        use_queries = image_features is not None or query_tokens_override is not None
        if not use_queries and input_ids is None:
            raise ValueError("the Q-Former needs image_features, query_tokens_override or input_ids")
        batch = _batch_size(query_tokens_override, input_ids, image_features)

        parts, masks = [], []
        if use_queries:
            if query_tokens.ndim == 2:
                query_tokens = jnp.broadcast_to(query_tokens, (batch, *query_tokens.shape))
            parts.append(query_tokens)
            masks.append(jnp.ones(query_tokens.shape[:2], bool))
        text_embeddings = TextEmbeddings(cfg, name="embeddings") if cfg.use_qformer_text_input else None
        if input_ids is not None:
            if text_embeddings is None:
                raise ValueError("input_ids given, but the config has use_qformer_text_input=False")
            text_mask = _bool_mask(text_attention_mask, input_ids.shape)
            if queries_after_cls:  # one sequence [CLS, queries, text[1:]], the queries' mask all True
                parts, masks = [text_embeddings(input_ids, query_tokens)], [text_mask[:, :1], *masks, text_mask[:, 1:]]
            else:
                parts.append(text_embeddings(input_ids))
                masks.append(text_mask)

        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        x = layer_norm(cfg, cfg.layer_norm_eps, "layernorm")(x)
        x = nn.Dropout(cfg.hidden_dropout_prob, deterministic=deterministic)(x)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        mask = jnp.concatenate(masks, axis=1) if len(masks) > 1 else masks[0]

        num_queries = query_tokens.shape[1] if use_queries else 0
        image_mask = None
        if image_features is not None:
            image_features = nn.with_logical_constraint(image_features.astype(cfg.dtype), RESIDUAL_AXES)
            image_mask = _bool_mask(image_attention_mask, image_features.shape[:2])
        # Static under remat: num_queries and deterministic (flax counts `self` as argument 0).
        layer_cls = nn.remat(Layer, static_argnums=(5, 6)) if cfg.remat else Layer
        routing = {}
        if imageless:  # only then, so the default passes build exactly the layers they always did
            routing = dict(queries_without_image=True, query_start=int(queries_after_cls), query_ffn=query_ffn)
        for i in range(cfg.num_hidden_layers):
            layer = layer_cls(cfg, i, name=f"layer_{i}", **routing)
            x = layer(x, mask, image_features, image_mask, num_queries, deterministic)
        return x


class TextEmbeddings(nn.Module):
    """HF `Blip2TextEmbeddings` for text alone: word + absolute position embeddings (positions from 0).

    `[batch, text_len] -> [batch, text_len, hidden]`; the LayerNorm is the Q-Former's `layernorm`.
    """

    config: QFormerConfig

    @nn.compact
    def __call__(self, input_ids: Array, queries_after_cls: Array | None = None) -> Array:
        """queries_after_cls: `[batch, num_q, hidden]` inserted after `[CLS]` (SPRC's `no_img` layout), the
        position embeddings then cover `[CLS, queries, text[1:]]`; output `[batch, num_q + text_len, hidden]`."""
        cfg = self.config
        text_len = input_ids.shape[1]
        if queries_after_cls is not None:
            text_len += queries_after_cls.shape[1]
        if text_len > cfg.max_position_embeddings:
            raise ValueError(f"text length {text_len} > max_position_embeddings {cfg.max_position_embeddings}")

        def embed(num: int, axes: tuple[str | None, str], name: str) -> nn.Embed:
            init = nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), axes)
            return nn.Embed(
                num, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype, embedding_init=init, name=name
            )

        words = embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        if queries_after_cls is not None:
            words = jnp.concatenate([words[:, :1], queries_after_cls.astype(words.dtype), words[:, 1:]], axis=1)
        positions = embed(cfg.max_position_embeddings, (None, "embed"), "position_embeddings")(jnp.arange(text_len))
        return nn.with_logical_constraint(words + positions[None], RESIDUAL_AXES)


def _batch_size(query_tokens_override: Array | None, input_ids: Array | None, image_features: Array | None) -> int:
    """The leading dimension shared by the batched inputs (a 2-D `query_tokens_override` is unbatched)."""
    if query_tokens_override is not None and query_tokens_override.ndim == 2:
        query_tokens_override = None
    named = {"query_tokens_override": query_tokens_override, "input_ids": input_ids, "image_features": image_features}
    sizes = {name: x.shape[0] for name, x in named.items() if x is not None}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()), 1)


def _bool_mask(mask: Array | None, shape: tuple[int, ...]) -> Array:
    """`mask` (0/1 or bool) as bool, or all True when None; ValueError when its shape is not `shape`."""
    if mask is None:
        return jnp.ones(shape, bool)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask.astype(bool)


def init_params(config: QFormerConfig, rng: Array) -> Any:
    """Randomly initialised params (the `"params"` collection, `nn.LogicallyPartitioned` leaves).

    Initialises with image features and (with `use_qformer_text_input`) text, so every branch is created:
    cross-attention, query and text feed-forwards, text embeddings. (`QFormer.init` with fewer inputs would
    create only the branches those inputs reach.)

    Apply with `QFormer(config).apply({"params": params}, ...)`; see `vit.init_params` for eval_shape /
    `sharding.sharded_init` use.
    """
    image_features = jnp.zeros((1, 1, config.encoder_hidden_size), config.dtype)
    input_ids = jnp.zeros((1, 1), jnp.int32) if config.use_qformer_text_input else None
    return QFormer(config).init(rng, input_ids=input_ids, image_features=image_features)["params"]


def expected_param_count(config: QFormerConfig) -> int:
    """Number of parameters, from the architecture alone."""
    hidden, inter, enc = config.hidden_size, config.intermediate_size, config.encoder_hidden_size
    norm = 2 * hidden
    self_attention = 4 * (hidden * hidden + hidden) + norm
    cross_attention = 2 * (hidden * hidden + hidden) + 2 * (enc * hidden + hidden) + norm
    feed_forward = hidden * inter + inter + inter * hidden + hidden + norm
    num_ffn = 2 if config.use_qformer_text_input else 1
    num_cross = sum(config.has_cross_attention(i) for i in range(config.num_hidden_layers))
    total = config.num_query_tokens * hidden + norm
    total += config.num_hidden_layers * (self_attention + num_ffn * feed_forward) + num_cross * cross_attention
    if config.use_qformer_text_input:
        total += (config.vocab_size + config.max_position_embeddings) * hidden
    return int(total)
