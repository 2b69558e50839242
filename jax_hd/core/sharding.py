"""Meshes, logical-axis rules and placement of parameters and batches.

One mesh with axes `("data", "fsdp", "tensor")` serves every system:

* `data`: pure data parallelism (parameters replicated);
* `fsdp`: data parallelism with parameters (and optimizer state) sharded along their `embed` dimension;
* `tensor`: Megatron-style model parallelism over `mlp`, `heads`, `kv_heads` and `vocab`.

Parameters and activations carry logical axis names (`nn.with_logical_partitioning` /
`nn.with_logical_constraint`); `DEFAULT_RULES` maps them to mesh axes. Flax assigns each mesh axis at most
once per array, in rule order, so `("batch", "length", "embed")` activations shard the batch over
`data` and `fsdp` and leave `embed` whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis or axes or None), in priority order.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("bank", BATCH_AXES),
)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves `{'data': d, 'fsdp': f, 'tensor': t}` (one of them may be -1, "the rest") to a shape.

    Axes missing from `axis_sizes` have size 1. Raises ValueError when the sizes cannot tile the devices.
    """
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {list(MESH_AXES)}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    requested = dict(zip(MESH_AXES, sizes, strict=True))
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {requested}")
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {requested}")
    fixed = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh {requested}: {num_devices} devices are not divisible by the fixed "
                f"axes' product {fixed}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh {requested} needs {fixed} devices, but {num_devices} are available; "
            "set one axis to -1 to take the rest"
        )
    return tuple(sizes)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `("data", "fsdp", "tensor")` mesh with `AxisType.Auto` axes over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(dict(axis_sizes), len(devices))
    try:
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):  # e.g. a device subset on TPU
        device_array = np.asarray(devices).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def normalize_rules(rules: Rules | None) -> tuple[tuple[str, Any], ...]:
    """Rules from a config (lists, ConfigDict tuples) as hashable tuples; None gives `DEFAULT_RULES`."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [axes] if axes is not None and axes not in MESH_AXES else []
        if bad:
            raise ValueError(f"sharding rule {name!r} -> {axes!r} names unknown mesh axes {bad}")
        out.append((str(name), axes))
    return tuple(out)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules | None = None) -> P:
    """`('batch', 'length', 'embed')` -> `PartitionSpec(('data', 'fsdp'), None, None)`."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), normalize_rules(rules))


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` (others are replicated).

    The result has the structure of `nn.unbox(boxed_tree)`. Works on abstract trees from `jax.eval_shape`.
    """
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, normalize_rules(rules))


def sharded_init(
    init_fn: Callable[..., Any], *args: Any, mesh: Mesh, rules: Rules | None = None
) -> tuple[Any, Any]:
    """Runs `init_fn(*args)` under jit so every leaf is created directly in its sharded layout.

    `init_fn` returns a tree with `nn.LogicallyPartitioned` leaves (Linen params created with
    `nn.with_logical_partitioning`, or leaves wrapped by hand). Returns `(unboxed tree, its shardings)`;
    pass the shardings as `out_shardings` of the step that carries the tree so nothing recompiles.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(abstract, mesh, rules)
    tree = jax.jit(lambda *a: nn.unbox(init_fn(*a)), out_shardings=shardings)(*args)
    return tree, shardings


def shard_params(params: Any, shardings: Any) -> Any:
    """Places an (unboxed) host or device tree in `shardings` (from `logical_shardings`)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension over `data` x `fsdp`, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways a global batch is split (`data * fsdp`)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's slice of the global batch (numpy leaves, `[local_batch, ...]`) -> global jax arrays.

    Multi-host: every process passes its own rows; the global batch is their concatenation in process
    order. The global batch must divide by `data * fsdp`.
    """

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count()
        if global_rows % batch_parallelism(mesh):
            raise ValueError(
                f"global batch {global_rows} is not divisible by data*fsdp = {batch_parallelism(mesh)}"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(put, local_batch)


def per_device_bytes(tree: Any) -> dict[str, int]:
    """Bytes of `tree`'s array shards held by each addressable device, `{str(device): bytes}`."""
    totals: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            totals[key] = totals.get(key, 0) + shard.data.nbytes
    return totals


_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def _multi_host_environment() -> bool:
    if any(os.environ.get(k) for k in _DISTRIBUTED_ENV):
        return True
    if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def maybe_initialize_distributed(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Calls `jax.distributed.initialize` when asked to; returns whether JAX runs multi-process.

    mode: "never"; "always" (use the arguments, or JAX's cluster auto-detection for the ones left None);
      "auto" (initialize when arguments are given or the environment is a multi-host one: a coordinator
      address in `JAX_COORDINATOR_ADDRESS`, a multi-worker TPU VM, SLURM or Open MPI with several tasks).
    Must run before anything touches a JAX backend.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"distributed mode must be auto|always|never, got {mode!r}")
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    explicit = coordinator_address is not None or num_processes is not None
    if mode == "never" or (mode == "auto" and not explicit and not _multi_host_environment()):
        return False
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return jax.process_count() > 1
