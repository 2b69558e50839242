"""Multi-level chain-of-thought (MCoT) captions of target images: prompts, response parsing, caption files, captioners.

CSMCIR gives the target side a text modality by captioning every gallery image with a multimodal LLM prompted in
levels (spec §3). The paper's levels, prompt and decoding settings are UNKNOWN (spec §3.2); this module implements
the spec §3.3 PROPOSAL:

* **Levels** (`LEVELS`): `L1_global` (category and overall look; scenes: main objects and setting), `L2_attributes`
  (colour, pattern, material, shape...; scenes: counts, attributes, spatial relations), `L3_discriminative` (what
  tells the image apart from similar ones) and `Final_Caption` (1-2 sentences merging them). `build_prompt` writes
  the prompt (fashion and natural-scene variants, our own wording); `parse_mcot_response` reads the JSON answer.
* **Files** (`caption_path`): `{root}/{dataset}/{split}/{category}_mcot.json`, shaped
  `{image_id: {level: text}}`, the official-compatible shape (spec §2: `{image_id: str | {..., "Final_Caption"}}`);
  `read_captions` also accepts the plain-string form. `write_captions` is atomic.
* **Lookup** (`select_caption`, `caption_lookup`): the text a model reads for an image, one level or a join such as
  `L1+L2+L3` (the `caption_field` ablation of spec §14); coverage of the gallery is checked up front (spec §3.1:
  every gallery image needs a caption).
* **Captioners** (`Captioner`): `SceneCaptioner`, the embedded default (captions generated from the CSS scene graphs,
  `jax_hd.data.cir.scene_captions`; deterministic, no MLLM), and `HFVisionLanguageCaptioner`, an adapter for a local
  Hugging Face vision-language model directory (Qwen2-VL / Qwen2.5-VL, or any `AutoModelForImageTextToText` whose
  processor has a chat template). `caption_split` captions a list of images with resumable progress files.

Decisions where the spec is silent: a response that cannot be parsed is retried once with a stricter instruction
appended (greedy decoding would repeat the same answer to the same prompt), then recorded in the errors file next to
the captions file (`errors_path`), never silently dropped; joined levels are separated by '. '.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from jax_hd.core import metrics
from jax_hd.data import cir

LEVELS = cir.CAPTION_LEVELS  # ("L1_global", "L2_attributes", "L3_discriminative", "Final_Caption")
DOMAINS = ("fashion", "scene")
ERROR_KEY = "error"  # A captioner result holding this key is a failure ({"error": message, "response": raw text}).
MISSING_MODES = ("error", "empty")

# Short names accepted in `caption_field` joins and tolerated as keys in model answers.
_LEVEL_ALIASES = {"l1": "L1_global", "l2": "L2_attributes", "l3": "L3_discriminative", "final": "Final_Caption"}
for _level in LEVELS:
    _LEVEL_ALIASES[re.sub(r"[^a-z0-9]", "", _level.lower())] = _level

_ANSWER_FORMAT = (
    "Answer with a single JSON object and nothing else, using exactly these keys:\n"
    '{{"L1_global": "...", "L2_attributes": "...", "L3_discriminative": "...", "Final_Caption": "..."}}'
)

# Prompt templates per domain; `build_prompt` fills `{category_hint}` (literal braces are doubled).
MCOT_PROMPTS: dict[str, str] = {
    "fashion": (
        "You are writing a retrieval caption for a fashion product photo{category_hint}. Look at the image and reason "
        "from coarse to fine.\n"
        "L1_global: name the garment category and describe its overall look and style in a few words.\n"
        "L2_attributes: list its visible attributes: colours, pattern or print, material and texture, silhouette, "
        "fit and length, sleeves, neckline, and notable details such as buttons, logos or text.\n"
        "L3_discriminative: say what distinguishes this item from other items of the same category, i.e. the "
        "details a shopper would use to tell it apart from similar products.\n"
        "Final_Caption: merge the three levels into one or two fluent sentences (at most 50 words) that identify "
        "this exact item.\n" + _ANSWER_FORMAT
    ),
    "scene": (
        "You are writing a retrieval caption for a photograph{category_hint}. Look at the image and reason from "
        "coarse to fine.\n"
        "L1_global: name the main objects or people and the setting of the scene.\n"
        "L2_attributes: describe how many of each object there are, their colours, sizes, states and actions, and "
        "where they are relative to each other.\n"
        "L3_discriminative: say what distinguishes this image from other images of similar scenes, i.e. the "
        "details that would single it out in a large collection.\n"
        "Final_Caption: merge the three levels into one or two fluent sentences (at most 50 words) that identify "
        "this exact image.\n" + _ANSWER_FORMAT
    ),
}
RETRY_SUFFIX = (
    "\nYour previous answer could not be read. Reply with the JSON object only: no prose, no markdown, four keys "
    "L1_global, L2_attributes, L3_discriminative, Final_Caption, each with a string value."
)


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and parsing
# ----------------------------------------------------------------------------------------------------------------------


def build_prompt(domain: str = "fashion", category: str = "") -> str:
    """The MCoT prompt for one image of `domain` ("fashion" | "scene"); `category` (e.g. FashionIQ `dress`) is named
    in the prompt when given."""
    if domain not in MCOT_PROMPTS:
        raise ValueError(f"unknown caption domain {domain!r}; expected one of {list(MCOT_PROMPTS)}")
    category = category.strip()
    hint = f" (category: {category})" if category else ""
    return MCOT_PROMPTS[domain].format(category_hint=hint)


def _canonical_level(key: str) -> str | None:
    return _LEVEL_ALIASES.get(re.sub(r"[^a-z0-9]", "", key.lower()))


def _clean_text(value: Any) -> str:
    """A level's text from a JSON value: strings as they are, lists joined by '; ', whitespace collapsed."""
    if isinstance(value, (list, tuple)):
        value = "; ".join(_clean_text(v) for v in value if _clean_text(v))
    elif isinstance(value, Mapping):
        value = "; ".join(f"{k}: {_clean_text(v)}" for k, v in value.items() if _clean_text(v))
    elif value is None:
        value = ""
    return " ".join(str(value).split())


