import json
import os
import socket
import subprocess

import jax
import numpy as np
import pytest

from jax_hd.core import checkpoint, sharding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_psum_and_write_one_checkpoint(tmp_path, python, subprocess_env):
    worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    port, directory = _free_port(), str(tmp_path / "ckpt")
    procs = [
        subprocess.Popen([python, worker, str(i), str(port), directory], env=subprocess_env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    try:
        results = [proc.communicate(timeout=300) for proc in procs]
    finally:  # Only reached with live processes when one timed out or the test failed.
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = []
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    # 4 rows x 2 columns of 1.0 from process 0 and of 2.0 from process 1.
    assert [o["psum"] for o in outputs] == [24.0, 24.0]
    assert [o["devices"] for o in outputs] == [4, 4]
    assert sorted(o["process"] for o in outputs) == [0, 1]

    # One checkpoint, written by both processes, restorable here on a single process.
    assert os.listdir(directory) == ["1"]
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, jax.devices()[:4])
    target = {
        "batch": jax.ShapeDtypeStruct((8, 2), np.float32, sharding=sharding.batch_sharding(mesh, 2)),
        "psum": jax.ShapeDtypeStruct((), np.float32, sharding=jax.sharding.NamedSharding(mesh, jax.P())),
    }
    with checkpoint.Checkpointer(directory, save_every=1, handle_sigterm=False) as ckpt:
        restored = ckpt.restore(target)
        assert ckpt.saved_config() == {"processes": 2}
    np.testing.assert_array_equal(np.asarray(restored["batch"]), np.repeat([[1.0], [2.0]], 4, axis=0).repeat(2, 1))
    assert float(restored["psum"]) == 24.0
