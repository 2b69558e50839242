"""Shared machinery: configs, meshes and sharding, train state, checkpoints, metrics."""
