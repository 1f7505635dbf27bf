"""Link prediction (train.task = "link"): the edge split, link batches without their own edges, MRR / Hits@K,
link batches packed offline and replayed, and a 2-rank DDP job on a planted graph that learns."""

import json

import numpy as np
import pytest
import torch
from plait.gnn.generate import generate_dataset
from plait.gnn.link_batches import LinkLoader, LinkPlan
from plait.gnn.link_split import LinkConfig, ensure_link_split
from plait.gnn.link_task import LinkModel, random_mrr, rank_metrics
from plait.gnn.models import build_model
from plait.gnn.offline import CorruptPackError, prepare_packed
from plait.gnn.packed_loader import PackedLoader
from plait.gnn.sampler import NeighborSampler
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec
from plait.storage.disk_reader import DiskStore
from test_gnn_job import EXAMPLE


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("link") / "g", num_nodes=2000, train_frac=0.1)


@pytest.fixture(scope="module")
def split(ds, tmp_path_factory):
    return ensure_link_split(ds, LinkConfig(val_frac=0.05, test_frac=0.1), tmp_path_factory.mktemp("split"))


def keys(src, dst, n) -> set:
    return set((np.asarray(src, dtype=np.int64) * n + np.asarray(dst, dtype=np.int64)).tolist())


def block_edges(mb) -> set:
    """Every sampled edge of a batch as global keys src * N + dst (N from the caller)."""
    out = []
    for b in mb.blocks:
        s, d = b.edge_index.numpy()
        out.append((mb.n_id[s], mb.n_id[d]))
    return out


def sampled_keys(mb, n) -> set:
    return set().union(*(keys(s, d, n) for s, d in block_edges(mb)))


def test_split_holds_out_exactly_the_asked_edges_both_ways_and_is_reused(ds, split, tmp_path):
    g, n = ds.load_graph(), ds.meta["num_nodes"]
    src, dst = np.asarray(g.indices, np.int64), np.repeat(np.arange(n), np.diff(g.indptr))
    undirected = {(min(a, b), max(a, b)) for a, b in zip(src.tolist(), dst.tolist(), strict=True) if a != b}
    held = np.concatenate([split.val, split.test], axis=1)
    assert split.val.shape[1] == round(0.05 * len(undirected)) and split.test.shape[1] == round(0.1 * len(undirected))
    assert (held[0] < held[1]).all() and len(keys(*held, n)) == held.shape[1]  # distinct, one direction each
    assert split.train_pos.shape[1] + held.shape[1] == len(undirected)
    tg = split.graph()
    left = keys(tg.indices, np.repeat(np.arange(n), np.diff(tg.indptr)), n)
    assert not left & (keys(*held, n) | keys(held[1], held[0], n))  # both directions removed
    assert tg.num_edges == g.num_edges - 2 * held.shape[1]  # the generator's graph: each edge stored both ways
    # and no held-out edge is ever sampled: every node's whole 2-hop neighbourhood
    mb = NeighborSampler(tg, [-1, -1]).sample(np.arange(n), np.random.default_rng(0))
    assert not sampled_keys(mb, n) & (keys(*held, n) | keys(held[1], held[0], n))
    inode = split.root.stat().st_ino
    again = ensure_link_split(ds, LinkConfig(val_frac=0.05, test_frac=0.1), split.root.parent)
    assert again.root == split.root and again.root.stat().st_ino == inode  # same recipe: reused, not rewritten


def test_a_directed_graph_split_as_undirected_is_refused_before_anything_is_written(tmp_path):
    from types import SimpleNamespace

    from plait.gnn.graph_build import graph_from_edges
    from plait.gnn.link_split import split_edges

    g = graph_from_edges(np.array([0, 1, 2, 3]), np.array([1, 2, 3, 0]), 4)  # a directed cycle
    ds = SimpleNamespace(meta={"num_nodes": 4}, load_graph=lambda: g)
    with pytest.raises(ValueError, match="4 of the graph's edges are stored one way only.*undirected=false"):
        ensure_link_split(ds, LinkConfig(), tmp_path / "splits")
    assert not (tmp_path / "splits").exists()
    train, pos, val, test = split_edges(g, LinkConfig(undirected=False, val_frac=0.25, test_frac=0.25))
    assert pos.shape[1] == 2 and val.shape[1] == test.shape[1] == 1 and train.num_edges == 2


