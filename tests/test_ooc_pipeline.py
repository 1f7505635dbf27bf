"""The out-of-core GNN pipeline: offline sampling and packing (gnn/offline.py) and the epoch loaders
(gnn/online_loader.py, gnn/packed_loader.py)."""

import threading

import numpy as np
import pytest
import torch
from gnn_fixtures import accuracy, mlp_test_accuracy, sage_model
from plait.gnn.generate import generate_dataset, load_features, load_labels, load_split
from plait.gnn.offline import NotAPackError, prepare_packed
from plait.gnn.online_loader import OnlineLoader
from plait.gnn.packed_loader import PackedLoader
from plait.gnn.sampler import NeighborSampler, batch_rng, batch_seeds
from plait.storage.disk_reader import DiskStore, drop_page_cache
from plait.storage.feature_file import FeatureFileError
from plait.storage.store import ArrayStore

FANOUTS, BATCH, SEED = [5, 5], 64, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ds = generate_dataset(tmp_path_factory.mktemp("ooc") / "g", num_nodes=8000, train_frac=0.1, seed=2)
    return ds, ds.load_graph(), load_split(ds.root), np.array(load_features(ds.root))


def pack(data, folder, cache_rows=1500, **kw):
    ds, graph, split, _ = data
    return prepare_packed(graph, ds.features, split.train, FANOUTS, BATCH, SEED, cache_rows, folder, **kw)


def proc_read_bytes():
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration):
        return None


def live_loader_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith(("plait-packed", "plait-online"))]


@pytest.mark.parametrize("cache_rows", [0, 1500])
def test_both_loaders_give_the_feature_rows_of_each_batch_byte_for_byte(data, tmp_path, cache_rows):
    ds, graph, split, feats = data
    info = pack(data, tmp_path / "p", cache_rows, memory_bytes=200_000)  # several packing groups
    assert info.cached_rows == cache_rows and info.num_batches == -(-len(split.train) // BATCH)
    sampler = NeighborSampler(graph, FANOUTS)
    offline_seeds = batch_seeds(split.train, BATCH, SEED, 0)
    with PackedLoader(tmp_path / "p") as packed:
        order = packed.epoch_order(0)
        for b, (mb, x) in zip(order, packed.epoch(0), strict=True):
            again = sampler.sample(offline_seeds[b], batch_rng(SEED, 0, int(b)))  # the batch sampled offline
            assert np.array_equal(mb.n_id, again.n_id) and np.array_equal(mb.seeds, again.seeds)
            assert all(torch.equal(p.edge_index, q.edge_index) and p.size == q.size
                       for p, q in zip(mb.blocks, again.blocks, strict=True))
            assert x.dtype == torch.float32 and x.numpy().tobytes() == feats[mb.n_id].tobytes()
        hit_rate = packed.stats()["host_hit_rate"]
    assert (hit_rate > 0.3) if cache_rows else hit_rate == 0
    with OnlineLoader(graph, DiskStore(ds.features, mode="direct"), split.train, FANOUTS, BATCH, SEED) as online:
        got = [(mb, x) for mb, x in online.epoch(1)]
    assert len(got) == info.num_batches
    assert all(x.numpy().tobytes() == feats[mb.n_id].tobytes() for mb, x in got)


def test_the_packed_path_reads_at_most_1_2x_the_bytes_needed_as_the_kernel_counts(data, tmp_path):
    if proc_read_bytes() is None:
        pytest.skip("/proc/self/io is absent: the kernel's per-process read count cannot be checked here")
    info = pack(data, tmp_path / "p", cache_rows=1000)
    cached = np.load(tmp_path / "p" / "cache_ids.npy")
    with PackedLoader(tmp_path / "p", prefetch=2) as loader:
        for _ in loader.epoch(0):  # warm up the code paths (imports, allocations) before measuring
            pass
        loader.reset_stats()
        drop_page_cache(tmp_path / "p" / "packs.feat")
        before = proc_read_bytes()
        needed = sum(np.count_nonzero(~np.isin(mb.n_id, cached)) for mb, _ in loader.epoch(1)) * info.row_bytes
        kernel = proc_read_bytes() - before
        stats = loader.stats()
    if kernel == 0:
        pytest.skip(f"read_bytes stayed 0: {tmp_path} is on a filesystem without block I/O accounting (tmpfs?)")
    assert stats["bytes_needed"] == needed > 0
    assert stats["bytes_read"] <= 1.2 * needed, (stats["bytes_read"], needed)
    assert abs(kernel - stats["bytes_read"]) <= 0.05 * stats["bytes_read"] + 4 * 4096, (kernel, stats["bytes_read"])


def test_batches_are_reused_across_epochs_in_a_new_order(data, tmp_path):
    pack(data, tmp_path / "p")
    with PackedLoader(tmp_path / "p") as loader:
        epochs = [[tuple(mb.seeds.tolist()) for mb, _ in loader.epoch(e)] for e in range(3)]
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]  # a new order each epoch
    assert set(epochs[0]) == set(epochs[1]) == set(epochs[2])  # the same batches
    seeds = np.concatenate([np.array(s) for s in epochs[0]])
    assert np.array_equal(np.sort(seeds), np.sort(data[2].train))  # one epoch covers every train node once


