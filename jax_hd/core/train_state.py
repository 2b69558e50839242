"""The training state every trainer carries through its jitted step, checkpointed whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import linen as nn
from jax.sharding import Mesh

from jax_hd.core import sharding


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar, number of applied updates; params, opt_state: pytrees; rng: uint32 `[2]` key;
    extra: any carried pytree that is not trained by the optimizer (a memory bank, EMA weights, a frozen
    reference policy), `{}` when unused.

    The optimizer itself is not part of the state: it is a (static) function passed to `apply_gradients`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: Any

    def apply_gradients(self, grads: Any, tx: optax.GradientTransformation, **extra_updates: Any) -> TrainState:
        """One optimizer update; `extra_updates` replace entries of `extra` (a dict)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        extra = {**self.extra, **extra_updates} if extra_updates else self.extra
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state, extra=extra)

    def split_rng(self) -> tuple[TrainState, jax.Array]:
        """Returns the state with a fresh carried key and a key for this step's use."""
        rng, step_rng = jax.random.split(self.rng)
        return self.replace(rng=rng), step_rng


def _initial_state(
    init_fn: Callable[[jax.Array], tuple[Any, Any]], tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params, extra = init_fn(init_rng)
    # tx.init maps over the boxed params, so the optimizer moments inherit their logical partitioning.
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=state_rng,
        extra={} if extra is None else extra,
    )


def create_train_state(
    init_fn: Callable[[jax.Array], tuple[Any, Any]],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    rules: sharding.Rules | None = None,
) -> tuple[TrainState, TrainState]:
    """Builds the initial state directly in its sharded layout; returns `(state, state_shardings)`.

    init_fn: `rng -> (params, extra)`, where leaves may be `nn.LogicallyPartitioned` (e.g. Linen's
      `model.init` with `nn.with_logical_partitioning` initializers); unannotated leaves are replicated.
    Pass `state_shardings` as the in/out shardings of the train step, and as the restore target's layout.
    """
    return sharding.sharded_init(lambda r: _initial_state(init_fn, tx, r), rng, mesh=mesh, rules=rules)


def abstract_train_state(
    init_fn: Callable[[jax.Array], tuple[Any, Any]],
    tx: optax.GradientTransformation,
    rng: jax.Array,
    mesh: Mesh,
    rules: sharding.Rules | None = None,
) -> TrainState:
    """The state's shapes, dtypes and shardings (`jax.ShapeDtypeStruct` leaves) without allocating it."""
    abstract = jax.eval_shape(lambda r: _initial_state(init_fn, tx, r), rng)
    shardings = sharding.logical_shardings(abstract, mesh, rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract), shardings
    )


# ------------------------------------------------------------------------------------------------------------------
# Skipping non-finite updates.


class NonFiniteError(RuntimeError):
    """Too many consecutive updates had a NaN/inf loss or gradient."""


def all_finite(loss: jax.Array, grads: Any) -> jax.Array:
    """Scalar bool: the loss and every gradient entry are finite."""
    leaves = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
    return jnp.logical_and(jnp.isfinite(loss), jnp.all(jnp.stack(leaves)) if leaves else True)


def guarded_update(state: TrainState, grads: Any, tx: optax.GradientTransformation, finite: jax.Array) -> TrainState:
    """`state.apply_gradients(grads, tx)` when `finite`, else the same params and optimizer state; the step counts
    either way (so a trainer's iteration number stays `step // updates_per_iteration`)."""
    updated = state.apply_gradients(grads, tx)

    def select(new: Any, old: Any) -> Any:
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    return updated.replace(params=select(updated.params, state.params),
                           opt_state=select(updated.opt_state, state.opt_state))


class NonFiniteGuard:
    """Counts consecutive skipped (non-finite) updates on the host; raises `NonFiniteError` at `max_in_a_row`.

    `limit_field` names the config field holding the limit, for the error message."""

    def __init__(self, max_in_a_row: int, limit_field: str = "trainer.max_consecutive_nonfinite"):
        self.max_in_a_row, self.limit_field, self.in_a_row = max_in_a_row, limit_field, 0

    def update(self, skipped: bool, step: int) -> None:
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logging.warning("optimizer step %d: non-finite loss or gradient, update skipped (%d in a row)", step,
                        self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(f"{self.in_a_row} consecutive updates had a non-finite loss or gradient (last at "
                                 f"optimizer step {step}); stopping ({self.limit_field})")
