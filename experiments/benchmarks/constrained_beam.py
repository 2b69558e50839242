r"""Constrained beam search over semantic IDs: ours (jit, prefix-tree tables) vs HF `generate` with a Python trie.

A small Qwen2 config with random weights is created in Flax, written as an HF checkpoint and loaded by
`transformers.Qwen2ForCausalLM`, so both decoders run the SAME weights. For each catalogue size (random
fixed-length codes: 3 levels of 32 codes at 10k items, 4 levels of 64 codes above; every level its own token
namespace after 256 "text" tokens), it reports:

* the prefix index: build seconds, bytes, bytes per item, per-level branching bounds (and the Python trie's
  build seconds);
* seconds per batch of our constrained beam search, of our unconstrained beam search (the constraint's
  overhead ratio), and of HF `generate(num_beams=..., prefix_allowed_tokens_fn=...)` (ratio HF / ours; HF
  without the constraint too, for its own overhead ratio);
* agreement of the top beams with HF's (rows whose top-2 scores are closer than `--tie_gap` are counted
  apart: float differences can swap near-ties), the beam-set overlap and the largest score difference;
* the valid-ID rate of our unconstrained search (what unconstrained decoding would emit).

    python -m experiments.benchmarks.constrained_beam --out=runs/benchmarks/constrained_beam.json
    python -m experiments.benchmarks.constrained_beam --quick   # well under 2 minutes on CPU
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import linen as nn

from jax_hd.decoding import beam_search as bs
from jax_hd.decoding import prefix_tree as pt
from jax_hd.models import hf_import, qwen2

_OUT = flags.DEFINE_string("out", "runs/benchmarks/constrained_beam.json", "Where to write the JSON results.")
_NUM_ITEMS = flags.DEFINE_list("num_items", ["10000", "1000000"], "Catalogue sizes (valid IDs).")
_BATCH = flags.DEFINE_integer("batch", 4, "Prompts per batch.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 16, "Beams per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is reported).")
_DENSE_LEVELS = flags.DEFINE_integer("dense_levels", 2, "Leading levels with dense transition tables.")
_TIE_GAP = flags.DEFINE_float("tie_gap", 1e-3, "Top-2 score gap below which a row counts as a near-tie.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: the number of cores).")
_QUICK = flags.DEFINE_bool("quick", False, "Small run: batch 2, 8 beams, 1 repetition.")

TEXT_TOKENS = 256


def level_sizes(num_items: int) -> tuple[int, ...]:
    return (32, 32, 32) if num_items <= 10_000 else (64, 64, 64, 64)


def benchmark_config() -> qwen2.Qwen2Config:
    """~0.5M parameters, vocabulary: 256 text tokens + 256 semantic-ID tokens."""
    return qwen2.Qwen2Config(
        vocab_size=TEXT_TOKENS + 256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=False,
        max_position_embeddings=512,
    )  # fmt: skip


def random_params(config: qwen2.Qwen2Config, seed: int = 0):
    """Random weights (std 0.1: peaked enough next-token distributions that exact ties are rare)."""
    shapes = nn.unbox(jax.eval_shape(functools.partial(qwen2.init_params, config), jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            np.ones(x.shape, np.float32)
            if path[-1].key == "scale"
            else rng.normal(0.0, 0.1, x.shape).astype(np.float32)
        ),
        shapes,
    )


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def python_trie(sequences: np.ndarray) -> dict[tuple[int, ...], list[int]]:
    """prefix (token tuple) -> sorted allowed next tokens, the usual `prefix_allowed_tokens_fn` back end."""
    children: dict[tuple[int, ...], set[int]] = {}
    for row in sequences.tolist():
        for level in range(len(row)):
            children.setdefault(tuple(row[:level]), set()).add(row[level])
    return {prefix: sorted(tokens) for prefix, tokens in children.items()}


def hf_beam_search(model, prompts: np.ndarray, num_beams: int, num_levels: int, trie=None):
    """HF beam search; returns (sequences [batch, beams, levels], scores [batch, beams]) as numpy."""
    import torch

    prompt_len = prompts.shape[1]

    def allowed(batch_id: int, input_ids) -> list[int]:
        return trie.get(tuple(input_ids[prompt_len:].tolist()), [])

    ids = torch.from_numpy(prompts)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), num_beams=num_beams, num_return_sequences=num_beams,
            max_new_tokens=num_levels, do_sample=False, length_penalty=0.0, early_stopping=True, pad_token_id=0,
            eos_token_id=None, prefix_allowed_tokens_fn=allowed if trie is not None else None,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    batch = prompts.shape[0]
    sequences = out.sequences[:, prompt_len:].numpy().reshape(batch, num_beams, num_levels)
    return sequences, out.sequences_scores.numpy().reshape(batch, num_beams)


def agreement(ours, hf_sequences: np.ndarray, hf_scores: np.ndarray, tie_gap: float) -> dict[str, float]:
    """Top-1 agreement on rows without a near-tie, beam-set overlap, largest score gap on shared beams."""
    top_agree, ties, overlap, score_diff = [], 0, [], 0.0
    for b in range(hf_sequences.shape[0]):
        near_tie = (ours.scores[b, 0] - ours.scores[b, 1] < tie_gap) or (hf_scores[b, 0] - hf_scores[b, 1] < tie_gap)
        ties += int(near_tie)
        if not near_tie:
            top_agree.append(np.array_equal(ours.sequences[b, 0], hf_sequences[b, 0]))
        beams = zip(ours.sequences[b].tolist(), ours.scores[b], ours.valid[b], strict=True)
        ours_set = {tuple(s): float(v) for s, v, ok in beams if ok}
        hf_set = {tuple(s): float(v) for s, v in zip(hf_sequences[b].tolist(), hf_scores[b], strict=True)}
        shared = ours_set.keys() & hf_set.keys()
        overlap.append(len(shared) / len(hf_set))
        score_diff = max([score_diff] + [abs(ours_set[s] - hf_set[s]) for s in shared])
    return {
        "top1_agreement": float(np.mean(top_agree)) if top_agree else float("nan"),
        "rows_compared": len(top_agree),
        "near_tie_rows": ties,
        "beam_set_overlap": float(np.mean(overlap)),
        "max_abs_score_diff_shared_beams": score_diff,
    }


def main(argv: list[str]) -> None:
    del argv
    import torch
    import transformers

    torch.set_num_threads(_THREADS.value or os.cpu_count() or 1)
    batch, num_beams, repeats = _BATCH.value, _NUM_BEAMS.value, _REPEATS.value
    if _QUICK.value:
        batch, num_beams, repeats = 2, 8, 1
    config = benchmark_config()
    params = random_params(config)
    with tempfile.TemporaryDirectory() as hf_dir:
        hf_import.save_qwen2(hf_dir, config, params)
        hf_model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    search = jax.jit(functools.partial(bs.qwen2_beam_search, config), static_argnames=("num_beams", "num_levels"))
    prompts = np.random.default_rng(1).integers(1, TEXT_TOKENS, (batch, _PROMPT_LEN.value)).astype(np.int32)
    mask = np.ones(prompts.shape, bool)
    print(f"Qwen2 {qwen2.param_count(params) / 1e6:.2f}M params (random), batch {batch}, {num_beams} beams, "
          f"prompt {prompts.shape[1]}; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")  # fmt: skip
    rows = []
    for num_items in (int(n) for n in _NUM_ITEMS.value):
        sizes = level_sizes(num_items)
        codes = np.random.default_rng(num_items).integers(0, sizes[0], (num_items, len(sizes)))
        start = time.perf_counter()
        tree = pt.build_prefix_tree(
            codes,
            sizes,
            level_offsets=pt.default_offsets(sizes, TEXT_TOKENS),
            vocab_size=config.vocab_size,
            dense_levels=min(_DENSE_LEVELS.value, len(sizes)),
        )
        build_seconds = time.perf_counter() - start
        sequences = codes + np.asarray(tree.level_offsets)
        start = time.perf_counter()
        trie = python_trie(np.unique(sequences, axis=0))
        trie_seconds = time.perf_counter() - start
        levels = tree.num_levels

        def ours(tree=tree, levels=levels):
            return jax.block_until_ready(search(params, prompts, mask, num_beams=num_beams, tree=tree))

        def ours_free(levels=levels):
            return jax.block_until_ready(search(params, prompts, mask, num_beams=num_beams, num_levels=levels))

        def hf(trie=trie, levels=levels):
            return hf_beam_search(hf_model, prompts, num_beams, levels, trie)

        def hf_free(levels=levels):
            return hf_beam_search(hf_model, prompts, num_beams, levels)

        constrained, free, (hf_sequences, hf_scores) = ours(), ours_free(), hf()  # Compile / warm up.
        constrained, free = jax.device_get(constrained), jax.device_get(free)
        seconds = {
            name: best_time(fn, repeats)
            for name, fn in (("ours", ours), ("ours_free", ours_free), ("hf", hf), ("hf_free", hf_free))
        }
        row = {
            "num_items": num_items,
            "level_sizes": list(sizes),
            "num_leaves": tree.num_leaves,
            "max_branch": list(tree.max_branch),
            "dense_levels": tree.dense_levels,
            "index_bytes": pt.num_bytes(tree),
            "index_bytes_per_item": pt.bytes_per_item(tree),
            "index_build_seconds": build_seconds,
            "python_trie_build_seconds": trie_seconds,
            "ours_constrained_seconds": seconds["ours"],
            "ours_unconstrained_seconds": seconds["ours_free"],
            "hf_constrained_seconds": seconds["hf"],
            "hf_unconstrained_seconds": seconds["hf_free"],
            "constraint_overhead_ratio": seconds["ours"] / seconds["ours_free"],
            "hf_constraint_overhead_ratio": seconds["hf"] / seconds["hf_free"],
            "hf_over_ours_ratio": seconds["hf"] / seconds["ours"],
            "ours_valid_beams_fraction": float(constrained.valid.mean()),
            "ours_constrained_valid_id_rate": float(pt.valid_id_rate(constrained.sequences, tree)),
            "unconstrained_valid_id_rate": float(pt.valid_id_rate(free.sequences, tree)),
            "hf_valid_id_rate": float(pt.valid_id_rate(hf_sequences, tree)),
            **agreement(constrained, hf_sequences, hf_scores, _TIE_GAP.value),
        }
        rows.append(row)
        print(
            f"{num_items:>8} items {sizes}: index {row['index_bytes'] / 1e6:.2f} MB "
            f"({row['index_bytes_per_item']:.1f} B/item, built in {build_seconds:.2f}s; Python trie "
            f"{trie_seconds:.2f}s), max branch {row['max_branch']}"
        )
        print(f"         ours {seconds['ours'] * 1e3:.1f} ms, unconstrained {seconds['ours_free'] * 1e3:.1f} ms "
              f"(overhead x{row['constraint_overhead_ratio']:.2f}), HF {seconds['hf'] * 1e3:.1f} ms "
              f"(HF / ours x{row['hf_over_ours_ratio']:.2f}; HF unconstrained {seconds['hf_free'] * 1e3:.1f} ms, "
              f"overhead x{row['hf_constraint_overhead_ratio']:.2f}); top-1 agreement {row['top1_agreement']:.2f} on "
              f"{row['rows_compared']} rows ({row['near_tie_rows']} near-ties), beam overlap "
              f"{row['beam_set_overlap']:.2f}, max score diff {row['max_abs_score_diff_shared_beams']:.1e}; "
              f"valid-ID rate unconstrained {row['unconstrained_valid_id_rate']:.2f}, "
              f"constrained {row['ours_constrained_valid_id_rate']:.2f}")  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"num_params": qwen2.param_count(params), "batch": batch, "num_beams": num_beams,
                   "prompt_len": prompts.shape[1], "jax": jax.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__, "rows": rows}, f, indent=2)  # fmt: skip
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
