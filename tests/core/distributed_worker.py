"""One process of the 2-process `jax.distributed` test (run by test_distributed.py, not by pytest).

Usage: python distributed_worker.py PROCESS_ID COORDINATOR_PORT CHECKPOINT_DIR
Each process owns 2 CPU devices; rows of a global [8, 2] array are filled with process_id + 1.
"""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)

import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_hd.core import checkpoint, sharding  # noqa: E402


def main() -> None:
    process_id, port, directory = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    assert sharding.maybe_initialize_distributed("always", f"127.0.0.1:{port}", 2, process_id)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    local_rows = np.full((4, 2), process_id + 1.0, np.float32)
    batch = sharding.shard_batch({"x": local_rows}, mesh)["x"]
    psum = jax.jit(
        jax.shard_map(lambda x: jax.lax.psum(x.sum(), ("data", "fsdp")), mesh=mesh, in_specs=P(("data", "fsdp")),
                      out_specs=P())
    )(batch)
    with checkpoint.Checkpointer(directory, save_every=1, handle_sigterm=False) as ckpt:
        ckpt.save(1, {"batch": batch, "psum": psum}, config={"processes": jax.process_count()})
    print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "psum": float(psum)}))


if __name__ == "__main__":
    main()
