"""The CSMCIR trainer: a shared Q-Former over cached frozen-ViT features, InfoNCE over batch + memory bank.

One run (spec csmcir.md 5-8, 13, 14):

1. **Data.** `jax_hd.data.cir` splits (embedded CSS scenes, or FashionIQ / CIRR from `data.root`); the train
   triplets stream through a checkpointable grain pipeline (`triplet_dataset`, shuffled, SPRC's FashionIQ text
   variants drawn per (seed, position)). Target captions come from an MCoT caption file
   (`jax_hd.csmcir.captions`); for the CSS scenes with no `data.captions_dir` the file is first written from the
   scene graphs into `<workdir>/captions/` and read back, so training always reads captions from a file.
   Texts are BERT-uncased WordPiece ids (`data.max_txt_len_query` / `max_txt_len_caption` tokens).
2. **Frozen-ViT caching** (spec 14). The ViT is frozen, so the features of every image of the train split and of
   the evaluation galleries are computed once (`model.cache_image_features`, float16 by default) and the train
   step receives cached features `[batch, image_tokens, vision_width]`; only the Q-Former side trains.
3. **Train step.** One `jax.jit` with in/out shardings (batch over `("data", "fsdp")`, parameters by their
   logical axes, the bank's M axis on "bank"), state donated. `TrainState.extra = {"bank": MemoryBank}`; the
   bank is created by the same jitted init that creates the params, in the shardings the step returns, so step
   2 does not recompile. Loss -> grads -> AdamW update -> enqueue the step's target embeddings (gradient
   stopped) into the bank. A step with a NaN/inf loss or gradient leaves params, optimizer state and bank
   unchanged but still advances `state.step` (so the bank's insertion steps and the data stream stay aligned
   with the step counter); a warning is logged and the run stops after `train.max_bad_steps_in_a_row`.
4. **Evaluation.** Every `eval.every_steps` steps the model is validated on `eval.select_split` and the best
   params are kept (`<workdir>/best/`, spec 13.8); at the end the last and the best params are evaluated on
   `eval.split`: gallery encoded once per evaluation (target tower: image + caption through the shared
   Q-Former; the asymmetric baseline: image only), queries, then `jax_hd.csmcir.evaluate`
   (CIRR protocol for CSS and CIRR: reference excluded, R@{1,5,10,50}, R_subset@{1,2,3}; FashionIQ under
   `data.fiq_protocol`). Results go to `results.json` and `table.md`.
5. **Checkpoints.** `core.checkpoint.Checkpointer` saves the state (bank included), the grain iterator and the
   config; rerunning resumes bit for bit; SIGTERM saves and exits with status 143.

Loss: `losses.contrastive_loss` (batch + bank when `bank.size > 0`), plus `loss.aux_rtc * rtc +
loss.aux_align * align` from `losses.sprc_losses` when those weights are positive (the asymmetric SPRC baseline:
`model.symmetric=False, query_passes=2, use_prompt_tokens=True`, weights 1/1 on FashionIQ, 0.4/0.4 on CIRR,
no bank). Full CSMCIR: symmetric towers, bank on, auxiliary weights 0 (spec 7 PROPOSAL).

PROPOSAL (embedded default): no pretrained vision weights exist offline, so `vision.kind="tiny"` is a seeded tiny ViT
(8-px patches of the 64-px renders, one encoder layer) kept frozen and cached like EVA ViT-g. Random, it leaves the
composed model below the image-only pixel baseline; `vision.pretrain.objective="scene_attributes"` (cpu_demo,
cpu_test) first trains it on the train split's scene attributes (`vision_pretrain`), then freezes it. A
from-scratch Q-Former starts collapsed (all query embeddings nearly equal, row std ~1e-3), so the
embedded presets use a high peak learning rate; the BLIP-2 presets start from pretrained weights and SPRC's rates.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_hd.core import checkpoint, metrics, sharding, train_state
from jax_hd.core import config as config_lib
from jax_hd.core.metrics import read_json, write_json
from jax_hd.csmcir import captions as captions_lib
from jax_hd.csmcir import evaluate, losses, vision_pretrain
from jax_hd.csmcir import memory_bank as bank_lib
from jax_hd.csmcir import model as model_lib
from jax_hd.data import cir
from jax_hd.models import qformer, vit

__all__ = ["train"]

BATCH_KEYS = ("ref_features", "text_ids", "text_mask", "tgt_features", "caption_ids", "caption_mask", "target_index")

F = config_lib.Field
SCHEMA = {
    "seed": F(int, low=0),
    "jax_cache_dir": F(str),
    "mesh.data": F(int, low=-1),
    "mesh.fsdp": F(int, low=-1),
    "mesh.tensor": F(int, low=-1),
    "distributed.mode": F(str, choices=("auto", "always", "never")),
    "data.dataset": F(str, choices=("css", "fashioniq", "cirr")),
    "data.root": F(str),
    "data.css_seed": F(int, low=0),
    "data.css_num_train": F(int, positive=True),
    "data.css_num_val": F(int, positive=True),
    "data.css_num_test": F(int, positive=True),
    "data.image_size": F(int, positive=True),
    "data.captions_dir": F(str),
    "data.caption_field": F(str),
    "data.max_txt_len_query": F(int, positive=True),
    "data.max_txt_len_caption": F(int, positive=True),
    "data.fiq_protocol": F(str, choices=evaluate.FIQ_PROTOCOLS),
    "data.tokenizer_dir": F(str),
    "data.feature_dtype": F(str, choices=("float16", "float32")),
    "data.cache_features": F(bool),
    "data.skip_missing": F(bool),
    "vision.kind": F(str, choices=("tiny", "blip2")),
    "vision.blip2_dir": F(str),
    "vision.hidden_size": F(int, positive=True),
    "vision.intermediate_size": F(int, positive=True),
    "vision.num_layers": F(int, low=0),
    "vision.num_heads": F(int, positive=True),
    "vision.patch_size": F(int, positive=True),
    "vision.encode_batch_size": F(int, positive=True),
    "vision.pretrain.objective": F(str, choices=("none", "scene_attributes")),
    "vision.pretrain.steps": F(int, low=0),
    "vision.pretrain.batch_size": F(int, positive=True),
    "vision.pretrain.lr": F(float, positive=True),
    "vision.pretrain.weight_decay": F(float, low=0.0),
    "vision.pretrain.warmup_steps": F(int, low=0),
    "vision.pretrain.max_images": F(int),
    "vision.pretrain.eval_images": F(int, positive=True),
    "model.qformer": F(str, choices=("tiny", "blip2")),
    "model.hidden_size": F(int, positive=True),
    "model.num_layers": F(int, positive=True),
    "model.num_heads": F(int, positive=True),
    "model.intermediate_size": F(int, positive=True),
    "model.num_query_tokens": F(int, positive=True),
    "model.cross_attention_frequency": F(int, positive=True),
    "model.dropout": F(float, low=0.0, high=0.9),
    "model.embed_dim": F(int, positive=True),
    "model.symmetric": F(bool),
    "model.query_passes": F(int, choices=(1, 2)),
    "model.target_pool": F(str, choices=("query_tokens", "cls")),
    "model.share_projections": F(bool),
    "model.tau_init": F(float, positive=True),
    "model.learn_tau": F(bool),
    "model.tau_clamp": F((tuple, list), required=False),
    "model.use_prompt_tokens": F(bool),
    "model.sprc_ffn_routing": F(bool),
    "bank.size": F(int, low=0),
    "bank.max_age": F(int),
    "bank.tau_age": F(float, low=0.0),
    "bank.entropy_mode": F(str, choices=bank_lib.ENTROPY_MODES),
    "bank.entropy_weight": F(str, choices=bank_lib.ENTROPY_WEIGHTS),
    "bank.topk": F(int, positive=True),
    "bank.warmup_steps": F(int, low=0),
    "bank.mask_false_negatives": F(bool),
    "bank.dtype": F(str, choices=tuple(bank_lib.BANK_DTYPES)),
    "bank.enqueue_eval_mode": F(bool),
    "loss.aux_rtc": F(float, low=0.0),
    "loss.aux_align": F(float, low=0.0),
    "loss.symmetric_weight": F(float, low=0.0),
    "loss.mask_batch_duplicates": F(bool),
    "optimizer.lr": F(float, positive=True),
    "optimizer.b1": F(float, low=0.0, high=1.0),
    "optimizer.b2": F(float, low=0.0, high=1.0),
    "optimizer.eps": F(float, positive=True),
    "optimizer.weight_decay": F(float, low=0.0),
    "optimizer.schedule": F(str, choices=("onecycle", "constant")),
    "optimizer.pct_start": F(float, low=0.0, high=1.0),
    "optimizer.div_factor": F(float, positive=True),
    "optimizer.final_div_factor": F(float, positive=True),
    "optimizer.sprc_compat_schedule": F(bool),
    "optimizer.sprc_schedule_epochs": F(int, positive=True),
    "optimizer.grad_clip_norm": F(float, low=0.0),
    "train.batch_size": F(int, positive=True),
    "train.epochs": F(int, positive=True),
    "train.max_steps": F(int),
    "train.log_every": F(int, positive=True),
    "train.checkpoint_every": F(int, positive=True),
    "train.keep_checkpoints": F(int, positive=True),
    "train.async_checkpoint": F(bool),
    "train.max_bad_steps_in_a_row": F(int, positive=True),
    "eval.every_steps": F(int, low=0),
    "eval.split": F(str),
    "eval.select_split": F(str),
    "eval.batch_size": F(int, positive=True),
    "eval.max_queries": F(int),
    "eval.select_max_queries": F(int),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """`SCHEMA` plus relations between fields; raises `ConfigError` naming the fields."""
    config_lib.validate(config, SCHEMA)
    problems = []
    d, m = config.data, config.model
    if d.dataset != "css" and not d.root:
        problems.append(f"data.root is required for data.dataset = {d.dataset!r}")
    if d.dataset != "css" and d.caption_field != "none" and m.symmetric and not d.captions_dir:
        problems.append(
            "data.captions_dir is required for the symmetric model on a real dataset "
            "(or set data.caption_field = 'none')"
        )
    if d.caption_field != "none":
        try:
            captions_lib.parse_field(d.caption_field)
        except ValueError as e:
            problems.append(f"data.caption_field: {e} (or 'none': no captions)")
    if config.vision.kind == "blip2" and not config.vision.blip2_dir:
        problems.append("vision.kind = 'blip2' needs vision.blip2_dir (a local HF Blip2ForImageTextRetrieval dir)")
    if config.vision.pretrain.objective != "none" and (config.vision.kind != "tiny" or d.dataset != "css"):
        problems.append(
            f"vision.pretrain.objective = {config.vision.pretrain.objective!r} pre-trains the tiny ViT on the "
            "embedded scenes' graphs: it needs vision.kind = 'tiny' and data.dataset = 'css' (the BLIP-2 ViT is "
            "pretrained and stays frozen)"
        )
    if m.qformer == "blip2" and config.vision.kind != "blip2":
        problems.append("model.qformer = 'blip2' needs vision.kind = 'blip2' (its cross-attention expects ViT-g)")
    if m.tau_clamp is not None and (len(m.tau_clamp) != 2 or not 0 < m.tau_clamp[0] < m.tau_clamp[1]):
        problems.append(f"model.tau_clamp = {m.tau_clamp!r} must be None or (low, high) with 0 < low < high")
    if (config.loss.aux_rtc > 0 or config.loss.aux_align > 0) and not m.use_prompt_tokens:
        problems.append("loss.aux_rtc / loss.aux_align > 0 need model.use_prompt_tokens = True (SPRC's rtc pass)")
    if problems:
        raise config_lib.ConfigError("invalid config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------------------------
# Data: splits, captions, tokens.


def load_split(config: ml_collections.ConfigDict, split: str) -> list[cir.CIRSplit]:
    """The split's `CIRSplit`s: one for CSS and CIRR, the three categories for FashionIQ."""
    d = config.data
    if d.dataset == "css":
        sizes = {"num_train": d.css_num_train, "num_val": d.css_num_val, "num_test": d.css_num_test}
        splits = _embedded_css(d.css_seed, d.image_size, tuple(sorted(sizes.items())))
        if split not in splits:
            raise config_lib.ConfigError(f"css has splits {sorted(splits)}, not {split!r}")
        return [splits[split]]
    if d.dataset == "fashioniq":
        return [
            cir.read_fashioniq(d.root, category, split, skip_missing=d.skip_missing)
            for category in evaluate.FIQ_CATEGORIES
        ]
    return [cir.read_cirr(d.root, split, skip_missing=d.skip_missing)]


