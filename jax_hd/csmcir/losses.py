"""CSMCIR contrastive losses over the batch and the memory bank, and SPRC's auxiliary losses.

The CSMCIR loss is UNKNOWN beyond "contrastive with bank negatives" (spec §7); our PROPOSAL is the
§6.4 InfoNCE over batch ∪ bank:

    L_i = -l_ii + logsumexp([l_ib]_b ∪ [l_ij + log w_j + log g_i]_{j valid in the bank}),   loss = mean_i L_i

with `l = max_k <q, t_k> / temperature` (spec §5.3). `sprc_losses` reproduces SPRC's itc / rtc / align
terms (spec §5.4) for the asymmetric baseline and the optional auxiliary losses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jax_hd.csmcir.memory_bank import MASKED_LOGIT, BankConfig, MemoryBank, bank_logits


def max_token_similarity(query: jax.Array, targets: jax.Array) -> jax.Array:
    """`[B, D]` queries x `[N, K, D]` multi-token targets -> `[B, N]` float32 `max_k <q_b, t_nk>`."""
    if query.ndim != 2 or targets.ndim != 3 or query.shape[-1] != targets.shape[-1]:
        shapes = f"{query.shape} and {targets.shape}"
        raise ValueError(f"max_token_similarity: expected query [B, D] and targets [N, K, D], got {shapes}")
    return jnp.einsum("bd,nkd->bnk", query, targets, preferred_element_type=jnp.float32).max(-1)


def _masked_info_nce(logits: jax.Array, valid: jax.Array) -> jax.Array:
    """Per-row `-l_ii + logsumexp(valid l_i.)` for square `[B, B]` logits whose diagonal is the positive."""
    positive = jnp.diagonal(logits)
    return jax.nn.logsumexp(jnp.where(valid, logits, MASKED_LOGIT), axis=-1) - positive


def contrastive_loss(
    query: jax.Array,
    targets: jax.Array,
    target_ids: jax.Array,
    temperature: jax.Array,
    *,
    bank: MemoryBank | None = None,
    bank_config: BankConfig | None = None,
    step: jax.Array | None = None,
    mask_batch_duplicates: bool = True,
    symmetric_weight: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Query -> target InfoNCE over in-batch targets and (optionally) the memory bank (spec §6.4).

    query: `[B, D]` unit-norm composed queries; targets: `[B, K, D]` unit-norm target embeddings (row i is
    query i's positive); target_ids: `[B]` int target image ids; temperature: `[]` (learnable or fixed).
    bank, bank_config, step: the bank is used when both are given and `bank_config.size > 0`; `step` (`[]`
      int, the current training step) is then required.
    mask_batch_duplicates: in-batch j != i with `target_ids[j] == target_ids[i]` are not negatives of i.
    symmetric_weight: PROPOSAL, adds `symmetric_weight *` a target -> query in-batch InfoNCE (same masking).
    Returns `(loss [], metrics)`: loss, loss_q2t, loss_t2q (when symmetric), batch_acc (in-batch argmax ==
    diagonal), num_negatives (mean effective negatives per query), plus `bank_logits`'s stats.
    """
    batch = query.shape[0]
    if targets.ndim != 3 or targets.shape[0] != batch or target_ids.shape != (batch,):
        raise ValueError(
            f"contrastive_loss: expected targets [{batch}, K, D] and target_ids [{batch}], got "
            f"{targets.shape} and {target_ids.shape}"
        )
    logits = max_token_similarity(query, targets) / temperature
    valid = jnp.ones((batch, batch), bool)
    if mask_batch_duplicates:
        valid = (target_ids[:, None] != target_ids[None, :]) | jnp.eye(batch, dtype=bool)
    masked = jnp.where(valid, logits, MASKED_LOGIT)
    metrics = {
        "batch_acc": (jnp.argmax(masked, axis=-1) == jnp.arange(batch)).mean(dtype=jnp.float32),
    }
    num_negatives = valid.sum(-1) - 1

    use_bank = bank is not None and bank_config is not None and bank_config.enabled
    if use_bank:
        if bank.size != bank_config.size:
            raise ValueError(
                f"contrastive_loss: bank has {bank.size} entries but bank_config.size is {bank_config.size}"
            )
        if step is None:
            raise ValueError("contrastive_loss: `step` is required when a bank is used")
        extra_logits, extra_valid, bank_stats = bank_logits(query, bank, target_ids, step, temperature, bank_config)
        metrics.update(bank_stats)
        num_negatives = num_negatives + extra_valid.sum(-1)
        all_logits = jnp.concatenate([masked, extra_logits], axis=-1)
        loss_q2t = (jax.nn.logsumexp(all_logits, axis=-1) - jnp.diagonal(logits)).mean()
    else:
        loss_q2t = _masked_info_nce(logits, valid).mean()

    loss = loss_q2t
    metrics["loss_q2t"] = loss_q2t
    if symmetric_weight > 0:
        loss_t2q = _masked_info_nce(logits.T, valid.T).mean()
        metrics["loss_t2q"] = loss_t2q
        loss = loss + symmetric_weight * loss_t2q
    metrics["loss"] = loss
    metrics["num_negatives"] = num_negatives.mean(dtype=jnp.float32)
    return loss, metrics


def sprc_losses(
    fusion_query: jax.Array,
    rtc_query: jax.Array,
    targets: jax.Array,
    temperature: jax.Array,
    fusion_query_tokens: jax.Array,
    prompt_tokens: jax.Array,
) -> dict[str, jax.Array]:
    """SPRC's three losses (spec §5.4; `blip2_qformer_cir_align_prompt.py::forward`), each a float32 scalar.

    fusion_query, rtc_query: `[B, D]` unit-norm (fusion query; CLS of the prompt-token text pass);
    targets: `[B, K, D]` unit-norm; temperature: `[]`;
    fusion_query_tokens: `[B, Q, H]` Q-Former outputs at the learned-query positions of the fusion pass;
    prompt_tokens: `[Q, H]`, `[1, Q, H]` or `[B, Q, H]` learned prompt tokens.
    Returns {"itc": CE(max_k <f_i, t_jk> / tau, i) mean over i, "rtc": the same for rtc_query,
      "align": mean over [B, H] of (mean_Q fusion_query_tokens - stop_gradient(mean_Q prompt_tokens))^2}.
    """
    labels = jnp.arange(fusion_query.shape[0])

    def itc(query: jax.Array) -> jax.Array:
        logits = max_token_similarity(query, targets) / temperature
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    fused = fusion_query_tokens.astype(jnp.float32).mean(axis=-2)
    prompt = lax.stop_gradient(prompt_tokens).astype(jnp.float32).mean(axis=-2)
    align = jnp.mean(jnp.square(fused - jnp.broadcast_to(prompt, fused.shape)))
    return {"itc": itc(fusion_query), "rtc": itc(rtc_query), "align": align}
