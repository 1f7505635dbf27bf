"""Shared fixtures: one embedded Ray cluster per test session (8 logical CPUs on any machine)."""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Rank actors unpickle functions defined in test modules by reference: let them import those modules.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH", "")]))
sys.path.insert(0, str(TESTS))


@pytest.fixture(scope="session")
def ray_cluster():
    from plait.runtime import ClusterConfig, connect, shutdown

    info = connect(ClusterConfig(num_cpus=8, num_gpus=0))
    yield info
    shutdown()
