"""OneSearch-V2 keyword thoughts: the keyword file (round trip, wrong catalogue, malformed rows with file:line), the
LLM prompt and answer parser, resumable generation, `catalog.intent_relevance`, and the `onesearch_keywords` binary
on the simulator and on a tiny random local Hugging Face causal LM."""

import json

import numpy as np
import pytest

from experiments import onesearch_keywords
from experiments.configs import onesearch as configs
from jax_hd.data import catalog
from jax_hd.onesearch import keywords as K
from jax_hd.onesearch import trainer


@pytest.fixture(scope="module")
def config():
    return configs.get_config("cpu_test")


@pytest.fixture(scope="module")
def world(config):
    return trainer.simulated_world_of(config)


@pytest.fixture(scope="module")
def fingerprint(world):
    return K.catalogue_fingerprint(world.catalog.item_ids.tolist())


def test_round_trip_and_lookup(tmp_path, world, fingerprint):
    entries = K.simulator_entries(world.log, range(40)) + [K.KeywordEntry("query only", ("a", "b"), ("a",))]
    entries.append(K.KeywordEntry("no thought"))  # queries without keywords are allowed
    path = str(tmp_path / "kw.jsonl")
    K.write_keyword_file(path, entries, catalogue=fingerprint, source="simulator")
    read = K.read_keyword_file(path, catalogue=fingerprint)
    assert read.entries == tuple(entries) and read.source == "simulator" and read.catalogue == fingerprint
    log = world.log
    assert all(len(e.keywords) <= 8 and 1 <= len(e.p_keywords) <= 5 for e in read.entries[:40])
    e = read.lookup(str(log.queries[3]), str(log.user_ids[3]), str(log.session_ids[3]))
    assert e.keywords == log.keywords[3] and e.p_keywords == log.preference_keywords[3]
    assert read.lookup("query only", "some user").keywords == ("a", "b")  # falls back to the query-level row
    assert read.lookup("unknown query") is None
    core, pref = K.session_thoughts(log.select(np.arange(45)), read)
    assert core[:40] == [tuple(k) for k in log.keywords[:40]] and pref[3] == log.preference_keywords[3]
    # The order of fingerprinted ids does not matter, the set does.
    assert K.catalogue_fingerprint(reversed(world.catalog.item_ids.tolist())) == fingerprint
    assert K.catalogue_fingerprint(world.catalog.item_ids[:-1].tolist()) != fingerprint


def test_wrong_catalogue_names_both_fingerprints(tmp_path, world, fingerprint):
    path = str(tmp_path / "kw.jsonl")
    K.write_keyword_file(path, K.simulator_entries(world.log, range(3)), catalogue="sha1:deadbeef:n=1", source="x")
    with pytest.raises(K.KeywordFileError, match=rf"kw.jsonl:1: .*sha1:deadbeef:n=1.*{fingerprint}"):
        K.read_keyword_file(path, catalogue=fingerprint)


