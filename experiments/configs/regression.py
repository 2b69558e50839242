"""Presets of the core demo: a sharded residual-MLP regression on generated data.

    python -m experiments.regression --config=experiments/configs/regression.py:cpu_demo --workdir=runs/demo

Presets: `cpu_test` (seconds; tests), `cpu_demo` (about a minute on 2 CPU cores), `tpu` (a pod slice:
fsdp over all chips).
"""

import ml_collections


def get_config(preset: str = "cpu_demo") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    # Mesh axis sizes; one may be -1 ("the rest of the devices"). Rules: None = sharding.DEFAULT_RULES,
    # else a list of (logical name, mesh axis | [mesh axes] | None).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = ml_collections.FieldReference(None, field_type=list)

    # "auto": call jax.distributed.initialize on multi-host environments (TPU pod, SLURM, or
    # JAX_COORDINATOR_ADDRESS set); "always"/"never" force it. Empty address/-1 counts: auto-detect.
    c.distributed = ml_collections.ConfigDict(
        dict(mode="auto", coordinator_address="", num_processes=-1, process_id=-1)
    )

    c.model = ml_collections.ConfigDict(dict(in_dim=16, embed_dim=64, mlp_dim=256, num_blocks=2))
    c.data = ml_collections.ConfigDict(dict(num_train=8192, num_eval=512, noise_std=0.05, batch_size=64))
    c.trainer = ml_collections.ConfigDict(
        dict(
            steps=2000,
            lr=3e-3,
            warmup_steps=100,
            weight_decay=1e-4,
            grad_clip_norm=1.0,
            log_every=20,
            eval_every=200,
            checkpoint_every=500,
            keep_checkpoints=3,
            async_checkpoint=True,
        )
    )

    if preset == "cpu_test":
        c.model.update(embed_dim=32, mlp_dim=64, num_blocks=1)
        c.data.update(num_train=1024, num_eval=64, batch_size=16)
        c.trainer.update(steps=300, warmup_steps=10, log_every=10, eval_every=100, checkpoint_every=10)
    elif preset == "cpu_demo":
        pass
    elif preset == "tpu":
        c.mesh.update(data=1, fsdp=-1, tensor=1)
        c.model.update(embed_dim=1024, mlp_dim=4096, num_blocks=8)
        c.data.update(num_train=1 << 20, num_eval=8192, batch_size=4096)
        c.trainer.update(steps=20000, checkpoint_every=1000)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose cpu_test, cpu_demo or tpu")
    return c