@functools.lru_cache(maxsize=2)
def _embedded_css(seed: int, image_size: int, sizes: tuple[tuple[str, int], ...]) -> dict[str, cir.CIRSplit]:
    return cir.embedded_css(seed, image_size=image_size, **dict(sizes))


def train_split(config: ml_collections.ConfigDict) -> tuple[cir.CIRSplit, list[cir.CIRSplit]]:
    """(the training triplets, the splits they come from): FashionIQ's three categories are trained together, as
    SPRC does; their caption files stay per category."""
    parts = load_split(config, "train")
    joined = parts[0] if len(parts) == 1 else cir.concat_splits(parts, f"{config.data.dataset}/train")
    return joined, parts


def caption_file(config: ml_collections.ConfigDict, split: cir.CIRSplit, workdir: str) -> str:
    """The MCoT caption file of `split`: under `data.captions_dir`, or (CSS) written from the scene graphs into
    `<workdir>/captions/` first."""
    d = config.data
    split_name = split.name.split("/")[-1]
    category = split.name.split("/")[1] if d.dataset == "fashioniq" else ""  # "all": what csmcir_captions writes
    if d.captions_dir:
        return captions_lib.caption_path(d.captions_dir, d.dataset, split_name, category)
    if d.dataset != "css":
        raise config_lib.ConfigError("data.captions_dir is required for real datasets")
    path = captions_lib.caption_path(os.path.join(workdir, "captions"), d.dataset, split_name, category)
    if not os.path.exists(path) and jax.process_index() == 0:
        captions_lib.write_captions(path, {i: dict(split.image_captions[i]) for i in split.gallery_ids})
    return path


