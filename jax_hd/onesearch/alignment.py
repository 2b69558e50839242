"""OneSearch behaviour-preference alignment (spec onesearch.md §1.7 PARS, §2.6 TPMA-GRPO, §5 "Alignment").

Two objectives on top of the SFT generator (`model.OneSearchModel`), both pure functions of arrays first:

* Listwise softmax DPO (S-DPO, the released code's form of PARS): one chosen item SID against K rejected ones,
  `-log sigmoid(-logsumexp_k w_k * beta * [(pi - ref)(rejected_k) - (pi - ref)(chosen)])` over the valid k, with
  the optional reward-gap weight `w_k = (max(r_chosen, 1) - r_rejected_k)^(-alpha) + 1`, the optional chosen
  regularisation `ReLU(ref_chosen - pi_chosen)` added inside the bracket, and an optional SFT anchor.
* TPMA-GRPO: G constrained samples per prompt (`model.sample_sids`), a weighted prefix reward against the
  prompt's ground-truth SIDs (clicked or ordered items), its per-position marginal, normalised per position across
  the group, a prefix gate, and an unclipped ratio-weighted loss; `advantage="sequence"` is plain GRPO on the
  composite item reward (PPO clip; the "+GRPO" ablation row).

Shapes: `b` prompts, `K` negatives, `G` rollouts, `L` SID levels (SID tokens), `T` ground-truth SIDs per prompt,
`t` label tokens. Log-probabilities are natural-log, summed over a sequence's tokens where stated. SID codes are
per-level local codes (`model.Vocab.sid_codes`), -1 for an invalid token.

The steps (`make_dpo_step`, `make_policy_step`) follow `trainer.make_train_step`: jitted `(state, batch, lr)`,
state donated, the lr written into the `inject_hyperparams` AdamW state of `trainer.make_optimizer`. Alignment
runs the model deterministically (dropout off), so the policy's log-probs at the sampling parameters equal the
behaviour log-probs (ratio 1 on the first update).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jax_hd.core import sharding, train_state
from jax_hd.decoding import prefix_tree as pt
from jax_hd.decoding.sampling import NEG_INF
from jax_hd.igsearch import grpo
from jax_hd.onesearch import model as model_lib

Array = jax.Array
GATES = ("fraction", "strict", "none")
ADVANTAGES = ("position", "sequence")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """beta: DPO temperature; reward_gap_alpha: alpha of the reward-gap weight (code default 1.5), used when
    use_reward_gap_weight; min_reward_gap: floor of `max(r_chosen, 1) - r_rejected` before the negative power (the
    released code has none and gives NaN for a non-positive gap); sft_weight: weight of the chosen SID's mean token
    NLL; chosen_regularisation / chosen_reg_weight: add `reg_weight * ReLU(ref_chosen - pi_chosen)` inside the
    bracket (code default weight 1)."""

    beta: float = 0.1
    reward_gap_alpha: float = 1.5
    use_reward_gap_weight: bool = False
    min_reward_gap: float = 0.1
    sft_weight: float = 0.0
    chosen_regularisation: bool = False
    chosen_reg_weight: float = 1.0

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be positive, got {self.beta}")
        if self.min_reward_gap <= 0:
            raise ValueError(f"DPOConfig.min_reward_gap must be positive, got {self.min_reward_gap}")


@dataclasses.dataclass(frozen=True)
class TPMAConfig:
    """num_samples: G rollouts per prompt (>= 2: the group statistics need two); temperature: sampling temperature;
    position_weights: w_l of the prefix reward, one per SID level ((2, 2, 1, 1, 0): the authors' tpma.py and the
    literal eq. 12; the method figure reads (2, 2, 2, 1, 1)); gate: "fraction" (g_l = share of the l - 1 earlier
    positions right), "strict" (1 only if the whole earlier prefix equals one truth) or "none";
    item_advantage_weight: w_item of the group-normalised item reward; sft_weight: auxiliary CE on (prompt -> first
    truth SID); kl_coef / kl_clamp: k3 KL to a reference (`grpo.grpo_loss`); advantage: "position" (TPMA) or
    "sequence" (plain GRPO on R_item); clip_eps: PPO clip (sequence mode only); log_ratio_clamp: |log ratio| bound
    (TPMA); order_value / click_value / ctr_clip: the composite item reward; eps: added to the group std."""

    num_samples: int = 4
    temperature: float = 1.0
    position_weights: tuple[float, ...] = (2.0, 2.0, 1.0, 1.0, 0.0)
    gate: str = "fraction"
    item_advantage_weight: float = 0.0
    sft_weight: float = 0.1
    kl_coef: float = 0.0
    kl_clamp: float = 10.0
    advantage: str = "position"
    clip_eps: float = 0.2
    log_ratio_clamp: float = 20.0
    order_value: float = 4.0
    click_value: float = 3.0
    ctr_clip: tuple[float, float] = (0.0, 1.0)
    eps: float = 1e-8

    def __post_init__(self):
        if self.gate not in GATES:
            raise ValueError(f"TPMAConfig.gate must be one of {GATES}, got {self.gate!r}")
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"TPMAConfig.advantage must be one of {ADVANTAGES}, got {self.advantage!r}")
        if self.num_samples < 2:
            raise ValueError(f"TPMAConfig.num_samples must be >= 2 (group statistics), got {self.num_samples}")
        if self.temperature <= 0:
            raise ValueError(f"TPMAConfig.temperature must be positive, got {self.temperature}")
        if len(self.ctr_clip) != 2 or self.ctr_clip[0] > self.ctr_clip[1]:
            raise ValueError(f"TPMAConfig.ctr_clip must be (low, high) with low <= high, got {self.ctr_clip}")


# ----------------------------------------------------------------------------------------------------------
# Listwise DPO.


def token_logprobs(logits: Array, labels: Array) -> Array:
    """fp32 log-prob of `labels [..., t]` under `logits [..., t, V]`. `[..., t]`."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logprobs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_logprobs(logits: Array, labels: Array, mask: Array) -> Array:
    """Sum of the token log-probs of `labels [..., t]` over `mask [..., t]` (fp32); logits `[..., t, V]`. `[...]`."""
    return jnp.sum(token_logprobs(logits, labels) * mask.astype(jnp.float32), axis=-1)


