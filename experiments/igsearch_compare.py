r"""IG-Search vs trajectory-level GRPO from one warm start, over seeds: the paper's two claims measured with spread.

    python -m experiments.igsearch_compare --config=experiments/configs/igsearch.py:cpu_demo \
        --workdir=runs/igsearch_compare --seeds=0,1,2

1. One warm start (`<workdir>/warm_start/`, the config's own seed), shared by every run (copied into each), and
   one greedy evaluation of it (`<workdir>/eval_before.json`): every run starts from these params.
2. For every seed and mode (`ig`: `ig.enabled=True`; `no_ig`: the baseline) a full GRPO run in
   `<workdir>/<mode>_seed<seed>/` with `seed` and `ig.seed` set to that seed (`--modes` / `--seeds` select some,
   so that runs can go to separate processes or machines; a finished run is reused, not rerun).
3. `<workdir>/compare.json` and `compare.md`: per mode, mean ± std over seeds of EM after GRPO (average,
   single-hop, multi-hop), the all-fail group fraction, the fraction of all-fail groups whose query tokens got a
   non-zero advantage, the mean IG of the steps of correct and of incorrect rollouts, and the GRPO step time;
   EM before GRPO beside them.

Every run resumes like the trainer's binary: rerun the same command after an interruption.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import flags, logging

from jax_hd.core import checkpoint, metrics, sharding, train_state
from jax_hd.core import config as config_lib
from jax_hd.data import qa
from jax_hd.igsearch import setup, trainer

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "GRPO seeds (each also seeds the IG pool).")
MODES = ("ig", "no_ig")
_MODES = flags.DEFINE_list("modes", list(MODES), "Which of `ig`, `no_ig` to run.")
SOURCES = {"average": "average", "single_hop": qa.EMBEDDED_SINGLE_HOP_SOURCE,
           "multi_hop": qa.EMBEDDED_MULTI_HOP_SOURCE}
STEP_METRICS = ("all_fail_group_fraction", "all_fail_query_credit_fraction", "ig_mean_correct", "ig_mean_incorrect",
                "time/step_s")


def shared_warm_start(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Runs (or resumes, or reuses) the warm start once and evaluates it once; returns EM before GRPO per source
    (`SOURCES` names), also written to `<workdir>/eval_before.json`."""
    path = os.path.join(workdir, "eval_before.json")
    if os.path.exists(path):
        return metrics.read_json(path)
    trainer.check_config(config)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.normalize_rules(config.sharding_rules)
    s = trainer.build_setup(config)
    params = setup.load_params(config.policy, s.model_config, mesh, config.seed, rules)
    if config.warm_start.steps:
        examples = trainer.warm_start_examples(config, s.train_examples)
        params = trainer.warm_start(config, mesh, rules, s.model_config, params, examples, s.tokenizer, s.client,
                                    workdir)
    tx = trainer.grpo_optimizer(config)
    _, state_shardings = trainer.state_spec(s.model_config, tx, mesh, rules, False)
    rt = trainer.build_runtime(config, mesh, rules, s.tokenizer, s.client, s.model_config, tx, state_shardings)
    results = trainer.evaluate_policy(rt, params, s.eval_examples, config.eval.batch_size,
                                      os.path.join(workdir, "eval_records_before_grpo.jsonl"),
                                      config.eval.get("max_turns", 0))
    before = {name: results[source]["em"] for name, source in SOURCES.items() if source in results}
    metrics.write_json(path, before)
    return before


def run_config(config: ml_collections.ConfigDict, seed: int, mode: str) -> ml_collections.ConfigDict:
    """The config of one comparison run (no evaluation before GRPO: `shared_warm_start` did it)."""
    run = copy.deepcopy(config)
    run.seed, run.ig.seed, run.ig.enabled, run.eval.before_grpo = seed, seed, mode == "ig", False
    return run


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    values = [v for v in values if np.isfinite(v)]
    if not values:  # None, not NaN: compare.json stays valid JSON.
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarize_run(run_dir: str) -> dict[str, float]:
    """EM after GRPO per source and the means over GRPO steps of `STEP_METRICS` of one finished run."""
    evals = metrics.read_json(os.path.join(run_dir, "eval.json"))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    rows = [r for r in rows if r.get("step", 0) > 0]
    out = {f"em_after/{name}": evals["after_grpo"][source]["em"] for name, source in SOURCES.items()
           if source in evals["after_grpo"]}
    for key in STEP_METRICS:
        values = [r[key] for r in rows if key in r]
        out[key] = float(np.mean(values)) if values else float("nan")
    return out


def compare_table(before: dict, runs: dict[str, list[dict[str, float]]]) -> tuple[dict, str]:
    """(JSON summary, markdown table) of per-mode mean ± std over seeds."""
    summary = {"em_before": before,
               "modes": {mode: {key: _mean_std([r[key] for r in rs if key in r]) for key in rs[0]}
                         for mode, rs in runs.items() if rs}}
    keys = list(next(iter(summary["modes"].values())))
    lines = ["| metric | " + " | ".join(summary["modes"]) + " |", "|---|" + "---|" * len(summary["modes"])]
    lines.append("| EM before GRPO (avg / 1-hop / 2-hop) | " + " | ".join(
        " / ".join(f"{before.get(n, float('nan')):.1f}" for n in SOURCES) for _ in summary["modes"]) + " |")
    for key in keys:
        cells = [f"{m[key]['mean']:.3f} ± {m[key]['std']:.3f}" if m[key]["n"] else "-"
                 for m in summary["modes"].values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines) + "\n"


def compare(config: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int],
            modes: Sequence[str] = MODES) -> dict:
    """The whole comparison (module docstring); returns the JSON summary of the runs of `seeds` x `modes`."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise config_lib.ConfigError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    os.makedirs(workdir, exist_ok=True)
    before = shared_warm_start(config, workdir)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for seed in seeds:
        for mode in modes:
            run_dir = os.path.join(workdir, f"{mode}_seed{seed}")
            warm = os.path.join(workdir, "warm_start")
            if config.warm_start.steps and not os.path.exists(os.path.join(run_dir, "warm_start")):
                shutil.copytree(warm, os.path.join(run_dir, "warm_start"))
            if "after_grpo" not in metrics.read_json(os.path.join(run_dir, "eval.json")):
                logging.info("comparison run %s", run_dir)
                trainer.train(run_config(config, seed, mode), run_dir)
            runs[mode].append(summarize_run(run_dir))
    summary, table = compare_table(before, runs)
    summary["seeds"] = list(seeds)
    metrics.write_json(os.path.join(workdir, "compare.json"), summary)
    metrics.atomic_write_text(os.path.join(workdir, "compare.md"), table)
    logging.info("comparison:\n%s", table)
    print(table)
    return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return compare(config, workdir, [int(s) for s in _SEEDS.value], _MODES.value)


if __name__ == "__main__":
    config_lib.run_experiment(run, fatal=(checkpoint.CheckpointMismatchError, train_state.NonFiniteError),
                              preempted=(checkpoint.Preempted,))
