"""Building the pieces an IG-Search binary runs on: QA examples, the search client, the tokenizer, the policy model
and its sampler. Shared by `experiments.igsearch_eval` and the trainer (`jax_hd.igsearch.trainer`).

Two sources for each piece:

* the embedded default: a QA world built from the embedded Wikipedia summaries (`data.world`: the full cloze world
  `qa.embedded_qa_world`, or the compact one `compact_qa.compact_qa_world`), in-process BM25 (or dense) retrieval
  over its corpus, a tokenizer built locally on the corpus and the questions (byte-level BPE, or word-level so that
  copying a word is copying one token), and a tiny Qwen2 (random init; the trainer warm-starts it);
* real data: Search-R1 parquet/jsonl files, a retrieval index directory or an HTTP retrieval server, and a local HF
  Qwen2/Qwen2.5 checkpoint (weights loaded straight into their shardings).

Functions take the relevant config sub-dict (`config.data`, `config.retrieval`, `config.policy`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from jax_hd.core import config as config_lib
from jax_hd.core import sharding
from jax_hd.data import compact_qa, qa
from jax_hd.data.tokenizer import train_bpe_tokenizer, train_word_tokenizer
from jax_hd.decoding import sampling
from jax_hd.igsearch import experts, rollout
from jax_hd.models import hf_import, qwen2
from jax_hd.retrieval import Retriever, bm25
from jax_hd.retrieval.client import SearchClient

WORLDS = ("wiki", "compact")


def build_world(data: ml_collections.ConfigDict) -> qa.QAWorld | None:
    """The embedded QA world of `data.world` ("wiki": `qa.embedded_qa_world`; "compact":
    `compact_qa.compact_qa_world`) for `data.source == "embedded"`, else None."""
    if data.source != "embedded":
        return None
    kind = data.get("world", "wiki")
    if kind == "wiki":
        return qa.embedded_qa_world(data.world_seed)
    if kind == "compact":
        return compact_qa.compact_qa_world(data.world_seed)
    raise config_lib.ConfigError(f"data.world must be one of {WORLDS}, got {kind!r}")


def load_examples(
    source: str, world: qa.QAWorld | None, *, split: str, path: str, max_questions: int
) -> list[qa.QAExample]:
    """Questions of `split` of the embedded world (`source="embedded"`), or of the Search-R1 file / directory of
    per-benchmark test files at `path` (`source="search_r1"`). `max_questions <= 0`: all of them."""
    if source == "embedded":
        if world is None:
            raise config_lib.ConfigError("the embedded data source needs the embedded QA world")
        examples = world.splits[split]
    elif os.path.isdir(path):
        examples = [ex for group in qa.load_search_r1_test_sets(path).values() for ex in group]
    else:
        examples = qa.read_search_r1(path)
    return list(examples[:max_questions] if max_questions > 0 else examples)


def build_search_client(retrieval: ml_collections.ConfigDict, world: qa.QAWorld | None) -> SearchClient:
    """The rollout's search backend: HTTP (`backend="http"`), an index loaded from `index_dir`, or BM25 / dense
    built in-process over the embedded corpus."""
    if retrieval.backend == "http":
        return SearchClient("http", url=retrieval.url, timeout_s=retrieval.timeout_s,
                            max_retries=retrieval.max_retries)
    retriever: Retriever
    if retrieval.index_dir:
        from jax_hd.retrieval.server import load_retriever

        retriever = load_retriever(retrieval.backend, retrieval.index_dir)
    else:
        if world is None:
            raise config_lib.ConfigError("retrieval.index_dir is required unless data.source is 'embedded'")
        corpus = bm25.Corpus(tuple(p.id for p in world.corpus), tuple(p.contents for p in world.corpus))
        if retrieval.backend == "bm25":
            retriever = bm25.BM25Index.build(corpus)
        else:
            from jax_hd.retrieval import dense

            retriever = dense.DenseIndex.build(dense.Encoder.minilm(), corpus)
    return SearchClient(retriever=retriever, max_retries=retrieval.max_retries)


def tokenizer_texts(world: qa.QAWorld, max_texts: int = -1) -> list[str]:
    """What the embedded tokenizer is trained on: corpus passages then train questions (the first `max_texts`
    passages only when `max_texts > 0`, for seconds-long test runs)."""
    passages = [p.contents for p in world.corpus]
    if max_texts > 0:
        passages = passages[:max_texts]
    return passages + [ex.question for ex in world.splits["train"]]


def agent_texts() -> list[str]:
    """The fixed texts a rollout shows the policy besides the world's: instructions, the expert's think block,
    the invalid-action hint and an observation block (so a word-level vocabulary covers them)."""
    observation = "Doc 1(Title: x) x\nDoc 2(Title: x) x\nDoc 3(Title: x) x\nDoc 4(Title: x) x\nDoc 5(Title: x) x"
    return [*(qa.make_prompt("", dialect) for dialect in qa.PROMPT_TEMPLATES), experts.THINK_TEXT,
            rollout.INVALID_ACTION_HINT, observation]


def build_tokenizer(policy: ml_collections.ConfigDict, world: qa.QAWorld | None) -> Any:
    """The HF checkpoint's tokenizer (`policy.hf_dir`), or one built on the embedded world: byte-level BPE
    (`policy.tokenizer == "bpe"`) or word-level (`"word"`: every word of the corpus, of the questions of all
    splits and of the agent's fixed texts is one token, and so is every article title when `policy.word_titles`,
    so that a policy copies a name as one token; `tokenizer_vocab_size` is then ignored)."""
    if policy.hf_dir:
        return hf_import.load_tokenizer(policy.hf_dir)
    if world is None:
        raise config_lib.ConfigError("policy.hf_dir is required unless data.source is 'embedded'")
    kind = policy.get("tokenizer", "bpe")
    if kind == "word":
        questions = [ex.question for split in sorted(world.splits) for ex in world.splits[split]]
        titles = [p.article_id for p in world.corpus] if policy.get("word_titles", True) else []
        return train_word_tokenizer([p.contents for p in world.corpus] + questions + agent_texts(), phrases=titles)
    if kind != "bpe":
        raise config_lib.ConfigError(f"policy.tokenizer must be 'bpe' or 'word', got {kind!r}")
    texts = tokenizer_texts(world, policy.get("tokenizer_max_texts", -1))
    return train_bpe_tokenizer(texts, vocab_size=policy.tokenizer_vocab_size)


def build_model_config(policy: ml_collections.ConfigDict, tokenizer: Any) -> qwen2.Qwen2Config:
    """The HF checkpoint's Qwen2 config, or the embedded tiny one (vocabulary padded to a multiple of 128 so the
    vocabulary axis shards evenly). `policy.dtype` / `policy.remat` / `policy.logits_chunk_size` set the activations
    dtype, remat and the log-prob chunking when given."""
    overrides: dict[str, Any] = {
        "remat": bool(policy.get("remat", False)),
        "logits_chunk_size": int(policy.get("logits_chunk_size", 0)),
        "copy_head": bool(policy.get("copy_head", False)),
    }
    if policy.get("dtype"):
        overrides["dtype"] = policy.dtype
    if policy.hf_dir:
        return dataclasses.replace(hf_import.read_qwen2_config(policy.hf_dir), **overrides)
    vocab = -(-len(tokenizer) // 128) * 128
    return qwen2.Qwen2Config.tiny(
        vocab_size=vocab, hidden_size=policy.hidden_size, intermediate_size=policy.intermediate_size,
        num_hidden_layers=policy.num_hidden_layers, num_attention_heads=policy.num_attention_heads,
        num_key_value_heads=policy.num_key_value_heads, tie_word_embeddings=True, **overrides,
    )


def param_shardings(model_config: qwen2.Qwen2Config, mesh: Mesh, rules: sharding.Rules | None = None) -> Any:
    """NamedShardings of the policy's params from their logical axes."""
    abstract = jax.eval_shape(functools.partial(qwen2.init_params, model_config), jax.random.PRNGKey(0))
    return sharding.logical_shardings(abstract, mesh, rules)


