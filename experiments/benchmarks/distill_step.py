r"""Cost of OneSearch-V2 self-distillation: per-step wall time of the plain SFT step vs the distillation step.

Three jitted steps on the same model (the config's stage-3 generator, random init) and the same random batch
(student prompts, teacher prompts with a keyword clause, memory, item-SID labels), side by side in one run:
  sft   `trainer.make_train_step` (plain CE),
  kl    `distill.make_distill_step`, mode "self", KL only (one extra teacher forward, no gradient),
  full  KL + R-Drop (a second student pass) + FGM (gradient w.r.t. the prompt embeddings, a perturbed pass) +
        focal loss, the paper's values (0.1, 0.5, 0.6, gamma 3 / scale 2).
One untimed step of each compiles first; the timed steps are interleaved (sft, kl, full, sft, ...) so a change of
machine load hits all alike. Reported: mean and median seconds per step and the ratios to sft (the spec estimates
about 3-3.5x for the full step).

    python -m experiments.benchmarks.distill_step --config=experiments/configs/onesearch.py:cpu_demo \
        --out=runs/benchmarks/distill_step.json
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import linen as nn
from ml_collections import config_flags

from jax_hd.core import config as config_lib
from jax_hd.core import metrics, sharding, train_state
from jax_hd.onesearch import distill, trainer
from jax_hd.onesearch import model as model_lib

VARIANTS = ("sft", "kl", "full")


def define_flags() -> dict[str, Any]:
    """The benchmark's flags (defined only when run as a program, so the module stays importable)."""
    return {
        "config": config_flags.DEFINE_config_file(
            "config", "experiments/configs/onesearch.py:cpu_demo", "Trainer config file and preset.", lock_config=True
        ),
        "steps": flags.DEFINE_integer("steps", 10, "Timed steps per variant."),
        "batch_size": flags.DEFINE_integer("batch_size", 0, "Global batch (0: trainer.batch_size of the config)."),
        "text_vocab": flags.DEFINE_integer("text_vocab", 2000, "Text tokens of the synthetic vocabulary."),
        "out": flags.DEFINE_string("out", "runs/benchmarks/distill_step.json", "Where to write the JSON results."),
    }


def synthetic_setup(config: Any, text_vocab: int) -> tuple[model_lib.Vocab, model_lib.OneSearchConfig, int, int]:
    """A vocabulary with the config's SID levels and the generator config; returns (vocab, model config, student
    prompt length, teacher prompt length)."""
    s, lay = config.sid, config.layout
    levels = tuple(s.rq_sizes) + ((s.opq_codebook_size,) * s.opq_subspaces if s.use_opq else ())
    vocab = model_lib.Vocab(text_vocab, levels, tuple(int(x) for x in np.cumsum((0,) + levels[:-1])))
    layout = model_lib.LayoutConfig(
        max_query_tokens=lay.max_query_tokens, max_recent=lay.max_recent, recent_query_tokens=lay.recent_query_tokens,
        num_memory=lay.num_memory, max_task_tokens=lay.max_task_tokens,
    )  # fmt: skip
    input_len = layout.input_length(len(levels))
    teacher_len = input_len + lay.max_keyword_tokens + 1
    model_config = trainer.build_model_config(config, vocab, s.embed_dim, teacher_len)
    return vocab, model_config, input_len, teacher_len


def synthetic_batch(
    vocab: model_lib.Vocab, model_config: model_lib.OneSearchConfig, batch: int, input_len: int, teacher_len: int
) -> dict[str, np.ndarray]:
    """Random prompts (real length 60-100 % of `input_len`, `[MEM]` slots included); the teacher's prompt is the
    student's plus up to `teacher_len - input_len` keyword tokens; labels: one item SID per row."""
    rng = np.random.default_rng(0)
    keyword_budget = teacher_len - input_len
    student, teacher = [], []
    for _ in range(batch):
        n = int(rng.integers(int(0.6 * input_len), input_len + 1))
        row = rng.integers(1, vocab.text_vocab_size, n).astype(np.int32)
        row[1 : 1 + model_config.num_memory] = model_config.mem_token_id
        student.append(row)
        teacher.append(np.concatenate([row, rng.integers(1, vocab.text_vocab_size, keyword_budget)]).astype(np.int32))
    input_ids, input_mask = model_lib.pad_rows(student, input_len)
    teacher_ids, teacher_mask = model_lib.pad_rows(teacher, teacher_len)
    codes = np.stack([rng.integers(0, size, batch) for size in vocab.level_sizes], axis=1)
    labels = vocab.sid_tokens(codes)
    return {
        "input_ids": input_ids,
        "input_mask": input_mask,
        "teacher_input_ids": teacher_ids,
        "teacher_input_mask": teacher_mask,
        "memory": rng.normal(size=(batch, model_config.num_memory_vectors, model_config.memory_dim)).astype(np.float32),
        "labels": labels,
        "label_mask": np.ones_like(labels, bool),
    }


