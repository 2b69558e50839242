"""GRPO with per-token information-gain modulation of the search-query tokens (spec sections 3 and 4.3).

Pure functions of arrays. Shapes: `B` rollouts (= groups x G, each group's G rollouts contiguous), `L` response
tokens, `S` search steps per rollout (padded), `V` vocabulary.

Outcome advantage (the reference GRPO): `A_i = (R_i - mean_g R) / (std_g R + 1e-6)` with the unbiased std;
a group of one gets mean 0 and std 1. It is broadcast over the rollout's response tokens.

IG modulation (spec 3; the paper's equation is UNKNOWN, so the options are config fields):
* "additive" (default): on the tokens of step t's query, `A_ik = A_i + lambda * g(IG_it)`; elsewhere `A_i`. It keeps a
  gradient on the queries of a group whose rollouts all fail (all `A_i = 0`), as the abstract says IG-Search does;
* "multiplicative": `A_ik = A_i * (1 + lambda * g(IG_it))` on query tokens (no gradient when all `A_i = 0`);
* "none": the trajectory-level baseline.
`g` is "raw", "group_std" (IG standardised over the search steps of the GRPO group), "batch_std" (over the
batch's steps), "tanh" or "clip" (to [-ig_clip, ig_clip]).

Loss (per token, token-level mean over `loss_mask` tokens of the batch):
`max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) + kl_coef * clamp(exp(ref - lp) - (ref - lp) - 1, -10, 10)
 - entropy_coef * entropy`, `ratio = exp(lp - old_lp)`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

IG_MODES = ("none", "additive", "multiplicative")
IG_TRANSFORMS = ("raw", "group_std", "batch_std", "tanh", "clip")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """group_size: G rollouts per prompt. clip_eps: PPO ratio clip. kl_coef/kl_clamp: low-variance KL to the frozen
    reference (0 disables it). entropy_coef: entropy bonus. adv_eps: added to the group std. ig_mode, ig_transform,
    ig_coef (lambda), ig_clip, ig_std_eps: the IG modulation (module docstring). Defaults: the reference recipe
    (spec 4.2/4.3); ig_coef 0.5 is our choice inside the spec's suggested 0.1-1.0 range."""

    group_size: int = 5
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    kl_clamp: float = 10.0
    entropy_coef: float = 0.001
    adv_eps: float = 1e-6
    ig_mode: str = "additive"
    ig_transform: str = "raw"
    ig_coef: float = 0.5
    ig_clip: float = 1.0
    ig_std_eps: float = 1e-6

    def __post_init__(self):
        if self.ig_mode not in IG_MODES:
            raise ValueError(f"ig_mode must be one of {IG_MODES}, got {self.ig_mode!r}")
        if self.ig_transform not in IG_TRANSFORMS:
            raise ValueError(f"ig_transform must be one of {IG_TRANSFORMS}, got {self.ig_transform!r}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """Outcome advantages `[B]` from rewards `[B]` (groups of `group_size` contiguous rollouts)."""
    if rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rollouts do not form groups of {group_size}")
    grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
    if group_size == 1:
        mean, std = jnp.zeros_like(grouped), jnp.ones_like(grouped)
    else:
        mean = grouped.mean(axis=1, keepdims=True)
        std = grouped.std(axis=1, ddof=1, keepdims=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def _standardize(values: jax.Array, mask: jax.Array, axis: tuple[int, ...], eps: float) -> jax.Array:
    count = jnp.maximum(mask.sum(axis=axis, keepdims=True), 1)
    mean = jnp.where(mask, values, 0.0).sum(axis=axis, keepdims=True) / count
    var = jnp.where(mask, jnp.square(values - mean), 0.0).sum(axis=axis, keepdims=True) / count
    return jnp.where(mask, (values - mean) / (jnp.sqrt(var) + eps), 0.0)


def transform_step_ig(step_ig: jax.Array, step_mask: jax.Array, config: GRPOConfig) -> jax.Array:
    """`g(IG)` for step values `[B, S]` (`step_mask` marks steps with an IG); 0 where masked."""
    step_ig = jnp.where(step_mask, step_ig.astype(jnp.float32), 0.0)
    if config.ig_transform == "raw":
        return step_ig
    if config.ig_transform == "tanh":
        return jnp.tanh(step_ig)
    if config.ig_transform == "clip":
        return jnp.clip(step_ig, -config.ig_clip, config.ig_clip)
    if config.ig_transform == "batch_std":
        return _standardize(step_ig, step_mask, (0, 1), config.ig_std_eps)
    grouped = step_ig.reshape(-1, config.group_size, step_ig.shape[1])
    mask = step_mask.reshape(grouped.shape)
    return _standardize(grouped, mask, (1, 2), config.ig_std_eps).reshape(step_ig.shape)


def place_on_queries(step_values: jax.Array, query_step_index: jax.Array) -> jax.Array:
    """Step values `[B, S]` onto their query tokens: `query_step_index [B, L]` is the step of each query token or
    -1; returns `[B, L]` (0 off the queries)."""
    gathered = jnp.take_along_axis(step_values, jnp.maximum(query_step_index, 0), axis=1)
    return jnp.where(query_step_index >= 0, gathered, 0.0)


def token_advantages(
    advantages: jax.Array, step_ig: jax.Array, step_mask: jax.Array, query_step_index: jax.Array,
    config: GRPOConfig,
) -> jax.Array:
    """Per-token advantages `[B, L]` from outcome advantages `[B]` and step IGs `[B, S]` (module docstring)."""
    base = jnp.broadcast_to(advantages[:, None], query_step_index.shape).astype(jnp.float32)
    if config.ig_mode == "none":
        return base
    on_query = query_step_index >= 0
    g = place_on_queries(transform_step_ig(step_ig, step_mask, config), query_step_index)
    has_ig = place_on_queries(step_mask.astype(jnp.float32), query_step_index) > 0
    if config.ig_mode == "additive":
        modulated = base + config.ig_coef * g
    else:
        modulated = base * (1.0 + config.ig_coef * g)
    return jnp.where(on_query & has_ig, modulated, base)


def token_logprobs_and_entropy(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fp32 log-probability of `tokens [B, L]` under `logits [B, L, V]` and the entropy of each position `[B, L]`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_lp = jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return token_lp, entropy


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over `mask` (all positions of the batch together); 0 when the mask is empty."""
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def grpo_loss(
    logprobs: jax.Array,
    entropy: jax.Array,
    old_logprobs: jax.Array,
    ref_logprobs: jax.Array,
    advantages: jax.Array,
    loss_mask: jax.Array,
    config: GRPOConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Clipped surrogate + low-variance KL - entropy bonus; all inputs `[B, L]`. Returns (loss, metrics)."""
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - config.clip_eps, 1.0 + config.clip_eps)
    pg_losses = jnp.maximum(-advantages * ratio, -advantages * clipped)
    pg_loss = masked_mean(pg_losses, loss_mask)
    diff = ref_logprobs - logprobs
    kl = jnp.clip(jnp.exp(diff) - diff - 1.0, -config.kl_clamp, config.kl_clamp)
    kl_loss = masked_mean(kl, loss_mask)
    entropy_mean = masked_mean(entropy, loss_mask)
    loss = pg_loss + config.kl_coef * kl_loss - config.entropy_coef * entropy_mean
    metrics = {
        "pg_loss": pg_loss,
        "kl": kl_loss,
        "entropy": entropy_mean,
        "clip_fraction": masked_mean((jnp.abs(ratio - clipped) > 0).astype(jnp.float32), loss_mask),
        "approx_kl_old": masked_mean(0.5 * jnp.square(log_ratio), loss_mask),
    }
    return loss, metrics