@pytest.mark.parametrize(
    "row, match",
    [
        ("{not json", r":3: invalid JSON"),
        (json.dumps({"keywords": ["a"]}), r":3: 'query' must be a non-empty string"),
        (json.dumps({"query": "q", "keywords": [f"k{i}" for i in range(9)]}), r":3: 'keywords' has 9 entries"),
        (json.dumps({"query": "q", "p_keywords": ["a"] * 6}), r":3: 'p_keywords' has 6 entries"),
        (json.dumps({"query": "q", "keywords": "a, b"}), r":3: 'keywords' must be a list"),
        (json.dumps({"query": "q", "colour": "red"}), r":3: unknown field"),
        (json.dumps({"query": "q", "session_id": "1"}), r":3: duplicate session_id '1' \(first at line 2\)"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, match):
    header = json.dumps({"format": K.FORMAT, "catalogue": "c", "source": "s"})
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([header, json.dumps({"query": "q", "session_id": "1"}), row]) + "\n")
    with pytest.raises(K.KeywordFileError, match="bad.jsonl" + match):
        K.read_keyword_file(str(path))


def test_header_errors(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps({"query": "q"}) + "\n")
    with pytest.raises(K.KeywordFileError, match="h.jsonl:1: the first row must be the header"):
        K.read_keyword_file(str(path))
    path.write_text("")
    with pytest.raises(K.KeywordFileError, match="empty file"):
        K.read_keyword_file(str(path))
    with pytest.raises(FileNotFoundError):
        K.read_keyword_file(str(tmp_path / "missing.jsonl"))


def test_prompt_has_the_three_steps_and_the_user_context():
    p = K.build_prompt(
        "jeans not blue", profile=["gender female"], recent_searches=["denim skirt"],
        recent_clicks=["Acme black jeans"], session_items=["Zed grey jeans"],
    )  # fmt: skip
    parts = ["Step 1 - Query analysis", "Step 2 - Keyword extraction", "at most 8", "Step 3 - Preference", "1 to 5"]
    parts += ["jeans not blue", "gender female", "denim skirt", "Acme black jeans", "Zed grey jeans"]
    for part in parts:
        assert part in p
    assert "interacted with in this session" not in K.build_prompt("jeans")
    with pytest.raises(ValueError, match="empty query"):
        K.build_prompt("  ")


@pytest.mark.parametrize(
    "answer, keywords, p_keywords, qtype",
    [
        ("Query type: negation\nKeywords: jeans; black; grey\nP_Keywords: Acme; black", ("jeans", "black", "grey"),
         ("Acme", "black"), "negation"),
        ("<think>Keywords: wrong</think>\n**Keywords**: red, dress, Red\n**P-Keywords**: cheap", ("red", "dress"),
         ("cheap",), ""),
        ("Step 2 ...\nKeywords: a\nfinal answer:\nKeywords: 1. \"lamp\"\n2. desk lamp\nPreference keywords: led",
         ("lamp",), ("led",), ""),
        ("Keywords: none\nP_Keywords: none", (), (), ""),
        ('Sure! {"keywords": ["mug", "cup", "mug"], "p_keywords": "blue | ceramic", "query_type": "Simple"}',
         ("mug", "cup"), ("blue", "ceramic"), "simple"),
        ("Keywords: " + "; ".join(f"w{i}" for i in range(12)), tuple(f"w{i}" for i in range(8)), ("w0",), ""),
        ("- keywords: sofa 、 couch ；leather", ("sofa", "couch", "leather"), ("sofa",), ""),
    ],
)  # fmt: skip
def test_parse_answer_cases(answer, keywords, p_keywords, qtype):
    parsed = K.parse_answer(answer)
    assert (parsed.keywords, parsed.p_keywords, parsed.query_type) == (keywords, p_keywords, qtype)


def test_parse_answer_rejects_answers_without_keywords():
    for answer in ("", "I cannot help with that.", "Step 2 - Keyword extraction is hard"):
        with pytest.raises(K.KeywordParseError):
            K.parse_answer(answer)


def _answer(prompt: str) -> str:
    query = prompt.split("Query: ", 1)[1].split("\n", 1)[0]
    if "bad" in query:
        return "no idea"
    return f"Keywords: {query}; thing\nP_Keywords: {query.split()[0]}"


def test_generate_keyword_file_resumes_and_records_failures(tmp_path):
    requests = [K.KeywordRequest(f"q{i}" if i != 3 else "bad q", str(i), str(i), K.build_prompt(f"q{i}" if i != 3
                else "bad q")) for i in range(7)]  # fmt: skip
    path = str(tmp_path / "out" / "kw.jsonl")
    calls = []

    def flaky(prompts):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise RuntimeError("killed")
        return [_answer(p) for p in prompts]

    with pytest.raises(RuntimeError, match="killed"):
        K.generate_keyword_file(requests, flaky, path, catalogue="c", source="m", batch_size=2)
    partial = K.read_keyword_file(path, catalogue="c")
    assert [e.session_id for e in partial.entries] == ["0", "1", "2"]  # batches 1-2 saved, "bad q" an error
    counts = K.generate_keyword_file(
        requests, lambda ps: [_answer(p) for p in ps], path, catalogue="c", source="m", batch_size=2
    )
    assert counts["num_resumed"] == 4 and counts["num_written"] == 6 and counts["num_failed"] == 1
    done = K.read_keyword_file(path, catalogue="c")
    assert done.lookup("q5", "5", "5").keywords == ("q5", "thing") and done.lookup("q5", "5", "5").p_keywords == ("q5",)
    errors = json.loads(open(K.errors_path(path)).read())
    assert list(errors) == [json.dumps(["session", "3"])] and errors[json.dumps(["session", "3"])]["response"]
    with pytest.raises(K.KeywordFileError, match="catalogue"):
        K.generate_keyword_file(requests, flaky, path, catalogue="other", source="m")


def test_intent_relevance_matches_the_log(world):
    log = world.log
    sessions = np.arange(len(log))
    n = log.num_impressions
    width = int(n.max())
    items = np.full((len(log), width), -1, np.int64)
    for s in range(len(log)):
        items[s, : n[s]] = log.impressed_items[log.impressions(int(s))]
    rel = catalog.intent_relevance(world, sessions, items)
    assert rel.dtype == np.int8 and rel.shape == items.shape
    np.testing.assert_array_equal(rel[items >= 0], log.relevance)
    assert (rel[items < 0] == 0).all()
    any_items = np.random.default_rng(0).integers(0, len(world.catalog), (5, 30))
    assert set(np.unique(catalog.intent_relevance(world, np.arange(5), any_items))) <= {0, 1, 2, 3}
    with pytest.raises(ValueError, match="items must be"):
        catalog.intent_relevance(world, np.arange(2), np.zeros((3, 1)))
    with pytest.raises(ValueError, match="catalog size"):
        catalog.intent_relevance(world, np.arange(1), np.array([[len(world.catalog)]]))


# ----------------------------------------------------------------------------------------------------------
# The binary.


def test_binary_simulator_path(config, world, fingerprint, tmp_path):
    out = str(tmp_path / "kw.jsonl")
    summary = onesearch_keywords.run(config, out)
    assert summary["num_written"] == len(world.log) and summary["catalogue"] == fingerprint
    read = K.read_keyword_file(out, catalogue=fingerprint)
    assert read.source == "simulator"
    core, pref = K.session_thoughts(world.log, read)
    assert core == [tuple(k) for k in world.log.keywords] and pref == [tuple(k) for k in world.log.preference_keywords]
    with pytest.raises(ValueError, match="needs --hf_dir"):
        onesearch_keywords.run(config, out, source="hf")


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory) -> str:
    """A random tiny Qwen2 causal LM with a locally trained byte-level BPE tokenizer (no download)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bpe = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([K.build_prompt("red dress"), "Keywords: a; b\nP_Keywords: c"], bpe)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    config = transformers.Qwen2Config(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = str(tmp_path_factory.mktemp("tiny_lm"))
    transformers.Qwen2ForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return model_dir


def test_hf_llm_batches_like_single_calls(tiny_lm_dir):
    llm = K.HFKeywordLLM(tiny_lm_dir, max_new_tokens=5)
    prompts = ["short", K.build_prompt("a much longer query about lamps")]  # different lengths: left padding
    batched = llm(prompts)
    assert len(batched) == 2 and all(isinstance(t, str) for t in batched)
    assert batched == [llm([p])[0] for p in prompts]
    with pytest.raises(FileNotFoundError):
        K.HFKeywordLLM(tiny_lm_dir + "_missing")


def test_binary_hf_path_on_a_tiny_local_model(config, tiny_lm_dir, fingerprint, tmp_path):
    out = str(tmp_path / "kw_llm.jsonl")
    kw = dict(hf_dir=tiny_lm_dir, max_sessions=5, batch_size=2, max_new_tokens=4)
    summary = onesearch_keywords.run(config, out, **kw)
    # A random model writes no keyword lines: every session is accounted for, as a row or a recorded failure.
    assert summary["num_written"] + summary["num_failed"] == 5 and summary["num_resumed"] == 0
    assert K.read_keyword_file(out, catalogue=fingerprint).source.endswith("tiny_lm0")
    assert onesearch_keywords.run(config, out, **kw)["num_resumed"] == 5  # rerun: nothing left to generate
