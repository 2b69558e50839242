import subprocess

import ml_collections
import pytest

from jax_hd.core import config as config_lib

F = config_lib.Field


def _config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(trainer=dict(lr=1e-3, steps=10, optimizer="adamw"), model=dict(hidden_dim=8), flag=True)
    )


def test_validate_accepts_a_valid_config():
    schema = {
        "trainer.lr": F(float, positive=True),
        "trainer.steps": F(int, low=1),
        "trainer.optimizer": F(str, choices=("adamw", "sgd")),
        "model.hidden_dim": F(int, positive=True),
        "flag": F(bool),
        "model.optional": F(int, required=False),
    }
    config_lib.validate(_config(), schema)


@pytest.mark.parametrize(
    "path, value, field, message",
    [
        ("trainer.lr", -1.0, F(float, positive=True), "config.trainer.lr = -1.0 must be > 0"),
        ("trainer.steps", 0, F(int, low=1), "config.trainer.steps = 0 must be >= 1"),
        ("trainer.lr", float("nan"), F(float), "config.trainer.lr = nan must be finite"),
        ("trainer.optimizer", "adam", F(str, choices=("adamw", "sgd")), "is not one of ['adamw', 'sgd']"),
        ("model.hidden_dim", 1.5, F(int), "has type float, expected int"),
        ("model.hidden_dim", True, F(int), "has type bool, expected int"),
        ("trainer.steps", 100, F(int, high=50), "must be <= 50"),
    ],
)
def test_validate_names_the_field_and_the_rule(path, value, field, message):
    fields = _config().to_dict()
    section, key = path.split(".")
    fields[section][key] = value
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(ml_collections.ConfigDict(fields), {path: field})
    assert message in str(e.value)


def test_validate_reports_missing_fields_with_the_closest_name_and_all_errors_at_once():
    schema = {"trainer.learning_rate": F(float), "trainer.steps": F(int, low=100)}
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(_config(), schema)
    text = str(e.value)
    assert "config.trainer.learning_rate is required" in text
    assert "must be >= 100" in text


def test_check_overrides_suggests_the_closest_field():
    with pytest.raises(config_lib.ConfigError, match=r"'trainer\.lrr'.*did you mean 'trainer\.lr'"):
        config_lib.check_overrides(["--config.trainer.lrr=3"], _config())
    with pytest.raises(config_lib.ConfigError, match=r"'traner\.lr'.*did you mean 'trainer\.lr'"):
        config_lib.check_overrides(["--config.traner.lr=3"], _config())
    config_lib.check_overrides(["--config.trainer.lr=3", "--other=1", "--config.flag"], _config())


def test_load_config_errors(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config(str(tmp_path / "missing.py") + ":x")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(config_lib.ConfigError, match="defines no get_config"):
        config_lib.load_config(str(empty))


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "--config.trainer.lrr=0.1",
            "unknown config field 'trainer.lrr' in '--config.trainer.lrr=0.1'; did you mean 'trainer.lr'?",
        ),
        ("--config.trainer.lr=abc", "could not convert string to float: 'abc'"),
    ],
)
def test_binary_rejects_bad_overrides_with_one_line(override, expected, python, repo_root, subprocess_env, tmp_path):
    result = subprocess.run(
        [python, "-m", "experiments.regression", "--config=experiments/configs/regression.py:cpu_test",
         f"--workdir={tmp_path}", override],
        cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


def test_binary_rejects_an_out_of_range_value(python, repo_root, subprocess_env, tmp_path):
    result = subprocess.run(
        [python, "-m", "experiments.regression", "--config=experiments/configs/regression.py:cpu_test",
         f"--workdir={tmp_path}", "--config.trainer.lr=-1"],
        cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "config.trainer.lr = -1.0 must be > 0" in result.stderr
