"""Test-session setup: 8 fake CPU devices and no network, before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run a test with 64-bit floats enabled (the library itself never needs them)."""
    with jax.enable_x64(True):
        yield


# The files that take longest on 2 cores (measured with --durations=0), first: pytest-xdist's
# --dist loadfile hands whole files to the workers in collection order, so starting the long ones
# early keeps one worker from finishing minutes after the other.
LONGEST_FIRST = ("test_models.py", "test_follower.py", "test_train.py", "test_distributed.py", "test_pipeline.py",
                 "test_cli.py", "test_sampling.py", "test_step.py", "test_logps.py", "test_sharding.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
