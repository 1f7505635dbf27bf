"""Out-of-core GNN epoch: Plait's packed loader against mmap, mmap + MADV_RANDOM, Ginex-like and in-memory features.

    python bench/ooc_gnn.py            # 2M nodes / ~40M edges / 1 GB of features; cache budgets 5%, 10%, 20%
    python bench/ooc_gnn.py --quick    # 300k nodes, 10% only: about a minute on 2 cores

Every system trains the same GraphSAGE (2 layers, fanout 10,10, batch 1024, Adam) on the same generated graph
(gnn/generate.py) with the same prefetch overlap (gnn/loader.py, 2 batches ahead on a background thread):
  mmap          OnlineLoader over DiskStore(mode="mmap"): online sampling, features through the page cache
  mmap-random   the same with MADV_RANDOM (no readahead)
  ginex         OnlineLoader over CachedStore(DiskStore(mode="direct"), "sieve"): per-row direct reads, a host
                cache of the budget (Ginex-like, without its offline Belady superbatches)
  plait         PackedLoader: offline-sampled batches, the hottest rows (the budget) in a host cache, each batch's
                other rows packed contiguously and read with one sequential direct read (DiskGNN)
  memory        OnlineLoader over ArrayStore: every feature row in RAM beforehand (the limit; no budget)
  memory-presampled  Plait's offline-sampled batches in the same order with every feature row in RAM: the limit
                for the same work (online sampling shares the 2 cores and the GIL with compute; offline does not)

The budget binds every system alike. Each system's epochs run in a fresh subprocess. Once it has set up (graph or
batch index and model in RAM, its own host cache filled or allocated) it runs a few warm-up batches in a fresh
cgroup v1 memory group (/sys/fs/cgroup/memory/plait-ooc-*) without a limit while this script samples what the
group holds beyond page cache (anonymous and kernel memory: the working memory); then the group's
memory.limit_in_bytes is set to working memory + (budget - the system's own host cache) + a margin (32 MiB for
the mmap systems, whose page cache it enlarges; 256 MiB for the direct-I/O ones, which do not use the page cache
for features), so the page cache cannot hold more than the budget. Where no group can be made, the feature file
is dropped from the page cache after every batch instead; the line "memory bound:" says which was used. Each
measured epoch starts cold (the feature or pack file dropped from the page cache). An epoch slower than
--time-cap is stopped after the batch that crosses it and extrapolated; a process that finishes no epoch within
1.5 x the cap (mmap thrashing inside one batch) is killed and its time is a lower bound (mmap_is_lower_bound=1).
Disk bytes are the process's /proc/<pid>/io read_bytes; the read amplification is disk bytes / bytes of the rows
the disk had to give (rows missing from the system's host cache; for mmap, every row asked). Accuracy: validation
nodes after the measured epochs (the three online systems draw the same batches, so they score alike).

Last line: ``RESULT speedup_vs_mmap=... speedup_vs_ginex=... vs_memory=... amplification=... acc_gap=...`` at the
10% budget (vs_memory: Plait's epoch / the in-memory one; acc_gap: Plait - in-memory accuracy in points).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CG_ROOT = Path("/sys/fs/cgroup/memory")
SYSTEMS = ("mmap", "mmap-random", "ginex", "plait", "memory", "memory-presampled")
UNBOUNDED = ("memory", "memory-presampled")  # features in RAM: no budget, no memory group
MARGIN = {"mmap": 32 << 20, "mmap-random": 32 << 20}  # page-cache systems: a margin is extra cache, keep it small
OTHER_MARGIN = 256 << 20  # direct-I/O systems never fill the page cache: a margin only guards against OOM


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the measured subprocess ---------------------------------------------------------------------------------
def io_read_bytes() -> int:
    return io_bytes_of(os.getpid())


def io_bytes_of(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def worker(a: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from plait.gnn.generate import load_features, load_labels, load_split, open_dataset
    from plait.gnn.graph import CSCGraph
    from plait.gnn.loader import OnlineLoader, PackedLoader
    from plait.gnn.models import build_model
    from plait.gnn.sampler import NeighborSampler
    from plait.storage.cache import CachedStore
    from plait.storage.disk_reader import DiskStore, drop_page_cache
    from plait.storage.store import ArrayStore

    def say(kind: str, **fields) -> None:
        print(json.dumps({"kind": kind, **fields}), flush=True)

    def wait_go() -> None:
        if sys.stdin.readline().strip() != "GO":
            sys.exit(3)

    ds = open_dataset(a.data)
    n, fanouts = ds.meta["num_nodes"], [int(f) for f in a.fanouts.split(",")]
    labels, split = torch.from_numpy(load_labels(ds.root)), load_split(ds.root)
    cache_bytes, store, files = 0, None, [ds.features]
    if a.system == "memory-presampled":
        loader = PresampledInMemory(PackedLoader(a.pack, prefetch=0), np.array(load_features(ds.root)))
    elif a.system == "plait":
        loader = PackedLoader(a.pack, prefetch=2)
        cache_bytes, files = loader.info.cache_bytes, [Path(a.pack) / "packs.feat"]
        for arr in [*loader._idx.values()]:  # the batch index in RAM: working memory, as the graph is for the others
            for part in arr if isinstance(arr, list) else [arr]:
                np.asarray(part).sum()
    else:
        g = ds.load_graph()
        graph = CSCGraph(np.array(g.indptr), np.array(g.indices))  # topology in RAM (working memory) for all
        if a.system in ("mmap", "mmap-random"):
            store = DiskStore(ds.features, mode="mmap", verify=False, advise="random" if a.system == "mmap-random"
                              else None)
        elif a.system == "ginex":
            cap = int(a.budget * n)
            store = CachedStore(DiskStore(ds.features, mode="direct"), a.ginex_policy, cap)
            cache_bytes = cap * store.store.row_bytes
            store.buffer.fill(0)  # touch the cache now: its pages are the budget, not working memory to measure
        else:
            store = ArrayStore(np.array(load_features(ds.root)))
        loader = OnlineLoader(graph, store, split.train, fanouts, a.batch_size, a.seed, prefetch=2)

    def evict() -> None:
        if store is not None and getattr(store, "_mm", None) is not None:
            store._mm.madvise(mmap.MADV_DONTNEED)  # mapped pages stay cached until unmapped from this process
        for f in files:
            drop_page_cache(f)

    torch.manual_seed(a.seed)
    model = build_model("sage", ds.meta["feat_dim"], a.hidden, ds.meta["num_classes"], len(fanouts), dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)

    def step(mb, x, update: bool) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, mb.blocks), labels[mb.seeds]).backward()
        if update:
            opt.step()

    say("ready", rss=rss_anon(), cache_bytes=int(cache_bytes))
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
        io0, t0, compute, done = io_read_bytes(), time.perf_counter(), 0.0, 0
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
                       "disk_bytes": (io_read_bytes() - io0) * scale, "counted_bytes": s["bytes_read"] * scale,
                       "needed_bytes": s["bytes_needed"] * scale, "hit_rate": s.get("host_hit_rate"),
                       "batches": done, "of": total})
        log(f"  {a.system} epoch {e}: {wall * scale:.2f} s" + (f" (extrapolated from {done} of {total} batches "
                                                                 f"in {wall:.1f} s)" if done < total else ""))
    say("trained")
    wait_go()  # moved out of the group: score without the budget
    model.eval()
    val = split.val if len(split.val) <= a.eval_nodes else \
        np.sort(np.random.default_rng(1).choice(split.val, a.eval_nodes, replace=False))
    reader, correct = DiskStore(ds.features, mode="pread", verify=False), 0
    with torch.no_grad():
        for mb in NeighborSampler(ds.load_graph(), fanouts).batches(val, a.batch_size, 0, 0, shuffle=False):
            out = model(torch.from_numpy(reader.read(mb.n_id)), mb.blocks)
            correct += int((out.argmax(-1) == labels[mb.seeds]).sum())
    loader.close()
    say("result", epochs=epochs, acc=correct / len(val))


class PresampledInMemory:
    """Plait's offline-sampled batches (same order) with every feature row in RAM: the in-memory limit for the
    same work, an EpochLoader reading ``features[n_id]`` two batches ahead on a thread."""

    def __init__(self, packed, features: np.ndarray, prefetch: int = 2):
        self.packed, self.features, self.prefetch = packed, features, prefetch
        self.reset_stats()

    def reset_stats(self) -> None:
        self.t = {"sample_s": 0.0, "read_s": 0.0, "wait_s": 0.0, "batches": 0, "bytes_read": 0, "bytes_needed": 0}

    def num_batches(self) -> int:
        return self.packed.num_batches()

    def epoch(self, epoch: int):
        import queue

        import torch

        q: queue.Queue = queue.Queue(maxsize=self.prefetch)

        def produce() -> None:
            for b in self.packed._order(epoch):
                mb = self.packed.batch(b)
                t0 = time.perf_counter()
                x = torch.from_numpy(self.features[mb.n_id])
                self.t["read_s"] += time.perf_counter() - t0
                q.put((mb, x))
            q.put(None)

        threading.Thread(target=produce, daemon=True).start()
        while True:
            t0 = time.perf_counter()
            item = q.get()
            self.t["wait_s"] += time.perf_counter() - t0
            if item is None:
                return
            self.t["batches"] += 1
            yield item

    def stats(self) -> dict:
        return dict(self.t)

    def close(self) -> None:
        self.packed.close()


# ---- the driver --------------------------------------------------------------------------------------------
class MemGroup:
    """A cgroup v1 memory group for one process: made, limited, filled, emptied and removed."""

    def __init__(self, name: str):
        self.path = CG_ROOT / name
        self.path.mkdir()
        self.home = None

    def write(self, key: str, value) -> None:
        (self.path / key).write_text(str(value))

    def stat(self, key: str) -> int:
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, v = line.split()
            if k == key:
                return int(v)
        return 0

    def enter(self, pid: int) -> None:
        self.home = next(line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
                         if line.split(":")[1] == "memory")
        self.write("cgroup.procs", pid)

    def leave(self, pid: int) -> None:
        (CG_ROOT / self.home.lstrip("/") / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        remove_group(self.path)


def remove_group(path: Path) -> None:
    for _ in range(50):  # the last task may take a moment to leave
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.1)


def remove_stale_groups() -> None:
    """Groups left by a run of this script that was killed (their driver pid is gone)."""
    for g in CG_ROOT.glob("plait-ooc-*-*") if CG_ROOT.is_dir() else []:
        pid = g.name.rsplit("-", 1)[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            for task in (g / "cgroup.procs").read_text().split():
                os.kill(int(task), signal.SIGKILL)
            remove_group(g)


def can_make_groups() -> bool:
    try:
        MemGroup(f"plait-ooc-probe-{os.getpid()}").remove()
        return True
    except OSError:
        return False


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
            group = MemGroup(f"plait-ooc-{system}-{os.getpid()}")
            group.enter(proc.pid)
        stop, samples = threading.Event(), []

        def sample_anon() -> None:  # working memory: what the group holds beyond the page cache
            while not stop.is_set():
                samples.append(int((group.path / "memory.usage_in_bytes").read_text()) - group.stat("cache"))
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
        t0, deadline = time.perf_counter(), a.epochs * a.time_cap * 1.5 + 10
        if expect("trained", timeout=deadline) is None:  # stuck inside a batch (mmap thrashing): a lower bound
            disk = io_bytes_of(proc.pid)
            proc.kill()
            proc.wait()
            wall = (time.perf_counter() - t0) / a.epochs
            log(f"  {system}: no epoch finished in {deadline:.0f} s (killed); its epoch time is > {wall:.0f} s")
            result = {"acc": float("nan"), "epochs": [{"epoch_s": wall, "compute_s": 0.0, "sample_s": 0.0,
                      "read_s": 0.0, "wait_s": 0.0, "disk_bytes": disk / a.epochs, "counted_bytes": 0,
                      "needed_bytes": 0, "hit_rate": None, "batches": 0, "of": 0}], "lower_bound": True}
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


def ensure_dataset(a) -> dict:
    from plait.gnn.generate import generate_dataset, is_dataset_folder, open_dataset

    want = {"num_nodes": a.nodes, "seed": a.seed, "feat_dim": 128}
    if is_dataset_folder(Path(a.data)) and all(open_dataset(a.data).meta.get(k) == v for k, v in want.items()) \
            and open_dataset(a.data).meta["splits"]["train"] == round(a.train_frac * a.nodes):
        return open_dataset(a.data).meta
    t0 = time.perf_counter()
    ds = generate_dataset(a.data, num_nodes=a.nodes, train_frac=a.train_frac, seed=a.seed)
    log(f"generated {a.nodes:,} nodes / {ds.meta['num_edges']:,} edges in {time.perf_counter() - t0:.1f} s")
    return ds.meta


def ensure_packs(a, budget: float) -> dict:
    from plait.gnn.generate import load_split, open_dataset
    from plait.gnn.offline import is_pack_folder, load_pack_info, pack_info_dict, prepare_packed

    ds = open_dataset(a.data)
    out = Path(a.data + ".packs") / f"b{round(budget * 1000):04d}"
    fanouts = [int(f) for f in a.fanouts.split(",")]
    recipe = {"fanouts": fanouts, "batch_size": a.batch_size, "seed": a.seed,
              "cache_rows": int(budget * ds.meta["num_nodes"]), "num_nodes": ds.meta["num_nodes"]}
    if is_pack_folder(out):
        meta = json.loads((out / "meta.json").read_text())
        if all(meta.get(k) == v for k, v in recipe.items()):
            return pack_info_dict(load_pack_info(out))
    info = prepare_packed(ds.load_graph(), ds.features, load_split(ds.root).train, fanouts, a.batch_size, a.seed,
                          recipe["cache_rows"], out)
    return pack_info_dict(info)


def mean(epochs: list[dict], key: str) -> float:
    return float(np.mean([e[key] for e in epochs]))


def report(r: dict) -> str:
    ep = r["epochs"]
    needed = sum(e["needed_bytes"] for e in ep)
    amp = f"{sum(e['disk_bytes'] for e in ep) / needed:6.2f}" if needed else "     -"
    hit = ep[-1]["hit_rate"]
    return (f"{r['system']:<17} {mean(ep, 'epoch_s'):8.2f} {mean(ep, 'sample_s'):7.2f} {mean(ep, 'read_s'):7.2f} "
            f"{mean(ep, 'compute_s'):8.2f} {mean(ep, 'wait_s'):7.2f} {mean(ep, 'disk_bytes') / 2**20:9.1f} "
            f"{amp} {'    -' if hit is None else f'{hit:5.2f}'} {100 * r['acc']:6.2f} "
            f"{r['limit_bytes'] / 2**20:8.0f}" + ("  (> this: no batch finished; killed)" if r.get("lower_bound") else
                                                  f"  (extrapolated: {ep[-1]['batches']} of {ep[-1]['of']} batches)"
                                                  if ep[-1]["batches"] < ep[-1]["of"] else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--data", default="")
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
    p.add_argument("--eval-nodes", type=int, default=4096)
    p.add_argument("--time-cap", type=float, default=-1, help="seconds per epoch before it is extrapolated")
    p.add_argument("--ginex-policy", default="sieve", choices=["sieve", "lru"])
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=0.1, help=argparse.SUPPRESS)
    p.add_argument("--pack", default="", help=argparse.SUPPRESS)
    p.add_argument("--drop-every-batch", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.system = a.worker
        return worker(a)
    a.nodes = a.nodes or (300_000 if a.quick else 2_000_000)
    a.train_frac = a.train_frac or (0.03 if a.quick else 0.02)
    a.epochs = a.epochs or (1 if a.quick else 2)
    a.time_cap = (20.0 if a.quick else 120.0) if a.time_cap < 0 else a.time_cap
    a.warmup = min(a.warmup, 2) if a.quick else a.warmup
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks remove the memory groups
    remove_stale_groups()
    a.data = a.data or f"/tmp/plait-bench/ooc-gnn-{a.nodes}"
    budgets = [float(b) for b in (a.budgets or ("0.1" if a.quick else "0.05,0.1,0.2")).split(",")]
    systems = a.systems.split(",")
    meta = ensure_dataset(a)
    feature_bytes = meta["num_nodes"] * meta["feat_dim"] * 4
    use_cgroup = can_make_groups()
    print(f"graph: {meta['num_nodes']:,} nodes, {meta['num_edges']:,} edges, {feature_bytes / 2**20:.0f} MiB of "
          f"features, {meta['splits']['train']:,} train nodes; fanout {a.fanouts}, batch {a.batch_size}, "
          f"{a.epochs} cold epochs per system", flush=True)
    print("memory bound: " + ("cgroup v1 memory group per system (limit = working memory + budget - own cache)"
                              if use_cgroup else "no cgroup could be made: page cache dropped after every batch"),
          flush=True)
    results: dict[tuple[str, float], dict] = {}
    packs: dict[float, dict] = {}
    key = 0.1 if 0.1 in budgets else budgets[0]
    if "memory" in systems:
        results["memory", 0.0] = run_system(a, "memory", 0.0, feature_bytes, None, use_cgroup)
    header = (f"{'system':<17} {'epoch_s':>8} {'sample':>7} {'read':>7} {'compute':>8} {'wait':>7} {'disk_MiB':>9} "
              f"{'ampl':>6} {'hit':>5} {'acc%':>6} {'limit_MiB':>8}")
    for budget in budgets:
        need_pack = "plait" in systems or ("memory-presampled" in systems and budget == key)
        pack = packs[budget] = ensure_packs(a, budget) if need_pack else None
        if pack:
            print(f"\n[{budget:.0%} cache] packing: {pack['preprocess_s']:.1f} s, packs "
                  f"{pack['pack_bytes'] / 2**20:.0f} MiB = {pack['blowup']:.2f}x the features, host cache "
                  f"{pack['cache_bytes'] / 2**20:.0f} MiB "
                  f"serving {pack['cache_hit_rate']:.0%} of the rows", flush=True)
        for system in [s for s in systems if s not in UNBOUNDED or (s == "memory-presampled" and budget == key)]:
            at = 0.0 if system in UNBOUNDED else budget
            try:
                results[system, at] = run_system(a, system, at, feature_bytes, str(pack["path"]) if pack else None,
                                                 use_cgroup)
            except MemoryError as e:
                print(f"  {e}: no figures for it", flush=True)
        print(f"\n[{budget:.0%} cache budget = {budget * feature_bytes / 2**20:.0f} MiB]\n{header}", flush=True)
        for system in systems:
            r = results.get((system, 0.0 if system in UNBOUNDED else budget))
            if r:
                print(report(r), flush=True)

    def epoch(system: str) -> float:
        r = results.get((system, 0.0 if system in UNBOUNDED else key))
        return mean(r["epochs"], "epoch_s") if r else float("nan")

    plait, pack = results.get(("plait", key)), packs.get(key)
    amp = (sum(e["disk_bytes"] for e in plait["epochs"]) / max(sum(e["needed_bytes"] for e in plait["epochs"]), 1)
           if plait else float("nan"))
    gap = 100 * (plait["acc"] - results["memory", 0.0]["acc"]) if plait and ("memory", 0.0) in results else float("nan")
    print(f"RESULT speedup_vs_mmap={epoch('mmap') / epoch('plait'):.2f} "
          f"speedup_vs_ginex={epoch('ginex') / epoch('plait'):.2f} vs_memory={epoch('plait') / epoch('memory'):.2f} "
          f"amplification={amp:.3f} acc_gap={gap:+.2f} "
          f"speedup_vs_mmap_random={epoch('mmap-random') / epoch('plait'):.2f} "
          f"vs_memory_same_batches={epoch('plait') / epoch('memory-presampled'):.2f} budget={key} "
          f"blowup={pack['blowup'] if pack else float('nan'):.2f} "
          f"mmap_is_lower_bound={int(bool(results.get(('mmap', key), {}).get('lower_bound')))}", flush=True)


if __name__ == "__main__":
    main()
