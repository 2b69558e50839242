import os
import signal
import subprocess
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from experiments import regression
from experiments.configs import regression as regression_configs
from jax_hd.core import checkpoint, sharding, train_state
from jax_hd.core import config as config_lib


def _tiny_state(mesh, hidden=8, bank=16):
    def init_fn(rng):
        params = {"w": nn.LogicallyPartitioned(jax.random.normal(rng, (4, hidden)), ("embed", "mlp"))}
        extra = {"bank": nn.LogicallyPartitioned(jnp.arange(bank * 2.0).reshape(bank, 2), ("bank", None))}
        return params, extra

    return train_state.create_train_state(init_fn, optax.adam(1e-2), jax.random.PRNGKey(0), mesh)


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=3).repeat().batch(4).to_iter_dataset())


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_round_trip_restores_state_layout_and_iterator_position(tmp_path, mesh):
    state, shardings = _tiny_state(mesh)
    grads = jax.tree.map(jnp.ones_like, state.params)
    state = state.apply_gradients(grads, optax.adam(1e-2), bank=state.extra["bank"] + 1)
    it = _iterator()
    for _ in range(3):
        next(it)
    with checkpoint.Checkpointer(tmp_path, save_every=1, handle_sigterm=False) as ckpt:
        assert ckpt.save(1, state, it, {"lr": 0.1})
        ckpt.wait()
        expected_batches = [next(it) for _ in range(2)]

        fresh, _ = _tiny_state(mesh)
        fresh_it = _iterator()
        restored = ckpt.restore(fresh, fresh_it)
        assert ckpt.saved_config() == {"lr": 0.1}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
    assert restored.params["w"].sharding == shardings.params["w"]
    assert restored.extra["bank"].sharding.spec == shardings.extra["bank"].spec
    for batch in expected_batches:
        np.testing.assert_array_equal(next(fresh_it), batch)


def test_keeps_the_last_n_and_restores_the_latest(tmp_path, mesh):
    state, _ = _tiny_state(mesh)
    with checkpoint.Checkpointer(tmp_path, save_every=2, keep=2, handle_sigterm=False) as ckpt:
        for step in range(1, 8):
            ckpt.save(step, state.replace(step=jnp.int32(step)))
        ckpt.wait()
        assert ckpt.all_steps() == [4, 6]
        assert int(ckpt.restore(state).step) == 6
        assert int(ckpt.restore(state, step=4).step) == 4
        assert ckpt.save(7, state, force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 7


def test_missing_checkpoint_is_a_clear_error(tmp_path, mesh):
    state, _ = _tiny_state(mesh)
    with checkpoint.Checkpointer(tmp_path, save_every=1, handle_sigterm=False) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            ckpt.restore(state)


def test_restoring_into_a_different_shape_names_the_parameter(tmp_path, mesh):
    state, _ = _tiny_state(mesh, hidden=8)
    with checkpoint.Checkpointer(tmp_path, save_every=1, handle_sigterm=False) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        wider, _ = _tiny_state(mesh, hidden=16)
        with pytest.raises(checkpoint.CheckpointMismatchError) as e:
            ckpt.restore(wider)
        assert "parameter 'params.w' has shape (4, 8) in the checkpoint but (4, 16) in the current config" in str(
            e.value
        )
        other = state.replace(params={"v": state.params["w"]})
        with pytest.raises(checkpoint.CheckpointMismatchError, match="checkpoint has no parameter 'params.v'"):
            ckpt.restore(other)
        with pytest.raises(checkpoint.CheckpointMismatchError, match="has no data-iterator state"):
            ckpt.restore(state, _iterator())


def test_check_compatible_reports_the_first_mismatch_in_tree_order(tmp_path, mesh):
    state, _ = _tiny_state(mesh, hidden=8)
    with checkpoint.Checkpointer(tmp_path, save_every=1, handle_sigterm=False) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        wider, _ = _tiny_state(mesh, hidden=16)
        metadata = ckpt._manager.item_metadata(1)["state"]
    # Tree order of TrainState: step, params, opt_state, ... so the parameter itself is reported first.
    with pytest.raises(checkpoint.CheckpointMismatchError, match="'params.w' has shape \\(4, 8\\) in the checkpoint"):
        checkpoint.check_compatible(metadata, wider)


# --- Whole runs in subprocesses: kill -9 and SIGTERM, then resume. --------------------------------------

CONFIG = "--config=experiments/configs/regression.py:cpu_test"


def _command(python, workdir):
    return [python, "-m", "experiments.regression", CONFIG, f"--workdir={workdir}"]


def _committed_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _start_and_wait_for_checkpoint(python, workdir, env, cwd, min_step=30):
    """Starts a run and returns it once a committed checkpoint at step >= min_step exists."""
    proc = subprocess.Popen(_command(python, workdir), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(s >= min_step for s in _committed_steps(workdir)):
        assert proc.poll() is None, f"run ended early:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    return proc


def _final_state(workdir):
    config = regression_configs.get_config("cpu_test")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    _, _, target, _ = regression.build(config, mesh)
    with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, handle_sigterm=False) as ckpt:
        return jax.device_get(ckpt.restore(target)), ckpt.latest_step()


def _run(python, workdir, env, cwd):
    result = subprocess.run(_command(python, workdir), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, python, subprocess_env, repo_root):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    _run(python, workdir, subprocess_env, repo_root)
    return _final_state(workdir)


def _assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, uninterrupted, python, subprocess_env, repo_root):
    proc = _start_and_wait_for_checkpoint(python, str(tmp_path), subprocess_env, repo_root)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_committed_steps(tmp_path))
    assert 30 <= killed_at < 300
    resumed = _run(python, str(tmp_path), subprocess_env, repo_root)
    assert "restored step" in resumed.stderr
    final, last = _final_state(str(tmp_path))
    expected, expected_last = uninterrupted
    assert last == expected_last == 300
    _assert_bit_identical(final, expected)
    steps = [row["step"] for row in __import__("jax_hd.core.metrics").core.metrics.read_metrics(
        os.path.join(tmp_path, "metrics.jsonl"))]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint_and_exits(tmp_path, uninterrupted, python, subprocess_env, repo_root):
    proc = _start_and_wait_for_checkpoint(python, str(tmp_path), subprocess_env, repo_root)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == config_lib.EXIT_PREEMPTED, stderr[-3000:]
    assert "preempted: saved step" in stderr
    state, step = _final_state(str(tmp_path))
    assert 30 <= step < 300 and int(state.step) == step
    _run(python, str(tmp_path), subprocess_env, repo_root)
    _assert_bit_identical(_final_state(str(tmp_path))[0], uninterrupted[0])
