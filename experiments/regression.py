r"""The core demo: a sharded residual-MLP regression that uses every piece of `jax_hd.core`.

Mesh and logical sharding rules from the config, a sharded jitted init and train step, a grain pipeline
whose position is checkpointed with the state, orbax checkpoints (resume, keep-N, SIGTERM), metrics to
TensorBoard / JSONL / console and a PNG of the curves. Rerunning the same command resumes from the last
checkpoint and reproduces the uninterrupted run bit for bit on CPU.

    python -m experiments.regression --config=experiments/configs/regression.py:cpu_demo \
        --workdir=runs/regression_demo
"""

from __future__ import annotations

import functools
import json
import os
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
from jax_hd.models.mlp import MLP, MLPConfig

F = config_lib.Field
SCHEMA = {
    "seed": F(int, low=0),
    "mesh.data": F(int, low=-1),
    "mesh.fsdp": F(int, low=-1),
    "mesh.tensor": F(int, low=-1),
    "distributed.mode": F(str, choices=("auto", "always", "never")),
    "model.in_dim": F(int, positive=True),
    "model.embed_dim": F(int, positive=True),
    "model.mlp_dim": F(int, positive=True),
    "model.num_blocks": F(int, low=0),
    "data.num_train": F(int, positive=True),
    "data.num_eval": F(int, positive=True),
    "data.noise_std": F(float, low=0.0),
    "data.batch_size": F(int, positive=True),
    "trainer.steps": F(int, positive=True),
    "trainer.lr": F(float, positive=True),
    "trainer.warmup_steps": F(int, low=0),
    "trainer.weight_decay": F(float, low=0.0),
    "trainer.grad_clip_norm": F(float, positive=True),
    "trainer.log_every": F(int, positive=True),
    "trainer.eval_every": F(int, positive=True),
    "trainer.checkpoint_every": F(int, positive=True),
    "trainer.keep_checkpoints": F(int, positive=True),
    "trainer.async_checkpoint": F(bool),
}


def synthetic_regression(num: int, in_dim: int, noise_std: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs `[num, in_dim]` ~ N(0, 1); targets `[num, 1]` from a fixed random two-layer teacher + noise.

    The teacher depends on `in_dim` and `seed` only, so train and eval sets (different seeds offset) share it.
    """
    teacher = np.random.default_rng(1234 + in_dim)
    w1 = teacher.normal(size=(in_dim, 4 * in_dim)) / np.sqrt(in_dim)
    w2 = teacher.normal(size=(4 * in_dim, 1)) / np.sqrt(4 * in_dim)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num, in_dim)).astype(np.float32)
    y = (np.tanh(x @ w1) @ w2 + noise_std * rng.normal(size=(num, 1))).astype(np.float32)
    return x, y


def make_train_iterator(config: ml_collections.ConfigDict, mesh: Mesh) -> grain.DatasetIterator:
    """This process's shuffled, repeated, batched stream of `{'x': [b, in], 'y': [b, 1]}` (checkpointable)."""
    global_batch = config.data.batch_size
    if global_batch % sharding.batch_parallelism(mesh) or global_batch % jax.process_count():
        raise ValueError(
            f"data.batch_size={global_batch} must divide by data*fsdp={sharding.batch_parallelism(mesh)} "
            f"and by the process count {jax.process_count()}"
        )
    x, y = synthetic_regression(config.data.num_train, config.model.in_dim, config.data.noise_std, config.seed)
    dataset = (
        grain.MapDataset.range(len(x))[jax.process_index() :: jax.process_count()]
        .shuffle(seed=config.seed)
        .repeat()
        .map(lambda i: {"x": x[i], "y": y[i]})
        .batch(global_batch // jax.process_count(), drop_remainder=True)
    )
    return iter(dataset.to_iter_dataset())


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    t = config.trainer
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1), t.steps)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), optax.adamw(schedule, weight_decay=t.weight_decay))


