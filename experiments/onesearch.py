r"""OneSearch training (multi-stage SFT, optional self-distillation, DPO and TPMA/GRPO) + evaluation
(`jax_hd.onesearch.trainer`).

    python -m experiments.onesearch --config=experiments/configs/onesearch.py:cpu_demo --workdir=runs/onesearch_demo
    python -m experiments.onesearch --config=experiments/configs/onesearch.py:cpu_demo --config.table.enabled=True \
        --workdir=runs/onesearch_v2_table

Writes to the workdir: config.json, data_info.json (SID statistics, example counts), per stage `<stage>-<fp>/`
(metrics.jsonl, tensorboard/, metrics.png, checkpoints/, results.json: HR@K / MRR@K / NDCG@K on click and order
test pairs with long-tail-query and cold-item slices, unconstrained valid-ID rate, leave-one-out metrics),
results.json (all stages + the popularity baseline) and results.md (the table). Rerunning resumes the unfinished
stage; finished stages are skipped. A checkpoint written under another config exits with status 1.
"""

from __future__ import annotations

import ml_collections

from jax_hd.core import checkpoint
from jax_hd.core import config as config_lib
from jax_hd.onesearch import trainer


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    if config.table.enabled:
        trainer.incremental_table(config, workdir, trainer.incremental_rows(config))
    else:
        trainer.train(config, workdir)


if __name__ == "__main__":
    config_lib.run_experiment(run, fatal=(checkpoint.CheckpointMismatchError,), preempted=(checkpoint.Preempted,))
