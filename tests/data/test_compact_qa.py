"""The compact QA world: deterministic, disjoint splits, answers recoverable from what a search returns."""

import dataclasses
import re

import ml_collections
import pytest

from jax_hd.data import compact_qa, qa
from jax_hd.data.tokenizer import train_word_tokenizer
from jax_hd.igsearch import evaluate, rollout, setup


@pytest.fixture(scope="module")
def world() -> qa.QAWorld:
    return compact_qa.compact_qa_world(seed=0)


@pytest.fixture(scope="module")
def tokenizer(world):
    policy = ml_collections.ConfigDict(dict(hf_dir="", tokenizer="word", tokenizer_vocab_size=512))
    return setup.build_tokenizer(policy, world)


@pytest.fixture(scope="module")
def client(world):
    return setup.build_search_client(ml_collections.ConfigDict(dict(backend="bm25", index_dir="", max_retries=0)),
                                     world)


def test_deterministic_per_seed(world):
    assert qa.world_fingerprint(compact_qa.compact_qa_world(seed=0)) == qa.world_fingerprint(world)
    assert qa.world_fingerprint(compact_qa.compact_qa_world(seed=1)) != qa.world_fingerprint(world)


def test_splits_are_disjoint_and_mixed(world):
    gold = {split: {t for ex in examples for t in ex.gold_article_ids} for split, examples in world.splits.items()}
    assert not gold["train"] & gold["test"] and not gold["train"] & gold["dev"] and not gold["dev"] & gold["test"]
    questions = {split: {ex.question for ex in examples} for split, examples in world.splits.items()}
    assert not questions["train"] & questions["test"]
    for split in ("dev", "test"):
        hops = [ex.hops for ex in world.splits[split]]
        assert len(hops) == 200 and hops.count(2) == 80, split


def test_answers_are_in_the_gold_passages(world):
    contents = {p.id: p.contents for p in world.corpus}
    for ex in world.splits["test"]:
        assert re.fullmatch(r"\d{4}", ex.golden_answers[0])
        last = contents[ex.gold_passage_ids[-1]]
        assert f"year {ex.golden_answers[0]}" in last
        if ex.hops == 2:
            first_name = qa.surface_title(ex.gold_article_ids[1])
            assert f"link {first_name} ." in contents[ex.gold_passage_ids[0]]


