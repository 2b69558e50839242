"""The IG-Search evaluation binary end to end: embedded world, BM25, untrained tiny policy on 8 devices."""

import json

import pytest

from experiments import igsearch_eval
from experiments.configs import igsearch_eval as configs


@pytest.mark.slow
def test_cpu_test_preset_end_to_end(tmp_path):
    config = configs.get_config("cpu_test")
    results = igsearch_eval.run(config, str(tmp_path))
    sources = {"wikiqa_singlehop", "wikiqa_multihop"}
    assert sources <= set(results) and "average" in results
    assert sum(results[s]["num_questions"] for s in sources) == config.data.max_questions
    for source in sources:
        assert 0.0 <= results[source]["em"] <= 100.0
        assert results[source]["searches"] <= config.rollout.max_turns
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == config.data.max_questions
    assert json.loads((tmp_path / "results.json").read_text())["average"] == results["average"]
    assert "| average |" in (tmp_path / "table.md").read_text()
