r"""IG-Search training: GRPO with information-gain credit on the search-query tokens (`jax_hd.igsearch.trainer`).

    python -m experiments.igsearch --config=experiments/configs/igsearch.py:cpu_demo --workdir=runs/igsearch_demo
    python -m experiments.igsearch --config=experiments/configs/igsearch.py:cpu_demo --config.ig.enabled=False \
        --workdir=runs/igsearch_demo_no_ig

Writes to the workdir: config.json, metrics.jsonl + tensorboard/ + metrics.png (per GRPO step), eval.json (greedy
EM before GRPO and after the last step), final_metrics.json, checkpoints/ (state + prompt iterator) and, for the
embedded policy, warm_start/ (the supervised warm start's own metrics and checkpoints). Rerunning the same command
resumes from the last checkpoint; SIGTERM saves and exits with status 143.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from jax_hd.core import checkpoint, metrics
from jax_hd.core import config as config_lib
from jax_hd.igsearch import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset: path.py:preset.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints, eval, plots).")

EXIT_PREEMPTED = trainer.EXIT_PREEMPTED


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    metrics.quiet_library_logs()
    try:
        trainer.train(_CONFIG.value, _WORKDIR.value)
    except trainer.Preempted as e:
        sys.stderr.write(f"preempted ({e}): checkpoint saved; rerun the same command to resume\n")
        sys.exit(EXIT_PREEMPTED)
    except (config_lib.ConfigError, checkpoint.CheckpointMismatchError, trainer.NonFiniteError) as e:
        sys.exit(f"FATAL {type(e).__name__}: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