def _has_words(text: str) -> bool:
    """False for empty or placeholder text such as '...' (a template echoed back)."""
    return re.search(r"[^\W_]", text) is not None


def join_levels(texts: Iterable[str]) -> str:
    """Joins level texts into one caption: each stripped of trailing '.;, ', separated by '. ', ending with '.'."""
    parts = [t.strip().rstrip(".;, ").strip() for t in texts]
    parts = [p for p in parts if p]
    return ". ".join(parts) + "." if parts else ""


def _levels_from_mapping(data: Mapping[str, Any]) -> dict[str, str]:
    levels: dict[str, str] = {}
    for key, value in data.items():
        level = _canonical_level(str(key))
        text = _clean_text(value)
        if level is not None and _has_words(text) and level not in levels:
            levels[level] = text
    return levels


def _json_objects(text: str) -> Iterable[Any]:
    """Every JSON object that starts at a '{' of `text` (fenced ```json blocks first), in order."""
    fenced = re.findall(r"```(?:json|JSON)?\s*(.*?)```", text, flags=re.DOTALL)
    decoder = json.JSONDecoder()
    for chunk in [*fenced, text]:
        for match in re.finditer(r"\{", chunk):
            try:
                obj, _ = decoder.raw_decode(chunk, match.start())
            except json.JSONDecodeError:
                continue
            yield obj


_LINE_KEY = re.compile(
    r"^\s*(?:[-*#>]+\s*)?[*_\"']*\s*(L1_global|L2_attributes|L3_discriminative|Final[ _]Caption|L1|L2|L3)\b"
    r"[^:=\n]{0,40}?[*_\"']*\s*[:=]\s*(.*)$",
    flags=re.IGNORECASE,
)


def _levels_from_lines(text: str) -> dict[str, str]:
    """The `L1_global: ...` line form; a level's text continues on following lines until the next level key."""
    levels: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.splitlines():
        match = _LINE_KEY.match(line)
        if match:
            current = _canonical_level(match.group(1))
            if current in levels:  # A repeated key (e.g. the prompt echoed back): keep the last answer.
                levels[current] = []
            levels.setdefault(current, []).append(match.group(2))
        elif current is not None and line.strip():
            levels[current].append(line)
    cleaned = {level: _clean_text(" ".join(lines)).strip("\"', ") for level, lines in levels.items()}
    return {level: text for level, text in cleaned.items() if _has_words(text)}


