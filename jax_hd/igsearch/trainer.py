"""The IG-Search trainer: GRPO with per-step information-gain credit on the search-query tokens.

One GRPO step (an "iteration"; spec 4.2-4.4, 9):

1. the next `prompts_per_step` train questions (a grain iterator, checkpointed) are rolled out `group_size` times
   each with the current params (multi-turn search rollouts, `rollout.run_rollouts`);
2. outcome rewards (`rewards.score_outcome`: F1 + refine bonus by default, AutoRefine's recipe);
3. IG of every valid search step (`info_gain.compute_info_gain`) with the same, rollout-time, params; off with
   `ig.enabled=False` (the trajectory-level baseline);
4. old log-probs (the rollout-time params, once per rollout batch) and reference log-probs (the frozen reference
   policy, carried in `TrainState.extra["ref_params"]`);
5. group advantages + IG modulation of the query tokens (`grpo.token_advantages`), then one epoch of clipped
   GRPO updates over mini-batches of `mini_batch_size` sequences, each a jitted, sharded step (donated state,
   fixed in/out shardings, optional gradient accumulation over `micro_batch_size` rows, and an `isfinite` gate
   that skips an update whose loss or gradients are NaN/inf).

Determinism: every random choice comes from checkpointed state. The rollout key is
`fold_in(state.rng, iteration)` with `iteration = state.step // updates_per_step` (the optimizer step counts every
mini-batch, skipped ones included), the IG pool draws use `numpy.random.default_rng([ig.seed, iteration])`, and
the prompt iterator is saved with the state. So a run killed at any point and resumed from its last checkpoint
reproduces the uninterrupted run.

Warm start (embedded default): a tiny policy trained from scratch does not know the format, so before GRPO it is
trained with next-token cross-entropy on expert trajectories (`experts.py`), in its own phase with its own
checkpoints (`<workdir>/warm_start/`). The reference policy is the params GRPO starts from (after the warm start,
or the HF checkpoint), frozen.

Multi-host: every process rolls out the whole batch (same params, same keys: identical rollouts); each device then
receives its rows of the packed arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh

from jax_hd.core import checkpoint, metrics, sharding, train_state
from jax_hd.core import config as config_lib
from jax_hd.core.metrics import read_json, write_json
from jax_hd.data import qa
from jax_hd.data.tokenizer import AGENT_TAGS
from jax_hd.decoding import sampling
from jax_hd.igsearch import evaluate, experts, grpo, info_gain, rewards, rollout, setup
from jax_hd.models import qwen2

# Keys of the arrays each jitted step takes, all `[batch, ...]` and sharded over data x fsdp.
SEQUENCE_KEYS = ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask")
SFT_KEYS = (*SEQUENCE_KEYS, "loss_mask")
GRPO_KEYS = (*SFT_KEYS, "old_logprobs", "ref_logprobs", "advantages")

F = config_lib.Field
SCHEMA = {
    "seed": F(int, low=0),
    "jax_cache_dir": F(str),
    "mesh.data": F(int, low=-1),
    "mesh.fsdp": F(int, low=-1),
    "mesh.tensor": F(int, low=-1),
    "distributed.mode": F(str, choices=("auto", "always", "never")),
    "data.source": F(str, choices=("embedded", "search_r1")),
    "data.world": F(str, choices=setup.WORLDS),
    "data.world_seed": F(int, low=0),
    "data.max_train_questions": F(int),
    "data.eval_split": F(str),
    "data.max_eval_questions": F(int),
    "retrieval.backend": F(str, choices=("bm25", "dense", "http")),
    "retrieval.timeout_s": F(float, positive=True),
    "retrieval.max_retries": F(int, low=0),
    "policy.tokenizer": F(str, choices=("bpe", "word")),
    "policy.word_titles": F(bool),
    "policy.copy_head": F(bool),
    "policy.tokenizer_vocab_size": F(int, low=300),
    "policy.use_chat_template": F(bool),
    "policy.logits_chunk_size": F(int, low=0),
    "rollout.dialect": F(str, choices=tuple(rollout.PROMPT_TEMPLATES)),
    "rollout.max_turns": F(int, positive=True),
    "rollout.topk": F(int, positive=True),
    "rollout.max_segment_tokens": F(int, positive=True),
    "rollout.max_observation_tokens": F(int, positive=True),
    "rollout.max_response_tokens": F(int, positive=True),
    "rollout.temperature": F(float, positive=True),
    "rollout.top_p": F(float, low=0.0, high=1.0),
    "reward.kind": F(str, choices=("em", "f1")),
    "reward.refine_bonus": F(float, low=0.0),
    "reward.format_bonus": F(float, low=0.0),
    "ig.enabled": F(bool),
    "ig.mode": F(str, choices=("additive", "multiplicative")),
    "ig.transform": F(str, choices=grpo.IG_TRANSFORMS),
    "ig.coef": F(float, low=0.0),
    "ig.clip": F(float, positive=True),
    "ig.n_random": F(int, positive=True),
    "ig.exclude_same_question": F(bool),
    "ig.answer_join": F(str, choices=info_gain.ANSWER_JOINS),
    "ig.max_context_tokens": F(int, positive=True),
    "ig.micro_batch_size": F(int, positive=True),
    "ig.seed": F(int, low=0),
    "grpo.group_size": F(int, positive=True),
    "grpo.clip_eps": F(float, positive=True),
    "grpo.kl_coef": F(float, low=0.0),
    "grpo.entropy_coef": F(float, low=0.0),
    "trainer.steps": F(int, positive=True),
    "trainer.prompts_per_step": F(int, positive=True),
    "trainer.mini_batch_size": F(int, positive=True),
    "trainer.micro_batch_size": F(int, positive=True),
    "trainer.lr": F(float, positive=True),
    "trainer.warmup_steps": F(int, low=0),
    "trainer.weight_decay": F(float, low=0.0),
    "trainer.grad_clip_norm": F(float, positive=True),
    "trainer.max_consecutive_nonfinite": F(int, positive=True),
    "trainer.log_every": F(int, positive=True),
    "trainer.checkpoint_every": F(int, positive=True),
    "trainer.keep_checkpoints": F(int, positive=True),
    "trainer.async_checkpoint": F(bool),
    "warm_start.steps": F(int, low=0),
    "warm_start.num_examples": F(int, positive=True),
    "warm_start.batch_size": F(int, positive=True),
    "warm_start.lr": F(float, positive=True),
    "warm_start.warmup_steps": F(int, low=0),
    "warm_start.max_query_words": F(int, positive=True),
    "warm_start.refine_window_words": F(int, low=0),
    "warm_start.checkpoint_every": F(int, positive=True),
    "warm_start.copy_steps": F(int, low=0),
    "warm_start.copy_batch_size": F(int, positive=True),
    "warm_start.copy_length": F(int, positive=True),
    "warm_start.copy_span": F(int, low=2),
    "warm_start.copy_every": F(int, low=0),
    "warm_start.counterfactual_copies": F(int, low=0),
    "warm_start.counterfactual_only": F(bool),
    "warm_start.multi_hop_fraction": F(float, high=1.0),
    "sampler.row_buckets": F(int, positive=True),
    "eval.batch_size": F(int, positive=True),
    "eval.before_grpo": F(bool),
    "eval.max_turns": F(int, low=0),
}


# ------------------------------------------------------------------------------------------------------------------
# Config checks that span several fields.


def check_config(config: ml_collections.ConfigDict) -> None:
    """`SCHEMA` plus the relations between fields; raises `ConfigError` listing the problem."""
    config_lib.validate(config, SCHEMA)
    t, r = config.trainer, config.rollout
    rollouts = t.prompts_per_step * config.grpo.group_size
    problems = []
    if rollouts % t.mini_batch_size:
        problems.append(f"trainer.prompts_per_step * grpo.group_size = {rollouts} is not a multiple of "
                        f"trainer.mini_batch_size = {t.mini_batch_size}")
    if t.mini_batch_size % t.micro_batch_size:
        problems.append(f"trainer.mini_batch_size = {t.mini_batch_size} is not a multiple of "
                        f"trainer.micro_batch_size = {t.micro_batch_size}")
    if max(t.response_buckets) < r.max_response_tokens:
        problems.append(f"the largest trainer.response_buckets {max(t.response_buckets)} is below "
                        f"rollout.max_response_tokens = {r.max_response_tokens}")
    longest_context = max(t.prompt_buckets) + r.max_response_tokens
    if max(config.sampler.prompt_buckets) < longest_context:
        problems.append(f"the largest sampler.prompt_buckets {max(config.sampler.prompt_buckets)} is below the "
                        f"longest rollout context max(trainer.prompt_buckets) + rollout.max_response_tokens = "
                        f"{longest_context}")
    if max(config.sampler.new_token_buckets) < r.max_segment_tokens:
        problems.append(f"the largest sampler.new_token_buckets {max(config.sampler.new_token_buckets)} is below "
                        f"rollout.max_segment_tokens = {r.max_segment_tokens}")
    if config.warm_start.steps and config.data.source != "embedded":
        problems.append("warm_start.steps > 0 needs data.source = 'embedded' (expert trajectories are built from "
                        "the embedded world)")
    if config.warm_start.counterfactual_only and not config.warm_start.counterfactual_copies:
        problems.append("warm_start.counterfactual_only needs warm_start.counterfactual_copies > 0 (else the warm "
                        "start would train on the original trajectories after all)")
    if problems:
        raise config_lib.ConfigError("invalid config:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------------------------
# Model functions (pure, jittable).


def response_logprobs(
    model: qwen2.Qwen2LM, params: Any, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Log-probability and entropy `[b, R]` of each response token given the prompt and the response before it.

    batch: prompt_tokens/prompt_mask `[b, P]` (left-padded), response_tokens/response_mask `[b, R]`
    (right-padded). One forward over `[b, P + R]`; the output at position `P + j - 1` scores response token j
    (`qwen2.score_tokens`).
    """
    tokens = jnp.concatenate([batch["prompt_tokens"], batch["response_tokens"]], axis=1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], axis=1).astype(bool)
    return qwen2.score_tokens(model, params, tokens, mask, batch["response_tokens"].shape[1], with_entropy=True)


