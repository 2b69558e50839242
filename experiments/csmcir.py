r"""CSMCIR training: a shared Q-Former for (reference image, text) and (target image, MCoT caption), with an
entropy-based memory bank of negatives (`jax_hd.csmcir.trainer`).

    python -m experiments.csmcir --config=experiments/configs/csmcir.py:cpu_demo --workdir=runs/csmcir_demo
    python -m experiments.csmcir --config=experiments/configs/csmcir.py:cpu_demo --config.bank.size=0 \
        --workdir=runs/csmcir_demo_no_bank

Writes to the workdir: config.json, captions/ (CSS: the MCoT caption files written from the scene graphs),
metrics.jsonl + tensorboard/ + metrics.png, checkpoints/ (state with the memory bank + data iterator), best/ and
best.json (the params of the best validation, when `eval.every_steps` > 0), results.json and table.md (R@K and
R_subset@K, or FashionIQ R@10/R@50 under the protocol named in the keys). Rerunning the same command resumes from the
last checkpoint; SIGTERM saves and exits with status 143; a checkpoint of another config, or too many non-finite
steps in a row, exit with status 1 and a one-line message.
"""

from __future__ import annotations

from jax_hd.core import checkpoint, train_state
from jax_hd.core import config as config_lib
from jax_hd.csmcir import trainer
from jax_hd.data import cir

train = trainer.train

if __name__ == "__main__":
    config_lib.run_experiment(
        train,
        fatal=(checkpoint.CheckpointMismatchError, train_state.NonFiniteError, cir.CIRDataError),
        preempted=(checkpoint.Preempted,),
    )