def caption_fn(config: ml_collections.ConfigDict, splits: Sequence[cir.CIRSplit], workdir: str) -> Callable[[str], str]:
    """image id -> caption text of `data.caption_field` ('' for "none", the no-caption ablation, and for the
    asymmetric model, which reads no caption). Every gallery and target image must have a caption."""
    field = config.data.caption_field
    if field == "none" or not config.model.symmetric:
        return _empty_caption
    table: dict[str, str] = {}
    for split in splits:
        ids = list(dict.fromkeys((*split.gallery_ids, *(i for t in split.triplets for i in t.target_ids))))
        lookup = captions_lib.caption_lookup(
            captions_lib.read_captions(caption_file(config, split, workdir)), field, image_ids=ids
        )
        table.update((i, lookup(i)) for i in ids)
    return table.__getitem__


def _empty_caption(image_id: str) -> str:
    return ""


def _no_pixels(image_id: str) -> np.ndarray:
    """The grain pipelines carry ids only: features come from the frozen-ViT cache."""
    return np.zeros((0,), np.float32)


def make_tokenize(tokenizer: Any) -> Callable[[Sequence[str], int], tuple[np.ndarray, np.ndarray]]:
    """`(texts, max_len) -> (ids [n, max_len] int32, mask [n, max_len] int32)`, BLIP's text cleaning first."""

    def tokenize(texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        out = tokenizer(
            [clean_text(str(t)) for t in texts],
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_tensors="np",
        )
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(np.int32)

    return tokenize


_BLIP_PUNCTUATION = str.maketrans({c: " " for c in '.!"()*#:;~'})


def clean_text(text: str, max_words: int = 50) -> str:
    """LAVIS `blip_caption` processing (spec 2): lowercase, `.!"()*#:;~` -> space, collapse spaces, 50 words."""
    return " ".join(text.lower().translate(_BLIP_PUNCTUATION).split()[:max_words])


def load_tokenizer(config: ml_collections.ConfigDict) -> Any:
    from jax_hd.models import bert, hf_import

    return hf_import.load_tokenizer(config.data.tokenizer_dir or bert.minilm_dir())


# ------------------------------------------------------------------------------------------------------------------
# The frozen image encoder and its feature caches.


@dataclasses.dataclass
class Vision:
    config: vit.ViTConfig
    params: Any
    encode: Callable[[np.ndarray], np.ndarray]  # images [n, S, S, 3] in [0, 1] -> features [n, T, width]


def build_vision(config: ml_collections.ConfigDict, workdir: str = "") -> Vision:
    """The frozen ViT: BLIP-2's EVA ViT-g from `vision.blip2_dir`, or a seeded tiny ViT (PROPOSAL), random or
    pre-trained on the train split's scene attributes (`vision.pretrain`, see `pretrained_tiny_vit`)."""
    v = config.vision
    if v.kind == "blip2":
        from jax_hd.models import hf_import

        vit_config, params = hf_import.load_blip2_vision(v.blip2_dir)
        if vit_config.image_size != config.data.image_size:
            raise config_lib.ConfigError(
                f"data.image_size = {config.data.image_size} but the BLIP-2 ViT in "
                f"{v.blip2_dir} takes {vit_config.image_size} px"
            )
    else:
        vit_config = vit.ViTConfig.tiny(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=config.data.image_size,
            patch_size=v.patch_size,
        )
        params = nn.unbox(vit.init_params(vit_config, jax.random.PRNGKey(config.seed + 7)))
        if v.pretrain.objective != "none":
            params = pretrained_tiny_vit(config, vit_config, params, workdir)
    vit_config = dataclasses.replace(vit_config, frozen=True)
    module = vit.VisionTransformer(vit_config)
    mean = np.asarray(v.pixel_mean, np.float32)
    std = np.asarray(v.pixel_std, np.float32)
    features = jax.jit(lambda p, images: model_lib.image_features(module, p, (images - mean) / std))

    def encode(images: np.ndarray) -> np.ndarray:
        return np.asarray(features(params, jnp.asarray(images, jnp.float32)))

    return Vision(vit_config, params, encode)


def pretrained_tiny_vit(
    config: ml_collections.ConfigDict, vit_config: vit.ViTConfig, params: Any, workdir: str
) -> Any:
    """The tiny ViT after `vision_pretrain.pretrain` on the train split's renders (the val split's for the reported
    accuracy), computed once: params in `<workdir>/vision_pretrained.npz`, metrics in `vision_pretrain.json`."""
    p = config.vision.pretrain
    path = os.path.join(workdir, "vision_pretrained.npz") if workdir else ""
    flat = traverse_util.flatten_dict(params, sep="/")
    if path and os.path.exists(path):
        with np.load(path) as stored:
            if set(stored.files) == set(flat) and all(stored[k].shape == flat[k].shape for k in flat):
                logging.info("pre-trained vision encoder from %s", path)
                return traverse_util.unflatten_dict({k: stored[k] for k in flat}, sep="/")
        logging.warning("%s holds another encoder; pre-training again", path)
    train = load_split(config, "train")[0]
    train_ids = list(train.gallery_ids)
    if p.max_images > 0:
        chosen = np.random.default_rng(config.seed).permutation(len(train_ids))[: p.max_images]
        train_ids = [train_ids[i] for i in chosen]
    size = config.data.image_size
    images, labels = vision_pretrain.render_images(train, train_ids, size)
    held_out = load_split(config, config.eval.select_split)[0]
    eval_images, eval_labels = vision_pretrain.render_images(held_out, held_out.gallery_ids[: p.eval_images], size)
    start = time.monotonic()
    params, pretrain_metrics = vision_pretrain.pretrain(
        vit_config,
        params,
        images,
        labels,
        steps=p.steps,
        batch_size=p.batch_size,
        lr=p.lr,
        weight_decay=p.weight_decay,
        warmup_steps=p.warmup_steps,
        seed=config.seed + 11,
        pixel_mean=config.vision.pixel_mean,
        pixel_std=config.vision.pixel_std,
        eval_images=eval_images,
        eval_labels=eval_labels,
    )
    pretrain_metrics.update(
        objective=p.objective,
        steps=p.steps,
        train_images=len(train_ids),
        eval_split=config.eval.select_split,
        eval_images=len(eval_images),
        seconds=time.monotonic() - start,
    )
    logging.info("vision pre-training: %s", pretrain_metrics)
    if path and jax.process_index() == 0:
        tmp = path + ".tmp.npz"
        np.savez(tmp, **traverse_util.flatten_dict(params, sep="/"))
        os.replace(tmp, path)
        write_json(os.path.join(workdir, "vision_pretrain.json"), pretrain_metrics)
    return params


def feature_cache(
    config: ml_collections.ConfigDict, vision: Vision, splits: Sequence[cir.CIRSplit], workdir: str, name: str
) -> model_lib.FeatureCache:
    """Frozen-ViT features of every image of `splits` (gallery + triplet images), computed once.

    With `data.cache_features` they are also stored as `<workdir>/features_<name>.npy` (+ `.ids.json`) and read
    back (memory-mapped) on reruns.
    """
    owner: dict[str, Callable[[str], np.ndarray]] = {}
    for s in splits:
        image_fn = cir.make_image_fn(s, config.data.image_size)
        for i in (*s.gallery_ids, *(x for t in s.triplets for x in t.image_ids)):
            owner.setdefault(i, image_fn)
    path = os.path.join(workdir, f"features_{name}.npy")
    if config.data.cache_features and os.path.exists(path + ".ids.json"):
        cache = model_lib.FeatureCache.load(path, mmap=True)
        if cache.ids == list(owner):
            return cache
        logging.warning("%s holds other images; recomputing", path)
    dtype = np.float16 if config.data.feature_dtype == "float16" else np.float32
    cache = model_lib.cache_image_features(
        vision.encode, list(owner), lambda i: owner[i](i), config.vision.encode_batch_size, dtype=dtype
    )
    if config.data.cache_features and jax.process_index() == 0:
        cache.save(path)
    return cache


# ------------------------------------------------------------------------------------------------------------------
# Model, optimizer, state.


def model_config_from(config: ml_collections.ConfigDict, vision_config: vit.ViTConfig) -> Any:
    """`CSMCIRConfig` from the config (tiny Q-Former from the fields, or BERT-base BLIP-2)."""
    m = config.model
    if m.qformer == "blip2":
        qf = qformer.QFormerConfig.blip2(
            encoder_hidden_size=vision_config.hidden_size,
            hidden_dropout_prob=m.dropout,
            attention_probs_dropout_prob=m.dropout,
        )
    else:
        qf = qformer.QFormerConfig.tiny(
            vocab_size=30523,
            hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads,
            intermediate_size=m.intermediate_size,
            num_query_tokens=m.num_query_tokens,
            cross_attention_frequency=m.cross_attention_frequency,
            encoder_hidden_size=vision_config.hidden_size,
            max_position_embeddings=max(
                128, config.data.max_txt_len_query + m.num_query_tokens, config.data.max_txt_len_caption
            ),
            hidden_dropout_prob=m.dropout,
            attention_probs_dropout_prob=m.dropout,
        )
    return model_lib.CSMCIRConfig(
        qformer=qf,
        embed_dim=m.embed_dim,
        symmetric=m.symmetric,
        query_passes=m.query_passes,
        target_pool=m.target_pool,
        share_projections=m.share_projections,
        tau_init=m.tau_init,
        learn_tau=m.learn_tau,
        tau_clamp=None if m.tau_clamp is None else tuple(m.tau_clamp),
        use_prompt_tokens=m.use_prompt_tokens,
        sprc_ffn_routing=m.sprc_ffn_routing,
    )


def bank_config_from(config: ml_collections.ConfigDict) -> bank_lib.BankConfig:
    return bank_lib.BankConfig(**config.bank.to_dict())


def target_tokens(model_config: Any) -> int:
    """K, the vectors per target: the query-token count, or 1 for CLS pooling."""
    return model_config.qformer.num_query_tokens if model_config.target_pool == "query_tokens" else 1


def steps_per_epoch(num_triplets: int, global_batch: int) -> int:
    if num_triplets < global_batch:
        raise config_lib.ConfigError(f"train.batch_size = {global_batch} exceeds the {num_triplets} train triplets")
    return num_triplets // global_batch  # drop_last, as SPRC


def total_steps(config: ml_collections.ConfigDict, num_triplets: int) -> int:
    steps = config.train.epochs * steps_per_epoch(num_triplets, config.train.batch_size)
    return min(steps, config.train.max_steps) if config.train.max_steps > 0 else steps


def learning_rate_schedule(config: ml_collections.ConfigDict, num_triplets: int) -> optax.Schedule:
    """torch OneCycleLR (cosine) over `train.epochs` (or SPRC's `sprc_schedule_epochs`) x steps per epoch."""
    o = config.optimizer
    if o.schedule == "constant":
        return optax.constant_schedule(o.lr)
    epochs = o.sprc_schedule_epochs if o.sprc_compat_schedule else config.train.epochs
    length = max(epochs * steps_per_epoch(num_triplets, config.train.batch_size), 2)
    return optax.cosine_onecycle_schedule(
        length, o.lr, pct_start=o.pct_start, div_factor=o.div_factor, final_div_factor=o.final_div_factor
    )


def make_optimizer(config: ml_collections.ConfigDict, num_triplets: int) -> optax.GradientTransformation:
    """AdamW (SPRC: betas (0.9, 0.98), eps 1e-7, wd 0.05 over every trainable param) with the OneCycle schedule."""
    o = config.optimizer
    # A fixed temperature (learn_tau=False) gets no gradient (stop_gradient in the model) and no weight decay.
    adamw = optax.adamw(
        learning_rate_schedule(config, num_triplets),
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        mask=None if config.model.learn_tau else _all_but_temperature,
    )
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw) if o.grad_clip_norm > 0 else adamw