def test_sampler_excludes_the_given_edges(ds):
    g, n = ds.load_graph(), ds.meta["num_nodes"]
    seeds = np.arange(0, 50)
    full = NeighborSampler(g, [-1]).sample(seeds, np.random.default_rng(0))
    (s, d), = block_edges(full)
    drop = np.stack([s[::3], d[::3]])
    cut = NeighborSampler(g, [-1]).sample(seeds, np.random.default_rng(0), exclude=drop)
    assert sampled_keys(cut, n) == keys(s, d, n) - keys(*drop, n)
    # a node reached only through excluded edges is not an input node
    reached = np.concatenate([x for x, _ in block_edges(cut)])
    assert set(cut.n_id.tolist()) == set(seeds.tolist()) | set(reached.tolist())


def test_a_link_batch_holds_its_pairs_and_never_its_own_positive_edges(split):
    n = split.graph().num_nodes
    plan = LinkPlan(split.graph(), split.train_pos, [5, 5], batch_size=64, seed=3, neg_per_pos=2)
    for i in range(3):
        mb = plan.sample(1, i)
        pos = mb.pairs[:, mb.label == 1]
        assert pos.shape[1] == 64 and (mb.label == 0).sum() == 128 and np.array_equal(mb.seeds, np.unique(mb.seeds))
        ps, pd = mb.seeds[pos[0]], mb.seeds[pos[1]]
        assert keys(ps, pd, n) <= keys(*split.train_pos, n)  # real train positives
        assert set(np.unique(mb.seeds[mb.pairs])) == set(mb.seeds.tolist())  # seeds: exactly the endpoints
        assert not sampled_keys(mb, n) & (keys(ps, pd, n) | keys(pd, ps, n))
    again = plan.sample(1, 2)  # any batch re-made on its own is the same
    assert np.array_equal(again.n_id, mb.n_id) and np.array_equal(again.pairs, mb.pairs)


def test_mrr_and_hits_on_a_hand_made_score_table():
    pos = np.array([0.9, 0.5, 0.1, 0.4])
    neg = np.array([[0.1, 0.2, 0.3],  # rank 1
                    [0.6, 0.7, 0.1],  # rank 3
                    [0.2, 0.3, 0.4],  # rank 4
                    [0.4, 0.4, 0.0]])  # ties: optimistic 1, pessimistic 3 -> rank 2
    got = rank_metrics(pos, neg, ks=[1, 3])
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4 + 1 / 2) / 4)
    assert got["hits@1"] == 0.25 and got["hits@3"] == 0.75
    assert random_mrr(1) == pytest.approx(0.75)


@pytest.mark.parametrize(("name", "decoder"), [("sage", "mlp"), ("gat", "dot")])
def test_link_model_takes_a_step_on_a_link_batch(ds, split, name, decoder):
    plan = LinkPlan(split.graph(), split.train_pos, [3, 3], batch_size=32, seed=0)
    mb = plan.sample(0, 0)
    x = torch.from_numpy(DiskStore(ds.features, mode="pread").read(mb.n_id))
    torch.manual_seed(0)
    model = LinkModel(build_model(name, 128, 16, 16, 2, heads=4), 16, decoder)
    logits = model(x, mb.blocks, torch.from_numpy(mb.pairs))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(mb.label))
    loss.backward()
    assert logits.shape == (64,) and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # every layer learns


