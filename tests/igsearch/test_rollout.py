import collections

import numpy as np
import pytest

from jax_hd.igsearch import rollout
from jax_hd.retrieval import Passage
from jax_hd.retrieval.client import DEFAULT_FAILURE_TEXT, SearchClient


class ByteTokenizer:
    """UTF-8 bytes shifted by one (0 is padding): exact round trips, several tokens per character for non-ASCII."""

    def encode(self, text, add_special_tokens=False):
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


TOKENIZER = ByteTokenizer()


class ScriptedPolicy:
    """Returns, per rollout (identified by its prompt), the next scripted segment; honours the stop strings."""

    def __init__(self, scripts):
        self.scripts = {tuple(TOKENIZER.encode(k)): collections.deque(v) for k, v in scripts.items()}
        self.calls = []

    def generate(self, contexts, *, max_new_tokens, stop_strings):
        self.calls.append((len(contexts), tuple(stop_strings)))
        out = []
        for context in contexts:
            key = next(k for k in self.scripts if tuple(context[: len(k)]) == k)
            text = self.scripts[key].popleft() if self.scripts[key] else "..."
            ends = [text.index(s) + len(s) for s in stop_strings if s in text]
            out.append(TOKENIZER.encode(text[: min(ends)] if ends else text)[:max_new_tokens])
        return out


class FakeRetriever:
    def __init__(self, fail=False):
        self.fail, self.queries = fail, []

    def search(self, queries, topk):
        self.queries.extend(queries)
        if self.fail:
            raise RuntimeError("index offline")
        return [
            [Passage(f"{q}-{i}", f'"Title {q} {i}"\nabout {q}', 1.0 / (i + 1)) for i in range(topk)] for q in queries
        ]


def _run(scripts, retriever=None, **config):
    policy = ScriptedPolicy(scripts)
    client = SearchClient(retriever=retriever or FakeRetriever(), max_retries=1, backoff_s=0.0)
    prompts = [TOKENIZER.encode(p) for p in scripts]
    trajectories, stats = rollout.run_rollouts(policy, client, TOKENIZER, prompts,
                                               rollout.RolloutConfig(**{"max_turns": 3, **config}))
    return trajectories, stats, policy


def _policy_text(t):
    return TOKENIZER.decode([i for i, m in zip(t.response_ids, t.policy_mask, strict=True) if m])


def _inserted_text(t):
    return TOKENIZER.decode([i for i, m in zip(t.response_ids, t.policy_mask, strict=True) if not m])


def test_search_then_answer_masks_and_spans():
    seg1 = "<think>need facts</think> <search> capital of Ürkland </search> trailing text after the tag"
    seg2 = "<refine>it is Ürk</refine> <answer> Ürk City </answer>"
    (t,), stats, policy = _run({"Q1:": [seg1, seg2]})
    assert t.answer == "Ürk City" and not t.active and t.num_turns == 2 and t.num_invalid == 0
    # Everything the policy wrote is trainable (cut after </search>); only the documents block is not.
    assert _policy_text(t) == seg1[: seg1.index("</search>") + 9] + seg2
    assert _inserted_text(t).startswith("\n\n<documents>Doc 1(Title: \"Title capital of Ürkland 0\") about")
    assert _inserted_text(t).endswith("</documents>\n\n")
    (step,) = t.steps
    assert step.query == "capital of Ürkland" and not step.failed and len(step.passages) == 3
    assert TOKENIZER.decode(t.response_ids[step.query_span[0]:step.query_span[1]]) == "capital of Ürkland"
    assert not any(t.policy_mask[step.observation_span[0]:step.observation_span[1]])
    assert stats["answer_rate"] == 1.0 and stats["searches_per_rollout"] == 1.0
    assert policy.calls == [(1, ("</search>", "</answer>"))] * 2


def test_invalid_actions_get_a_hint_and_the_last_turn_disables_search():
    scripts = {
        "A:": ["no tags here", "<search><search>nested</search>", "<search> q1 </search>", "<answer> x </answer>"],
        "B:": ["<answer> done </answer>"],
        "C:": ["<search>a</search>", "<search>b</search>", "<search>c</search>", "<search>d</search>"],
    }
    (a, b, c), stats, policy = _run(scripts)
    assert a.num_invalid == 2 and rollout.INVALID_ACTION_HINT in _inserted_text(a)
    assert [s.query for s in a.steps] == ["q1"] and a.answer == "x"
    assert b.answer == "done" and b.num_turns == 1 and b.steps == []
    # C searches on all 3 turns; its 4th (search-disabled) segment is kept but not executed.
    assert [s.query for s in c.steps] == ["a", "b", "c"] and c.answer is None and c.num_turns == 4
    assert _policy_text(c).endswith("<search>d</search>")
    assert policy.calls[-1] == (2, ("</answer>",))
    assert stats["invalid_actions_per_rollout"] == pytest.approx(2 / 3)


def test_failed_search_becomes_an_observation_not_an_exception():
    (t,), stats, _ = _run({"Q:": ["<search> who </search>", "<answer> me </answer>"]}, retriever=FakeRetriever(True))
    assert t.steps[0].failed and t.steps[0].passages == ()
    assert DEFAULT_FAILURE_TEXT in _inserted_text(t)
    assert t.answer == "me" and stats["search_failures"] == 1


