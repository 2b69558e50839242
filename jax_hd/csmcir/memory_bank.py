"""Entropy-based, temporally dynamic negative memory bank as a fixed-size, jit-carried pytree (spec §6.4).

The CSMCIR paper only says its bank is "entropy-based" and "temporally dynamic" (spec §6.1); everything
below is our PROPOSAL (spec §6.4), each choice a `BankConfig` field:

* a FIFO ring buffer of unit-norm target embeddings `[M, K, D]` with their target ids and insertion steps,
  written at `ptr` with `lax.dynamic_update_slice` inside the jitted step (no host transfer);
* temporal dynamics: entries older than `max_age` steps are masked, an optional soft decay
  `exp(-age / tau_age)` enters the logits as an additive log-weight, and the bank is ignored for the first
  `warmup_steps` steps (it is still filled);
* false negatives (bank entries holding the query's own target id) are masked;
* entropy: with `p_i = softmax` of query i's logits over its valid entries and the normalised entropy
  `H_i = -sum_j p_ij log p_ij / log(M_valid_i)`, either weight query i's bank contribution by
  `g_i = 1 - H_i` ("peaked") or `g_i = H_i` ("flat"), or keep only its k entries with the largest
  `-p_ij log p_ij` ("topk").

Bank logits use the same (learnable) temperature as the in-batch logits (the paper's is UNKNOWN).
Under data parallelism the trainer enqueues the *global* batch (under `jax.jit` with Auto mesh axes an
array is already global), so the bank size must divide by the global batch (`check_bank_size`).
The bank shards along M (logical axis "bank", see `bank_logical_axes`).
"""

from __future__ import annotations

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

ENTROPY_MODES = ("none", "weight", "topk")
ENTROPY_WEIGHTS = ("peaked", "flat")
BANK_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MASKED_LOGIT = -1e9  # finite: adding a log-weight to it cannot overflow and a masked entry gets exp(.) == 0
MIN_GATE = 1e-6  # `weight` mode clips g_i here before its log, so log g_i >= -13.8 stays finite


@dataclasses.dataclass(frozen=True)
class BankConfig:
    """Memory-bank options. All PROPOSAL (spec §6.4): the paper's bank equations are UNKNOWN (spec §6.2).

    size: M, bank entries; 0 disables the bank (in-batch negatives only). Must divide by the global batch.
    max_age: entries older than this many steps are masked; <= 0 means no limit.
    tau_age: soft staleness decay `exp(-age / tau_age)`, added as `-age / tau_age` to the bank logits; 0 = off.
    entropy_mode: "none" | "weight" (scale each query's bank contribution by an entropy gate g_i) |
      "topk" (keep each query's `topk` bank entries with the largest `-p log p`).
    entropy_weight: `weight` mode gate: "peaked" g_i = 1 - H_i (focus on queries with confusable
      near-duplicates), "flat" g_i = H_i.
    topk: entries kept per query in `topk` mode (clipped to M).
    warmup_steps: the bank is ignored (but still filled) while `step < warmup_steps`.
    mask_false_negatives: mask bank entries whose target id equals the query's target id (FashionIQ and
      CIRR reuse targets across triplets).
    dtype: storage dtype of the embeddings, "float32" | "bfloat16"; logits are always computed in float32.
    enqueue_eval_mode: enqueue target embeddings recomputed in eval mode (no dropout, the step's pre-update params:
      what the gallery looks like at test time) instead of the training pass's dropped-out ones; one extra
      gradient-free target-tower forward per step, and only when the model has dropout (else they are equal).
    """

    size: int = 4096
    max_age: int = 0
    tau_age: float = 0.0
    entropy_mode: str = "weight"
    entropy_weight: str = "peaked"
    topk: int = 256
    warmup_steps: int = 0
    mask_false_negatives: bool = True
    dtype: str = "float32"
    enqueue_eval_mode: bool = False

    def __post_init__(self):
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"BankConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        for name in ("size", "max_age", "topk", "warmup_steps"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                fail(name, "an int")
        if self.size < 0:
            fail("size", ">= 0 (0 disables the bank)")
        if isinstance(self.tau_age, bool) or not isinstance(self.tau_age, (int, float)):
            fail("tau_age", "a float")
        if not (math.isfinite(self.tau_age) and self.tau_age >= 0):
            fail("tau_age", "finite and >= 0 (0 disables the decay)")
        if self.entropy_mode not in ENTROPY_MODES:
            fail("entropy_mode", f"one of {list(ENTROPY_MODES)}")
        if self.entropy_weight not in ENTROPY_WEIGHTS:
            fail("entropy_weight", f"one of {list(ENTROPY_WEIGHTS)}")
        if self.topk < 1:
            fail("topk", ">= 1")
        if self.warmup_steps < 0:
            fail("warmup_steps", ">= 0")
        for name in ("mask_false_negatives", "enqueue_eval_mode"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "a bool")
        if self.dtype not in BANK_DTYPES:
            fail("dtype", f"one of {list(BANK_DTYPES)}")

    @property
    def enabled(self) -> bool:
        return self.size > 0