def test_packed_and_online_link_batches_agree(ds, split, tmp_path):
    plan = LinkPlan(split.graph(), split.train_pos, [4, 4], batch_size=256, seed=5)
    info = prepare_packed(split.graph(), ds.features, None, [4, 4], 256, 5, cache_rows=200, out_dir=tmp_path / "p",
                          link=plan)
    assert info.num_batches == plan.num_batches
    online = LinkLoader(plan, DiskStore(ds.features, mode="pread"), prefetch=0)
    packed = PackedLoader(tmp_path / "p", prefetch=0)
    try:
        got = {int(i): (mb, x) for i, (mb, x) in zip(online._order(0), online.epoch(0), strict=True)}
        by_seeds = {mb.seeds.tobytes(): (mb, x) for mb, x in packed.epoch(0)}
        assert len(got) == len(by_seeds) == plan.num_batches
        for mb, x in got.values():
            pmb, px = by_seeds[mb.seeds.tobytes()]
            assert np.array_equal(pmb.n_id, mb.n_id) and np.array_equal(pmb.pairs, mb.pairs)
            assert np.array_equal(pmb.label, mb.label) and torch.equal(px, x)
            assert all(torch.equal(a.edge_index, b.edge_index) and a.size == b.size
                       for a, b in zip(pmb.blocks, mb.blocks, strict=True))
    finally:
        online.close()
        packed.close()
    pairs = np.load(tmp_path / "p" / "pairs.npy")
    pairs[1, 0] ^= 1
    np.save(tmp_path / "p" / "pairs.npy", pairs)
    with PackedLoader(tmp_path / "p", prefetch=0) as damaged, pytest.raises(CorruptPackError, match="pairs_crc"):
        damaged.batch(0)


@pytest.mark.slow
def test_two_rank_packed_link_job_learns(ray_cluster, tmp_path):
    common = [f"data.path={tmp_path / 'data'}", "data.num_nodes=3000", f"run_dir={tmp_path / 'run'}",
              "train.task=link", "train.batch_size=512", "train.hidden=64", "train.fanouts=[5, 5]",
              "train.link.eval_edges=600", "train.epochs=5", "train.lr=1e-2", "train.dropout=0.1"]
    out = run_job(load_spec(EXAMPLE, common))
    print("link job:", json.dumps({k: out[k] for k in ("val", "test", "random_mrr", "epoch_s")}))
    assert out["task"] == "link" and len(out["val"]) == 5 and len(set(out["param_digests"])) == 1
    assert out["test"]["mrr"] > 3 * out["random_mrr"] and out["test"]["hits@10"] > 0.3
    assert out["bytes_read"] > 0  # rows outside the host cache came from the packs
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val_mrr", "val_hits@10", "val_hits@50"} <= next(r for r in records if "val_mrr" in r).keys()
    packs = [p for p in (tmp_path / "data.packs").iterdir() if p.is_dir()]
    assert len(packs) == 1 and json.loads((packs[0] / "meta.json").read_text())["link"]["task"] == "link"
    assert (tmp_path / "data.link").is_dir()


@pytest.mark.slow
def test_link_job_on_the_online_loader_checkpoints_and_resumes(ray_cluster, tmp_path):
    common = [f"data.path={tmp_path / 'data'}", "data.num_nodes=2000", f"run_dir={tmp_path / 'run'}",
              "train.task=link", "train.loader=online-mmap", "train.batch_size=1024", "train.hidden=32",
              "train.fanouts=[3, 3]", "train.link.eval_edges=200", "train.link.decoder=mlp"]
    first = run_job(load_spec(EXAMPLE, ["train.epochs=1", *common]))
    assert first["start_epoch"] == 0 and len(first["val"]) == 1 and first["bytes_read"] > 0
    resumed = run_job(load_spec(EXAMPLE, ["train.epochs=2", "train.resume=latest", *common]))
    assert resumed["start_epoch"] == 1 and len(resumed["val"]) == 1 and len(set(resumed["param_digests"])) == 1
    assert not (tmp_path / "data.packs").exists()  # online sampling: no packs
