r"""Evaluates a composed-image-retrieval model or zero-shot baseline and prints the benchmark's table.

    python -m experiments.csmcir_eval --config=experiments/configs/csmcir_eval.py:cpu_demo --workdir=runs/cir_eval

Datasets: the embedded CSS-style scenes (`css`, CIRR protocol: R@K with the reference excluded and R_subset@K),
`cirr` (val), `fashioniq` (val, both protocols), `circo` (val, mAP@K) and `shoes` (val, R@10/50) from local copies.
Models (`model.kind`): `image_only` (the reference image's pixels, the classic zero-shot image-only baseline),
`random` (chance), `qformer_image` (frozen BLIP-2 ViT + Q-Former query-token features of the reference image,
max-over-tokens cosine; BLIP-2 weights from `model.blip2_dir`, else a randomly initialised tiny pair: a pipeline
check). Writes `<workdir>/results.json` and `table.md`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jax_hd.core import config as config_lib
from jax_hd.csmcir import evaluate
from jax_hd.data import cir
from jax_hd.models import qformer, vit

F = config_lib.Field
SCHEMA = {
    "seed": F(int, low=0),
    "data.dataset": F(str, choices=("css", "cirr", "fashioniq", "circo", "shoes")),
    "data.split": F(str),
    "data.image_size": F(int, positive=True),
    "data.max_queries": F(int),
    "data.css_num_queries": F(int, positive=True),
    "model.kind": F(str, choices=("image_only", "random", "qformer_image")),
    "model.pixel_feature_size": F(int, positive=True),
    "eval.batch_size": F(int, positive=True),
    "eval.fashioniq_protocol": F(str, choices=evaluate.FIQ_PROTOCOLS),
}

Embed = Callable[[Sequence[str]], np.ndarray]  # image ids -> [n, dim] or [n, tokens, dim], unit-normalised.


def load_splits(config: ml_collections.ConfigDict) -> list[cir.CIRSplit]:
    d = config.data
    if d.dataset == "css":
        sizes = {"num_train": 1, "num_val": d.css_num_queries, "num_test": d.css_num_queries}
        return [cir.embedded_css(d.css_seed, image_size=d.image_size, **sizes)[d.split]]
    if d.dataset == "fashioniq":
        return [cir.read_fashioniq(d.root, category, d.split) for category in evaluate.FIQ_CATEGORIES]
    reader = {"cirr": cir.read_cirr, "circo": cir.read_circo, "shoes": cir.read_shoes}[d.dataset]
    return [reader(d.root, d.split)]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pixel_embedder(split: cir.CIRSplit, config: ml_collections.ConfigDict) -> Embed:
    image_fn = cir.make_image_fn(split, config.model.pixel_feature_size)

    def embed(ids: Sequence[str]) -> np.ndarray:
        pixels = np.stack([image_fn(i) for i in ids]).reshape(len(ids), -1)
        return _normalise(pixels - pixels.mean(axis=1, keepdims=True))

    return embed


def random_embedder(config: ml_collections.ConfigDict) -> Embed:
    def embed(ids: Sequence[str]) -> np.ndarray:
        seeds = [int.from_bytes(i.encode()[-8:].rjust(8, b"\0"), "little") ^ config.seed for i in ids]
        return _normalise(np.stack([np.random.default_rng(s).normal(size=64) for s in seeds]))

    return embed


def qformer_embedder(split: cir.CIRSplit, config: ml_collections.ConfigDict) -> Embed:
    """Frozen ViT -> Q-Former query tokens `[n, num_query_tokens, dim]`, each token unit-normalised."""
    m = config.model
    if m.blip2_dir:
        from jax_hd.models import hf_import

        vit_config, vit_params = hf_import.load_blip2_vision(m.blip2_dir)
        qf_config, qf_params = hf_import.load_blip2_qformer(m.blip2_dir)
    else:
        vit_config = vit.ViTConfig.tiny()  # Renders the scenes at its own (tiny) resolution.
        qf_config = qformer.QFormerConfig.tiny(encoder_hidden_size=vit_config.hidden_size)
        vit_params = jax.tree.map(np.asarray, vit.init_params(vit_config, jax.random.PRNGKey(config.seed)))
        qf_params = jax.tree.map(np.asarray, qformer.init_params(qf_config, jax.random.PRNGKey(config.seed + 1)))
    vision, former = vit.VisionTransformer(vit_config), qformer.QFormer(qf_config)
    image_fn = cir.make_image_fn(split, vit_config.image_size)
    mean, std = np.asarray(m.pixel_mean, np.float32), np.asarray(m.pixel_std, np.float32)

    @jax.jit
    def features(vit_p, qf_p, images):
        image_features = vision.apply({"params": vit_p}, images)
        tokens = former.apply({"params": qf_p}, image_features=image_features)
        return tokens / jnp.maximum(jnp.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)

    def embed(ids: Sequence[str]) -> np.ndarray:
        out = []
        for start in range(0, len(ids), config.eval.batch_size):
            chunk = list(ids[start : start + config.eval.batch_size])
            images = (np.stack([image_fn(i) for i in chunk]) - mean) / std
            padded = np.concatenate([images, np.repeat(images[-1:], config.eval.batch_size - len(chunk), 0)])
            out.append(np.asarray(features(vit_params, qf_params, padded))[: len(chunk)])
        return np.concatenate(out)

    return embed


def make_embedder(split: cir.CIRSplit, config: ml_collections.ConfigDict) -> Embed:
    kind = config.model.kind
    if kind == "image_only":
        return pixel_embedder(split, config)
    if kind == "random":
        return random_embedder(config)
    return qformer_embedder(split, config)


def evaluate_split(split: cir.CIRSplit, embed: Embed, config: ml_collections.ConfigDict) -> dict[str, float]:
    """The benchmark's metrics for one split (image-only models: the query is the reference image)."""
    triplets = [t for t in split.triplets if t.target_ids]
    if config.data.max_queries > 0:
        triplets = triplets[: config.data.max_queries]
    if not triplets:
        raise ValueError(f"{split.name} has no triplets with targets (a withheld test split?)")
    dataset = config.data.dataset
    gallery_ids = np.asarray(split.gallery_ids)
    references = np.asarray([t.reference_id for t in triplets])
    targets = np.asarray([t.target_ids[0] for t in triplets])
    if dataset == "fashioniq":
        protocol = config.eval.fashioniq_protocol
        gallery_ids = evaluate.fashioniq_gallery(protocol, references, targets, split.gallery_ids)
    gallery = embed(list(gallery_ids))
    index = {image_id: i for i, image_id in enumerate(gallery_ids)}
    queries = np.stack([gallery[index[r]] if r in index else embed([r])[0] for r in references])
    if queries.ndim == 3:  # Multi-token image features: the query is their mean direction.
        queries = _normalise(queries.mean(axis=1))
    exclude = None
    if dataset in ("css", "cirr"):
        exclude = evaluate.ids_to_indices(references, gallery_ids)
    elif dataset == "fashioniq":
        exclude = evaluate.fashioniq_exclude_indices(config.eval.fashioniq_protocol, gallery_ids, references)
    k = min(50, len(gallery_ids) - (exclude is not None))
    _, top = evaluate.top_k_gallery(queries, gallery, k, exclude_indices=exclude)
    ranked = gallery_ids[top]
    if dataset in ("css", "cirr"):
        members = np.asarray([t.subset_ids for t in triplets])
        member_scores = evaluate.gather_scores(queries, gallery, evaluate.ids_to_indices(members, gallery_ids))
        subset = evaluate.rank_subset(members, member_scores, references)
        return evaluate.cirr_metrics(ranked, targets, references, subset)
    if dataset == "fashioniq":
        category = split.name.split("/")[1]
        recalls = evaluate.fashioniq_category_recalls(ranked, targets, references, config.eval.fashioniq_protocol)
        return {f"{config.eval.fashioniq_protocol}/{category}/R@{k}": v for k, v in recalls.items()}
    if dataset == "circo":
        return evaluate.circo_metrics(ranked, [list(t.target_ids) for t in triplets], targets)
    return {f"shoes/R@{k}": v for k, v in evaluate.recall_at_k(ranked, targets, (10, 50)).items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    config_lib.validate(config, SCHEMA)
    results: dict[str, float] = {}
    for split in load_splits(config):
        logging.info("%s: %d triplets, gallery %d", split.name, len(split.triplets), len(split.gallery_ids))
        results.update(evaluate_split(split, make_embedder(split, config), config))
    if config.data.dataset == "fashioniq":
        protocol = config.eval.fashioniq_protocol
        per_category = {c: {k: results[f"{protocol}/{c}/R@{k}"] for k in evaluate.FIQ_KS}
                        for c in evaluate.FIQ_CATEGORIES}
        results.update(evaluate.fashioniq_summary(per_category, protocol))
    if config.data.dataset == "css":
        results = {k.replace("cirr/", "css/"): v for k, v in results.items()}
    title = f"model: {config.model.kind}; {config.data.dataset}/{config.data.split}"
    table = f"{title}\n\n{evaluate.format_table(results)}"
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"model": config.model.kind, "dataset": config.data.dataset, **results}, f, indent=2)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    config_lib.run_experiment(run, fatal=(cir.CIRDataError,))
