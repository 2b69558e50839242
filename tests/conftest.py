"""Test set-up: 8 simulated CPU devices, configured before anything initialises a JAX backend."""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import os  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for child Pythons: the repo importable, one CPU device, no inherited device count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