def _finish(levels: Mapping[str, str]) -> dict[str, str]:
    out = {level: levels[level] for level in LEVELS if level in levels}
    if "Final_Caption" not in out:
        out["Final_Caption"] = join_levels(out[level] for level in LEVELS[:-1] if level in out)
    return out


def parse_mcot_response(text: str) -> dict[str, str]:
    """Reads a model's MCoT answer into `{level: text}` (levels in `LEVELS` order, `Final_Caption` always present).

    Accepted forms: a JSON object (bare, inside ```json fences, or with prose around it; level keys matched loosely,
    e.g. `l1`, `Final Caption`), or lines `L1_global: ...` (markdown bullets and bold allowed). A missing
    `Final_Caption` is the join of the other levels (`join_levels`); absent or empty levels are left out.

    Raises:
      ValueError: no level could be read; the message quotes the start of the text.
    """
    if not isinstance(text, str):
        raise ValueError(f"MCoT response must be a string, got {type(text).__name__}")
    for obj in _json_objects(text):
        if isinstance(obj, Mapping):
            levels = _levels_from_mapping(obj)
            if levels:
                return _finish(levels)
    levels = _levels_from_lines(text)
    if levels:
        return _finish(levels)
    start = " ".join(text.split())[:120]
    raise ValueError(f"no MCoT caption levels ({', '.join(LEVELS)}) found in the response: {start!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Caption files
# ----------------------------------------------------------------------------------------------------------------------


def caption_path(root: str, dataset: str, split: str, category: str = "") -> str:
    """`{root}/{dataset}/{split}/{category}_mcot.json` (spec §3.3); category `all` when empty."""
    return os.path.join(root, dataset, split, f"{category or 'all'}_mcot.json")


def errors_path(captions_file: str) -> str:
    """Where `caption_split` records the images it could not caption: `<name>.errors.json` next to the file."""
    stem = captions_file[: -len(".json")] if captions_file.endswith(".json") else captions_file
    return f"{stem}.errors.json"


def _check_entry(image_id: Any, value: Any, where: str) -> dict[str, str]:
    """One file entry as `{level: text}`; `where` names the file in errors."""
    if not isinstance(image_id, str) or not image_id:
        raise ValueError(f"{where}: image id {image_id!r} must be a non-empty string")
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: image {image_id!r} has an empty caption")
        return {"Final_Caption": value}
    if not isinstance(value, Mapping):
        raise ValueError(
            f"{where}: image {image_id!r}: unknown caption shape {type(value).__name__}; expected a string or an "
            f"object {{level: text}} with levels {list(LEVELS)}"
        )
    if not value:
        raise ValueError(f"{where}: image {image_id!r} has an empty caption object")
    entry = {}
    for level, text in value.items():
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: image {image_id!r}, level {level!r}: caption must be a string, got {type(text).__name__}"
            )
        if not text.strip():
            raise ValueError(f"{where}: image {image_id!r}, level {level!r}: empty caption text")
        entry[str(level)] = text
    return entry


