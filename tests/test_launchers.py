"""One job spec under every launcher: Ray (plait run), torchrun, mpirun, a Slurm allocation, ray job submit."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from plait.runtime.cluster import stop_local_cluster
from plait.runtime.rank_setup import LaunchError, Placement, detect_launcher, pick_device

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MLP = str(REPO / "examples" / "mlp_dp2.toml")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE",
               "RAY_ADDRESS", "PLAIT_RAY_ADDRESS")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "PLAIT_PROGRESS": "lines", "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str, cwd: Path = REPO, restarts: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", str(restarts), "-m", "plait.launchers.spmd", *args]
    return subprocess.run(cmd, env=clean_env(), cwd=cwd, capture_output=True, text=True, timeout=400)


def mpirun(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    # As root Open MPI wants both variables; --oversubscribe lets 2 ranks start on a 1-core machine.
    env = clean_env(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [str(BIN / "mpirun"), "-n", "2", "--oversubscribe", sys.executable, "-m", "plait.launchers.spmd", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=400)


LAUNCH = {"torchrun": torchrun, "mpirun": mpirun}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the rank start-up, as a function of what the launcher says ---------------------------------------

def test_device_is_cuda_local_rank_under_torchrun_and_mpirun_and_cuda0_under_ray():
    def place(launcher: str, local_rank: int) -> Placement:
        return Placement(4 + local_rank, 8, local_rank, 4, "10.0.0.2", launcher)

    assert pick_device(place("torchrun", 3), use_gpu=True, gpu_count=4) == torch.device("cuda", 3)
    assert pick_device(place("mpi", 2), use_gpu=True, gpu_count=8) == torch.device("cuda", 2)
    assert pick_device(place("ray", 3), use_gpu=True, gpu_count=1) == torch.device("cuda", 0)  # Ray shows one GPU
    assert pick_device(place("torchrun", 3), use_gpu=False, gpu_count=4) == torch.device("cpu")
    with pytest.raises(LaunchError, match="4 ranks on node 10.0.0.2 but it shows 2 GPU.*--nproc-per-node 2"):
        pick_device(place("torchrun", 1), use_gpu=True, gpu_count=2)


def test_the_launcher_is_read_from_the_environment_and_neither_is_refused_saying_how_to_start():
    assert detect_launcher({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == "torchrun"
    assert detect_launcher({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}) == "mpi"
    assert detect_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}) == "mpi"  # MPICH / Intel MPI
    with pytest.raises(LaunchError, match="torchrun --nproc-per-node N -m plait.launchers.spmd"):
        detect_launcher({})


def test_spmd_entry_outside_a_launcher_exits_2_with_one_line():
    done = subprocess.run([sys.executable, "-m", "plait.launchers.spmd", MLP], env=clean_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not started by torchrun or mpirun" in done.stderr


# --- torchrun and mpirun run the Ray path's job, to the same losses --------------------------------------

@pytest.mark.slow
def test_torchrun_and_mpirun_train_the_mlp_spec_to_the_ray_paths_losses(ray_cluster, tmp_path):
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    tiny = ["train.steps=4", "train.checkpoint_every=2"]
    ray_summary = run_job(load_spec(MLP, [*tiny, f"run_dir={tmp_path / 'ray'}"]))
    expected = losses(tmp_path / "ray")
    assert len(expected) == 4
    for name, launch in LAUNCH.items():
        done = launch(MLP, *tiny, f"run_dir={tmp_path / name}")
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert losses(tmp_path / name) == pytest.approx(expected, rel=1e-9), name
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["launcher"] == {"torchrun": "torchrun", "mpirun": "mpi"}[name]
        assert summary["last_loss"] == pytest.approx(ray_summary["last_loss"], rel=1e-9)
        assert (tmp_path / name / "checkpoints" / "step_00000004" / "meta.json").is_file()
        assert json.loads((tmp_path / name / "run.json").read_text())["run_id"] == summary["run_id"]
        assert (tmp_path / name / "metrics.png").stat().st_size > 1000  # drawn at the end, as on Ray
        assert "started in" in (tmp_path / name / "plait.log").read_text()  # rank 0 keeps the driver's log
        assert not (tmp_path / name / ".plait.lock").exists()  # rank 0 held the run_dir, and let it go
    assert (tmp_path / "ray" / "metrics.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_torchrun_restart_continues_the_run_from_its_checkpoint_to_the_uninterrupted_result(ray_cluster, tmp_path):
    from plait.runtime.job import run_job
    from plait.runtime.spec import spec_from_table

    table = {"job": "toy_job", "run_dir": str(tmp_path / "ray"), "workers": {"num": 2}, "train": {"steps": 4}}
    whole = run_job(spec_from_table(table))
    (tmp_path / "toy.toml").write_text('job = "toy_job"\nrun_dir = "run"\n[workers]\nnum = 2\n'
                                       '[train]\nsteps = 4\nfail = "crash:2"\n')  # rank 1 dies after step 2
    done = torchrun(str(tmp_path / "toy.toml"), cwd=tmp_path, restarts=1)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "torchrun restart 1: continuing" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["start_step"] == 0  # the run began at step 0 ...
    assert summary["restart_log"][0]["resumed_step"] == 1  # ... the restart resumed the newest checkpoint: step 1
    assert summary["losses"] == pytest.approx(whole["losses"][1:], rel=1e-12)
    assert summary["weight"] == str(whole["weight"])
    assert not (tmp_path / "run" / "earlier").exists()  # the same run continued, nothing moved aside


def test_a_torchrun_run_holds_its_run_dir_and_stops_on_sigterm_with_a_checkpoint(tmp_path):
    (tmp_path / "toy.toml").write_text('job = "toy_job"\nrun_dir = "run"\n[workers]\nnum = 2\n'
                                       '[train]\nsteps = 4000\nstep_sleep_s = 0.1\ncheckpoint_every = 0\n')
    env = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "plait.launchers.spmd", "toy.toml"]
    with open(tmp_path / "out.txt", "w") as out:
        launched = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 300
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert launched.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.5)
        refused = subprocess.run([sys.executable, "-m", "plait.runtime", "run", "toy.toml"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2
        assert re.search(rf"run_dir {tmp_path / 'run'} is in use by another plait run: host \S+, pid \d+, .*"
                         r"`torchrun \.\.\. -m plait.launchers.spmd toy.toml`", refused.stderr)
        os.killpg(launched.pid, signal.SIGTERM)  # as Slurm's scancel: every process of the step
        launched.wait(timeout=120)
    finally:
        if launched.poll() is None:
            os.killpg(launched.pid, signal.SIGKILL)
            launched.wait()
    printed = (tmp_path / "out.txt").read_text()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    last = len(metrics.read_text().splitlines())
    assert summary["stopped"]["signal"] == "SIGTERM" and summary["stopped_at"] == last < 4000
    assert summary["stopped"]["checkpoint"] == str(tmp_path / "run" / "checkpoints" / f"step_{last:08d}")
    assert f"[plait] stopped by SIGTERM: the ranks committed a checkpoint at a step boundary and returned; last " \
           f"committed checkpoint {summary['stopped']['checkpoint']}; continue with: torchrun ... -m " \
           "plait.launchers.spmd toy.toml train.resume=latest" in printed
    assert not (tmp_path / "run" / ".plait.lock").exists()


CTX_JOB = '''
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Train:
    resume: str = ""


@dataclass
class Config:
    train: Train = field(default_factory=Train)


def train(ctx, cfg):
    total = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(total)
    return {"rank": ctx.rank, "world_size": ctx.world_size, "local_rank": ctx.local_rank,
            "local_world_size": ctx.local_world_size, "device": str(ctx.device), "backend": ctx.backend,
            "run_id": ctx.run_id, "run_dir": str(ctx.run_dir), "sum": total.item(), "dist_rank": dist.get_rank(),
            "LOCAL_RANK": os.environ["LOCAL_RANK"]}


def summarize(cfg, run_dir, results):
    return {"ranks": results}
'''


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun"])
def test_each_rank_gets_the_launchers_rank_local_rank_and_device(tmp_path, launcher):
    (tmp_path / "ctx_job.py").write_text(textwrap.dedent(CTX_JOB))
    (tmp_path / "ctx.toml").write_text('job = "ctx_job"\nrun_dir = "run"\n[workers]\nnum = 3\n')
    done = LAUNCH[launcher](str(tmp_path / "ctx.toml"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "started 2 ranks; the spec's workers.num=3 follows it" in done.stdout
    ranks = json.loads((tmp_path / "run" / "summary.json").read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [r["dist_rank"] for r in ranks] == [r["local_rank"] for r in ranks] == [0, 1]
    assert {r["world_size"] for r in ranks} == {r["local_world_size"] for r in ranks} == {2}
    assert {(r["device"], r["backend"]) for r in ranks} == {("cpu", "gloo")}  # no GPU here: CPU and gloo
    assert [r["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert {r["sum"] for r in ranks} == {3.0}  # the process group spans both ranks
    assert len({r["run_id"] for r in ranks}) == 1 and ranks[0]["run_dir"] == str(tmp_path / "run")


@pytest.mark.slow
def test_an_impossible_plan_under_mpirun_ends_every_rank_with_one_line_and_no_run_dir(tmp_path):
    done = mpirun(MLP, "plan.dp=3", f"run_dir={tmp_path / 'run'}")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("plait:")]
    assert len(lines) == 1 and "rank 0 of 2" in lines[0] and "plan" in lines[0], done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


# --- Slurm ---------------------------------------------------------------------------------------------

SLURM = REPO / "launchers" / "slurm.sbatch"


def test_the_slurm_script_passes_bash_n():
    done = subprocess.run(["bash", "-n", str(SLURM)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("scontrol", [True, False], ids=["scontrol", "no-scontrol"])
def test_a_slurm_dry_run_prints_the_head_the_workers_the_wait_and_plait_run(tmp_path, scontrol):
    path = [str(BIN), "/usr/bin", "/bin"]
    if scontrol:  # a stand-in for Slurm's own expansion of the node list
        fake = tmp_path / "bin"
        fake.mkdir()
        (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\ngpu03\\n'\n")
        (fake / "scontrol").chmod(0o755)
        path.insert(0, str(fake))
    env = {"PATH": os.pathsep.join(path), "HOME": str(tmp_path), "DRY_RUN": "1", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_NNODES": "3", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_ON_NODE": "32"}
    done = subprocess.run(["bash", str(SLURM), "examples/mlp_dp2.toml", "train.steps=5"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("+ srun --nodes=1 --ntasks=1 --cpus-per-task=32 --gres=gpu:4 -w gpu01 ray start "
                               "--head --node-ip-address=gpu01 --port=6379")
    assert "--num-cpus=32 --num-gpus=4 --block" in lines[0] and lines[0].endswith("&")
    for line, node in zip(lines[1:3], ["gpu02", "gpu03"], strict=True):
        assert f"-w {node} ray start --address=gpu01:6379 --num-cpus=32 --num-gpus=4 --block" in line
    assert lines[3] == "+ python3 -m plait.launchers.ray_nodes gpu01:6379 3 --timeout 300"
    assert lines[4] == "+ env PLAIT_RAY_ADDRESS=gpu01:6379 plait run examples/mlp_dp2.toml train.steps=5"
    assert len(lines) == 5 and "3 node(s) (gpu01 gpu02 gpu03), 32 CPUs and 4 GPUs each" in done.stderr


def test_a_slurm_script_outside_an_allocation_says_so():
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "DRY_RUN": "1"}
    done = subprocess.run(["bash", str(SLURM), "examples/mlp_dp2.toml"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "SLURM_JOB_NODELIST is not set: submit this script with sbatch" in done.stderr


# --- ray job submit, to a bare Ray cluster (its Python has torch and Ray but not Plait) -------------------

@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory):
    """`ray start --head` on loopback from a Python that sees this venv's packages except Plait (a .pth naming
    site-packages: its editable-install hook is not run); afterwards only this cluster is stopped."""
    from test_ray_job_submit import free_ports

    home = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home / "venv")], check=True, timeout=120)
    site = next(Path(sys.prefix).glob("lib/python3*/site-packages"))
    next((home / "venv").glob("lib/python3*/site-packages")).joinpath("base.pth").write_text(f"{site}\n")
    python = home / "venv" / "bin" / "python"
    probe = subprocess.run([python, "-c", "import plait.runtime"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'plait'" in probe.stderr
    temp_dir = tempfile.mkdtemp(prefix="plait-ray-", dir="/tmp")
    gcs, dash, agent, agent_grpc, env_agent, metrics, client = free_ports(7)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and k != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([str(python.parent), "/usr/bin", "/bin"])
    start = [
        str(python), "-c", "from ray.scripts.scripts import main; main()", "start", "--head",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield {"dashboard": f"http://127.0.0.1:{dash}", "gcs": f"127.0.0.1:{gcs}"}
    finally:
        assert stop_local_cluster(temp_dir) > 0


def test_submit_refuses_a_spec_outside_the_working_dir_and_a_gcs_address_before_contacting_anyone(tmp_path, capsys):
    from plait.launchers.submit import main

    assert main(["--address", "http://127.0.0.1:1", "--working-dir", str(tmp_path), MLP]) == 2
    assert f"is outside --working-dir {tmp_path}: the cluster receives only the working directory" \
        in capsys.readouterr().err
    assert main(["--address", "127.0.0.1:6379", "--working-dir", str(REPO), MLP]) == 2
    assert "looks like the GCS address; `submit` talks to the dashboard (Jobs API): give http://HOST:8265" \
        in capsys.readouterr().err


def test_the_plait_submit_shell_entry_is_installed_and_refuses_like_the_module():
    entry = Path(sys.executable).parent / "plait-submit"  # pyproject's [project.scripts], in this environment
    done = subprocess.run([str(entry), "--address", "127.0.0.1:6379", "--working-dir", str(REPO), MLP],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "looks like the GCS address" in done.stderr


@pytest.mark.slow
def test_submit_runs_a_spec_from_this_checkout_on_a_cluster_without_plait(bare_cluster, tmp_path):
    cmd = [sys.executable, "-m", "plait.launchers.submit", "--address", bare_cluster["dashboard"], MLP,
           "train.steps=3", f"run_dir={tmp_path / 'run'}", "--env", "PLAIT_PROGRESS=lines"]
    done = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-2000:]
    assert "shipping this checkout's wheel" in out
    job_id = out.split("[plait] submitted job ", 1)[1].split()[0]
    assert out.strip().splitlines()[-1] == f"[plait] job {job_id} SUCCEEDED"
    assert '"last_loss"' in out  # the job's own output, followed live
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_loss"] < summary["first_loss"]


@pytest.mark.slow
def test_ray_nodes_waits_for_the_nodes_and_says_how_many_came(bare_cluster):
    def wait(nodes: str, timeout: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "plait.launchers.ray_nodes", bare_cluster["gcs"], nodes,
                               "--timeout", timeout], env=clean_env(), capture_output=True, text=True, timeout=120)

    up = wait("1", "60")
    assert up.returncode == 0 and f"1 Ray nodes up at {bare_cluster['gcs']}" in up.stdout
    short = wait("2", "2")
    assert short.returncode == 2 and "1 of 2 Ray nodes up" in short.stderr


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="no Slurm here")
def test_sbatch_accepts_the_script():  # on a machine with Slurm: its own parser reads the #SBATCH lines
    done = subprocess.run(["sbatch", "--test-only", str(SLURM), "examples/mlp_dp2.toml"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
