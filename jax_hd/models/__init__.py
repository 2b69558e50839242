"""Flax Linen modules, each with a frozen config dataclass."""
