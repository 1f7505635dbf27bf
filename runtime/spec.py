"""Job specs: a TOML file naming the job (a Python module) and its settings.

    job = "plait.lm.lm_job"      # module with Config, train(ctx, cfg) or control(job, cfg); optional
                                        # validate, prepare, summarize
    run_dir = "runs/demo"                 # the local run directory (staging, when storage is set)
    storage = "s3://bucket/runs/demo"     # optional: where outputs persist (a folder or a pyarrow URI)
    [cluster]  address, num_cpus, ...     -> plait.runtime.cluster.ClusterConfig
    [workers]  num, cpus_per_worker, ...  -> plait.runtime.worker_group.WorkerConfig (num: by default the
                                             ranks the job's [plan] declares, dp x tp x pp x cp, else 2)
    [watchdog] floor_s, factor, ...       -> plait.runtime.watchdog.WatchdogConfig (hung-rank detection)
    [model] [data] [train] [plan] ...     -> the job module's own Config dataclass

The runtime knows nothing of the job beyond that protocol, so every capability plugs in the same way.
"""

from __future__ import annotations

import importlib
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from plait.runtime.cluster import ClusterConfig
from plait.runtime.config import ConfigError, apply_overrides, build, unknown_key_message
from plait.runtime.driver_log import say
from plait.runtime.storage_location import is_uri, persistent_path
from plait.runtime.watchdog import WatchdogConfig
from plait.runtime.worker_group import WorkerConfig

RUNTIME_KEYS = ("job", "run_dir", "storage", "cluster", "workers", "watchdog")


@dataclass
class JobSpec:
    job: str
    run_dir: Path
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    config: Any = None  # the job module's Config instance
    module: ModuleType | None = None
    source: str = ""
    code: dict[str, tuple[str, str]] = field(default_factory=dict)  # local job module sent to the ranks
    storage: str = ""  # where outputs persist: "" (the run directory only), an absolute path, or a URI
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    command: list[str] = field(default_factory=list)  # the command line that started the run (set by the CLI)


# Jobs that moved: a spec naming the old module gets the new name, not an import error.
MOVED_JOBS = {"plait.parallel.gpt_job": "plait.lm.lm_job", "plait.parallel.hf_job": "plait.lm.lm_job"}


def load_job_module(name: str, search: list[Path] | None = None) -> ModuleType:
    """Import the job module. ``search`` (default: the current directory) is added to sys.path, so a
    ``my_job.py`` beside the spec or in the directory `plait run` starts in needs no PYTHONPATH; such a
    local single-file module is sent to the ranks (``local_code``), so it runs on a cluster whose nodes
    lack the file (a package must be installed on the nodes)."""
    if name in MOVED_JOBS:
        raise ConfigError(f"job = {name!r} is now {MOVED_JOBS[name]!r}, one language-model job for every model family "
                          "(Plait's GPT from [model] sizes, or a Hugging Face folder as model.path): change the spec's "
                          f"job line to job = \"{MOVED_JOBS[name]}\"")
    search = [Path(p).resolve() for p in (search if search is not None else [Path.cwd()])]
    for folder in search:
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and not name.startswith(e.name) and e.name != name:
            raise ConfigError(f"job = {name!r} imports {e.name!r}, which is not installed: pip install it "
                              "or remove the import") from None
        where = ", ".join(str(p) for p in search)
        hint = f"name a module such as 'plait.lm.lm_job', or put {name.split('.')[0]}.py in {where}"
        raise ConfigError(f"job = {name!r}: cannot import it ({e}); {hint}") from None
    except Exception as e:  # noqa: BLE001 - a syntax or runtime error in the user's module
        raise ConfigError(f"job = {name!r}: importing it failed with {type(e).__name__}: {e}") from None
    missing = [attr for attr in ("Config", "train") if not hasattr(module, attr)]
    if "train" in missing and hasattr(module, "control"):
        missing.remove("train")  # a control job drives its own groups and actors from the driver
    if missing:
        raise ConfigError(f"job = {name!r} has no '{missing[0]}': a job module defines Config and train(ctx, cfg) "
                          "(or control(job, cfg), run on the driver)")
    return module