def test_packs_of_several_epochs_give_online_samplings_batches_then_repeat_the_cycle(data, tmp_path):
    ds, graph, split, feats = data
    info = pack(data, tmp_path / "p", epochs=3)
    assert info.pack_epochs == 3 and info.total_batches == 3 * info.num_batches
    online = OnlineLoader(graph, ArrayStore(feats), split.train, FANOUTS, BATCH, SEED, prefetch=0)
    with PackedLoader(tmp_path / "p") as loader, online:
        def batches(source, e):
            return {tuple(mb.seeds.tolist()): mb.n_id.tobytes() for mb, _ in source.epoch(e)}

        packed = [batches(loader, e) for e in range(6)]
        orders = [[tuple(mb.seeds.tolist()) for mb, _ in loader.epoch(e)] for e in (0, 3)]
        for e in range(3):  # sampled epoch e: online sampling's epoch e, the same seeds and neighbourhoods
            assert packed[e] == batches(online, e)
    assert len({frozenset(p.items()) for p in packed[:3]}) == 3  # three different epochs of samples
    assert packed[3:] == packed[:3]  # then the cycle repeats (epoch e replays sampled epoch e % 3) ...
    assert orders[0] != orders[1] and set(orders[0]) == set(orders[1])  # ... in a new order


def test_the_host_cache_holds_the_rows_most_asked_over_all_sampled_epochs(data, tmp_path):
    info = pack(data, tmp_path / "p", cache_rows=500, epochs=3)
    counts = np.zeros(info.num_nodes, dtype=np.int64)
    with PackedLoader(tmp_path / "p") as loader:
        for b in range(info.total_batches):
            counts[loader.batch(b).n_id] += 1
    cached = np.zeros(info.num_nodes, dtype=bool)
    cached[np.load(tmp_path / "p" / "cache_ids.npy")] = True
    assert cached.sum() == 500 and counts[cached].min() >= counts[~cached].max()


def test_the_accounting_of_an_epoch_equals_a_hand_count(data, tmp_path):
    ds, graph, split, feats = data
    info = pack(data, tmp_path / "p", cache_rows=700, epochs=2)
    idx = {k: np.load(tmp_path / "p" / f"{k}.npy") for k in ("cache_ids", "pack_page", "pack_rows")}
    cached = np.zeros(info.num_nodes, dtype=bool)
    cached[idx["cache_ids"]] = True
    with PackedLoader(tmp_path / "p", prefetch=0) as loader:
        for e in (0, 1, 2):
            loader.reset_stats()
            order = loader.epoch_order(e)
            asked = np.concatenate([mb.n_id for mb, _ in loader.epoch(e)])
            s = loader.stats()
            distinct = np.unique(asked)
            assert s["distinct_rows"] == len(distinct) == info.distinct_rows[e % 2]
            outside = np.count_nonzero(~cached[distinct])
            assert s["distinct_bytes_needed"] == outside * info.row_bytes and outside == info.distinct_pack_rows[e % 2]
            assert s["bytes_needed"] == np.count_nonzero(~cached[asked]) * info.row_bytes == \
                idx["pack_rows"][order].sum() * info.row_bytes
            assert s["bytes_read"] == (idx["pack_page"][order + 1] - idx["pack_page"][order]).sum() * 4096
    with OnlineLoader(graph, ArrayStore(feats), split.train, FANOUTS, BATCH, SEED, prefetch=2) as online:
        asked = np.concatenate([mb.n_id for mb, _ in online.epoch(0)])
        s = online.stats()
    assert s["distinct_rows"] == len(np.unique(asked)) and s["distinct_bytes_needed"] == s["distinct_rows"] * 4 * 128


def test_ranks_of_a_two_way_split_get_disjoint_batches_of_equal_count(data, tmp_path):
    ds, graph, split, _ = data
    info = pack(data, tmp_path / "p", world_size=2)
    assert info.num_batches % 2 == 1 and info.batches_per_rank == info.num_batches // 2  # the tail is dropped
    for make in [lambda r: PackedLoader(tmp_path / "p", rank=r, world_size=2),
                 lambda r: OnlineLoader(graph, ArrayStore(data[3]), split.train, FANOUTS, BATCH, SEED, r, 2)]:
        seen = []
        for rank in (0, 1):
            with make(rank) as loader:
                batches = [mb.seeds for mb, _ in loader.epoch(4)]
                assert len(batches) == loader.num_batches() == info.batches_per_rank
                seen.append(np.concatenate(batches))
        assert not np.intersect1d(seen[0], seen[1]).size


