"""jax_hd: IG-Search, OneSearch-V2 and CSMCIR in JAX/Flax."""

__version__ = "0.1.0"
