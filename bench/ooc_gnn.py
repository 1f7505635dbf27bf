"""Out-of-core GNN epoch: Plait's packed loader against mmap, mmap + MADV_RANDOM, Ginex-like and in-memory features.

    python bench/ooc_gnn.py            # 2M nodes / ~40M edges / 1 GB of features; cache budgets 5%, 10%, 20%
    python bench/ooc_gnn.py --quick    # 150k nodes, 10% only, shorter caps: about a minute on 2 cores
    python bench/ooc_gnn.py --dataset PATH   # any dataset folder (gnn/dataset.py's layout: imported, assembled or
                                             # generated), read only; its packs go to PATH.packs (or --packs)

Every system trains the same GraphSAGE (2 layers, fanout 10,10, batch 1024, Adam) on the same graph (generated
by gnn/generate.py, or the --dataset folder) with the same prefetch overlap (gnn/epoch_loader.py, 2 batches ahead
on a background thread).
The systems (bench/benchlib/ooc_systems.py): mmap, mmap-random (MADV_RANDOM), ginex (per-row direct reads under a
SIEVE host cache of the budget), plait (PackedLoader: host cache + one sequential read per batch), memory (every
row in RAM: the limit, no budget) and memory-presampled (Plait's offline-sampled batches in the same order with
every row in RAM: the limit for the same work; online sampling shares the 2 cores and the GIL with compute).

The budget binds every system alike. Each system's epochs run in a fresh subprocess. Once it has set up (graph or
batch index and model in RAM, its own host cache filled or allocated) it runs a few warm-up batches in a fresh
cgroup v1 memory group (bench/benchlib/memgroup.py, /sys/fs/cgroup/memory/plait-ooc-*) without a limit while this
script samples what the group holds beyond page cache (anonymous and kernel memory: the working memory); then the
group's memory.limit_in_bytes is set to working memory + (budget - the system's own host cache) + a margin (32 MiB
for the mmap systems, whose page cache it enlarges; 256 MiB for the direct-I/O ones, which do not use the page cache
for features), so the page cache cannot hold more than the budget. Where no group can be made, the feature file is
dropped from the page cache after every batch instead; the line "memory bound:" says which was used. Each measured
epoch starts cold (the feature or pack file dropped from the page cache). An epoch slower than --time-cap is stopped
after the batch that crosses it and extrapolated; a process that finishes no epoch within 1.5 x the cap + --grace
seconds (mmap thrashing inside one batch) is killed and its time is a lower bound (mmap_is_lower_bound=1). Disk
bytes are the process's /proc/<pid>/io read_bytes (what the kernel read for it, before/after each epoch). Two read
amplifications: ``ampl_rows``, disk bytes / bytes of the rows the disk had to give, a row counted once per batch
asking for it (rows missing from the system's host cache; for mmap, every row asked; for Plait, the pack rows), and
``ampl_dist``, disk bytes / bytes of the epoch's distinct rows outside a fixed host cache (Plait: outside its cache;
the others: every distinct row), the least the disk has to give. Packs hold ``--pack-epochs`` sampled epochs
(default: the measured epochs, so no measured epoch replays another, as online sampling); their size on disk
(packs, cache and index, st_blocks) is reported against the feature file. Accuracy: validation nodes after the
measured epochs (the three online systems draw the same batches, so they score alike).

Last line: ``RESULT speedup_vs_mmap=... speedup_vs_ginex=... vs_memory=... amplification=...
amplification_distinct=... acc_gap=... packs_vs_features=...`` at the 10% budget (vs_memory: Plait's epoch / the
in-memory one; amplification: ampl_rows of Plait; acc_gap: Plait - in-memory accuracy in points; packs_vs_features:
the pack folder's bytes on disk / the feature file's).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from benchlib import proc_status
from benchlib.memgroup import MemGroup, can_make_groups, remove_stale_groups
from benchlib.ooc_report import HEADER, mean, report
from benchlib.ooc_systems import (
    SYSTEMS,
    UNBOUNDED,
    ensure_dataset,
    ensure_packs,
    io_bytes_of,
    open_any_dataset,
    open_system,
)

GROUP_PREFIX = "plait-ooc"
MARGIN = {"mmap": 32 << 20, "mmap-random": 32 << 20}  # page-cache systems: a margin is extra cache, keep it small
OTHER_MARGIN = 256 << 20  # direct-I/O systems never fill the page cache: a margin only guards against OOM


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the measured subprocess ---------------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from plait.gnn.generate import load_labels, load_split, open_dataset
    from plait.gnn.models import build_model
    from plait.gnn.sampler import NeighborSampler
    from plait.storage.disk_reader import DiskStore

    def say(kind: str, **fields) -> None:
        print(json.dumps({"kind": kind, **fields}), flush=True)

    def wait_go() -> None:
        if sys.stdin.readline().strip() != "GO":
            sys.exit(3)

    ds = open_dataset(a.data)
    fanouts = [int(f) for f in a.fanouts.split(",")]
    labels, split = torch.from_numpy(load_labels(ds.root)), load_split(ds.root)
    system = open_system(a.system, ds, a.pack, a.budget, fanouts, a.batch_size, a.seed, a.ginex_policy)
    loader, evict = system.loader, system.evict

    torch.manual_seed(a.seed)
    model = build_model("sage", ds.meta["feat_dim"], a.hidden, ds.meta["num_classes"], len(fanouts), dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)

    def step(mb, x, update: bool) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, mb.blocks), labels[mb.seeds]).backward()
        if update:
            opt.step()

    say("ready", rss=proc_status("RssAnon:"), cache_bytes=int(system.cache_bytes))
    wait_go()  # now in the memory group, without a limit: warm up to measure the working memory
    for i, (mb, x) in enumerate(loader.epoch(10**6)):
        step(mb, x, update=False)
        evict()
        if i + 1 >= a.warmup:
            break
    evict()
    say("warm")
    wait_go()  # the limit is set
    epochs = []
    for e in range(a.epochs):
        evict()  # cold start
        loader.reset_stats()
        io0, t0, compute, done = io_bytes_of(), time.perf_counter(), 0.0, 0
        for mb, x in loader.epoch(e):
            t1 = time.perf_counter()
            step(mb, x, update=True)
            compute += time.perf_counter() - t1
            done += 1
            if a.drop_every_batch:
                evict()
            if a.time_cap and time.perf_counter() - t0 > a.time_cap:
                break  # too slow to finish: the epoch is extrapolated from the batches done
        wall, s, total = time.perf_counter() - t0, loader.stats(), loader.num_batches()
        scale = total / done  # 1 unless capped
        epochs.append({"epoch_s": wall * scale, "compute_s": compute * scale, "sample_s": s["sample_s"] * scale,
                       "read_s": s["read_s"] * scale, "wait_s": s["wait_s"] * scale,
                       "disk_bytes": (io_bytes_of() - io0) * scale, "counted_bytes": s["bytes_read"] * scale,
                       "needed_bytes": s["bytes_needed"] * scale, "hit_rate": s.get("host_hit_rate"),
                       "distinct_bytes": s.get("distinct_bytes_needed", 0) * scale,
                       "batches": done, "of": total})
        log(f"  {a.system} epoch {e}: {wall * scale:.2f} s" + (f" (extrapolated from {done} of {total} batches "
                                                                 f"in {wall:.1f} s)" if done < total else ""))
    say("trained")
    wait_go()  # moved out of the group: score without the budget
    model.eval()
    val = split.val if len(split.val) <= a.eval_nodes else \
        np.sort(np.random.default_rng(1).choice(split.val, a.eval_nodes, replace=False))
    reader, correct = DiskStore(ds.features, mode="pread"), 0
    with torch.no_grad():
        for mb in NeighborSampler(ds.load_graph(), fanouts).batches(val, a.batch_size, 0, 0, shuffle=False):
            out = model(torch.from_numpy(reader.read(mb.n_id)), mb.blocks)
            correct += int((out.argmax(-1) == labels[mb.seeds]).sum())
    loader.close()
    say("result", epochs=epochs, acc=correct / len(val))


# ---- the driver --------------------------------------------------------------------------------------------
def run_system(a, system: str, budget: float, feature_bytes: int, pack: str | None, use_cgroup: bool) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--data", a.data, "--budget", str(budget),
           "--fanouts", a.fanouts, "--batch-size", str(a.batch_size), "--epochs", str(a.epochs),
           "--hidden", str(a.hidden), "--lr", str(a.lr), "--seed", str(a.seed), "--warmup", str(a.warmup),
           "--eval-nodes", str(a.eval_nodes), "--ginex-policy", a.ginex_policy, "--pack", pack or "",
           "--time-cap", str(a.time_cap)]
    if not use_cgroup and system in ("mmap", "mmap-random"):
        cmd.append("--drop-every-batch")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    group, peak, limit = None, 0, 0

    def expect(kind: str, timeout: float | None = None) -> dict | None:
        if timeout is not None and not select.select([proc.stdout], [], [], timeout)[0]:
            return None
        line = proc.stdout.readline()
        if not line and group is not None and proc.wait() == -signal.SIGKILL:
            raise MemoryError(f"{system} at {budget:.0%}: killed by the kernel (over its memory limit of "
                              f"{limit / 2**20:.0f} MiB) before '{kind}'")
        if not line:
            raise RuntimeError(f"{system} at {budget:.0%} exited with {proc.wait()} before '{kind}'" +
                               (" (over its memory limit?)" if group else ""))
        msg = json.loads(line)
        assert msg["kind"] == kind, msg
        return msg

    def go() -> None:
        proc.stdin.write("GO\n")
        proc.stdin.flush()

    try:
        ready = expect("ready")
        if use_cgroup and system not in UNBOUNDED:
            group = MemGroup(f"{GROUP_PREFIX}-{system}-{os.getpid()}")
            group.enter(proc.pid)
        stop, samples = threading.Event(), []

        def sample_anon() -> None:  # working memory: what the group holds beyond the page cache
            while not stop.is_set():
                samples.append(group.usage_beyond_cache())
                time.sleep(0.002)

        poller = threading.Thread(target=sample_anon) if group else None
        if poller:
            poller.start()
        go()
        expect("warm")
        if poller:
            stop.set()
            poller.join()
            peak = max(samples)
            extra = max(int(budget * feature_bytes) - ready["cache_bytes"], 0)
            limit = peak + extra + MARGIN.get(system, OTHER_MARGIN)
            group.write("memory.limit_in_bytes", limit)
        go()
        t0, deadline = time.perf_counter(), a.epochs * a.time_cap * 1.5 + a.grace
        if expect("trained", timeout=deadline) is None:  # stuck inside a batch (mmap thrashing): a lower bound
            disk = io_bytes_of(proc.pid)
            proc.kill()
            proc.wait()
            wall = (time.perf_counter() - t0) / a.epochs
            log(f"  {system}: no epoch finished in {deadline:.0f} s (killed); its epoch time is > {wall:.0f} s")
            result = {"acc": float("nan"), "epochs": [{"epoch_s": wall, "compute_s": 0.0, "sample_s": 0.0,
                      "read_s": 0.0, "wait_s": 0.0, "disk_bytes": disk / a.epochs, "counted_bytes": 0,
                      "needed_bytes": 0, "distinct_bytes": 0, "hit_rate": None, "batches": 0, "of": 0}],
                      "lower_bound": True}
        else:
            if group:
                group.leave(proc.pid)
            go()
            result = expect("result")
            proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if group:
            group.remove()
    result.update(system=system, budget=budget, working_bytes=peak, limit_bytes=limit,
                  cache_bytes=ready["cache_bytes"])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", default="", help="where the generated dataset goes (default /tmp/plait-bench/...)")
    p.add_argument("--dataset", default="", help="train on this dataset folder instead of a generated one (read only)")
    p.add_argument("--packs", default="", help="folder of the pack folders (default: <dataset>.packs)")
    p.add_argument("--pack-epochs", type=int, default=0, help="sampled epochs in the packs (default: --epochs)")
    p.add_argument("--nodes", type=int, default=0)
    p.add_argument("--train-frac", type=float, default=0.0)
    p.add_argument("--budgets", default="")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--fanouts", default="10,10")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--eval-nodes", type=int, default=-1, help="validation nodes scored (default 4096; 2048 quick)")
    p.add_argument("--time-cap", type=float, default=-1, help="seconds per epoch before it is extrapolated")
    p.add_argument("--grace", type=float, default=-1, help="seconds past 1.5 x the cap before a process is killed")
    p.add_argument("--ginex-policy", default="sieve", choices=["sieve", "lru"])
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--pack", default="", help=argparse.SUPPRESS)
    p.add_argument("--drop-every-batch", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.system = a.worker
        return worker(a)
    a.nodes = a.nodes or (150_000 if a.quick else 2_000_000)
    a.train_frac = a.train_frac or (0.04 if a.quick else 0.02)
    a.epochs = a.epochs or (1 if a.quick else 2)
    a.time_cap = (10.0 if a.quick else 120.0) if a.time_cap < 0 else a.time_cap
    a.grace = (0.0 if a.quick else 10.0) if a.grace < 0 else a.grace
    a.eval_nodes = (2048 if a.quick else 4096) if a.eval_nodes < 0 else a.eval_nodes
    a.warmup = min(a.warmup, 2) if a.quick else a.warmup
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks remove the memory groups
    remove_stale_groups(GROUP_PREFIX)
    a.pack_epochs = a.pack_epochs or a.epochs
    budgets = [float(b) for b in (a.budgets or ("0.1" if a.quick else "0.05,0.1,0.2")).split(",")]
    systems = a.systems.split(",")
    fanouts = [int(f) for f in a.fanouts.split(",")]
    if a.dataset:
        a.data = a.dataset
        meta = open_any_dataset(a.data)
    else:
        a.data = a.data or f"/tmp/plait-bench/ooc-gnn-{a.nodes}"
        meta = ensure_dataset(a.data, a.nodes, a.train_frac, a.seed)
    from plait.gnn.dataset import load_split, open_dataset
    from plait.storage.feature_file import open_feature_file

    ds = open_dataset(a.data)
    feature_bytes, feature_disk = open_feature_file(ds.features).data_bytes, ds.features.stat().st_blocks * 512
    use_cgroup = can_make_groups(GROUP_PREFIX)
    print(f"graph{' ' + a.data if a.dataset else ''}: {meta['num_nodes']:,} nodes, {ds.load_graph().num_edges:,} "
          f"edges, {feature_bytes / 2**20:.0f} MiB of features, {len(load_split(ds.root).train):,} train nodes; "
          f"fanout {a.fanouts}, batch {a.batch_size}, {a.epochs} cold epochs per system", flush=True)
    print("memory bound: " + ("cgroup v1 memory group per system (limit = working memory + budget - own cache)"
                              if use_cgroup else "no cgroup could be made: page cache dropped after every batch"),
          flush=True)
    results: dict[tuple[str, float], dict] = {}
    packs: dict[float, dict] = {}
    key = 0.1 if 0.1 in budgets else budgets[0]
    if "memory" in systems:
        results["memory", 0.0] = run_system(a, "memory", 0.0, feature_bytes, None, use_cgroup)
    for budget in budgets:
        need_pack = "plait" in systems or ("memory-presampled" in systems and budget == key)
        pack = packs[budget] = ensure_packs(a.data, budget, fanouts, a.batch_size, a.seed, a.pack_epochs,
                                            a.packs) if need_pack else None
        if pack:
            pack["vs_features"] = pack["disk_bytes"] / feature_disk
            print(f"\n[{budget:.0%} cache] packing {pack['pack_epochs']} sampled epoch(s): {pack['preprocess_s']:.1f} "
                  f"s; on disk {pack['disk_bytes'] / 2**20:.0f} MiB = {pack['vs_features']:.2f}x features.bin's "
                  f"{feature_disk / 2**20:.0f} MiB (packs {pack['pack_bytes'] / 2**20:.0f} MiB = "
                  f"{pack['blowup'] / pack['pack_epochs']:.2f}x the feature bytes per sampled epoch), host cache "
                  f"{pack['cache_bytes'] / 2**20:.0f} MiB serving {pack['cache_hit_rate']:.0%} of the rows", flush=True)
        for system in [s for s in systems if s not in UNBOUNDED or (s == "memory-presampled" and budget == key)]:
            at = 0.0 if system in UNBOUNDED else budget
            try:
                results[system, at] = run_system(a, system, at, feature_bytes, str(pack["path"]) if pack else None,
                                                 use_cgroup)
            except MemoryError as e:
                print(f"  {e}: no figures for it", flush=True)
        print(f"\n[{budget:.0%} cache budget = {budget * feature_bytes / 2**20:.0f} MiB]\n{HEADER}", flush=True)
        for system in systems:
            r = results.get((system, 0.0 if system in UNBOUNDED else budget))
            if r:
                print(report(r), flush=True)

    def epoch(system: str) -> float:
        r = results.get((system, 0.0 if system in UNBOUNDED else key))
        return mean(r["epochs"], "epoch_s") if r else float("nan")

    plait, pack = results.get(("plait", key)), packs.get(key)
    def ampl(key: str) -> float:
        return (sum(e["disk_bytes"] for e in plait["epochs"]) / max(sum(e[key] for e in plait["epochs"]), 1)
                if plait else float("nan"))

    gap = 100 * (plait["acc"] - results["memory", 0.0]["acc"]) if plait and ("memory", 0.0) in results else float("nan")
    print(f"RESULT speedup_vs_mmap={epoch('mmap') / epoch('plait'):.2f} "
          f"speedup_vs_ginex={epoch('ginex') / epoch('plait'):.2f} vs_memory={epoch('plait') / epoch('memory'):.2f} "
          f"amplification={ampl('needed_bytes'):.3f} amplification_distinct={ampl('distinct_bytes'):.3f} "
          f"acc_gap={gap:+.2f} "
          f"speedup_vs_mmap_random={epoch('mmap-random') / epoch('plait'):.2f} "
          f"vs_memory_same_batches={epoch('plait') / epoch('memory-presampled'):.2f} budget={key} "
          f"blowup={pack['blowup'] if pack else float('nan'):.2f} "
          f"packs_vs_features={pack['vs_features'] if pack else float('nan'):.2f} pack_epochs={a.pack_epochs} "
          f"mmap_is_lower_bound={int(bool(results.get(('mmap', key), {}).get('lower_bound')))}", flush=True)


if __name__ == "__main__":
    main()
