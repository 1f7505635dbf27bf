"""Joining a Ray cluster: a wrong address fails within seconds, with a message saying what to check.

Each case runs in a fresh process: the test session's own Ray is already initialised, and Ray connects
a process once.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from plait.runtime.config import ConfigError
from plait.runtime.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
PLAIT = str(Path(sys.executable).parent / "plait")


def clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PLAIT_RAY_ADDRESS")}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect_error(address: str, **cluster) -> str:
    """What ``connect()`` says, in a fresh process, when asked to join ``address``."""
    code = (
        "import sys\n"
        "from plait.runtime.cluster import ClusterConfig, connect\n"
        "try:\n"
        f"    connect(ClusterConfig(address={address!r}, **{cluster!r}))\n"
        "except ValueError as e:  # what `plait` reports with exit code 2\n"
        "    print(e)\n"
        "    sys.exit(2)\n"
        "print('connected')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    return out.stdout


@pytest.mark.timeout(120)
def test_plait_run_on_a_closed_port_fails_at_once_naming_the_address(tmp_path):
    address = f"127.0.0.1:{closed_port()}"
    out = subprocess.run(
        [PLAIT, "run", "examples/gpt_dp2.toml", "train.steps=2", "data.source=synthetic", "data.num_tokens=20000",
         f"data.path={tmp_path / 'data'}", f"run_dir={tmp_path / 'run'}", "--address", address],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=90)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot reach the Ray cluster at '{address}'" in out.stderr
    assert "Connection refused" in out.stderr and "ray start --head" in out.stderr


@pytest.mark.timeout(120)
def test_a_dashboard_url_is_refused_with_the_gcs_address_to_give_instead():
    message = connect_error("http://127.0.0.1:8265")
    assert "dashboard" in message and "ray job submit" in message and "--address 127.0.0.1:6379" in message


@pytest.mark.timeout(120)
def test_an_address_without_a_port_is_refused():
    assert "'10.0.0.1' is not a Ray address: give HOST:6379" in connect_error("10.0.0.1")


@pytest.mark.timeout(120)
def test_a_port_that_answers_but_is_not_a_ray_cluster_fails_within_the_connect_timeout():
    with socket.socket() as listener:  # accepts connections, never speaks: like a wrong service's port
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        message = connect_error(address, connect_timeout_s=2.0)
    assert f"something listens at '{address}'" in message and "within 2 s" in message
    assert "not the dashboard (8265)" in message


def test_connect_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="cluster.connect_timeout_s=0.0 must be > 0"):
        load_spec("examples/gpt_dp2.toml", ["cluster.connect_timeout_s=0"])