def sft_objective(
    model: qwen2.Qwen2LM, params: Any, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy of the policy tokens (`loss_mask [b, R]`), token mean over the batch."""
    logprobs, entropy = response_logprobs(model, params, batch)
    loss = -grpo.masked_mean(logprobs, batch["loss_mask"])
    return loss, {"sft_loss": loss, "entropy": grpo.masked_mean(entropy, batch["loss_mask"])}


def grpo_objective(
    model: qwen2.Qwen2LM, config: grpo.GRPOConfig, params: Any, batch: Mapping[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped GRPO loss of a mini-batch (`GRPO_KEYS`, all `[b, R]` but the prompt), and its metrics."""
    logprobs, entropy = response_logprobs(model, params, batch)
    return grpo.grpo_loss(logprobs, entropy, batch["old_logprobs"], batch["ref_logprobs"], batch["advantages"],
                          batch["loss_mask"], config)


def _micro_batches(batch: Mapping[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
    """`[b, ...]` -> `[num_micro, b / num_micro, ...]`, micro-batch k = rows k, k + num_micro, ... (strided, so a
    batch sharded in contiguous row blocks gives every device the same share of each micro-batch)."""
    return {k: x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1) for k, x in batch.items()}


def loss_and_grads(
    objective: Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]],
    params: Any,
    batch: Mapping[str, jax.Array],
    num_micro: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(loss, metrics, grads) of `objective`; with `num_micro > 1`, the mean over micro-batches (verl's gradient
    accumulation: each micro-batch is a token mean, then they are averaged)."""
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if num_micro == 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, aux, grads

    def body(total: Any, micro: Mapping[str, jax.Array]) -> tuple[Any, None]:
        (loss, aux), grads = grad_fn(params, micro)
        return jax.tree.map(jnp.add, total, (loss, aux, grads)), None

    micro = _micro_batches(batch, num_micro)
    shapes = jax.eval_shape(lambda p, m: (lambda r: (r[0][0], r[0][1], r[1]))(grad_fn(p, m)), params,
                            jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / num_micro, total)


def make_train_step(
    objective: Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]],
    tx: optax.GradientTransformation,
    state_shardings: train_state.TrainState,
    mesh: Mesh,
    keys: Sequence[str],
    num_micro: int = 1,
) -> Callable[[train_state.TrainState, dict[str, jax.Array]], tuple[train_state.TrainState, dict[str, jax.Array]]]:
    """Jitted `(state, batch) -> (state, metrics)`: grads of `objective(params, batch)`, an `isfinite` gate, one
    optimizer update. State donated, layouts fixed; `batch` holds `keys`, each `[b, ...]` over data x fsdp.
    metrics: the objective's, plus `loss`, `grad_norm` and `skipped` (1.0 when the update was dropped)."""

    def step(state: train_state.TrainState, batch: dict[str, jax.Array]):
        loss, aux, grads = loss_and_grads(objective, state.params, batch, num_micro)
        finite = train_state.all_finite(loss, grads)
        state = train_state.guarded_update(state, grads, tx, finite)
        return state, {**aux, "loss": loss, "grad_norm": optax.tree.norm(grads),
                       "skipped": 1.0 - finite.astype(jnp.float32)}

    batch_shardings = {k: sharding.batch_sharding(mesh, 2) for k in keys}
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings), out_shardings=(state_shardings, None),
                   donate_argnums=0)


