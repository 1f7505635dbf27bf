"""Where outputs go: checkpoints, metrics and summaries persist at a storage location (a folder or a
pyarrow filesystem URI), committed by a marker written last; resume reads from there; a relative
run_dir under a Ray job never lands in Ray's temporary working directory.

The object store is moto in server mode on 127.0.0.1, reached through pyarrow's S3 filesystem."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from plait.runtime.checkpoint import Checkpointer, ModelOptimizer
from plait.runtime.checkpoint_store import latest_stored, stored_checkpoints
from plait.runtime.cli import main
from plait.runtime.config import ConfigError
from plait.runtime.job import run_job
from plait.runtime.run_dir import RunDir
from plait.runtime.spec import spec_from_table
from plait.runtime.storage_location import StorageLocation, persistent_path, ray_job_working_dir
from test_ray_job_submit import job_cluster  # noqa: F401 - a `ray start --head` cluster for `ray job submit`

# Ranks started by the session's embedded Ray cluster inherit this process's environment as it is when
# the cluster starts (after collection): fake credentials and no EC2 metadata probing, for moto.
for key, value in {"AWS_ACCESS_KEY_ID": "plait-test", "AWS_SECRET_ACCESS_KEY": "plait-test",
                   "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(key, value)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; yields a function bucket-prefix -> s3:// URI."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.2)
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
        StorageLocation.parse(f"s3://plait?{query}&allow_bucket_creation=true").fs.create_dir("plait")
        yield lambda prefix: f"s3://plait/{prefix}?{query}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(params=["s3", "shared_path"])
def storage(request, tmp_path):
    """The same tests against an object store and against a local (shared) folder."""
    if request.param == "s3":
        return request.getfixturevalue("s3")(f"run-{time.monotonic_ns()}")
    return str(tmp_path / "shared" / "run")


def linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 4)


def test_a_checkpoint_committed_to_storage_loads_back_on_another_machine(storage, tmp_path):
    model = linear()
    ckpts = StorageLocation.parse(storage).child("checkpoints")
    saver = Checkpointer(tmp_path / "here" / "checkpoints", keep_last=2, storage=ckpts)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight += 1
        saver.save(step, ModelOptimizer(model))
    assert saver.stored() == ["step_00000002", "step_00000003"]  # keep_last applies on the storage side too
    # Another machine: an empty staging folder; "latest" is the storage side's newest, downloaded first.
    other = linear(seed=1)
    meta = Checkpointer(tmp_path / "there" / "checkpoints", storage=ckpts.uri).load("latest", ModelOptimizer(other))
    assert meta["step"] == 3 and torch.equal(other.weight, model.weight)
    assert (tmp_path / "there" / "checkpoints" / "step_00000003" / "meta.json").is_file()


KILLED_UPLOAD = textwrap.dedent("""
    import sys, torch
    from plait.runtime.checkpoint import Checkpointer, ModelOptimizer
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 4096)  # 16 MiB of weights: the upload takes a while
    ckpt = Checkpointer(sys.argv[1], storage=sys.argv[2])
    ckpt.save(1, ModelOptimizer(model))
    print("step 1 committed", flush=True)
    with torch.no_grad():
        model.weight += 1
    ckpt.save(2, ModelOptimizer(model))
    print("step 2 committed", flush=True)
