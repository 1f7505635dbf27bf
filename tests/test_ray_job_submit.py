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
from cleanup import run_process_group
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


GPT_DATA = ["data.source=synthetic", "data.num_tokens=20000"]


@pytest.mark.slow
@pytest.mark.parametrize("spec,extra,key", [
    ("gpt_dp2", GPT_DATA, "last_loss"), ("gpt_tp2_dp2", GPT_DATA, "last_loss"),
    ("rl_digit_sum", ["train.warm_start_steps=2"], "last_reward"),  # 2 generator actors + the trainer group
])
def test_example_spec_succeeds_under_ray_job_submit(job_cluster, tmp_path, spec, extra, key):
    from ray.job_submission import JobSubmissionClient

    address, env = job_cluster
    job_id = f"plait-{spec}-{int(time.time())}"
    data = [f"data.path={tmp_path / 'data'}"] if spec.startswith("gpt") else []
    submit = [
        "ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--submission-id", job_id,
        "--no-wait", "--", "plait", "run", f"examples/{spec}.toml", "train.steps=3", "train.checkpoint_every=0",
        f"run_dir={tmp_path / 'run'}", *extra, *data,
    ]
    subprocess.run(submit, env=env, check=True, capture_output=True, timeout=120, cwd=REPO)
    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 300
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, "job did not finish in 300 s"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status.value == "SUCCEEDED", logs[-3000:]
    assert f'"{key}"' in logs and (tmp_path / "run" / "checkpoints" / "step_00000003").is_dir()


# The README's "On an existing Ray cluster" commands, typed into a new shell. Ray 2.60 starts a cluster
# with token authentication once ~/.ray/auth_token exists (`make demo`, any `ray.init()`, or the first
# command below create it); a client then needs the token. The shell is built from nothing, so none of
# the test runner's Ray variables (its own ray.init() sets RAY_AUTH_MODE=token) help the commands along.

TINY = "train.steps=2 train.checkpoint_every=0 data.source=synthetic data.num_tokens=20000"


def scratch_env(home: Path) -> dict:
    """A login shell's environment with nothing of the test runner's: HOME, PATH (this venv first), LANG."""
    return {"HOME": str(home), "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
            "LANG": "C.UTF-8"}


def shell(command: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """``command`` in a new bash; whatever it started is killed with it (a timed-out ``plait run`` included)."""
    return run_process_group(["bash", "-c", command], timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def readme_cluster(tmp_path_factory):
    """`ray get-auth-token --generate` then the README's `ray start --head ...` (plus free ports and a temp dir
    of its own), in a scratch shell; afterwards only this cluster is stopped."""
    home = tmp_path_factory.mktemp("home")
    env = scratch_env(home)
    temp_dir = tempfile.mkdtemp(prefix="plait-ray-", dir="/tmp")
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = free_ports(7)
    made = shell("ray get-auth-token --generate > /dev/null", env, timeout=60)
    assert made.returncode == 0 and (home / ".ray" / "auth_token").is_file(), made.stderr
    started = shell(
        "ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 "
        f"--port={gcs} --dashboard-port={dash} --dashboard-agent-listen-port={agent} "
        f"--dashboard-agent-grpc-port={agent_grpc} --runtime-env-agent-port={env_agent} "
        f"--metrics-export-port={metrics} --ray-client-server-port={client} --temp-dir={temp_dir} "
        "--num-cpus=4 --num-gpus=0 --disable-usage-stats", env, timeout=120)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        assert stop_local_cluster(temp_dir) > 0


@pytest.mark.slow
def test_readme_cluster_commands_work_as_written_on_a_token_cluster(readme_cluster, tmp_path):
    env, gcs, dashboard = readme_cluster["env"], readme_cluster["gcs"], readme_cluster["dashboard"]
    # The cluster does use token authentication: Ray's own CLI without RAY_AUTH_MODE=token is turned away.
    refused = shell(f"ray job submit --address {dashboard} -- true", env, timeout=60)
    assert refused.returncode != 0 and "Missing authentication token" in refused.stdout + refused.stderr

    run = shell(f"PLAIT_RAY_ADDRESS={gcs} plait run examples/gpt_dp2.toml {TINY} "
                f"data.path={tmp_path / 'data'} run_dir={tmp_path / 'run'}", env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert '"last_loss"' in run.stdout

    submitted = shell(f"RAY_AUTH_MODE=token ray job submit --address {dashboard} --working-dir . -- "
                      f"plait run examples/gpt_dp2.toml {TINY} data.path={tmp_path / 'data2'} "
                      f"run_dir={tmp_path / 'run2'}", env, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-2000:]
    assert '"last_loss"' in submitted.stdout and (tmp_path / "run2" / "summary.json").is_file()


@pytest.mark.slow
def test_plait_run_without_the_clusters_token_fails_at_once_saying_where_to_get_it(readme_cluster, tmp_path):
    env = {**readme_cluster["env"], "HOME": str(tmp_path)}  # another machine: no ~/.ray/auth_token
    run = shell(f"plait run examples/gpt_dp2.toml --address {readme_cluster['gcs']} {TINY} "
                f"data.path={tmp_path / 'data'} run_dir={tmp_path / 'run'}", env, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "requires its authentication token and this machine has no Ray token" in run.stderr
    assert "ray get-auth-token" in run.stderr