def test_empty_query_is_answered_without_calling_the_engine():
    retriever = FakeRetriever()
    (t,), _, _ = _run({"Q:": ["<search>   </search>", "<answer> a </answer>"]}, retriever=retriever)
    assert retriever.queries == [] and t.steps[0].query == "" and t.steps[0].query_span[0] == t.steps[0].query_span[1]


def test_observation_and_response_budgets():
    (t,), stats, _ = _run({"Q:": ["<search> q </search>"] * 3}, max_observation_tokens=20, max_response_tokens=60)
    assert stats["observations_truncated"] >= 1
    assert len(t.response_ids) <= 60 and t.truncated


def test_truncated_observation_is_cut_per_document_and_closed():
    (t,), stats, _ = _run({"Q:": ["<search> q </search>", "<answer> a </answer>"]}, topk=3, max_observation_tokens=90)
    assert stats["observations_truncated"] == 1
    start, end = t.steps[0].observation_span
    text = TOKENIZER.decode(t.response_ids[start:end])
    assert end - start <= 90 and text.startswith("\n\n<documents>") and text.endswith("</documents>\n\n")
    assert [line[:5] for line in text.strip().removeprefix("<documents>").split("\n")] == ["Doc 1", "Doc 2", "Doc 3"]
    ids, cut = rollout.encode_observation(TOKENIZER, "Doc 1(Title: a) short", "documents", 90)
    assert not cut and TOKENIZER.decode(ids) == "\n\n<documents>Doc 1(Title: a) short</documents>\n\n"


def test_fair_shares():
    assert rollout.fair_shares([10, 2, 10], 12) == [5, 2, 5]
    assert rollout.fair_shares([3, 3], 100) == [3, 3]
    assert rollout.fair_shares([5, 5, 5], 7) == [2, 2, 3] and rollout.fair_shares([4], -3) == [0]


def test_pack_trajectories():
    (t,), _, _ = _run({"Q1:": ["<search> q </search>", "<answer> a </answer>"]})
    batch = rollout.pack_trajectories([t, t], prompt_len=8, response_len=len(t.response_ids) + 5, pad_id=0)
    assert batch["prompt_mask"][0].tolist() == [False] * 5 + [True] * 3
    assert batch["response_mask"][0].sum() == len(t.response_ids)
    assert batch["loss_mask"][0].sum() == sum(t.policy_mask)
    assert not (batch["loss_mask"] & ~batch["response_mask"]).any()
    assert TOKENIZER.decode(batch["response_tokens"][0][batch["query_token_mask"][0]].tolist()) == "q"
    np.testing.assert_array_equal(batch["query_step_index"] >= 0, batch["query_token_mask"])
    (two,), _, _ = _run({"Q2:": ["<search> a </search>", "<search> bb </search>", "<answer> c </answer>"]})
    packed = rollout.pack_trajectories([two], prompt_len=8, response_len=len(two.response_ids), pad_id=0)
    index = packed["query_step_index"][0]
    assert [TOKENIZER.decode(packed["response_tokens"][0][index == s].tolist()) for s in (0, 1)] == ["a", "bb"]
    with pytest.raises(ValueError, match="row 0"):
        rollout.pack_trajectories([t], prompt_len=2, response_len=500, pad_id=0)


def test_prompt_templates():
    text = rollout.make_prompt("  who wrote Hamlet ", "search_r1")
    assert text.endswith("Question: who wrote Hamlet?\n") and "<information>" in text
    assert "<refine>" in rollout.make_prompt("q?", "autorefine")
    with pytest.raises(ValueError, match="dialect"):
        rollout.RolloutConfig(dialect="react")


def test_prompt_through_a_real_chat_template():
    """An HF tokenizer with a chat template (transformers 5 returns a BatchEncoding for `tokenize=True`)."""
    from jax_hd.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["who wrote Hamlet", "Question: answer"] * 20, vocab_size=300)
    tokenizer.chat_template = ("{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    ids = rollout.encode_prompt(tokenizer, "who wrote Hamlet", "autorefine")
    assert all(isinstance(i, int) for i in ids)
    text = tokenizer.decode(ids)
    assert text.startswith("<|user|>") and text.endswith("Question: who wrote Hamlet?\n<|assistant|>")
    plain = rollout.encode_prompt(tokenizer, "who wrote Hamlet", "autorefine", use_chat_template=False)
    assert tokenizer.decode(plain) == rollout.make_prompt("who wrote Hamlet", "autorefine")


def test_a_segment_ending_with_eos_ends_the_rollout_without_an_answer():
    class EosTokenizer(ByteTokenizer):
        eos_token_id = 300

        def decode(self, ids):
            return super().decode([i for i in ids if i != self.eos_token_id])

    class EosPolicy:
        def generate(self, contexts, *, max_new_tokens, stop_strings):
            return [TOKENIZER.encode("I do not know.") + [300] for _ in contexts]

    client = SearchClient(retriever=FakeRetriever(), max_retries=1, backoff_s=0.0)
    (t,), stats = rollout.run_rollouts(EosPolicy(), client, EosTokenizer(), [TOKENIZER.encode("Q?")],
                                       rollout.RolloutConfig(max_turns=3))
    assert not t.active and t.answer is None and t.num_turns == 1 and t.num_invalid == 0
    assert t.response_ids == TOKENIZER.encode("I do not know.") + [300] and all(t.policy_mask)
    assert stats["answer_rate"] == 0.0
