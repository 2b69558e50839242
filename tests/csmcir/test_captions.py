"""MCoT captions: prompts, response parsing, caption files, lookup, captioners, resumable captioning, the binary."""

import json
import os

import numpy as np
import pytest

from experiments import csmcir_captions
from experiments.configs import csmcir_captions as configs
from jax_hd.core import config as config_lib
from jax_hd.csmcir import captions
from jax_hd.data import cir

FULL = {
    "L1_global": "a red dress",
    "L2_attributes": "red silk, knee length, short sleeves",
    "L3_discriminative": "a black bow at the waist",
    "Final_Caption": "A knee-length red silk dress with a black bow at the waist.",
}


@pytest.fixture(scope="module")
def css_val() -> cir.CIRSplit:
    return cir.embedded_css(0, num_train=1, num_val=12, num_test=1)["val"]


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and parsing
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("domain", captions.DOMAINS)
def test_prompt_names_every_level_and_asks_for_json(domain):
    prompt = captions.build_prompt(domain, "dress")
    for level in captions.LEVELS:
        assert level in prompt
    assert "JSON" in prompt and "(category: dress)" in prompt
    assert "category:" not in captions.build_prompt(domain)
    assert "{" in prompt and "{category_hint}" not in prompt


def test_prompt_variants_differ_and_unknown_domain_is_an_error():
    assert "garment" in captions.build_prompt("fashion") and "setting" in captions.build_prompt("scene")
    with pytest.raises(ValueError, match="unknown caption domain 'food'"):
        captions.build_prompt("food")


def test_parse_bare_json():
    assert captions.parse_mcot_response(json.dumps(FULL)) == FULL


def test_parse_fenced_json_with_prose_and_loose_keys():
    text = (
        "Here is my analysis.\n```json\n"
        '{"l1": "a shirt", "L2 attributes": ["blue", "striped"], "L3_discriminative": "  pocket  ", '
        '"Final Caption": "A blue striped shirt with a pocket."}\n```\nHope this helps {not json}'
    )
    assert captions.parse_mcot_response(text) == {
        "L1_global": "a shirt",
        "L2_attributes": "blue; striped",
        "L3_discriminative": "pocket",
        "Final_Caption": "A blue striped shirt with a pocket.",
    }


def test_parse_json_after_a_non_caption_object():
    text = 'Note {"confidence": 0.9} then {"L1_global": "a cat", "Final_Caption": "A cat on a sofa."}'
    assert captions.parse_mcot_response(text) == {"L1_global": "a cat", "Final_Caption": "A cat on a sofa."}


def test_parse_line_form_with_markdown_and_continuations():
    text = (
        "Sure.\n**L1_global**: a dress\n- L2_attributes: red,\n  knee length\n"
        "L3_discriminative: bow at the waist\nFinal_Caption: A red knee-length dress with a bow."
    )
    assert captions.parse_mcot_response(text) == {
        "L1_global": "a dress",
        "L2_attributes": "red, knee length",
        "L3_discriminative": "bow at the waist",
        "Final_Caption": "A red knee-length dress with a bow.",
    }


def test_missing_final_caption_is_the_join_of_the_levels():
    parsed = captions.parse_mcot_response('{"L1_global": "a dress.", "L3_discriminative": "a bow"}')
    assert parsed == {"L1_global": "a dress.", "L3_discriminative": "a bow", "Final_Caption": "a dress. a bow."}


@pytest.mark.parametrize(
    "text",
    [
        "I cannot see any image here, sorry.",
        "",
        '{"L1_global": "...", "Final_Caption": "..."}',  # the answer template echoed back
        '{"caption": "a dress"}',
    ],
)
def test_unusable_response_raises_quoting_its_start(text):
    with pytest.raises(ValueError, match="no MCoT caption levels") as e:
        captions.parse_mcot_response(text)
    assert repr(" ".join(text.split())[:20])[:-1] in str(e.value)


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------


def test_caption_path_layout():
    assert captions.caption_path("/c", "fashioniq", "val", "dress") == "/c/fashioniq/val/dress_mcot.json"
    assert captions.caption_path("/c", "cirr", "test1") == "/c/cirr/test1/all_mcot.json"


def test_round_trip_object_form_sorted_utf8_atomic(tmp_path):
    path = str(tmp_path / "new" / "dir" / "all_mcot.json")
    data = {"b": dict(FULL), "a": {"Final_Caption": "Une robe rouge à pois, très élégante.", "extra": "kept"}}
    captions.write_captions(path, data)
    assert captions.read_captions(path) == data
    raw = open(path, encoding="utf-8").read()
    assert "à pois" in raw and raw.index('"a"') < raw.index('"b"')
    assert raw.index('"Final_Caption"') < raw.index('"L1_global"')  # level keys sorted too
    assert os.listdir(os.path.dirname(path)) == ["all_mcot.json"]  # no temporary file left behind