def test_a_truncated_or_corrupted_pack_file_fails_naming_the_file(data, tmp_path):
    pack(data, tmp_path / "p")
    packs = tmp_path / "p" / "packs.feat"
    raw = bytearray(packs.read_bytes())
    raw[4096 + 100] ^= 0xFF  # a bit flipped in the first pack
    packs.write_bytes(bytes(raw))
    with PackedLoader(tmp_path / "p") as loader, pytest.raises(FeatureFileError, match="packs.feat"):
        for _ in loader.epoch(0):
            pass
    assert not live_loader_threads()
    packs.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(FeatureFileError, match=r"packs\.feat.*truncated"):
        PackedLoader(tmp_path / "p")


def test_a_folder_that_is_not_a_pack_is_refused_and_left_alone(data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(NotAPackError, match="never replaced"):
        pack(data, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    with pytest.raises(NotAPackError, match="not a pack folder"):
        PackedLoader(mine)
    first = pack(data, tmp_path / "p", cache_rows=100)
    again = pack(data, tmp_path / "p", cache_rows=200)  # a pack folder is replaced whole
    assert (first.cached_rows, again.cached_rows) == (100, 200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "p"]  # no lock, temp or old folder left


def test_a_pack_made_from_the_same_inputs_is_reused_when_asked(data, tmp_path):
    first = pack(data, tmp_path / "p", cache_rows=100)
    stamp = (tmp_path / "p" / "packs.feat").stat().st_ino
    assert pack(data, tmp_path / "p", cache_rows=100, reuse=True) == first
    assert (tmp_path / "p" / "packs.feat").stat().st_ino == stamp  # not rebuilt
    assert pack(data, tmp_path / "p", cache_rows=300, reuse=True).cached_rows == 300  # other inputs: rebuilt


def test_leaving_an_epoch_early_or_closing_stops_the_thread(data, tmp_path):
    ds, graph, split, feats = data
    pack(data, tmp_path / "p")
    loader = PackedLoader(tmp_path / "p", prefetch=3)
    it = loader.epoch(0)
    next(it)
    assert live_loader_threads()
    del it  # the consumer stops after one batch
    assert not live_loader_threads()
    with OnlineLoader(graph, ArrayStore(feats), split.train, FANOUTS, BATCH, SEED) as online:
        for _ in online.epoch(0):
            break
        second = online.epoch(1)
        next(second)
    assert not live_loader_threads()  # close() stopped the epoch still running
    first, second = loader.epoch(1), loader.epoch(2)
    next(first)
    next(second)  # a new epoch stops the one still running
    with pytest.raises(RuntimeError, match="stopped"):
        list(first)
    assert len(list(second)) == loader.num_batches() - 1 and not live_loader_threads()
    loader.close()
    with pytest.raises(RuntimeError, match="closed"):
        loader.epoch(3)


def _train_sage(loader, y, epochs):
    torch.manual_seed(0)
    convs, forward = sage_model()
    opt = torch.optim.Adam(convs.parameters(), lr=0.01, weight_decay=5e-4)
    for epoch in range(epochs):
        for mb, x in loader.epoch(epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(forward(mb, x), y[torch.from_numpy(mb.seeds)]).backward()
            opt.step()
    return forward


@pytest.mark.slow  # ~30 s on 2 busy cores
def test_offline_packed_training_matches_online_sampling_and_beats_an_mlp(tmp_path):
    ds = generate_dataset(tmp_path / "g", num_nodes=6000, train_frac=0.05, test_frac=0.25, seed=1)
    graph, split = ds.load_graph(), load_split(ds.root)
    feats, y = np.array(load_features(ds.root)), torch.from_numpy(load_labels(ds.root))
    x_all = torch.from_numpy(feats)
    mlp_acc = mlp_test_accuracy(x_all, y, split)

    prepare_packed(graph, ds.features, split.train, [10, 10], 50, 0, 1000, tmp_path / "p")
    test_mb = NeighborSampler(graph, [10, 10]).sample(split.test, batch_rng(0, 99, 0))
    accs = []
    for loader in [PackedLoader(tmp_path / "p"),
                   OnlineLoader(graph, DiskStore(ds.features), split.train, [10, 10], 50, 0)]:
        with loader, torch.no_grad():
            with torch.enable_grad():
                forward = _train_sage(loader, y, epochs=15)
            accs.append(accuracy(forward(test_mb, x_all[torch.from_numpy(test_mb.n_id)]),
                                 y[torch.from_numpy(test_mb.seeds)]))
    packed_acc, online_acc = accs
    assert abs(packed_acc - online_acc) <= 0.02, (packed_acc, online_acc)
    assert min(packed_acc, online_acc) > mlp_acc + 0.2, (mlp_acc, packed_acc, online_acc)
