r"""Wall-clock cost of the IG reward: GRPO step time with IG vs without, same config, same process, same rollouts.

Both modes start every timed step from a copy of the same state with the same prompts and the same rollout key,
so they sample identical rollouts and differ only by the IG pass (and its effect on the advantages). One untimed
step of each mode first compiles everything. Reported: mean step time of each mode and their ratio (the paper
reports about 1.064 [ABS]), plus the per-phase breakdown. The policy is the config's warm-started one (taken from
`--warm_start_dir` when it already holds a finished warm start, else trained there first), so rollouts search.

    python -m experiments.benchmarks.ig_overhead --config=experiments/configs/igsearch.py:cpu_demo \
        --warm_start_dir=runs/igsearch_demo --out=runs/benchmarks/ig_overhead.json
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jax_hd.core import config as config_lib
from jax_hd.core import metrics, sharding
from jax_hd.igsearch import setup, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/igsearch.py:cpu_demo",
                                          "Trainer config file and preset.", lock_config=True)
_WARM_START_DIR = flags.DEFINE_string("warm_start_dir", "runs/benchmarks/ig_overhead_run",
                                      "A run directory whose warm_start/ is reused (or written).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed GRPO steps per mode.")
_OUT = flags.DEFINE_string("out", "runs/benchmarks/ig_overhead.json", "Where to write the JSON results.")

PHASES = ("time/rollout_s", "time/ig_s", "time/logprob_s", "time/update_s", "time/step_s")


def copy_state(state: trainer.train_state.TrainState) -> trainer.train_state.TrainState:
    """A copy with the same shardings (the GRPO step donates its input)."""
    return jax.tree.map(jnp.copy, state)


def timed_steps(rt: trainer.Runtime, state, batches, ig_enabled: bool) -> list[dict[str, float]]:
    """One GRPO step per prompt batch, each from a copy of `state`; the metrics of each."""
    out = []
    for iteration, examples in enumerate(batches, start=1):
        _, step_metrics = trainer.grpo_iteration(rt, copy_state(state), examples, iteration, ig_enabled=ig_enabled)
        out.append(step_metrics)
    return out


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Mean of each phase's seconds per mode, and the IG step count."""
    return {mode: {**{p: float(np.mean([r[p] for r in rows])) for p in PHASES},
                   "ig_steps": float(np.mean([r["ig_steps"] for r in rows])),
                   "searches_per_rollout": float(np.mean([r["searches_per_rollout"] for r in rows]))}
            for mode, rows in runs.items()}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    metrics.quiet_library_logs()
    config = _CONFIG.value
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
        os.makedirs(_WARM_START_DIR.value, exist_ok=True)
        params = trainer.warm_start(config, mesh, rules, s.model_config, params,
                                    s.train_examples[: config.warm_start.num_examples], s.tokenizer, s.client,
                                    _WARM_START_DIR.value)
    state = trainer.state_from_params(params, tx, jax.random.PRNGKey(config.seed + 2), shardings, with_reference)
    rt = trainer.build_runtime(config, mesh, rules, s.tokenizer, s.client, s.model_config, tx, shardings)
    prompts = trainer.prompt_iterator(len(s.train_examples), config.trainer.prompts_per_step, config.seed + 1)
    batches = [[s.train_examples[int(i)] for i in next(prompts)] for _ in range(_STEPS.value + 1)]

    for ig_enabled in (True, False):  # Compile everything (both modes) outside the timed steps.
        timed_steps(rt, state, batches[:1], ig_enabled)
    runs = {"with_ig": timed_steps(rt, state, batches[1:], True),
            "without_ig": timed_steps(rt, state, batches[1:], False)}
    summary = summarize(runs)
    ratio = summary["with_ig"]["time/step_s"] / summary["without_ig"]["time/step_s"]
    print(f"{'phase':>16} {'with IG':>9} {'without':>9}")
    for phase in PHASES:
        print(f"{phase:>16} {summary['with_ig'][phase]:>9.2f} {summary['without_ig'][phase]:>9.2f}")
    print(f"IG steps scored per GRPO step: {summary['with_ig']['ig_steps']:.1f}; "
          f"searches per rollout {summary['with_ig']['searches_per_rollout']:.2f}")
    print(f"step time ratio with / without IG: {ratio:.3f} (paper: ~1.064)")
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"config": config.preset, "timed_steps": _STEPS.value, "devices": jax.device_count(),
                   "ratio": ratio, "summary": summary, "steps": runs}, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
