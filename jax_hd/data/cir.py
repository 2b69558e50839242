"""Composed image retrieval (CIR) data: FashionIQ, CIRR, CIRCO and Shoes readers, and built-in synthetic scenes.

The module has four parts.

* **Common representation.** `CIRTriplet` (reference image + modification text(s) -> target image(s)) and
  `CIRSplit` (triplets, the retrieval gallery, image id -> file). `load_image` reads one file the way SPRC does;
  `make_image_fn` turns a split into `image_id -> float32 [size, size, 3]`.
* **Readers** of the official layouts (spec §9): `read_fashioniq`, `read_cirr`, `read_circo`, `read_shoes`. Each
  takes the dataset's root directory and validates every row. Errors are `CIRDataError` (a `ValueError`) or
  `CIRFileNotFoundError` (also a `FileNotFoundError`), and every message names the file and the row or image id:
  a missing key, an id absent from the split file, an image file missing on disk, or an annotation file of another
  dataset (recognised by its keys). With `skip_missing=True` the triplets and gallery images whose images are absent
  are dropped and counted in a warning instead (spec §13.4: FashionIQ has dead URLs). `check_images=False` skips the
  image-existence check (one directory listing per image directory; the CIRCO gallery is about 123K files).
* **Embedded default** (no downloads): `embedded_css`, a CSS-style set of procedurally rendered scenes. Scene graphs
  (`Scene`) are generated deterministically per seed; pixels are rendered on demand by `render`; `scene_captions`
  writes the multi-level captions that stand in for the MLLM chain-of-thought captions (spec §3.3).
* **grain glue**: `triplet_dataset` and `gallery_dataset`, index-based `grain.MapDataset` pipelines (checkpointable).

Decisions where the spec is silent or marks UNKNOWN:

* Shoes layout (spec §9 names only the files): `relative_captions_shoes.json` is a list of
  `{"ImageName": target, "ReferenceImageName": reference, "RelativeCaption": text}` with bare file names;
  `train_im_names.txt` / `eval_im_names.txt` list one file name per line; images lie anywhere below the root
  (the download's `womens_<category>/<n>/img_womens_<category>_<n>.jpg`) and are found by file name. A triplet
  belongs to the split that lists both of its images (the convention of Artemis' `prepare_shoes_data.py`); triplets
  whose two images are in different splits belong to neither and are dropped with a warning. The split names are
  `train` and `val` (= the eval list, the usual Shoes protocol). `captions_shoes.json` (per-image attribute
  captions) is not read: CIR training does not use it.
* CIR subsets keep CIRR's official semantics everywhere: `subset_ids` lists the whole image set, reference included,
  and R_subset removes the reference before ranking (spec §10).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grain
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------------------
# Common representation
# ----------------------------------------------------------------------------------------------------------------------


class CIRDataError(ValueError):
    """A dataset file is malformed, inconsistent or of another dataset. The message names the file and row or id."""


class CIRFileNotFoundError(CIRDataError, FileNotFoundError):
    """An expected dataset file (annotations, split list or image) does not exist. The message names the path."""


@dataclasses.dataclass(frozen=True)
class CIRTriplet:
    """One composed-retrieval query: a reference image plus modification text(s) -> target image(s).

    Attributes:
      pair_id: unique within the split. CIRR `pairid` and CIRCO `id` as strings; FashionIQ `<category>-<split>-<row>`,
        Shoes `shoes-<row>` (row of `relative_captions_shoes.json`), CSS `css-<split>-pair-<n>`.
      reference_id: image id of the reference (a key of `CIRSplit.image_paths` or `CIRSplit.scenes`).
      modification_texts: the relative caption(s) in file order: two for FashionIQ, one elsewhere. Use
        `join_modification_texts` to build the query text.
      target_ids: the ground truths, annotated target first: CIRR `target_hard`; CIRCO `target_img_id` followed by the
        other `gt_img_ids`. Empty for test splits whose targets are withheld (FashionIQ test, CIRR test1, CIRCO test).
      subset_ids: CIRR's `img_set.members` exactly as in the official file: 6 images that INCLUDE the reference and the
        target. R_subset@K drops the reference from the ranking, leaving 5 candidates (`subset_candidates`).
        The CSS val/test splits build groups of the same shape. Empty where a dataset has no groups.
      category: FashionIQ category (dress/shirt/toptee), Shoes category (e.g. `womens_clogs`), CSS modification kind
        (add/remove/...); empty for CIRR and CIRCO.
      shared_concept: CIRCO's `shared_concept` ('' elsewhere). CIRCO query texts should combine it with the caption
        (spec §13.11); the template is left to the evaluator.
      semantic_aspects: CIRCO val `semantic_aspects` (for per-aspect mAP); () elsewhere.
    """

    pair_id: str
    reference_id: str
    modification_texts: tuple[str, ...]
    target_ids: tuple[str, ...] = ()
    subset_ids: tuple[str, ...] = ()
    category: str = ""
    shared_concept: str = ""
    semantic_aspects: tuple[str, ...] = ()

    @property
    def target_id(self) -> str | None:
        """The annotated target (first ground truth), or None when the split withholds targets."""
        return self.target_ids[0] if self.target_ids else None

    @property
    def subset_candidates(self) -> tuple[str, ...]:
        """The subset with the reference removed: what R_subset@K ranks (5 images for CIRR)."""
        return tuple(i for i in self.subset_ids if i != self.reference_id)

    @property
    def image_ids(self) -> tuple[str, ...]:
        """Every image id this triplet refers to: reference, targets, subset members."""
        return (self.reference_id, *self.target_ids, *self.subset_ids)


@dataclasses.dataclass(frozen=True)
class CIRSplit:
    """One split of a CIR dataset.

    Attributes:
      name: e.g. `fashioniq/dress/val`, `cirr/val`, `circo/val`, `shoes/train`, `css/test`.
      triplets: the queries, in file order.
      gallery_ids: the retrieval gallery in file order: every image of the split (FashionIQ
        `split.<cat>.<split>.json`, CIRR `split.rc2.<split>.json`, the CIRCO COCO-unlabeled list, the Shoes image
        list, all CSS images of the split).
        Each image appears once, so each target appears exactly once.
      image_paths: image id -> file path, for every gallery id (empty for the CSS scenes).
      scenes: image id -> `Scene` for the synthetic CSS splits (empty for real datasets).
      image_captions: image id -> {level: text} (spec §3.3 shape); the CSS splits compute it from the scene graph on
        access. Empty for real datasets, whose MCoT captions are files read by `jax_hd.csmcir.captions`.
      image_size: native render size in pixels for CSS splits; None for real datasets.
    """

    name: str
    triplets: tuple[CIRTriplet, ...]
    gallery_ids: tuple[str, ...]
    image_paths: Mapping[str, str]
    scenes: Mapping[str, Scene] = dataclasses.field(default_factory=dict)
    image_captions: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    image_size: int | None = None

    @property
    def has_targets(self) -> bool:
        """True when every triplet has at least one ground truth (false for the withheld-target test splits)."""
        return all(t.target_ids for t in self.triplets)


def concat_splits(splits: Sequence[CIRSplit], name: str) -> CIRSplit:
    """Joins splits (e.g. FashionIQ's three training categories): triplets concatenated, galleries unioned in order.

    Raises:
      ValueError: two splits map one image id to different files, or repeat a pair id.
    """
    pair_ids: set[str] = set()
    gallery: dict[str, None] = {}
    paths: dict[str, str] = {}
    scenes: dict[str, Scene] = {}
    for split in splits:
        for triplet in split.triplets:
            if triplet.pair_id in pair_ids:
                raise ValueError(f"pair id {triplet.pair_id!r} occurs in more than one split (last: {split.name})")
            pair_ids.add(triplet.pair_id)
        for image_id, path in split.image_paths.items():
            if paths.setdefault(image_id, path) != path:
                raise ValueError(f"image id {image_id!r} has two files: {paths[image_id]} and {path} ({split.name})")
        gallery.update(dict.fromkeys(split.gallery_ids))
        scenes.update(split.scenes)
    sizes = {s.image_size for s in splits}
    return CIRSplit(
        name=name,
        triplets=tuple(t for s in splits for t in s.triplets),
        gallery_ids=tuple(gallery),
        image_paths=paths,
        scenes=scenes,
        image_captions=_LazyCaptions(scenes) if scenes else {},
        image_size=sizes.pop() if len(sizes) == 1 else None,
    )


def load_image(path: str, size: int, *, image_id: str | None = None, target_ratio: float | None = 1.25) -> np.ndarray:
    """Reads an image file as float32 `[size, size, 3]` in [0, 1].

    The policy is SPRC's `targetpad_transform(target_ratio, size)` (spec §2) without the normalisation, which belongs
    to the model: convert to RGB (PIL's `convert`, so an alpha channel is dropped, as in SPRC); if the aspect ratio
    (long / short side) is at least `target_ratio`, pad the short side symmetrically with black up to
    `long / target_ratio`; resize (bicubic) so the short side is `size`; centre-crop `size x size`.
    `target_ratio=None` skips the padding (plain resize + centre crop).

    Args:
      path: image file.
      size: output side in pixels.
      image_id: named in error messages.
      target_ratio: padding threshold, see above.

    Raises:
      CIRFileNotFoundError: the file does not exist.
      CIRDataError: the file cannot be decoded (corrupt or truncated); the message names the file and the id.
    """
    what = f"image {image_id!r}" if image_id is not None else "image"
    try:
        with Image.open(path) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError as e:
        raise CIRFileNotFoundError(f"{what}: file not found: {path}") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise CIRDataError(f"{what}: cannot decode {path} (corrupt or truncated file?): {e}") from e
    if target_ratio is not None:
        rgb = _target_pad(rgb, target_ratio)
    return np.asarray(_resize_centre_crop(rgb, size), dtype=np.float32) / 255.0


def _target_pad(image: Image.Image, target_ratio: float) -> Image.Image:
    """SPRC's `TargetPad`: pads the short side with black when `long / short >= target_ratio`."""
    w, h = image.size
    if max(w, h) / min(w, h) < target_ratio:
        return image
    scaled = max(w, h) / target_ratio
    pad_w, pad_h = max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)
    padded = Image.new("RGB", (w + 2 * pad_w, h + 2 * pad_h), (0, 0, 0))
    padded.paste(image, (pad_w, pad_h))
    return padded


def _resize_centre_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size)` (short side -> size, bicubic) then `CenterCrop(size)`."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def make_image_fn(
    split: CIRSplit,
    size: int | None = None,
    *,
    target_ratio: float | None = 1.25,
    cache_dir: str | None = None,
) -> Callable[[str], np.ndarray]:
    """Returns `image_id -> float32 [size, size, 3]` in [0, 1] for the images of `split`.

    Real datasets read files with `load_image`. CSS scenes are rendered at `size` (default: the split's
    `image_size`); with `cache_dir`, renders are stored there as PNG (lossless: a cached image is byte-identical to a
    fresh render) under a name derived from the scene graph and the size, so any seed and split can share one cache.
    The returned callable is picklable (usable in grain worker processes).
    """
    size = size if size is not None else split.image_size
    if size is None:
        raise ValueError(f"split {split.name!r} has no native image size; pass size=")
    return _SplitImages(split.scenes, split.image_paths, int(size), target_ratio, cache_dir)


@dataclasses.dataclass(frozen=True, eq=False)
class _SplitImages:
    scenes: Mapping[str, Scene]
    image_paths: Mapping[str, str]
    size: int
    target_ratio: float | None
    cache_dir: str | None

    def __call__(self, image_id: str) -> np.ndarray:
        scene = self.scenes.get(image_id)
        if scene is not None:
            if self.cache_dir is None:
                return render(scene, self.size).astype(np.float32) / 255.0
            return _render_cached(scene, self.size, self.cache_dir).astype(np.float32) / 255.0
        path = self.image_paths.get(image_id)
        if path is None:
            raise CIRDataError(f"unknown image id {image_id!r}: not in this split's images")
        return load_image(path, self.size, image_id=image_id, target_ratio=self.target_ratio)


# ----------------------------------------------------------------------------------------------------------------------
# Reader helpers: JSON loading, row validation, wrong-dataset detection, image checks
# ----------------------------------------------------------------------------------------------------------------------

# Keys that identify each dataset's annotation rows (used to say "this is a CIRR file" to the FashionIQ reader).
_SIGNATURES: dict[str, frozenset[str]] = {
    "FashionIQ": frozenset({"candidate", "captions"}),
    "CIRR": frozenset({"pairid", "reference", "caption"}),
    "CIRCO": frozenset({"reference_img_id", "relative_caption"}),
    "Shoes": frozenset({"ReferenceImageName", "RelativeCaption"}),
}


def _check_choice(value: str, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {list(choices)}")


def _check_root(root: str, dataset: str) -> None:
    if not os.path.isdir(root):
        raise CIRFileNotFoundError(f"{dataset} root directory not found: {root}")


def _read_json(path: str, what: str) -> Any:
    """Loads a JSON file; a missing file or bad JSON raises an error naming the path."""
    if not os.path.isfile(path):
        raise CIRFileNotFoundError(f"{what} not found: expected {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CIRDataError(f"{path}: not valid JSON ({what}): {e}") from e


def _guess_dataset(row: Mapping[str, Any]) -> str | None:
    """The dataset whose annotation keys `row` carries, or None."""
    for name, keys in _SIGNATURES.items():
        if keys <= row.keys():
            return name
    return None


def _describe_json(data: Any) -> str:
    """A short description of a JSON value, with a guess of what file it is, for 'wrong file' messages."""
    if isinstance(data, dict):
        values = list(data.values())[:5]
        if "images" in data:
            return "an object with key 'images' (a COCO image-info file?)"
        if values and all(isinstance(v, str) for v in values):
            return "an object mapping names to strings (a CIRR split file, image name -> relative path?)"
        return f"an object with keys {sorted(data)[:5]}"
    if isinstance(data, list):
        return f"a list whose first entry is {type(data[0]).__name__}" if data else "an empty list"
    return f"a JSON {type(data).__name__}"


def _check_rows(data: Any, path: str, dataset: str, required: Sequence[str]) -> list[dict[str, Any]]:
    """Checks that `data` is a list of `dataset` annotation rows with all `required` keys.

    Raises:
      CIRDataError: naming `path`, the row index and the missing key, or saying which dataset the rows belong to.
    """
    if not isinstance(data, list) or (data and not isinstance(data[0], dict)):
        raise CIRDataError(f"{path}: expected a JSON list of {dataset} annotation objects, got {_describe_json(data)}")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise CIRDataError(f"{path}: row {i}: expected an object, got {type(row).__name__}")
        other = _guess_dataset(row)
        if other is not None and other != dataset:
            raise CIRDataError(
                f"{path}: row {i} has the keys of a {other} annotation file ({sorted(_SIGNATURES[other])}), "
                f"not {dataset}: wrong file or wrong reader?"
            )
        for key in required:
            if key not in row:
                raise CIRDataError(f"{path}: row {i}: missing key {key!r} (row has keys {sorted(row)})")
    return data


def _id_value(value: Any, path: str, row: int, key: str) -> str:
    """An image or pair id: a non-empty string, or an integer (CIRR `pairid`, CIRCO ids), returned as a string."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise CIRDataError(f"{path}: row {row}: {key} must be a non-empty string or an integer id, got {value!r}")


def _text_value(value: Any, path: str, row: int, key: str) -> str:
    if not isinstance(value, str):
        raise CIRDataError(f"{path}: row {row}: {key} must be a string, got {type(value).__name__}")
    return value


def _list_value(value: Any, path: str, row: int, key: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise CIRDataError(f"{path}: row {row}: {key} must be a non-empty list, got {value!r}")
    return value


def _unique_ids(ids: Sequence[str], path: str, row: int, key: str) -> tuple[str, ...]:
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise CIRDataError(f"{path}: row {row}: {key} lists {image_id!r} twice")
        seen.add(image_id)
    return tuple(ids)


def _check_id_list(data: Any, path: str, dataset: str) -> list[str]:
    """A split file that is a JSON list of unique image ids (FashionIQ `image_splits`)."""
    if not isinstance(data, list):
        raise CIRDataError(f"{path}: expected a JSON list of {dataset} image ids, got {_describe_json(data)}")
    seen: dict[str, int] = {}
    for i, image_id in enumerate(data):
        if not isinstance(image_id, str) or not image_id:
            raise CIRDataError(f"{path}: entry {i}: expected a non-empty image id string, got {image_id!r}")
        if image_id in seen:
            raise CIRDataError(f"{path}: entry {i}: image id {image_id!r} repeats entry {seen[image_id]}")
        seen[image_id] = i
    return data


def _key_of(triplet: CIRTriplet, image_id: str, keys: Mapping[str, str]) -> str:
    if image_id == triplet.reference_id:
        return keys["reference"]
    return keys["target"] if image_id in triplet.target_ids else keys.get("subset", "subset")


def _check_known(
    entries: list[tuple[int, CIRTriplet]],
    known: Iterable[str] | Mapping[str, Any],
    *,
    captions_path: str,
    split_path: str,
    keys: Mapping[str, str],
    skip_missing: bool,
) -> list[tuple[int, CIRTriplet]]:
    """Every image a triplet names must be in the split file; otherwise raise (naming file, row, key, id) or drop."""
    known = known if isinstance(known, (set, frozenset, dict)) else set(known)
    kept, skipped = [], 0
    for row, triplet in entries:
        unknown = next((i for i in triplet.image_ids if i not in known), None)
        if unknown is None:
            kept.append((row, triplet))
        elif skip_missing:
            skipped += 1
        else:
            key = _key_of(triplet, unknown, keys)
            raise CIRDataError(f"{captions_path}: row {row}: {key} {unknown!r} is not in the split file {split_path}")
    if skipped:
        logging.warning("%s: skipped %d triplets naming images absent from %s", captions_path, skipped, split_path)
    return kept


def _existing_files(paths: Iterable[str]) -> set[str]:
    """The subset of `paths` that exist: one directory listing per parent directory instead of one stat per file."""
    by_dir: dict[str, set[str]] = collections.defaultdict(set)
    for path in paths:
        directory, name = os.path.split(path)
        by_dir[directory].add(name)
    existing: set[str] = set()
    for directory, names in by_dir.items():
        try:
            with os.scandir(directory or ".") as it:
                present = {entry.name for entry in it}
        except (FileNotFoundError, NotADirectoryError):
            continue
        existing.update(os.path.join(directory, name) for name in names & present)
    return existing


def _finalise(
    name: str,
    entries: list[tuple[int, CIRTriplet]],
    gallery: Sequence[str],
    image_paths: Mapping[str, str],
    *,
    captions_path: str,
    split_path: str,
    check_images: bool,
    skip_missing: bool,
) -> CIRSplit:
    """Checks that the images exist (optional), drops or reports missing ones, and builds the `CIRSplit`.

    Precondition: every id of every triplet is in `gallery` and `image_paths` (checked by `_check_known`).
    """
    missing: set[str] = set()
    if check_images:
        existing = _existing_files(image_paths[i] for i in gallery)
        missing = {i for i in gallery if image_paths[i] not in existing}
    if missing and not skip_missing:
        hint = f"{len(missing)} image(s) of this split are missing; skip_missing=True drops them"
        for row, triplet in entries:
            bad = next((i for i in triplet.image_ids if i in missing), None)
            if bad is not None:
                raise CIRFileNotFoundError(
                    f"{captions_path}: row {row}: image {bad!r} not found: expected {image_paths[bad]} ({hint})"
                )
        first = next(i for i in gallery if i in missing)
        raise CIRFileNotFoundError(
            f"{split_path}: image {first!r} not found: expected {image_paths[first]} ({hint})"
        )
    if missing:
        before = len(entries)
        entries = [(r, t) for r, t in entries if not any(i in missing for i in t.image_ids)]
        gallery = [i for i in gallery if i not in missing]
        logging.warning(
            "%s: %d gallery images missing on disk; dropped them and %d triplets", name, len(missing),
            before - len(entries),
        )
    return CIRSplit(
        name=name,
        triplets=tuple(t for _, t in entries),
        gallery_ids=tuple(gallery),
        image_paths=dict(image_paths),
    )


# ----------------------------------------------------------------------------------------------------------------------
# FashionIQ
# ----------------------------------------------------------------------------------------------------------------------

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_SPLITS = ("train", "val", "test")


def read_fashioniq(
    root: str,
    category: str,
    split: str,
    *,
    image_ext: str = ".png",
    check_images: bool = True,
    skip_missing: bool = False,
) -> CIRSplit:
    """Reads one FashionIQ category and split (spec §9, SPRC/CLIP4Cir layout).

    Layout: `<root>/captions/cap.<category>.<split>.json` (list of `{"candidate", "target", "captions": [c1, c2]}`;
    test rows have no target), `<root>/image_splits/split.<category>.<split>.json` (list of image ids: the gallery),
    `<root>/images/<id><image_ext>`. The gallery is the whole split list, in file order, reference images included:
    the `fiq_original` protocol of spec §10 (reference not excluded) works on it directly.

    Args:
      root: the FashionIQ root directory.
      category: one of `FASHIONIQ_CATEGORIES`.
      split: one of `FASHIONIQ_SPLITS`.
      image_ext: image file extension (`.png` in the SPRC layout).
      check_images: check that every gallery image file exists.
      skip_missing: drop (and count in a warning) triplets and gallery ids whose image is missing, instead of raising.

    Returns:
      A `CIRSplit` named `fashioniq/<category>/<split>`. `captions` must be a non-empty list of strings (two in the
      official files); each triplet keeps them all, in file order.
    """
    _check_choice(category, FASHIONIQ_CATEGORIES, "FashionIQ category")
    _check_choice(split, FASHIONIQ_SPLITS, "FashionIQ split")
    _check_root(root, "FashionIQ")
    captions_path = os.path.join(root, "captions", f"cap.{category}.{split}.json")
    split_path = os.path.join(root, "image_splits", f"split.{category}.{split}.json")
    required = ("candidate", "captions") if split == "test" else ("candidate", "target", "captions")
    rows = _check_rows(_read_json(captions_path, "FashionIQ captions file"), captions_path, "FashionIQ", required)
    gallery = _check_id_list(_read_json(split_path, "FashionIQ split file"), split_path, "FashionIQ")

    entries = []
    for i, row in enumerate(rows):
        captions = _list_value(row["captions"], captions_path, i, "captions")
        texts = tuple(_text_value(c, captions_path, i, "captions") for c in captions)
        target = _id_value(row["target"], captions_path, i, "target") if "target" in row else None
        triplet = CIRTriplet(
            pair_id=f"{category}-{split}-{i:05d}",
            reference_id=_id_value(row["candidate"], captions_path, i, "candidate"),
            modification_texts=texts,
            target_ids=(target,) if target is not None else (),
            category=category,
        )
        entries.append((i, triplet))
    entries = _check_known(
        entries, gallery, captions_path=captions_path, split_path=split_path,
        keys={"reference": "candidate", "target": "target"}, skip_missing=skip_missing,
    )
    image_paths = {i: os.path.join(root, "images", i + image_ext) for i in gallery}
    return _finalise(
        f"fashioniq/{category}/{split}", entries, gallery, image_paths, captions_path=captions_path,
        split_path=split_path, check_images=check_images, skip_missing=skip_missing,
    )


# ----------------------------------------------------------------------------------------------------------------------
# CIRR
# ----------------------------------------------------------------------------------------------------------------------

CIRR_SPLITS = ("train", "val", "test1")


def _cirr_annotation_dir(root: str) -> str:
    """`<root>/cirr` if it holds `captions/` (SPRC's `cirr_dataset/cirr/...`), else `<root>` (a CIRR repo clone)."""
    nested = os.path.join(root, "cirr")
    return nested if os.path.isdir(os.path.join(nested, "captions")) else root


def read_cirr(
    root: str,
    split: str,
    *,
    image_root: str | None = None,
    check_images: bool = True,
    skip_missing: bool = False,
) -> CIRSplit:
    """Reads one CIRR split (spec §9).

    Layout (SPRC's `cirr_dataset/`): `<root>/cirr/captions/cap.rc2.<split>.json`,
    `<root>/cirr/image_splits/split.rc2.<split>.json` (image name -> relative path such as `./dev/dev-0-0-img0.png`),
    images at `<image_root>/<relative path>` (default `image_root = root`: `dev/`, `test1/`, `train/<n>/`). The
    annotation directories may also sit directly in `<root>` (a clone of the CIRR repo).

    Caption rows: `pairid`, `reference`, `target_hard` (absent in test1), `caption`, `img_set.members`. Trainers use
    `target_hard` only (spec §9), so `target_soft` is not read. `subset_ids` is `img_set.members` as in the file
    (6 ids including reference and target); for val and test1 the reader checks that the members contain the
    reference (and the target), as R_subset assumes. The gallery is every image of the split file (spec §13.3).

    Args:
      root: the CIRR root directory.
      split: one of `CIRR_SPLITS`.
      image_root: directory the split file's relative paths start from (default `root`).
      check_images: check that every gallery image file exists.
      skip_missing: drop (and count) triplets and gallery ids whose image is missing, instead of raising.
    """
    _check_choice(split, CIRR_SPLITS, "CIRR split")
    _check_root(root, "CIRR")
    annotation_dir = _cirr_annotation_dir(root)
    captions_path = os.path.join(annotation_dir, "captions", f"cap.rc2.{split}.json")
    split_path = os.path.join(annotation_dir, "image_splits", f"split.rc2.{split}.json")
    required = ("pairid", "reference", "caption", "img_set") + (() if split == "test1" else ("target_hard",))
    rows = _check_rows(_read_json(captions_path, "CIRR captions file"), captions_path, "CIRR", required)
    name_to_relpath = _read_json(split_path, "CIRR split file")
    if not isinstance(name_to_relpath, dict):
        raise CIRDataError(
            f"{split_path}: expected a JSON object mapping image name -> relative path, "
            f"got {_describe_json(name_to_relpath)}"
        )
    for image_id, relpath in name_to_relpath.items():
        if not isinstance(relpath, str) or not relpath:
            raise CIRDataError(f"{split_path}: image {image_id!r}: expected a relative path string, got {relpath!r}")

    entries, first_row = [], {}
    for i, row in enumerate(rows):
        pair_id = _id_value(row["pairid"], captions_path, i, "pairid")
        if pair_id in first_row:
            raise CIRDataError(f"{captions_path}: row {i}: pairid {pair_id} repeats row {first_row[pair_id]}")
        first_row[pair_id] = i
        reference = _id_value(row["reference"], captions_path, i, "reference")
        target = _id_value(row["target_hard"], captions_path, i, "target_hard") if "target_hard" in row else None
        img_set = row["img_set"]
        if not isinstance(img_set, dict) or "members" not in img_set:
            raise CIRDataError(f"{captions_path}: row {i}: missing key 'img_set.members' (img_set is {img_set!r})")
        members = _unique_ids(
            [_id_value(m, captions_path, i, "img_set.members")
             for m in _list_value(img_set["members"], captions_path, i, "img_set.members")],
            captions_path, i, "img_set.members",
        )
        if split != "train":
            for key, image_id in (("reference", reference), ("target_hard", target)):
                if image_id is not None and image_id not in members:
                    raise CIRDataError(
                        f"{captions_path}: row {i}: img_set.members does not contain the {key} {image_id!r}"
                    )
        triplet = CIRTriplet(
            pair_id=pair_id,
            reference_id=reference,
            modification_texts=(_text_value(row["caption"], captions_path, i, "caption"),),
            target_ids=(target,) if target is not None else (),
            subset_ids=members,
        )
        entries.append((i, triplet))
    entries = _check_known(
        entries, name_to_relpath, captions_path=captions_path, split_path=split_path,
        keys={"reference": "reference", "target": "target_hard", "subset": "img_set.members"},
        skip_missing=skip_missing,
    )
    base = root if image_root is None else image_root
    image_paths = {i: os.path.normpath(os.path.join(base, rel)) for i, rel in name_to_relpath.items()}
    return _finalise(
        f"cirr/{split}", entries, list(name_to_relpath), image_paths, captions_path=captions_path,
        split_path=split_path, check_images=check_images, skip_missing=skip_missing,
    )


# ----------------------------------------------------------------------------------------------------------------------
# CIRCO
# ----------------------------------------------------------------------------------------------------------------------

CIRCO_SPLITS = ("val", "test")


def _read_coco_image_info(path: str) -> dict[str, str]:
    """COCO `image_info_unlabeled2017.json` -> {str(id): file_name}, in file order."""
    info = _read_json(path, "COCO unlabeled2017 image-info file")
    if not isinstance(info, dict) or not isinstance(info.get("images"), list):
        raise CIRDataError(
            f"{path}: expected a COCO image-info object with an 'images' list, got {_describe_json(info)}"
        )
    id_to_file: dict[str, str] = {}
    for i, entry in enumerate(info["images"]):
        if not isinstance(entry, dict):
            raise CIRDataError(f"{path}: images[{i}]: expected an object, got {type(entry).__name__}")
        for key in ("id", "file_name"):
            if key not in entry:
                raise CIRDataError(f"{path}: images[{i}]: missing key {key!r}")
        image_id = _id_value(entry["id"], path, i, "images.id")
        if image_id in id_to_file:
            raise CIRDataError(f"{path}: images[{i}]: id {image_id} occurs twice")
        id_to_file[image_id] = _text_value(entry["file_name"], path, i, "images.file_name")
    return id_to_file


def read_circo(
    root: str,
    split: str,
    *,
    check_images: bool = True,
    skip_missing: bool = False,
) -> CIRSplit:
    """Reads one CIRCO split (spec §9; the layout of the official `src/dataset.py`).

    Layout: `<root>/annotations/<split>.json` (rows with `id`, `reference_img_id`, `relative_caption`,
    `shared_concept`; val adds `target_img_id`, `gt_img_ids`, `semantic_aspects`),
    `<root>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json` (COCO ids -> file names) and
    `<root>/COCO2017_unlabeled/unlabeled2017/<file_name>`. Image ids are the COCO ids as strings; the gallery is the
    whole unlabeled set (about 123K images; `check_images=False` skips listing them). `target_ids` is
    `target_img_id` followed by the other `gt_img_ids` (the multiple ground truths of mAP@K).

    Args:
      root: the CIRCO root directory.
      split: one of `CIRCO_SPLITS`.
      check_images: check that every gallery image file exists.
      skip_missing: drop (and count) queries and gallery ids whose image is missing, instead of raising.
    """
    _check_choice(split, CIRCO_SPLITS, "CIRCO split")
    _check_root(root, "CIRCO")
    captions_path = os.path.join(root, "annotations", f"{split}.json")
    info_path = os.path.join(root, "COCO2017_unlabeled", "annotations", "image_info_unlabeled2017.json")
    image_dir = os.path.join(root, "COCO2017_unlabeled", "unlabeled2017")
    required = ("id", "reference_img_id", "relative_caption", "shared_concept")
    if split == "val":
        required += ("target_img_id", "gt_img_ids")
    rows = _check_rows(_read_json(captions_path, "CIRCO annotation file"), captions_path, "CIRCO", required)
    id_to_file = _read_coco_image_info(info_path)

    entries, first_row = [], {}
    for i, row in enumerate(rows):
        pair_id = _id_value(row["id"], captions_path, i, "id")
        if pair_id in first_row:
            raise CIRDataError(f"{captions_path}: row {i}: id {pair_id} repeats row {first_row[pair_id]}")
        first_row[pair_id] = i
        target_ids: tuple[str, ...] = ()
        if "target_img_id" in row and "gt_img_ids" in row:
            target = _id_value(row["target_img_id"], captions_path, i, "target_img_id")
            ground_truths = _unique_ids(
                [_id_value(g, captions_path, i, "gt_img_ids")
                 for g in _list_value(row["gt_img_ids"], captions_path, i, "gt_img_ids")],
                captions_path, i, "gt_img_ids",
            )
            if target not in ground_truths:
                raise CIRDataError(f"{captions_path}: row {i}: target_img_id {target} is not in gt_img_ids")
            target_ids = (target, *(g for g in ground_truths if g != target))
        aspects = row.get("semantic_aspects", [])
        if not isinstance(aspects, list) or not all(isinstance(a, str) for a in aspects):
            raise CIRDataError(f"{captions_path}: row {i}: semantic_aspects must be a list of strings, got {aspects!r}")
        triplet = CIRTriplet(
            pair_id=pair_id,
            reference_id=_id_value(row["reference_img_id"], captions_path, i, "reference_img_id"),
            modification_texts=(_text_value(row["relative_caption"], captions_path, i, "relative_caption"),),
            target_ids=target_ids,
            shared_concept=_text_value(row["shared_concept"], captions_path, i, "shared_concept"),
            semantic_aspects=tuple(aspects),
        )
        entries.append((i, triplet))
    entries = _check_known(
        entries, id_to_file, captions_path=captions_path, split_path=info_path,
        keys={"reference": "reference_img_id", "target": "gt_img_ids"}, skip_missing=skip_missing,
    )
    image_paths = {i: os.path.join(image_dir, name) for i, name in id_to_file.items()}
    return _finalise(
        f"circo/{split}", entries, list(id_to_file), image_paths, captions_path=captions_path,
        split_path=info_path, check_images=check_images, skip_missing=skip_missing,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Shoes
# ----------------------------------------------------------------------------------------------------------------------

SHOES_SPLITS = ("train", "val")
_SHOES_NAME_FILES = {"train": "train_im_names.txt", "val": "eval_im_names.txt"}
_SHOES_CATEGORY = re.compile(r"^img_(.+)_\d+\.\w+$")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _read_name_list(path: str) -> list[str]:
    """A text file of image file names, one per line (blank lines ignored, duplicates rejected with line numbers)."""
    if not os.path.isfile(path):
        raise CIRFileNotFoundError(f"Shoes image list not found: expected {path}")
    names: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            name = line.strip()
            if not name:
                continue
            if name in names:
                raise CIRDataError(f"{path}: line {line_number}: image {name!r} repeats line {names[name]}")
            names[name] = line_number
    return list(names)


def _index_image_tree(root: str) -> dict[str, str]:
    """File name -> path for every image file below `root`; a file name found twice is an error naming both."""
    index: dict[str, str] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(files):
            if name.lower().endswith(_IMAGE_SUFFIXES):
                path = os.path.join(directory, name)
                if name in index:
                    raise CIRDataError(f"Shoes image file name {name!r} occurs twice: {index[name]} and {path}")
                index[name] = path
    return index


def shoes_category(image_name: str) -> str:
    """`img_womens_clogs_851.jpg` -> `womens_clogs`; '' when the name does not follow the Shoes pattern."""
    match = _SHOES_CATEGORY.match(image_name)
    return match.group(1) if match else ""


def read_shoes(
    root: str,
    split: str,
    *,
    check_images: bool = True,
    skip_missing: bool = False,
) -> CIRSplit:
    """Reads one Shoes split (spec §9 names the files; the row format and split rule are our documented choice).

    Layout: `<root>/relative_captions_shoes.json` (list of `{"ImageName": target, "ReferenceImageName": reference,
    "RelativeCaption": text}`), `<root>/train_im_names.txt` and `<root>/eval_im_names.txt` (one file name per line),
    image files anywhere below `<root>` (found by file name; one walk of the tree, done even with
    `check_images=False` since it is how names map to paths). Image ids are the file names. A triplet belongs to
    the split listing both its images; rows straddling the two lists are dropped with a warning.

    Args:
      root: the Shoes root directory.
      split: `train` (train_im_names.txt) or `val` (eval_im_names.txt).
      check_images: require every listed image to be found below `root`.
      skip_missing: drop (and count) triplets and gallery ids whose image is missing or unlisted, instead of raising.
    """
    _check_choice(split, SHOES_SPLITS, "Shoes split")
    _check_root(root, "Shoes")
    captions_path = os.path.join(root, "relative_captions_shoes.json")
    split_path = os.path.join(root, _SHOES_NAME_FILES[split])
    other_path = os.path.join(root, _SHOES_NAME_FILES["val" if split == "train" else "train"])
    required = ("ImageName", "ReferenceImageName", "RelativeCaption")
    rows = _check_rows(_read_json(captions_path, "Shoes relative-captions file"), captions_path, "Shoes", required)
    names = _read_name_list(split_path)
    other = set(_read_name_list(other_path))
    shared = next((n for n in names if n in other), None)
    if shared is not None:
        raise CIRDataError(f"image {shared!r} is listed in both {split_path} and {other_path}")
    this = set(names)

    entries, straddling, unknown_skipped = [], 0, 0
    for i, row in enumerate(rows):
        reference = os.path.basename(_id_value(row["ReferenceImageName"], captions_path, i, "ReferenceImageName"))
        target = os.path.basename(_id_value(row["ImageName"], captions_path, i, "ImageName"))
        unknown = next(((k, n) for k, n in (("ReferenceImageName", reference), ("ImageName", target))
                        if n not in this and n not in other), None)
        if unknown is not None:
            if skip_missing:
                unknown_skipped += 1
                continue
            raise CIRDataError(
                f"{captions_path}: row {i}: {unknown[0]} {unknown[1]!r} is in neither {split_path} nor {other_path}"
            )
        in_this = (reference in this, target in this)
        if in_this == (False, False):
            continue  # a triplet of the other split
        if in_this != (True, True):
            straddling += 1
            continue
        triplet = CIRTriplet(
            pair_id=f"shoes-{i:05d}",
            reference_id=reference,
            modification_texts=(_text_value(row["RelativeCaption"], captions_path, i, "RelativeCaption"),),
            target_ids=(target,),
            category=shoes_category(target),
        )
        entries.append((i, triplet))
    if straddling or unknown_skipped:
        logging.warning(
            "%s: %d rows have their two images in different splits (belong to neither); %d rows name unlisted images "
            "and were skipped", captions_path, straddling, unknown_skipped,
        )

    index = _index_image_tree(root)
    unfound = [n for n in names if n not in index]
    if unfound and check_images and not skip_missing:
        user = next(((r, t) for r, t in entries if unfound[0] in t.image_ids), None)
        where = f"{captions_path}: row {user[0]}: " if user else f"{split_path}: "
        raise CIRFileNotFoundError(
            f"{where}image {unfound[0]!r} not found anywhere below {root} "
            f"({len(unfound)} listed image(s) missing; skip_missing=True drops them)"
        )
    if unfound and skip_missing:
        missing = set(unfound)
        before = len(entries)
        entries = [(r, t) for r, t in entries if not any(n in missing for n in t.image_ids)]
        names = [n for n in names if n not in missing]
        logging.warning("%s: %d listed images not found; dropped them and %d triplets", split_path, len(missing),
                        before - len(entries))
    image_paths = {n: index.get(n, os.path.join(root, n)) for n in names}
    return _finalise(
        f"shoes/{split}", entries, names, image_paths, captions_path=captions_path, split_path=split_path,
        check_images=False, skip_missing=skip_missing,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Embedded default: CSS-style synthetic scenes
# ----------------------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 180, 60),
    "cyan": (30, 200, 220),
    "blue": (40, 80, 230),
    "purple": (150, 60, 200),
    "pink": (245, 130, 190),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
BACKGROUND = (24, 24, 24)
GRID = 3  # positions: cells 0..8 of a 3x3 grid, row-major (0 = top left, 4 = centre, 8 = bottom right)
MAX_OBJECTS = 5
MODIFICATION_KINDS = ("add", "remove", "recolour", "resize", "reshape", "move")
CAPTION_LEVELS = ("L1_global", "L2_attributes", "L3_discriminative", "Final_Caption")  # spec §3.3 keys
CELL_NAMES = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
_CELL_AT = ("in the top left", "at the top", "in the top right", "on the left", "in the centre", "on the right",
            "in the bottom left", "at the bottom", "in the bottom right")
_CELL_TO = tuple(f"to the {name}" for name in CELL_NAMES)
_COUNT_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_RADIUS = {"small": 0.22, "large": 0.42}  # object radius as a fraction of the cell side
_SHAPE_INDEX = {name: i for i, name in enumerate(SHAPES)}
_COLOUR_INDEX = {name: i for i, name in enumerate(COLOUR_NAMES)}
_SIZE_INDEX = {name: i for i, name in enumerate(SIZES)}

# Scenes are assigned to splits by a hash of their graph (buckets of 20: 14 train, 3 val, 3 test), so identical
# scenes can never occur in two splits: no leakage between train and evaluation, whatever the seed.
_SPLIT_BUCKETS = ("train",) * 14 + ("val",) * 3 + ("test",) * 3

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": ("add {new} {at}", "put {new} {at}", "place {new} {at}", "insert {new} {at}"),
    "remove": ("remove {obj}", "delete {obj}", "take away {obj}", "get rid of {obj}"),
    "recolour": ("make {obj} {colour}", "change the colour of {obj} to {colour}", "paint {obj} {colour}",
                 "turn {obj} {colour}"),
    "resize_large": ("make {obj} large", "make {obj} bigger", "enlarge {obj}", "increase the size of {obj}"),
    "resize_small": ("make {obj} small", "make {obj} smaller", "shrink {obj}", "reduce the size of {obj}"),
    "reshape": ("turn {obj} into a {shape}", "make {obj} a {shape}", "change {obj} into a {shape}",
                "replace {obj} with a {size} {colour} {shape}"),
    "move": ("move {obj} {to}", "shift {obj} {to}", "drag {obj} {to}", "relocate {obj} {to}"),
}
NUM_PARAPHRASES = 4


@dataclasses.dataclass(frozen=True, order=True)
class SceneObject:
    """One object: grid cell (0..8, row-major), shape, colour and size names."""

    cell: int
    shape: str
    colour: str
    size: str


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene graph: objects sorted by cell, at most one object per cell (so objects never overlap)."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if cells != sorted(set(cells)) or any(not 0 <= c < GRID * GRID for c in cells):
            raise ValueError(f"scene objects must have distinct cells in 0..8, sorted: {cells}")
        for o in self.objects:
            if o.shape not in _SHAPE_INDEX or o.colour not in _COLOUR_INDEX or o.size not in _SIZE_INDEX:
                raise ValueError(f"unknown shape, colour or size in {o}")


def make_scene(objects: Iterable[SceneObject]) -> Scene:
    """A `Scene` from objects in any order."""
    return Scene(tuple(sorted(objects)))


@dataclasses.dataclass(frozen=True)
class Modification:
    """One edit: `before` is the object in the reference (None for add), `after` the object in the target
    (None for remove). Every kind changes exactly one thing, so the target always differs from the reference."""

    kind: str
    before: SceneObject | None
    after: SceneObject | None


def apply_modification(scene: Scene, modification: Modification) -> Scene:
    """The target scene: `before` removed, `after` added."""
    objects = [o for o in scene.objects if o != modification.before]
    if modification.after is not None:
        objects.append(modification.after)
    return make_scene(objects)


def scene_diff(reference: Scene, target: Scene) -> Modification:
    """The single edit that turns `reference` into `target`.

    Raises:
      ValueError: the scenes differ by zero or by more than one edit.
    """
    ref = {o.cell: o for o in reference.objects}
    tgt = {o.cell: o for o in target.objects}
    removed = [ref[c] for c in ref if c not in tgt]
    added = [tgt[c] for c in tgt if c not in ref]
    changed = [(ref[c], tgt[c]) for c in ref if c in tgt and ref[c] != tgt[c]]
    if len(added) == 1 and not removed and not changed:
        return Modification("add", None, added[0])
    if len(removed) == 1 and not added and not changed:
        return Modification("remove", removed[0], None)
    if len(removed) == 1 and len(added) == 1 and not changed:
        before, after = removed[0], added[0]
        if dataclasses.replace(before, cell=after.cell) == after:
            return Modification("move", before, after)
    if len(changed) == 1 and not added and not removed:
        before, after = changed[0]
        differing = [f for f in ("shape", "colour", "size") if getattr(before, f) != getattr(after, f)]
        if len(differing) == 1:
            kind = {"shape": "reshape", "colour": "recolour", "size": "resize"}[differing[0]]
            return Modification(kind, before, after)
    raise ValueError(f"scenes do not differ by exactly one edit: {reference} -> {target}")


def scene_key(scene: Scene) -> bytes:
    """A compact canonical encoding of the scene graph (4 bytes per object)."""
    return bytes(
        v for o in scene.objects
        for v in (o.cell, _SHAPE_INDEX[o.shape], _COLOUR_INDEX[o.colour], _SIZE_INDEX[o.size])
    )


def scene_split(scene: Scene) -> str:
    """The split a scene graph belongs to (`train`/`val`/`test`), fixed by a hash of the graph."""
    return _SPLIT_BUCKETS[zlib.crc32(scene_key(scene)) % len(_SPLIT_BUCKETS)]


def _shape_geometry(shape: str, cx: float, cy: float, r: float) -> list[list[tuple[float, float]]]:
    """Polygons (pixel coordinates) that draw `shape` centred at (cx, cy) with radius r; circle handled apart."""
    if shape == "square":
        h = 0.85 * r
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]]
    if shape == "diamond":
        return [[(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]]
    if shape == "cross":
        w = 0.36 * r
        return [
            [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
            [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
        ]
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, *, supersample: int = 4) -> np.ndarray:
    """Renders a scene as uint8 `[size, size, 3]`: objects on a dark background, anti-aliased by box-downsampling a
    `supersample`-times larger drawing. Deterministic: the same scene and size give byte-identical arrays."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell_px = big / GRID
    for o in scene.objects:
        row, col = divmod(o.cell, GRID)
        cx, cy, r = (col + 0.5) * cell_px, (row + 0.5) * cell_px, _RADIUS[o.size] * cell_px
        colour = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            for polygon in _shape_geometry(o.shape, cx, cy, r):
                draw.polygon(polygon, fill=colour)
    if supersample > 1:
        image = image.reduce(supersample)
    return np.array(image, dtype=np.uint8)


def _render_cached(scene: Scene, size: int, cache_dir: str) -> np.ndarray:
    """`render` through a PNG cache file named by the scene graph and size (written atomically)."""
    path = os.path.join(cache_dir, f"css-{size}px-{hashlib.sha1(scene_key(scene)).hexdigest()[:20]}.png")
    if os.path.exists(path):
        try:
            with Image.open(path) as image:
                cached = np.array(image.convert("RGB"), dtype=np.uint8)
            if cached.shape == (size, size, 3):
                return cached
        except (OSError, SyntaxError, ValueError):
            pass  # a torn or corrupt cache file: re-render and overwrite it
    pixels = render(scene, size)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)
    return pixels


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _indefinite(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _count(n: int, noun: str) -> str:
    return f"{_COUNT_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def referring_expression(scene: Scene, obj: SceneObject) -> str:
    """The shortest of 'the <colour> <shape>', 'the <size> <colour> <shape>', 'the <colour> <shape> <position>'
    that picks out `obj` alone in `scene` (the position always does: one object per cell)."""
    same = [o for o in scene.objects if o.colour == obj.colour and o.shape == obj.shape]
    if len(same) == 1:
        return f"the {obj.colour} {obj.shape}"
    if sum(o.size == obj.size for o in same) == 1:
        return f"the {obj.size} {obj.colour} {obj.shape}"
    return f"the {obj.colour} {obj.shape} {_CELL_AT[obj.cell]}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b on the grid: 'above', 'left of', 'below and right of', ..."""
    (row_a, col_a), (row_b, col_b) = divmod(a.cell, GRID), divmod(b.cell, GRID)
    vertical = "above" if row_a < row_b else "below" if row_a > row_b else ""
    horizontal = "left of" if col_a < col_b else "right of" if col_a > col_b else ""
    return " and ".join(p for p in (vertical, horizontal) if p)


def scene_captions(scene: Scene) -> dict[str, str]:
    """Multi-level captions of a scene, keyed by `CAPTION_LEVELS` (the spec §3.3 file shape).

    They stand in for the MLLM chain-of-thought captions: L1_global lists the objects; L2_attributes gives each
    object's size, colour, shape and position; L3_discriminative summarises counts and the pairwise spatial relations
    of neighbours in reading order; Final_Caption merges them into one sentence (at most ~50 words).
    """
    objects = scene.objects
    if not objects:
        empty = "an empty dark canvas with no objects"
        return dict.fromkeys(CAPTION_LEVELS, empty)
    n = len(objects)
    described = [f"a {o.size} {o.colour} {o.shape} {_CELL_AT[o.cell]}" for o in objects]
    l1 = f"{_count(n, 'object')}: {_join_and([_indefinite(f'{o.colour} {o.shape}') for o in objects])}"
    l2 = "; ".join(described)
    num_large = sum(o.size == "large" for o in objects)
    if n == 1:
        summary = f"a single {objects[0].size} object, the rest of the canvas empty"
    elif num_large in (0, n):
        summary = f"{_count(n, 'object')}, all {objects[0].size}"
    else:
        summary = f"{_count(n, 'object')}, {_COUNT_WORDS[num_large]} large and {_COUNT_WORDS[n - num_large]} small"
    relations = [
        f"{referring_expression(scene, a)} is {_relation(a, b)} {referring_expression(scene, b)}"
        for a, b in zip(objects[:-1], objects[1:], strict=True)
    ]
    l3 = "; ".join([summary, *relations])
    final = f"{_count(n, 'object').capitalize()} on a dark background: {_join_and(described)}."
    return {"L1_global": l1, "L2_attributes": l2, "L3_discriminative": l3, "Final_Caption": final}


def modification_text(reference: Scene, modification: Modification, paraphrase: int = 0) -> str:
    """The templated instruction for `modification` of `reference` (`paraphrase` in [0, NUM_PARAPHRASES))."""
    kind, before, after = modification.kind, modification.before, modification.after
    key = kind if kind != "resize" else f"resize_{after.size}"
    template = _TEMPLATES[key][paraphrase % NUM_PARAPHRASES]
    fields: dict[str, str] = {}
    if before is not None:
        fields["obj"] = referring_expression(reference, before)
    if after is not None:
        fields.update(
            new=f"a {after.size} {after.colour} {after.shape}", at=_CELL_AT[after.cell], to=_CELL_TO[after.cell],
            colour=after.colour, shape=after.shape, size=after.size,
        )
    return template.format(**fields)


class _Draws:
    """Deterministic scalar draws from one numpy PCG64 stream, consumed from float32 blocks at Python speed.

    `below(n)` is uniform in [0, n) (exactly: a float32 uniform is at most 1 - 2**-24, so `u * n < n` for any n
    below 2**24). The sequence depends only on the entropy passed in.
    """

    _BLOCK = 4096

    def __init__(self, entropy: Sequence[int]):
        generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))
        blocks = iter(lambda: generator.random(self._BLOCK, dtype=np.float32).tolist(), None)
        next_uniform = functools.partial(next, itertools.chain.from_iterable(blocks))
        self.below: Callable[[int], int] = lambda n: int(next_uniform() * n)

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def sample(self, items: Sequence[T], k: int) -> list[T]:
        """k distinct items, in draw order (partial Fisher-Yates)."""
        pool = list(items)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


# Generation works on plain int tuples, fast to sort, compare, hash and key: an object is
# (cell, shape index, colour index, size index) and a graph is a tuple of objects sorted by cell. Only accepted
# scenes are converted to `Scene` (see `_to_scene`); `scene_key` of the converted scene equals `_graph_key`.
_Obj = tuple[int, int, int, int]
_Graph = tuple[_Obj, ...]
_Edit = tuple[str, _Obj | None, _Obj | None]  # (kind, before, after)


def _graph_key(graph: _Graph) -> bytes:
    return bytes(itertools.chain.from_iterable(graph))


def _graph_split(graph: _Graph) -> str:
    return _SPLIT_BUCKETS[zlib.crc32(_graph_key(graph)) % len(_SPLIT_BUCKETS)]


_OBJECTS: dict[_Obj, SceneObject] = {
    (cell, shape, colour, size): SceneObject(cell, SHAPES[shape], COLOUR_NAMES[colour], SIZES[size])
    for cell, shape, colour, size in itertools.product(
        range(GRID * GRID), range(len(SHAPES)), range(len(COLOURS)), range(len(SIZES))
    )
}


def _to_object(obj: _Obj) -> SceneObject:
    return _OBJECTS[obj]


def _to_scene(graph: _Graph) -> Scene:
    return Scene(tuple(_to_object(o) for o in graph))


def _sample_graph(draws: _Draws, min_objects: int, max_objects: int) -> _Graph:
    below = draws.below
    n = min_objects + below(max_objects - min_objects + 1)
    cells = draws.sample(range(GRID * GRID), n)
    return tuple(sorted((cell, below(len(SHAPES)), below(len(COLOURS)), below(len(SIZES))) for cell in cells))


def _object_range(kind: str) -> tuple[int, int]:
    """Object counts of a reference that `kind` can edit, keeping every scene within 1..MAX_OBJECTS objects."""
    return {"add": (1, MAX_OBJECTS - 1), "remove": (2, MAX_OBJECTS)}.get(kind, (1, MAX_OBJECTS))


def _other(value: int, count: int, draws: _Draws) -> int:
    """A uniform index in [0, count) other than `value`."""
    drawn = draws.below(count - 1)
    return drawn + (drawn >= value)


def _sample_edit(graph: _Graph, kind: str, draws: _Draws) -> _Edit | None:
    """A random edit of `kind` applicable to `graph`, or None if there is none."""
    below = draws.below
    occupied = {o[0] for o in graph}
    free = [c for c in range(GRID * GRID) if c not in occupied]
    if kind == "add":
        if len(graph) >= MAX_OBJECTS or not free:
            return None
        return kind, None, (free[below(len(free))], below(len(SHAPES)), below(len(COLOURS)), below(len(SIZES)))
    if kind == "remove":
        return (kind, graph[below(len(graph))], None) if len(graph) >= 2 else None
    cell, shape, colour, size = before = graph[below(len(graph))]
    if kind == "recolour":
        return kind, before, (cell, shape, _other(colour, len(COLOURS), draws), size)
    if kind == "resize":
        return kind, before, (cell, shape, colour, 1 - size)
    if kind == "reshape":
        return kind, before, (cell, _other(shape, len(SHAPES), draws), colour, size)
    if kind == "move":
        return (kind, before, (free[below(len(free))], shape, colour, size)) if free else None
    raise ValueError(f"unknown modification kind {kind!r}")


def _apply_edit(graph: _Graph, edit: _Edit) -> _Graph:
    _, before, after = edit
    objects = [o for o in graph if o != before]
    if after is not None:
        objects.append(after)
    return tuple(sorted(objects))


def _sample_query(draws: _Draws, split: str, num_distractors: int) -> tuple[_Graph, _Edit, _Graph, list[_Graph], int]:
    """(reference, edit, target, distractors, paraphrase), all graphs in `split`. Distractors are distinct one-edit
    neighbours of the reference other than the target: as close to the reference as the target is, so only the
    modification text tells them apart (an image-only model cannot). The kind is drawn once, so rejections do not
    skew the mix of kinds towards the easily accepted ones."""
    kind = draws.pick(MODIFICATION_KINDS)
    while True:
        reference = _sample_graph(draws, *_object_range(kind))
        if _graph_split(reference) != split:
            continue
        for _ in range(8):
            edit = _sample_edit(reference, kind, draws)
            target = _apply_edit(reference, edit) if edit is not None else None
            if target is not None and _graph_split(target) == split:
                break
        else:
            continue
        distractors: list[_Graph] = []
        for _ in range(50 * num_distractors):
            if len(distractors) == num_distractors:
                break
            neighbour_edit = _sample_edit(reference, draws.pick(MODIFICATION_KINDS), draws)
            if neighbour_edit is None:
                continue
            neighbour = _apply_edit(reference, neighbour_edit)
            fresh = neighbour not in (reference, target) and neighbour not in distractors
            if fresh and _graph_split(neighbour) == split:
                distractors.append(neighbour)
        if len(distractors) == num_distractors:
            return reference, edit, target, distractors, draws.below(NUM_PARAPHRASES)


class _LazyCaptions(Mapping[str, Mapping[str, str]]):
    """image id -> `scene_captions(scene)`, computed on access (cheap, and most ids are never asked for)."""

    def __init__(self, scenes: Mapping[str, Scene]):
        self._scenes = scenes

    def __getitem__(self, image_id: str) -> Mapping[str, str]:
        return scene_captions(self._scenes[image_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self._scenes)

    def __len__(self) -> int:
        return len(self._scenes)


def _css_split(split: str, num_triplets: int, seed: int, subset_size: int, image_size: int) -> CIRSplit:
    """Generates one CSS split. Scenes with equal graphs share one image id, so each gallery image is unique."""
    draws = _Draws([seed, ("train", "val", "test").index(split)])
    with_subsets = split != "train"
    num_distractors = subset_size - 2 if with_subsets else 0
    ids: dict[_Graph, str] = {}

    def image_id(graph: _Graph) -> str:
        if graph not in ids:
            ids[graph] = f"css-{split}-{len(ids):06d}"
        return ids[graph]

    triplets = []
    for n in range(num_triplets):
        reference, (kind, before, after), target, distractors, paraphrase = _sample_query(draws, split, num_distractors)
        reference_id, target_id = image_id(reference), image_id(target)
        subset: tuple[str, ...] = ()
        if with_subsets:
            members = [reference_id, target_id, *(image_id(g) for g in distractors)]
            subset = tuple(draws.sample(members, len(members)))  # shuffled: the target's slot carries no signal
        modification = Modification(
            kind, None if before is None else _to_object(before), None if after is None else _to_object(after)
        )
        triplets.append(CIRTriplet(
            pair_id=f"css-{split}-pair-{n:06d}",
            reference_id=reference_id,
            modification_texts=(modification_text(_to_scene(reference), modification, paraphrase),),
            target_ids=(target_id,),
            subset_ids=subset,
            category=kind,
        ))
    scenes = {assigned: _to_scene(graph) for graph, assigned in ids.items()}
    return CIRSplit(
        name=f"css/{split}",
        triplets=tuple(triplets),
        gallery_ids=tuple(scenes),
        image_paths={},
        scenes=scenes,
        image_captions=_LazyCaptions(scenes),
        image_size=image_size,
    )


def embedded_css(
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 10_000,
    num_val: int = 1_000,
    num_test: int = 1_000,
    subset_size: int = 6,
) -> dict[str, CIRSplit]:
    """The built-in CSS-style composed-retrieval set (no downloads), deterministic per seed.

    Scenes hold 1-5 objects (5 shapes, 8 colours, 2 sizes) on distinct cells of a 3x3 grid. Each triplet edits a
    reference scene once (add / remove / recolour / resize / reshape / move one object) and states the edit in one of
    4 templated paraphrases that name objects unambiguously ("make the blue square green"). Only scene graphs are
    generated here (1-2 s for the defaults on one CPU core); pixels come from `make_image_fn(split)` (i.e. `render`),
    and multi-level captions from `split.image_captions` (i.e. `scene_captions`). Each split is one random stream, so
    a smaller `num_*` yields a prefix of the larger set's triplets.

    Splits: `train`, `val`, `test`. A scene graph belongs to one split only (`scene_split`), so no image - by id or
    by content - is shared across splits, and equal graphs within a split share one id. Each split's gallery is every
    image of the split. Val/test queries carry CIRR-style groups: `subset_size` members = reference + target +
    `subset_size - 2` other one-edit neighbours of the reference (the CIRR format: R_subset drops the reference);
    they are also in the gallery, so the nearest images to a reference are its edits and the text must pick one. Train
    triplets have no groups.

    Args:
      seed: non-negative; the same seed gives identical scene graphs, texts and (via `render`) pixels.
      image_size: native render size (pixels) recorded in each split.
      num_train, num_val, num_test: triplets per split.
      subset_size: CIRR group size (>= 3).

    Returns:
      {"train": CIRSplit, "val": CIRSplit, "test": CIRSplit}, named `css/<split>`.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if subset_size < 3:
        raise ValueError(f"subset_size must be >= 3 (reference, target and a distractor), got {subset_size}")
    counts = {"train": num_train, "val": num_val, "test": num_test}
    return {split: _css_split(split, n, seed, subset_size, image_size) for split, n in counts.items()}


# ----------------------------------------------------------------------------------------------------------------------
# grain glue
# ----------------------------------------------------------------------------------------------------------------------


def join_modification_texts(texts: Sequence[str], variant: int | None = None) -> str:
    """The query text of a triplet.

    One text is returned unchanged. Two (FashionIQ) follow SPRC (spec §8): each stripped of '.?, ' at both ends;
    `variant=None` (evaluation) gives 'C1 and c2'; training variants 0..3 give 'C1 and c2', 'C2 and c1', 'C1', 'C2'
    (SPRC draws each with probability 1/4; `triplet_dataset(text_seed=...)` does so per (seed, position)).
    More than two texts are joined with ' and '.
    """
    if len(texts) == 1:
        return texts[0]
    cleaned = [t.strip(".?, ") for t in texts]
    if len(texts) != 2:
        return " and ".join(cleaned)
    first, second = cleaned
    forms = (
        f"{first.capitalize()} and {second}",
        f"{second.capitalize()} and {first}",
        first.capitalize(),
        second.capitalize(),
    )
    return forms[0 if variant is None else variant]


@dataclasses.dataclass(frozen=True, eq=False)
class _AlwaysValid:
    def __call__(self, index: int) -> tuple[int, bool]:
        return index, True


@dataclasses.dataclass(frozen=True, eq=False)
class _PadIndex:
    """Position i of a padded stream -> (indices[i mod length], i < length)."""

    indices: grain.MapDataset
    length: int

    def __call__(self, position: int) -> tuple[int, bool]:
        return self.indices[position % self.length], position < self.length


def _indexed(
    num_items: int, *, shuffle_seed: int | None, num_epochs: int | None, batch_size: int | None, drop_remainder: bool
) -> grain.MapDataset:
    """(item index, valid) pairs: shuffled (per-epoch reshuffled), repeated, and padded to whole batches when the
    last batch would be partial and kept (padding repeats real items with valid=False)."""
    if num_items == 0:
        raise ValueError("cannot build a dataset over zero items")
    indices = grain.MapDataset.range(num_items)
    if shuffle_seed is not None:
        indices = indices.shuffle(seed=shuffle_seed)
    if num_epochs != 1:
        indices = indices.repeat(num_epochs)
    if batch_size is None or drop_remainder or num_epochs is None or len(indices) % batch_size == 0:
        return indices.map(_AlwaysValid())
    length = len(indices)
    padded = -(-length // batch_size) * batch_size
    return grain.MapDataset.range(padded).map(_PadIndex(indices, length))


@dataclasses.dataclass(frozen=True, eq=False)
class _TripletElement:
    triplets: Sequence[CIRTriplet]
    image_fn: Callable[[str], np.ndarray]
    caption_fn: Callable[[str], str] | None
    with_targets: bool

    def __call__(self, item: tuple[int, bool], rng: np.random.Generator | None = None) -> dict[str, Any]:
        index, valid = item
        triplet = self.triplets[index]
        variant = None if rng is None or len(triplet.modification_texts) != 2 else int(rng.integers(4))
        element = {
            "index": np.int32(index),
            "valid": np.bool_(valid),
            "pair_id": np.str_(triplet.pair_id),
            "reference_id": np.str_(triplet.reference_id),
            "reference_image": self.image_fn(triplet.reference_id),
            "modification_text": np.str_(join_modification_texts(triplet.modification_texts, variant)),
            "shared_concept": np.str_(triplet.shared_concept),
        }
        if self.with_targets:
            element["target_id"] = np.str_(triplet.target_ids[0])
            element["target_image"] = self.image_fn(triplet.target_ids[0])
            if self.caption_fn is not None:
                element["target_caption"] = np.str_(self.caption_fn(triplet.target_ids[0]))
        return element


def triplet_dataset(
    split: CIRSplit,
    image_fn: Callable[[str], np.ndarray],
    *,
    caption_fn: Callable[[str], str] | None = None,
    with_targets: bool | None = None,
    shuffle_seed: int | None = None,
    num_epochs: int | None = 1,
    text_seed: int | None = None,
    batch_size: int | None = None,
    drop_remainder: bool = False,
) -> grain.MapDataset:
    """A grain pipeline over the split's triplets.

    Each element (leading `[batch]` axis when `batch_size` is set) is a dict of numpy values:
      reference_image, target_image: float32 `[H, W, 3]` from `image_fn`;
      modification_text: str (`join_modification_texts`; random SPRC variant if `text_seed` is set);
      shared_concept: str (CIRCO; '' elsewhere); target_caption: str (only with `caption_fn`);
      pair_id, reference_id, target_id: str; index: int32 into `split.triplets`;
      valid: bool, False on padding rows.
    With `batch_size` and `drop_remainder=False`, a finite stream is padded to whole batches (fixed shapes for jit)
    with copies of real rows marked valid=False. Only grain `MapDataset` ops are used (range, shuffle, repeat, map,
    random_map, batch), so `.to_iter_dataset()` iterators checkpoint and resume by index.

    Args:
      split: the triplets.
      image_fn: image id -> float32 `[H, W, 3]` (e.g. `make_image_fn(split, 224)`).
      caption_fn: target id -> caption (e.g. `lambda i: split.image_captions[i]["Final_Caption"]`).
      with_targets: include target fields; default: whether the split has targets. True on a split without targets
        raises naming a triplet.
      shuffle_seed: global shuffle (reshuffled every epoch) when set; file order otherwise.
      num_epochs: passes over the data; None = infinite.
      text_seed: seeds the per-element choice among SPRC's four FashionIQ text variants (a function of the seed and
        the element's position in the stream); None uses the deterministic evaluation text.
      batch_size: batch the elements when set.
      drop_remainder: drop a last partial batch instead of padding it.
    """
    if with_targets is None:
        with_targets = split.has_targets
    elif with_targets and not split.has_targets:
        bad = next(t for t in split.triplets if not t.target_ids)
        raise ValueError(
            f"{split.name}: triplet {bad.pair_id!r} has no target (a test split?); pass with_targets=False"
        )
    ds = _indexed(
        len(split.triplets), shuffle_seed=shuffle_seed, num_epochs=num_epochs, batch_size=batch_size,
        drop_remainder=drop_remainder,
    )
    element = _TripletElement(split.triplets, image_fn, caption_fn, with_targets)
    ds = ds.map(element) if text_seed is None else ds.random_map(element, seed=text_seed)
    return ds if batch_size is None else ds.batch(batch_size, drop_remainder=drop_remainder)


@dataclasses.dataclass(frozen=True, eq=False)
class _GalleryElement:
    gallery_ids: Sequence[str]
    image_fn: Callable[[str], np.ndarray]
    caption_fn: Callable[[str], str] | None

    def __call__(self, item: tuple[int, bool]) -> dict[str, Any]:
        index, valid = item
        image_id = self.gallery_ids[index]
        element = {
            "index": np.int32(index),
            "valid": np.bool_(valid),
            "image_id": np.str_(image_id),
            "image": self.image_fn(image_id),
        }
        if self.caption_fn is not None:
            element["caption"] = np.str_(self.caption_fn(image_id))
        return element


def gallery_dataset(
    split: CIRSplit,
    image_fn: Callable[[str], np.ndarray],
    *,
    caption_fn: Callable[[str], str] | None = None,
    batch_size: int | None = None,
) -> grain.MapDataset:
    """One pass over the gallery in `split.gallery_ids` order, for encoding every candidate once.

    Elements: image float32 `[H, W, 3]`, image_id str, index int32 into `gallery_ids`, valid bool, and caption str
    with `caption_fn` (the symmetric target tower encodes image + caption). With `batch_size` the last batch is padded
    to full size with valid=False rows, so every batch has the same shape.
    """
    ds = _indexed(len(split.gallery_ids), shuffle_seed=None, num_epochs=1, batch_size=batch_size, drop_remainder=False)
    ds = ds.map(_GalleryElement(split.gallery_ids, image_fn, caption_fn))
    return ds if batch_size is None else ds.batch(batch_size)