def make_logprob_fn(
    model: qwen2.Qwen2LM, param_shardings: Any, mesh: Mesh
) -> Callable[[Any, dict[str, jax.Array]], jax.Array]:
    """Jitted `(params, batch of SEQUENCE_KEYS) -> response log-probs [b, R]` (old and reference log-probs)."""
    rows = sharding.batch_sharding(mesh, 2)
    return jax.jit(lambda params, batch: response_logprobs(model, params, batch)[0],
                   in_shardings=(param_shardings, {k: rows for k in SEQUENCE_KEYS}), out_shardings=rows)


# ------------------------------------------------------------------------------------------------------------------
# Optimizer and state.


def make_optimizer(
    lr: float, *, total_steps: int, warmup_steps: int = 0, schedule: str = "constant", weight_decay: float = 0.01,
    grad_clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999,
) -> optax.GradientTransformation:
    """Grad-norm clipping + AdamW; lr linear warmup then constant (verl's default) or cosine decay."""
    if schedule == "cosine":
        lr_schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, 2))
    elif warmup_steps:
        lr_schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)], [warmup_steps])
    else:
        lr_schedule = optax.constant_schedule(lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip_norm),
                       optax.adamw(lr_schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def state_spec(
    model_config: qwen2.Qwen2Config, tx: optax.GradientTransformation, mesh: Mesh, rules: sharding.Rules,
    with_reference: bool,
) -> tuple[train_state.TrainState, train_state.TrainState]:
    """(abstract state with shardings: a restore target, its shardings: the steps' in/out shardings).

    `extra = {"ref_params": params-shaped}` when `with_reference`, else `{}`."""

    def init_fn(rng: jax.Array) -> tuple[Any, Any]:
        params = qwen2.init_params(model_config, rng)
        return params, ({"ref_params": params} if with_reference else None)

    abstract = train_state.abstract_train_state(init_fn, tx, jax.random.PRNGKey(0), mesh, rules)
    return abstract, jax.tree.map(lambda x: x.sharding, abstract)


def state_from_params(
    params: Any, tx: optax.GradientTransformation, rng: jax.Array, shardings: train_state.TrainState,
    with_reference: bool,
) -> train_state.TrainState:
    """A step-0 state around `params` (fresh optimizer state; a frozen copy as `extra["ref_params"]` when
    `with_reference`), created directly in `shardings`."""

    def build(p: Any, r: jax.Array) -> train_state.TrainState:
        return train_state.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r,
                                      extra={"ref_params": p} if with_reference else {})

    return jax.jit(build, out_shardings=shardings)(params, rng)


# ------------------------------------------------------------------------------------------------------------------
# Host-side batches.


def bucketed_lengths(
    trajectories: Sequence[rollout.Trajectory], prompt_buckets: Sequence[int], response_buckets: Sequence[int]
) -> tuple[int, int]:
    """(prompt_len, response_len): the smallest buckets holding every prompt and every response (>= 1 token)."""
    prompt = max(len(t.prompt_ids) for t in trajectories)
    response = max(max(len(t.response_ids) for t in trajectories), 1)
    return (sampling.bucket(prompt, prompt_buckets, "prompt length"),
            sampling.bucket(response, response_buckets, "response length"))


