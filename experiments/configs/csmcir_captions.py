"""Presets of the CSMCIR multi-level chain-of-thought captioning binary.

    python -m experiments.csmcir_captions --config=experiments/configs/csmcir_captions.py:cpu_test --workdir=runs/caps

Presets: `cpu_test` (a small embedded CSS split, captions from the scene graphs: seconds, no model) and `qwen2_vl`
(FashionIQ val from a local copy, captioned by a local Qwen2-VL-Instruct directory; set `data.root` and
`model.vlm_dir`; `--config.data.dataset=cirr` captions CIRR instead).
"""

import ml_collections


def get_config(preset: str = "cpu_test") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    # dataset: css (embedded), cirr, fashioniq, circo, shoes; root: the dataset's local directory (not for css).
    # categories: FashionIQ categories to caption (one file each). css_*: the embedded set, as the trainer builds it
    # (its split's images depend on the triplet counts). image_size: pixels handed to the VLM (targetpad, spec §2).
    # max_images: caption only the first N gallery images (-1: all). skip_missing: drop images missing on disk.
    c.data = ml_collections.ConfigDict(
        dict(
            dataset="css",
            root="",
            split="val",
            categories=("dress", "shirt", "toptee"),
            css_seed=0,
            css_num_train=10_000,
            css_num_val=1_000,
            css_num_test=1_000,
            image_size=448,
            max_images=-1,
            skip_missing=False,
        )
    )
    # kind: scene (CSS scene graphs, no model) | hf_vlm (a local HF vision-language model directory, vlm_dir).
    # domain: prompt variant: auto (fashion for fashioniq/shoes, else scene) | fashion | scene. retries: re-asks of an
    # unparsable answer. dtype/device: torch dtype name and device of the VLM.
    c.model = ml_collections.ConfigDict(
        dict(
            kind="scene",
            vlm_dir="",
            domain="auto",
            max_new_tokens=256,
            retries=1,
            dtype="bfloat16",
            device="cpu",
        )
    )
    # out_root: caption files go to {out_root}/{dataset}/{split}/{category}_mcot.json ('' = <workdir>/captions).
    # save_every: batches between progress saves; resume: skip images already in the files.
    c.captions = ml_collections.ConfigDict(dict(out_root="", batch_size=16, save_every=1, resume=True))

    if preset == "cpu_test":
        c.data.update(css_num_train=1, css_num_val=20, css_num_test=1, image_size=64)
        c.captions.update(batch_size=8)
    elif preset == "qwen2_vl":
        c.data.update(dataset="fashioniq", root="data/fashioniq", split="val")
        c.model.update(kind="hf_vlm", vlm_dir="checkpoints/Qwen2-VL-7B-Instruct", device="cuda")
        c.captions.update(batch_size=16, save_every=4)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose cpu_test or qwen2_vl")
    return c
