"""Orbax checkpoints of a TrainState together with the grain iterator's position and the config.

A checkpoint directory `<workdir>/checkpoints/<step>/` holds three items: `state` (the whole pytree,
sharded arrays written by every process), `data_iter` (the grain iterator state, so a resumed run reads
exactly the batches the uninterrupted run would have read) and `config` (JSON, for the record).

SIGTERM (a TPU VM being preempted, a scheduler stopping the job) only sets a flag; the training loop asks
`should_stop(step)` after each step, saves, and exits, so a checkpoint is never written from a signal
handler in the middle of a step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging


class Preempted(Exception):
    """Raised by a training loop after it saved a checkpoint because `should_stop` said so (SIGTERM, preemption)."""


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk does not fit the state the current config builds."""


def _metadata_shapes(tree_metadata: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    tree = getattr(tree_metadata, "tree", tree_metadata)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "name"))
    return {leaf.name: (tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves if hasattr(leaf, "name")}


def _param_name(path: tuple) -> str:
    """A key path as orbax names the saved array: `params.layer_0.kernel`, `opt_state.1.0.mu.w`."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return ".".join(parts)


def check_compatible(tree_metadata: Any, target: Any) -> None:
    """Raises CheckpointMismatchError naming the first parameter path whose shape or presence differs.

    tree_metadata: orbax metadata of a saved pytree; target: the pytree (arrays or ShapeDtypeStructs) to
    restore into.
    """
    saved = _metadata_shapes(tree_metadata)
    expected = {
        _param_name(path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]
    }
    for name, (shape, dtype) in expected.items():
        if name not in saved:
            raise CheckpointMismatchError(
                f"checkpoint has no parameter {name!r} (expected shape {shape}); it was written by a "
                "different model or config"
            )
        saved_shape, saved_dtype = saved[name]
        if saved_shape != shape:
            raise CheckpointMismatchError(
                f"parameter {name!r} has shape {saved_shape} in the checkpoint but {shape} in the current "
                "config"
            )
        if saved_dtype != dtype:
            raise CheckpointMismatchError(
                f"parameter {name!r} has dtype {saved_dtype} in the checkpoint but {dtype} in the current config"
            )
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise CheckpointMismatchError(
            f"checkpoint has parameter {extra[0]!r} (shape {saved[extra[0]][0]}) that the current config "
            f"does not build ({len(extra)} such entries)"
        )


def _config_json(config: ml_collections.ConfigDict | dict | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, ml_collections.ConfigDict):
        return json.loads(config.to_json_best_effort())
    return dict(config)


class Checkpointer:
    """Saves and restores `(state, data iterator, config)` with an orbax `CheckpointManager`.

    Args:
      directory: where step directories go (created).
      save_every: save when `step % save_every == 0` (plus forced saves: the last step, preemption).
      keep: how many of the newest checkpoints to keep.
      async_save: write in a background thread while training continues.
      handle_sigterm: install a SIGTERM handler that makes `should_stop` true (main thread only).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int = 3,
        async_save: bool = True,
        handle_sigterm: bool = True,
    ):
        if save_every <= 0 or keep <= 0:
            raise ValueError(f"save_every and keep must be positive, got {save_every}, {keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item, save_args, restore_args, handler in (
            ("state", ocp.args.StandardSave, ocp.args.StandardRestore, ocp.StandardCheckpointHandler),
            ("config", ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler),
            ("data_iter", grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore,
             grain.checkpoint.CheckpointHandler),
        ):
            registry.add(item, save_args, handler)
            registry.add(item, restore_args, handler)
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._sigterm = threading.Event()
        self._previous_handler = None
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        logging.warning("SIGTERM received: will save a checkpoint after the current step and stop")
        self._sigterm.set()

    @property
    def preemption_requested(self) -> bool:
        return self._sigterm.is_set()

    def should_stop(self, step: int) -> bool:
        """True when the run must save now and exit: SIGTERM here, or a JAX-coordinated preemption notice."""
        return self._sigterm.is_set() or self._manager.reached_preemption(step)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Iterator | None = None,
        config: ml_collections.ConfigDict | dict | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves if `step` is due (or `force`); returns whether a save started."""
        items: dict[str, Any] = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(_config_json(config)),
        }
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.debug("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def restore(self, target: Any, data_iter: Iterator | None = None, step: int | None = None) -> Any:
        """Restores the state at `step` (default: latest) into `target`'s structure, shapes and shardings.

        target: a state pytree of arrays or `jax.ShapeDtypeStruct`s (with `.sharding`); `data_iter` is
        restored in place. Raises FileNotFoundError when there is no checkpoint and
        CheckpointMismatchError when the saved tree does not match `target`.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint{'' if step is None else f' for step {step}'} in {self.directory}")
        metadata = self._manager.item_metadata(step)
        check_compatible(metadata["state"], target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target
        )
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract)}
        if data_iter is not None:
            if not os.path.isdir(os.path.join(self.directory, str(step), "data_iter")):
                raise CheckpointMismatchError(f"checkpoint {step} in {self.directory} has no data-iterator state")
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored["state"]

    def saved_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return dict(self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

    def wait(self) -> None:
        """Blocks until an asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
