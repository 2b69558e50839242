"""The IG vs trajectory-GRPO comparison runner on the tiny preset: one shared warm start, both modes, a table."""

import json

import pytest

from experiments import igsearch_compare
from experiments.configs import igsearch as igsearch_configs


@pytest.mark.slow
def test_compare_runner_on_a_tiny_config(tmp_path):
    config = igsearch_configs.get_config("cpu_test")
    config.trainer.steps = 1
    config.jax_cache_dir = str(tmp_path / "xla_cache")  # The second run reuses the first one's programs.
    summary = igsearch_compare.compare(config, str(tmp_path), seeds=[0])
    assert set(summary["modes"]) == {"ig", "no_ig"} and summary["seeds"] == [0]
    for mode in ("ig", "no_ig"):
        run_dir = tmp_path / f"{mode}_seed0"
        assert json.loads((run_dir / "config.json").read_text())["ig"]["enabled"] == (mode == "ig")
        assert (run_dir / "warm_start" / "checkpoints").is_dir()
        em = summary["modes"][mode]["em_after/average"]
        assert em["n"] == 1 and 0.0 <= em["mean"] <= 100.0 and em["std"] == 0.0
        assert "before_grpo" not in json.loads((run_dir / "eval.json").read_text())  # Evaluated once, shared.
    assert set(summary["em_before"]) == {"average", "single_hop", "multi_hop"}
    assert json.loads((tmp_path / "eval_before.json").read_text()) == summary["em_before"]
    again = igsearch_compare.compare(config, str(tmp_path), seeds=[0], modes=["no_ig"])  # Reused, not rerun.
    assert again["modes"]["no_ig"] == summary["modes"]["no_ig"] and "ig" not in again["modes"]
    table = (tmp_path / "compare.md").read_text()
    assert "| em_after/multi_hop |" in table and "±" in table
    assert json.loads((tmp_path / "compare.json").read_text())["seeds"] == [0]
