r"""Writes the multi-level chain-of-thought (MCoT) caption files of a composed-retrieval split (CSMCIR, spec §3.3).

    python -m experiments.csmcir_captions --config=experiments/configs/csmcir_captions.py:cpu_test --workdir=runs/caps

Every gallery image of the split gets `{L1_global, L2_attributes, L3_discriminative, Final_Caption}` in
`{out_root}/{dataset}/{split}/{category}_mcot.json` (one file per FashionIQ category, `all_mcot.json` otherwise),
which the CSMCIR trainer and evaluator read with `jax_hd.csmcir.captions.read_captions`. Captioners (`model.kind`):
`scene` (the embedded CSS scenes, from their scene graphs; no model) and `hf_vlm` (a local Hugging Face
vision-language model directory `model.vlm_dir`, e.g. Qwen2-VL-7B-Instruct). Progress is saved every
`captions.save_every` batches; rerunning the same command resumes. Answers that stay unparsable after the retry are
listed in `<file>.errors.json` and counted in `<workdir>/caption_summary.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
from absl import logging

from jax_hd.core import config as config_lib
from jax_hd.csmcir import captions
from jax_hd.data import cir

F = config_lib.Field
SCHEMA = {
    "seed": F(int, low=0),
    "data.dataset": F(str, choices=("css", "cirr", "fashioniq", "circo", "shoes")),
    "data.root": F(str),
    "data.split": F(str),
    "data.categories": F((tuple, list)),
    "data.css_seed": F(int, low=0),
    "data.css_num_train": F(int, positive=True),
    "data.css_num_val": F(int, positive=True),
    "data.css_num_test": F(int, positive=True),
    "data.image_size": F(int, positive=True),
    "data.max_images": F(int),
    "data.skip_missing": F(bool),
    "model.kind": F(str, choices=("scene", "hf_vlm")),
    "model.vlm_dir": F(str),
    "model.domain": F(str, choices=("auto", *captions.DOMAINS)),
    "model.max_new_tokens": F(int, positive=True),
    "model.retries": F(int, low=0),
    "model.dtype": F(str),
    "model.device": F(str),
    "captions.out_root": F(str),
    "captions.batch_size": F(int, positive=True),
    "captions.save_every": F(int, positive=True),
    "captions.resume": F(bool),
}


def load_splits(config: ml_collections.ConfigDict) -> list[tuple[str, cir.CIRSplit]]:
    """(file category, split) pairs to caption: one per FashionIQ category, else one with category ''."""
    d = config.data
    if d.dataset == "css":
        sizes = {"num_train": d.css_num_train, "num_val": d.css_num_val, "num_test": d.css_num_test}
        return [("", cir.embedded_css(d.css_seed, image_size=d.image_size, **sizes)[d.split])]
    if d.dataset == "fashioniq":
        return [(c, cir.read_fashioniq(d.root, c, d.split, skip_missing=d.skip_missing)) for c in d.categories]
    reader = {"cirr": cir.read_cirr, "circo": cir.read_circo, "shoes": cir.read_shoes}[d.dataset]
    return [("", reader(d.root, d.split, skip_missing=d.skip_missing))]


def _domain(config: ml_collections.ConfigDict) -> str:
    if config.model.domain != "auto":
        return config.model.domain
    return "fashion" if config.data.dataset in ("fashioniq", "shoes") else "scene"


def _prompt_category(dataset: str, category: str, image_id: str) -> str:
    """The category named in the prompt: the FashionIQ category, the Shoes category from the file name, else ''."""
    if dataset == "shoes":
        return cir.shoes_category(image_id).replace("_", " ") or "shoes"
    return category


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    config_lib.validate(config, SCHEMA)
    d, m = config.data, config.model
    if m.kind == "scene" and d.dataset != "css":
        raise config_lib.ConfigError(f"config.model.kind='scene' captions only the embedded css set, not {d.dataset!r}")
    if m.kind == "hf_vlm" and not m.vlm_dir:
        raise config_lib.ConfigError("config.model.vlm_dir is required when config.model.kind='hf_vlm'")
    out_root = config.captions.out_root or os.path.join(workdir, "captions")
    vlm = None
    if m.kind == "hf_vlm":
        vlm = captions.HFVisionLanguageCaptioner(
            m.vlm_dir,
            domain=_domain(config),
            max_new_tokens=m.max_new_tokens,
            dtype=m.dtype,
            device=m.device,
            retries=m.retries,
        )
    files = []
    for category, split in load_splits(config):
        ids = list(split.gallery_ids)
        if d.max_images >= 0:
            ids = ids[: d.max_images]
        if vlm is None:
            captioner = captions.SceneCaptioner(split)
            image_fn = captioner.image_fn
        else:
            captioner, image_fn = vlm, cir.make_image_fn(split, d.image_size)
        path = captions.caption_path(out_root, d.dataset, d.split, category)
        logging.info("%s: captioning %d images -> %s", split.name, len(ids), path)
        counts = captions.caption_split(
            captioner,
            ids,
            image_fn,
            [_prompt_category(d.dataset, category, i) for i in ids],
            batch_size=config.captions.batch_size,
            out_path=path,
            resume=config.captions.resume,
            save_every=config.captions.save_every,
        )
        if counts["num_failed"]:
            logging.warning(
                "%s: %d images without a caption, see %s", split.name, counts["num_failed"], counts["errors_path"]
            )
        files.append({"split": split.name, "category": category or "all", **counts})
    summary = {
        "dataset": d.dataset,
        "split": d.split,
        "captioner": m.kind if m.kind == "scene" else f"hf_vlm:{m.vlm_dir}",
        "num_images": sum(f["num_images"] for f in files),
        "num_captioned": sum(f["num_captioned"] for f in files),
        "num_failed": sum(f["num_failed"] for f in files),
        "files": files,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "caption_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for entry in files:
        print(
            f"{entry['split']} [{entry['category']}]: {entry['num_captioned']}/{entry['num_images']} captioned, "
            f"{entry['num_failed']} failed, {entry['num_resumed']} resumed -> {entry['out_path']}"
        )
    return summary


if __name__ == "__main__":
    config_lib.run_experiment(run, fatal=(cir.CIRDataError, ValueError, FileNotFoundError))
