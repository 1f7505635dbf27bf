"""``plait plot RUN_DIR``: loss and throughput per step, from metrics.jsonl, as one PNG."""

from __future__ import annotations

from pathlib import Path

from plait.runtime.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl is empty: the run logged no step")
    # A restarted run appends; keep the last record of each step.
    by_step = {r["step"]: r for r in records}
    steps = sorted(by_step)
    out = Path(out) if out else Path(run_dir) / "metrics.png"
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [by_step[s].get("loss", float("nan")) for s in steps], color="tab:blue")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    ax_tps.plot(steps, [by_step[s].get("tokens_per_s", float("nan")) for s in steps], color="tab:green")
    ax_tps.set(xlabel="step", ylabel="tokens / s (all ranks)", title="throughput")
    ax_tps.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).name))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
