"""CSMCIR's symmetric dual tower: one BLIP-2 Q-Former for (reference image, text) and (target image, caption).

Spec §5. Notation: `V(I)` cached frozen-ViT features `[batch, image_len, encoder_hidden]`, `QF` the Q-Former
(`jax_hd.models.qformer.QFormer`, one instance and one parameter set for every pass), `Q` the number of
query tokens.

* Query tower (§5.1, [TAPER]): `H = QF(queries, text, V(I_r))`, `q = normalize(text_proj(H[:, Q]))` (the
  text `[CLS]` right after the queries). `query_passes=2` is SPRC's scheme: a second, image-less pass over
  `[H[:, :Q]; text]` and the `[CLS]` of that pass.
* Target tower (§5.2): symmetric, `G = QF(queries, caption, V(I_t))` and either one vector per query slot,
  `normalize(vision_proj(G[:, :Q]))` `[batch, Q, D]`, or the caption `[CLS]`,
  `normalize(text_proj(G[:, Q]))[:, None]` `[batch, 1, D]`. Asymmetric (SPRC, §5.4): `G = QF(queries, V(I_t))`
  without a caption, `normalize(vision_proj(G))`.
* SPRC's auxiliary inputs (§5.4): the rtc query, `normalize(text_proj(QF_no_img(prompt_tokens, text)[:, 0]))`
  with SPRC's `[CLS, prompt tokens, text[1:]]` layout, and for the align term the fused pass's query outputs
  `H[:, :Q]` and the prompt tokens.

Parameter tree (`CSMCIR.init` / `init_params`):

  qformer/...                 the `QFormer` params (query_tokens, embeddings, layernorm, layer_i), one copy
  text_proj/{kernel,bias}     [hidden, embed_dim], [embed_dim]      ("embed", None)
  vision_proj/{kernel,bias}   as text_proj; absent with share_projections or target_pool="cls"
  temp                        []  the raw temperature (SPRC's `temp`; logits = sim / temp)
  prompt_tokens               [Q, hidden]  (None, "embed"); only with use_prompt_tokens

Everything here is trainable; the ViT lives outside the module (frozen, its features cached: spec §14).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from flax import traverse_util

from jax_hd.models import hf_import, qformer, vit
from jax_hd.models.bert import l2_normalize
from jax_hd.models.qformer import QFormerConfig

Array = jax.Array
TARGET_POOLS = ("query_tokens", "cls")
_PROMPT_INIT_STDDEV = 0.02  # SPRC: normal(0, initializer_range)
# Fields that change shapes or computation: they must agree between our config and an HF checkpoint's.
_HF_CHECKED_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "layer_norm_eps", "cross_attention_frequency", "encoder_hidden_size",
    "use_qformer_text_input", "num_query_tokens",
)  # fmt: skip
# HF tensors a CSMCIR load does not use: the ViT (loaded separately), the ITM head, a language model.
_HF_UNUSED_PREFIXES = ("vision_model.", "itm_head.", "language_projection.", "language_model.")


@dataclasses.dataclass(frozen=True)
class CSMCIRConfig:
    """The dual tower. Fields the paper leaves UNKNOWN (spec §15) are PROPOSAL switches:

    qformer: the shared Q-Former; needs `use_qformer_text_input=True` (both towers read text).
    embed_dim: output width of `vision_proj` / `text_proj` (BLIP-2: 256).
    symmetric: True = CSMCIR's target tower (image + caption, fact [ABS, TAPER]); False = SPRC's asymmetric
      baseline (image only, `vision_proj` of the query outputs, captions ignored).
    query_passes: 1 = one fused pass, `[CLS]` of its text part ([TAPER]'s call); 2 = SPRC's second image-less
      text pass over the fused query outputs. UNKNOWN which one CSMCIR uses (§5.1).
    target_pool: "query_tokens" = `vision_proj` of every query slot, K = Q (INFERRED, SPRC-compatible);
      "cls" = `text_proj` of the caption `[CLS]`, K = 1 (the alternative reading). UNKNOWN (§5.2).
    share_projections: the target tower uses `text_proj` too (one Dense, no `vision_proj`). UNKNOWN (§5.2).
    tau_init, learn_tau: the temperature (SPRC: learnable, 0.07). CSMCIR's is UNKNOWN (§5.3).
    tau_clamp: `(low, high)` clip of the temperature in the forward pass (BLIP-2 clamps to (0.001, 0.5); SPRC
      does not: None). The gradient is zero while clipped (BLIP-2 clamps the stored value instead).
    use_prompt_tokens: SPRC's learned prompt tokens `[Q, hidden]` and its rtc pass (aux losses, §5.4).
      Whether CSMCIR keeps them is UNKNOWN (§7).
    sprc_ffn_routing: SPRC's Q-Former quirk (§4): in image-less passes (the second query pass, the rtc pass)
      every position, query/prompt slots included, uses the text feed-forward. False: those slots use the
      query feed-forward (HF/LAVIS routing, which SPRC's image-less passes cannot run).
    """

    qformer: QFormerConfig
    embed_dim: int = 256
    symmetric: bool = True
    query_passes: int = 1
    target_pool: str = "query_tokens"
    share_projections: bool = False
    tau_init: float = 0.07
    learn_tau: bool = True
    tau_clamp: tuple[float, float] | None = None
    use_prompt_tokens: bool = False
    sprc_ffn_routing: bool = False

    def __post_init__(self):
        if not isinstance(self.qformer, QFormerConfig):
            raise ValueError(f"qformer must be a QFormerConfig, got {type(self.qformer).__name__}")
        if not self.qformer.use_qformer_text_input:
            raise ValueError("qformer.use_qformer_text_input must be True: both towers feed text to the Q-Former")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.query_passes not in (1, 2):
            raise ValueError(f"query_passes must be 1 or 2, got {self.query_passes}")
        if self.target_pool not in TARGET_POOLS:
            raise ValueError(f"target_pool must be one of {TARGET_POOLS}, got {self.target_pool!r}")
        if not self.symmetric and self.target_pool != "query_tokens":
            raise ValueError("target_pool='cls' needs symmetric=True (the asymmetric target has no caption [CLS])")
        if not self.tau_init > 0:
            raise ValueError(f"tau_init must be > 0, got {self.tau_init}")
        if self.tau_clamp is not None:
            clamp = tuple(float(t) for t in self.tau_clamp)
            if len(clamp) != 2 or not 0 < clamp[0] < clamp[1]:
                raise ValueError(f"tau_clamp must be (low, high) with 0 < low < high, got {self.tau_clamp}")
            object.__setattr__(self, "tau_clamp", clamp)

    @property
    def num_targets_per_image(self) -> int:
        """K of the target embeddings `[batch, K, embed_dim]`."""
        return self.qformer.num_query_tokens if self.target_pool == "query_tokens" else 1

    @property
    def has_vision_proj(self) -> bool:
        return self.target_pool == "query_tokens" and not self.share_projections

    @classmethod
    def tiny(cls, qformer_config: QFormerConfig | None = None, **overrides: Any) -> CSMCIRConfig:
        """Tests: `QFormerConfig.tiny()` (hidden 32, 8 queries, 48-wide image features) and embed_dim 16."""
        return cls(**{"qformer": qformer_config or QFormerConfig.tiny(), "embed_dim": 16, **overrides})

    @classmethod
    def blip2(cls, qformer_config: QFormerConfig | None = None, **overrides: Any) -> CSMCIRConfig:
        """BLIP-2 stage-1 Q-Former (`QFormerConfig.blip2`, 32 queries over ViT-g features) and embed_dim 256."""
        return cls(**{"qformer": qformer_config or QFormerConfig.blip2(), "embed_dim": 256, **overrides})


class CSMCIR(nn.Module):
    """The shared-Q-Former dual tower (see the module docstring). Embeddings are float32 and unit-norm."""

    config: CSMCIRConfig

    def setup(self):
        cfg = self.config
        qcfg = cfg.qformer
        self.qformer = qformer.QFormer(qcfg)
        self.text_proj = vit.Dense(qcfg, (cfg.embed_dim,), ("embed", None))
        if cfg.has_vision_proj:
            self.vision_proj = vit.Dense(qcfg, (cfg.embed_dim,), ("embed", None))
        init = nn.with_logical_partitioning(nn.initializers.constant(cfg.tau_init), ())
        self.temp = self.param("temp", init, (), jnp.float32)
        if cfg.use_prompt_tokens:
            init = nn.with_logical_partitioning(nn.initializers.normal(_PROMPT_INIT_STDDEV), (None, "embed"))
            shape = (qcfg.num_query_tokens, qcfg.hidden_size)
            self.prompt_tokens = self.param("prompt_tokens", init, shape, qcfg.param_dtype)

    def _imageless_ffn(self) -> str:
        return "text" if self.config.sprc_ffn_routing else "query"

    def _project(self, proj: nn.Module, hidden: Array) -> Array:
        """`[..., hidden] -> [..., embed_dim]` float32, unit-norm."""
        return l2_normalize(proj(hidden).astype(jnp.float32))

    def encode_query(
        self, image_features: Array, text_ids: Array, text_mask: Array, *, deterministic: bool = True
    ) -> dict[str, Array]:
        """Composed query of (reference image, modification text).

        Args:
          image_features: `[batch, image_len, encoder_hidden]` frozen-ViT features of the reference images.
          text_ids, text_mask: `[batch, text_len]` token ids (starting with `[CLS]`) and 1/0 padding mask.
        Returns:
          {"query": `[batch, embed_dim]` unit-norm float32, "fusion_tokens": `[batch, Q, hidden]` the fused
          pass's query outputs (SPRC's align term input)}.
        """
        num_queries = self.config.qformer.num_query_tokens
        fused = self.qformer(
            input_ids=text_ids,
            text_attention_mask=text_mask,
            image_features=image_features,
            deterministic=deterministic,
        )
        fusion_tokens = fused[:, :num_queries]
        if self.config.query_passes == 2:
            fused = self.qformer(
                query_tokens_override=fusion_tokens,
                input_ids=text_ids,
                text_attention_mask=text_mask,
                deterministic=deterministic,
                allow_queries_without_image=True,
                query_ffn=self._imageless_ffn(),
            )
        return {"query": self._project(self.text_proj, fused[:, num_queries]), "fusion_tokens": fusion_tokens}

    def encode_target(
        self,
        image_features: Array,
        caption_ids: Array | None = None,
        caption_mask: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Array:
        """Target embeddings `[batch, K, embed_dim]` (unit-norm float32; K = Q or 1, `num_targets_per_image`).

        image_features: `[batch, image_len, encoder_hidden]`; caption_ids / caption_mask: `[batch, caption_len]`
        (required when symmetric, ignored otherwise).
        """
        cfg = self.config
        num_queries = cfg.qformer.num_query_tokens
        if not cfg.symmetric:
            hidden = self.qformer(image_features=image_features, deterministic=deterministic)
        else:
            if caption_ids is None:
                raise ValueError("symmetric=True: encode_target needs caption_ids (the target's caption)")
            hidden = self.qformer(
                input_ids=caption_ids,
                text_attention_mask=caption_mask,
                image_features=image_features,
                deterministic=deterministic,
            )
        if cfg.target_pool == "cls":
            return self._project(self.text_proj, hidden[:, num_queries])[:, None]
        proj = self.vision_proj if cfg.has_vision_proj else self.text_proj
        return self._project(proj, hidden[:, :num_queries])

    def encode_rtc(self, text_ids: Array, text_mask: Array, *, deterministic: bool = True) -> Array:
        """SPRC's relative-text query `[batch, embed_dim]`: the prompt tokens inserted after `[CLS]` of the text,
        no image (SPRC's `no_img=True` pass), `text_proj` of the `[CLS]` state (index 0), unit-norm float32."""
        if not self.config.use_prompt_tokens:
            raise ValueError("encode_rtc needs use_prompt_tokens=True")
        prompt = jnp.broadcast_to(self.prompt_tokens, (text_ids.shape[0], *self.prompt_tokens.shape))
        hidden = self.qformer(
            query_tokens_override=prompt,
            input_ids=text_ids,
            text_attention_mask=text_mask,
            deterministic=deterministic,
            queries_after_cls=True,
            query_ffn=self._imageless_ffn(),
        )
        return self._project(self.text_proj, hidden[:, 0])

    def temperature(self) -> Array:
        """The float32 scalar tau of `logits = similarity / tau` (raw parameter as SPRC's `temp`; clipped to
        `tau_clamp`; a constant for gradients when not `learn_tau`)."""
        tau = self.temp if self.config.learn_tau else jax.lax.stop_gradient(self.temp)
        if self.config.tau_clamp is not None:
            tau = jnp.clip(tau, *self.config.tau_clamp)
        return tau

    def __call__(
        self,
        ref_features: Array,
        text_ids: Array,
        text_mask: Array,
        tgt_features: Array,
        caption_ids: Array | None = None,
        caption_mask: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """Both towers on a batch of triplets (creates every parameter at init).

        Returns {"query": `[batch, D]`, "targets": `[batch, K, D]`, "temperature": `[]`} and, with
        `use_prompt_tokens`, "rtc_query" `[batch, D]`, "fusion_tokens" `[batch, Q, hidden]` and
        "prompt_tokens" `[batch, Q, hidden]` (broadcast; SPRC's align target, stop-gradient is the loss's job).
        """
        query = self.encode_query(ref_features, text_ids, text_mask, deterministic=deterministic)
        out = {
            "query": query["query"],
            "targets": self.encode_target(tgt_features, caption_ids, caption_mask, deterministic=deterministic),
            "temperature": self.temperature(),
        }
        if self.config.use_prompt_tokens:
            out["rtc_query"] = self.encode_rtc(text_ids, text_mask, deterministic=deterministic)
            out["fusion_tokens"] = query["fusion_tokens"]
            out["prompt_tokens"] = jnp.broadcast_to(self.prompt_tokens, query["fusion_tokens"].shape)
        return out


def init_params(config: CSMCIRConfig, rng: Array, *, image_tokens: int, text_len: int) -> Any:
    """Randomly initialised params (`nn.LogicallyPartitioned` leaves) from `CSMCIR.__call__` on zeros of
    `[1, image_tokens, encoder_hidden]` features and `[1, text_len]` texts/captions.

    `sharding.sharded_init(functools.partial(init_params, config, image_tokens=..., text_len=...), rng,
    mesh=mesh)` creates them sharded. Apply with `CSMCIR(config).apply({"params": params}, ...)` (or
    `method="encode_query"` / `"encode_target"` / `"encode_rtc"`).
    """
    qcfg = config.qformer
    features = jnp.zeros((1, image_tokens, qcfg.encoder_hidden_size), qcfg.dtype)
    ids = jnp.zeros((1, text_len), jnp.int32)
    mask = jnp.ones((1, text_len), jnp.int32)
    return CSMCIR(config).init(rng, features, ids, mask, features, ids, mask)["params"]


def trainable_mask(params: Any, config: CSMCIRConfig | None = None) -> Any:
    """A tree of bools with the structure of `params` (boxed or not): every leaf trainable, except `temp`
    when `config.learn_tau` is False (so weight decay cannot move it either)."""
    frozen_temp = config is not None and not config.learn_tau

    def trainable(path: tuple[Any, ...], _: Any) -> bool:
        return not (frozen_temp and getattr(path[0], "key", None) == "temp")

    return jax.tree_util.tree_map_with_path(trainable, params)


# ----------------------------------------------------------------------------------------------------------
# HF BLIP-2 (`Blip2ForImageTextRetrieval`, e.g. `Salesforce/blip2-itm-vit-g`) weights.


def export_heads(params: Any, config: CSMCIRConfig) -> dict[str, dict[str, np.ndarray]]:
    """`{"text_projection": ..., "vision_projection": ...}` Flax Dense params for `hf_import.save_blip2(heads=)`
    (with a shared projection, `text_proj` is written under both names)."""
    flat = traverse_util.flatten_dict(nn.unbox(params))

    def head(name: str) -> dict[str, np.ndarray]:
        return {leaf: np.asarray(jax.device_get(flat[(name, leaf)])) for leaf in ("kernel", "bias")}

    text = head("text_proj")
    return {"text_projection": text, "vision_projection": head("vision_proj") if config.has_vision_proj else text}


def _check_hf_config(config: CSMCIRConfig, hf_dir: str) -> None:
    """ValueError naming every field where `hf_dir/config.json` disagrees with `config`."""
    path = os.path.join(hf_dir, hf_import.CONFIG_FILE)
    with open(path) as f:
        hf_config = json.load(f)
    theirs = QFormerConfig.from_hf_dict(hf_config)
    problems = [
        f"{name}: checkpoint {getattr(theirs, name)!r}, model {getattr(config.qformer, name)!r}"
        for name in _HF_CHECKED_FIELDS
        if getattr(theirs, name) != getattr(config.qformer, name)
    ]
    embed_dim = hf_config.get("image_text_hidden_size", 256)
    if embed_dim != config.embed_dim:
        problems.append(f"embed_dim: checkpoint image_text_hidden_size {embed_dim}, model {config.embed_dim}")
    if problems:
        raise ValueError(f"{path} does not match the CSMCIR config:\n  " + "\n  ".join(problems))


def _replace_leaf(old: Any, new: Any, path: tuple[str, ...]) -> Any:
    """`new` in the place of `old`: same boxing, dtype and (for a jax.Array) placement."""
    if isinstance(old, nn.Partitioned):
        return old.replace_boxed(_replace_leaf(old.unbox(), new, path))
    new = np.asarray(new)
    if new.shape != tuple(old.shape):
        raise ValueError(f"param {'/'.join(path)}: checkpoint shape {new.shape}, model {tuple(old.shape)}")
    new = new.astype(old.dtype)
    if not isinstance(old, jax.Array):
        return new
    # Uncommitted stays uncommitted (a committed copy would recompile every jitted consumer).
    return jax.device_put(new, old.sharding) if old.committed else jnp.asarray(new)


def load_blip2_into(params: Any, config: CSMCIRConfig, hf_dir: str, *, strict: bool = True) -> Any:
    """`params` with the Q-Former, its query tokens and text embeddings, `text_proj` / `vision_proj` and (if the
    checkpoint has them) `temp` and `prompt_tokens` read from a HF `Blip2ForImageTextRetrieval` directory.

    Boxing, dtypes and shardings of `params` are kept. Parameters the checkpoint lacks (`temp`: HF drops it;
    `prompt_tokens`) keep their values and are logged; tensors the model does not use (the ViT, the ITM head)
    are logged as ignored.

    Raises:
      ValueError naming every config field that disagrees with `config.json`, every missing or wrongly-shaped
      tensor, and (with `strict`, else logged) every tensor no part of BLIP-2 explains.
    """
    _check_hf_config(config, hf_dir)
    _, qformer_params = hf_import.load_blip2_qformer(hf_dir, config=config.qformer)
    with hf_import.SafetensorsDir(hf_dir) as reader:
        names = set(reader.names())
        extras = {name: reader.get(name) for name in ("temp", "prompt_tokens") if name in names}
    wanted_heads = {"text_projection": "text_proj"}
    if config.has_vision_proj:
        wanted_heads["vision_projection"] = "vision_proj"
    heads = hf_import.load_blip2_heads(hf_dir, names=tuple(wanted_heads))
    missing = [f"{name}.weight/.bias" for name in wanted_heads if name not in heads]
    if missing:
        raise ValueError(f"{hf_dir}: missing tensors {missing} (the model's {sorted(wanted_heads.values())})")

    loaded: dict[tuple[str, ...], Any] = {
        ("qformer", *path): x for path, x in traverse_util.flatten_dict(qformer_params).items()
    }
    for hf_name, ours in wanted_heads.items():
        loaded |= {(ours, leaf): x for leaf, x in heads[hf_name].items()}
    if "temp" in extras:
        loaded[("temp",)] = np.reshape(extras["temp"], ())
    if "prompt_tokens" in extras and config.use_prompt_tokens:
        loaded[("prompt_tokens",)] = np.reshape(extras["prompt_tokens"], extras["prompt_tokens"].shape[-2:])

    flat = traverse_util.flatten_dict(params)
    unknown_paths = sorted("/".join(p) for p in set(loaded) - set(flat))
    if unknown_paths:
        raise ValueError(f"params lack {unknown_paths}: were they initialised with this config?")
    for path, value in loaded.items():
        flat[path] = _replace_leaf(flat[path], value, path)

    kept = sorted("/".join(p) for p in set(flat) - set(loaded))
    if kept:
        logging.warning("load_blip2_into(%s): not in the checkpoint, kept as they were: %s", hf_dir, kept)
    known = ("qformer.", "query_tokens", "embeddings.", "vision_projection.", "text_projection.", "temp")
    unexpected = sorted(n for n in names if not n.startswith(known + _HF_UNUSED_PREFIXES) and n != "prompt_tokens")
    ignored = sorted(
        {n.split(".")[0] for n in names if n.startswith(_HF_UNUSED_PREFIXES)}
        | {n.rsplit(".", 1)[0] for n in names if n.startswith("vision_projection.") and not config.has_vision_proj}
    )
    if ignored:
        logging.info("load_blip2_into(%s): unused by CSMCIR, ignored: %s", hf_dir, ignored)
    if unexpected:
        message = f"{hf_dir}: unexpected tensors {unexpected} (not part of a BLIP-2 retrieval checkpoint)"
        if strict:
            raise ValueError(message)
        logging.warning("%s; ignored (strict=False)", message)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------
# Frozen-ViT features (spec §14: computed once per image, the training step reads the cache).


def image_features(vit_module: vit.VisionTransformer, vit_params: Any, images: Array) -> Array:
    """Frozen ViT forward: `[batch, H, W, 3]` normalised NHWC images -> `[batch, image_len, hidden]`, no gradient."""
    return jax.lax.stop_gradient(vit_module.apply({"params": vit_params}, images))


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """Image features by id: `features [N, image_len, hidden]` (row i = `ids[i]`) and `index` id -> row."""

    features: np.ndarray
    index: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> list[str]:
        return sorted(self.index, key=self.index.__getitem__)

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Row numbers `[len(ids)]` int32; ValueError naming the ids that are not cached."""
        missing = [i for i in ids if i not in self.index]
        if missing:
            raise ValueError(f"{len(missing)} image ids are not in the feature cache, e.g. {missing[:5]}")
        return np.fromiter((self.index[i] for i in ids), np.int32, len(ids))

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Features `[len(ids), image_len, hidden]` of `ids` (in the cache's dtype)."""
        return self.features[self.rows(ids)]

    def save(self, path: str) -> None:
        """Writes `path` (.npy features) and `path + ".ids.json"` (the ids in row order)."""
        np.save(path, self.features)
        with open(path + ".ids.json", "w") as f:
            json.dump(self.ids, f)

    @classmethod
    def load(cls, path: str, mmap: bool = False) -> FeatureCache:
        """Reads what `save` wrote (`mmap`: memory-map the features instead of reading them)."""
        features = np.load(path, mmap_mode="r" if mmap else None)
        with open(path + ".ids.json") as f:
            ids = json.load(f)
        if len(ids) != features.shape[0]:
            raise ValueError(f"{path}: {features.shape[0]} feature rows but {len(ids)} ids in {path}.ids.json")
        return cls(features, {image_id: row for row, image_id in enumerate(ids)})


def cache_image_features(
    encode_fn: Callable[[np.ndarray], Any],
    image_ids: Sequence[str],
    image_fn: Callable[[str], np.ndarray],
    batch_size: int,
    dtype: Any = np.float16,
) -> FeatureCache:
    """Features of every distinct id in `image_ids`, each computed once.

    Args:
      encode_fn: `[batch_size, H, W, 3] -> [batch_size, image_len, hidden]`, e.g. a jitted `image_features`.
        Every call gets exactly `batch_size` images (the last batch is zero-padded), so it compiles once.
      image_ids: ids to cache (duplicates are computed once; rows follow first occurrence).
      image_fn: id -> `[H, W, 3]` preprocessed image.
      batch_size: images per `encode_fn` call.
      dtype: storage dtype of the cache (features are kept on the host).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    unique = list(dict.fromkeys(image_ids))
    if not unique:
        raise ValueError("cache_image_features: no image ids")
    features: np.ndarray | None = None
    image_shape: tuple[int, ...] | None = None
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        images = [np.asarray(image_fn(image_id)) for image_id in chunk]
        image_shape = image_shape or images[0].shape
        for image_id, image in zip(chunk, images, strict=True):
            if image.shape != image_shape:
                raise ValueError(f"image {image_id!r} has shape {image.shape}, the others {image_shape}")
        batch = np.zeros((batch_size, *image_shape), images[0].dtype)
        batch[: len(chunk)] = np.stack(images)
        out = np.asarray(encode_fn(batch))
        if out.shape[0] != batch_size:
            raise ValueError(f"encode_fn returned {out.shape[0]} rows for a batch of {batch_size} images")
        if features is None:
            features = np.empty((len(unique), *out.shape[1:]), dtype)
        features[start : start + len(chunk)] = out[: len(chunk)]
    return FeatureCache(features, {image_id: row for row, image_id in enumerate(unique)})
