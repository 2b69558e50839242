"""OneSearch SFT trainer on the `cpu_test` preset: stage data, the long-sequence memory, step parity on the 8-device
mesh vs 1 device, resume mid-stage == uninterrupted, a checkpoint of another config, and all three stages + eval end
to end (in-process). One prepared setup (and its compiled step) is shared by the module."""

import dataclasses
import json
import os

import chex
import jax
import numpy as np
import pytest

from experiments.configs import onesearch as configs
from jax_hd.core import checkpoint, sharding
from jax_hd.onesearch import model as model_lib
from jax_hd.onesearch import trainer

RULES = sharding.DEFAULT_RULES


@pytest.fixture(scope="module")
def config():
    return configs.get_config("cpu_test")


@pytest.fixture(scope="module")
def setup(config):
    return trainer.prepare(config)


@pytest.fixture(scope="module")
def mesh8():
    return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def test_stage_data(setup, config):
    vocab, layout = setup.vocab, setup.layout
    mem = vocab.special("[MEM]")
    for stage, ex in setup.stages.items():
        assert len(ex) > 0 and ex.input_ids.shape == (len(ex), setup.input_length), stage
        assert (ex.input_ids[:, 0] == vocab.special("[BOS]")).all() and (ex.labels[:, 0] != 0).all()
        assert ex.input_ids.max() < vocab.vocab_size
    s3 = setup.stages["stage3"]
    assert ((s3.input_ids == mem).sum(axis=1) == layout.num_memory).all()
    # Stage-3 labels are the target items' SIDs.
    np.testing.assert_array_equal(s3.labels[:, : vocab.num_levels], vocab.sid_tokens(setup.item_codes[s3.targets]))
    assert setup.info["stage3_sliding_window"] > 0
    assert setup.info["stage_examples"]["stage3"] == setup.info["stage3_base"] + setup.info["stage3_sliding_window"]
    # Stage 1/2 prompts start with a task token and carry no memory slots.
    task_ids = {vocab.special(t) for t in model_lib.TASK_TOKENS}
    assert set(setup.stages["stage1"].input_ids[:, 1].tolist()) <= task_ids
    assert not (setup.stages["stage1"].input_ids == mem).any()
    # Long sequences hold items (< num_items) in the click/order streams and queries in the search stream.
    n_items = len(setup.world.catalog)
    items, searches = s3.long[:, :2], s3.long[:, 2]
    assert (items[items >= 0] < n_items).all() and (searches[searches >= 0] >= n_items).all()
    for which, ex in setup.eval_sets.items():
        assert len(ex) > 0 and setup.eval_slices[which]["cold_item"].shape == (len(ex),)
    assert setup.tree.num_items == n_items


def test_long_memory_hand_values():
    tables = (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[10.0, 0.0], [0.0, 10.0], [5.0, 5.0]]))
    rows = np.array([[0, 2], [1, 0], [1, 1]])  # entity -> (level-1 row, level-2 row)
    seqs = np.array([[[0, 1, -1], [2, -1, -1], [-1, -1, -1]]])  # click: 0, 1; order: 2; search: none
    out = trainer.long_memory(tables, rows, seqs)
    assert out.shape == (1, 6, 2)
    np.testing.assert_allclose(out[0], [[1, 1], [15, 5], [0, 1], [0, 10], [0, 0], [0, 0]])


def _state(setup, mesh, params=None):
    fns = trainer.compiled(setup, mesh, RULES)
    if params is None:
        params = trainer.init_model_params(setup.model_config, 0, mesh, RULES)
    with jax.set_mesh(mesh):
        return fns, fns["init"](jax.device_get(params), jax.random.PRNGKey(3))


def test_step_on_8_devices_matches_1_device(setup, mesh8):
    mesh1 = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    batch = trainer.make_batch(setup.stages["stage3"], np.arange(16), setup.tables, setup.entity_rows)
    params = jax.device_get(trainer.init_model_params(setup.model_config, 0, mesh1, RULES))
    out = {}
    for name, mesh in (("one", mesh1), ("eight", mesh8)):
        fns, state = _state(setup, mesh, params)
        with jax.set_mesh(mesh):
            state, m = fns["step"](state, sharding.shard_batch(batch, mesh), np.float32(1e-3))
        out[name] = (jax.device_get(state.params), float(m["loss"]))
    assert np.isfinite(out["one"][1]) and out["one"][1] == pytest.approx(out["eight"][1], rel=1e-5)
    chex.assert_trees_all_close(out["one"][0], out["eight"][0], atol=2e-6, rtol=1e-5)


def test_resume_mid_stage_matches_uninterrupted(setup, mesh8, tmp_path):
    params = trainer.init_model_params(setup.model_config, 0, mesh8, RULES)
    steps = trainer.stage_steps(setup.config, "stage1")
    straight, _ = trainer.run_stage(setup, "stage1", params, str(tmp_path / "a"), mesh8, evaluate_after=False)
    half, results = trainer.run_stage(
        setup, "stage1", params, str(tmp_path / "b"), mesh8, stop_at_step=steps // 2, evaluate_after=False
    )
    assert results is None
    saved = checkpoint.Checkpointer(str(tmp_path / "b" / "stage1" / "checkpoints"), save_every=1, handle_sigterm=False)
    assert saved.latest_step() == steps // 2
    saved.close()
    resumed, _ = trainer.run_stage(setup, "stage1", params, str(tmp_path / "b"), mesh8, evaluate_after=False)
    chex.assert_trees_all_equal(jax.device_get(straight), jax.device_get(resumed))
    changed = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        jax.device_get(params),
        jax.device_get(straight),
    )
    assert max(jax.tree.leaves(changed)) > 0  # training moved the params

    # A checkpoint written under another model config: a clear error naming the parameter.
    other = dataclasses.replace(
        setup,
        model_config=trainer.build_model_config(
            _wider(setup.config), setup.vocab, setup.model_config.memory_dim, setup.input_length
        ),
        cache={},
    )
    other_params = trainer.init_model_params(other.model_config, 0, mesh8, RULES)
    with pytest.raises(checkpoint.CheckpointMismatchError, match="shape"):
        trainer.run_stage(other, "stage1", other_params, str(tmp_path / "b"), mesh8, evaluate_after=False)


def _wider(config):
    c = config.copy_and_resolve_references()
    c.model.d_model = 2 * config.model.d_model
    return c


@pytest.mark.slow  # all three SFT stages + constrained / unconstrained beam-search evaluation in-process
def test_cpu_test_end_to_end(setup, config, mesh8, tmp_path):
    results = trainer.train(config, str(tmp_path), setup=setup, mesh=mesh8)
    for stage in trainer.STAGES:
        r = results[stage]
        for which in ("click", "order"):
            assert 0.0 <= r[which]["hr@10"] <= 1.0 and r[which]["num"] == len(setup.eval_sets[which])
            assert set(r[which]) >= {"long_tail_query", "cold_item", "mrr@10", "ndcg@10"}
        assert 0.0 <= r["unconstrained"]["valid_id_rate"] <= 1.0
        assert r["leave_one_out"]["num"] > 0
        assert os.path.exists(tmp_path / stage / "results.json") and os.path.exists(tmp_path / stage / "metrics.png")
    assert results["popularity"]["click"]["hr@10"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "after stage3" in table and "popularity baseline" in table
    assert json.loads((tmp_path / "results.json").read_text())["stage1"]["stage"] == "stage1"
    # Rerunning skips the finished stages (no training, same results).
    again = trainer.train(config, str(tmp_path), setup=setup, mesh=mesh8)
    assert again["stage3"]["click"] == results["stage3"]["click"]