def _all_but_temperature(params: Any) -> Any:
    """True for every leaf but `temp`, with the structure of `params` (boxed at `tx.init`, unboxed later)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[0], "key", None) != "temp", params)


def init_fn_for(
    model_config: Any, bank_config: bank_lib.BankConfig, *, image_tokens: int, text_len: int, params: Any = None
) -> Callable[[jax.Array], tuple[Any, Any]]:
    """`rng -> (params, {"bank": boxed bank} or None)` for `train_state.create_train_state`.

    `params` (e.g. loaded BLIP-2 weights, host arrays) replace the random init; the bank is always built inside.
    """

    def init_fn(rng: jax.Array) -> tuple[Any, Any]:
        p = model_lib.init_params(model_config, rng, image_tokens=image_tokens, text_len=text_len)
        if params is not None:
            p = jax.tree.map(
                lambda box, value: (
                    box.replace_boxed(jnp.asarray(value))
                    if isinstance(box, nn.LogicallyPartitioned)
                    else jnp.asarray(value)
                ),
                p,
                params,
                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
            )
        if not bank_config.enabled:
            return p, None
        bank = bank_lib.init_bank(bank_config, target_tokens(model_config), model_config.embed_dim)
        return p, {"bank": bank_lib.boxed_bank(bank)}

    return init_fn


# ------------------------------------------------------------------------------------------------------------------
# The train step.


def loss_fn(
    model: Any,
    bank_config: bank_lib.BankConfig,
    loss_config: Mapping[str, Any],
    params: Any,
    batch: Mapping[str, jax.Array],
    bank: bank_lib.MemoryBank | None,
    step: jax.Array,
    dropout_rng: jax.Array | None,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array]]:
    """(loss, (metrics, targets `[batch, K, D]`)) of one batch (`BATCH_KEYS`, each `[batch, ...]`)."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    out = model.apply(
        {"params": params},
        batch["ref_features"],
        batch["text_ids"],
        batch["text_mask"],
        batch["tgt_features"],
        batch["caption_ids"],
        batch["caption_mask"],
        deterministic=dropout_rng is None,
        rngs=rngs,
    )
    loss, aux = losses.contrastive_loss(
        out["query"],
        out["targets"],
        batch["target_index"],
        out["temperature"],
        bank=bank,
        bank_config=bank_config,
        step=step,
        mask_batch_duplicates=loss_config["mask_batch_duplicates"],
        symmetric_weight=loss_config["symmetric_weight"],
    )
    if loss_config["aux_rtc"] > 0 or loss_config["aux_align"] > 0:
        sprc = losses.sprc_losses(
            out["query"],
            out["rtc_query"],
            out["targets"],
            out["temperature"],
            out["fusion_tokens"],
            out["prompt_tokens"],
        )
        loss = loss + loss_config["aux_rtc"] * sprc["rtc"] + loss_config["aux_align"] * sprc["align"]
        aux = {**aux, "loss_rtc": sprc["rtc"], "loss_align": sprc["align"], "loss": loss}
    aux = {**aux, "temperature": jnp.asarray(out["temperature"], jnp.float32)}
    return loss, (aux, out["targets"])


