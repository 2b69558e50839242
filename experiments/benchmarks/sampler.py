r"""Generation speed: our KV-cache sampler vs HF PyTorch `generate`, same weights, side by side.

A ~50M-parameter Qwen2 config with random weights is created in Flax, written as an HF checkpoint and
loaded by `transformers.Qwen2ForCausalLM`; both then decode greedily `--new_tokens` tokens (no early stop)
after a `--prompt_len`-token prompt, for each batch size. Reported per batch size: tokens/s of each, the
ratio ours / HF, and the decode phase's achieved memory bandwidth (parameter bytes + KV-cache bytes read per
step, over the decode time) against a numpy copy bandwidth measured on this machine.

    python -m experiments.benchmarks.sampler --out=runs/benchmarks/sampler.json
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

from jax_hd.decoding import sampling
from jax_hd.models import hf_import, qwen2

_OUT = flags.DEFINE_string("out", "runs/benchmarks/sampler.json", "Where to write the JSON results.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "32"], "Batch sizes to measure.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Tokens generated per row.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions (the best is reported).")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0: the number of cores).")


def benchmark_config() -> qwen2.Qwen2Config:
    """About 50M parameters: 32k vocabulary (tied), 12 layers of width 512, GQA 8/2 heads."""
    return qwen2.Qwen2Config(
        vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
        max_position_embeddings=4096,
    )


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(num_bytes: int = 1 << 28) -> float:
    """Bytes/s of a large numpy copy (read + write counted)."""
    src = np.ones(num_bytes // 4, np.float32)
    dst = np.empty_like(src)
    seconds = best_time(lambda: np.copyto(dst, src), 5)
    return 2 * src.nbytes / seconds


def generate_ours(sampler: sampling.Sampler, params, prompts: np.ndarray, max_new: int) -> None:
    out = sampler.generate(params, prompts.tolist(), max_new_tokens=max_new, rng=jax.random.PRNGKey(0))
    assert int(out.lengths.min()) == max_new


def generate_hf(hf_model, prompts: np.ndarray, max_new: int) -> None:
    import torch

    tokens = torch.from_numpy(prompts)
    with torch.no_grad():
        out = hf_model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=max_new,
                                min_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == prompts.shape[1] + max_new


def main(argv: list[str]) -> None:
    del argv
    import torch
    import transformers

    torch.set_num_threads(_THREADS.value or os.cpu_count() or 1)
    config = benchmark_config()
    params = nn.unbox(qwen2.init_params(config, jax.random.PRNGKey(0)))
    num_params = qwen2.param_count(params)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory() as hf_dir:
        hf_import.save_qwen2(hf_dir, config, params)
        hf_model = transformers.Qwen2ForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()

    model = qwen2.Qwen2LM(config)

    def apply_fn(p, tokens, positions, mask, cache):
        return model.apply({"params": p}, tokens, positions, mask, cache)

    new_tokens, prompt_len = _NEW_TOKENS.value, _PROMPT_LEN.value
    sampler_config = sampling.SamplerConfig(prompt_buckets=(prompt_len,), new_token_buckets=(1, new_tokens))
    sampler = sampling.Sampler(apply_fn, functools.partial(qwen2.init_cache, config), sampler_config)
    bandwidth = copy_bandwidth()
    rows = []
    print(f"Qwen2 {num_params / 1e6:.1f}M params, prompt {prompt_len}, {new_tokens} new tokens, greedy; "
          f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); numpy copy bandwidth {bandwidth / 1e9:.2f} GB/s")
    print(f"{'batch':>5} {'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6} {'decode GB/s':>11} {'of copy':>7}")
    for batch in (int(b) for b in _BATCH_SIZES.value):
        prompts = np.random.default_rng(batch).integers(1, config.vocab_size, (batch, prompt_len))

        ours = functools.partial(generate_ours, sampler, params, prompts)
        hf = functools.partial(generate_hf, hf_model, prompts)
        ours(1), ours(new_tokens)  # Compile both programs.
        hf(2)
        ours_total = best_time(functools.partial(ours, new_tokens), _REPEATS.value)
        ours_prefill = best_time(functools.partial(ours, 1), _REPEATS.value)
        hf_total = best_time(functools.partial(hf, new_tokens), _REPEATS.value)
        decode_seconds = max(ours_total - ours_prefill, 1e-9)
        cache_len = prompt_len + new_tokens
        cache_bytes = 2 * config.num_hidden_layers * batch * cache_len * config.num_key_value_heads * (
            config.head_dim * 4)
        achieved = (new_tokens - 1) * (param_bytes + cache_bytes) / decode_seconds
        row = {
            "batch": batch,
            "ours_tokens_per_sec": batch * new_tokens / ours_total,
            "hf_tokens_per_sec": batch * new_tokens / hf_total,
            "ours_seconds": ours_total,
            "hf_seconds": hf_total,
            "ours_prefill_plus_one_seconds": ours_prefill,
            "decode_bytes_per_step": param_bytes + cache_bytes,
            "decode_bandwidth_bytes_per_sec": achieved,
        }
        row["ratio_ours_over_hf"] = row["ours_tokens_per_sec"] / row["hf_tokens_per_sec"]
        row["decode_bandwidth_fraction_of_copy"] = achieved / bandwidth
        rows.append(row)
        print(f"{batch:>5} {row['ours_tokens_per_sec']:>11.1f} {row['hf_tokens_per_sec']:>9.1f} "
              f"{row['ratio_ours_over_hf']:>6.2f} {achieved / 1e9:>11.2f} {achieved / bandwidth:>7.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"num_params": num_params, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "copy_bandwidth_bytes_per_sec": bandwidth, "jax": jax.__version__, "torch": torch.__version__,
                   "rows": rows}, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
