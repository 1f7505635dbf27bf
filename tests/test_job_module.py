"""Your own job runs: a job module beside the spec or in the current directory needs no PYTHONPATH,
its code reaches the ranks of an already-running cluster, and the README's example job trains."""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from plait.runtime.config import ConfigError
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec

REPO = Path(__file__).resolve().parents[1]

JOB = '''
from dataclasses import dataclass, field
import torch.distributed as dist
import torch

MAGIC = {magic}

@dataclass
class Section:
    value: int = 3

@dataclass
class Config:
    section: Section = field(default_factory=Section)

def train(ctx, cfg):
    t = torch.tensor([float(ctx.rank + cfg.section.value)])
    dist.all_reduce(t)
    return {{"rank": ctx.rank, "sum": t.item(), "magic": MAGIC}}
'''


def write_job(folder: Path, magic: int) -> str:
    name = f"user_job_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text(JOB.format(magic=magic))
    (folder / "spec.toml").write_text(f'job = "{name}"\nrun_dir = "{folder / "run"}"\n[workers]\nnum = 2\n'
                                      "[section]\nvalue = 5\n")
    return name


def test_a_job_module_beside_the_spec_reaches_the_ranks_of_a_running_cluster(ray_cluster, tmp_path):
    # The session's cluster was started before this file existed; its workers cannot import it.
    write_job(tmp_path, magic=41)
    summary = run_job(load_spec(tmp_path / "spec.toml"))
    assert [r["sum"] for r in summary["results"]] == [11.0, 11.0]  # (0+5) + (1+5) on both ranks
    assert summary["results"][0]["magic"] == 41


def test_a_job_module_in_the_current_directory_runs_with_plait_run(tmp_path):
    write_job(tmp_path, magic=7)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PLAIT_")) and k != "PYTHONPATH"}
    plait = str(Path(sys.executable).parent / "plait")
    out = subprocess.run([plait, "run", "spec.toml", "cluster.num_cpus=2"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["results"][0]["magic"] == 7
    assert '"results": "(list of 2: see summary.json)"' in out.stdout  # printed: scalars only


def test_an_import_error_inside_the_job_module_is_a_config_error(tmp_path):
    (tmp_path / "broken_job_x1.py").write_text("import not_installed_anywhere_x1\n")
    (tmp_path / "spec.toml").write_text('job = "broken_job_x1"\n')
    with pytest.raises(ConfigError, match="imports 'not_installed_anywhere_x1', which is not installed"):
        load_spec(tmp_path / "spec.toml")


@pytest.mark.slow
def test_the_readme_example_job_trains_and_resumes_under_another_engine(ray_cluster, tmp_path):
    common = [f"run_dir={tmp_path / 'run'}", "train.checkpoint_every=10"]
    first = run_job(load_spec(REPO / "examples/mlp_dp2.toml", ["train.steps=20", *common]))
    assert first["plan"] == "dp2(ddp) tp1 pp1" and first["last_loss"] < first["first_loss"]
    resumed = run_job(load_spec(REPO / "examples/mlp_dp2.toml",
                                ["train.steps=40", "train.resume=latest", "plan.engine=fsdp2", *common]))
    assert resumed["start_step"] == 20 and resumed["accuracy"] > 0.9