def mse_loss(model: MLP, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean squared error of `model` on `{'x': [b, in], 'y': [b, out]}`; fp32 scalar."""
    predictions = model.apply({"params": params}, batch["x"])
    return jnp.mean(jnp.square(predictions.astype(jnp.float32) - batch["y"]))


def make_train_step(
    model: MLP, tx: optax.GradientTransformation, state_shardings: train_state.TrainState, mesh: Mesh
):
    """Jitted `(state, batch) -> (state, {'loss', 'grad_norm'})`; state donated, layouts fixed."""

    def step(state: train_state.TrainState, batch: dict[str, jax.Array]):
        loss, grads = jax.value_and_grad(functools.partial(mse_loss, model))(state.params, batch)
        state = state.apply_gradients(grads, tx)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(
        step,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh, 2)),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )


def build(config: ml_collections.ConfigDict, mesh: Mesh):
    """Model, optimizer and the sharded initial state: `(model, tx, state, state_shardings)`."""
    rules = sharding.normalize_rules(config.sharding_rules)
    model = MLP(MLPConfig(**config.model.to_dict()))
    tx = make_optimizer(config)
    dummy = jnp.zeros((1, config.model.in_dim), jnp.float32)

    def init_fn(rng: jax.Array):
        return model.init(rng, dummy)["params"], None

    with nn.logical_axis_rules(rules):
        state, shardings = train_state.create_train_state(init_fn, tx, jax.random.PRNGKey(config.seed), mesh, rules)
    return model, tx, state, shardings


def train(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
    """Trains (resuming from `<workdir>/checkpoints` when it holds a checkpoint); returns the final state."""
    config_lib.validate(config, SCHEMA)
    d = config.distributed
    sharding.maybe_initialize_distributed(
        d.mode,
        d.coordinator_address or None,
        None if d.num_processes < 0 else d.num_processes,
        None if d.process_id < 0 else d.process_id,
    )
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.normalize_rules(config.sharding_rules)
    logging.info("mesh %s on %d devices", dict(mesh.shape), mesh.size)

    model, tx, state, state_shardings = build(config, mesh)
    train_iter = make_train_iterator(config, mesh)
    eval_x, eval_y = synthetic_regression(
        config.data.num_eval, config.model.in_dim, config.data.noise_std, config.seed + 1
    )
    rows = slice(jax.process_index(), None, jax.process_count())
    eval_batch = sharding.shard_batch({"x": eval_x[rows], "y": eval_y[rows]}, mesh)

    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    t = config.trainer
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        save_every=t.checkpoint_every,
        keep=t.keep_checkpoints,
        async_save=t.async_checkpoint,
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(state, train_iter)
    start = int(state.step)

    preempted = False
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        train_step = make_train_step(model, tx, state_shardings, mesh)
        eval_loss = jax.jit(functools.partial(mse_loss, model))
        writer = metrics.MetricWriter(workdir, t.steps, start_step=start, console_keys=("loss", "eval_loss"))
        for step in range(start + 1, t.steps + 1):
            state, step_metrics = train_step(state, sharding.shard_batch(next(train_iter), mesh))
            if step % t.log_every == 0 or step == t.steps:
                scalars = dict(step_metrics)
                if step % t.eval_every == 0 or step == t.steps:
                    scalars["eval_loss"] = eval_loss(state.params, eval_batch)
                writer.write(step, scalars)
            preempted = ckpt.should_stop(step)
            ckpt.save(step, state, train_iter, config, force=preempted or step == t.steps)
            if preempted:
                logging.warning("preempted: saved step %d; rerun the same command to resume", step)
                break
        final_eval_loss = float(eval_loss(state.params, eval_batch))
    writer.close()
    ckpt.close()
    if preempted:
        raise checkpoint.Preempted(f"saved step {int(state.step)}")
    if jax.process_index() == 0:
        metrics.plot_metrics(writer.jsonl_path, os.path.join(workdir, "metrics.png"), ["loss", "eval_loss"])
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump({"step": int(state.step), "eval_loss": final_eval_loss}, f)
        logging.info("done: step %d, eval_loss %.5f; outputs in %s", int(state.step), final_eval_loss, workdir)
    return state


if __name__ == "__main__":
    config_lib.run_experiment(train, fatal=(checkpoint.CheckpointMismatchError,), preempted=(checkpoint.Preempted,))
