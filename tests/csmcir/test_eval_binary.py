"""The CIR evaluation binary end to end on the embedded scenes (in-process, cpu_test preset)."""

import json

import pytest

from experiments import csmcir_eval
from experiments.configs import csmcir_eval as configs


@pytest.mark.parametrize("kind", ["image_only", "random", "qformer_image"])
def test_cpu_test_preset_runs_and_reports_cirr_metrics(kind, tmp_path):
    config = configs.get_config("cpu_test")
    config.model.kind = kind
    results = csmcir_eval.run(config, str(tmp_path))
    keys = {f"css/R@{k}" for k in (1, 5, 10, 50)} | {f"css/R_subset@{k}" for k in (1, 2, 3)} | {"css/avg"}
    assert keys <= set(results)
    assert all(0.0 <= results[k] <= 100.0 for k in keys)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == kind and saved["css/R@1"] == results["css/R@1"]
    assert "| css |" in (tmp_path / "table.md").read_text()
    if kind == "random":  # 5 candidates per subset: chance is 20% at R_subset@1.
        assert results["css/R_subset@1"] < 40.0