def test_plain_string_form_reads_as_final_caption(tmp_path):
    path = tmp_path / "dress_cot_val.json"
    path.write_text(json.dumps({"B00A": "a red dress", "B00B": {"Final_Caption": "a blue shirt"}}))
    assert captions.read_captions(str(path)) == {
        "B00A": {"Final_Caption": "a red dress"},
        "B00B": {"Final_Caption": "a blue shirt"},
    }


@pytest.mark.parametrize(
    "content, match",
    [
        ({"img1": {"Final_Caption": 3}}, r"image 'img1', level 'Final_Caption': caption must be a string, got int"),
        ({"img1": "ok", "img2": "  "}, r"image 'img2' has an empty caption"),
        ({"img3": {"L1_global": ""}}, r"image 'img3', level 'L1_global': empty caption text"),
        ({"img4": ["a", "b"]}, r"image 'img4': unknown caption shape list"),
        ({"img5": {}}, r"image 'img5' has an empty caption object"),
        (["img1", "a dress"], r"expected a JSON object \{image_id: caption\}, got list"),
    ],
)
def test_bad_entries_name_the_file_and_image(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match) as e:
        captions.read_captions(str(path))
    assert str(path) in str(e.value)


def test_invalid_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"a": "x",')
    with pytest.raises(ValueError, match="invalid JSON") as e:
        captions.read_captions(str(path))
    assert str(path) in str(e.value)
    missing = str(tmp_path / "nope" / "all_mcot.json")
    with pytest.raises(FileNotFoundError, match="caption file not found: " + missing):
        captions.read_captions(missing)


def test_write_rejects_what_read_would_reject(tmp_path):
    path = str(tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"image 'img9', level 'L2_attributes': caption must be a string, got None"):
        captions.write_captions(path, {"img9": {"L2_attributes": None}})
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------------------------------------------------
# Lookup
# ----------------------------------------------------------------------------------------------------------------------


def test_select_levels_and_joins():
    assert captions.select_caption(FULL, "L2_attributes") == FULL["L2_attributes"]
    assert captions.select_caption(FULL, "L1+L2+L3") == (
        "a red dress. red silk, knee length, short sleeves. a black bow at the waist."
    )
    assert captions.select_caption(FULL, "L1_global+Final") == "a red dress. " + FULL["Final_Caption"]


def test_select_errors_list_the_available_levels():
    expected = r"has no 'L1_global', 'L3_discriminative'.*available levels: \['Final_Caption'\]"
    with pytest.raises(ValueError, match=expected):
        captions.select_caption({"Final_Caption": "x"}, "L1_global+L3")
    with pytest.raises(ValueError, match="unknown caption field 'L4'"):
        captions.select_caption(FULL, "L4")


def test_lookup_checks_coverage_up_front():
    data = {f"img{i}": {"Final_Caption": f"caption {i}"} for i in range(3)}
    gallery = [f"img{i}" for i in range(10)]
    with pytest.raises(ValueError, match=r"7 of 10 images have no caption.*first missing: \['img3', 'img4', 'img5', "):
        captions.caption_lookup(data, "Final_Caption", image_ids=gallery)
    with pytest.raises(ValueError, match=r"image 'img0': caption has no 'L1_global'"):
        captions.caption_lookup(data, "L1_global", image_ids=gallery[:3])
    lookup = captions.caption_lookup(data, "Final_Caption", image_ids=gallery, missing="empty")
    assert [lookup(i) for i in gallery[2:5]] == ["caption 2", "", ""]
    strict = captions.caption_lookup(data, "Final_Caption", image_ids=gallery[:3])
    assert strict("img1") == "caption 1"
    with pytest.raises(ValueError, match="no caption for image 'img7'"):
        strict("img7")
    with pytest.raises(ValueError, match="missing must be one of"):
        captions.caption_lookup(data, "Final_Caption", missing="skip")


def test_lookup_reads_the_embedded_split_captions(css_val):
    lookup = captions.caption_lookup(css_val.image_captions, "L1+L2", image_ids=css_val.gallery_ids)
    first = css_val.gallery_ids[0]
    levels = cir.scene_captions(css_val.scenes[first])
    assert lookup(first) == captions.join_levels([levels["L1_global"], levels["L2_attributes"]])


# ----------------------------------------------------------------------------------------------------------------------
# Captioners
# ----------------------------------------------------------------------------------------------------------------------


