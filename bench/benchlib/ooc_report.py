"""The table bench/ooc_gnn.py prints: one row per system and budget, from the worker's per-epoch figures."""

from __future__ import annotations

import numpy as np

HEADER = (f"{'system':<17} {'epoch_s':>8} {'sample':>7} {'read':>7} {'compute':>8} {'wait':>7} {'disk_MiB':>9} "
          f"{'ampl_rows':>9} {'ampl_dist':>9} {'hit':>5} {'acc%':>6} {'limit_MiB':>8}")


def mean(epochs: list[dict], key: str) -> float:
    return float(np.mean([e[key] for e in epochs]))


def report(r: dict) -> str:
    """One system's row of the table under HEADER (means over its measured epochs)."""
    ep = r["epochs"]
    needed = sum(e["needed_bytes"] for e in ep)
    amp = f"{sum(e['disk_bytes'] for e in ep) / needed:9.2f}" if needed else f"{'-':>9}"
    distinct = sum(e.get("distinct_bytes", 0) for e in ep)
    amp_d = f"{sum(e['disk_bytes'] for e in ep) / distinct:9.2f}" if distinct else f"{'-':>9}"
    hit = ep[-1]["hit_rate"]
    return (f"{r['system']:<17} {mean(ep, 'epoch_s'):8.2f} {mean(ep, 'sample_s'):7.2f} {mean(ep, 'read_s'):7.2f} "
            f"{mean(ep, 'compute_s'):8.2f} {mean(ep, 'wait_s'):7.2f} {mean(ep, 'disk_bytes') / 2**20:9.1f} "
            f"{amp} {amp_d} {'    -' if hit is None else f'{hit:5.2f}'} {100 * r['acc']:6.2f} "
            f"{r['limit_bytes'] / 2**20:8.0f}" + ("  (> this: no batch finished; killed)" if r.get("lower_bound") else
                                                  f"  (extrapolated: {ep[-1]['batches']} of {ep[-1]['of']} batches)"
                                                  if ep[-1]["batches"] < ep[-1]["of"] else ""))
