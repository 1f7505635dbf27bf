"""Fresh neighbourhoods from packs: test accuracy after E epochs with packs of one sampled epoch, of every epoch, and
online sampling, on the same generated graph and seeds, and the packs' size on disk against the feature file.

    python bench/gnn_fresh_samples.py                 # 20k nodes, 6 epochs, seeds 0,1,2: a few minutes on 2 cores
    python bench/gnn_fresh_samples.py --quick         # 5k nodes, 4 epochs, one seed

Each setting trains the job's GraphSAGE (gnn/models.py; Adam, the example's hidden size and fanouts) in this process
from the same initial weights, one rank: "packed E=1" replays one pre-sampled epoch every epoch (only the order
changes), "packed E=<epochs>" holds a sampled epoch for every training epoch (gnn/offline.py pack_epochs; its epoch e
is online sampling's epoch e, in another order), "online" samples every epoch afresh (OnlineLoader over the rows in
RAM). Test accuracy: every test node, sampled with the training fanouts. Packs: the pack folder's bytes on disk
(packs, cache and index) over features.bin's. Last line: ``RESULT acc_e1=... acc_eall=... acc_online=...
packs_e1=...x packs_eall=...x``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from plait.gnn.dataset import load_labels, load_split, open_dataset, read_features
from plait.gnn.generate import generate_dataset, generated_recipe, generation_recipe
from plait.gnn.models import build_model
from plait.gnn.offline import prepare_packed
from plait.gnn.online_loader import OnlineLoader
from plait.gnn.packed_loader import PackedLoader
from plait.gnn.sampler import NeighborSampler
from plait.storage.store import ArrayStore


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def train(ds, loader, x_all: torch.Tensor, a, seed: int) -> float:
    labels, split = torch.from_numpy(load_labels(ds.root)), load_split(ds.root)
    torch.manual_seed(seed)
    model = build_model("sage", ds.meta["feat_dim"], a.hidden, ds.meta["num_classes"], len(a.fanouts), dropout=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    for epoch in range(a.epochs):
        for mb, x in loader.epoch(epoch):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x, mb.blocks), labels[mb.seeds]).backward()
            opt.step()
    loader.close()
    model.eval()
    correct = 0
    with torch.no_grad():
        for mb in NeighborSampler(ds.load_graph(), a.fanouts).batches(split.test, 1024, seed, 10**6, shuffle=False):
            correct += int((model(x_all[mb.n_id], mb.blocks).argmax(-1) == labels[mb.seeds]).sum())
    return correct / len(split.test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--nodes", type=int, default=0)
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--seeds", default="")
    p.add_argument("--train-frac", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--fanouts", default="10,10")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--cache-frac", type=float, default=0.1)
    p.add_argument("--data", default="")
    a = p.parse_args()
    a.nodes = a.nodes or (5_000 if a.quick else 20_000)
    a.epochs = a.epochs or (4 if a.quick else 6)
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    a.fanouts = [int(f) for f in a.fanouts.split(",")]
    data = Path(a.data or f"/tmp/plait-bench/fresh-{a.nodes}")
    recipe = dict(num_nodes=a.nodes, train_frac=a.train_frac, seed=0)
    if generated_recipe(data)[0] != generation_recipe(**recipe):
        generate_dataset(data, **recipe)
    ds = open_dataset(data)
    x_all = torch.from_numpy(read_features(ds.root))
    train_ids = load_split(ds.root).train
    feat = ds.features.stat().st_size
    print(f"graph: {a.nodes:,} nodes, {ds.meta['num_edges']:,} edges, {len(train_ids):,} train nodes, batch "
          f"{a.batch_size}, fanouts {a.fanouts}, {a.epochs} epochs, seeds {seeds}; features.bin {feat / 2**20:.1f} MiB")
    acc: dict[str, list[float]] = {}
    size: dict[str, float] = {}
    for seed in seeds:
        for name, pack_epochs in (("packed E=1", 1), (f"packed E={a.epochs}", a.epochs), ("online", 0)):
            t0 = time.perf_counter()
            if pack_epochs:
                out = data.with_name(f"{data.name}.packs") / f"s{seed}-e{pack_epochs}"
                info = prepare_packed(ds.load_graph(), ds.features, train_ids, a.fanouts, a.batch_size, seed,
                                      int(a.cache_frac * a.nodes), out, reuse=True, epochs=pack_epochs)
                size[name] = folder_bytes(info.path) / feat
                loader = PackedLoader(out, prefetch=0)
            else:
                loader = OnlineLoader(ds.load_graph(), ArrayStore(x_all.numpy()), train_ids, a.fanouts, a.batch_size,
                                      seed, prefetch=0)
            acc.setdefault(name, []).append(train(ds, loader, x_all, a, seed))
            print(f"  seed {seed} {name:<12} test acc {100 * acc[name][-1]:.2f}% ({time.perf_counter() - t0:.1f} s)",
                  flush=True)
    print(f"\n{'setting':<12} {'test acc % (mean; per seed)':<36} {'packs on disk / features.bin':>28}")
    for name, v in acc.items():
        per = ", ".join(f"{100 * x:.2f}" for x in v)
        print(f"{name:<12} {100 * np.mean(v):6.2f} ({per}){'':<{max(0, 27 - len(per))}} "
              f"{size[name] if name in size else float('nan'):27.2f}x")
    eall = f"packed E={a.epochs}"
    print(f"RESULT acc_e1={100 * np.mean(acc['packed E=1']):.2f} acc_eall={100 * np.mean(acc[eall]):.2f} "
          f"acc_online={100 * np.mean(acc['online']):.2f} packs_e1={size['packed E=1']:.2f}x "
          f"packs_eall={size[eall]:.2f}x epochs={a.epochs}")


if __name__ == "__main__":
    main()
