r"""IG-Search training: GRPO with information-gain credit on the search-query tokens (`jax_hd.igsearch.trainer`).

    python -m experiments.igsearch --config=experiments/configs/igsearch.py:cpu_demo --workdir=runs/igsearch_demo
    python -m experiments.igsearch --config=experiments/configs/igsearch.py:cpu_demo --config.ig.enabled=False \
        --workdir=runs/igsearch_demo_no_ig

Writes to the workdir: config.json, metrics.jsonl + tensorboard/ + metrics.png (per GRPO step), eval.json (greedy
EM before GRPO and after the last step) with eval_records_*.jsonl, final_metrics.json, checkpoints/ (state + prompt
iterator) and, for the embedded policy, warm_start/ (the supervised warm start's own metrics and checkpoints).
Rerunning the same command resumes from the last checkpoint; SIGTERM saves and exits with status 143; a checkpoint
of another config or too many non-finite updates in a row exit with status 1 and a one-line message.
"""

from __future__ import annotations

from jax_hd.core import checkpoint, train_state
from jax_hd.core import config as config_lib
from jax_hd.igsearch import trainer

train = trainer.train

if __name__ == "__main__":
    config_lib.run_experiment(train, fatal=(checkpoint.CheckpointMismatchError, train_state.NonFiniteError),
                              preempted=(checkpoint.Preempted,))
