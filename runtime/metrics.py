"""Per-step metrics: a JSONL file, TensorBoard scalars and a progress bar, written by one rank.

    metrics = MetricsLogger(run_dir, enabled=ctx.is_main, total_steps=cfg.train.steps, start_step=start)
    metrics.log(step, loss=..., tokens_per_s=..., step_time_s=...)   # memory is added here
    metrics.close()

A run that resumes (``train.resume=latest``, or a restart after a crash) logs the steps after its
checkpoint again: opening the logger at ``start_step`` first drops the lines of later steps from
``metrics.jsonl`` (written aside and renamed in, so the file is whole at every moment) and tells
TensorBoard to purge its events from ``start_step + 1`` on, so both hold each step once, the resumed
run's values winning.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import psutil
import torch


def memory_bytes(device: torch.device | None = None) -> int:
    """Peak device memory on GPU, else this process's resident set size."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process(os.getpid()).memory_info().rss)


PROGRESS_MODES = ("bar", "lines", "off")
MIN_BAR_COLUMNS = 20  # narrower terminals get lines; at 0 columns tqdm (4.70) loops forever on Ray's bar prefix


def progress_mode(stdout: TextIO | None = None, stderr: TextIO | None = None) -> str:
    """The driver's choice of progress display for rank 0 (passed to the ranks as PLAIT_PROGRESS).

    PLAIT_PROGRESS set on the driver wins. Otherwise "bar" when both stdout and stderr are a terminal at
    least MIN_BAR_COLUMNS wide (Ray draws the ranks' bar on the driver's stderr), else "lines" (a line every
    10% of steps, readable in logs and under ``ray job submit``). A pseudo-terminal of size 0x0 (``script``
    run without a terminal, some CI runners and containers) counts as no terminal."""
    chosen = os.environ.get("PLAIT_PROGRESS", "").strip().lower()
    if chosen:
        if chosen not in PROGRESS_MODES:
            raise ValueError(f"PLAIT_PROGRESS={chosen!r} is not one of: {', '.join(PROGRESS_MODES)}")
        return chosen
    for stream in (stdout or sys.stdout, stderr or sys.stderr):
        if terminal_columns(stream) < MIN_BAR_COLUMNS:
            return "lines"
    return "bar"


def terminal_columns(stream: TextIO) -> int:
    """Width of the terminal behind ``stream``; 0 when it is not a terminal."""
    try:
        if not stream.isatty():
            return 0
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def show_whole_steps_in_ray_bars() -> None:
    """On the driver: draw the ranks' bars with whole step counts. A rank's ``tqdm_ray`` bar is drawn by Ray on the
    driver with a real tqdm made with ``unit_scale=True``, which writes counts below 1000 with SI formatting and a
    decimal ("14.0/20.0"); Ray offers no option, so its driver-side bar class is given ``unit_scale=False``."""
    try:
        from ray.experimental import tqdm_ray
    except ImportError:
        return
    base = getattr(tqdm_ray, "_Bar", None)
    if base is None or getattr(base, "plait_whole_steps", False):
        return

    class WholeStepBar(base):
        plait_whole_steps = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.bar.unit_scale = False
            self.bar.refresh()

    tqdm_ray._Bar = WholeStepBar


def _progress_bar(total: int, desc: str):
    import ray

    if ray.is_initialized():  # inside a rank actor: Ray renders this bar in the driver's terminal
        from ray.experimental.tqdm_ray import tqdm

        return tqdm(total=total, desc=desc)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc)


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 device: torch.device | None = None, progress: str | None = None, desc: str = "train"):
        """progress: "bar" (a live bar), "lines" (a line every 10% of steps) or "off";
        default from PLAIT_PROGRESS (set by the driver from ``progress_mode()``), else "lines"."""
        self.enabled, self.device, self.total, self.run_dir = enabled, device, total_steps, Path(run_dir)
        self.progress = progress or os.environ.get("PLAIT_PROGRESS", "lines")
        self.every = max(1, total_steps // 10)
        self.jsonl = self.tb = self.bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dropped = drop_steps_after(run_dir / "metrics.jsonl", start_step)
        if dropped:
            print(f"[plait] metrics.jsonl: {dropped} line(s) after step {start_step} dropped; this run, resumed "
                  f"from step {start_step}, logs those steps again", flush=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard readers drop the events of steps >= purge_step written before this point
        self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        if self.progress == "bar":
            self.bar = _progress_bar(total_steps, desc)
            self.bar.update(start_step)

    def log(self, step: int, **scalars: Any) -> None:
        if not self.enabled:
            return
        scalars.setdefault("mem_bytes", memory_bytes(self.device))
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in scalars.items():
            self.tb.add_scalar(key, float(value), step)
        if self.bar is not None:
            self.bar.set_description(f"loss {scalars.get('loss', float('nan')):.4f}")
            self.bar.update(1)
        elif self.progress == "lines" and (step % self.every == 0 or step == self.total):
            shown = " ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k != "mem_bytes")
            print(f"[plait] step {step}/{self.total} {shown}", flush=True)

    def close(self) -> None:
        """Closes the files; with a run storage location (run.json names it) copies them there."""
        if not self.enabled:
            return
        self.jsonl.close()
        self.tb.close()
        if self.bar is not None:
            self.bar.close()
        from plait.runtime.checkpoint_store import run_storage, upload_run_files

        try:
            storage = run_storage(self.run_dir)
            if storage is not None:
                upload_run_files(self.run_dir, storage, ("metrics.jsonl", "tensorboard"))
        except Exception as e:  # noqa: BLE001 - the run's end copies them again
            print(f"[plait] copying metrics to the storage location failed ({type(e).__name__}: {e})", flush=True)


def drop_steps_after(path: Path, step: int) -> int:
    """Remove the records of steps after ``step`` (and a torn last line) from the JSONL file ``path``, atomically:
    the kept lines are written beside it, fsynced and renamed over it. Returns how many lines went."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash mid-write
    if kept == lines:
        return 0
    from plait.runtime.storage_location import StorageLocation

    StorageLocation.parse(path.parent).write_marker(path.name, "".join(kept).encode())  # aside, fsync, rename
    return len(lines) - len(kept)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run directory's metrics.jsonl, or of a storage location's (a URI such as s3://...)."""
    from plait.runtime.storage_location import StorageLocation, is_uri

    if is_uri(str(run_dir)) and not str(run_dir).startswith("file://"):
        loc = StorageLocation.parse(str(run_dir))
        if not loc.is_file("metrics.jsonl"):
            raise FileNotFoundError(f"{loc}/metrics.jsonl not found: is {loc} a Plait run's storage location?")
        text = loc.read_bytes("metrics.jsonl").decode()
    else:
        path = Path(run_dir) / "metrics.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a Plait run directory (made by `plait run`)?")
        text = path.read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