def eval_mode_targets(model: Any, params: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Target embeddings `[batch, K, D]` of the batch's targets without dropout (`bank.enqueue_eval_mode`)."""
    return model.apply(
        {"params": params},
        batch["tgt_features"],
        batch["caption_ids"],
        batch["caption_mask"],
        deterministic=True,
        method="encode_target",
    )


def batch_shardings(mesh: Mesh) -> dict[str, NamedSharding]:
    ndims = {"ref_features": 3, "tgt_features": 3, "target_index": 1}
    return {k: sharding.batch_sharding(mesh, ndims.get(k, 2)) for k in BATCH_KEYS}


def make_train_step(
    model: Any,
    tx: optax.GradientTransformation,
    bank_config: bank_lib.BankConfig,
    loss_config: Mapping[str, Any],
    state_shardings: train_state.TrainState,
    mesh: Mesh,
    use_dropout: bool = True,
) -> Callable[..., Any]:
    """Jitted `(state, batch) -> (state, metrics)`: loss -> grads -> guarded AdamW update -> enqueue the targets.

    metrics: the loss's (`loss`, `batch_acc`, `num_negatives`, bank stats, ...), `grad_norm`, `skipped` (1.0 when
    the update was dropped because the loss or a gradient was not finite). State donated, layouts fixed.
    """
    loss_config = dict(loss_config)

    def step(state: train_state.TrainState, batch: dict[str, jax.Array]):
        state, step_rng = state.split_rng()
        bank = state.extra.get("bank") if bank_config.enabled else None
        grad_fn = jax.value_and_grad(functools.partial(loss_fn, model, bank_config, loss_config), has_aux=True)
        (loss, (aux, targets)), grads = grad_fn(
            state.params, batch, bank, state.step, step_rng if use_dropout else None
        )
        finite = train_state.all_finite(loss, grads)
        new_state = train_state.guarded_update(state, grads, tx, finite)
        if bank is not None:
            if use_dropout and bank_config.enqueue_eval_mode:
                targets = eval_mode_targets(model, state.params, batch)
            enqueued = bank_lib.enqueue(bank, jax.lax.stop_gradient(targets), batch["target_index"], state.step)
            kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), enqueued, bank)
            new_state = new_state.replace(extra={**new_state.extra, "bank": kept})
        return new_state, {
            **aux,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "skipped": 1.0 - finite.astype(jnp.float32),
        }

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings(mesh)),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


