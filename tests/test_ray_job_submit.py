"""The example specs run unchanged under `ray job submit` on a separately started Ray cluster."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
from plait.runtime.cluster import stop_local_cluster

REPO = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def job_cluster(ray_cluster):
    """`ray start --head` on loopback with free ports; afterwards only this cluster is stopped."""
    temp_dir = tempfile.mkdtemp(prefix="plait-ray-", dir="/tmp")  # short: Ray puts sockets under it
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = free_ports(7)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PLAIT_RAY_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    start = [
        "ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4", "--num-gpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        ended = stop_local_cluster(temp_dir)
        assert ended > 0
        # The test session's own embedded cluster lives on.
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["gpt_dp2", "gpt_tp2_dp2"])
def test_example_spec_succeeds_under_ray_job_submit(job_cluster, tmp_path, spec):
    from ray.job_submission import JobSubmissionClient

    address, env = job_cluster
    job_id = f"plait-{spec}-{int(time.time())}"
    submit = [
        "ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--submission-id", job_id,
        "--no-wait", "--", "plait", "run", f"examples/{spec}.toml", "train.steps=3", "train.checkpoint_every=0",
        f"run_dir={tmp_path / 'run'}", "data.source=synthetic", "data.num_tokens=20000",
        f"data.path={tmp_path / 'data'}",
    ]
    subprocess.run(submit, env=env, check=True, capture_output=True, timeout=120, cwd=REPO)
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 300
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, "job did not finish in 300 s"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status.value == "SUCCEEDED", logs[-3000:]
    assert '"last_loss"' in logs and (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()
