"""Importing a graph larger than memory: Plait's import against the ordinary in-memory route, under a memory budget.

    python bench/gnn_import.py --quick   # 1M nodes x 128 float32 (0.5 GB), 20M edges, 512 MiB budget: ~1-2 min
    python bench/gnn_import.py           # 10M nodes x 256 float32 (10.2 GB), 200M edges (3.2 GB), 4 GiB budget

The script writes a synthetic graph (uniform random edges as Parquet in row groups of 1M, features as .npy,
labels, splits and a GraphBolt-style metadata.yaml), then runs each system in its own subprocess inside a cgroup v1
memory group (bench/benchlib/memgroup.py, /sys/fs/cgroup/memory/plait-import-*) whose memory.limit_in_bytes is the
budget; the child loads its libraries (torch, pyarrow, plait) first, outside the group (memory charged before a
process joins a v1 group stays where it was), and starts work once it is inside, so the group charges the work
alone. The systems:

- plait: ``import_graph`` (gnn/graph_import.py): edges streamed twice into a CSC graph through memory-mapped files,
  features streamed into the checksummed feature file, a crc32 of every source file.
- baseline: what a PyG user does: read the whole edge list (pyarrow -> numpy) and the whole feature array
  (np.load), sort the edges by (dst, src) with torch (as torch_geometric.utils.sort_edge_index does), build indptr
  with bincount + cumsum, save indptr, indices and the features with np.save.
- baseline-unbounded: the same without a limit, to show what it needs (not run where it would need more than half
  of the machine's available memory: full mode needs ~28 GiB).

Reported per system: wall seconds, peak working memory (the group's usage beyond page cache, sampled every 20 ms:
anonymous and kernel memory; page cache is reclaimable and bounded by the limit anyway), the group's
memory.max_usage_in_bytes (page cache included), the child's VmHWM (peak resident, file pages it mapped included),
and whether it finished or was OOM-killed. Where no group can be made (not root, no cgroup v1), the children run
without a limit and the line "memory bound:" says so.

Last line: ``RESULT baseline_over_plait_memory=<baseline-unbounded peak / plait peak> plait_fits=1 baseline_fits=0
plait_s=... baseline_unbounded_s=... plait_peak_mib=... baseline_peak_mib=... budget_mib=... edges=... feature_gb=...``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from benchlib import proc_status
from benchlib.memgroup import MemGroup, can_make_groups, remove_stale_groups

GROUP_PREFIX = "plait-import"
EDGE_GROUP = 1 << 20  # edges per Parquet row group
ROW_CHUNK = 1 << 16  # feature rows generated at a time
BASELINE_EDGE_BYTES = 90  # the in-memory route's peak per edge beyond the features (--quick: 2155 MiB, 20M edges)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def write_source(folder: Path, n: int, e: int, dim: int, classes: int = 16, seed: int = 0) -> Path:
    """The synthetic graph's files and metadata.yaml (reused when already complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    meta = folder / "metadata.yaml"
    if meta.is_file():
        return meta
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    with pq.ParquetWriter(folder / "edges.parquet", pa.schema([("src", pa.int64()), ("dst", pa.int64())])) as w:
        for lo in range(0, e, EDGE_GROUP):
            m = min(EDGE_GROUP, e - lo)
            w.write_table(pa.table({"src": rng.integers(0, n, m), "dst": rng.integers(0, n, m)}))
    x = np.lib.format.open_memmap(folder / "feat.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for lo in range(0, n, ROW_CHUNK):
        x[lo : lo + ROW_CHUNK] = rng.standard_normal((min(ROW_CHUNK, n - lo), dim), dtype=np.float32)
    x.flush()
    del x
    np.save(folder / "labels.npy", rng.integers(0, classes, n))
    perm = rng.permutation(n)
    for name, ids in (("train", perm[: n // 10]), ("val", perm[n // 10 : n // 5]), ("test", perm[n // 5 : n // 2])):
        np.save(folder / f"{name}.npy", np.sort(ids))
    sets = {f"{k}_set": [{"data": [{"name": "seeds", "format": "numpy", "path": f"{v}.npy"}]}]
            for k, v in (("train", "train"), ("validation", "val"), ("test", "test"))}
    doc = {"dataset_name": "bench", "graph": {"nodes": [{"num": n}], "edges": [{"format": "parquet",
                                                                                 "path": "edges.parquet"}]},
           "feature_data": [{"domain": "node", "name": "feat", "format": "numpy", "path": "feat.npy"},
                            {"domain": "node", "name": "label", "format": "numpy", "path": "labels.npy"}],
           "tasks": [{"name": "node_classification", "num_classes": classes, **sets}]}
    meta.write_text(yaml.safe_dump(doc))
    return meta


def run_plait(meta: Path, out: Path) -> None:
    from plait.gnn.graph_import import import_graph

    import_graph(meta, out)


def run_baseline(meta: Path, out: Path) -> None:
    """The ordinary route: everything in RAM."""
    import pyarrow.parquet as pq
    import torch

    folder = meta.parent
    table = pq.read_table(folder / "edges.parquet")
    src = torch.from_numpy(table.column("src").to_numpy())
    dst = torch.from_numpy(table.column("dst").to_numpy())
    del table
    x = np.load(folder / "feat.npy")
    n = x.shape[0]
    perm = torch.argsort(dst * n + src)  # sort_edge_index's key: by target, then source
    indices = src[perm].to(torch.int32)
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(dst, minlength=n), 0, out=indptr[1:])
    out.mkdir(parents=True)
    np.save(out / "indptr.npy", indptr.numpy())
    np.save(out / "indices.npy", indices.numpy())
    np.save(out / "features.npy", x)


def child(a: argparse.Namespace) -> None:
    if a.child == "plait":  # the libraries in first, outside the group: the group charges the work alone
        import plait.gnn.graph_import  # noqa: F401
    else:
        import pyarrow.parquet  # noqa: F401
        import torch  # noqa: F401
    print("ready", flush=True)
    sys.stdin.readline()  # "go": the parent has moved this process into its group
    start = time.perf_counter()
    (run_plait if a.child == "plait" else run_baseline)(Path(a.meta), Path(a.out))
    print(json.dumps({"seconds": time.perf_counter() - start, "vmhwm": proc_status("VmHWM:")}), flush=True)


def measure(system: str, meta: Path, out: Path, limit: int | None, grouped: bool) -> dict:
    """Run one system in a child process (in a memory group limited to ``limit`` when ``grouped``)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", "plait" if system == "plait" else "baseline", "--meta", str(meta),
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    group, peak, done = None, [0], threading.Event()
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"{system}: the child did not start ({proc.wait()})")
    if grouped:
        group = MemGroup(f"{GROUP_PREFIX}-{system}-{os.getpid()}")
        if limit:
            group.write("memory.limit_in_bytes", limit)
        group.enter(proc.pid)

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], group.usage_beyond_cache())
                except (OSError, ValueError):
                    pass
                done.wait(0.02)

        threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    proc.stdin.write("go\n")
    proc.stdin.flush()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    result = {"system": system, "rc": proc.returncode, "wall_s": wall, "peak_work": peak[0]}
    if group is not None:
        result["max_usage"] = int((group.path / "memory.max_usage_in_bytes").read_text())
        oom = (group.path / "memory.oom_control").read_text()
        result["oom_kills"] = int(next((ln.split()[1] for ln in oom.splitlines() if ln.startswith("oom_kill ")), 0))
        group.remove()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if lines:
        result.update(json.loads(lines[-1]))
    result["fits"] = proc.returncode == 0
    if not grouped:  # no group to sample: the peak resident size is the best figure there is
        result["peak_work"] = result.get("vmhwm", 0)
    shutil.rmtree(out, ignore_errors=True)
    return result


def mib(v) -> str:
    return f"{v / 2**20:,.0f}" if v else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--nodes", type=int, default=0)
    p.add_argument("--edges", type=int, default=0)
    p.add_argument("--dim", type=int, default=0)
    p.add_argument("--budget-mib", type=int, default=0)
    p.add_argument("--dir", default="/tmp/plait-gnn-import")
    p.add_argument("--keep", action="store_true", help="keep the generated source files for the next run")
    p.add_argument("--child", default="")
    p.add_argument("--meta", default="")
    p.add_argument("--out", default="")
    a = p.parse_args()
    if a.child:
        return child(a)
    n = a.nodes or (1_000_000 if a.quick else 10_000_000)
    e = a.edges or (20_000_000 if a.quick else 200_000_000)
    dim = a.dim or (128 if a.quick else 256)
    budget = (a.budget_mib or (512 if a.quick else 4096)) << 20
    root = Path(a.dir)
    t0 = time.perf_counter()
    meta = write_source(root / f"src-{n}-{e}-{dim}", n, e, dim)
    feature_bytes, edge_bytes = n * dim * 4, e * 16
    print(f"source: {n:,} nodes, {e:,} edges ({edge_bytes / 2**30:.2f} GiB as int64 pairs), features "
          f"{feature_bytes / 2**30:.2f} GiB; {(feature_bytes + edge_bytes) / budget:.1f}x the {mib(budget)} MiB budget "
          f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
    grouped = can_make_groups(GROUP_PREFIX)
    if grouped:
        remove_stale_groups(GROUP_PREFIX)
    bound = "cgroup v1 memory.limit_in_bytes" if grouped else ("NONE (no cgroup v1 memory group could be made: not "
                                                                "root?); peaks are VmHWM, without a limit")
    print(f"memory bound: {bound}", flush=True)
    runs = [measure("plait", meta, root / "out-plait", budget, grouped),
            measure("baseline", meta, root / "out-baseline", budget, grouped)]
    need = e * BASELINE_EDGE_BYTES + feature_bytes  # what the in-memory route holds at its peak (measured, --quick)
    if need < available_memory() / 2:
        runs.append(measure("baseline-unbounded", meta, root / "out-baseline", None, grouped))
    else:  # it would push the whole machine into swap or its OOM killer
        print(f"baseline-unbounded: not run: it needs about {need / 2**30:.1f} GiB, more than half of this machine's "
              f"available memory ({available_memory() / 2**30:.1f} GiB)", flush=True)
        runs.append({"system": "baseline-unbounded", "rc": None, "wall_s": float("nan"), "peak_work": 0,
                     "fits": False})
    print(f"{'system':<20} {'fits':>5} {'wall s':>8} {'peak work MiB':>14} {'max usage MiB':>14} {'VmHWM MiB':>10}")
    for r in runs:
        fits = "yes" if r["fits"] else ("OOM" if r.get("oom_kills") or r["rc"] == -9 else
                                        "-" if r["rc"] is None else f"rc={r['rc']}")
        print(f"{r['system']:<20} {fits:>5} {r['wall_s']:>8.1f} {mib(r['peak_work']):>14} "
              f"{mib(r.get('max_usage')):>14} {mib(r.get('vmhwm')):>10}", flush=True)
    if not a.keep:
        shutil.rmtree(meta.parent, ignore_errors=True)
    plait, base, free = runs
    ratio = free["peak_work"] / plait["peak_work"] if plait["peak_work"] and free["peak_work"] else float("nan")
    print(f"RESULT baseline_over_plait_memory={ratio:.2f} plait_fits={int(plait['fits'])} "
          f"baseline_fits={int(base['fits'])} plait_s={plait['wall_s']:.1f} baseline_unbounded_s={free['wall_s']:.1f} "
          f"plait_peak_mib={plait['peak_work'] >> 20} baseline_peak_mib={free['peak_work'] >> 20} "
          f"budget_mib={budget >> 20} edges={e} feature_gb={feature_bytes / 1e9:.2f}")


if __name__ == "__main__":
    main()
