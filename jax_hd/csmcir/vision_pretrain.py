"""Scene-attribute pre-training of the embedded presets' tiny ViT, before it is frozen and cached.

PROPOSAL (the paper is silent: it uses BLIP-2's pretrained EVA ViT-g, which cannot be installed offline). A randomly
initialised frozen ViT leaves the embedded demo below the image-only pixel baseline, so the embedded presets can
pre-train their tiny ViT on the *train* split's renders with the scene graphs as labels, then freeze it and cache
its features exactly as the paper-scale presets cache EVA ViT-g's. This stands in for the vision pre-training the
real backbone had; no val/test image or label is trained on (the CSS splits share no scene graph).

Objective (`vision.pretrain.objective = "scene_attributes"`): every render is a 3x3 grid of cells, each empty or
holding one object (shape x colour x size). The patch tokens whose centres fall in a cell are averaged
(`cell_pooling`), and one linear head classifies the cell into `NUM_CELL_CLASSES` (empty + every attribute
combination) with cross-entropy. The head is deliberately weak (linear on a fixed average), so the attributes have to
be linearly readable from the ViT's own patch tokens, which is what the Q-Former's cross-attention reads; the head is
dropped afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_hd.data import cir
from jax_hd.models import vit

__all__ = [
    "NUM_CELL_CLASSES",
    "PretrainResult",
    "attribute_logits",
    "cell_pooling",
    "pretrain",
    "render_images",
    "scene_cell_labels",
]

OBJECT_CLASSES = len(cir.SHAPES) * len(cir.COLOUR_NAMES) * len(cir.SIZES)
NUM_CELL_CLASSES = 1 + OBJECT_CLASSES  # class 0: empty cell
NUM_CELLS = cir.GRID * cir.GRID

PretrainResult = tuple[Any, dict[str, float]]  # (ViT params, metrics)


def scene_cell_labels(scene: cir.Scene) -> np.ndarray:
    """`[NUM_CELLS]` int32: 0 for an empty cell, else 1 + (shape, colour, size) as one mixed-radix index."""
    labels = np.zeros((NUM_CELLS,), np.int32)
    for o in scene.objects:
        shape, colour, size = cir.SHAPES.index(o.shape), cir.COLOUR_NAMES.index(o.colour), cir.SIZES.index(o.size)
        labels[o.cell] = 1 + (shape * len(cir.COLOUR_NAMES) + colour) * len(cir.SIZES) + size
    return labels


def cell_pooling(image_size: int, patch_size: int, grid: int = cir.GRID) -> np.ndarray:
    """`[grid * grid, num_patches]` float32: row c averages the patches whose centres lie in cell c (row-major).

    Raises ValueError when a cell holds no patch centre (patches coarser than the cells).
    """
    side = image_size // patch_size
    centres = (np.arange(side) + 0.5) * patch_size
    cell_of = np.minimum((centres * grid / image_size).astype(np.int64), grid - 1)  # [side]
    cells = (cell_of[:, None] * grid + cell_of[None, :]).reshape(-1)  # [num_patches], row-major patches
    pool = (cells[None, :] == np.arange(grid * grid)[:, None]).astype(np.float32)
    counts = pool.sum(axis=1, keepdims=True)
    if (counts == 0).any():
        raise ValueError(f"patch {patch_size} px on {image_size} px leaves a cell of the {grid}x{grid} grid empty")
    return pool / counts


def init_head(rng: jax.Array, width: int) -> dict[str, jax.Array]:
    """The linear cell classifier: kernel `[width, NUM_CELL_CLASSES]`, bias `[NUM_CELL_CLASSES]`."""
    return {
        "kernel": 0.02 * jax.random.normal(rng, (width, NUM_CELL_CLASSES), jnp.float32),
        "bias": jnp.zeros((NUM_CELL_CLASSES,), jnp.float32),
    }


def attribute_logits(
    module: vit.VisionTransformer, params: Any, head: Any, pool: jax.Array, images: jax.Array
) -> jax.Array:
    """Normalised images `[batch, S, S, 3]` -> cell logits `[batch, NUM_CELLS, NUM_CELL_CLASSES]`."""
    tokens = module.apply({"params": params}, images)  # [batch, 1 + num_patches, width]
    pooled = jnp.einsum("cp,bpw->bcw", pool, tokens[:, 1:].astype(jnp.float32))
    return pooled @ head["kernel"] + head["bias"]


def attribute_loss(
    module: vit.VisionTransformer, params: Any, head: Any, pool: jax.Array, images: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(mean cross-entropy, cell accuracy) over `labels [batch, NUM_CELLS]`."""
    logits = attribute_logits(module, params, head, pool, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits.argmax(-1) == labels).mean()


