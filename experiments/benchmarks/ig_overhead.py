r"""Wall-clock cost of the IG reward: GRPO step time with IG vs without, same config, same process, same rollouts.

Both modes start every timed step from a copy of the same state with the same prompts and the same rollout key,
so they sample identical rollouts and differ only by the IG pass (and its effect on the advantages); the modes are
interleaved step by step. One untimed step of each mode first compiles everything. Reported: mean step time of
each mode and their ratio (the paper reports about 1.064 [ABS]), the IG phase's own time over a step without IG
(less noisy than the ratio on a shared machine), and the per-phase breakdown. The policy is the config's
warm-started one (taken from `--warm_start_dir` when it already holds a finished warm start, else trained there
first), so rollouts search.

    python -m experiments.benchmarks.ig_overhead --config=experiments/configs/igsearch.py:cpu_demo \
        --warm_start_dir=runs/igsearch_demo --out=runs/benchmarks/ig_overhead.json
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jax_hd.core import config as config_lib
from jax_hd.core import metrics, sharding
from jax_hd.igsearch import setup, trainer

PHASES = ("time/rollout_s", "time/ig_s", "time/logprob_s", "time/update_s", "time/step_s")


def copy_state(state: trainer.train_state.TrainState) -> trainer.train_state.TrainState:
    """A copy with the same shardings (the GRPO step donates its input)."""
    return jax.tree.map(jnp.copy, state)


def timed_steps(rt: trainer.Runtime, state, batches) -> dict[str, list[dict[str, float]]]:
    """For each prompt batch, one GRPO step with IG then one without, each from a copy of `state` (interleaved, so
    a change of machine load hits both modes alike); the metrics of each, per mode."""
    runs: dict[str, list[dict[str, float]]] = {"with_ig": [], "without_ig": []}
    for iteration, examples in enumerate(batches, start=1):
        for mode, ig_enabled in (("with_ig", True), ("without_ig", False)):
            _, step_metrics = trainer.grpo_iteration(rt, copy_state(state), examples, iteration,
                                                     ig_enabled=ig_enabled)
            runs[mode].append(step_metrics)
    return runs


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of each phase's seconds per mode, and the IG step count."""
    return {mode: {**{p: float(np.mean([r[p] for r in rows])) for p in PHASES},
                   "ig_steps": float(np.mean([r["ig_steps"] for r in rows])),
                   "searches_per_rollout": float(np.mean([r["searches_per_rollout"] for r in rows]))}
            for mode, rows in runs.items()}


def define_flags() -> dict[str, Any]:
    """The benchmark's flags (defined only when run as a program, so the module stays importable)."""
    return {
        "config": config_flags.DEFINE_config_file("config", "experiments/configs/igsearch.py:cpu_demo",
                                                  "Trainer config file and preset.", lock_config=True),
        "warm_start_dir": flags.DEFINE_string("warm_start_dir", "runs/benchmarks/ig_overhead_run",
                                              "A run directory whose warm_start/ is reused (or written)."),
        "steps": flags.DEFINE_integer("steps", 3, "Timed GRPO steps per mode."),
        "out": flags.DEFINE_string("out", "runs/benchmarks/ig_overhead.json", "Where to write the JSON results."),
    }


def benchmark(config: Any, warm_start_dir: str, steps: int, out: str) -> dict[str, Any]:
    """Runs the comparison (module docstring), prints the table, writes `out`; returns the JSON payload."""
    trainer.check_config(config)
    if config.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.jax_cache_dir))
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.normalize_rules(config.sharding_rules)
    s = trainer.build_setup(config)
    tx = trainer.grpo_optimizer(config)
    with_reference = config.grpo.kl_coef > 0
    _, shardings = trainer.state_spec(s.model_config, tx, mesh, rules, with_reference)
    params = setup.load_params(config.policy, s.model_config, mesh, config.seed, rules)
    if config.warm_start.steps:
        os.makedirs(warm_start_dir, exist_ok=True)
        params = trainer.warm_start(config, mesh, rules, s.model_config, params,
                                    s.train_examples[: config.warm_start.num_examples], s.tokenizer, s.client,
                                    warm_start_dir)
    state = trainer.state_from_params(params, tx, jax.random.PRNGKey(config.seed + 2), shardings, with_reference)
    rt = trainer.build_runtime(config, mesh, rules, s.tokenizer, s.client, s.model_config, tx, shardings)
    prompts = trainer.prompt_iterator(len(s.train_examples), config.trainer.prompts_per_step, config.seed + 1)
    batches = [[s.train_examples[int(i)] for i in next(prompts)] for _ in range(steps + 1)]

    timed_steps(rt, state, batches[:1])  # Compiles everything (both modes) outside the timed steps.
    runs = timed_steps(rt, state, batches[1:])
    summary = summarize(runs)
    ratio = summary["with_ig"]["time/step_s"] / summary["without_ig"]["time/step_s"]
    ig_share = summary["with_ig"]["time/ig_s"] / summary["without_ig"]["time/step_s"]
    print(f"{'phase':>16} {'with IG':>9} {'without':>9}")
    for phase in PHASES:
        print(f"{phase:>16} {summary['with_ig'][phase]:>9.2f} {summary['without_ig'][phase]:>9.2f}")
    print(f"IG steps scored per GRPO step: {summary['with_ig']['ig_steps']:.1f}; "
          f"searches per rollout {summary['with_ig']['searches_per_rollout']:.2f}")
    print(f"step time ratio with / without IG: {ratio:.3f} (paper: ~1.064); the IG phase alone adds "
          f"{ig_share:.1%} of a step without IG")
    payload = {"config": config.preset, "timed_steps": steps, "devices": jax.device_count(), "ratio": ratio,
               "ig_phase_over_step_without_ig": ig_share, "summary": summary, "steps": runs}
    metrics.write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    _FLAGS = define_flags()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        metrics.quiet_library_logs()
        benchmark(_FLAGS["config"].value, _FLAGS["warm_start_dir"].value, _FLAGS["steps"].value, _FLAGS["out"].value)

    app.run(main, flags_parser=config_lib.parse_flags)