def test_word_tokenizer_makes_every_word_and_every_name_one_token(world, tokenizer):
    for passage in world.corpus[:200]:
        ids = tokenizer.encode(passage.contents, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        name = tokenizer.encode(passage.article_id, add_special_tokens=False)
        assert len(name) == 1 and tokenizer.decode(name) == passage.article_id
        assert ids.count(name[0]) >= 2  # The title line and the text's subject.
    ids = tokenizer.encode("<search> Abraham Lincoln </search>", add_special_tokens=False)
    assert len(ids) == 3 and tokenizer.decode(ids) == "<search> Abraham Lincoln </search>"
    assert len(tokenizer.encode("Abraham Lincolnshire", add_special_tokens=False)) == 2  # Whole words only.
    small = train_word_tokenizer(["a b b c c c"], extra_tokens=("<answer>",), max_vocab_size=3 + 1 + 2)
    assert small.decode(small.encode("c b a z <answer>", add_special_tokens=False)) == "c b <|unk|> <|unk|> <answer>"


class OraclePolicy:
    """Reads only its context (question + retrieved documents): searches the question's name, follows the link for
    2-hop questions, answers the year of the last searched name's document."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _act(self, text: str) -> str:
        question, response = re.search(r"Question : (.*?\?)(.*)", text, re.DOTALL).groups()
        two_hop = compact_qa.MULTI_HOP_PATTERN.match(question)
        name = (two_hop or compact_qa.SINGLE_HOP_PATTERN.match(question)).group(1)
        observations = re.findall(r"<documents>(.*?)</documents>", response)
        if not observations:
            return f"<think> find this </think> <search> {name} </search>"
        searched = re.findall(r"<search> (.*?) </search>", response)[-1]
        name = re.escape(searched)
        doc = re.search(rf'Title : " {name} " \) {name} : year (\d+)(?: , link (.*?))? \.', observations[-1])
        if doc is None:
            return "<answer> none </answer>"
        if two_hop and len(observations) == 1:
            return f"<search> {doc.group(2)} </search>"
        return f"<answer> {doc.group(1)} </answer>"

    def generate(self, contexts, *, max_new_tokens, stop_strings):
        return [self.tokenizer.encode(self._act(self.tokenizer.decode(c)), add_special_tokens=False)
                for c in contexts]


def test_oracle_policy_answers_everything_through_the_rollout_code(world, tokenizer, client):
    config = rollout.RolloutConfig(dialect="autorefine", max_turns=2, topk=3, max_segment_tokens=40,
                                   max_observation_tokens=96, max_response_tokens=256)
    examples = world.splits["test"]
    results, records = evaluate.evaluate(OraclePolicy(tokenizer), client, tokenizer, examples, config,
                                         batch_size=100)
    assert results["average"]["em"] == pytest.approx(100.0), [r for r in records if not r["em"]][:3]
    assert results[qa.EMBEDDED_MULTI_HOP_SOURCE]["em"] == pytest.approx(100.0)
    two_hop = next(r for r in records if r["data_source"] == qa.EMBEDDED_MULTI_HOP_SOURCE)
    assert len(two_hop["queries"]) == 2


def test_expert_hops_of_compact_questions(world):
    from jax_hd.igsearch import experts

    one = next(ex for ex in world.splits["train"] if ex.hops == 1)
    two = next(ex for ex in world.splits["train"] if ex.hops == 2)
    assert experts.expert_hops(one, 8) == [experts.Hop(one.gold_article_ids[0], one.golden_answers[0])]
    hops = experts.expert_hops(two, 8)
    assert [h.query for h in hops] == list(two.gold_article_ids)
    assert hops[-1].target == two.golden_answers[0]
    assert dataclasses.asdict(hops[0])["target"] == two.gold_article_ids[1]


def test_counterfactual_expert_trajectories_rename_entities_consistently(world, tokenizer, client):
    import numpy as np

    from jax_hd.igsearch import experts, trainer

    config = rollout.RolloutConfig(dialect="autorefine", max_turns=2, topk=3, max_segment_tokens=40,
                                   max_observation_tokens=96, max_response_tokens=256)
    examples = [ex for ex in world.splits["train"][:40] if ex.hops == 2][:3] + world.splits["train"][:3]
    dropped = []
    originals = experts.expert_trajectories(examples, client, tokenizer, config, refine_window_words=0,
                                            dropped=dropped)
    assert len(originals) + len(dropped) == len(examples)
    short = dataclasses.replace(config, max_response_tokens=40)
    experts.expert_trajectories(examples[:2], client, tokenizer, short, dropped=dropped)
    assert "exceed max_response_tokens = 40" in dropped[-1][1] and dropped[-1][0] == examples[1].id
    token_ids = trainer.copy_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<search>") not in token_ids and tokenizer.eos_token_id not in token_ids
    for original in originals:
        renamed = experts.counterfactual_trajectory(original, tokenizer, token_ids, np.random.default_rng(0))
        assert len(renamed.prompt_ids) == len(original.prompt_ids)
        assert len(renamed.response_ids) == len(original.response_ids)
        assert renamed.policy_mask == original.policy_mask and renamed.answer != original.answer
        text = tokenizer.decode(renamed.response_ids)
        assert text.endswith(f"<answer> {renamed.answer} </answer> <|endoftext|>")
        for step in renamed.steps:  # Each renamed query names the title of the document it retrieved.
            start, end = step.observation_span
            assert f'Title : " {step.query} "' in tokenizer.decode(renamed.response_ids[start:end])
        question = tokenizer.decode(renamed.prompt_ids).split("Question : ")[-1]
        assert renamed.steps[0].query in question and original.steps[0].query not in question
