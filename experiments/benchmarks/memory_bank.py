r"""Cost of the CSMCIR memory bank: train-step time with the bank vs in-batch negatives only, same config, one run.

Both variants are built from the same trainer config (same data, cached features, model and optimizer); the only
difference is `bank.size` (the config's vs 0). Their states start from the same params; the timed steps are
interleaved (bank, no bank, bank, ...) on the same batches, so a change of machine load hits both alike. One untimed
step of each compiles first. The bank is full from the start of the timing: its ring buffer is first filled by
`bank.size / batch_size` untimed steps, so every timed step scores all M entries. Reported: mean and median step
time of each variant, their ratio, and the bank's analytic extra cost (B x M x K x D multiply-adds for the bank
logits, bank bytes).

    python -m experiments.benchmarks.memory_bank --config=experiments/configs/csmcir.py:cpu_demo \
        --out=runs/benchmarks/memory_bank.json
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from jax_hd.core import config as config_lib
from jax_hd.core import metrics, train_state
from jax_hd.csmcir import memory_bank as bank_lib
from jax_hd.csmcir import trainer


def define_flags() -> dict[str, Any]:
    """The benchmark's flags (defined only when run as a program, so the module stays importable)."""
    return {
        "config": config_flags.DEFINE_config_file(
            "config", "experiments/configs/csmcir.py:cpu_demo", "Trainer config file and preset.", lock_config=True
        ),
        "steps": flags.DEFINE_integer("steps", 20, "Timed steps per variant."),
        "workdir": flags.DEFINE_string(
            "workdir", "runs/benchmarks/memory_bank_run", "Scratch directory (caption files, feature caches)."
        ),
        "out": flags.DEFINE_string("out", "runs/benchmarks/memory_bank.json", "Where to write the JSON results."),
    }


def _time_step(step_fn: Any, state: train_state.TrainState, batch: Any) -> tuple[train_state.TrainState, float]:
    start = time.perf_counter()
    state, step_metrics = step_fn(state, batch)
    jax.block_until_ready((state, step_metrics))
    return state, time.perf_counter() - start


def benchmark(config: Any, steps: int, workdir: str, out: str) -> dict[str, Any]:
    """Runs the comparison (module docstring), prints the table, writes `out`; returns the JSON payload."""
    trainer.check_config(config)
    if config.bank.size == 0:
        raise config_lib.ConfigError("the config has bank.size = 0: nothing to compare")
    os.makedirs(workdir, exist_ok=True)
    r = trainer.build_run(config, workdir)
    train_iter = trainer.train_iterator(config, r.data.split, r.data.captions)
    no_bank = bank_lib.BankConfig(**{**config.bank.to_dict(), "size": 0})
    init_no_bank = trainer.init_fn_for(
        r.model_config, no_bank, image_tokens=r.vision.config.num_positions, text_len=config.data.max_txt_len_query
    )
    loss_config = config.loss.to_dict()
    rng = jax.random.PRNGKey(config.seed)
    fill_steps = config.bank.size // config.train.batch_size
    with jax.set_mesh(r.mesh), nn.logical_axis_rules(r.rules):
        states = {
            "bank": train_state.create_train_state(r.init_fn, r.tx, rng, r.mesh, r.rules),
            "no_bank": train_state.create_train_state(init_no_bank, r.tx, rng, r.mesh, r.rules),
        }
        bank_configs = {"bank": r.bank_config, "no_bank": no_bank}
        step_fns = {
            name: trainer.make_train_step(
                r.model, r.tx, bank_configs[name], loss_config, shardings, r.mesh, use_dropout=config.model.dropout > 0
            )
            for name, (_, shardings) in states.items()
        }
        carried = {name: state for name, (state, _) in states.items()}
        batches = [
            trainer.to_device(trainer.host_batch(r.data, next(train_iter)), r.mesh)
            for _ in range(max(fill_steps, 1) + steps)
        ]
        for i in range(max(fill_steps, 1)):  # compile + fill the ring buffer (untimed)
            for name in carried:
                carried[name], _ = _time_step(step_fns[name], carried[name], batches[i])
        times: dict[str, list[float]] = {name: [] for name in carried}
        for batch in batches[max(fill_steps, 1) :]:
            for name in carried:
                carried[name], seconds = _time_step(step_fns[name], carried[name], batch)
                times[name].append(seconds)
    bank = carried["bank"].extra["bank"]
    m, k, d = bank.feats.shape
    b = config.train.batch_size
    summary = {name: {"mean_s": float(np.mean(t)), "median_s": float(np.median(t))} for name, t in times.items()}
    ratio = summary["bank"]["mean_s"] / summary["no_bank"]["mean_s"]
    median_ratio = summary["bank"]["median_s"] / summary["no_bank"]["median_s"]
    print(f"{'variant':>8} {'mean s':>9} {'median s':>9}")
    for name, row in summary.items():
        print(f"{name:>8} {row['mean_s']:>9.4f} {row['median_s']:>9.4f}")
    print(
        f"bank M={m} K={k} D={d}, batch {b}: {2 * b * m * k * d / 1e6:.1f} MFLOP bank logits per step, "
        f"{bank.feats.nbytes / 2**20:.1f} MiB of bank features; filled rows {int((np.asarray(bank.ids) >= 0).sum())}"
    )
    print(f"step time ratio bank / in-batch only: {ratio:.3f} (mean), {median_ratio:.3f} (median)")
    payload = {
        "config": config.preset,
        "devices": jax.device_count(),
        "timed_steps": steps,
        "batch_size": b,
        "bank": {
            "size": m,
            "tokens": k,
            "dim": d,
            "entropy_mode": config.bank.entropy_mode,
            "bank_logit_flops": 2 * b * m * k * d,
            "bank_bytes": int(bank.feats.nbytes),
        },
        "ratio_mean": ratio,
        "ratio_median": median_ratio,
        "summary": summary,
        "step_seconds": times,
    }
    metrics.write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    _FLAGS = define_flags()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        metrics.quiet_library_logs()
        benchmark(_FLAGS["config"].value, _FLAGS["steps"].value, _FLAGS["workdir"].value, _FLAGS["out"].value)

    app.run(main, flags_parser=config_lib.parse_flags)