def local_code(name: str, search: list[Path]) -> dict[str, tuple[str, str]]:
    """``{name: (path, source)}`` when the job module is a single .py file found in ``search`` rather than
    installed: the ranks get its source with their actors, so cluster nodes need not have the file."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if name.split(".")[0] == "plait" or "." in name or origin is None or origin.endswith("__init__.py"):
        return {}
    origin = Path(origin).resolve()
    return {name: (str(origin), origin.read_text())} if origin.parent in search else {}


def read_spec_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"spec file {str(path)!r} not found; pass a TOML job file such as examples/gpt_dp2.toml")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"spec file {str(path)!r} is not valid TOML: {e}") from None


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    table = apply_overrides(read_spec_file(path), list(overrides or []))
    return spec_from_table(table, source=str(path), search=[Path(path).resolve().parent, Path.cwd()])


def spec_from_table(table: dict[str, Any], source: str = "<table>", search: list[Path] | None = None) -> JobSpec:
    if "job" not in table:
        raise ConfigError(f"{source}: missing key 'job' (the job module, e.g. job = \"plait.lm.lm_job\")")
    if not isinstance(table["job"], str):
        raise ConfigError(f"'job' must be a module name string, got {table['job']!r}")
    module = load_job_module(table["job"], search)
    job_fields = [f for f in module.Config.__dataclass_fields__]
    for key in table:
        if key not in RUNTIME_KEYS and key not in job_fields:
            raise ConfigError(unknown_key_message(key, key, list(RUNTIME_KEYS) + job_fields))
    run_dir = table.get("run_dir", f"runs/{table['job'].rsplit('.', 1)[-1]}")
    if not isinstance(run_dir, str):
        raise ConfigError(f"'run_dir' must be a path string, got {run_dir!r}")
    storage = table.get("storage", "")
    if not isinstance(storage, str):
        raise ConfigError(f"'storage' must be a path or URI string (e.g. \"s3://bucket/runs/demo\"), got {storage!r}")
    job_table = {k: v for k, v in table.items() if k not in RUNTIME_KEYS}
    config = build(module.Config, job_table, "")
    workers = build(WorkerConfig, table.get("workers", {}), "workers")
    if "num" not in (table.get("workers") or {}):
        workers.num = ranks_of_plan(config, workers.num)
    return JobSpec(
        job=table["job"],
        run_dir=output_path(run_dir, "run_dir"),
        storage=str(output_path(storage, "storage").resolve()) if storage and not is_uri(storage) else storage,
        cluster=build(ClusterConfig, table.get("cluster", {}), "cluster"),
        workers=workers,
        watchdog=build(WatchdogConfig, table.get("watchdog", {}), "watchdog"),
        config=config,
        module=module,
        source=source,
        code=local_code(table["job"], [Path(p).resolve() for p in (search or [Path.cwd()])]),
    )


def ranks_of_plan(config: Any, default: int) -> int:
    """The rank count a job's ``plan`` (a ParallelPlan field of its Config) declares, for a spec that does not
    set workers.num: ``plan.dp=4`` alone then runs 4 ranks. ``default`` for a job without a plan."""
    from plait.parallel.plan import ParallelPlan

    plan = getattr(config, "plan", None)
    try:
        return plan.world_size if isinstance(plan, ParallelPlan) else default
    except ValueError:  # degrees that make no layout: the job's validate says what is wrong with them
        return default


def output_path(path: str, key: str) -> Path:
    """``run_dir`` or a local ``storage`` path as given, except under a Ray job's temporary working
    directory (``ray job submit --working-dir``), where a relative path goes under $PLAIT_RUN_ROOT
    (default ~/plait-runs), said in one line, and a path inside that temporary copy is refused."""
    resolved, note = persistent_path(path, key)
    if note:
        say(note)
    return resolved
