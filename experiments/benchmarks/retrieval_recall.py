r"""Retrieval quality on the embedded Wikipedia QA world: BM25 vs dense (all-MiniLM-L6-v2), side by side.

For every question of a split, recall@k of the gold article(s): a hit when one of the top-k passages belongs to a
gold article (for 2-hop questions, reported both as "any" gold article and "all" gold articles within the top k).
Also the time to index the corpus and to answer the queries, and the dense / BM25 ratio of each.

    python -m experiments.benchmarks.retrieval_recall --out=runs/benchmarks/retrieval_recall.json
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from jax_hd.data import qa
from jax_hd.retrieval import Retriever, bm25, dense

_OUT = flags.DEFINE_string("out", "runs/benchmarks/retrieval_recall.json", "Where to write the JSON results.")
_SPLIT = flags.DEFINE_string("split", "test", "Question split.")
_TOPK = flags.DEFINE_list("topk", ["1", "3", "10"], "k values for recall@k.")
_SEED = flags.DEFINE_integer("world_seed", 0, "Seed of the embedded QA world.")


def recall(retriever: Retriever, examples: list[qa.QAExample], article_of: dict[str, str], ks: list[int]):
    """({f"R@{k}": any-gold recall, f"R@{k}_all": all-gold recall} in percent, query seconds)."""
    start = time.perf_counter()
    results = retriever.search([ex.question for ex in examples], max(ks))
    seconds = time.perf_counter() - start
    out = {}
    for k in ks:
        any_hits = all_hits = 0
        for ex, passages in zip(examples, results, strict=True):
            found = {article_of[p.id] for p in passages[:k]}
            gold = set(ex.gold_article_ids)
            any_hits += bool(found & gold)
            all_hits += gold <= found
        out[f"R@{k}"] = 100.0 * any_hits / len(examples)
        out[f"R@{k}_all"] = 100.0 * all_hits / len(examples)
    return out, seconds


def main(argv: list[str]) -> None:
    del argv
    ks = [int(k) for k in _TOPK.value]
    world = qa.embedded_qa_world(_SEED.value)
    examples = world.splits[_SPLIT.value]
    article_of = {p.id: p.article_id for p in world.corpus}
    corpus = bm25.Corpus(tuple(p.id for p in world.corpus), tuple(p.contents for p in world.corpus))
    rows = {}
    for name in ("bm25", "dense"):
        start = time.perf_counter()
        if name == "bm25":
            index = bm25.BM25Index.build(corpus)
        else:
            index = dense.DenseIndex.build(dense.Encoder.minilm(), corpus)
        index_seconds = time.perf_counter() - start
        metrics, query_seconds = recall(index, examples, article_of, ks)
        rows[name] = {**metrics, "index_seconds": index_seconds, "query_seconds": query_seconds}
        for hops in (1, 2):
            subset = [ex for ex in examples if ex.hops == hops]
            if subset:
                by_hops, _ = recall(index, subset, article_of, ks)
                rows[name].update({f"{hops}hop/{key}": value for key, value in by_hops.items()})
    ratios = {f"dense_over_bm25/{key}": rows["dense"][key] / rows["bm25"][key]
              for key in ("index_seconds", "query_seconds") if rows["bm25"][key] > 0}
    single, double = sum(ex.hops == 1 for ex in examples), sum(ex.hops == 2 for ex in examples)
    print(f"embedded world (seed {_SEED.value}): {len(world.corpus)} passages, {len(examples)} {_SPLIT.value} "
          f"questions ({single} single-hop, {double} 2-hop)")
    header = ["retriever", *(f"R@{k}" for k in ks), *(f"R@{k}_all" for k in ks), "index s", "query s"]
    print(" | ".join(header))
    for name, row in rows.items():
        cells = [name, *(f"{row[f'R@{k}']:.1f}" for k in ks), *(f"{row[f'R@{k}_all']:.1f}" for k in ks),
                 f"{row['index_seconds']:.1f}", f"{row['query_seconds']:.2f}"]
        print(" | ".join(cells))
    print("ratios: " + ", ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"num_passages": len(world.corpus), "split": _SPLIT.value, "num_questions": len(examples),
                   "rows": rows, "ratios": ratios, "world_stats": world.stats}, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