def pad_rows(batch: Mapping[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
    """Appends all-zero rows (all masks False: they add nothing to any masked mean) up to a multiple of `multiple`."""
    rows = len(next(iter(batch.values())))
    extra = -rows % multiple
    if not extra:
        return dict(batch)
    return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def to_device(batch: Mapping[str, np.ndarray | jax.Array], mesh: Mesh) -> dict[str, jax.Array]:
    """Global `[b, ...]` arrays sharded over data x fsdp. Host arrays hold the whole batch on every process; each
    process contributes its contiguous block of rows. Device arrays pass through."""
    host = {k: np.asarray(v) for k, v in batch.items() if not isinstance(v, jax.Array)}
    out = {k: v for k, v in batch.items() if isinstance(v, jax.Array)}
    if host:
        count, index = jax.process_count(), jax.process_index()
        local = {k: np.array_split(v, count)[index] for k, v in host.items()}
        out.update(sharding.shard_batch(local, mesh))
    return out


def select_rows(batch: Mapping[str, np.ndarray], rows: slice | np.ndarray) -> dict[str, np.ndarray]:
    """The given rows (a slice or an index array) of every `[b, ...]` array."""
    return {k: v[rows] for k, v in batch.items()}


def step_ig_arrays(result: info_gain.IGResult, batch: int, max_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """IGResult -> (step_ig `[batch, max_steps]` float32, step_mask `[batch, max_steps]` bool). Non-finite IG values
    are dropped (masked) rather than poisoning the loss."""
    step_ig = np.zeros((batch, max_steps), np.float32)
    step_mask = np.zeros((batch, max_steps), bool)
    for b, (igs, indices) in enumerate(zip(result.step_igs, result.step_indices, strict=True)):
        for ig, index in zip(igs, indices, strict=True):
            if np.isfinite(ig) and index < max_steps:
                step_ig[b, index], step_mask[b, index] = ig, True
    return step_ig, step_mask


def group_statistics(rewards_: np.ndarray, answer_scores: np.ndarray, group_size: int) -> dict[str, float]:
    """Per-group facts: the fraction of groups where every rollout's answer scores 0 (all fail), and where all
    rewards are equal (outcome advantage exactly 0)."""
    r = rewards_.reshape(-1, group_size)
    s = answer_scores.reshape(-1, group_size)
    return {
        "all_fail_group_fraction": float(np.mean(np.all(s <= 0, axis=1))),
        "zero_advantage_group_fraction": float(np.mean(np.all(r == r[:, :1], axis=1))),
    }


def credit_statistics(
    advantages: np.ndarray, query_token_mask: np.ndarray, answer_scores: np.ndarray, group_size: int,
    step_ig: np.ndarray, step_mask: np.ndarray,
) -> dict[str, float]:
    """Where the credit went (the paper's claim 2: IG still gives query tokens a gradient when a group all fails).

    advantages / query_token_mask: `[B, R]`; answer_scores: `[B]`; step_ig / step_mask: `[B, max_turns]`.
    Returns all_fail_query_credit_fraction (of the all-fail groups that searched, the fraction with a non-zero
    advantage on some query token) and ig_mean_correct / ig_mean_incorrect (mean IG of the scored steps of the
    rollouts whose answer scores > 0 / 0); a statistic without any member is left out.
    """
    groups = answer_scores.reshape(-1, group_size)
    all_fail = np.repeat(np.all(groups <= 0, axis=1), group_size)
    credited = np.any((np.abs(advantages) > 1e-8) & query_token_mask, axis=1).reshape(-1, group_size).any(axis=1)
    searched = query_token_mask.any(axis=1).reshape(-1, group_size).any(axis=1)
    fail_groups = all_fail.reshape(-1, group_size)[:, 0] & searched
    correct = np.broadcast_to((answer_scores > 0)[:, None], step_mask.shape)

    members = {"all_fail_query_credit_fraction": (credited, fail_groups),
               "ig_mean_correct": (step_ig, step_mask & correct),
               "ig_mean_incorrect": (step_ig, step_mask & ~correct)}
    return {key: float(values[mask].mean()) for key, (values, mask) in members.items() if mask.any()}


# ------------------------------------------------------------------------------------------------------------------
# The runtime of a GRPO run: everything an iteration needs besides the state.


class PaddedPolicy:
    """A `rollout.Policy` that pads every `generate` call to a multiple of `quantum` rows (repeating the last
    context; the extra rows are dropped), so the sampler compiles a few batch sizes instead of one per number of
    still-active rollouts."""

    def __init__(self, policy: rollout.Policy, quantum: int):
        self.policy, self.quantum = policy, max(quantum, 1)

    def generate(
        self, contexts: Sequence[Sequence[int]], *, max_new_tokens: int, stop_strings: Sequence[str]
    ) -> list[list[int]]:
        rows = -(-len(contexts) // self.quantum) * self.quantum
        padded = list(contexts) + [contexts[-1]] * (rows - len(contexts))
        return self.policy.generate(padded, max_new_tokens=max_new_tokens, stop_strings=stop_strings)[: len(contexts)]


def row_quantum(batch: int, row_buckets: int, multiple: int) -> int:
    """Rows per padding step so a batch of up to `batch` rows uses at most `row_buckets` sizes (a multiple of the
    mesh's batch parallelism)."""
    quantum = -(-batch // max(row_buckets, 1))
    return -(-quantum // multiple) * multiple


@dataclasses.dataclass
class Runtime:
    """The fixed pieces of a run (built once by `build_runtime`)."""

    mesh: Mesh
    rules: tuple
    tokenizer: Any
    pad_id: int
    client: Any
    model_config: qwen2.Qwen2Config
    model: qwen2.Qwen2LM
    sampler: sampling.Sampler
    rollout_config: rollout.RolloutConfig
    temperature: float
    top_p: float
    use_chat_template: bool
    reward: ml_collections.ConfigDict
    grpo_config: grpo.GRPOConfig
    ig_config: info_gain.IGConfig
    ig_enabled: bool
    ig_scorer: info_gain.SequenceScorer
    prompt_buckets: tuple[int, ...]
    response_buckets: tuple[int, ...]
    row_buckets: int
    mini_batch_size: int
    logprob_fn: Callable[..., jax.Array]
    train_step: Callable[..., Any]
    with_reference: bool
    guard: train_state.NonFiniteGuard

    @property
    def group_size(self) -> int:
        return self.grpo_config.group_size


def grpo_config_from(config: ml_collections.ConfigDict) -> grpo.GRPOConfig:
    """The loss and advantage settings, with the configured IG modulation (a step without IG uses `ig_mode="none"`,
    the trajectory-level baseline)."""
    g, ig = config.grpo, config.ig
    return grpo.GRPOConfig(group_size=g.group_size, clip_eps=g.clip_eps, kl_coef=g.kl_coef,
                           entropy_coef=g.entropy_coef, ig_mode=ig.mode,
                           ig_transform=ig.transform, ig_coef=ig.coef, ig_clip=ig.clip)


def ig_config_from(config: ml_collections.ConfigDict, pad_id: int) -> info_gain.IGConfig:
    """The IG reward's settings (the rest keep `IGConfig`'s reference defaults: head weighting 3 x 3 tokens, one
    gold variant, mean aggregation, failed searches skipped)."""
    ig = config.ig
    return info_gain.IGConfig(
        n_random=ig.n_random, exclude_same_question=ig.exclude_same_question, max_context_tokens=ig.max_context_tokens,
        answer_join=ig.answer_join, dialect=config.rollout.dialect, seed=ig.seed,
        context_buckets=tuple(ig.context_buckets), answer_buckets=tuple(ig.answer_buckets),
        micro_batch_size=ig.micro_batch_size, pad_id=pad_id)


def rollout_config_from(config: ml_collections.ConfigDict) -> rollout.RolloutConfig:
    """The multi-turn rollout's settings."""
    r = config.rollout
    return rollout.RolloutConfig(dialect=r.dialect, max_turns=r.max_turns, topk=r.topk,
                                 max_segment_tokens=r.max_segment_tokens,
                                 max_observation_tokens=r.max_observation_tokens,
                                 max_response_tokens=r.max_response_tokens)


def updates_per_step(config: ml_collections.ConfigDict) -> int:
    """Optimizer updates per GRPO step: rollouts / mini-batch size."""
    return config.trainer.prompts_per_step * config.grpo.group_size // config.trainer.mini_batch_size


def grpo_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (wd, clip) at a constant lr after an optional linear warmup (verl's actor optimizer)."""
    t = config.trainer
    return make_optimizer(t.lr, total_steps=t.steps * updates_per_step(config), warmup_steps=t.warmup_steps,
                          schedule="constant", weight_decay=t.weight_decay, grad_clip_norm=t.grad_clip_norm)


def build_runtime(
    config: ml_collections.ConfigDict, mesh: Mesh, rules: tuple, tokenizer: Any, client: Any,
    model_config: qwen2.Qwen2Config, tx: optax.GradientTransformation, state_shardings: train_state.TrainState,
) -> Runtime:
    """Sampler, IG scorer and the jitted functions of a GRPO run."""
    pad_id = setup.pad_token_id(tokenizer)
    model = qwen2.Qwen2LM(model_config)
    t = config.trainer
    grpo_config, ig_config = grpo_config_from(config), ig_config_from(config, pad_id)
    num_micro = t.mini_batch_size // t.micro_batch_size
    return Runtime(
        mesh=mesh, rules=rules, tokenizer=tokenizer, pad_id=pad_id, client=client, model_config=model_config,
        model=model,
        sampler=setup.make_sampler(model_config, pad_id, mesh, rules=rules,
                                   prompt_buckets=tuple(config.sampler.prompt_buckets),
                                   new_token_buckets=tuple(config.sampler.new_token_buckets)),
        rollout_config=rollout_config_from(config), temperature=config.rollout.temperature,
        top_p=config.rollout.top_p, use_chat_template=config.policy.use_chat_template, reward=config.reward,
        grpo_config=grpo_config, ig_config=ig_config, ig_enabled=config.ig.enabled,
        ig_scorer=info_gain.SequenceScorer(info_gain.qwen2_score_fn(model_config), ig_config, mesh, rules),
        prompt_buckets=tuple(t.prompt_buckets), response_buckets=tuple(t.response_buckets),
        row_buckets=config.sampler.row_buckets, mini_batch_size=t.mini_batch_size,
        logprob_fn=make_logprob_fn(model, state_shardings.params, mesh),
        train_step=make_train_step(functools.partial(grpo_objective, model, grpo_config), tx, state_shardings, mesh,
                                   GRPO_KEYS, num_micro),
        with_reference=config.grpo.kl_coef > 0, guard=train_state.NonFiniteGuard(t.max_consecutive_nonfinite),
    )


# ------------------------------------------------------------------------------------------------------------------
# One GRPO step.


def iteration_key(rng: jax.Array, iteration: int) -> np.ndarray:
    """The rollout key of GRPO step `iteration`, from the state's (checkpointed, replicated) key. Returned as a host
    array so the sampler sees the same (uncommitted) argument as for any other key: no recompilation."""
    return np.asarray(jax.random.fold_in(np.asarray(rng.addressable_shards[0].data), iteration))


def rollout_group(
    rt: Runtime, params: Any, examples: Sequence[qa.QAExample], key: jax.Array
) -> tuple[list[rollout.Trajectory], dict[str, float]]:
    """`group_size` sampled rollouts of each example (groups contiguous, built before any rollout runs)."""
    prompts = [rollout.encode_prompt(rt.tokenizer, ex.question, rt.rollout_config.dialect, rt.use_chat_template)
               for ex in examples]
    prompts = [p for p in prompts for _ in range(rt.group_size)]
    policy = rollout.SamplerPolicy(rt.sampler, params, rt.tokenizer, key, temperature=rt.temperature, top_p=rt.top_p)
    quantum = row_quantum(len(prompts), rt.row_buckets, sharding.batch_parallelism(rt.mesh))
    with nn.logical_axis_rules(rt.rules):
        return rollout.run_rollouts(PaddedPolicy(policy, quantum), rt.client, rt.tokenizer, prompts,
                                    rt.rollout_config)


def score_rollouts(
    rt: Runtime, trajectories: Sequence[rollout.Trajectory], golds: Sequence[Sequence[str]]
) -> list[rewards.OutcomeScore]:
    """Outcome score of each rollout (response text only, as `rewards` expects)."""
    r = rt.reward
    return [rewards.score_outcome(rt.tokenizer.decode(t.response_ids), gold, kind=r.kind,
                                  refine_bonus=r.refine_bonus, format_bonus=r.format_bonus,
                                  dialect=rt.rollout_config.dialect)
            for t, gold in zip(trajectories, golds, strict=True)]


def information_gain(
    rt: Runtime, params: Any, trajectories: Sequence[rollout.Trajectory], golds: Sequence[Sequence[str]],
    iteration: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(step_ig `[B, max_turns]`, step_mask `[B, max_turns]`, diagnostics) with the rollout-time `params`; group
    ids are the prompt index (siblings are one question), the pool draw is seeded by `(ig.seed, iteration)`."""
    group_ids = [b // rt.group_size for b in range(len(trajectories))]
    result = info_gain.compute_info_gain(rt.ig_scorer, params, trajectories, [list(g) for g in golds], rt.tokenizer,
                                         rt.ig_config, group_ids=group_ids, step=iteration)
    step_ig, step_mask = step_ig_arrays(result, len(trajectories), rt.rollout_config.max_turns)
    return step_ig, step_mask, result.diagnostics


def token_advantages(
    config: grpo.GRPOConfig, rewards_: np.ndarray, step_ig: np.ndarray, step_mask: np.ndarray,
    query_step_index: np.ndarray,
) -> np.ndarray:
    """Per-token advantages `[B, R]`: group outcome advantages, IG-modulated on query tokens (whole batch at once,
    so group and batch statistics are exact whatever the mini-batch split). One jitted program per shape."""
    return np.asarray(_token_advantages(config, rewards_, step_ig, step_mask, query_step_index))


@functools.partial(jax.jit, static_argnums=0)
def _token_advantages(
    config: grpo.GRPOConfig, rewards_: jax.Array, step_ig: jax.Array, step_mask: jax.Array,
    query_step_index: jax.Array,
) -> jax.Array:
    outcome = grpo.group_advantages(rewards_, config.group_size, config.adv_eps)
    return grpo.token_advantages(outcome, step_ig, step_mask, query_step_index, config)


def minibatch_slices(rows: int, size: int) -> list[slice]:
    """Consecutive row slices of `size` (the rollout batch in order: one epoch, no shuffling)."""
    return [slice(start, start + size) for start in range(0, rows, size)]


def policy_logprobs(rt: Runtime, params: Any, packed: Mapping[str, np.ndarray]) -> list[jax.Array]:
    """Response log-probs of every mini-batch under `params` (device arrays, padded rows included)."""
    parallel = sharding.batch_parallelism(rt.mesh)
    out = []
    rows = len(packed["prompt_tokens"])
    with jax.set_mesh(rt.mesh), nn.logical_axis_rules(rt.rules):
        for rows_slice in minibatch_slices(rows, rt.mini_batch_size):
            mini = pad_rows(select_rows({k: packed[k] for k in SEQUENCE_KEYS}, rows_slice), parallel)
            out.append(rt.logprob_fn(params, to_device(mini, rt.mesh)))
    return out


def grpo_updates(
    rt: Runtime, state: train_state.TrainState, packed: Mapping[str, np.ndarray], old: Sequence[jax.Array],
    ref: Sequence[jax.Array],
) -> tuple[train_state.TrainState, dict[str, float]]:
    """One epoch of clipped updates over the mini-batches; returns the state and the mean of the step metrics."""
    parallel = sharding.batch_parallelism(rt.mesh)
    collected: list[dict[str, jax.Array]] = []
    rows = len(packed["prompt_tokens"])
    with jax.set_mesh(rt.mesh), nn.logical_axis_rules(rt.rules):
        for k, rows_slice in enumerate(minibatch_slices(rows, rt.mini_batch_size)):
            mini = pad_rows(select_rows({key: packed[key] for key in (*SFT_KEYS, "advantages")}, rows_slice),
                            parallel)
            batch = to_device({**mini, "old_logprobs": old[k], "ref_logprobs": ref[k]}, rt.mesh)
            state, step_metrics = rt.train_step(state, batch)
            rt.guard.update(bool(step_metrics["skipped"] > 0), int(state.step))
            collected.append(step_metrics)
    host = jax.device_get(collected)
    return state, {key: float(np.mean([m[key] for m in host])) for key in host[0]}


def rollout_metrics(
    trajectories: Sequence[rollout.Trajectory], scores: Sequence[rewards.OutcomeScore],
    golds: Sequence[Sequence[str]], group_size: int,
) -> dict[str, float]:
    """Outcome and shape statistics of a rollout batch (reward, EM, all-fail groups, lengths, searches)."""
    rewards_ = np.array([s.reward for s in scores], np.float32)
    answer_scores = np.array([s.answer_score for s in scores], np.float32)
    em = [rewards.exact_match(s.answer, g) if s.answer is not None else 0.0 for s, g in zip(scores, golds,
                                                                                           strict=True)]
    return {
        "reward_mean": float(rewards_.mean()),
        "reward_std": float(rewards_.std()),
        "em": float(np.mean(em)),
        "answer_score": float(answer_scores.mean()),
        "format_ok": float(np.mean([s.format_ok for s in scores])),
        "refine_hit": float(np.mean([s.refine_hit for s in scores])),
        **group_statistics(rewards_, answer_scores, group_size),
        "response_length": float(np.mean([len(t.response_ids) for t in trajectories])),
        "truncated_fraction": float(np.mean([t.truncated for t in trajectories])),
        "searches_per_rollout": float(np.mean([len(t.steps) for t in trajectories])),
    }


def learn_from_rollouts(
    rt: Runtime, state: train_state.TrainState, trajectories: Sequence[rollout.Trajectory],
    golds: Sequence[Sequence[str]], iteration: int, *, ig_enabled: bool | None = None,
) -> tuple[train_state.TrainState, dict[str, float]]:
    """Everything of a GRPO step after the rollouts (sampled by `state.params`): rewards, IG, old/reference
    log-probs, advantages and the mini-batch updates. Groups are `group_size` contiguous trajectories."""
    ig_on = rt.ig_enabled if ig_enabled is None else ig_enabled
    timings: dict[str, float] = {}
    start = time.perf_counter()
    scores = score_rollouts(rt, trajectories, golds)
    if ig_on:
        step_ig, step_mask, ig_metrics = information_gain(rt, state.params, trajectories, golds, iteration)
    else:
        step_ig = np.zeros((len(trajectories), rt.rollout_config.max_turns), np.float32)
        step_mask, ig_metrics = np.zeros_like(step_ig, bool), {}
    timings["time/ig_s"] = time.perf_counter() - start

    mark = time.perf_counter()
    prompt_len, response_len = bucketed_lengths(trajectories, rt.prompt_buckets, rt.response_buckets)
    packed = rollout.pack_trajectories(trajectories, prompt_len, response_len, rt.pad_id)
    rewards_ = np.array([s.reward for s in scores], np.float32)
    grpo_config = rt.grpo_config if ig_on else dataclasses.replace(rt.grpo_config, ig_mode="none")
    packed["advantages"] = token_advantages(grpo_config, rewards_, step_ig, step_mask, packed["query_step_index"])
    old = policy_logprobs(rt, state.params, packed)
    ref = policy_logprobs(rt, state.extra["ref_params"], packed) if rt.with_reference else old
    jax.block_until_ready(ref)
    timings["time/logprob_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    state, update_metrics = grpo_updates(rt, state, packed, old, ref)
    timings["time/update_s"] = time.perf_counter() - mark
    answer_scores = np.array([sc.answer_score for sc in scores], np.float32)
    return state, {
        **rollout_metrics(trajectories, scores, golds, rt.group_size),
        **credit_statistics(packed["advantages"], packed["query_token_mask"], answer_scores, rt.group_size,
                            step_ig, step_mask),
        "ig_mean": float(step_ig[step_mask].mean()) if step_mask.any() else 0.0,
        "ig_positive_fraction": float((step_ig[step_mask] > 0).mean()) if step_mask.any() else 0.0,
        "ig_steps": float(step_mask.sum()),
        **{k: float(v) for k, v in ig_metrics.items()},
        **update_metrics,
        **timings,
    }


def grpo_iteration(
    rt: Runtime, state: train_state.TrainState, examples: Sequence[qa.QAExample], iteration: int,
    *, ig_enabled: bool | None = None,
) -> tuple[train_state.TrainState, dict[str, float]]:
    """One GRPO step on `examples` (module docstring). `iteration` (1-based) seeds the rollouts and the IG pool;
    `ig_enabled` overrides the runtime's setting (benchmarks). Returns the new state and the step's metrics."""
    start = time.perf_counter()
    golds = [list(ex.golden_answers) for ex in examples for _ in range(rt.group_size)]
    trajectories, rollout_stats = rollout_group(rt, state.params, examples, iteration_key(state.rng, iteration))
    rollout_seconds = time.perf_counter() - start
    state, step_metrics = learn_from_rollouts(rt, state, trajectories, golds, iteration, ig_enabled=ig_enabled)
    return state, {
        **step_metrics,
        **{f"rollout/{k}": float(v) for k, v in rollout_stats.items()},
        "time/rollout_s": rollout_seconds,
        "time/step_s": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------------------------------
# Evaluation.


def evaluate_policy(
    rt: Runtime, params: Any, examples: Sequence[qa.QAExample], batch_size: int, records_path: str | None = None,
    max_turns: int = 0,
) -> dict[str, dict[str, float]]:
    """Greedy EM (and friends) of the policy on `examples` (`evaluate.evaluate`), with `max_turns` search turns
    (0: the training rollouts' own); the per-question records (response text, queries, answer) go to
    `records_path` (JSONL) when given, for reading what the policy writes."""
    rollout_config = dataclasses.replace(rt.rollout_config, max_turns=max_turns or rt.rollout_config.max_turns)
    policy = rollout.SamplerPolicy(rt.sampler, params, rt.tokenizer, jax.random.PRNGKey(0), temperature=0.0)
    quantum = row_quantum(min(batch_size, len(examples)), rt.row_buckets, sharding.batch_parallelism(rt.mesh))
    with nn.logical_axis_rules(rt.rules):
        results, records = evaluate.evaluate(PaddedPolicy(policy, quantum), rt.client, rt.tokenizer, examples,
                                             rollout_config, batch_size=batch_size,
                                             use_chat_template=rt.use_chat_template)
    if records_path and jax.process_index() == 0:
        with open(records_path, "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return results


# ------------------------------------------------------------------------------------------------------------------
# Warm start (supervised, on expert trajectories).


def prompt_iterator(num_examples: int, batch_size: int, seed: int) -> grain.DatasetIterator:
    """A checkpointable, shuffled, repeated stream of `[batch_size]` example indices (the whole batch on every
    process)."""
    dataset = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat().batch(batch_size, drop_remainder=True)
    return iter(dataset.to_iter_dataset())


def expert_batch(
    config: ml_collections.ConfigDict, examples: Sequence[qa.QAExample], tokenizer: Any, client: Any,
) -> dict[str, np.ndarray]:
    """The packed expert trajectories (`SFT_KEYS`, one fixed bucketed shape for the whole set)."""
    rollout_config = rollout_config_from(config)
    dropped: list[tuple[str, str]] = []
    trajectories = experts.expert_trajectories(examples, client, tokenizer, rollout_config, dropped=dropped,
                                               max_query_words=config.warm_start.max_query_words,
                                               refine_window_words=config.warm_start.refine_window_words,
                                               use_chat_template=config.policy.use_chat_template)
    if not trajectories:
        raise RuntimeError("no expert trajectory could be built (no retrieved document holds an answer)")
    logging.info("warm start: %d expert trajectories from %d questions", len(trajectories), len(examples))
    for example_id, reason in dropped[:5]:
        logging.info("warm start: no expert trajectory for %s: %s", example_id, reason)
    copies = config.warm_start.get("counterfactual_copies", 0)
    if copies:
        rng, token_ids = np.random.default_rng([config.seed, 7]), copy_token_ids(tokenizer)
        renamed = [experts.counterfactual_trajectory(t, tokenizer, token_ids, rng)
                   for _ in range(copies) for t in trajectories]
        trajectories = renamed if config.warm_start.get("counterfactual_only", False) else trajectories + renamed
    prompt_len, response_len = bucketed_lengths(trajectories, config.trainer.prompt_buckets,
                                                config.trainer.response_buckets)
    packed = rollout.pack_trajectories(trajectories, prompt_len, response_len, setup.pad_token_id(tokenizer))
    return {k: packed[k] for k in SFT_KEYS}


def warm_start_examples(
    config: ml_collections.ConfigDict, train_examples: Sequence[qa.QAExample]
) -> list[qa.QAExample]:
    """The questions of the expert warm start: the first `warm_start.num_examples` train questions, of which, when
    `warm_start.multi_hop_fraction` >= 0, only as many multi-hop ones (`hops > 1`, first ones kept) as make up that
    fraction of the result: a warm start that rarely shows the second search leaves it to GRPO to learn."""
    examples = list(train_examples[: config.warm_start.num_examples])
    fraction = config.warm_start.get("multi_hop_fraction", -1.0)
    if fraction < 0:
        return examples
    if fraction >= 1:
        return [e for e in examples if e.hops > 1]
    keep = round(fraction * sum(e.hops <= 1 for e in examples) / (1.0 - fraction))
    multi = {id(e) for e in [e for e in examples if e.hops > 1][:keep]}
    return [e for e in examples if e.hops <= 1 or id(e) in multi]


def copy_token_ids(tokenizer: Any) -> np.ndarray:
    """The token ids the copy pre-training draws from: the whole vocabulary but the special tokens and the agent
    tags."""
    tags = [t for t in AGENT_TAGS if t in tokenizer.get_vocab()]
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(tokenizer.convert_tokens_to_ids(tags))
    return np.array([i for i in range(len(tokenizer)) if i not in special], np.int32)


def is_copy_step(step: int, copy_steps: int, copy_every: int) -> bool:
    """Whether warm-start step `step` (1-based) trains on a copy batch: the first `copy_steps` steps, then every
    `copy_every`-th step (0: never), so the expert phase keeps rehearsing copying instead of memorising names."""
    return step <= copy_steps or (copy_every > 0 and (step - copy_steps) % copy_every == 0)


def warm_start(
    config: ml_collections.ConfigDict, mesh: Mesh, rules: tuple, model_config: qwen2.Qwen2Config, params: Any,
    examples: Sequence[qa.QAExample], tokenizer: Any, client: Any, workdir: str,
) -> Any:
    """Supervised warm start of `params`, resumable from `<workdir>/warm_start/checkpoints`; returns the params.

    Steps 1..`copy_steps`: copy pre-training on synthetic induction batches (`experts.copy_batch`, drawn from
    `numpy.random.default_rng([seed, step])`, so a resumed run draws the same ones); then `steps` steps of
    cross-entropy on expert trajectories of `examples`, every `copy_every`-th of them a copy batch instead
    (`is_copy_step`). One optimizer and one cosine schedule over all of them."""
    ws = config.warm_start
    copy_steps = ws.get("copy_steps", 0)
    total_steps = copy_steps + ws.steps
    directory = os.path.join(workdir, "warm_start")
    tx = make_optimizer(ws.lr, total_steps=total_steps, warmup_steps=ws.warmup_steps, schedule="cosine",
                        weight_decay=config.trainer.weight_decay, grad_clip_norm=config.trainer.grad_clip_norm)
    abstract, shardings = state_spec(model_config, tx, mesh, rules, with_reference=False)
    ckpt = checkpoint.Checkpointer(os.path.join(directory, "checkpoints"), save_every=ws.checkpoint_every, keep=2,
                                   async_save=config.trainer.async_checkpoint)
    try:
        if ckpt.latest_step() == total_steps:  # Finished earlier: only the params are needed.
            return ckpt.restore(abstract).params
        packed = expert_batch(config, examples, tokenizer, client)
        data_iter = prompt_iterator(len(packed["prompt_tokens"]), ws.batch_size, config.seed)
        if ckpt.latest_step() is not None:
            state = ckpt.restore(abstract, data_iter)
        else:
            state = state_from_params(params, tx, jax.random.PRNGKey(config.seed), shardings, False)
        model = qwen2.Qwen2LM(model_config)
        step_fn = make_train_step(functools.partial(sft_objective, model), tx, shardings, mesh, SFT_KEYS)
        token_ids = copy_token_ids(tokenizer)
        guard = train_state.NonFiniteGuard(config.trainer.max_consecutive_nonfinite)
        start = int(state.step)
        writer = metrics.MetricWriter(directory, total_steps, start_step=start, console_keys=("sft_loss",))
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            for step in range(start + 1, total_steps + 1):
                if is_copy_step(step, copy_steps, ws.get("copy_every", 0)):
                    batch = experts.copy_batch(np.random.default_rng([config.seed, step]), token_ids,
                                               ws.copy_batch_size, ws.copy_length, ws.copy_span)
                else:
                    batch = select_rows(packed, np.asarray(next(data_iter)))
                batch = pad_rows(batch, sharding.batch_parallelism(mesh))
                state, step_metrics = step_fn(state, to_device(batch, mesh))
                guard.update(bool(step_metrics["skipped"] > 0), step)
                if step % config.trainer.log_every == 0 or step == total_steps:
                    phase = "copy" if is_copy_step(step, copy_steps, ws.get("copy_every", 0)) else "sft"
                    writer.write(step, {**step_metrics, f"{phase}_loss": step_metrics["sft_loss"]})
                preempted = ckpt.should_stop(step)
                ckpt.save(step, state, data_iter, config, force=preempted or step == total_steps)
                if preempted:
                    raise checkpoint.Preempted(f"warm start step {step}")
        writer.close()
        if jax.process_index() == 0:
            metrics.plot_metrics(writer.jsonl_path, os.path.join(directory, "metrics.png"),
                                 ["sft_loss", "copy_loss"])
        return state.params
    finally:
        ckpt.close()


# ------------------------------------------------------------------------------------------------------------------
# The run.


@dataclasses.dataclass
class Setup:
    """Data, retrieval, tokenizer and model config of a run (built by `build_setup`)."""

    world: qa.QAWorld | None
    train_examples: list[qa.QAExample]
    eval_examples: list[qa.QAExample]
    client: Any
    tokenizer: Any
    model_config: qwen2.Qwen2Config


def build_setup(config: ml_collections.ConfigDict) -> Setup:
    """QA splits, search client, tokenizer and model config (the embedded world is built once and shared)."""
    d = config.data
    world = setup.build_world(d)
    train = setup.load_examples(d.source, world, split="train", path=d.train_path, max_questions=d.max_train_questions)
    evals = setup.load_examples(d.source, world, split=d.eval_split, path=d.eval_path,
                                max_questions=d.max_eval_questions)
    tokenizer = setup.build_tokenizer(config.policy, world)
    return Setup(world, train, evals, setup.build_search_client(config.retrieval, world), tokenizer,
                 setup.build_model_config(config.policy, tokenizer))




PLOT_KEYS = ("reward_mean", "em", "all_fail_group_fraction", "ig_mean", "ig_positive_fraction", "kl", "entropy",
             "clip_fraction", "searches_per_rollout", "response_length", "time/step_s", "eval_em")


def initial_state(
    config: ml_collections.ConfigDict, s: Setup, ckpt: checkpoint.Checkpointer, abstract: train_state.TrainState,
    state_shardings: train_state.TrainState, tx: optax.GradientTransformation, prompts: grain.DatasetIterator,
    mesh: Mesh, rules: tuple, workdir: str,
) -> train_state.TrainState:
    """The GRPO state: restored from the latest checkpoint (with the prompt iterator), else built from the HF or
    randomly initialised params after the warm start, with the reference policy frozen at those params."""
    if ckpt.latest_step() is not None:
        return ckpt.restore(abstract, prompts)
    params = setup.load_params(config.policy, s.model_config, mesh, config.seed, rules)
    if config.warm_start.steps:
        examples = warm_start_examples(config, s.train_examples)
        params = warm_start(config, mesh, rules, s.model_config, params, examples, s.tokenizer, s.client, workdir)
    return state_from_params(params, tx, jax.random.PRNGKey(config.seed + 2), state_shardings,
                             config.grpo.kl_coef > 0)


def grpo_loop(
    config: ml_collections.ConfigDict, s: Setup, ckpt: checkpoint.Checkpointer, state: train_state.TrainState,
    tx: optax.GradientTransformation, state_shardings: train_state.TrainState, prompts: grain.DatasetIterator,
    mesh: Mesh, rules: tuple, workdir: str,
) -> train_state.TrainState:
    """GRPO steps from the state's step to `trainer.steps`, with greedy eval before (step 0) and after (last step)
    written to `<workdir>/eval.json` (+ `eval_records_*.jsonl`); checkpoints after every due step; raises
    `checkpoint.Preempted` after saving."""
    t = config.trainer
    per_step = updates_per_step(config)
    start = int(state.step) // per_step
    if int(state.step) != start * per_step:
        raise checkpoint.CheckpointMismatchError(f"checkpoint step {int(state.step)} is not a multiple of the "
                                                 f"{per_step} updates per GRPO step of this config")
    rt = build_runtime(config, mesh, rules, s.tokenizer, s.client, s.model_config, tx, state_shardings)
    eval_path = os.path.join(workdir, "eval.json")
    evals = read_json(eval_path)
    writer = metrics.MetricWriter(workdir, t.steps, start_step=start, console_keys=("reward_mean", "em", "ig_mean"))
    try:
        if start == 0 and config.eval.before_grpo and "before_grpo" not in evals:
            evals["before_grpo"] = evaluate_policy(rt, state.params, s.eval_examples, config.eval.batch_size,
                                                   os.path.join(workdir, "eval_records_before_grpo.jsonl"),
                                                   config.eval.get("max_turns", 0))
            write_json(eval_path, evals)
            writer.write(0, {"eval_em": evals["before_grpo"]["average"]["em"]})
        for iteration in range(start + 1, t.steps + 1):
            examples = [s.train_examples[int(i)] for i in next(prompts)]
            state, step_metrics = grpo_iteration(rt, state, examples, iteration)
            if iteration == t.steps:
                evals["after_grpo"] = evaluate_policy(rt, state.params, s.eval_examples, config.eval.batch_size,
                                                      os.path.join(workdir, "eval_records_after_grpo.jsonl"),
                                                      config.eval.get("max_turns", 0))
                evals["ig_enabled"] = config.ig.enabled
                write_json(eval_path, evals)
                step_metrics["eval_em"] = evals["after_grpo"]["average"]["em"]
            if iteration % t.log_every == 0 or iteration == t.steps:
                writer.write(iteration, step_metrics)
            preempted = ckpt.should_stop(iteration)
            ckpt.save(iteration, state, prompts, config, force=preempted or iteration == t.steps)
            if preempted and iteration < t.steps:
                logging.warning("preempted: saved GRPO step %d; rerun the same command to resume", iteration)
                raise checkpoint.Preempted(f"GRPO step {iteration}")
    finally:
        writer.close()
    if jax.process_index() == 0:
        metrics.plot_metrics(writer.jsonl_path, os.path.join(workdir, "metrics.png"), PLOT_KEYS)
        summary = {"grpo_steps": t.steps, "optimizer_steps": int(state.step), "ig_enabled": config.ig.enabled,
                   **{f"eval_em_{k}": v["average"]["em"] for k, v in evals.items() if isinstance(v, dict)}}
        write_json(os.path.join(workdir, "final_metrics.json"), summary)
        logging.info("done: %s; outputs in %s", summary, workdir)
    return state


def train(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
    """Warm start (if configured), then GRPO(+IG), resuming from `<workdir>` checkpoints; returns the final state.

    Raises `checkpoint.Preempted` after saving on SIGTERM, `train_state.NonFiniteError` after too many skipped updates,
    `ConfigError` for a bad config and `checkpoint.CheckpointMismatchError` for a checkpoint written by another
    config.
    """
    check_config(config)
    if config.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.jax_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    d = config.distributed
    sharding.maybe_initialize_distributed(d.mode)
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.normalize_rules(config.sharding_rules)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    s = build_setup(config)
    logging.info("mesh %s; %d train / %d eval questions; policy %s (%d params)", dict(mesh.shape),
                 len(s.train_examples), len(s.eval_examples), s.model_config,
                 qwen2.param_count(jax.eval_shape(functools.partial(qwen2.init_params, s.model_config),
                                                  jax.random.PRNGKey(0))))

    t = config.trainer
    tx = grpo_optimizer(config)
    with_reference = config.grpo.kl_coef > 0
    abstract, state_shardings = state_spec(s.model_config, tx, mesh, rules, with_reference)
    prompts = prompt_iterator(len(s.train_examples), t.prompts_per_step, config.seed + 1)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.checkpoint_every,
                                   keep=t.keep_checkpoints, async_save=t.async_checkpoint)
    try:
        state = initial_state(config, s, ckpt, abstract, state_shardings, tx, prompts, mesh, rules, workdir)
        state = grpo_loop(config, s, ckpt, state, tx, state_shardings, prompts, mesh, rules, workdir)
    finally:
        ckpt.close()
    return state
