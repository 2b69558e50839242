"""Tests for jax_hd.data.cir: the four official-layout readers, image loading, the embedded CSS set, grain glue."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable

import grain
import numpy as np
import pytest
from PIL import Image

from jax_hd.data import cir

# ----------------------------------------------------------------------------------------------------------------------
# Fixture writers: tiny datasets in each official layout
# ----------------------------------------------------------------------------------------------------------------------


def _write_json(path: str, data: object) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def _write_image(path: str, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 6)) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _fashioniq(root: str) -> str:
    ids = ["B001", "B002", "B003", "B004"]
    for i, image_id in enumerate(ids):
        _write_image(os.path.join(root, "images", f"{image_id}.png"), (40 * i, 50, 60))
    _write_json(os.path.join(root, "image_splits", "split.dress.val.json"), ids)
    _write_json(os.path.join(root, "captions", "cap.dress.val.json"), [
        {"candidate": "B001", "target": "B002", "captions": ["is red.", "has long sleeves"]},
        {"candidate": "B003", "target": "B001", "captions": ["is shorter", "is blue and plain"]},
    ])
    _write_json(os.path.join(root, "image_splits", "split.dress.test.json"), ids[:2])
    _write_json(os.path.join(root, "captions", "cap.dress.test.json"), [
        {"candidate": "B001", "captions": ["is green", "is longer"]},
    ])
    return root


_CIRR_IMAGES = [f"dev-{g}-{k}-img{j}" for g in range(2) for k in range(2) for j in range(2)]  # 8 images


def _cirr(root: str) -> str:
    split = {name: f"./dev/{name}.png" for name in _CIRR_IMAGES}
    for rel in split.values():
        _write_image(os.path.join(root, rel))
    members = _CIRR_IMAGES[:6]
    _write_json(os.path.join(root, "cirr", "image_splits", "split.rc2.val.json"), split)
    _write_json(os.path.join(root, "cirr", "captions", "cap.rc2.val.json"), [
        {"pairid": 10, "reference": members[0], "target_hard": members[3], "target_soft": {members[3]: 1.0},
         "caption": "make it two dogs",
         "img_set": {"id": 1, "members": members, "reference_rank": 0, "target_rank": 3}},
        {"pairid": 11, "reference": members[2], "target_hard": members[5], "target_soft": {members[5]: 1.0},
         "caption": "remove the cat",
         "img_set": {"id": 1, "members": members, "reference_rank": 2, "target_rank": 5}},
    ])
    _write_json(os.path.join(root, "cirr", "image_splits", "split.rc2.test1.json"), split)
    _write_json(os.path.join(root, "cirr", "captions", "cap.rc2.test1.json"), [
        {"pairid": 20, "reference": members[1], "caption": "mirror it",
         "img_set": {"id": 2, "members": members, "reference_rank": 1}},
    ])
    return root


_COCO_IDS = [11, 22, 33, 44, 55, 66, 77]


def _circo(root: str) -> str:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 8, "height": 6} for i in _COCO_IDS]
    for entry in images:
        path = os.path.join(root, "COCO2017_unlabeled", "unlabeled2017", entry["file_name"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (8, 6), (10, 120, 10)).save(path, format="JPEG")
    _write_json(os.path.join(root, "COCO2017_unlabeled", "annotations", "image_info_unlabeled2017.json"),
                {"info": {}, "images": images})
    _write_json(os.path.join(root, "annotations", "val.json"), [
        {"reference_img_id": 11, "target_img_id": 33, "relative_caption": "shows two of them",
         "shared_concept": "a dog", "gt_img_ids": [33, 44, 55], "id": 0, "semantic_aspects": ["cardinality"]},
        {"reference_img_id": 22, "target_img_id": 66, "relative_caption": "is in greyscale",
         "shared_concept": "a boat", "gt_img_ids": [66], "id": 1, "semantic_aspects": []},
    ])
    _write_json(os.path.join(root, "annotations", "test.json"), [
        {"reference_img_id": 77, "relative_caption": "is at night", "shared_concept": "a bridge", "id": 5},
    ])
    return root


def _shoes(root: str) -> str:
    train = ["img_womens_clogs_1.jpg", "img_womens_clogs_2.jpg", "img_womens_boots_3.jpg"]
    val = ["img_womens_boots_4.jpg", "img_womens_pumps_5.jpg"]
    for name in train + val:
        category = name.rsplit("_", 1)[0][len("img_"):]
        _write_image(os.path.join(root, category, "0", name))
    with open(os.path.join(root, "train_im_names.txt"), "w") as f:
        f.write("\n".join(train) + "\n")
    with open(os.path.join(root, "eval_im_names.txt"), "w") as f:
        f.write("\n".join(val) + "\n")
    _write_json(os.path.join(root, "relative_captions_shoes.json"), [
        {"ImageName": train[1], "ReferenceImageName": train[0], "RelativeCaption": "is more textured"},
        {"ImageName": val[1], "ReferenceImageName": val[0], "RelativeCaption": "has a higher heel"},
        {"ImageName": train[2], "ReferenceImageName": train[1], "RelativeCaption": "is taller"},
        {"ImageName": val[0], "ReferenceImageName": train[0], "RelativeCaption": "straddles the splits"},
    ])
    return root


def _edit_json(path: str, edit: Callable[[object], object]) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    _write_json(path, edit(data))


def _raises(match_parts: list[str], fn: Callable[[], object], error: type[Exception] = cir.CIRDataError) -> str:
    with pytest.raises(error) as info:
        fn()
    message = str(info.value)
    for part in match_parts:
        assert part in message, f"{part!r} not in error message: {message}"
    return message


# ----------------------------------------------------------------------------------------------------------------------
# FashionIQ
# ----------------------------------------------------------------------------------------------------------------------


def test_fashioniq_reads_triplets_gallery_and_paths(tmp_path):
    root = _fashioniq(str(tmp_path))
    split = cir.read_fashioniq(root, "dress", "val")
    assert split.name == "fashioniq/dress/val"
    assert split.gallery_ids == ("B001", "B002", "B003", "B004")
    first, second = split.triplets
    assert (first.reference_id, first.target_id, first.category) == ("B001", "B002", "dress")
    assert first.modification_texts == ("is red.", "has long sleeves")
    assert (second.reference_id, second.target_ids) == ("B003", ("B001",))
    assert len({t.pair_id for t in split.triplets}) == 2
    assert split.has_targets and all(os.path.isfile(split.image_paths[i]) for i in split.gallery_ids)
    assert cir.join_modification_texts(first.modification_texts) == "Is red and has long sleeves"


def test_fashioniq_test_split_has_no_targets(tmp_path):
    split = cir.read_fashioniq(_fashioniq(str(tmp_path)), "dress", "test")
    assert [t.target_ids for t in split.triplets] == [()]
    assert not split.has_targets
    with pytest.raises(ValueError, match="has no target"):
        cir.triplet_dataset(split, lambda i: np.zeros((2, 2, 3), np.float32), with_targets=True)
    element = cir.triplet_dataset(split, lambda i: np.zeros((2, 2, 3), np.float32))[0]
    assert "target_image" not in element and element["reference_id"] == "B001"


def _drop_key(key: str, row: int) -> Callable[[list], list]:
    def edit(rows: list) -> list:
        del rows[row][key]
        return rows
    return edit


def test_fashioniq_missing_key_names_file_row_and_key(tmp_path):
    root = _fashioniq(str(tmp_path))
    _edit_json(os.path.join(root, "captions", "cap.dress.val.json"), _drop_key("target", 1))
    _raises(["cap.dress.val.json", "row 1", "'target'"], lambda: cir.read_fashioniq(root, "dress", "val"))


def test_fashioniq_caption_id_not_in_split_names_file_row_and_id(tmp_path):
    root = _fashioniq(str(tmp_path))

    def edit(rows: list) -> list:
        rows[1]["candidate"] = "B999"
        return rows

    _edit_json(os.path.join(root, "captions", "cap.dress.val.json"), edit)
    _raises(["cap.dress.val.json", "row 1", "candidate", "'B999'", "split.dress.val.json"],
            lambda: cir.read_fashioniq(root, "dress", "val"))
    assert len(cir.read_fashioniq(root, "dress", "val", skip_missing=True).triplets) == 1


def test_fashioniq_missing_image_of_caption_entry_names_row_id_and_path(tmp_path):
    root = _fashioniq(str(tmp_path))
    os.remove(os.path.join(root, "images", "B002.png"))
    message = _raises(["cap.dress.val.json", "row 0", "'B002'", "B002.png"],
                      lambda: cir.read_fashioniq(root, "dress", "val"), cir.CIRFileNotFoundError)
    assert "skip_missing" in message
    skipped = cir.read_fashioniq(root, "dress", "val", skip_missing=True)
    assert [t.pair_id for t in skipped.triplets] == ["dress-val-00001"]
    assert "B002" not in skipped.gallery_ids
    unchecked = cir.read_fashioniq(root, "dress", "val", check_images=False)
    assert len(unchecked.triplets) == 2 and "B002" in unchecked.gallery_ids


def test_fashioniq_split_naming_unknown_image_names_split_file_and_id(tmp_path):
    root = _fashioniq(str(tmp_path))
    _edit_json(os.path.join(root, "image_splits", "split.dress.val.json"), lambda ids: [*ids, "B777"])
    _raises(["split.dress.val.json", "'B777'", os.path.join("images", "B777.png")],
            lambda: cir.read_fashioniq(root, "dress", "val"), cir.CIRFileNotFoundError)
    _edit_json(os.path.join(root, "image_splits", "split.dress.val.json"), lambda ids: [*ids, "B001"])
    _raises(["split.dress.val.json", "'B001'", "repeats"], lambda: cir.read_fashioniq(root, "dress", "val"))


def test_fashioniq_reader_detects_other_datasets_files(tmp_path):
    root = _fashioniq(str(tmp_path))
    cirr_root = _cirr(str(tmp_path / "cirr_root"))
    with open(os.path.join(cirr_root, "cirr", "captions", "cap.rc2.val.json")) as f:
        cirr_rows = json.load(f)
    _write_json(os.path.join(root, "captions", "cap.dress.val.json"), cirr_rows)
    _raises(["cap.dress.val.json", "row 0", "CIRR"], lambda: cir.read_fashioniq(root, "dress", "val"))
    _write_json(os.path.join(root, "captions", "cap.dress.val.json"), ["B001", "B002"])
    _raises(["cap.dress.val.json", "expected a JSON list of FashionIQ annotation objects"],
            lambda: cir.read_fashioniq(root, "dress", "val"))


def test_fashioniq_missing_files_name_the_expected_path(tmp_path):
    root = _fashioniq(str(tmp_path))
    os.remove(os.path.join(root, "image_splits", "split.dress.val.json"))
    _raises([os.path.join(root, "image_splits", "split.dress.val.json")],
            lambda: cir.read_fashioniq(root, "dress", "val"), cir.CIRFileNotFoundError)
    _raises([os.path.join(root, "captions", "cap.shirt.val.json")],
            lambda: cir.read_fashioniq(root, "shirt", "val"), FileNotFoundError)
    _raises(["nowhere"], lambda: cir.read_fashioniq(str(tmp_path / "nowhere"), "dress", "val"), FileNotFoundError)
    with pytest.raises(ValueError, match="FashionIQ category"):
        cir.read_fashioniq(root, "shoes", "val")


# ----------------------------------------------------------------------------------------------------------------------
# CIRR
# ----------------------------------------------------------------------------------------------------------------------


def test_cirr_reads_triplets_subsets_and_gallery(tmp_path):
    root = _cirr(str(tmp_path))
    split = cir.read_cirr(root, "val")
    assert split.gallery_ids == tuple(_CIRR_IMAGES)
    first = split.triplets[0]
    assert (first.pair_id, first.reference_id, first.target_id) == ("10", _CIRR_IMAGES[0], _CIRR_IMAGES[3])
    assert first.modification_texts == ("make it two dogs",)
    assert first.subset_ids == tuple(_CIRR_IMAGES[:6])  # official format: 6 members incl. reference and target
    assert len(first.subset_candidates) == 5 and first.reference_id not in first.subset_candidates
    assert first.target_id in first.subset_candidates
    assert split.image_paths[_CIRR_IMAGES[0]] == os.path.join(root, "dev", f"{_CIRR_IMAGES[0]}.png")

    test1 = cir.read_cirr(root, "test1")
    assert [(t.pair_id, t.target_ids) for t in test1.triplets] == [("20", ())]
    assert len(test1.triplets[0].subset_ids) == 6


def test_cirr_flat_annotation_layout(tmp_path):
    root = _cirr(str(tmp_path))
    os.rename(os.path.join(root, "cirr", "captions"), os.path.join(root, "captions"))
    os.rename(os.path.join(root, "cirr", "image_splits"), os.path.join(root, "image_splits"))
    assert len(cir.read_cirr(root, "val").triplets) == 2


def test_cirr_bad_rows_name_file_row_and_id(tmp_path):
    root = _cirr(str(tmp_path))
    captions = os.path.join(root, "cirr", "captions", "cap.rc2.val.json")

    def unknown_member(rows: list) -> list:
        rows[1]["img_set"]["members"][1] = "dev-9-9-img9"  # neither the reference nor the target
        return rows

    _edit_json(captions, unknown_member)
    _raises(["cap.rc2.val.json", "row 1", "img_set.members", "'dev-9-9-img9'", "split.rc2.val.json"],
            lambda: cir.read_cirr(root, "val"))

    root2 = _cirr(str(tmp_path / "b"))
    captions2 = os.path.join(root2, "cirr", "captions", "cap.rc2.val.json")
    _edit_json(captions2, _drop_key("target_hard", 0))
    _raises(["cap.rc2.val.json", "row 0", "'target_hard'"], lambda: cir.read_cirr(root2, "val"))

    def target_outside_group(rows: list) -> list:
        rows[0]["target_hard"] = _CIRR_IMAGES[7]
        return rows

    root3 = _cirr(str(tmp_path / "c"))
    _edit_json(os.path.join(root3, "cirr", "captions", "cap.rc2.val.json"), target_outside_group)
    _raises(["cap.rc2.val.json", "row 0", "does not contain the target_hard", _CIRR_IMAGES[7]],
            lambda: cir.read_cirr(root3, "val"))

    def duplicate_pairid(rows: list) -> list:
        rows[1]["pairid"] = rows[0]["pairid"]
        return rows

    root4 = _cirr(str(tmp_path / "d"))
    _edit_json(os.path.join(root4, "cirr", "captions", "cap.rc2.val.json"), duplicate_pairid)
    _raises(["cap.rc2.val.json", "row 1", "pairid 10"], lambda: cir.read_cirr(root4, "val"))


def test_cirr_missing_image_and_wrong_files(tmp_path):
    root = _cirr(str(tmp_path))
    os.remove(os.path.join(root, "dev", f"{_CIRR_IMAGES[7]}.png"))  # a gallery-only image
    _raises(["split.rc2.val.json", f"'{_CIRR_IMAGES[7]}'", f"{_CIRR_IMAGES[7]}.png"],
            lambda: cir.read_cirr(root, "val"), cir.CIRFileNotFoundError)
    assert len(cir.read_cirr(root, "val", skip_missing=True).gallery_ids) == 7

    fiq = _fashioniq(str(tmp_path / "fiq"))
    with open(os.path.join(fiq, "captions", "cap.dress.val.json")) as f:
        fiq_rows = json.load(f)
    _write_json(os.path.join(root, "cirr", "captions", "cap.rc2.val.json"), fiq_rows)
    _raises(["cap.rc2.val.json", "row 0", "FashionIQ"], lambda: cir.read_cirr(root, "val"))
    _write_json(os.path.join(root, "cirr", "image_splits", "split.rc2.test1.json"), _CIRR_IMAGES)
    _raises(["split.rc2.test1.json", "image name -> relative path"], lambda: cir.read_cirr(root, "test1"))
    _raises([os.path.join("captions", "cap.rc2.train.json")], lambda: cir.read_cirr(root, "train"),
            cir.CIRFileNotFoundError)


# ----------------------------------------------------------------------------------------------------------------------
# CIRCO
# ----------------------------------------------------------------------------------------------------------------------


def test_circo_reads_multiple_ground_truths(tmp_path):
    root = _circo(str(tmp_path))
    split = cir.read_circo(root, "val")
    assert split.gallery_ids == tuple(str(i) for i in _COCO_IDS)
    first, second = split.triplets
    assert (first.pair_id, first.reference_id) == ("0", "11")
    assert first.target_ids == ("33", "44", "55") and first.target_id == "33"
    assert second.target_ids == ("66",)
    assert (first.shared_concept, first.semantic_aspects) == ("a dog", ("cardinality",))
    assert split.image_paths["33"].endswith(os.path.join("unlabeled2017", "000000000033.jpg"))
    test = cir.read_circo(root, "test")
    assert [(t.pair_id, t.reference_id, t.target_ids) for t in test.triplets] == [("5", "77", ())]


def test_circo_bad_inputs(tmp_path):
    root = _circo(str(tmp_path))
    val = os.path.join(root, "annotations", "val.json")

    def unknown_gt(rows: list) -> list:
        rows[1]["gt_img_ids"] = [66, 999]
        return rows

    _edit_json(val, unknown_gt)
    _raises(["val.json", "row 1", "gt_img_ids", "'999'", "image_info_unlabeled2017.json"],
            lambda: cir.read_circo(root, "val"))

    def target_not_gt(rows: list) -> list:
        rows[1]["gt_img_ids"] = [55]
        return rows

    _edit_json(val, target_not_gt)
    _raises(["val.json", "row 1", "target_img_id 66"], lambda: cir.read_circo(root, "val"))
    _edit_json(val, _drop_key("shared_concept", 0))
    _raises(["val.json", "row 0", "'shared_concept'"], lambda: cir.read_circo(root, "val"))

    root2 = _circo(str(tmp_path / "b"))
    os.remove(os.path.join(root2, "COCO2017_unlabeled", "unlabeled2017", "000000000044.jpg"))
    _raises(["val.json", "row 0", "'44'", "000000000044.jpg"], lambda: cir.read_circo(root2, "val"),
            cir.CIRFileNotFoundError)
    skipped = cir.read_circo(root2, "val", skip_missing=True)
    assert [t.pair_id for t in skipped.triplets] == ["1"] and "44" not in skipped.gallery_ids
    os.remove(os.path.join(root2, "COCO2017_unlabeled", "annotations", "image_info_unlabeled2017.json"))
    _raises(["image_info_unlabeled2017.json"], lambda: cir.read_circo(root2, "val"), cir.CIRFileNotFoundError)


# ----------------------------------------------------------------------------------------------------------------------
# Shoes
# ----------------------------------------------------------------------------------------------------------------------


def test_shoes_reads_split_by_image_lists(tmp_path):
    root = _shoes(str(tmp_path))
    train = cir.read_shoes(root, "train")
    assert [(t.reference_id, t.target_id) for t in train.triplets] == [
        ("img_womens_clogs_1.jpg", "img_womens_clogs_2.jpg"), ("img_womens_clogs_2.jpg", "img_womens_boots_3.jpg"),
    ]
    assert [t.category for t in train.triplets] == ["womens_clogs", "womens_boots"]
    assert [t.pair_id for t in train.triplets] == ["shoes-00000", "shoes-00002"]
    assert train.gallery_ids == ("img_womens_clogs_1.jpg", "img_womens_clogs_2.jpg", "img_womens_boots_3.jpg")
    assert os.path.isfile(train.image_paths["img_womens_boots_3.jpg"])
    val = cir.read_shoes(root, "val")
    assert [(t.reference_id, t.modification_texts) for t in val.triplets] == [
        ("img_womens_boots_4.jpg", ("has a higher heel",)),
    ]  # the straddling row 3 belongs to neither split


def test_shoes_bad_inputs(tmp_path):
    root = _shoes(str(tmp_path))
    captions = os.path.join(root, "relative_captions_shoes.json")

    def unknown(rows: list) -> list:
        rows[2]["ReferenceImageName"] = "img_womens_clogs_99.jpg"
        return rows

    _edit_json(captions, unknown)
    _raises(["relative_captions_shoes.json", "row 2", "ReferenceImageName", "'img_womens_clogs_99.jpg'"],
            lambda: cir.read_shoes(root, "train"))

    root2 = _shoes(str(tmp_path / "b"))
    os.remove(os.path.join(root2, "womens_clogs", "0", "img_womens_clogs_2.jpg"))
    _raises(["relative_captions_shoes.json", "row 0", "'img_womens_clogs_2.jpg'"],
            lambda: cir.read_shoes(root2, "train"), cir.CIRFileNotFoundError)
    assert cir.read_shoes(root2, "train", skip_missing=True).triplets == ()

    root3 = _shoes(str(tmp_path / "c"))
    _write_json(os.path.join(root3, "relative_captions_shoes.json"),
                [{"candidate": "a", "target": "b", "captions": ["x", "y"]}])
    _raises(["relative_captions_shoes.json", "row 0", "FashionIQ"], lambda: cir.read_shoes(root3, "val"))
    os.remove(os.path.join(root, "eval_im_names.txt"))
    _raises(["eval_im_names.txt"], lambda: cir.read_shoes(root, "train"), cir.CIRFileNotFoundError)


# ----------------------------------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------------------------------


def test_load_image_shape_range_and_target_pad(tmp_path):
    path = str(tmp_path / "wide.png")
    _write_image(path, (255, 0, 0), size=(40, 10))
    image = cir.load_image(path, 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image[0].max() < 0.1 and image[8, 8, 0] > 0.9  # black padding above the red band
    plain = cir.load_image(path, 16, target_ratio=None)
    assert plain[0, 8, 0] > 0.9  # no padding: the crop is all red


def test_load_image_corrupt_or_missing_file_names_it(tmp_path):
    corrupt = str(tmp_path / "corrupt.png")
    with open(corrupt, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    _raises(["corrupt.png", "'B123'"], lambda: cir.load_image(corrupt, 8, image_id="B123"))
    truncated = str(tmp_path / "truncated.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 2)
    _raises(["truncated.png", "'B9'"], lambda: cir.load_image(truncated, 8, image_id="B9"))
    _raises(["absent.png", "'B7'"], lambda: cir.load_image(str(tmp_path / "absent.png"), 8, image_id="B7"),
            FileNotFoundError)


def test_make_image_fn_reads_real_split(tmp_path):
    split = cir.read_fashioniq(_fashioniq(str(tmp_path)), "dress", "val")
    image = cir.make_image_fn(split, 4)("B002")
    assert image.shape == (4, 4, 3)
    np.testing.assert_allclose(image[2, 2], np.array([40, 50, 60]) / 255.0, atol=1e-6)
    with pytest.raises(cir.CIRDataError, match="unknown image id 'nope'"):
        cir.make_image_fn(split, 4)("nope")


# ----------------------------------------------------------------------------------------------------------------------
# Embedded CSS scenes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def css() -> dict[str, cir.CIRSplit]:
    return cir.embedded_css(seed=0)


def test_css_sizes(css):
    assert len(css["train"].triplets) >= 10_000
    assert len(css["val"].triplets) == len(css["test"].triplets) == 1_000
    for split in css.values():
        assert set(split.scenes) == set(split.gallery_ids)
        assert len(set(split.gallery_ids)) == len(split.gallery_ids)
        assert all(i.startswith(f"css-{split.name.split('/')[1]}-") for i in split.gallery_ids[:10])
        assert re.fullmatch(r"css-(train|val|test)-\d{6}", split.gallery_ids[0])
        assert all(i in split.scenes for t in split.triplets for i in t.image_ids)


def test_css_splits_disjoint_by_id_and_content(css):
    splits = list(css.values())
    for a in range(len(splits)):
        assert len(set(splits[a].scenes.values())) == len(splits[a].scenes)  # one id per scene graph
        for b in range(a + 1, len(splits)):
            assert not set(splits[a].scenes) & set(splits[b].scenes)
            assert not set(splits[a].scenes.values()) & set(splits[b].scenes.values())
    for name, split in css.items():
        assert all(cir.scene_split(s) == name for s in split.scenes.values())


def test_css_modification_text_matches_scene_diff(css):
    for split in css.values():
        for t in split.triplets:
            reference, target = split.scenes[t.reference_id], split.scenes[t.target_id]
            assert reference != target
            edit = cir.scene_diff(reference, target)
            assert edit.kind == t.category
            text = t.modification_texts[0]
            before, after = edit.before, edit.after
            if before is not None:
                assert f"{before.colour} {before.shape}" in text, (text, edit)
            if edit.kind == "add":
                assert text.endswith(f"a {after.size} {after.colour} {after.shape} {cir._CELL_AT[after.cell]}")
                assert after.cell not in {o.cell for o in reference.objects}
            elif edit.kind == "remove":
                assert len(target.objects) == len(reference.objects) - 1
            elif edit.kind == "recolour":
                assert text.endswith(after.colour) and after.colour != before.colour
            elif edit.kind == "resize":
                words = {"large": ("large", "bigger", "enlarge", "increase"), "small": ("small", "shrink", "reduce")}
                assert any(w in text for w in words[after.size]) and after.size != before.size
            elif edit.kind == "reshape":
                assert text.endswith(after.shape) and after.shape != before.shape
            elif edit.kind == "move":
                assert text.endswith(f"to the {cir.CELL_NAMES[after.cell]}")
            assert 1 <= len(target.objects) <= cir.MAX_OBJECTS


def test_css_subsets_are_cirr_like(css):
    assert css["train"].triplets[0].subset_ids == ()
    for name in ("val", "test"):
        split = css[name]
        gallery = set(split.gallery_ids)
        positions = set()
        for t in split.triplets:
            assert len(t.subset_ids) == 6 and len(set(t.subset_ids)) == 6
            assert t.reference_id in t.subset_ids and t.target_id in t.subset_ids
            assert len(t.subset_candidates) == 5 and set(t.subset_ids) <= gallery
            positions.add(t.subset_ids.index(t.target_id))
            reference = split.scenes[t.reference_id]
            for member in t.subset_candidates:
                cir.scene_diff(reference, split.scenes[member])  # target and distractors: one edit from the reference
        assert len(positions) == 6  # the target's position in the group varies


def test_css_determinism_and_seed_dependence(css):
    again = cir.embedded_css(seed=0)
    for name in css:
        assert again[name].triplets == css[name].triplets
        assert dict(again[name].scenes) == dict(css[name].scenes)
    ids = css["val"].gallery_ids[:20]
    fn_a, fn_b = cir.make_image_fn(css["val"]), cir.make_image_fn(again["val"])
    for i in ids:
        assert fn_a(i).tobytes() == fn_b(i).tobytes()
        assert again["val"].image_captions[i] == css["val"].image_captions[i]
    scene = css["val"].scenes[ids[0]]
    assert cir.render(scene).tobytes() == cir.render(scene).tobytes()

    small = cir.embedded_css(seed=0, num_train=200, num_val=20, num_test=20)
    assert small["train"].triplets == css["train"].triplets[:200]  # each split is one stream: prefixes agree
    other = cir.embedded_css(seed=1, num_train=200, num_val=20, num_test=20)
    for name in ("train", "val", "test"):
        assert other[name].triplets != small[name].triplets
    shared = [i for i in other["val"].gallery_ids if i in small["val"].scenes][:20]
    fn_other, fn_small = cir.make_image_fn(other["val"]), cir.make_image_fn(small["val"])
    assert any(fn_other(i).tobytes() != fn_small(i).tobytes() for i in shared)


def test_css_render_matches_scene_graph(css):
    split = css["test"]
    for image_id in split.gallery_ids[:50]:
        scene = split.scenes[image_id]
        pixels = cir.render(scene, 64)
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        for o in scene.objects:
            row, col = divmod(o.cell, 3)
            centre = pixels[int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)].astype(int)
            assert np.abs(centre - np.array(cir.COLOURS[o.colour])).max() <= 2, (image_id, o)
        occupied = {o.cell for o in scene.objects}
        for cell in set(range(9)) - occupied:
            row, col = divmod(cell, 3)
            assert tuple(pixels[int((row + 0.5) * 64 / 3), int((col + 0.5) * 64 / 3)]) == cir.BACKGROUND
    for t in split.triplets[:20]:
        assert not np.array_equal(cir.render(split.scenes[t.reference_id]), cir.render(split.scenes[t.target_id]))


def test_css_captions(css):
    split = css["val"]
    for image_id in split.gallery_ids[:200]:
        scene = split.scenes[image_id]
        captions = split.image_captions[image_id]
        assert tuple(captions) == cir.CAPTION_LEVELS
        for o in scene.objects:
            assert f"{o.colour} {o.shape}" in captions["L1_global"]
            assert f"a {o.size} {o.colour} {o.shape} {cir._CELL_AT[o.cell]}" in captions["L2_attributes"]
            assert f"{o.colour} {o.shape}" in captions["Final_Caption"]
        n = len(scene.objects)
        assert captions["L3_discriminative"].startswith(("a single", "two", "three", "four", "five"))
        assert captions["L3_discriminative"].count(" is ") == n - 1
        assert len(captions["Final_Caption"].split()) <= 60
    one = cir.make_scene([cir.SceneObject(0, "circle", "orange", "small")])
    assert cir.scene_captions(one)["L1_global"] == "one object: an orange circle"


def test_css_image_cache_is_byte_identical(css, tmp_path):
    split = css["val"]
    cached = cir.make_image_fn(split, cache_dir=str(tmp_path))
    fresh = cir.make_image_fn(split)
    for i in split.gallery_ids[:5]:
        first, second = cached(i), cached(i)  # the second read comes from the PNG
        assert first.tobytes() == fresh(i).tobytes() == second.tobytes()
    assert len(os.listdir(tmp_path)) == 5
    assert cir.make_image_fn(split, 32)(split.gallery_ids[0]).shape == (32, 32, 3)


def test_scene_diff_rejects_two_edits():
    a = cir.make_scene([cir.SceneObject(0, "circle", "red", "small"), cir.SceneObject(4, "square", "blue", "large")])
    b = cir.make_scene([cir.SceneObject(0, "circle", "green", "large"), cir.SceneObject(4, "square", "blue", "large")])
    with pytest.raises(ValueError, match="exactly one edit"):
        cir.scene_diff(a, b)
    with pytest.raises(ValueError, match="distinct cells"):
        cir.Scene((cir.SceneObject(4, "circle", "red", "small"), cir.SceneObject(4, "square", "red", "small")))
    text = cir.modification_text(a, cir.Modification("recolour", a.objects[1], cir.SceneObject(4, "square", "green",
                                                                                                  "large")))
    assert text == "make the blue square green"


# ----------------------------------------------------------------------------------------------------------------------
# grain glue
# ----------------------------------------------------------------------------------------------------------------------


def test_triplet_dataset_batches_with_padding(css):
    small = cir.embedded_css(seed=3, num_train=10, num_val=10, num_test=10)["val"]
    image_fn = cir.make_image_fn(small)

    def caption_fn(i: str) -> str:
        return small.image_captions[i]["Final_Caption"]

    batches = list(cir.triplet_dataset(small, image_fn, caption_fn=caption_fn, batch_size=4))
    assert len(batches) == 3
    batch = batches[0]
    assert batch["reference_image"].shape == (4, 64, 64, 3) and batch["reference_image"].dtype == np.float32
    assert batch["target_image"].shape == (4, 64, 64, 3)
    assert batch["modification_text"].shape == (4,) and batch["modification_text"].dtype.kind == "U"
    assert list(batch["modification_text"]) == [t.modification_texts[0] for t in small.triplets[:4]]
    assert batch["target_caption"][0] == caption_fn(small.triplets[0].target_id)
    assert batches[-1]["valid"].tolist() == [True, True, False, False]
    assert sum(int(b["valid"].sum()) for b in batches) == 10
    dropped = list(cir.triplet_dataset(small, image_fn, batch_size=4, drop_remainder=True))
    assert len(dropped) == 2 and all(b["valid"].all() for b in dropped)


def test_triplet_dataset_shuffle_text_variants_and_checkpoint(tmp_path):
    split = cir.read_fashioniq(_fashioniq(str(tmp_path)), "dress", "val")
    ds = cir.triplet_dataset(split, cir.make_image_fn(split, 8), shuffle_seed=7, text_seed=11, num_epochs=None,
                             batch_size=2)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it.set_state(state)
    resumed = [next(it) for _ in range(3)]
    for a, b in zip(expected, resumed, strict=True):
        assert a["pair_id"].tolist() == b["pair_id"].tolist()
        assert a["modification_text"].tolist() == b["modification_text"].tolist()
    texts = {str(t) for _ in range(10) for t in next(it)["modification_text"]}
    allowed = {cir.join_modification_texts(t.modification_texts, v) for t in split.triplets for v in range(4)}
    assert texts <= allowed and len(texts) > 2


def test_gallery_dataset_covers_gallery_once(css):
    split = cir.embedded_css(seed=2, num_train=10, num_val=5, num_test=5)["test"]
    batches = list(cir.gallery_dataset(split, cir.make_image_fn(split, 16), batch_size=8))
    ids = [i for b in batches for i, v in zip(b["image_id"].tolist(), b["valid"].tolist(), strict=True) if v]
    assert ids == list(split.gallery_ids)
    assert all(b["image"].shape == (8, 16, 16, 3) for b in batches)


def test_concat_splits(tmp_path):
    parts = cir.embedded_css(seed=4, num_train=10, num_val=5, num_test=5)
    joined = cir.concat_splits([parts["val"], parts["test"]], "css/eval")
    assert len(joined.triplets) == 10
    assert len(joined.gallery_ids) == len(parts["val"].gallery_ids) + len(parts["test"].gallery_ids)
    with pytest.raises(ValueError, match="more than one split"):
        cir.concat_splits([parts["val"], parts["val"]], "twice")