def sdpo_loss(
    pi_chosen: Array,
    pi_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    rejected_mask: Array,
    cfg: DPOConfig,
    reward_chosen: Array | None = None,
    reward_rejected: Array | None = None,
    chosen_length: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Listwise softmax-DPO loss (module docstring), mean over the `b` rows; returns (loss, metrics).

    pi_* / ref_*: sequence log-probs, chosen `[b]`, rejected `[b, K]`; rejected_mask `[b, K]` marks real negatives
    (a row without one contributes 0 to the DPO term). reward_chosen `[b]` / reward_rejected `[b, K]`: needed when
    `cfg.use_reward_gap_weight`. SFT anchor: `sft_weight * -pi_chosen / chosen_length` (`[b]` token counts, the
    SFT trainer's mean token NLL); without `chosen_length` the sum, as the released code has it.
    """
    f32 = jnp.float32
    valid = rejected_mask.astype(bool)
    chosen_ratio = (pi_chosen - ref_chosen).astype(f32)
    rejected_ratio = (pi_rejected - ref_rejected).astype(f32)
    inner = rejected_ratio - chosen_ratio[:, None]
    if cfg.chosen_regularisation:
        inner = inner + cfg.chosen_reg_weight * jax.nn.relu(ref_chosen - pi_chosen).astype(f32)[:, None]
    weight = jnp.ones_like(inner)
    if cfg.use_reward_gap_weight:
        if reward_chosen is None or reward_rejected is None:
            raise ValueError("DPOConfig.use_reward_gap_weight needs reward_chosen and reward_rejected")
        gap = jnp.maximum(reward_chosen, 1.0)[:, None].astype(f32) - reward_rejected.astype(f32)
        weight = jnp.power(jnp.maximum(gap, cfg.min_reward_gap), -cfg.reward_gap_alpha) + 1.0
    logits = jnp.where(valid, weight * cfg.beta * inner, NEG_INF)
    has_negative = valid.any(axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    dpo = jnp.where(has_negative, jax.nn.softplus(jnp.where(has_negative, lse, 0.0)), 0.0)  # -log sigmoid(-lse)
    length = jnp.ones_like(chosen_ratio) if chosen_length is None else jnp.maximum(chosen_length.astype(f32), 1.0)
    sft = -pi_chosen.astype(f32) / length
    loss = jnp.mean(dpo) + cfg.sft_weight * jnp.mean(sft)
    chosen_reward = jax.lax.stop_gradient(cfg.beta * chosen_ratio)
    rejected_reward = jax.lax.stop_gradient(cfg.beta * rejected_ratio)
    n_valid = jnp.maximum(valid.sum(), 1)
    margin = jnp.where(valid, chosen_reward[:, None] - rejected_reward, 0.0)
    wins = jnp.all(jnp.where(valid, chosen_reward[:, None] > rejected_reward, True), axis=-1) & has_negative
    metrics = {
        "dpo_loss": jnp.mean(dpo),
        "sft_nll": jnp.mean(sft),
        "reward_chosen": jnp.mean(chosen_reward),
        "reward_rejected": jnp.sum(jnp.where(valid, rejected_reward, 0.0)) / n_valid,
        "reward_margin": jnp.sum(margin) / n_valid,
        "reward_accuracy": jnp.sum(wins) / jnp.maximum(has_negative.sum(), 1),
        "logp_chosen": jnp.mean(pi_chosen),
    }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Composite item reward and TPMA advantages.


def item_reward(relevance: Any, ctr: Any, ordered: Any, clicked: Any, cfg: TPMAConfig) -> Array:
    """R_item = relevance (0-3) + clip(ctr) + (order_value if ordered, else click_value if clicked, else 0).

    All inputs broadcast (`[...]`); ordered / clicked are booleans. `[...]` float32."""
    behaviour = jnp.where(
        jnp.asarray(ordered, bool), cfg.order_value, jnp.where(jnp.asarray(clicked, bool), cfg.click_value, 0.0)
    )
    ctr = jnp.clip(jnp.asarray(ctr, jnp.float32), cfg.ctr_clip[0], cfg.ctr_clip[1])
    return (jnp.asarray(relevance, jnp.float32) + ctr + behaviour).astype(jnp.float32)


def _matches(rollouts: Array, truths: Array, truth_mask: Array) -> Array:
    """`[G, T, L]` bool: rollout i's code at position l equals truth t's (real truths, valid codes only)."""
    match = rollouts[:, None, :] == truths[None, :, :]
    return match & truth_mask.astype(bool)[None, :, None] & (rollouts >= 0)[:, None, :]


def prefix_rewards(rollouts: Array, truths: Array, truth_mask: Array, weights: Array) -> tuple[Array, Array]:
    """R_{i,l} = max_t sum_{k<=l} w_k [o_i^k = t^k] (positions compared independently, max over the truths).

    rollouts `[G, L]` codes (-1 invalid), truths `[T, L]` codes, truth_mask `[T]`, weights `[L]`.
    Returns (weighted `[G, L]`, unweighted `[G, L]`) float32, each maximised over the truths separately."""
    match = _matches(rollouts, truths, truth_mask).astype(jnp.float32)
    weighted = jnp.max(jnp.cumsum(match * jnp.asarray(weights, jnp.float32), axis=-1), axis=1)
    unweighted = jnp.max(jnp.cumsum(match, axis=-1), axis=1)
    return weighted, unweighted


def _group_normalize(x: Array, eps: float) -> Array:
    """(x - mean) / (std + eps) along axis 0 (the G rollouts; unbiased std as torch's)."""
    return (x - x.mean(axis=0, keepdims=True)) / (jnp.std(x, axis=0, ddof=1, keepdims=True) + eps)


def prefix_gate(rollouts: Array, truths: Array, truth_mask: Array, gate: str) -> Array:
    """`[G, L]` float32 gate: g_1 = 1; g_l (l >= 2) = the fraction of the l - 1 earlier positions matching a truth
    ("fraction", max over truths), 1 iff they all match one truth ("strict"), or 1 ("none")."""
    g, length = rollouts.shape
    if gate == "none":
        return jnp.ones((g, length), jnp.float32)
    match = _matches(rollouts, truths, truth_mask)
    if gate == "fraction":
        earlier = jnp.max(jnp.cumsum(match.astype(jnp.float32), axis=-1), axis=1)[:, :-1]
        frac = jnp.clip(earlier / jnp.arange(1, length, dtype=jnp.float32), 0.0, 1.0)
    elif gate == "strict":
        frac = jnp.any(jnp.cumprod(match, axis=-1), axis=1)[:, :-1].astype(jnp.float32)
    else:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    return jnp.concatenate([jnp.ones((g, 1), jnp.float32), frac], axis=1)


def tpma_advantages(
    rollouts: Array, truths: Array, truth_mask: Array, item_rewards: Array, cfg: TPMAConfig
) -> tuple[Array, Array]:
    """TPMA advantages and prefix gates of one group, `([G, L], [G, L])` float32.

    rollouts `[G, L]` codes, truths `[T, L]` codes (truth_mask `[T]`), item_rewards `[G]`. The marginal
    m_l = R_l - R_{l-1} is normalised per position across the G rollouts, plus `item_advantage_weight` times the
    group-normalised item reward. Identical (or all invalid) rollouts give zero advantages."""
    if len(cfg.position_weights) != rollouts.shape[-1]:
        raise ValueError(f"position_weights {cfg.position_weights} do not match the SID length {rollouts.shape[-1]}")
    weighted, _ = prefix_rewards(rollouts, truths, truth_mask, jnp.asarray(cfg.position_weights))
    marginal = weighted - jnp.pad(weighted[:, :-1], ((0, 0), (1, 0)))
    advantages = _group_normalize(marginal, cfg.eps)
    if cfg.item_advantage_weight:
        advantages = advantages + cfg.item_advantage_weight * _group_normalize(item_rewards, cfg.eps)[:, None]
    return advantages, prefix_gate(rollouts, truths, truth_mask, cfg.gate)


def tpma_advantages_batch(
    rollouts: Array, truths: Array, truth_mask: Array, item_rewards: Array, cfg: TPMAConfig
) -> tuple[Array, Array]:
    """`tpma_advantages` over prompts: rollouts `[b, G, L]`, truths `[b, T, L]`, truth_mask `[b, T]`, item_rewards
    `[b, G]` -> (advantages, gate) `[b, G, L]`."""
    return jax.vmap(functools.partial(tpma_advantages, cfg=cfg))(rollouts, truths, truth_mask, item_rewards)


def sequence_advantages(item_rewards: Array, eps: float) -> Array:
    """Plain GRPO advantages `[b, G]` of item_rewards `[b, G]` (each prompt's group normalised, unbiased std)."""
    b, g = item_rewards.shape
    return grpo.group_advantages(item_rewards.reshape(-1), g, eps).reshape(b, g)


def tpma_batch(
    vocab: model_lib.Vocab,
    rollout_tokens: Any,
    truth_codes: Sequence[Any],
    item_rewards: Any,
    cfg: TPMAConfig,
) -> dict[str, np.ndarray]:
    """Host glue: sampled rollouts `[b, G, L]` token ids, per prompt the ground-truth SID codes `[T_i, L]`
    (clicked / ordered items; T_i may be 0), item rewards `[b, G]` -> `{'advantages', 'gate'}` `[b, G, L]` float32
    for `make_policy_step` (sequence mode: the GRPO advantage broadcast over positions, gate 1)."""
    tokens = np.asarray(rollout_tokens)
    b, g, length = tokens.shape
    rewards = np.asarray(item_rewards, np.float32)
    if rewards.shape != (b, g):
        raise ValueError(f"item_rewards has shape {rewards.shape}, expected {(b, g)}")
    if len(truth_codes) != b:
        raise ValueError(f"{len(truth_codes)} truth sets for {b} prompts")
    if cfg.advantage == "sequence":
        adv = np.asarray(sequence_advantages(jnp.asarray(rewards), cfg.eps))
        return {"advantages": np.repeat(adv[..., None], length, -1), "gate": np.ones((b, g, length), np.float32)}
    width = max([1] + [len(t) for t in truth_codes])
    truths = np.full((b, width, length), -1, np.int32)
    truth_mask = np.zeros((b, width), bool)
    for i, t in enumerate(truth_codes):
        t = np.asarray(t, np.int32).reshape(-1, length)
        truths[i, : len(t)], truth_mask[i, : len(t)] = t, True
    codes = vocab.sid_codes(np.maximum(tokens, 0))
    codes = np.where(tokens >= 0, codes, -1)
    adv, gate = _tpma_batch_jit(jnp.asarray(codes), jnp.asarray(truths), jnp.asarray(truth_mask), rewards, cfg)
    return {"advantages": np.asarray(adv), "gate": np.asarray(gate)}


@functools.partial(jax.jit, static_argnums=4)
def _tpma_batch_jit(rollouts, truths, truth_mask, item_rewards, cfg):
    return tpma_advantages_batch(rollouts, truths, truth_mask, item_rewards, cfg)


# ----------------------------------------------------------------------------------------------------------
# Policy loss.


def policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    gate: Array,
    mask: Array,
    cfg: TPMAConfig,
    ref_logp: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Token-mean policy loss over `mask`; all inputs `[b, G, L]` (advantages may be `[b, G]`: broadcast).

    TPMA ("position"): `-g * exp(clamp(logp - old_logp)) * A`, no clipping. "sequence": `grpo.grpo_loss`'s
    PPO-clipped surrogate (no gate). Both add `kl_coef` x the k3 KL to `ref_logp` when given."""
    if advantages.ndim == logp.ndim - 1:
        advantages = jnp.broadcast_to(advantages[..., None], logp.shape)
    flat = [x.reshape(-1, x.shape[-1]) for x in (logp, old_logp, advantages, gate, mask)]
    logp2, old2, adv2, gate2, mask2 = flat
    ref2 = logp2 if ref_logp is None else ref_logp.reshape(logp2.shape)
    kl_coef = 0.0 if ref_logp is None else cfg.kl_coef
    grpo_cfg = grpo.GRPOConfig(
        group_size=1, clip_eps=cfg.clip_eps, kl_coef=kl_coef, kl_clamp=cfg.kl_clamp, entropy_coef=0.0
    )
    zeros = jnp.zeros_like(logp2)
    log_ratio = jnp.clip(logp2 - old2, -cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    if cfg.advantage == "sequence":
        loss, m = grpo.grpo_loss(logp2, zeros, old2, ref2, adv2, mask2, grpo_cfg)
        metrics = {"pg_loss": m["pg_loss"], "kl": m["kl"], "clip_fraction": m["clip_fraction"]}
    else:
        pg_loss = grpo.masked_mean(-gate2 * ratio * adv2, mask2)
        # The k3 KL of grpo_loss (zero advantages: its surrogate term is 0).
        _, m = grpo.grpo_loss(logp2, zeros, logp2, ref2, zeros, mask2, grpo_cfg)
        loss = pg_loss + kl_coef * m["kl"]
        metrics = {"pg_loss": pg_loss, "kl": m["kl"]}
    metrics.update(
        ratio=grpo.masked_mean(ratio, mask2),
        gate=grpo.masked_mean(gate2, mask2),
        advantage_abs=grpo.masked_mean(jnp.abs(adv2), mask2),
    )
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Jitted functions on the model.


def candidate_logprobs(
    model_config: model_lib.OneSearchConfig,
    params: Any,
    input_ids: Array,
    input_mask: Array,
    memory: Array,
    labels: Array,
    label_mask: Array,
) -> Array:
    """Sequence log-probs `[b, N]` of N candidate label rows `labels [b, N, t]` (`label_mask [b, N, t]`) per prompt
    (`input_ids / input_mask [b, n]`, `memory [b, 9, d]`): one teacher-forced pass over `b * N` rows."""
    b, n, t = labels.shape
    rep = functools.partial(jnp.repeat, repeats=n, axis=0)
    logits = model_lib.OneSearchModel(model_config).apply(
        {"params": params}, rep(input_ids), rep(input_mask), rep(memory), labels.reshape(b * n, t)
    )
    return sequence_logprobs(logits, labels.reshape(b * n, t), label_mask.reshape(b * n, t)).reshape(b, n)


def _dpo_logprobs(model_config, params, batch) -> tuple[Array, Array]:
    labels = jnp.concatenate([batch["chosen"][:, None], batch["rejected"]], axis=1)
    mask = jnp.concatenate([batch["chosen_mask"][:, None], batch["rejected_mask_tokens"]], axis=1)
    lp = candidate_logprobs(
        model_config, params, batch["input_ids"], batch["input_mask"], batch["memory"], labels, mask
    )
    return lp[:, 0], lp[:, 1:]


DPO_KEYS = ("input_ids", "input_mask", "memory", "chosen", "chosen_mask", "rejected", "rejected_mask_tokens")


def make_reference_fn(model_config: model_lib.OneSearchConfig):
    """Jitted `(params, batch) -> (ref_chosen [b], ref_rejected [b, K])` over the DPO batch keys `DPO_KEYS`."""

    @jax.jit
    def reference(params, batch):
        return _dpo_logprobs(model_config, params, {k: batch[k] for k in DPO_KEYS})

    return reference


def make_sample_fn(
    model_config: model_lib.OneSearchConfig, tree: pt.PrefixTree | None, num_levels: int, cfg: TPMAConfig
):
    """Jitted `(params, input_ids, input_mask, memory, rng, temperature) -> (tokens, old_logp)` `[b, G, L]`
    (`model.sample_sids` with G = cfg.num_samples; the temperature is an array: a new one does not recompile)."""

    @jax.jit
    def sample(params, input_ids, input_mask, memory, rng, temperature):
        return model_lib.sample_sids(
            model_config, params, input_ids, input_mask, memory, rng,
            num_samples=cfg.num_samples, tree=tree, num_levels=num_levels, temperature=temperature,
        )  # fmt: skip

    return sample


def _jitted_step(step, shardings: train_state.TrainState, mesh: Mesh):
    """jit `step(state, batch, lr)` once per batch key set, the batch sharded over its leading axis."""
    cache: dict[Any, Any] = {}

    def run(state: train_state.TrainState, batch: dict[str, Any], lr: Any):
        key = tuple(sorted((k, np.ndim(v)) for k, v in batch.items()))
        if key not in cache:
            batch_shardings = {k: sharding.batch_sharding(mesh, n) for k, n in key}
            cache[key] = jax.jit(
                step, in_shardings=(shardings, batch_shardings, None), out_shardings=(shardings, None),
                donate_argnums=0,
            )  # fmt: skip
        return cache[key](state, batch, lr)

    return run


def _with_lr(state: train_state.TrainState, lr: Array) -> train_state.TrainState:
    return state.replace(opt_state=optax.tree.set(state.opt_state, learning_rate=lr))


def make_dpo_step(
    model_config: model_lib.OneSearchConfig,
    tx: optax.GradientTransformation,
    shardings: train_state.TrainState,
    mesh: Mesh,
    cfg: DPOConfig,
):
    """`(state, batch, lr) -> (state, metrics)`, jitted (per batch key set), state donated.

    batch: input_ids, input_mask `[b, n]`, memory `[b, 9, d]`, chosen / chosen_mask `[b, t]`, rejected /
    rejected_mask_tokens `[b, K, t]`, rejected_valid `[b, K]`, ref_chosen `[b]`, ref_rejected `[b, K]`
    (`make_reference_fn`), optionally reward_chosen `[b]`, reward_rejected `[b, K]`."""

    def step(state: train_state.TrainState, batch: dict[str, Array], lr: Array):
        state = _with_lr(state, lr)

        def loss_fn(params):
            pi_chosen, pi_rejected = _dpo_logprobs(model_config, params, batch)
            return sdpo_loss(
                pi_chosen, pi_rejected, batch["ref_chosen"], batch["ref_rejected"], batch["rejected_valid"], cfg,
                batch.get("reward_chosen"), batch.get("reward_rejected"), batch["chosen_mask"].sum(-1),
            )  # fmt: skip

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads, tx)
        return state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    return _jitted_step(step, shardings, mesh)


def make_policy_step(
    model_config: model_lib.OneSearchConfig,
    tx: optax.GradientTransformation,
    shardings: train_state.TrainState,
    mesh: Mesh,
    cfg: TPMAConfig,
):
    """`(state, batch, lr) -> (state, metrics)`, jitted (per batch key set), state donated.

    batch: input_ids, input_mask `[b, n]`, memory `[b, 9, d]`, rollouts `[b, G, L]` token ids, old_logp,
    advantages, gate `[b, G, L]` (`tpma_batch`), sft_labels / sft_mask `[b, t]` (the first truth SID); optionally
    rollout_mask `[b, G, L]` (default all) and ref_logp `[b, G, L]` (for the KL)."""
    model = model_lib.OneSearchModel(model_config)

    def step(state: train_state.TrainState, batch: dict[str, Array], lr: Array):
        state = _with_lr(state, lr)
        rollouts = batch["rollouts"]
        b, g, length = rollouts.shape
        mask = batch.get("rollout_mask", jnp.ones(rollouts.shape, bool))
        rep = functools.partial(jnp.repeat, repeats=g, axis=0)

        def loss_fn(params):
            logits = model.apply(
                {"params": params}, rep(batch["input_ids"]), rep(batch["input_mask"]), rep(batch["memory"]),
                jnp.maximum(rollouts, 0).reshape(b * g, length),
            )  # fmt: skip
            logp = token_logprobs(logits, jnp.maximum(rollouts, 0).reshape(b * g, length)).reshape(b, g, length)
            loss, metrics = policy_loss(
                logp, batch["old_logp"], batch["advantages"], batch["gate"], mask, cfg, batch.get("ref_logp")
            )
            if cfg.sft_weight:
                sft_logits = model.apply(
                    {"params": params}, batch["input_ids"], batch["input_mask"], batch["memory"], batch["sft_labels"]
                )
                sft, _ = model_lib.sequence_loss(sft_logits, batch["sft_labels"], batch["sft_mask"])
                loss = loss + cfg.sft_weight * sft
                metrics["sft_loss"] = sft
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads, tx)
        return state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    return _jitted_step(step, shardings, mesh)
