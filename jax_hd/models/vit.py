"""BLIP-2's EVA-style vision transformer, computed as `transformers.Blip2VisionModel` computes it.

Conv patch embedding (with bias), a class token, learned absolute position embeddings, pre-LayerNorm encoder
layers (fused `qkv` projection with a q bias and a v bias but no k bias, exact-erf GELU MLP), and a final
`post_layernorm`. The output is HF's `last_hidden_state` (post-LayerNorm), which is what every BLIP-2 head
feeds to the Q-Former; it is LAVIS's `ln_vision(visual_encoder(image))` (LAVIS's ViT-g has no final norm of
its own, its `ln_vision` plays the role of HF's `post_layernorm`).

Parameter tree (Flax layouts chosen so HF conversion in `hf_import.py` is a transpose and a head split):

  embeddings/patch_embedding     kernel [patch, patch, 3, hidden], bias [hidden]
  embeddings/class_embedding     [hidden]
  embeddings/position_embedding  [1 + num_patches, hidden]
  layers_i/layer_norm{1,2}       scale, bias [hidden]
  layers_i/self_attn/qkv         kernel [hidden, 3, heads, head_dim]        (no bias: see `Attention`)
  layers_i/self_attn/{q,v}_bias  [heads, head_dim]                          (only when `qkv_bias`)
  layers_i/self_attn/projection  kernel [heads, head_dim, hidden], bias [hidden]
  layers_i/mlp/fc1               kernel [hidden, inter], bias [inter];  mlp/fc2 kernel [inter, hidden]
  post_layernorm                 scale, bias [hidden]

Shared building blocks (`param`, `Dense`, `layer_norm`, `dot_product_attention`, `activation`) are also used
by `qformer.py`. Attention softmaxes in fp32 (HF's BLIP-2 softmaxes in the activation dtype: identical in
fp32, more accurate in bf16/fp16).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
DType = Any
Axes = tuple[str | None, ...]

_MASK_VALUE = float(np.finfo(np.float32).min)  # finite: a fully masked row gives a uniform softmax, not NaN
_INIT_STDDEV = 0.02
RESIDUAL_AXES = ("batch", "length", "embed")
HEAD_AXES = ("batch", "length", "heads", "kv")

# HF `ACT2FN` names -> JAX. "gelu" is the exact (erf) GELU, as torch's `nn.GELU()` and BERT's "gelu".
_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The JAX function for an HF `hidden_act` name; ValueError for unknown names."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def canonicalize_dtypes(config: Any) -> None:
    """jnp.float32, "bfloat16", ... -> np.dtype on a frozen config, so configs compare equal."""
    for name in ("dtype", "param_dtype"):
        object.__setattr__(config, name, jnp.dtype(getattr(config, name)))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Model shape (HF `Blip2VisionConfig` field names and defaults, i.e. ViT-g/14) plus JAX-side fields.

    frozen: `lax.stop_gradient` on the output (BLIP-2 / SPRC freeze the ViT). Also exclude its params from
      the optimizer (e.g. `optax.set_to_zero` on them) so no optimizer state is allocated for them.
    """

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    dtype: DType = jnp.float32  # activations
    param_dtype: DType = jnp.float32
    remat: bool = False  # rematerialise each encoder layer in the backward pass
    frozen: bool = False

    def __post_init__(self):
        canonicalize_dtypes(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by patch_size {self.patch_size}")
        activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens per image: the class token plus one per patch (257 for ViT-g/14 at 224 px)."""
        return self.num_patches + 1

    @classmethod
    def eva_vit_g(cls, **overrides: Any) -> ViTConfig:
        """BLIP-2's EVA ViT-g/14 (EVA-CLIP-g minus its last block): 1408 wide, 39 layers, 16 heads, 257 tokens."""
        return cls(**{**_PRESETS["eva_vit_g"], **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> ViTConfig:
        """A seconds-to-compile model for tests (28 px, patch 7: 17 tokens)."""
        return cls(**{**_PRESETS["tiny"], **overrides})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **overrides: Any) -> ViTConfig:
        """From an HF `Blip2VisionConfig` dict, or a whole `Blip2Config` dict (its `vision_config` is used).

        Missing fields take HF's defaults; `overrides` set JAX-side fields (dtype, param_dtype, remat, frozen).
        """
        if "vision_config" in d:
            d = d["vision_config"] or {}
        if d.get("model_type", "blip_2_vision_model") != "blip_2_vision_model":
            raise ValueError(f"config: model_type {d.get('model_type')!r} is not 'blip_2_vision_model'")
        for name in ("image_size", "patch_size"):
            if not isinstance(d.get(name, 0), int):
                raise ValueError(f"config: {name} {d[name]!r} is not supported (only a single int)")
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in _HF_FIELDS and f.name in d}
        return cls(**{**fields, **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `Blip2VisionConfig` dict."""
        return {
            "model_type": "blip_2_vision_model",
            **{name: getattr(self, name) for name in _HF_FIELDS},
            "attention_dropout": 0.0,
            "initializer_range": 1e-10,
        }


_HF_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "hidden_act", "layer_norm_eps", "qkv_bias",
)  # fmt: skip
_PRESETS: dict[str, dict[str, Any]] = {
    # [spec 4]: patch 14, 224 px, width 1408, depth 39, 16 heads, MLP 6144, q/v bias, LayerNorm eps 1e-6.
    "eva_vit_g": dict(
        hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
    ),
    "tiny": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=28,
        patch_size=7, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Building blocks shared with the Q-Former.


def param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], axes: Axes) -> Array:
    """A parameter with logical axis names, created in `config.param_dtype`, cast to `config.dtype`."""
    value = module.param(name, nn.with_logical_partitioning(init, axes), shape, module.config.param_dtype)
    return jnp.asarray(value, module.config.dtype)


def layer_norm(config: Any, eps: float, name: str) -> nn.LayerNorm:
    """`nn.LayerNorm` over the last (`embed`) axis with logically partitioned scale and bias."""
    return nn.LayerNorm(
        epsilon=eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class Dense(nn.Module):
    """`x` contracted over its last `contract` axes with a kernel `[*x.shape[-contract:], *features]`, + bias.

    (Flax's `DenseGeneral` creates a flat 2-D kernel and reshapes it; its boxed initialiser then meets a 4-D
    logical sharding under a mesh, so we create the kernel at its real shape.)
    """

    config: Any
    features: tuple[int, ...]
    axes: Axes  # logical names of the kernel's axes; the bias takes the last `len(features)`
    contract: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*x.shape[x.ndim - self.contract :], *self.features)
        kernel = param(self, "kernel", nn.initializers.normal(_INIT_STDDEV), shape, self.axes)
        y = jnp.tensordot(x.astype(self.config.dtype), kernel, axes=self.contract)
        if self.use_bias:
            bias_axes = self.axes[len(self.axes) - len(self.features) :]
            y = y + param(self, "bias", nn.initializers.zeros_init(), self.features, bias_axes)
        return y


def dense(
    config: Any,
    features: int | tuple[int, ...],
    axes: Axes,
    name: str,
    *,
    contract: int = 1,
    use_bias: bool = True,
) -> Dense:
    """A `Dense` layer: kernel `[*contracted, *features]` named by `axes`, bias `[*features]`."""
    features = (features,) if isinstance(features, int) else tuple(features)
    return Dense(config, features, axes, contract, use_bias, name=name)


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    key_mask: Array | None = None,
    *,
    dropout: Callable[[Array], Array] | None = None,
) -> Array:
    """Bidirectional multi-head attention with an fp32 softmax.

    q: `[batch, q_len, heads, head_dim]`; k, v: `[batch, k_len, heads, head_dim]`;
    key_mask: `[batch, k_len]` bool (True: attend), None for all keys. dropout: applied to the probabilities.
    Returns `[batch, q_len, heads, head_dim]`.
    """
    head_dim = q.shape[-1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * head_dim**-0.5
    if key_mask is not None:
        scores = jnp.where(key_mask[:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    if dropout is not None:
        probs = dropout(probs)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


# ----------------------------------------------------------------------------------------------------------
# The vision transformer.


class Embeddings(nn.Module):
    """`[batch, H, W, 3] -> [batch, 1 + num_patches, hidden]`: patches, class token, position embeddings."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        cfg = self.config
        patch = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embedding",
        )(images.astype(cfg.dtype))
        batch = images.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)  # row-major over the grid, as HF's flatten(2)
        init = nn.initializers.truncated_normal(_INIT_STDDEV)
        class_embedding = param(self, "class_embedding", init, (cfg.hidden_size,), ("embed",))
        position_embedding = param(
            self, "position_embedding", init, (cfg.num_positions, cfg.hidden_size), (None, "embed")
        )
        class_tokens = jnp.broadcast_to(class_embedding, (batch, 1, cfg.hidden_size))
        x = jnp.concatenate([class_tokens, patches], axis=1) + position_embedding
        return nn.with_logical_constraint(x, RESIDUAL_AXES)


class Attention(nn.Module):
    """HF `Blip2Attention`: fused `qkv` projection, q and v biases, bidirectional attention, `projection`.

    HF stores one `qkv.bias` `[3 * hidden]` whose k third starts at zero (LAVIS/EVA: separate `q_bias` and
    `v_bias`, k bias fixed at zero). A k bias adds `q . b_k` to every score of a query row, which the softmax
    cancels (and its gradient is zero), so dropping it is exact: we keep `q_bias` and `v_bias` only.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """x: `[batch, seq, hidden]` -> `[batch, seq, hidden]`."""
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim
        qkv = dense(cfg, (3, heads, head_dim), ("embed", None, "heads", "kv"), "qkv", use_bias=False)(x)
        q, k, v = (nn.with_logical_constraint(qkv[:, :, i], HEAD_AXES) for i in range(3))
        if cfg.qkv_bias:
            zeros = nn.initializers.zeros_init()
            q = q + param(self, "q_bias", zeros, (heads, head_dim), ("heads", "kv"))
            v = v + param(self, "v_bias", zeros, (heads, head_dim), ("heads", "kv"))
        out = nn.with_logical_constraint(dot_product_attention(q, k, v), HEAD_AXES)
        return dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "projection", contract=2)(out)


class MLP(nn.Module):
    """`fc2(act(fc1(x)))`, `[batch, seq, hidden] -> [batch, seq, hidden]`."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        h = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "fc1")(x)
        h = nn.with_logical_constraint(activation(cfg.hidden_act)(h), ("batch", "length", "mlp"))
        return dense(cfg, cfg.hidden_size, ("mlp", "embed"), "fc2")(h)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        x = x + Attention(cfg, name="self_attn")(layer_norm(cfg, cfg.layer_norm_eps, "layer_norm1")(x))
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        x = x + MLP(cfg, name="mlp")(layer_norm(cfg, cfg.layer_norm_eps, "layer_norm2")(x))
        return nn.with_logical_constraint(x, RESIDUAL_AXES)


class VisionTransformer(nn.Module):
    """BLIP-2 vision encoder. See the module docstring for the parameter tree."""

    config: ViTConfig

    @nn.compact
    def __call__(self, images: Array) -> Array:
        """Image features for the Q-Former.

        Args:
          images: `[batch, image_size, image_size, 3]` float, NHWC, already normalised (BLIP-2 uses the CLIP
            mean/std). No position-embedding interpolation: other sizes raise ValueError.
        Returns:
          `[batch, 1 + num_patches, hidden]` in `config.dtype`: HF's post-LayerNorm `last_hidden_state`.
        """
        cfg = self.config
        if images.ndim != 4 or images.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(
                f"images must be [batch, {cfg.image_size}, {cfg.image_size}, 3] (NHWC), got {images.shape}"
            )
        x = Embeddings(cfg, name="embeddings")(images)
        layer_cls = nn.remat(EncoderLayer) if cfg.remat else EncoderLayer
        for i in range(cfg.num_hidden_layers):
            x = layer_cls(cfg, name=f"layers_{i}")(x)
        x = layer_norm(cfg, cfg.layer_norm_eps, "post_layernorm")(x)
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        return jax.lax.stop_gradient(x) if cfg.frozen else x


def init_params(config: ViTConfig, rng: Array) -> Any:
    """Randomly initialised params (the `"params"` collection, `nn.LogicallyPartitioned` leaves).

    `jax.eval_shape(functools.partial(init_params, config), rng)` gives the abstract tree (param counts,
    `sharding.logical_shardings`); `sharding.sharded_init(functools.partial(init_params, config), rng,
    mesh=mesh)` creates them sharded. Apply with `VisionTransformer(config).apply({"params": params}, images)`.
    """
    images = jnp.zeros((1, config.image_size, config.image_size, 3), config.dtype)
    return VisionTransformer(config).init(rng, images)["params"]


def expected_param_count(config: ViTConfig) -> int:
    """Number of parameters, from the architecture alone (HF's count minus the `num_hidden_layers * hidden`
    k-bias entries, which are identically zero there and absent here)."""
    hidden, inter, patch = config.hidden_size, config.intermediate_size, config.patch_size
    embeddings = patch * patch * 3 * hidden + hidden + hidden + config.num_positions * hidden
    attention = hidden * 3 * hidden + (2 * hidden if config.qkv_bias else 0) + hidden * hidden + hidden
    mlp = hidden * inter + inter + inter * hidden + hidden
    layer = attention + mlp + 2 * 2 * hidden
    return embeddings + config.num_hidden_layers * layer + 2 * hidden


def param_count(params: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) params tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params)))
