import pytest

from jax_hd.data.qa import QAExample
from jax_hd.igsearch import evaluate, rollout
from jax_hd.retrieval import Passage
from jax_hd.retrieval.client import SearchClient


class ByteTokenizer:
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [b + 1 for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 1 for i in ids if i > 0).decode("utf-8", errors="replace")


class QuestionEchoPolicy:
    """Searches once, then answers with the question's last word (right for some questions, wrong for others)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def generate(self, contexts, *, max_new_tokens, stop_strings):
        out = []
        for context in contexts:
            text = self.tokenizer.decode(context)
            after_prompt = text.rsplit("Question: ", 1)[1]
            question = after_prompt.split("?")[0]
            segment = (f"<answer> {question.split()[-1]} </answer>" if "<documents>" in after_prompt
                       else f"<search> {question} </search>")
            out.append(self.tokenizer.encode(segment))
        return out


class EchoRetriever:
    def search(self, queries, topk):
        return [[Passage("0", f'"T"\n{q}', 1.0)] for q in queries]


def test_evaluate_scores_per_source_and_average():
    examples = [
        QAExample("a", "who is Ada", ("ada",), "nq", "test"),
        QAExample("b", "who is Bob", ("Robert",), "nq", "test"),
        QAExample("c", "where is Paris", ("paris", "France"), "hotpotqa", "test"),
    ]
    tokenizer = ByteTokenizer()
    results, records = evaluate.evaluate(
        QuestionEchoPolicy(tokenizer), SearchClient(retriever=EchoRetriever()), tokenizer, examples,
        rollout.RolloutConfig(dialect="autorefine", max_turns=2), batch_size=2,
    )
    assert results["nq"]["em"] == pytest.approx(50.0) and results["hotpotqa"]["em"] == pytest.approx(100.0)
    assert results["average"]["em"] == pytest.approx(75.0)  # Unweighted over sources, as the papers average.
    assert results["nq"]["searches"] == 1.0 and results["nq"]["answered"] == 100.0
    assert [r["answer"] for r in records] == ["Ada", "Bob", "Paris"]
    assert records[0]["queries"] == ["who is Ada"]
    table = evaluate.format_table(results)
    assert "| nq | 2 | 50.00 |" in table and "| average |" in table