def benchmark(config: Any, steps: int, batch_size: int, text_vocab: int, out: str) -> dict[str, Any]:
    """Runs the comparison (module docstring), prints the table, writes `out`; returns the JSON payload."""
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.normalize_rules(config.sharding_rules)
    batch_size = batch_size or config.trainer.batch_size
    vocab, model_config, input_len, teacher_len = synthetic_setup(config, text_vocab)
    if distill.model_dropout(model_config) <= 0:
        raise config_lib.ConfigError("R-Drop in the 'full' variant needs model.dropout > 0")
    local = synthetic_batch(vocab, model_config, batch_size, input_len, teacher_len)
    tx = trainer.make_optimizer(config)
    shardings = trainer.state_shardings(model_config, tx, mesh, rules)
    cfgs = {
        "kl": distill.DistillConfig(mode="self", kl_weight=0.1),
        "full": distill.DistillConfig(
            mode="self", kl_weight=0.1, rdrop_weight=0.5, fgm_epsilon=0.6, focal_gamma=3.0, focal_scale=2.0
        ),
    }
    step_fns = {"sft": trainer.make_train_step(model_config, tx, shardings, mesh)}
    step_fns.update({k: distill.make_distill_step(model_config, tx, shardings, mesh, c) for k, c in cfgs.items()})
    params = jax.device_get(trainer.init_model_params(model_config, config.seed, mesh, rules))

    def build(p, r):
        return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r, extra={})

    lr = np.float32(config.trainer.lr)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    last_metrics: dict[str, dict[str, float]] = {}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        init = jax.jit(build, out_shardings=shardings)
        states = {k: init(params, jax.random.PRNGKey(config.seed)) for k in VARIANTS}
        batches = {
            "sft": sharding.shard_batch({k: v for k, v in local.items() if not k.startswith("teacher_")}, mesh),
            "distill": sharding.shard_batch(local, mesh),
        }
        compile_seconds = {}
        for i in range(steps + 1):  # step 0 compiles
            for k in VARIANTS:
                start = time.perf_counter()
                states[k], m = step_fns[k](states[k], batches["sft" if k == "sft" else "distill"], lr)
                jax.block_until_ready((states[k], m))
                seconds = time.perf_counter() - start
                if i == 0:
                    compile_seconds[k] = seconds
                else:
                    times[k].append(seconds)
                last_metrics[k] = {name: float(v) for name, v in jax.device_get(m).items()}
    summary = {k: {"mean_s": float(np.mean(v)), "median_s": float(np.median(v))} for k, v in times.items()}
    ratios = {k: summary[k]["median_s"] / summary["sft"]["median_s"] for k in VARIANTS}
    params_m = model_lib.param_count(params) / 1e6
    print(
        f"model: {model_config.backbone}, {params_m:.2f}M params; batch {batch_size}; student/teacher prompt "
        f"{input_len}/{teacher_len} tokens; {jax.device_count()} device(s); {steps} timed steps per variant"
    )
    print(f"{'variant':>8} {'mean s':>9} {'median s':>9} {'x sft':>7} {'compile s':>10}")
    for k in VARIANTS:
        s = summary[k]
        print(f"{k:>8} {s['mean_s']:>9.4f} {s['median_s']:>9.4f} {ratios[k]:>7.2f} {compile_seconds[k]:>10.1f}")
    payload = {
        "config": config.preset,
        "devices": jax.device_count(),
        "batch_size": batch_size,
        "input_len": input_len,
        "teacher_len": teacher_len,
        "params_millions": params_m,
        "timed_steps": steps,
        "distill_configs": {k: vars(c) for k, c in cfgs.items()},
        "summary": summary,
        "ratio_median_vs_sft": ratios,
        "first_step_seconds": compile_seconds,
        "last_metrics": last_metrics,
        "step_seconds": times,
    }
    metrics.write_json(out, payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    _FLAGS = define_flags()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        metrics.quiet_library_logs()
        benchmark(
            _FLAGS["config"].value, _FLAGS["steps"].value, _FLAGS["batch_size"].value, _FLAGS["text_vocab"].value,
            _FLAGS["out"].value,
        )  # fmt: skip

    app.run(main, flags_parser=config_lib.parse_flags)
