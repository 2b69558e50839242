"""Relapse guards of the OneSearch generator (issue 21): is the encoder still reading the request?

With tied embeddings and a full-vocabulary softmax at SID positions the text-token embeddings collapse onto one
direction and the generator's first-token logits stop depending on the request (every request gets the same
beams). These pure functions measure both, so every run logs them (`trainer.run_stage`):

* `embedding_anisotropy`: share of the variance of the (centred) text-token embedding rows along their top
  principal direction (about 1/d for random rows; 0.84-0.90 after the collapse) and the mean |cos| between rows
  (about sqrt(2 / (pi d)) for random rows; 0.8 after the collapse);
* `logit_spread`: how much the first SID token's logits vary across requests (std across requests, mean over the
  level-1 SID tokens; 1e-6 after the collapse) and how many distinct level-1 argmaxes a batch of requests has.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jax_hd.onesearch import model as model_lib

Array = jax.Array


def embedding_anisotropy(embeddings: Array) -> dict[str, Array]:
    """`embeddings [n, d]` (n >= 2 rows) -> {'top_variance_share', 'mean_abs_cos'} float32 scalars.

    top_variance_share: largest eigenvalue of the rows' covariance over its trace (centred rows); mean_abs_cos:
    mean |cosine| over the n * (n - 1) ordered pairs of distinct rows (zero rows count as cosine 0)."""
    x = embeddings.astype(jnp.float32)
    n = x.shape[0]
    centred = x - x.mean(axis=0, keepdims=True)
    s = jnp.linalg.svd(centred, compute_uv=False)
    share = s[0] ** 2 / jnp.maximum(jnp.sum(s**2), 1e-30)
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    cos = jnp.abs(unit @ unit.T)
    mean_abs_cos = (jnp.sum(cos) - jnp.sum(jnp.diagonal(cos))) / (n * (n - 1))
    return {"top_variance_share": share, "mean_abs_cos": mean_abs_cos}


def logit_spread(logits: Array) -> dict[str, Array]:
    """First-token logits `[b, k]` of b requests over k candidate tokens -> {'logit_std_across_requests' (std over
    the b requests, mean over the k tokens), 'distinct_top1_share' (distinct argmaxes / b)} float32 scalars."""
    logits = logits.astype(jnp.float32)
    std = jnp.mean(jnp.std(logits, axis=0))
    top = jnp.argmax(logits, axis=-1)
    k = logits.shape[-1]
    distinct = jnp.sum(jnp.zeros((k,), jnp.int32).at[top].max(1))
    return {"logit_std_across_requests": std, "distinct_top1_share": distinct / logits.shape[0]}


def token_embeddings(model_config: model_lib.OneSearchConfig, params: Any) -> Array:
    """The backbone's (tied) token embedding table `[vocab, d]`."""
    backbone = params["backbone"]
    table = (
        backbone["shared"]["embedding"] if model_config.backbone == "bart" else backbone["embed_tokens"]["embedding"]
    )
    return jnp.asarray(getattr(table, "value", table))


def relapse_metrics(
    model_config: model_lib.OneSearchConfig,
    params: Any,
    batch: dict[str, Array],
    text_rows: tuple[int, int],
    first_level: tuple[int, int],
) -> dict[str, Array]:
    """Anisotropy of the text-token embeddings (rows `text_rows = (first, end)`, pad excluded by the caller) and
    the spread of the first SID token's logits (tokens `first_level = (first, end)`) across the requests of `batch`
    (`input_ids`, `input_mask [b, n]`, `memory [b, 9, d]`). Scalars named `relapse/...`; call inside jit."""
    table = token_embeddings(model_config, params)
    out = {f"relapse/text_{k}": v for k, v in embedding_anisotropy(table[text_rows[0] : text_rows[1]]).items()}
    b = batch["input_ids"].shape[0]
    labels = jnp.full((b, 1), first_level[0], jnp.int32)  # a SID label: the (restricted) first-token logits
    logits = model_lib.OneSearchModel(model_config).apply(
        {"params": params}, batch["input_ids"], batch["input_mask"], batch["memory"], labels
    )[:, 0, first_level[0] : first_level[1]]
    out.update({f"relapse/first_token_{k}": v for k, v in logit_spread(logits).items()})
    return out