def make_step(module: vit.VisionTransformer, tx: optax.GradientTransformation, pool: np.ndarray) -> Any:
    """Jitted `((params, head), opt_state, images, labels) -> ((params, head), opt_state, loss, accuracy)`."""
    pool = jnp.asarray(pool)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, images, labels):
        def loss_fn(t):
            return attribute_loss(module, t[0], t[1], pool, images, labels)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss, accuracy

    return step


def render_images(split: cir.CIRSplit, image_ids: Sequence[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 renders `[n, size, size, 3]`, cell labels `[n, NUM_CELLS]`) of CSS images (scene graphs needed)."""
    if not split.scenes:
        raise ValueError(f"{split.name} has no scene graphs: scene-attribute pre-training needs the embedded scenes")
    images = np.stack([cir.render(split.scenes[i], size) for i in image_ids])
    labels = np.stack([scene_cell_labels(split.scenes[i]) for i in image_ids])
    return images, labels


def _normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 255.0 - mean) / std


def pretrain(
    vit_config: vit.ViTConfig,
    params: Any,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    seed: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
) -> PretrainResult:
    """Trains `params` (unboxed ViT params) on the cell-attribute objective; returns (params, metrics).

    Args:
      vit_config: the ViT (its `frozen` flag is ignored here: the ViT is what trains).
      train_images, train_labels: uint8 `[n, S, S, 3]` renders and `[n, NUM_CELLS]` labels.
      steps, batch_size: AdamW steps on batches drawn without replacement per epoch (seeded by `seed`).
      lr, weight_decay, warmup_steps: AdamW, linear warm-up then cosine decay to 0.
      eval_images, eval_labels: held-out renders (e.g. the val split's) for the reported accuracy.
    Returns:
      The trained ViT params and `{"loss", "train_cell_accuracy"}` (mean of the last 50 steps; absent for 0 steps) plus
      `eval_cell_accuracy` and `eval_scene_accuracy` (every cell right) when eval data is given.
    """
    if len(train_images) < batch_size:
        raise ValueError(f"{len(train_images)} pre-training images < batch_size {batch_size}")
    module = vit.VisionTransformer(_trainable(vit_config))
    mean, std = np.asarray(pixel_mean, np.float32), np.asarray(pixel_std, np.float32)
    pool = cell_pooling(vit_config.image_size, vit_config.patch_size)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1))
    tx = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    trainable = (jax.tree.map(jnp.asarray, params), init_head(jax.random.PRNGKey(seed), vit_config.hidden_size))
    opt_state = tx.init(trainable)
    step_fn = make_step(module, tx, pool)
    order, cursor, history = rng.permutation(len(train_images)), 0, []
    for _ in range(steps):
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(train_images)), 0
        rows = np.sort(order[cursor : cursor + batch_size])
        cursor += batch_size
        images = _normalise(train_images[rows], mean, std)
        trainable, opt_state, loss, accuracy = step_fn(trainable, opt_state, images, train_labels[rows])
        history.append((loss, accuracy))
    metrics = {}
    if history:
        last = np.asarray(jax.device_get(history[-50:]), np.float64)
        metrics.update(loss=float(last[:, 0].mean()), train_cell_accuracy=float(last[:, 1].mean()))
    if eval_images is not None and eval_labels is not None:
        metrics.update(evaluate(module, trainable, pool, _normalise(eval_images, mean, std), eval_labels))
    return jax.device_get(trainable[0]), metrics


def evaluate(
    module: vit.VisionTransformer,
    trainable: tuple[Any, Any],
    pool: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 256,
) -> dict[str, float]:
    """Cell accuracy and whole-scene accuracy (all cells right) of normalised `images` `[n, S, S, 3]`."""
    logits_fn = jax.jit(lambda t, x: attribute_logits(module, t[0], t[1], jnp.asarray(pool), x))
    chunks = [images[s : s + batch_size] for s in range(0, len(images), batch_size)]
    predictions = np.concatenate([np.asarray(logits_fn(trainable, x)).argmax(-1) for x in chunks])
    correct = predictions == labels
    return {"eval_cell_accuracy": float(correct.mean()), "eval_scene_accuracy": float(correct.all(axis=1).mean())}


def _trainable(config: vit.ViTConfig) -> vit.ViTConfig:
    return dataclasses.replace(config, frozen=False)
