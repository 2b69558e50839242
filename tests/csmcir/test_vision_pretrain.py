"""Scene-attribute pre-training of the embedded presets' tiny ViT: labels, the cell pooling, that a short run learns
the attributes of held-out scenes, and the trainer's path (pre-train once, cache the params, reuse them)."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn

from experiments.configs import csmcir as csmcir_configs
from jax_hd.core import config as config_lib
from jax_hd.csmcir import trainer
from jax_hd.csmcir import vision_pretrain as vp
from jax_hd.data import cir
from jax_hd.models import vit


def test_scene_cell_labels():
    scene = cir.make_scene(
        [cir.SceneObject(4, "circle", "red", "small"), cir.SceneObject(8, "cross", "pink", "large")]
    )
    labels = vp.scene_cell_labels(scene)
    assert labels.shape == (9,) and labels.dtype == np.int32
    assert list(np.flatnonzero(labels)) == [4, 8]
    assert labels[4] == 1  # circle (0), red (0), small (0)
    assert labels[8] == vp.NUM_CELL_CLASSES - 1  # the last shape, colour and size
    assert len({int(vp.scene_cell_labels(cir.make_scene([cir.SceneObject(0, s, c, z)]))[0])
                for s in cir.SHAPES for c in cir.COLOUR_NAMES for z in cir.SIZES}) == vp.NUM_CELL_CLASSES - 1


def test_cell_pooling_averages_the_patches_centred_in_each_cell():
    pool = vp.cell_pooling(64, 8)  # 8x8 patches; cell borders at 21.3 and 42.7 px: 3, 2, 3 patch columns
    assert pool.shape == (9, 64)
    np.testing.assert_allclose(pool.sum(axis=1), 1.0)
    assert ((pool > 0).sum(axis=0) == 1).all()  # every patch in exactly one cell
    assert list((pool > 0).sum(axis=1)) == [9, 6, 9, 6, 4, 6, 9, 6, 9]
    assert pool[0].reshape(8, 8)[:3, :3].all() and pool[4].reshape(8, 8)[3:5, 3:5].all()
    with pytest.raises(ValueError, match="leaves a cell"):
        vp.cell_pooling(32, 16)  # 2x2 patches cannot cover a 3x3 grid


@pytest.mark.slow  # ~70-95 s on one shared CPU core (compiles, then 120 steps)
def test_a_short_pretraining_learns_held_out_scene_attributes():
    # 24 px renders with 8 px patches: one patch per grid cell, so a few dozen steps learn the attributes.
    splits = cir.embedded_css(0, image_size=24, num_train=300, num_val=60, num_test=1)
    train, val = splits["train"], splits["val"]
    images, labels = vp.render_images(train, train.gallery_ids, 24)
    eval_images, eval_labels = vp.render_images(val, val.gallery_ids, 24)
    config = vit.ViTConfig.tiny(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=24, patch_size=8
    )
    params = nn.unbox(vit.init_params(config, jax.random.PRNGKey(0)))
    initial = jax.device_get(params)  # `pretrain` donates its params.
    trained_params, trained = vp.pretrain(
        config, params, images, labels, steps=120, batch_size=64, lr=1e-2, weight_decay=0.0, warmup_steps=10, seed=0,
        pixel_mean=(0.5,) * 3, pixel_std=(0.25,) * 3, eval_images=eval_images, eval_labels=eval_labels,
    )  # fmt: skip
    empty = float((eval_labels == 0).mean())  # always answering "empty" scores this (~0.62)
    assert trained["eval_cell_accuracy"] > empty + 0.1, (trained, empty)
    assert trained["loss"] < 1.5, trained  # log(NUM_CELL_CLASSES) = 4.4 at chance
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained_params, initial)
    assert min(jax.tree.leaves(moved)) > 0 and jax.tree.structure(trained_params) == jax.tree.structure(initial)


def _pretrain_config():
    config = csmcir_configs.get_config("cpu_test")
    config.vision.pretrain.update(objective="scene_attributes", steps=5, batch_size=16, max_images=64, eval_images=32)
    return config


@pytest.mark.slow  # ~90 s on one shared CPU core (four ViT compiles)
def test_the_trainer_pretrains_once_then_reuses_the_cached_encoder(tmp_path):
    config = _pretrain_config()
    trainer.check_config(config)
    pretrained = trainer.build_vision(config, str(tmp_path))
    report = json.loads((tmp_path / "vision_pretrain.json").read_text())
    assert report["steps"] == 5 and report["train_images"] == 64 and report["eval_images"] == 32
    assert 0.0 <= report["eval_cell_accuracy"] <= 1.0
    reused = trainer.build_vision(config, str(tmp_path))  # reads vision_pretrained.npz
    jax.tree.map(np.testing.assert_array_equal, pretrained.params, reused.params)
    config.vision.pretrain.objective = "none"
    random = trainer.build_vision(config, str(tmp_path))
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    assert np.abs(pretrained.encode(images) - random.encode(images)).max() > 1e-3
    np.testing.assert_array_equal(pretrained.encode(images), reused.encode(images))


def test_pretraining_only_for_the_tiny_vit_on_the_embedded_scenes():
    config = _pretrain_config()
    config.data.update(dataset="cirr", root="data/cirr", captions_dir="data/cirr/mcot")
    with pytest.raises(config_lib.ConfigError, match="vision.pretrain.objective"):
        trainer.check_config(config)
    paper = csmcir_configs.get_config("cirr_blip2")
    assert paper.vision.kind == "blip2" and paper.vision.pretrain.objective == "none"
