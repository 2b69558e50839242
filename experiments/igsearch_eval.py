r"""EM evaluation of a search agent: the seven Search-R1 benchmarks, or the embedded Wikipedia QA world.

    python -m experiments.igsearch_eval --config=experiments/configs/igsearch_eval.py:cpu_demo \
        --workdir=runs/igsearch_eval

Writes `<workdir>/results.json` (per-source metrics and the average), `records.jsonl` (one rollout per
question) and `table.md`, and prints the table.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging
from flax import linen as nn
from ml_collections import config_flags

from jax_hd.core import config as config_lib
from jax_hd.core import metrics, sharding
from jax_hd.data import qa
from jax_hd.data.tokenizer import train_bpe_tokenizer
from jax_hd.decoding import sampling
from jax_hd.igsearch import evaluate, rollout
from jax_hd.models import hf_import, qwen2
from jax_hd.retrieval import Retriever, bm25
from jax_hd.retrieval.client import SearchClient

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and preset: path.py:preset.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where results go.")

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


def load_examples(config: ml_collections.ConfigDict, world: qa.QAWorld | None) -> list[qa.QAExample]:
    d = config.data
    if d.source == "embedded":
        examples = world.splits[d.split]
    elif os.path.isdir(d.path):
        examples = [ex for group in qa.load_search_r1_test_sets(d.path).values() for ex in group]
    else:
        examples = qa.read_search_r1(d.path)
    return list(examples[: d.max_questions] if d.max_questions > 0 else examples)


def build_retriever(config: ml_collections.ConfigDict, world: qa.QAWorld | None) -> SearchClient:
    r = config.retrieval
    if r.backend == "http":
        return SearchClient("http", url=r.url, timeout_s=r.timeout_s, max_retries=r.max_retries)
    retriever: Retriever
    if r.index_dir:
        from jax_hd.retrieval.server import load_retriever

        retriever = load_retriever(r.backend, r.index_dir)
    else:
        if world is None:
            raise config_lib.ConfigError("retrieval.index_dir is required unless data.source is 'embedded'")
        corpus = bm25.Corpus(tuple(p.id for p in world.corpus), tuple(p.contents for p in world.corpus))
        if r.backend == "bm25":
            retriever = bm25.BM25Index.build(corpus)
        else:
            from jax_hd.retrieval import dense

            retriever = dense.DenseIndex.build(dense.Encoder.minilm(), corpus)
    return SearchClient(retriever=retriever, max_retries=r.max_retries)


def build_policy(config: ml_collections.ConfigDict, world: qa.QAWorld | None, mesh: jax.sharding.Mesh):
    """(qwen2 config, sharded params, tokenizer) from `policy.hf_dir`, or the untrained embedded tiny policy."""
    p = config.policy
    if p.hf_dir:
        model_config = hf_import.read_qwen2_config(p.hf_dir)
        abstract = jax.eval_shape(functools.partial(qwen2.init_params, model_config), jax.random.PRNGKey(0))
        _, params = hf_import.load_qwen2(p.hf_dir, shardings=sharding.logical_shardings(abstract, mesh))
        return model_config, params, hf_import.load_tokenizer(p.hf_dir)
    if world is None:
        raise config_lib.ConfigError("policy.hf_dir is required unless data.source is 'embedded'")
    texts = [passage.contents for passage in world.corpus] + [ex.question for ex in world.splits["train"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=p.tokenizer_vocab_size)
    vocab = -(-len(tokenizer) // 128) * 128  # Padded so the vocabulary axis shards evenly.
    model_config = qwen2.Qwen2Config.tiny(
        vocab_size=vocab, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers, num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads, tie_word_embeddings=True,
    )
    init = functools.partial(qwen2.init_params, model_config)
    params, _ = sharding.sharded_init(init, jax.random.PRNGKey(config.seed), mesh=mesh)
    return model_config, params, tokenizer


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    config_lib.validate(config, SCHEMA)
    sharding.maybe_initialize_distributed(config.distributed.mode)
    mesh = sharding.make_mesh(config.mesh)
    world = qa.embedded_qa_world(config.data.world_seed) if config.data.source == "embedded" else None
    examples = load_examples(config, world)
    client = build_retriever(config, world)
    model_config, params, tokenizer = build_policy(config, world, mesh)
    logging.info("%d questions; policy %s; retrieval %s", len(examples), model_config, config.retrieval.backend)

    model = qwen2.Qwen2LM(model_config)

    def apply_fn(p: Any, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: Any):
        return model.apply({"params": p}, tokens, positions, mask, cache)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = sampling.Sampler(apply_fn, functools.partial(qwen2.init_cache, model_config),
                               sampling.SamplerConfig(pad_id=pad_id), mesh=mesh)
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    metrics.quiet_library_logs()
    try:
        run(_CONFIG.value, _WORKDIR.value)
    except config_lib.ConfigError as e:
        sys.exit(f"FATAL {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_lib.parse_flags)
