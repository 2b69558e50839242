r"""EM evaluation of a search agent: the seven Search-R1 benchmarks, or the embedded Wikipedia QA world.

    python -m experiments.igsearch_eval --config=experiments/configs/igsearch_eval.py:cpu_demo \
        --workdir=runs/igsearch_eval

Writes `<workdir>/results.json` (per-source metrics and the average), `records.jsonl` (one rollout per
question) and `table.md`, and prints the table.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import linen as nn

from jax_hd.core import config as config_lib
from jax_hd.core import sharding
from jax_hd.igsearch import evaluate, rollout, setup

F = config_lib.Field
SCHEMA = {
    "seed": F(int, low=0),
    "data.source": F(str, choices=("embedded", "search_r1")),
    "data.split": F(str),
    "data.max_questions": F(int),
    "retrieval.backend": F(str, choices=("bm25", "dense", "http")),
    "retrieval.timeout_s": F(float, positive=True),
    "retrieval.max_retries": F(int, low=0),
    "policy.tokenizer_vocab_size": F(int, low=300),
    "rollout.dialect": F(str, choices=tuple(rollout.PROMPT_TEMPLATES)),
    "rollout.max_turns": F(int, low=0),
    "rollout.topk": F(int, positive=True),
    "rollout.max_segment_tokens": F(int, positive=True),
    "rollout.max_observation_tokens": F(int, positive=True),
    "rollout.max_response_tokens": F(int, positive=True),
    "rollout.temperature": F(float, low=0.0),
    "eval.batch_size": F(int, positive=True),
}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    config_lib.validate(config, SCHEMA)
    sharding.maybe_initialize_distributed(config.distributed.mode)
    mesh = sharding.make_mesh(config.mesh)
    world = setup.build_world(config.data)
    d = config.data
    examples = setup.load_examples(d.source, world, split=d.split, path=d.path, max_questions=d.max_questions)
    client = setup.build_search_client(config.retrieval, world)
    model_config, params, tokenizer = setup.build_policy(config.policy, world, mesh, config.seed)
    logging.info("%d questions; policy %s; retrieval %s", len(examples), model_config, config.retrieval.backend)

    sampler = setup.make_sampler(model_config, setup.pad_token_id(tokenizer), mesh)
    policy = rollout.SamplerPolicy(sampler, params, tokenizer, jax.random.PRNGKey(config.seed),
                                   temperature=config.rollout.temperature)
    rollout_fields = {k: v for k, v in config.rollout.to_dict().items() if k != "temperature"}
    rollout_config = rollout.RolloutConfig(**rollout_fields)
    with nn.logical_axis_rules(sharding.DEFAULT_RULES):
        results, records = evaluate.evaluate(policy, client, tokenizer, examples, rollout_config,
                                             batch_size=config.eval.batch_size,
                                             use_chat_template=config.policy.use_chat_template)
    results["search_client"] = client.stats.as_dict()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "records.jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    table = evaluate.format_table({k: v for k, v in results.items() if k != "search_client"})
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    config_lib.run_experiment(run)
