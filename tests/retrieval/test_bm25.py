"""BM25 retriever and the Search-R1 corpus reader."""

import json

import numpy as np
import pytest

from jax_hd.retrieval import Passage, Retriever
from jax_hd.retrieval.bm25 import BM25Config, BM25Index, Corpus, read_corpus, top_indices, write_corpus

ROWS = [
    {"id": "0", "contents": '"Aspirin"\nAspirin is a medication used to reduce pain, fever, or inflammation.'},
    {"id": "1", "contents": '"Zanzibar"\nZanzibar is an insular semi-autonomous region of Tanzania.'},
    {"id": "2", "contents": '"Tanzania"\nTanzania is a country in East Africa within the African Great Lakes region.'},
    {"id": "3", "contents": '"Fever"\nA fever is a body temperature above the normal range.'},
    {"id": 4, "contents": '"Kilimanjaro"\nMount Kilimanjaro is a dormant volcano in Tanzania.'},
]


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS) + "\n")  # a trailing blank line is fine
    return str(path)


@pytest.fixture(scope="module")
def index(corpus_path):
    return BM25Index.build(read_corpus(corpus_path))


def test_read_corpus_keeps_search_r1_rows(corpus_path, tmp_path):
    corpus = read_corpus(corpus_path)
    assert corpus.ids == ("0", "1", "2", "3", "4")  # integer ids become strings
    assert corpus.contents[1].split("\n", 1) == ['"Zanzibar"', ROWS[1]["contents"].split("\n", 1)[1]]
    assert read_corpus(corpus_path, limit=2).ids == ("0", "1")
    for name in ("copy.jsonl", "copy.jsonl.gz"):
        write_corpus(str(tmp_path / name), corpus)
        assert read_corpus(str(tmp_path / name)) == corpus


def test_exact_term_match_ranks_first(index):
    retriever: Retriever = index  # the protocol (not runtime-checkable): search(queries, topk)
    results = retriever.search(["Zanzibar", "what is the normal body temperature range", "dormant volcano"], 3)
    assert [r[0].id for r in results] == ["1", "3", "4"]
    for passages in results:
        assert len(passages) == 3 and all(isinstance(p, Passage) for p in passages)
        scores = [p.score for p in passages]
        assert scores[0] > 0 and scores == sorted(scores, reverse=True)
    assert results[0][0].contents == ROWS[1]["contents"]
    # A term in three passages ranks them above the rest; unknown words score 0 everywhere.
    assert {p.id for p in index.search(["Tanzania"], 3)[0]} == {"1", "2", "4"}
    assert [p.score for p in index.search(["qwertyuiop"], 2)[0]] == [0.0, 0.0]
    assert len(index.search(["fever"], 50)[0]) == len(ROWS)


def test_save_load_round_trip(index, tmp_path):
    config = BM25Config(k1=1.2, b=0.75, stopwords=("the", "a", "is"))
    custom = BM25Index.build(index.corpus, config)
    for original in (index, custom):
        directory = str(tmp_path / str(id(original)))
        original.save(directory)
        loaded = BM25Index.load(directory)
        assert loaded.config == original.config and loaded.corpus == original.corpus
        queries = ["Zanzibar Tanzania", "pain and fever medication", "the"]
        assert loaded.search(queries, 4) == original.search(queries, 4)
    with pytest.raises(FileNotFoundError, match="not a saved BM25Index"):
        BM25Index.load(str(tmp_path))


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "9"}', r"missing key\(s\) \['contents'\]"),
        ('{"id": "9", "contents": 3}', "'contents' must be a string"),
        ('{"id": "9", "contents": "x"', "invalid JSON"),
        ('["9", "x"]', "expected a JSON object"),
        ('{"id": "1", "contents": "again"}', "duplicate id '1' \\(first seen on line 2\\)"),
    ],
)
def test_bad_corpus_row_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps(ROWS[0]), json.dumps(ROWS[1]), "", bad_line]) + "\n")
    with pytest.raises(ValueError, match=f"{path}:4: {message}"):
        read_corpus(str(path))


def test_top_indices_breaks_ties_by_lower_index():
    scores = np.array([0.5, 2.0, 0.5, 2.0, 1.0, 0.5], np.float32)
    np.testing.assert_array_equal(top_indices(scores, 4), [1, 3, 4, 0])
    np.testing.assert_array_equal(top_indices(scores, 10), [1, 3, 4, 0, 2, 5])


def test_config_and_corpus_validation():
    with pytest.raises(ValueError, match="BM25 method 'bm26'"):
        BM25Config(method="bm26")
    with pytest.raises(ValueError, match="2 ids but 1 contents"):
        Corpus(("a", "b"), ("x",))
    with pytest.raises(ValueError, match="empty corpus"):
        BM25Index.build(Corpus((), ()))