""")


def test_a_kill_during_an_upload_leaves_the_previous_checkpoint_the_latest(s3, tmp_path):
    uri = s3(f"killed-{time.monotonic_ns()}")
    loc = StorageLocation.parse(uri)
    script = tmp_path / "upload.py"
    script.write_text(KILLED_UPLOAD)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "stage"), uri], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "step 1 committed"
    deadline = time.monotonic() + 120
    while not loc.files("step_00000002"):  # the first file of step 2 is in: kill the uploader now
        assert proc.poll() is None and time.monotonic() < deadline, "the upload of step 2 finished or never began"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "meta.json" not in loc.files("step_00000002")  # torn: some files, no marker
    assert stored_checkpoints(loc) == ["step_00000001"] and latest_stored(loc) == "step_00000001"
    torch.manual_seed(0)
    expected = torch.nn.Linear(1024, 4096)
    restored = torch.nn.Linear(1024, 4096)
    meta = Checkpointer(tmp_path / "elsewhere", storage=uri).load("latest", ModelOptimizer(restored))
    assert meta["step"] == 1 and torch.equal(restored.weight, expected.weight)
    # The next save of step 2 replaces the torn files and commits.
    Checkpointer(tmp_path / "elsewhere", storage=uri).save(2, ModelOptimizer(restored))
    assert stored_checkpoints(loc) == ["step_00000001", "step_00000002"]


def test_an_s3_endpoint_comes_from_aws_endpoint_url_and_is_recorded_for_the_ranks():
    loc = StorageLocation.parse("s3://bucket/runs/a", env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert loc.root == "bucket/runs/a" and str(loc) == "s3://bucket/runs/a"
    assert "endpoint_override=127.0.0.1%3A9000" in loc.uri and "scheme=http" in loc.uri
    assert loc.child("checkpoints").root == "bucket/runs/a/checkpoints"
    assert StorageLocation.parse(loc.child("checkpoints").uri, env={}).root == "bucket/runs/a/checkpoints"
    assert loc.child("checkpoints").parent().uri == loc.uri


def test_an_unknown_filesystem_scheme_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="storage='nope://bucket/x': pyarrow cannot open"):
        StorageLocation.parse("nope://bucket/x")


RAY_TEMP = "/tmp/ray/session_2026-11-30_10-00-00_000000_1/runtime_resources/working_dir_files/_ray_pkg_0123abcd"


def test_ray_jobs_temporary_working_dir_is_detected_from_the_current_directory():
    assert ray_job_working_dir({}, RAY_TEMP + "/examples") == Path(RAY_TEMP)
    assert ray_job_working_dir({}, "/home/me/plait") is None


def test_a_relative_run_dir_under_a_ray_job_goes_to_the_persistent_root(tmp_path):
    env = {"PLAIT_RUN_ROOT": str(tmp_path / "runs-root")}
    path, note = persistent_path("runs/gpt_dp2", "run_dir", env, RAY_TEMP)
    assert path == tmp_path / "runs-root" / "runs" / "gpt_dp2"
    assert "Ray's temporary copy" in note and str(path) in note
    home, _ = persistent_path("runs/gpt_dp2", "run_dir", {"HOME": "/home/me"}, RAY_TEMP)
    assert home == Path("~/plait-runs/runs/gpt_dp2").expanduser()
    assert persistent_path("runs/gpt_dp2", "run_dir", env, "/home/me/plait") == (Path("runs/gpt_dp2"), "")


def test_an_absolute_path_inside_rays_temporary_copy_is_refused():
    with pytest.raises(ConfigError, match="lies inside Ray's temporary working directory"):
        persistent_path(RAY_TEMP + "/runs/x", "run_dir", {}, RAY_TEMP)


# --- a job's outputs at a storage location ---


def toy(run_dir, storage="", **train):
    table = {"job": "toy_job", "run_dir": str(run_dir), "storage": storage, "workers": {"num": 2}, "train": train}
    return run_job(spec_from_table(table))


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    return toy(tmp_path_factory.mktemp("plain") / "run", steps=4)


@pytest.mark.slow
def test_a_job_resumed_from_its_storage_on_another_machine_equals_an_uninterrupted_run(uninterrupted, storage,
                                                                                       tmp_path):
    first = toy(tmp_path / "machine_a", storage, steps=2)
    loc = StorageLocation.parse(storage)
    assert first["storage"] == str(loc)
    assert {"run.json", "spec.json", "plait.log", "metrics.jsonl", "metrics.png", "summary.json",
            "checkpoints"} <= set(loc.entries())  # the plot is drawn at the end of the run and copied with it
    assert stored_checkpoints(loc.child("checkpoints")) == ["step_00000001", "step_00000002"]
    # Another machine: an empty run directory; "latest" is the storage side's step 2, downloaded there.
    second = toy(tmp_path / "machine_b", storage, steps=4, resume="latest")
    assert second["start_step"] == 2 and second["resume_from"].endswith("machine_b/checkpoints/step_00000002")
    assert torch.equal(second["weight"], uninterrupted["weight"])
    metrics = [json.loads(line)["step"] for line in loc.read_bytes("metrics.jsonl").decode().splitlines()]
    assert metrics == [1, 2, 3, 4]  # the history continues where the first machine left it
    assert json.loads(loc.read_bytes("summary.json"))["run_id"] == second["run_id"]
    assert stored_checkpoints(loc.child("checkpoints"))[-1] == "step_00000004"
    assert main(["plot", storage]) == 0  # `plait plot STORAGE` draws from the storage location, into it
    assert loc.read_bytes("metrics.png")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_checkpoint_uri_as_train_resume_starts_a_fresh_run_from_it(uninterrupted, s3, tmp_path):
    storage = s3(f"from-uri-{time.monotonic_ns()}")
    toy(tmp_path / "a", storage, steps=4, checkpoint_every=2)
    start = StorageLocation.parse(storage).child("checkpoints/step_00000002")
    again = toy(tmp_path / "b", s3(f"other-{time.monotonic_ns()}"), steps=4, resume=start.uri)
    assert again["start_step"] == 2 and torch.equal(again["weight"], uninterrupted["weight"])


def test_a_fresh_start_keeps_the_storage_sides_earlier_run_under_earlier(storage, tmp_path):
    first = RunDir.plan(tmp_path / "run", "", storage=storage)
    first.start("toy_job")
    Checkpointer(tmp_path / "run" / "checkpoints", run_id=first.run_id).save(1, ModelOptimizer(linear()))
    first.publish()
    second = RunDir.plan(tmp_path / "run", "", storage=storage)
    loc = second.storage
    assert loc.exists("checkpoints") and not loc.exists("earlier")  # planning moved nothing
    second.start("toy_job")
    assert loc.entries() == ["earlier", "run.json"]
    assert stored_checkpoints(loc.child(f"earlier/{first.run_id}/checkpoints")) == ["step_00000001"]
    assert json.loads(loc.read_bytes(f"earlier/{first.run_id}/run.json"))["run_id"] == first.run_id
    assert json.loads(loc.read_bytes("run.json"))["run_id"] == second.run_id


def test_a_missing_resume_uri_is_refused_before_launch_listing_the_stored_checkpoints(s3, tmp_path):
    storage = s3(f"missing-{time.monotonic_ns()}")
    ckpts = StorageLocation.parse(storage).child("checkpoints")
    Checkpointer(tmp_path / "stage", storage=ckpts).save(3, ModelOptimizer(linear()))
    with pytest.raises(ConfigError) as info:
        RunDir.plan(tmp_path / "run", ckpts.child("step_00000009").uri)
    assert "checkpoint s3://plait/" in str(info.value) and "step_00000009 does not exist" in str(info.value)
    assert f"{ckpts}/step_00000003" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_a_bucket_that_does_not_exist_is_refused_before_anything_starts(s3, tmp_path):
    missing = s3("x").replace("s3://plait/", "s3://no-such-bucket/")
    with pytest.raises(ConfigError, match="bucket .*'no-such-bucket' does not exist there: create it first"):
        RunDir.plan(tmp_path / "run", "", storage=missing)


def test_a_storage_folder_holding_someone_elses_files_is_refused(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        RunDir.plan(tmp_path / "run", "", storage=str(tmp_path / "theirs"))


def test_a_spec_read_inside_rays_temporary_working_dir_puts_run_dir_under_the_persistent_root(
        tmp_path, monkeypatch, capsys):
    ray_copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    ray_copy.mkdir(parents=True)
    monkeypatch.chdir(ray_copy)  # where `ray job submit --working-dir .` starts the entrypoint
    monkeypatch.setenv("PLAIT_RUN_ROOT", str(tmp_path / "persistent"))
    spec = spec_from_table({"job": "toy_job", "run_dir": "runs/toy", "storage": "outputs/toy"})
    assert spec.run_dir == tmp_path / "persistent" / "runs" / "toy"
    assert spec.storage == str(tmp_path / "persistent" / "outputs" / "toy")
    assert "Ray's temporary copy" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="lies inside Ray's temporary working directory"):
        spec_from_table({"job": "toy_job", "run_dir": str(ray_copy / "runs")})


@pytest.mark.slow
def test_a_relative_run_dir_under_ray_job_submit_lands_under_the_persistent_root(request, tmp_path):
    """A real `ray job submit --working-dir`: the run directory outlives Ray's temporary copy."""
    address, env = request.getfixturevalue("job_cluster")
    work = tmp_path / "project"
    work.mkdir()
    shutil.copy(Path(__file__).parent / "toy_job.py", work / "toy_job.py")
    (work / "toy.toml").write_text('job = "toy_job"\nrun_dir = "runs/toy"\n[workers]\nnum = 2\n[train]\nsteps = 2\n')
    root = tmp_path / "persistent"
    submit = ["ray", "job", "submit", "--address", address, "--working-dir", str(work), "--",
              f"PLAIT_RUN_ROOT={root}", "plait", "run", "toy.toml"]
    done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=300, cwd=work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert f"using {root / 'runs' / 'toy'} instead" in done.stdout
    assert (root / "runs" / "toy" / "summary.json").is_file()
    assert stored_checkpoints(StorageLocation.parse(root / "runs" / "toy" / "checkpoints")) == [
        "step_00000001", "step_00000002"]
    assert not (work / "runs").exists()
