"""Loading and validating experiment configs (`ml_collections.ConfigDict`).

Every experiment binary does two things with this module:

* `config.run_experiment(run)` as its `__main__`: it defines `--config` (`path.py:preset`, locked) and
  `--workdir`, parses them with `parse_flags` so that a misspelt `--config.a.b=...` override fails with a
  one-line message naming the field and the closest valid one (ml_collections alone raises an
  `AttributeError` traceback from deep inside flag parsing), and turns expected failures into exit codes;
* `config.validate(cfg, SCHEMA)` at start-up, where `SCHEMA` maps dotted field paths to `Field`s.

Flags are defined only by `run_experiment`, so binaries stay importable side by side (tests call their `run`).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

EXIT_PREEMPTED = 143  # 128 + SIGTERM: a relaunch loop should start the run again (it resumes).


class ConfigError(ValueError):
    """A config field is missing, misspelt, of the wrong type, or out of range."""


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:preset]` by calling the file's `get_config(preset)`."""
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_jax_hd_config", path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"config file {path!r} cannot be imported")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path!r} does not exist") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} defines no get_config(preset)")
    return module.get_config(preset) if preset else module.get_config()


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted paths of `config`, nested ConfigDicts included (`['trainer', 'trainer.lr', ...]`)."""
    paths = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(value, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            paths.extend(field_paths(value, prefix=f"{path}."))
    return paths


def _closest(name: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def check_overrides(argv: Sequence[str], config: ml_collections.ConfigDict, flag_name: str = "config") -> None:
    """Raises `ConfigError` for any `--{flag_name}.<path>` in argv that is not a field of `config`."""
    valid = field_paths(config)
    prefix = f"--{flag_name}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        path = arg[len(prefix):].split("=", 1)[0]
        if path in valid:
            continue
        message = f"unknown config field {path!r} in {arg!r}"
        suggestion = _closest(path, valid)
        if suggestion is not None:
            message += f"; did you mean {suggestion!r}?"
        raise ConfigError(message)


def _config_file_arg(argv: Sequence[str], flag_name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag_name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag_name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str], flag_name: str = "config") -> list[str]:
    """absl `flags_parser` for `app.run`: checks config overrides before absl parses them.

    Unknown fields and unparsable values exit with status 2 and a one-line message instead of a traceback.
    """
    spec = _config_file_arg(argv[1:], flag_name)
    try:
        if spec is not None:
            check_overrides(argv[1:], load_config(spec), flag_name)
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error) as e:
        sys.stderr.write(f"FATAL config error: {e}\n")
        sys.exit(2)


@dataclasses.dataclass(frozen=True)
class Field:
    """What a config field must be.

    Attributes:
      types: accepted Python types (`bool` is never accepted for `int`/`float`).
      low, high: inclusive bounds for numbers (None: unbounded).
      choices: allowed values (None: any).
      required: False lets the field be absent or None.
      positive: shorthand for "strictly greater than zero".
    """

    types: type | tuple[type, ...] = object
    low: float | None = None
    high: float | None = None
    choices: Sequence[Any] | None = None
    required: bool = True
    positive: bool = False


def _get(config: ml_collections.ConfigDict, path: str) -> tuple[bool, Any]:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict, Mapping)):
            return False, None
        if part not in node:
            return False, None
        node = node[part]
    return True, node


def _type_ok(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        return False
    if float in types and isinstance(value, int):
        return True
    return isinstance(value, types)


def _check_one(path: str, value: Any, field: Field) -> str | None:
    if not _type_ok(value, field.types):
        names = field.types.__name__ if isinstance(field.types, type) else "/".join(t.__name__ for t in field.types)
        return f"config.{path} = {value!r} has type {type(value).__name__}, expected {names}"
    if field.choices is not None and value not in field.choices:
        return f"config.{path} = {value!r} is not one of {list(field.choices)}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            return f"config.{path} = {value!r} must be finite"
        if field.positive and value <= 0:
            return f"config.{path} = {value!r} must be > 0"
        if field.low is not None and value < field.low:
            return f"config.{path} = {value!r} must be >= {field.low}"
        if field.high is not None and value > field.high:
            return f"config.{path} = {value!r} must be <= {field.high}"
    return None


def validate(config: ml_collections.ConfigDict, schema: Mapping[str, Field]) -> None:
    """Checks `config` against `schema` ({dotted path: Field}); raises one `ConfigError` listing every problem."""
    errors = []
    valid = field_paths(config)
    for path, field in schema.items():
        present, value = _get(config, path)
        if not present or value is None:
            if field.required:
                hint = _closest(path, valid) if not present else None
                errors.append(f"config.{path} is required" + (f" (found {hint!r})" if hint else ""))
            continue
        error = _check_one(path, value, field)
        if error:
            errors.append(error)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def run_experiment(
    run: Callable[[ml_collections.ConfigDict, str], Any],
    *,
    fatal: tuple[type[BaseException], ...] = (),
    preempted: tuple[type[BaseException], ...] = (),
) -> None:
    """The `__main__` of an experiment binary: `run(config, workdir)` from `--config` and `--workdir`.

    `ConfigError` and the `fatal` exceptions exit with status 1 and a one-line message; the `preempted` exceptions
    (raised after a checkpoint was saved on SIGTERM) exit with `EXIT_PREEMPTED` so a relaunch loop resumes the run.
    """
    from jax_hd.core import metrics  # Not at module level: metrics pulls in the plotting and logging stack.

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Config file and preset: path.py:preset.", lock_config=True
    )
    workdir_flag = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints, results).")

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if config_flag.value is None or workdir_flag.value is None:
            raise app.UsageError("--config and --workdir are required")
        metrics.quiet_library_logs()
        try:
            run(config_flag.value, workdir_flag.value)
        except preempted as e:
            sys.stderr.write(f"preempted ({e}): checkpoint saved; rerun the same command to resume\n")
            sys.exit(EXIT_PREEMPTED)
        except (ConfigError, *fatal) as e:
            sys.exit(f"FATAL {type(e).__name__}: {e}")

    app.run(main, flags_parser=parse_flags)
