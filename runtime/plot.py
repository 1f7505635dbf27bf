"""``plait plot RUN_DIR``: one panel per metric the run logged, against the step, as one PNG.

    panels(records)  -> ["loss", "lr", "tokens_per_s", "mem_bytes", ...]   what will be drawn, in order
    draw(records)    -> a matplotlib Figure;   plot_run(run_dir, out) -> the PNG's path
    (``run_dir`` may be a storage location, s3://...: `plait plot s3://bucket/runs/x` draws from there)

A run that logs both a metric and the seconds it was reached at gets one more panel, first, with the
metric against wall-clock time (``XY_PANELS``): an RL run's ``reward`` against ``wall_s`` compares a
synchronous and an asynchronous run on the axis that matters (steps of the two take different times).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from plait.runtime.metrics import read_metrics

# Known metrics first, in this order, with their titles and y labels; any other numeric key follows.
KNOWN = {
    "loss": ("training loss", "loss"),
    "lr": ("learning rate", "lr"),
    "tokens_per_s": ("throughput", "tokens / s (all ranks)"),
    "mem_bytes": ("memory", "bytes"),
    "step_time_s": ("step time", "s"),
    "moe_aux_loss": ("MoE auxiliary loss (weighted balance + z-loss)", "aux loss"),
    "expert_max_share": ("expert load: busiest expert / mean (1 = balanced)", "max / mean tokens"),
}
NOT_METRICS = {"step", "time"}
# Panels of one metric against another logged key: name -> (x key, y key, title, x label, y label).
XY_PANELS = {
    "reward_vs_wall_s": ("wall_s", "reward", "reward against wall time", "wall-clock s", "reward"),
}


def by_step(records: list[dict]) -> dict[int, dict]:
    """The last record of each step (a restarted run may log a step twice)."""
    return {int(r["step"]): r for r in records if "step" in r}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def panels(records: list[dict]) -> list[str]:
    """The metrics to draw: x-y panels whose two keys were logged, then every key with at least one finite
    number, known ones first."""
    logged = {key for r in records for key, value in r.items()
              if key not in NOT_METRICS and _number(value) is not None}
    pairs = [name for name, (x, y, *_) in XY_PANELS.items() if x in logged and y in logged]
    return pairs + [k for k in KNOWN if k in logged] + sorted(logged - KNOWN.keys())


def _memory_unit(values: list[float]) -> tuple[str, float]:
    peak = max((v for v in values if not math.isnan(v)), default=0.0)
    return ("GiB", 2.0**30) if peak >= 2**30 else ("MiB", 2.0**20)


def draw(records: list[dict], title: str = ""):
    """A figure with one panel per metric in ``panels(records)``, steps on an integer x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = by_step(records)
    steps = sorted(rows)
    keys = panels(list(rows.values()))
    if not keys:
        raise ValueError("the run's metrics.jsonl has no numeric metric to plot (only step/time)")
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(keys):]:
        fig.delaxes(ax)
    for ax, key in zip(flat[: len(keys)], keys, strict=True):
        if key in XY_PANELS:
            _draw_xy(ax, [rows[s] for s in steps], *XY_PANELS[key])
            continue
        values = [_number(rows[s].get(key)) for s in steps]
        values = [math.nan if v is None else v for v in values]
        panel_title, ylabel = KNOWN.get(key, (key, key))
        if key == "mem_bytes":
            unit, scale = _memory_unit(values)
            values, ylabel = [v / scale for v in values], unit
        ax.plot(steps, values, marker="." if len(steps) <= 20 else None)
        ax.set(xlabel="step", ylabel=ylabel, title=panel_title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if title else None)  # room for the title
    return fig


def _draw_xy(ax, rows: list[dict], x: str, y: str, title: str, xlabel: str, ylabel: str) -> None:
    """``y`` against ``x`` over the steps that logged both finite (in step order)."""
    points = [(_number(r.get(x)), _number(r.get(y))) for r in rows]
    points = [(a, b) for a, b in points if a is not None and b is not None]
    ax.plot([a for a, _ in points], [b for _, b in points], marker="." if len(points) <= 20 else None)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path | str:
    """The PNG of a run directory's metrics (default RUN_DIR/metrics.png). ``run_dir`` may be a storage
    location's URI (s3://...): its metrics.jsonl is read there and, without ``out``, the PNG goes there."""
    import tempfile

    import matplotlib.pyplot as plt
    from plait.runtime.storage_location import StorageLocation, is_uri

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty: the run logged no step")
    remote = is_uri(str(run_dir)) and not str(run_dir).startswith("file://")
    title = str(run_dir).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] if remote else Path(run_dir).resolve().name
    fig = draw(records, title=title)
    if remote and not out:
        loc = StorageLocation.parse(str(run_dir))
        with tempfile.TemporaryDirectory(prefix="plait-plot-") as tmp:
            fig.savefig(Path(tmp) / "metrics.png", dpi=100)
            plt.close(fig)
            loc.upload_file(Path(tmp) / "metrics.png", "metrics.png")
        return f"{loc}/metrics.png"
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