def read_captions(path: str) -> dict[str, dict[str, str]]:
    """Reads a caption file as `{image_id: {level: text}}`.

    Accepts the object form `{image_id: {"L1_global": ..., "Final_Caption": ...}}` (other string-valued keys are kept)
    and the plain-string form `{image_id: "caption"}`, read as `{"Final_Caption": caption}`.

    Raises:
      FileNotFoundError: `path` does not exist (the message names it).
      ValueError: invalid JSON, a top level that is not an object, or a bad entry (non-string value, empty text,
        unknown shape); the message names the file, the image id and the level.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object {{image_id: caption}}, got {type(data).__name__}")
    return {image_id: _check_entry(image_id, value, path) for image_id, value in data.items()}


def write_captions(path: str, captions: Mapping[str, Mapping[str, str]]) -> None:
    """Writes `{image_id: {level: text}}` as UTF-8 JSON with sorted keys, atomically (temporary file + rename).

    Raises:
      ValueError: an entry `read_captions` would reject (named by image id and level).
    """
    checked = {image_id: _check_entry(image_id, entry, f"captions for {path}") for image_id, entry in captions.items()}
    metrics.atomic_write_text(path, json.dumps(checked, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Lookup
# ----------------------------------------------------------------------------------------------------------------------


def parse_field(field: str) -> tuple[str, ...]:
    """The levels a `caption_field` names: one of `LEVELS`, or a '+' join of levels or their short names
    (`L1`, `L2`, `L3`, `Final`), e.g. `L1+L2+L3`."""
    if not isinstance(field, str) or not field.strip():
        raise ValueError(f"caption field must be a non-empty string, got {field!r}")
    if field in LEVELS:
        return (field,)
    levels = []
    for part in field.split("+"):
        part = part.strip()
        level = part if part in LEVELS else _canonical_level(part)
        if level is None:
            raise ValueError(
                f"unknown caption field {field!r} (part {part!r}); use one of {list(LEVELS)} or a '+' join such as "
                f"'L1+L2+L3'"
            )
        levels.append(level)
    return tuple(levels)


def _select(entry: Mapping[str, str], levels: tuple[str, ...], field: str, image_id: str | None = None) -> str:
    absent = [level for level in levels if level not in entry]
    if absent:
        which = f"image {image_id!r}: " if image_id is not None else ""
        raise ValueError(
            f"{which}caption has no {', '.join(repr(a) for a in absent)} (field {field!r}); available levels: "
            f"{list(entry)}"
        )
    if len(levels) == 1:
        return entry[levels[0]]
    return join_levels(entry[level] for level in levels)


def select_caption(entry: Mapping[str, str], field: str) -> str:
    """The text of `field` (a level of `LEVELS`, or a join such as `L1+L2+L3`, see `parse_field`) in one entry.

    Raises:
      ValueError: unknown field, or a level the entry lacks (the message lists the available levels).
    """
    return _select(entry, parse_field(field), field)


def caption_lookup(
    captions: Mapping[str, Mapping[str, str]],
    field: str,
    *,
    image_ids: Iterable[str] | None = None,
    missing: str = "error",
) -> Callable[[str], str]:
    """Returns `image_id -> caption text` for `field` (see `select_caption`).

    Args:
      captions: `{image_id: {level: text}}` (`read_captions`, or `CIRSplit.image_captions` for the embedded scenes).
      field: the caption field, e.g. `Final_Caption` or `L1+L2+L3`.
      image_ids: the ids that will be asked for (e.g. the gallery). They are checked up front: every one must have a
        caption holding `field` (spec §3.1), unless `missing="empty"`, which maps ids without a caption to ''.
      missing: "error" (an unknown id raises) or "empty" (an unknown id gives '').

    Raises:
      ValueError: bad `field` or `missing`; with `image_ids`, captions missing (the message gives the count and the
        first missing ids) or lacking a level of `field`.
    """
    levels = parse_field(field)
    if missing not in MISSING_MODES:
        raise ValueError(f"missing must be one of {list(MISSING_MODES)}, got {missing!r}")
    if image_ids is not None:
        ids = list(image_ids)
        absent = [i for i in ids if i not in captions]
        if absent and missing == "error":
            raise ValueError(
                f"{len(absent)} of {len(ids)} images have no caption (every gallery image needs one); first missing: "
                f"{absent[:5]}"
            )
        for image_id in ids:
            if image_id in captions:
                _select(captions[image_id], levels, field, image_id)

    def lookup(image_id: str) -> str:
        entry = captions.get(image_id)
        if entry is None:
            if missing == "empty":
                return ""
            raise ValueError(f"no caption for image {image_id!r}")
        return _select(entry, levels, field, image_id)

    return lookup


# ----------------------------------------------------------------------------------------------------------------------
# Captioners
# ----------------------------------------------------------------------------------------------------------------------


class Captioner(Protocol):
    """Writes MCoT captions for a batch of images.

    `caption(images, categories)` returns one dict per image: `{level: text}` on success, or
    `{"error": message, "response": raw model text}` (`ERROR_KEY`) when no caption could be produced.
    """

    def caption(self, images: Sequence[np.ndarray], categories: Sequence[str]) -> list[dict[str, str]]: ...


class SceneCaptioner:
    """The embedded default: captions of the CSS scenes computed from their scene graphs (`cir.scene_captions`).

    A scene's "image" for this captioner is its scene graph: use `image_fn` (image id -> `cir.Scene`) with
    `caption_split`. The captions equal `split.image_captions[image_id]`; deterministic, no model involved.
    """

    def __init__(self, split: cir.CIRSplit):
        if not split.scenes:
            raise ValueError(
                f"split {split.name!r} has no scene graphs: SceneCaptioner works on the embedded CSS scenes"
            )
        self.split = split

    def image_fn(self, image_id: str) -> cir.Scene:
        scene = self.split.scenes.get(image_id)
        if scene is None:
            raise ValueError(f"unknown image id {image_id!r}: not a scene of split {self.split.name!r}")
        return scene

    def caption(self, images: Sequence[cir.Scene], categories: Sequence[str]) -> list[dict[str, str]]:
        del categories  # The scene graph says everything.
        out = []
        for i, scene in enumerate(images):
            if not isinstance(scene, cir.Scene):
                raise ValueError(f"SceneCaptioner: image {i} is a {type(scene).__name__}, not a cir.Scene")
            out.append(dict(cir.scene_captions(scene)))
        return out


GenerateFn = Callable[[Sequence[np.ndarray], Sequence[str]], list[str]]  # (images, prompts) -> responses


def caption_with_retries(
    generate: GenerateFn,
    images: Sequence[np.ndarray],
    categories: Sequence[str],
    *,
    domain: str,
    retries: int = 1,
) -> list[dict[str, str]]:
    """Prompts `generate` with the MCoT prompt per image and parses the answers.

    Answers that cannot be parsed are asked again (only those images, batched) with `RETRY_SUFFIX` appended, up to
    `retries` times; what is still unreadable becomes `{"error": message, "response": last answer}`.
    """
    if len(images) != len(categories):
        raise ValueError(f"{len(images)} images but {len(categories)} categories")
    prompts = [build_prompt(domain, category) for category in categories]
    results: list[dict[str, str] | None] = [None] * len(images)
    pending = list(range(len(images)))
    for attempt in range(retries + 1):
        suffix = RETRY_SUFFIX if attempt else ""
        responses = generate([images[i] for i in pending], [prompts[i] + suffix for i in pending])
        if len(responses) != len(pending):
            raise ValueError(f"generate returned {len(responses)} responses for {len(pending)} images")
        failed = []
        for i, response in zip(pending, responses, strict=True):
            try:
                results[i] = parse_mcot_response(response)
            except ValueError as e:
                results[i] = {ERROR_KEY: f"{e} (after {attempt + 1} attempt(s))", "response": str(response)}
                failed.append(i)
        pending = failed
        if not pending:
            break
    return [r for r in results if r is not None]


def _to_pil(image: Any) -> Image.Image:
    """float [0, 1] or uint8 `[height, width, 3]` -> a PIL RGB image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an image [height, width, 3], got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


