"""In-process BM25 retriever over `bm25s`, and the Search-R1 corpus format (`read_corpus` / `write_corpus`).

Corpus convention (Search-R1's `wiki-18.jsonl`): one JSON object per line, `{"id": ..., "contents": ...}`
with `contents = '"Title"\\n' + passage text` (the title keeps its quotes). Both retrievers (`BM25Index`
here, `dense.DenseIndex`) and the HTTP server read corpora with `read_corpus`; it lives here because this
module has no JAX dependency.

Tokenisation (`BM25Config`): bm25s' scikit-learn-style regex tokenizer (lower-cased words of 2+ word
characters), English stopwords removed, no stemming by default. Search-R1's BM25 server uses pyserini
(Lucene's English analyzer: Porter stemming, k1=0.9, b=0.4); set `stemmer="english"` (needs
`pip install PyStemmer`) to get closer to it. The same settings tokenise the corpus and the queries and
are saved with the index.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import bm25s
import numpy as np

from jax_hd.retrieval import Passage

PASSAGES_FILE = "passages.jsonl"
BM25_CONFIG_FILE = "bm25_config.json"
BM25_DIR = "bm25s"


# ----------------------------------------------------------------------------------------------------------
# Corpus.


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Passages in corpus order: `ids[i]` and `contents[i]` (`'"Title"\\ntext'`) describe passage i."""

    ids: tuple[str, ...]
    contents: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        object.__setattr__(self, "contents", tuple(self.contents))
        if len(self.ids) != len(self.contents):
            raise ValueError(f"corpus has {len(self.ids)} ids but {len(self.contents)} contents")

    def __len__(self) -> int:
        return len(self.ids)

    def passage(self, index: int, score: float) -> Passage:
        return Passage(id=self.ids[index], contents=self.contents[index], score=float(score))


def _open_text(path: str, mode: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _rows(path: str) -> Iterator[tuple[int, str]]:
    with _open_text(path, "r") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                yield line_number, line


def read_corpus(path: str, limit: int | None = None) -> Corpus:
    """Reads a Search-R1 corpus jsonl (optionally `.gz`): rows `{"id": str | int, "contents": str}`.

    Blank lines are skipped; other keys are ignored. `limit`: read only the first `limit` passages.
    Raises ValueError naming the file and line of an invalid row (bad JSON, not an object, a missing or
    mistyped `id` / `contents`, a duplicate id) and FileNotFoundError for a missing file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"corpus file {path} does not exist")
    ids: list[str] = []
    contents: list[str] = []
    first_line: dict[str, int] = {}
    for line_number, line in _rows(path):
        if limit is not None and len(ids) >= limit:
            break
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with 'id' and 'contents', got {type(row).__name__}")
        missing = [key for key in ("id", "contents") if key not in row]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing}; a corpus row is {{'id': ..., 'contents': ...}}")
        row_id, text = row["id"], row["contents"]
        if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
            raise ValueError(f"{where}: 'id' must be a string or integer, got {type(row_id).__name__}")
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'contents' must be a string, got {type(text).__name__}")
        row_id = str(row_id)
        if row_id in first_line:
            raise ValueError(f"{where}: duplicate id {row_id!r} (first seen on line {first_line[row_id]})")
        first_line[row_id] = line_number
        ids.append(row_id)
        contents.append(text)
    return Corpus(tuple(ids), tuple(contents))


def write_corpus(path: str, corpus: Corpus) -> None:
    """Writes `corpus` as Search-R1 jsonl (`.gz` compresses); `read_corpus` reads it back unchanged."""
    with _open_text(path, "w") as f:
        for row_id, text in zip(corpus.ids, corpus.contents, strict=True):
            f.write(json.dumps({"id": row_id, "contents": text}, ensure_ascii=False) + "\n")


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest of `scores` `[n]`, best first; ties broken by the lower index."""
    k = min(k, scores.shape[0])
    candidates = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    return candidates[np.lexsort((candidates, -scores[candidates]))]


# ----------------------------------------------------------------------------------------------------------
# BM25.


@dataclasses.dataclass(frozen=True)
class BM25Config:
    """BM25 scoring and tokenisation.

    k1, b: BM25 saturation and length normalisation (defaults: pyserini's, as Search-R1's BM25 server).
    method: bm25s scoring variant: "lucene" (Lucene's idf, as pyserini), "robertson", "atire", "bm25l", "bm25+".
    lower: lower-case before tokenising.
    token_pattern: regex of a token (bm25s / scikit-learn default: words of 2+ characters).
    stopwords: "english" (bm25s' list), None (keep all), or an explicit tuple of words.
    stemmer: None, or a PyStemmer (Snowball) language such as "english" (`pip install PyStemmer`).
    """

    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    lower: bool = True
    token_pattern: str = r"(?u)\b\w\w+\b"
    stopwords: str | tuple[str, ...] | None = "english"
    stemmer: str | None = None

    def __post_init__(self):
        if isinstance(self.stopwords, list):
            object.__setattr__(self, "stopwords", tuple(self.stopwords))
        methods = ("lucene", "robertson", "atire", "bm25l", "bm25+")
        if self.method not in methods:
            raise ValueError(f"BM25 method {self.method!r} is not one of {methods}")
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}")

    def stem_fn(self) -> Callable[[list[str]], list[str]] | None:
        if self.stemmer is None:
            return None
        try:
            import Stemmer  # PyStemmer
        except ImportError as e:
            raise ImportError(f"BM25Config(stemmer={self.stemmer!r}) needs PyStemmer: pip install PyStemmer") from e
        return Stemmer.Stemmer(self.stemmer).stemWords

    def tokenize(self, texts: Sequence[str], return_ids: bool) -> Any:
        """bm25s tokenisation of `texts`: `bm25s.tokenization.Tokenized` (ids + vocab) or token lists."""
        stopwords = list(self.stopwords) if isinstance(self.stopwords, tuple) else self.stopwords
        return bm25s.tokenize(
            list(texts),
            lower=self.lower,
            token_pattern=self.token_pattern,
            stopwords=stopwords or [],
            stemmer=self.stem_fn(),
            return_ids=return_ids,
            show_progress=False,
        )


