r"""Per-device memory of the sharded train step for fsdp = 1, 2, 4, 8 on an 8-device mesh.

For each mesh (data = 8 / fsdp, fsdp, tensor = 1) it builds the core demo's residual MLP with its AdamW
state directly in the sharded layout and reports, per device: parameter bytes and optimizer-state bytes
(read from the arrays' shards) and the compiled step's argument / temp sizes (XLA memory analysis),
each with its ratio to fsdp = 1 (fully replicated, the reference). On a CPU host the 8 devices are
simulated; on a TPU/GPU host with 8 chips the same script measures real ones.

    python -m experiments.benchmarks.sharding_memory --out=runs/benchmarks/sharding_memory.json
"""

from __future__ import annotations

import jax

# Simulate 8 CPU devices (ignored by accelerator backends); must precede any backend initialisation.
jax.config.update("jax_num_cpu_devices", 8)

import json  # noqa: E402
import os  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import linen as nn  # noqa: E402

from experiments import regression  # noqa: E402
from experiments.configs import regression as regression_configs  # noqa: E402
from jax_hd.core import sharding  # noqa: E402

_OUT = flags.DEFINE_string("out", "runs/benchmarks/sharding_memory.json", "Where to write the JSON results.")
_EMBED = flags.DEFINE_integer("embed_dim", 512, "MLP width (the dimension FSDP shards).")
_MLP = flags.DEFINE_integer("mlp_dim", 2048, "MLP hidden width.")
_BLOCKS = flags.DEFINE_integer("num_blocks", 4, "Residual blocks.")


def measure(fsdp: int) -> dict[str, float]:
    config = regression_configs.get_config("cpu_test")
    config.model.update(embed_dim=_EMBED.value, mlp_dim=_MLP.value, num_blocks=_BLOCKS.value)
    config.data.batch_size = 64
    config.mesh.update(data=-1, fsdp=fsdp, tensor=1)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
    rules = sharding.normalize_rules(config.sharding_rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        model, tx, state, shardings = regression.build(config, mesh)
        step = regression.make_train_step(model, tx, shardings, mesh)
        batch = jax.ShapeDtypeStruct((64, config.model.in_dim), jnp.float32, sharding=sharding.batch_sharding(mesh, 2))
        target = jax.ShapeDtypeStruct((64, 1), jnp.float32, sharding=sharding.batch_sharding(mesh, 2))
        compiled = step.lower(state, {"x": batch, "y": target}).compile()
    analysis = compiled.memory_analysis()
    return {
        "fsdp": fsdp,
        "data": mesh.shape["data"],
        "num_params": sum(x.size for x in jax.tree.leaves(state.params)),
        "param_bytes_per_device": max(sharding.per_device_bytes(state.params).values()),
        "opt_state_bytes_per_device": max(sharding.per_device_bytes(state.opt_state).values()),
        "step_argument_bytes": getattr(analysis, "argument_size_in_bytes", float("nan")),
        "step_temp_bytes": getattr(analysis, "temp_size_in_bytes", float("nan")),
    }


def main(argv: list[str]) -> None:
    del argv
    if len(jax.devices()) < 8:
        raise app.UsageError(f"needs 8 devices, found {len(jax.devices())}")
    rows = [measure(fsdp) for fsdp in (1, 2, 4, 8)]
    reference = rows[0]
    keys = ("param_bytes_per_device", "opt_state_bytes_per_device", "step_argument_bytes", "step_temp_bytes")
    for row in rows:
        for key in keys:
            row[f"{key}_ratio_vs_fsdp1"] = row[key] / reference[key] if reference[key] else float("nan")
    print(f"backend={jax.default_backend()} devices=8 params={reference['num_params']:,}")
    print(f"{'fsdp':>4} {'data':>4} {'param B/dev':>12} {'ratio':>6} {'opt B/dev':>12} {'ratio':>6} "
          f"{'step args B':>12} {'ratio':>6} {'step temp B':>12}")
    for r in rows:
        print(f"{r['fsdp']:>4} {r['data']:>4} {r['param_bytes_per_device']:>12,} "
              f"{r['param_bytes_per_device_ratio_vs_fsdp1']:>6.3f} {r['opt_state_bytes_per_device']:>12,} "
              f"{r['opt_state_bytes_per_device_ratio_vs_fsdp1']:>6.3f} {r['step_argument_bytes']:>12,} "
              f"{r['step_argument_bytes_ratio_vs_fsdp1']:>6.3f} {r['step_temp_bytes']:>12,}")
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
        json.dump({"backend": jax.default_backend(), "rows": rows}, f, indent=2)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
