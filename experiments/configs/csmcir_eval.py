"""Presets of the composed-image-retrieval evaluation binary.

    python -m experiments.csmcir_eval --config=experiments/configs/csmcir_eval.py:cpu_demo --workdir=runs/cir_eval

Presets: `cpu_test` (100 embedded queries), `cpu_demo` (the embedded test split, image-only baseline),
`cirr_blip2` / `fashioniq_blip2` (frozen BLIP-2 image features on a local copy of the dataset; set
`data.root` and `model.blip2_dir`).
"""

import ml_collections


def get_config(preset: str = "cpu_demo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    # dataset: css (embedded), cirr, fashioniq, circo, shoes; root: the dataset's local directory (not for css).
    # css_num_queries: triplets generated per embedded eval split (its gallery is every image they use).
    c.data = ml_collections.ConfigDict(
        dict(dataset="css", root="", split="test", css_seed=0, css_num_queries=1000, image_size=64, max_queries=-1)
    )
    # kind: image_only | random | qformer_image. blip2_dir: an HF BLIP-2 checkpoint directory (qformer_image);
    # empty: a randomly initialised tiny ViT + Q-Former. pixel_mean/std: BLIP-2's image normalisation.
    c.model = ml_collections.ConfigDict(
        dict(
            kind="image_only",
            blip2_dir="",
            pixel_feature_size=16,
            pixel_mean=(0.48145466, 0.4578275, 0.40821073),
            pixel_std=(0.26862954, 0.26130258, 0.27577711),
        )
    )
    c.eval = ml_collections.ConfigDict(dict(batch_size=64, fashioniq_protocol="fiq_original"))

    if preset == "cpu_test":
        c.data.css_num_queries = 100
    elif preset == "cpu_demo":
        pass
    elif preset == "cirr_blip2":
        c.data.update(dataset="cirr", root="data/cirr", split="val", image_size=224)
        c.model.update(kind="qformer_image", blip2_dir="checkpoints/blip2-opt-2.7b")
    elif preset == "fashioniq_blip2":
        c.data.update(dataset="fashioniq", root="data/fashioniq", split="val", image_size=224)
        c.model.update(kind="qformer_image", blip2_dir="checkpoints/blip2-opt-2.7b")
    else:
        raise ValueError(f"unknown preset {preset!r}; choose cpu_test, cpu_demo, cirr_blip2 or fashioniq_blip2")
    return c
