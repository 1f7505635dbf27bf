"""Job specs: a TOML file naming the job (a Python module) and its settings.

    job = "plait.parallel.gpt_job"      # module with Config, train(ctx, cfg); optional prepare, summarize
    run_dir = "runs/demo"
    [cluster]  address, num_cpus, ...     -> plait.runtime.cluster.ClusterConfig
    [workers]  num, cpus_per_worker, ...  -> plait.runtime.worker_group.WorkerConfig
    [model] [data] [train] [plan] ...     -> the job module's own Config dataclass

The runtime knows nothing of the job beyond that protocol, so every capability plugs in the same way.
"""

from __future__ import annotations

import importlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from plait.runtime.cluster import ClusterConfig
from plait.runtime.config import ConfigError, apply_overrides, build, unknown_key_message
from plait.runtime.worker_group import WorkerConfig

RUNTIME_KEYS = ("job", "run_dir", "cluster", "workers")


@dataclass
class JobSpec:
    job: str
    run_dir: Path
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    workers: WorkerConfig = field(default_factory=WorkerConfig)
    config: Any = None  # the job module's Config instance
    module: ModuleType | None = None
    source: str = ""


def load_job_module(name: str) -> ModuleType:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        hint = "name a module such as 'plait.parallel.gpt_job'"
        raise ConfigError(f"job = {name!r}: cannot import it ({e}); {hint}") from None
    for attr in ("Config", "train"):
        if not hasattr(module, attr):
            raise ConfigError(f"job = {name!r} has no '{attr}': a job module defines Config and train(ctx, cfg)")
    return module


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
    return spec_from_table(table, source=str(path))


def spec_from_table(table: dict[str, Any], source: str = "<table>") -> JobSpec:
    if "job" not in table:
        raise ConfigError(f"{source}: missing key 'job' (the job module, e.g. job = \"plait.parallel.gpt_job\")")
    if not isinstance(table["job"], str):
        raise ConfigError(f"'job' must be a module name string, got {table['job']!r}")
    module = load_job_module(table["job"])
    job_fields = [f for f in module.Config.__dataclass_fields__]
    for key in table:
        if key not in RUNTIME_KEYS and key not in job_fields:
            raise ConfigError(unknown_key_message(key, key, list(RUNTIME_KEYS) + job_fields))
    run_dir = table.get("run_dir", f"runs/{table['job'].rsplit('.', 1)[-1]}")
    if not isinstance(run_dir, str):
        raise ConfigError(f"'run_dir' must be a path string, got {run_dir!r}")
    job_table = {k: v for k, v in table.items() if k not in RUNTIME_KEYS}
    return JobSpec(
        job=table["job"],
        run_dir=Path(run_dir),
        cluster=build(ClusterConfig, table.get("cluster", {}), "cluster"),
        workers=build(WorkerConfig, table.get("workers", {}), "workers"),
        config=build(module.Config, job_table, ""),
        module=module,
        source=source,
    )