# ------------------------------------------------------------------------------------------------------------------
# Host-side batches.


@dataclasses.dataclass
class TrainData:
    """Everything the loop needs to turn an element of the grain stream into a device batch."""

    split: cir.CIRSplit
    features: Any  # model.FeatureCache over the split's images
    image_index: dict[str, int]  # image id -> int id (bank ids, duplicate masks)
    tokenize: Callable[[Sequence[str], int], tuple[np.ndarray, np.ndarray]]
    max_txt_len_query: int
    max_txt_len_caption: int
    captions: Callable[[str], str]  # target id -> caption text


def train_iterator(
    config: ml_collections.ConfigDict, split: cir.CIRSplit, captions: Callable[[str], str]
) -> grain.DatasetIterator:
    """The checkpointable, shuffled, repeated stream of global batches of ids and texts (no pixels)."""
    ds = cir.triplet_dataset(
        split,
        _no_pixels,
        caption_fn=captions,
        with_targets=True,
        shuffle_seed=config.seed,
        num_epochs=None,
        text_seed=config.seed + 1,
        batch_size=config.train.batch_size,
        drop_remainder=True,
    )
    return iter(ds.to_iter_dataset())


def host_batch(data: TrainData, element: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A grain element (global batch of ids and texts) -> `BATCH_KEYS` numpy arrays."""
    text_ids, text_mask = data.tokenize(list(element["modification_text"]), data.max_txt_len_query)
    caption_ids, caption_mask = data.tokenize(list(element["target_caption"]), data.max_txt_len_caption)
    return {
        "ref_features": data.features.lookup(list(element["reference_id"])),
        "text_ids": text_ids,
        "text_mask": text_mask,
        "tgt_features": data.features.lookup(list(element["target_id"])),
        "caption_ids": caption_ids,
        "caption_mask": caption_mask,
        "target_index": np.asarray([data.image_index[i] for i in element["target_id"]], np.int32),
    }


def to_device(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch (the same on every process) -> arrays sharded over data x fsdp (this process's rows)."""
    count, index = jax.process_count(), jax.process_index()
    return sharding.shard_batch({k: np.array_split(v, count)[index] for k, v in batch.items()}, mesh)


# ------------------------------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class EvalSet:
    """One evaluation split (a FashionIQ category, the CIRR val split, a CSS split) with its feature cache."""

    split: cir.CIRSplit
    features: Any
    triplets: list[cir.CIRTriplet]
    gallery_ids: np.ndarray
    caption_ids: np.ndarray
    caption_mask: np.ndarray
    text_ids: np.ndarray
    text_mask: np.ndarray


def build_eval_sets(
    config: ml_collections.ConfigDict,
    split_name: str,
    vision: Vision,
    tokenize: Callable,
    workdir: str,
    max_queries: int,
) -> list[EvalSet]:
    d = config.data
    splits = load_split(config, split_name)
    captions = caption_fn(config, splits, workdir)
    cache = feature_cache(config, vision, splits, workdir, split_name)
    sets = []
    for split in splits:
        triplets = [t for t in split.triplets if t.target_ids]
        if max_queries > 0:
            triplets = triplets[:max_queries]
        if not triplets:
            raise ValueError(f"{split.name} has no triplets with targets (a withheld test split?)")
        gallery = np.asarray(split.gallery_ids)
        if d.dataset == "fashioniq":
            gallery = evaluate.fashioniq_gallery(
                d.fiq_protocol,
                [t.reference_id for t in triplets],
                [t.target_ids[0] for t in triplets],
                split.gallery_ids,
            )
        caption_ids, caption_mask = tokenize([captions(i) for i in gallery], d.max_txt_len_caption)
        text_ids, text_mask = tokenize(
            [cir.join_modification_texts(t.modification_texts) for t in triplets], d.max_txt_len_query
        )
        sets.append(EvalSet(split, cache, triplets, gallery, caption_ids, caption_mask, text_ids, text_mask))
    return sets


def make_encoders(model: Any, param_shardings: Any, mesh: Mesh) -> tuple[Callable, Callable]:
    """Jitted `(params, features, ids, mask) -> [n, K, D]` targets and `-> [n, D]` queries, outputs replicated."""
    rows3, rows2 = sharding.batch_sharding(mesh, 3), sharding.batch_sharding(mesh, 2)
    replicated = NamedSharding(mesh, P())

    def targets(params, features, ids, mask):
        return model.apply({"params": params}, features, ids, mask, method="encode_target")

    def queries(params, features, ids, mask):
        return model.apply({"params": params}, features, ids, mask, method="encode_query")["query"]

    kwargs = dict(in_shardings=(param_shardings, rows3, rows2, rows2), out_shardings=replicated)
    return jax.jit(targets, **kwargs), jax.jit(queries, **kwargs)


def _encode_all(
    fn: Callable,
    params: Any,
    features: Any,
    image_ids: Sequence[str],
    ids: np.ndarray,
    mask: np.ndarray,
    batch_size: int,
    mesh: Mesh,
) -> np.ndarray:
    """Runs `fn` over fixed-size padded chunks; returns the `[n, ...]` outputs as numpy."""
    batch_size = -(-batch_size // sharding.batch_parallelism(mesh)) * sharding.batch_parallelism(mesh)
    out = []
    for start in range(0, len(image_ids), batch_size):
        chunk = slice(start, start + batch_size)
        rows = len(image_ids[chunk])
        pad = batch_size - rows
        arrays = [features.lookup(list(image_ids[chunk])), ids[chunk], mask[chunk]]
        arrays = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a for a in arrays]
        placed = to_device(dict(zip(("f", "i", "m"), arrays, strict=True)), mesh)
        out.append(np.asarray(fn(params, placed["f"], placed["i"], placed["m"]))[:rows])
    return np.concatenate(out)


def evaluate_set(
    params: Any, s: EvalSet, encoders: tuple[Callable, Callable], config: ml_collections.ConfigDict, mesh: Mesh
) -> dict[str, float]:
    """The benchmark's metrics of one split: gallery encoded once, composed queries, `jax_hd.csmcir.evaluate`."""
    encode_targets, encode_queries = encoders
    bs, dataset = config.eval.batch_size, config.data.dataset
    gallery = _encode_all(
        encode_targets, params, s.features, list(s.gallery_ids), s.caption_ids, s.caption_mask, bs, mesh
    )
    references = np.asarray([t.reference_id for t in s.triplets])
    targets = np.asarray([t.target_ids[0] for t in s.triplets])
    queries = _encode_all(encode_queries, params, s.features, list(references), s.text_ids, s.text_mask, bs, mesh)
    if dataset == "fashioniq":
        protocol = config.data.fiq_protocol
        exclude = evaluate.fashioniq_exclude_indices(protocol, s.gallery_ids, references)
    else:
        exclude = evaluate.ids_to_indices(references, s.gallery_ids)
    k = min(50, len(s.gallery_ids) - (exclude is not None))
    _, top = evaluate.top_k_gallery(queries, gallery, k, exclude_indices=exclude)
    ranked = s.gallery_ids[top]
    if dataset == "fashioniq":
        category = s.split.name.split("/")[1]
        recalls = evaluate.fashioniq_category_recalls(ranked, targets, references, protocol)
        return {f"{protocol}/{category}/R@{k}": v for k, v in recalls.items()}
    members = np.asarray([t.subset_ids for t in s.triplets])
    member_scores = evaluate.gather_scores(queries, gallery, evaluate.ids_to_indices(members, s.gallery_ids))
    subset = evaluate.rank_subset(members, member_scores, references)
    results = evaluate.cirr_metrics(ranked, targets, references, subset)
    return {k.replace("cirr/", f"{dataset}/"): v for k, v in results.items()}


def run_evaluation(
    params: Any,
    sets: Sequence[EvalSet],
    encoders: tuple[Callable, Callable],
    config: ml_collections.ConfigDict,
    mesh: Mesh,
) -> dict[str, float]:
    """All metrics of one split (FashionIQ: per category and the protocol-named averages)."""
    results: dict[str, float] = {}
    for s in sets:
        results.update(evaluate_set(params, s, encoders, config, mesh))
    if config.data.dataset == "fashioniq":
        protocol = config.data.fiq_protocol
        per_category = {
            s.split.name.split("/")[1]: {
                k: results[f"{protocol}/{s.split.name.split('/')[1]}/R@{k}"] for k in evaluate.FIQ_KS
            }
            for s in sets
        }
        results.update(evaluate.fashioniq_summary(per_category, protocol))
    return results


def selection_score(results: Mapping[str, float], config: ml_collections.ConfigDict) -> float:
    """SPRC's model-selection number: FashionIQ (avg R@10 + avg R@50) / 2; CIRR/CSS the mean of the 7 recalls."""
    if config.data.dataset == "fashioniq":
        return results[f"{config.data.fiq_protocol}/average/mean"]
    name = config.data.dataset
    keys = [f"{name}/R@{k}" for k in evaluate.CIRR_KS] + [f"{name}/R_subset@{k}" for k in evaluate.CIRR_SUBSET_KS]
    return float(np.mean([results[k] for k in keys]))


# ------------------------------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Run:
    """The fixed pieces of a run (built once by `build_run`)."""

    mesh: Mesh
    rules: tuple
    model: Any
    model_config: Any
    bank_config: bank_lib.BankConfig
    tx: optax.GradientTransformation
    abstract_state: train_state.TrainState
    state_shardings: train_state.TrainState
    init_fn: Callable[[jax.Array], tuple[Any, Any]]
    data: TrainData
    vision: Vision
    num_steps: int


def build_run(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Mesh, data, feature caches, model, optimizer and the abstract sharded state."""
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.normalize_rules(config.sharding_rules)
    global_batch = config.train.batch_size
    if global_batch % sharding.batch_parallelism(mesh):
        raise config_lib.ConfigError(
            f"train.batch_size = {global_batch} must divide by data*fsdp = {sharding.batch_parallelism(mesh)}"
        )
    try:
        bank_lib.check_bank_size(config.bank.size, global_batch)
    except ValueError as e:
        raise config_lib.ConfigError(f"bank.size / train.batch_size: {e}") from e
    split, parts = train_split(config)
    tokenizer = load_tokenizer(config)
    vision = build_vision(config, workdir)
    captions = caption_fn(config, parts, workdir)
    features = feature_cache(config, vision, [split], workdir, "train")
    image_index = {image_id: i for i, image_id in enumerate(features.ids)}
    data = TrainData(
        split,
        features,
        image_index,
        make_tokenize(tokenizer),
        config.data.max_txt_len_query,
        config.data.max_txt_len_caption,
        captions,
    )
    model_config = model_config_from(config, vision.config)
    bank_config = bank_config_from(config)
    params = None
    if config.model.qformer == "blip2":
        abstract = jax.eval_shape(
            functools.partial(model_lib.init_params, model_config, image_tokens=1, text_len=1), jax.random.PRNGKey(0)
        )
        params = model_lib.load_blip2_into(
            jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.unbox(abstract)),
            model_config,
            config.vision.blip2_dir,
        )
    init_fn = init_fn_for(
        model_config,
        bank_config,
        image_tokens=vision.config.num_positions,
        text_len=config.data.max_txt_len_query,
        params=params,
    )
    tx = make_optimizer(config, len(split.triplets))
    with nn.logical_axis_rules(rules):
        abstract = train_state.abstract_train_state(init_fn, tx, jax.random.PRNGKey(config.seed), mesh, rules)
    return Run(
        mesh,
        rules,
        model_lib.CSMCIR(model_config),
        model_config,
        bank_config,
        tx,
        abstract,
        jax.tree.map(lambda x: x.sharding, abstract),
        init_fn,
        data,
        vision,
        total_steps(config, len(split.triplets)),
    )




PLOT_KEYS = ("loss", "batch_acc", "num_negatives", "temperature", "bank_entropy", "grad_norm", "select_score")


def train(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
    """Trains (resuming from `<workdir>/checkpoints`), evaluates, writes results; returns the final state.

    Raises `checkpoint.Preempted` after saving on SIGTERM, `train_state.NonFiniteError` after too many skipped updates,
    `ConfigError` for a bad config and `checkpoint.CheckpointMismatchError` for a checkpoint of another config.
    """
    check_config(config)
    if config.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.jax_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    sharding.maybe_initialize_distributed(config.distributed.mode)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    r = build_run(config, workdir)
    logging.info(
        "mesh %s; %d train triplets, %d images; %d steps of %d; bank %d",
        dict(r.mesh.shape),
        len(r.data.split.triplets),
        len(r.data.features.ids),
        r.num_steps,
        config.train.batch_size,
        r.bank_config.size,
    )
    t = config.train
    train_iter = train_iterator(config, r.data.split, r.data.captions)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=t.checkpoint_every,
        keep=t.keep_checkpoints,
        async_save=t.async_checkpoint,
    )
    best_ckpt = None
    try:
        if ckpt.latest_step() is not None:
            state = ckpt.restore(r.abstract_state, train_iter)
        else:
            with nn.logical_axis_rules(r.rules):
                state, _ = train_state.create_train_state(
                    r.init_fn, r.tx, jax.random.PRNGKey(config.seed), r.mesh, r.rules
                )
        start = int(state.step)
        tokenize = r.data.tokenize
        select_sets = None
        if config.eval.every_steps:
            select_sets = build_eval_sets(
                config, config.eval.select_split, r.vision, tokenize, workdir, config.eval.select_max_queries
            )
            best_ckpt = checkpoint.Checkpointer(
                os.path.join(workdir, "best"), save_every=1, keep=1, async_save=False, handle_sigterm=False
            )
        best_path = os.path.join(workdir, "best.json")
        best = read_json(best_path)
        guard = train_state.NonFiniteGuard(t.max_bad_steps_in_a_row, "train.max_bad_steps_in_a_row")
        writer = metrics.MetricWriter(
            workdir, r.num_steps, start_step=start, console_keys=("loss", "batch_acc", "select_score")
        )
        loss_config = config.loss.to_dict()
        with jax.set_mesh(r.mesh), nn.logical_axis_rules(r.rules):
            step_fn = make_train_step(
                r.model,
                r.tx,
                r.bank_config,
                loss_config,
                r.state_shardings,
                r.mesh,
                use_dropout=config.model.dropout > 0,
            )
            encoders = make_encoders(r.model, r.state_shardings.params, r.mesh)
            for step in range(start + 1, r.num_steps + 1):
                batch = to_device(host_batch(r.data, next(train_iter)), r.mesh)
                state, step_metrics = step_fn(state, batch)
                guard.update(bool(step_metrics["skipped"] > 0), step)
                scalars = dict(step_metrics)
                if select_sets is not None and (step % config.eval.every_steps == 0 or step == r.num_steps):
                    results = run_evaluation(state.params, select_sets, encoders, config, r.mesh)
                    score = selection_score(results, config)
                    scalars["select_score"] = score
                    if score > best.get("score", -1.0):
                        best = {"step": step, "score": score, "split": config.eval.select_split, **results}
                        best_ckpt.save(step, {"params": state.params}, force=True)
                        best_ckpt.wait()
                        write_json(best_path, best)
                if step % t.log_every == 0 or step == r.num_steps or "select_score" in scalars:
                    writer.write(step, scalars)
                preempted = ckpt.should_stop(step)
                ckpt.save(step, state, train_iter, config, force=preempted or step == r.num_steps)
                if preempted and step < r.num_steps:
                    writer.close()
                    logging.warning("preempted: saved step %d; rerun the same command to resume", step)
                    raise checkpoint.Preempted(f"step {step}")
            writer.close()
            final = final_evaluation(config, r, state, best, best_ckpt, encoders, workdir)
    finally:
        ckpt.close()
        if best_ckpt is not None:
            best_ckpt.close()
    if jax.process_index() == 0:
        metrics.plot_metrics(
            writer.jsonl_path,
            os.path.join(workdir, "metrics.png"),
            [k for k in PLOT_KEYS if k != "bank_entropy" or r.bank_config.enabled],
        )
        logging.info("done: %s; outputs in %s", final["last"], workdir)
    return state


def final_evaluation(
    config: ml_collections.ConfigDict,
    r: Run,
    state: train_state.TrainState,
    best: Mapping,
    best_ckpt: checkpoint.Checkpointer | None,
    encoders: tuple[Callable, Callable],
    workdir: str,
) -> dict[str, Any]:
    """Evaluates the last (and the kept best) params on `eval.split`; writes results.json and table.md."""
    sets = build_eval_sets(config, config.eval.split, r.vision, r.data.tokenize, workdir, config.eval.max_queries)
    payload: dict[str, Any] = {
        "dataset": config.data.dataset,
        "split": config.eval.split,
        "backbone": config.vision.kind,
        "symmetric": config.model.symmetric,
        "bank_size": config.bank.size,
        "caption_field": config.data.caption_field,
        "steps": int(state.step),
        "last": run_evaluation(state.params, sets, encoders, config, r.mesh),
    }
    tables = [f"## last params (step {int(state.step)})\n\n{evaluate.format_table(payload['last'])}"]
    if best and best_ckpt is not None and best_ckpt.latest_step() is not None and best["step"] != int(state.step):
        params = best_ckpt.restore({"params": r.abstract_state.params})["params"]
        payload["best"] = {
            "step": best["step"],
            "select_split": best["split"],
            "select_score": best["score"],
            **run_evaluation(params, sets, encoders, config, r.mesh),
        }
        tables.append(
            f"## best params (step {best['step']}, selected on {best['split']})\n\n"
            f"{evaluate.format_table({k: v for k, v in payload['best'].items() if '/' in k})}"
        )
    title = (
        f"CSMCIR {config.data.dataset}/{config.eval.split}: symmetric={config.model.symmetric}, "
        f"bank={config.bank.size}, captions={config.data.caption_field}, backbone={config.vision.kind}"
    )
    table = title + "\n\n" + "\n\n".join(tables)
    write_json(os.path.join(workdir, "results.json"), payload)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "table.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    return payload