class HFVisionLanguageCaptioner:
    """MCoT captions from a local Hugging Face vision-language model directory (e.g. Qwen2-VL / Qwen2.5-VL-Instruct).

    Loads `AutoProcessor` and `AutoModelForImageTextToText` with `local_files_only=True` (nothing is downloaded);
    the processor must carry a chat template. Decoding is greedy with `max_new_tokens`; a batch is generated at once
    (left padding). Unparsable answers are retried and then reported as errors (`caption_with_retries`).
    Torch and transformers are imported here only. Images: float `[height, width, 3]` in [0, 1] or uint8.
    Note: transformers 5.x builds the Qwen2-VL processor (it has a video processor) only with torchvision installed.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        domain: str = "fashion",
        max_new_tokens: int = 256,
        dtype: str = "bfloat16",
        device: str = "cpu",
        retries: int = 1,
    ):
        if domain not in DOMAINS:
            raise ValueError(f"unknown caption domain {domain!r}; expected one of {list(DOMAINS)}")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"vision-language model directory not found: {model_dir}")
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
        except (AttributeError, ImportError, OSError, ValueError) as e:
            raise ValueError(
                f"cannot load the processor of {model_dir}: {e} (Qwen2-VL processors need torchvision installed)"
            ) from e
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"the processor in {model_dir} has no chat template")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # Decoder-only generation: prompts end where the answers start.
        if not hasattr(torch, dtype):
            raise ValueError(f"unknown torch dtype {dtype!r}")
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_dir, local_files_only=True, dtype=getattr(torch, dtype)
        ).to(device)
        self.model.eval()
        self.torch = torch
        self.device = device
        self.domain = domain
        self.max_new_tokens = max_new_tokens
        self.retries = retries

    def generate(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
        """One greedy answer per (image, prompt), generated as one batch."""
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
        texts = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
        inputs = self.processor(
            text=texts, images=[_to_pil(image) for image in images], return_tensors="pt", padding=True
        ).to(self.device)
        with self.torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        answers = output[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(answers, skip_special_tokens=True)

    def caption(self, images: Sequence[np.ndarray], categories: Sequence[str]) -> list[dict[str, str]]:
        return caption_with_retries(self.generate, images, categories, domain=self.domain, retries=self.retries)


# ----------------------------------------------------------------------------------------------------------------------
# Captioning a split
# ----------------------------------------------------------------------------------------------------------------------


def caption_split(
    captioner: Captioner,
    image_ids: Sequence[str],
    image_fn: Callable[[str], Any],
    categories: Sequence[str] | str,
    *,
    batch_size: int,
    out_path: str,
    resume: bool = True,
    save_every: int = 1,
) -> dict[str, Any]:
    """Captions every image id, saving progress so that a killed run resumes where it stopped.

    Captions go to `out_path` (`write_captions` shape) and failures to `errors_path(out_path)`
    (`{image_id: {"error": ..., "response": ...}}`), both rewritten atomically every `save_every` batches and when the
    loop ends (also by an exception). With `resume`, ids already in either file are skipped (delete the errors file
    to retry failures); without it both files start empty.

    Args:
      captioner: a `Captioner`.
      image_ids: the images to caption (e.g. a split's gallery), unique.
      image_fn: image id -> the image handed to the captioner.
      categories: one category per id, or one string for all (e.g. FashionIQ `dress`, '' for scenes).
      batch_size: images per `captioner.caption` call.
      out_path: the captions file.

    Returns:
      Counts: `num_images`, `num_captioned` (in the file, for these ids), `num_failed`, `num_resumed` (skipped
      because already done), `num_new`; and the two paths.
    """
    if batch_size <= 0 or save_every <= 0:
        raise ValueError(f"batch_size and save_every must be positive, got {batch_size} and {save_every}")
    ids = list(image_ids)
    categories = [categories] * len(ids) if isinstance(categories, str) else list(categories)
    if len(categories) != len(ids):
        raise ValueError(f"{len(ids)} image ids but {len(categories)} categories")
    seen: set[str] = set()
    for image_id in ids:
        if image_id in seen:
            raise ValueError(f"image id {image_id!r} occurs twice in image_ids")
        seen.add(image_id)
    err_path = errors_path(out_path)
    captions: dict[str, dict[str, str]] = {}
    errors: dict[str, dict[str, str]] = {}
    if resume and os.path.exists(out_path):
        captions = read_captions(out_path)
    if resume and os.path.exists(err_path):
        errors = read_captions(err_path)
    todo = [(i, c) for i, c in zip(ids, categories, strict=True) if i not in captions and i not in errors]
    num_resumed = len(ids) - len(todo)

    def save() -> None:
        write_captions(out_path, captions)
        if errors or os.path.exists(err_path):
            write_captions(err_path, errors)

    num_new = 0
    try:
        for batch_index, start in enumerate(range(0, len(todo), batch_size)):
            batch = todo[start : start + batch_size]
            results = captioner.caption([image_fn(i) for i, _ in batch], [c for _, c in batch])
            if len(results) != len(batch):
                raise ValueError(f"captioner returned {len(results)} captions for {len(batch)} images")
            for (image_id, _), result in zip(batch, results, strict=True):
                if ERROR_KEY in result:
                    errors[image_id] = {k: str(v) if str(v).strip() else "<empty>" for k, v in result.items()}
                else:
                    captions[image_id] = _check_entry(image_id, result, f"captioner output for {out_path}")
                num_new += 1
            if (batch_index + 1) % save_every == 0:
                save()
    finally:
        save()
    return {
        "num_images": len(ids),
        "num_captioned": sum(i in captions for i in ids),
        "num_failed": sum(i in errors for i in ids),
        "num_resumed": num_resumed,
        "num_new": num_new,
        "out_path": out_path,
        "errors_path": err_path,
    }