def test_scene_captioner_equals_scene_captions(css_val):
    captioner = captions.SceneCaptioner(css_val)
    ids = list(css_val.gallery_ids[:5])
    out = captioner.caption([captioner.image_fn(i) for i in ids], [""] * len(ids))
    assert out == [cir.scene_captions(css_val.scenes[i]) for i in ids]
    assert out == [dict(css_val.image_captions[i]) for i in ids]
    assert all(set(o) == set(captions.LEVELS) for o in out)
    with pytest.raises(ValueError, match="no scene graphs"):
        captions.SceneCaptioner(cir.CIRSplit("cirr/val", (), ("a",), {"a": "/x.png"}))
    with pytest.raises(ValueError, match="unknown image id 'nope'"):
        captioner.image_fn("nope")


class FakeGenerate:
    """Answers from a script keyed by (image value, attempt): records every call."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def __call__(self, images, prompts):
        self.calls.append((list(images), list(prompts)))
        attempt = sum(1 for batch, _ in self.calls for image in batch if image == images[0]) - 1
        return [self.answers[image][min(attempt, len(self.answers[image]) - 1)] for image in images]


def test_retry_once_then_record_the_error():
    good = json.dumps(FULL)
    generate = FakeGenerate({"a": [good], "b": ["garbage", good], "c": ["garbage", "still garbage"]})
    out = captions.caption_with_retries(generate, ["a", "b", "c"], ["dress", "shirt", "toptee"], domain="fashion")
    assert out[0] == FULL and out[1] == FULL
    assert out[2][captions.ERROR_KEY].startswith("no MCoT caption levels") and out[2]["response"] == "still garbage"
    (first_images, first_prompts), (retry_images, retry_prompts) = generate.calls
    assert first_images == ["a", "b", "c"] and retry_images == ["b", "c"]  # one batch, then only the failures
    assert first_prompts[1] == captions.build_prompt("fashion", "shirt")
    assert retry_prompts[0] == captions.build_prompt("fashion", "shirt") + captions.RETRY_SUFFIX
    no_retry = FakeGenerate({"b": ["garbage", good]})
    assert captions.ERROR_KEY in captions.caption_with_retries(no_retry, ["b"], [""], domain="scene", retries=0)[0]
    assert len(no_retry.calls) == 1


class ListCaptioner:
    """Captions image values deterministically; fails on images starting with 'bad'; raises at call `stop_at`."""

    def __init__(self, stop_at=None):
        self.stop_at, self.seen = stop_at, []

    def caption(self, images, categories):
        if self.stop_at is not None and len(self.seen) == self.stop_at:
            raise KeyboardInterrupt("killed")
        self.seen.append(list(images))
        return [
            {captions.ERROR_KEY: "unparsable", "response": ""}
            if image.upper().startswith("BAD")
            else {"L1_global": f"{category} {image}", "Final_Caption": f"The {image}."}
            for image, category in zip(images, categories, strict=True)
        ]


def test_caption_split_resumes_after_an_interruption(tmp_path):
    ids = [f"img{i:02d}" for i in range(9)] + ["bad00"]
    kwargs = dict(image_fn=str.upper, categories="dress", batch_size=3)
    reference_path = str(tmp_path / "ref" / "all_mcot.json")
    reference = captions.caption_split(ListCaptioner(), ids, out_path=reference_path, **kwargs)
    assert reference["num_captioned"] == 9 and reference["num_failed"] == 1 and reference["num_new"] == 10

    path = str(tmp_path / "run" / "all_mcot.json")
    with pytest.raises(KeyboardInterrupt):
        captions.caption_split(ListCaptioner(stop_at=2), ids, out_path=path, **kwargs)
    assert sorted(captions.read_captions(path)) == ids[:6]  # the two finished batches were saved
    resumed = ListCaptioner()
    counts = captions.caption_split(resumed, ids, out_path=path, **kwargs)
    assert resumed.seen == [["IMG06", "IMG07", "IMG08"], ["BAD00"]]
    assert counts["num_resumed"] == 6 and counts["num_new"] == 4 and counts["num_failed"] == 1
    assert captions.read_captions(path) == captions.read_captions(reference_path)
    assert captions.read_captions(path)["img03"] == {"L1_global": "dress IMG03", "Final_Caption": "The IMG03."}
    errors = captions.read_captions(captions.errors_path(path))
    assert list(errors) == ["bad00"] and errors["bad00"][captions.ERROR_KEY] == "unparsable"

    again = ListCaptioner()
    assert captions.caption_split(again, ids, out_path=path, **kwargs)["num_resumed"] == 10 and again.seen == []
    fresh = ListCaptioner()
    captions.caption_split(fresh, ids, out_path=path, resume=False, **kwargs)
    assert len(fresh.seen) == 4


def test_caption_split_input_errors(tmp_path):
    path = str(tmp_path / "x.json")
    with pytest.raises(ValueError, match="image id 'a' occurs twice"):
        captions.caption_split(ListCaptioner(), ["a", "a"], str, "", batch_size=2, out_path=path)
    with pytest.raises(ValueError, match="2 image ids but 1 categories"):
        captions.caption_split(ListCaptioner(), ["a", "b"], str, [""], batch_size=2, out_path=path)


# ----------------------------------------------------------------------------------------------------------------------
# The Hugging Face adapter on a tiny randomly initialised local VLM (LLaVA layout with a Qwen2 text model)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> str:
    """A random tiny LLaVA (CLIP vision + Qwen2 text) saved with its processor and a chat template.

    LLaVA rather than Qwen2-VL: transformers 5.24 builds the Qwen2-VL processor only with torchvision installed.
    """
    torch = pytest.importorskip("torch")
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([captions.build_prompt("fashion"), captions.build_prompt("scene")], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessorPil(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
        ),
        tokenizer=fast,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    ids = {t: fast.convert_tokens_to_ids(t) for t in specials}
    config = transformers.LlavaConfig(
        text_config=dict(
            model_type="qwen2", vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, eos_token_id=ids["<|im_end|>"], pad_token_id=0,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32,
        ),
        image_token_id=ids["<image>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = str(tmp_path_factory.mktemp("tiny_vlm"))
    transformers.LlavaForConditionalGeneration(config).save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def hf_captioner(tiny_vlm_dir) -> captions.HFVisionLanguageCaptioner:
    return captions.HFVisionLanguageCaptioner(tiny_vlm_dir, domain="scene", max_new_tokens=6, dtype="float32")


def test_hf_adapter_batches_like_single_calls(hf_captioner):
    rng = np.random.default_rng(0)
    images = [rng.random((40, 40, 3), dtype=np.float32), rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)]
    prompts = ["short", captions.build_prompt("scene", "a much longer category")]  # different lengths: left padding
    batched = hf_captioner.generate(images, prompts)
    assert len(batched) == 2 and all(isinstance(t, str) for t in batched)
    assert batched == [hf_captioner.generate([images[i]], [prompts[i]])[0] for i in range(2)]


def test_hf_adapter_records_unparsable_answers(hf_captioner):
    images = [np.full((30, 30, 3), v, np.float32) for v in (0.1, 0.9, 0.5)]
    out = hf_captioner.caption(images, ["", "", ""])
    assert len(out) == 3  # nothing dropped: a random model writes no JSON, so every answer is a recorded error
    assert all(captions.ERROR_KEY in o and "after 2 attempt(s)" in o[captions.ERROR_KEY] for o in out)
    assert all(isinstance(o["response"], str) for o in out)


def test_hf_adapter_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found: .*nothing"):
        captions.HFVisionLanguageCaptioner(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------------------------------------------------
# The binary
# ----------------------------------------------------------------------------------------------------------------------


def test_binary_cpu_test_writes_the_scene_captions_and_resumes(tmp_path):
    config = configs.get_config("cpu_test")
    summary = csmcir_captions.run(config, str(tmp_path))
    split = cir.embedded_css(0, image_size=64, num_train=1, num_val=20, num_test=1)["val"]
    path = captions.caption_path(str(tmp_path / "captions"), "css", "val")
    written = captions.read_captions(path)
    assert written == {i: dict(split.image_captions[i]) for i in split.gallery_ids}
    assert summary["num_images"] == summary["num_captioned"] == len(split.gallery_ids) and summary["num_failed"] == 0
    assert json.loads((tmp_path / "caption_summary.json").read_text())["num_captioned"] == len(written)
    assert csmcir_captions.run(config, str(tmp_path))["files"][0]["num_resumed"] == len(written)


def test_binary_config_errors(tmp_path):
    config = configs.get_config("cpu_test")
    config.data.dataset = "cirr"
    with pytest.raises(config_lib.ConfigError, match="kind='scene' captions only the embedded css set"):
        csmcir_captions.run(config, str(tmp_path))
    config = configs.get_config("qwen2_vl")
    config.model.vlm_dir = ""
    with pytest.raises(config_lib.ConfigError, match="vlm_dir is required"):
        csmcir_captions.run(config, str(tmp_path))
    with pytest.raises(ValueError, match="unknown preset"):
        configs.get_config("gpu")


def test_binary_with_a_local_vlm_reports_failures(tiny_vlm_dir, tmp_path):
    config = configs.get_config("cpu_test")
    config.model.update(kind="hf_vlm", vlm_dir=tiny_vlm_dir, max_new_tokens=4, dtype="float32")
    config.data.update(max_images=3, image_size=32)
    config.captions.batch_size = 2
    summary = csmcir_captions.run(config, str(tmp_path))
    assert summary["num_images"] == 3 and summary["num_captioned"] + summary["num_failed"] == 3
    errors_file = summary["files"][0]["errors_path"]
    assert len(captions.read_captions(errors_file)) == summary["num_failed"]