@flax.struct.dataclass
class MemoryBank:
    """feats: `[M, K, D]` unit-norm target embeddings (K = tokens per target, 1 for CLS pooling);
    ids: `[M]` int32 target image id, -1 = empty; step: `[M]` int32 step of insertion;
    ptr: `[]` int32 next write row."""

    feats: jax.Array
    ids: jax.Array
    step: jax.Array
    ptr: jax.Array

    @property
    def size(self) -> int:
        return self.feats.shape[0]


def init_bank(config: BankConfig, tokens: int, dim: int) -> MemoryBank:
    """An empty bank: zero feats `[size, tokens, dim]` in `config.dtype`, ids -1, steps 0, ptr 0.

    Create it inside the jitted init (e.g. via `boxed_bank` + `core.sharding.sharded_init`) so it is born
    in the layout the train step returns and step 2 does not recompile.
    """
    if tokens < 1 or dim < 1:
        raise ValueError(f"init_bank: tokens and dim must be >= 1, got tokens={tokens}, dim={dim}")
    m = config.size
    return MemoryBank(
        feats=jnp.zeros((m, tokens, dim), BANK_DTYPES[config.dtype]),
        ids=jnp.full((m,), -1, jnp.int32),
        step=jnp.zeros((m,), jnp.int32),
        ptr=jnp.zeros((), jnp.int32),
    )


def bank_logical_axes() -> MemoryBank:
    """The bank's structure with logical-axis tuples as leaves (M is the "bank" axis)."""
    return MemoryBank(feats=("bank", None, None), ids=("bank",), step=("bank",), ptr=())


def boxed_bank(bank: MemoryBank) -> MemoryBank:
    """Wraps each leaf in `nn.LogicallyPartitioned` so `core.sharding.sharded_init` / `logical_shardings`
    place it by `bank_logical_axes()`."""
    return jax.tree.map(
        lambda x, names: nn.LogicallyPartitioned(x, names),
        bank,
        bank_logical_axes(),
        is_leaf=lambda x: isinstance(x, tuple),
    )


