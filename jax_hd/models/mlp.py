"""A residual MLP: the smallest model that exercises every sharding axis (used by the core's demo/tests)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    in_dim: int = 16
    embed_dim: int = 64
    mlp_dim: int = 256
    out_dim: int = 1
    num_blocks: int = 2
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32


def _dense(features: int, names: tuple[str | None, str | None], config: MLPConfig, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


class MLP(nn.Module):
    """`[batch, in_dim] -> [batch, out_dim]`; blocks are pre-LayerNorm `embed -> mlp -> embed` residuals."""

    config: MLPConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _dense(cfg.embed_dim, (None, "embed"), cfg, "input")(x)
        h = nn.with_logical_constraint(h, ("batch", "embed"))
        for i in range(cfg.num_blocks):
            y = nn.LayerNorm(
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                name=f"norm_{i}",
            )(h)
            y = _dense(cfg.mlp_dim, ("embed", "mlp"), cfg, f"up_{i}")(y)
            y = nn.with_logical_constraint(nn.gelu(y), ("batch", "mlp"))
            h = h + _dense(cfg.embed_dim, ("mlp", "embed"), cfg, f"down_{i}")(y)
            h = nn.with_logical_constraint(h, ("batch", "embed"))
        return _dense(cfg.out_dim, ("embed", None), cfg, "output")(h)