def load_params(
    policy: ml_collections.ConfigDict, model_config: qwen2.Qwen2Config, mesh: Mesh, seed: int,
    rules: sharding.Rules | None = None,
) -> Any:
    """The HF checkpoint's weights loaded into their shardings, or a random init (PRNGKey(seed)), sharded."""
    if policy.hf_dir:
        _, params = hf_import.load_qwen2(policy.hf_dir, shardings=param_shardings(model_config, mesh, rules))
        return params
    init = functools.partial(qwen2.init_params, model_config)
    params, _ = sharding.sharded_init(init, jax.random.PRNGKey(seed), mesh=mesh, rules=rules)
    return params


def build_policy(
    policy: ml_collections.ConfigDict, world: qa.QAWorld | None, mesh: Mesh, seed: int
) -> tuple[qwen2.Qwen2Config, Any, Any]:
    """(qwen2 config, sharded params, tokenizer) from `policy.hf_dir`, or the untrained embedded tiny policy."""
    tokenizer = build_tokenizer(policy, world)
    model_config = build_model_config(policy, tokenizer)
    return model_config, load_params(policy, model_config, mesh, seed), tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_apply_fn(model_config: qwen2.Qwen2Config) -> sampling.ApplyFn:
    """`(params, tokens, positions, mask, cache) -> (logits, cache)` of the Qwen2 LM."""
    model = qwen2.Qwen2LM(model_config)

    def apply_fn(p: Any, tokens: jax.Array, positions: jax.Array, mask: jax.Array, cache: Any):
        return model.apply({"params": p}, tokens, positions, mask, cache)

    return apply_fn


def make_sampler(
    model_config: qwen2.Qwen2Config, pad_id: int, mesh: Mesh, *, rules: sharding.Rules | None = None,
    prompt_buckets: Sequence[int] | None = None, new_token_buckets: Sequence[int] | None = None,
) -> sampling.Sampler:
    """The policy's KV-cache sampler over `mesh` (default buckets unless given)."""
    fields: dict[str, Any] = {"pad_id": pad_id}
    if prompt_buckets:
        fields["prompt_buckets"] = tuple(prompt_buckets)
    if new_token_buckets:
        fields["new_token_buckets"] = tuple(new_token_buckets)
    init_cache = functools.partial(qwen2.init_cache, model_config)
    return sampling.Sampler(make_apply_fn(model_config), init_cache, sampling.SamplerConfig(**fields), mesh=mesh,
                            rules=rules)