class BM25Index:
    """A BM25 index over a `Corpus`; implements `retrieval.Retriever` (scores are BM25 scores).

    Build with `BM25Index.build(corpus, config)`, persist with `save(directory)` / `BM25Index.load(directory)`.
    """

    def __init__(self, retriever: bm25s.BM25, corpus: Corpus, config: BM25Config):
        num_docs = int(retriever.scores["num_docs"])
        if num_docs != len(corpus):
            raise ValueError(f"the BM25 index has {num_docs} documents but the corpus {len(corpus)} passages")
        self.retriever = retriever
        self.corpus = corpus
        self.config = config

    @classmethod
    def build(cls, corpus: Corpus, config: BM25Config = BM25Config()) -> BM25Index:
        """Tokenises and indexes every passage's `contents` (title line included)."""
        if not len(corpus):
            raise ValueError("cannot build a BM25 index over an empty corpus")
        retriever = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        retriever.index(config.tokenize(corpus.contents, return_ids=True), show_progress=False)
        return cls(retriever, corpus, config)

    def __len__(self) -> int:
        return len(self.corpus)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for `query`: `[num_passages]` float32 (0 without shared terms)."""
        tokens = self.config.tokenize([query], return_ids=False)[0]
        return self.retriever.get_scores_from_ids(self.retriever.get_tokens_ids(tokens))

    def search_indices(self, queries: Sequence[str], topk: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, indices)`, each `[num_queries, min(topk, num_passages)]`, best first (ties: lower index)."""
        if topk <= 0:
            raise ValueError(f"topk must be positive, got {topk}")
        k = min(topk, len(self))
        all_scores = np.zeros((len(queries), k), np.float32)
        all_indices = np.zeros((len(queries), k), np.int64)
        for q, query in enumerate(queries):
            scores = self.scores(query)
            all_indices[q] = top_indices(scores, k)
            all_scores[q] = scores[all_indices[q]]
        return all_scores, all_indices

    def search(self, queries: Sequence[str], topk: int) -> list[list[Passage]]:
        """The `topk` passages with the highest BM25 score for each query, best first."""
        scores, indices = self.search_indices(queries, topk)
        return [
            [self.corpus.passage(int(i), s) for i, s in zip(row_indices, row_scores, strict=True)]
            for row_indices, row_scores in zip(indices, scores, strict=True)
        ]

    def save(self, directory: str) -> None:
        """Writes `bm25s/` (bm25s' sparse score matrix + vocab), `passages.jsonl` and `bm25_config.json`."""
        os.makedirs(directory, exist_ok=True)
        self.retriever.save(os.path.join(directory, BM25_DIR), show_progress=False)
        write_corpus(os.path.join(directory, PASSAGES_FILE), self.corpus)
        with open(os.path.join(directory, BM25_CONFIG_FILE), "w") as f:
            json.dump(dataclasses.asdict(self.config), f, indent=2)

    @classmethod
    def load(cls, directory: str, mmap: bool = False) -> BM25Index:
        """Reads an index written by `save`; `mmap` memory-maps the score matrix."""
        config_path = os.path.join(directory, BM25_CONFIG_FILE)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{directory} is not a saved BM25Index (no {BM25_CONFIG_FILE})")
        with open(config_path) as f:
            config = BM25Config(**json.load(f))
        retriever = bm25s.BM25.load(os.path.join(directory, BM25_DIR), mmap=mmap, show_progress=False, verbosity=0)
        return cls(retriever, read_corpus(os.path.join(directory, PASSAGES_FILE)), config)