def check_bank_size(size: int, global_batch: int) -> None:
    """Raises ValueError unless `size == 0` or `size % global_batch == 0`."""
    if global_batch < 1:
        raise ValueError(f"global batch must be >= 1, got {global_batch}")
    if size < 0:
        raise ValueError(f"bank size must be >= 0, got {size}")
    if size == 0 or size % global_batch == 0:
        return
    lower = (size // global_batch) * global_batch
    upper = lower + global_batch
    nearest = [s for s in (lower, upper) if s > 0]
    raise ValueError(
        f"bank size {size} is not a multiple of the global batch {global_batch}: the enqueue's "
        "lax.dynamic_update_slice would clamp the last write silently and overwrite the wrong rows. "
        f"Use a multiple of {global_batch}, e.g. {' or '.join(map(str, nearest))} (or 0 to disable the bank)."
    )


def enqueue(bank: MemoryBank, feats: jax.Array, ids: jax.Array, step: jax.Array) -> MemoryBank:
    """Writes a batch at `ptr` (FIFO ring buffer) with `lax.dynamic_update_slice`; `ptr <- (ptr + B) % M`.

    feats: `[B, K, D]` unit-norm target embeddings (gradient stopped here, cast to the bank dtype);
    ids: `[B]` int target ids; step: `[]` int, the current training step, stored as the rows' insertion step.
    Pure and jit-able. Raises ValueError (at trace time) unless `M % B == 0` and K, D match. M = 0: no-op.
    `ptr` stays a multiple of B; one restored from a run with another batch size is rounded down to one.
    """
    m, k, d = bank.feats.shape
    if m == 0:
        return bank
    if feats.ndim != 3 or feats.shape[1:] != (k, d):
        raise ValueError(f"enqueue: feats must be [B, {k}, {d}] to match the bank, got {feats.shape}")
    b = feats.shape[0]
    if ids.shape != (b,):
        raise ValueError(f"enqueue: ids must be [{b}] to match feats, got {ids.shape}")
    check_bank_size(m, b)
    chunk = bank.ptr.astype(jnp.int32) // b

    def write(rows: jax.Array, new_rows: jax.Array) -> jax.Array:
        # The bank viewed as [M/B, B, ...] chunks, one chunk replaced: the same rows as writing at `ptr` (a
        # multiple of B), but XLA's SPMD partitioner then updates a bank sharded along M locally instead of
        # all-gathering it first (checked in tests/csmcir/test_memory_bank.py).
        chunks = rows.reshape(m // b, b, *rows.shape[1:])
        chunks = lax.dynamic_update_slice_in_dim(chunks, new_rows.astype(rows.dtype)[None], chunk, axis=0)
        return chunks.reshape(rows.shape)

    return MemoryBank(
        feats=write(bank.feats, lax.stop_gradient(feats)),
        ids=write(bank.ids, ids),
        step=write(bank.step, jnp.full((b,), step, jnp.int32)),
        ptr=((chunk + 1) * b) % m,
    )


def entry_mask(bank: MemoryBank, step: jax.Array, config: BankConfig) -> jax.Array:
    """`[M]` bool: entries that are filled, not older than `max_age`, and the bank is past warm-up."""
    mask = bank.ids >= 0
    if config.max_age > 0:
        mask &= (step - bank.step) <= config.max_age
    if config.warmup_steps > 0:
        mask &= step >= config.warmup_steps
    return mask


def normalized_entropy(logits: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax over the valid entries of each row and its entropy divided by log(#valid).

    logits, valid: `[B, M]`. Returns `(p [B, M] (0 where invalid), H [B] in [0, 1])`; a row with fewer
    than two valid entries has H = 0.
    """
    masked = jnp.where(valid, logits, MASKED_LOGIT)
    p = jnp.where(valid, jax.nn.softmax(masked, axis=-1), 0.0)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    num_valid = valid.sum(-1)
    norm = jnp.log(jnp.maximum(num_valid, 2).astype(jnp.float32))
    entropy = jnp.where(num_valid > 1, -plogp.sum(-1) / norm, 0.0)
    return p, jnp.clip(entropy, 0.0, 1.0)


def _top_k_mask(scores: jax.Array, valid: jax.Array, k: int) -> jax.Array:
    """`[B, M]` bool: per row, the k valid entries with the largest scores (all valid ones if fewer)."""
    k = min(k, scores.shape[-1])
    _, index = lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
    rows = jnp.arange(scores.shape[0])[:, None]
    return jnp.zeros(scores.shape, bool).at[rows, index].set(True) & valid


def bank_logits(
    query: jax.Array,
    bank: MemoryBank,
    query_target_ids: jax.Array,
    step: jax.Array,
    temperature: jax.Array,
    config: BankConfig,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Bank logits for a batch of queries, with every mask and log-weight of spec §6.4 applied.

    query: `[B, D]` unit-norm; query_target_ids: `[B]` int; step: `[]` int current step; temperature: `[]`.
    Returns:
      logits `[B, M]` float32: `max_k <q_i, feats_jk> / temperature - age_j / tau_age + log g_i` on valid
        entries, `MASKED_LOGIT` (finite) elsewhere;
      valid `[B, M]` bool after empty / age / warm-up / false-negative / top-k masking;
      stats (float32 scalars): bank_valid_fraction (of B*M), bank_entropy (mean H_i), bank_gate (mean g_i,
        1 unless `weight` mode), bank_false_negatives (mean same-id live entries per query, masked or not),
        bank_mean_age (steps, over filled entries).
    The entropy, the gate g_i and the top-k selection are computed from stop_gradient(logits): they
    select and weight negatives but are not themselves optimised.
    """
    from jax_hd.csmcir.losses import max_token_similarity  # deferred: losses imports this module

    logits = max_token_similarity(query, bank.feats) / temperature
    step = jnp.asarray(step, jnp.int32)
    live = entry_mask(bank, step, config)
    same_id = bank.ids[None, :] == query_target_ids[:, None].astype(jnp.int32)
    valid = live[None, :]
    if config.mask_false_negatives:
        valid = valid & ~same_id
    valid = jnp.broadcast_to(valid, logits.shape)

    p, entropy = normalized_entropy(lax.stop_gradient(logits), valid)
    gate = jnp.ones_like(entropy)
    log_weight = jnp.zeros_like(logits)
    if config.tau_age > 0:
        age = (step - bank.step).astype(jnp.float32)
        log_weight += -age[None, :] / config.tau_age
    if config.entropy_mode == "weight":
        gate = 1.0 - entropy if config.entropy_weight == "peaked" else entropy
        log_weight += jnp.log(jnp.clip(gate, MIN_GATE, 1.0))[:, None]
    elif config.entropy_mode == "topk":
        contribution = -jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
        valid = _top_k_mask(contribution, valid, config.topk)

    filled = bank.ids >= 0
    num_filled = jnp.maximum(filled.sum(), 1)
    stats = {
        "bank_valid_fraction": valid.mean(dtype=jnp.float32),
        "bank_entropy": entropy.mean(),
        "bank_gate": gate.mean(),
        "bank_false_negatives": (same_id & live[None, :]).sum(-1).mean(dtype=jnp.float32),
        "bank_mean_age": jnp.where(filled, step - bank.step, 0).sum().astype(jnp.float32) / num_filled,
    }
    return jnp.where(valid, logits + log_weight, MASKED_LOGIT), valid, stats
