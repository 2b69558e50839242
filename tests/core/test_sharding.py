import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from experiments import regression
from experiments.configs import regression as regression_configs
from jax_hd.core import sharding


@pytest.mark.parametrize(
    "sizes, shape",
    [
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"data": -1}, (8, 1, 1)),
        ({"data": 1, "fsdp": -1, "tensor": 1}, (1, 8, 1)),
        ({"data": 2, "fsdp": -1, "tensor": 2}, (2, 2, 2)),
        ({"data": -1, "tensor": 4}, (2, 1, 4)),
        ({"tensor": 8}, (1, 1, 8)),
    ],
)
def test_make_mesh_shapes(sizes, shape):
    mesh = sharding.make_mesh(sizes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_one_device_and_from_a_configdict():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), jax.devices()[:1])
    assert tuple(mesh.shape.values()) == (1, 1, 1)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices, but 8 are available"),
        ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
        ({"data": -1, "tensor": 3}, "not divisible by the fixed axes' product 3"),
        ({"data": 0}, "must be positive or -1"),
        ({"model": 8}, "unknown mesh axes ['model']"),
    ],
)
def test_make_mesh_errors(sizes, message):
    with pytest.raises(ValueError) as e:
        sharding.make_mesh(sizes)
    assert message in str(e.value)


def test_logical_rules_to_partition_specs():
    assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert sharding.logical_to_spec(("batch", "length", "heads", "kv")) == P(("data", "fsdp"), None, "tensor", None)
    custom = [("embed", None), ("mlp", ["fsdp", "tensor"])]
    assert sharding.logical_to_spec(("embed", "mlp"), custom) == P(None, ("fsdp", "tensor"))
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.normalize_rules([("embed", "model")])


def test_shard_batch_places_rows_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = sharding.shard_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in batch["x"].addressable_shards} == {(2, 2)}
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.arange(16.0).reshape(8, 2))
    with pytest.raises(ValueError, match="not divisible by data\\*fsdp = 4"):
        sharding.shard_batch({"x": np.zeros((6, 2))}, mesh)


def test_sharded_init_creates_arrays_in_their_layout():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def init(rng):
        w = nn.LogicallyPartitioned(jax.random.normal(rng, (8, 16)), ("embed", "mlp"))
        return {"w": w, "bank": nn.LogicallyPartitioned(jnp.zeros((32, 4)), ("bank", None)), "step": jnp.zeros(())}

    tree, shardings = sharding.sharded_init(init, jax.random.PRNGKey(0), mesh=mesh)
    assert tree["w"].sharding.spec == P("fsdp", "tensor")
    assert tree["bank"].sharding.spec == P(("data", "fsdp"), None)
    assert tree["step"].sharding.spec == P()
    assert shardings["w"] == tree["w"].sharding


# --- A sharded train step equals the single-device one. -------------------------------------------------


@pytest.fixture(scope="module")
def regression_config():
    config = regression_configs.get_config("cpu_test")
    config.data.batch_size = 16
    return config


def _run_steps(config, mesh, num_steps=5):
    """Trains `num_steps` on `mesh` from the same init and data; returns (losses, final params on host)."""
    rules = sharding.normalize_rules(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        model, tx, state, shardings = regression.build(config, mesh)
        step = regression.make_train_step(model, tx, shardings, mesh)
        x, y = regression.synthetic_regression(config.data.batch_size * num_steps, config.model.in_dim, 0.05, 0)
        losses = []
        for i in range(num_steps):
            rows = slice(i * config.data.batch_size, (i + 1) * config.data.batch_size)
            state, metrics = step(state, sharding.shard_batch({"x": x[rows], "y": y[rows]}, mesh))
            losses.append(float(metrics["loss"]))
        assert step._cache_size() == 1, "the step recompiled: the initial state's layout differs from the step's"
    return np.array(losses), state


def test_sharded_train_step_matches_single_device(regression_config):
    single = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    losses_1, state_1 = _run_steps(regression_config, single)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    losses_8, state_8 = _run_steps(regression_config, mesh)
    # Same math; only the order of float32 reductions differs across 8 shards.
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.device_get(state_8.params), jax.device_get(state_1.params), rtol=1e-5, atol=1e-6)
    kernel = state_8.params["up_0"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    mu = state_8.opt_state[1][0].mu["up_0"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor"), "Adam moments must be sharded like their parameters"


def _max_param_bytes_per_device(config, fsdp):
    mesh = sharding.make_mesh({"data": -1, "fsdp": fsdp, "tensor": 1})
    _, _, state, _ = regression.build(config, mesh)
    return max(sharding.per_device_bytes(state.params).values()), sum(x.nbytes for x in jax.tree.leaves(state.params))


def test_fsdp_divides_parameter_bytes_per_device(regression_config):
    config = regression_config.copy_and_resolve_references()
    config.model.update(embed_dim=64, mlp_dim=128)
    per_device = {}
    for fsdp in (1, 2, 4, 8):
        per_device[fsdp], total = _max_param_bytes_per_device(config, fsdp)
    assert per_device[1] == total
    # Everything with an `embed` axis splits; the input kernel's rows, output bias etc. stay replicated.
    for fsdp in (2, 4, 8):
        assert per_device[fsdp] < per_device[fsdp // 2]
    assert per_device[8] < total / 4
