"""Graph on disk, neighbour sampler and dataset generator: what a GNN user relies on."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from gnn_fixtures import accuracy, mlp_test_accuracy, sage_model
from plait.gnn.generate import generate_dataset, load_features, load_labels, load_split
from plait.gnn.graph import CorruptGraphError, CSCGraph, NotAGraphError
from plait.gnn.graph_build import graph_from_edges, graph_from_parquet
from plait.gnn.sampler import NeighborSampler, batch_rng, batch_seeds
from plait.storage.feature_file import open_feature_file
from torch_geometric.nn import SAGEConv


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("gen") / "g20k", num_nodes=20_000, seed=0)


@pytest.fixture(scope="module")
def graph(dataset):
    return dataset.load_graph()


def random_edges(n=300, e=3000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, e), rng.integers(0, n, e)


def edge_keys(graph):
    """dst * N + src of every edge of the graph."""
    dst = np.repeat(np.arange(graph.num_nodes), graph.in_degree())
    return dst * graph.num_nodes + np.asarray(graph.indices)


def block_edges(mb, block):
    """A block's edges as global (src, dst) ids."""
    s, d = block.edge_index.numpy()
    return mb.n_id[s], mb.n_id[d]


@pytest.mark.parametrize("undirected,dedupe", [(False, False), (True, False), (True, True)])
def test_parquet_ingestion_builds_the_same_csc_as_in_memory(tmp_path, undirected, dedupe):
    src, dst = random_edges()
    pq.write_table(pa.table({"a": src.astype(np.int32), "b": dst}), tmp_path / "edges.parquet", row_group_size=700)
    disk = graph_from_parquet(tmp_path / "edges.parquet", out=tmp_path / "g", src="a", dst="b", num_nodes=310,
                              undirected=undirected, dedupe=dedupe, batch_rows=512)
    ram = graph_from_edges(src, dst, num_nodes=310, undirected=undirected, dedupe=dedupe)
    assert disk.num_nodes == 310 and disk.indptr.dtype == np.int64 and disk.indices.dtype == np.int32
    np.testing.assert_array_equal(disk.indptr, ram.indptr)
    np.testing.assert_array_equal(disk.indices, ram.indices)
    v = int(dst[0])  # node v's in-neighbours are the sources of the edges into v
    expected = np.r_[src[dst == v], dst[src == v]] if undirected else src[dst == v]
    expected = np.unique(expected) if dedupe else np.sort(expected)
    np.testing.assert_array_equal(disk.neighbors(v), expected)
    assert isinstance(CSCGraph.load(tmp_path / "g").indices, np.memmap)  # topology stays on disk


def test_an_edge_id_out_of_range_is_named_by_row_and_value(tmp_path):
    src, dst = np.arange(10), np.arange(10)
    dst[7] = 50
    pq.write_table(pa.table({"src": src, "dst": dst}), tmp_path / "edges.parquet")
    with pytest.raises(IndexError, match=r"edge row 7 has dst=50; node ids must be in \[0, 20\): fix the edge list"):
        graph_from_parquet(tmp_path / "edges.parquet", out=tmp_path / "g", num_nodes=20, batch_rows=3)
    assert not (tmp_path / "g").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["edges.parquet"]
    with pytest.raises(ValueError, match=r"needs an integer column 'from'"):
        graph_from_parquet(tmp_path / "edges.parquet", out=tmp_path / "g", src="from")


def test_without_num_nodes_the_largest_id_on_either_end_counts(tmp_path):
    pq.write_table(pa.table({"src": np.array([9, 1], np.uint32), "dst": np.array([0, 1], np.uint32)}),
                   tmp_path / "edges.parquet")
    graph = graph_from_parquet(tmp_path / "edges.parquet", out=tmp_path / "g")
    assert graph.num_nodes == 10 and graph.neighbors(0).tolist() == [9] and graph.in_degree([9]).tolist() == [0]


def test_graph_write_replaces_a_graph_atomically_and_never_a_foreign_folder(tmp_path):
    first = graph_from_edges(*random_edges(seed=1)).save(tmp_path / "g")
    second = graph_from_edges(*random_edges(seed=2)).save(tmp_path / "g")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]  # no lock, temp or old folder left
    np.testing.assert_array_equal(CSCGraph.load(tmp_path / "g").indices, second.indices)
    assert not np.array_equal(first.indptr, second.indptr)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own work")
    with pytest.raises(NotAGraphError, match=r"mine is not a graph folder written by Plait .*notes.txt.*never"):
        graph_from_edges(*random_edges()).save(mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_graph_folder_that_disagrees_with_its_meta_is_refused(tmp_path):
    graph_from_edges(*random_edges()).save(tmp_path / "g")
    meta = json.loads((tmp_path / "g" / "meta.json").read_text())
    (tmp_path / "g" / "meta.json").write_text(json.dumps({**meta, "num_edges": meta["num_edges"] + 1}))
    with pytest.raises(CorruptGraphError, match=r"indptr.npy.* does not describe .*delete .* build the graph again"):
        CSCGraph.load(tmp_path / "g")


def test_sampling_is_deterministic_under_a_seed_and_differs_across_seeds(graph):
    sampler = NeighborSampler(graph, [10, 10])
    seeds = np.arange(0, 20_000, 97)
    a, b = sampler.sample(seeds, batch_rng(7, 1, 3)), sampler.sample(seeds, batch_rng(7, 1, 3))
    c = sampler.sample(seeds, batch_rng(8, 1, 3))
    np.testing.assert_array_equal(a.n_id, b.n_id)
    assert all(torch.equal(x.edge_index, y.edge_index) for x, y in zip(a.blocks, b.blocks, strict=True))
    assert not np.array_equal(a.n_id, c.n_id) or not torch.equal(a.blocks[0].edge_index, c.blocks[0].edge_index)


def test_blocks_follow_the_pyg_layout_and_every_edge_exists(graph):
    mb = NeighborSampler(graph, [10, 5]).sample(np.arange(100, 612), batch_rng(0, 0, 0))
    assert [b.size for b in mb.blocks][-1][1] == mb.batch_size == 512
    np.testing.assert_array_equal(mb.n_id[:512], np.arange(100, 612))  # seeds first
    assert len(np.unique(mb.n_id)) == len(mb.n_id) and mb.blocks[0].size[0] == len(mb.n_id)
    assert mb.blocks[0].size[1] == mb.blocks[1].size[0]  # each hop's targets are the next layer's sources
    keys = np.sort(edge_keys(graph))
    for block in mb.blocks:
        assert block.edge_index.dtype == torch.int64 and block.edge_index.shape[0] == 2
        assert block.edge_index[0].max() < block.size[0] and block.edge_index[1].max() < block.size[1]
        s, d = block_edges(mb, block)
        found = keys[np.minimum(np.searchsorted(keys, d * graph.num_nodes + s), len(keys) - 1)]
        assert (found == d * graph.num_nodes + s).all()


@pytest.mark.parametrize("fanout", [1, 10, 25])
def test_without_replacement_each_target_takes_min_degree_fanout_distinct_neighbours(graph, fanout):
    mb = NeighborSampler(graph, [fanout]).sample(np.arange(0, 20_000, 7), batch_rng(1, 0, 0))
    s, d = block_edges(mb, mb.blocks[0])
    np.testing.assert_array_equal(np.bincount(mb.blocks[0].edge_index[1].numpy(), minlength=mb.batch_size),
                                  np.minimum(graph.in_degree(mb.seeds), fanout))
    assert len(np.unique(d * graph.num_nodes + s)) == len(s)  # the graph is simple: no neighbour twice


def test_with_replacement_every_target_with_neighbours_takes_exactly_fanout(graph):
    mb = NeighborSampler(graph, [15], replace=True).sample(np.arange(0, 20_000, 7), batch_rng(1, 0, 0))
    taken = np.bincount(mb.blocks[0].edge_index[1].numpy(), minlength=mb.batch_size)
    np.testing.assert_array_equal(taken, np.where(graph.in_degree(mb.seeds) > 0, 15, 0))


def test_neighbours_are_drawn_uniformly(graph):
    v = int(np.flatnonzero(graph.in_degree() == 20)[0])
    sampler = NeighborSampler(graph, [5])
    picks = np.concatenate([sampler.sample(np.array([v]), batch_rng(3, 0, i)).n_id[1:] for i in range(2000)])
    counts = np.unique(picks, return_counts=True)[1]
    assert len(counts) == 20 and counts.min() > 400 and counts.max() < 600  # 500 expected each (sd ~20)


def test_two_layer_sage_over_blocks_equals_full_graph_sage_on_the_seeds():
    src, dst = random_edges(n=200, e=1500, seed=4)
    graph = graph_from_edges(src, dst, num_nodes=205)  # directed, repeated edges kept, some isolated nodes
    torch.manual_seed(0)
    convs = [SAGEConv(16, 32), SAGEConv(32, 8)]
    x = torch.randn(graph.num_nodes, 16)
    full = convs[1](torch.relu(convs[0](x, graph.edge_index())), graph.edge_index())
    seeds = np.array([5, 0, 204, 77, 13])
    max_degree = int(graph.in_degree().max())
    for fanouts in ([-1, -1], [max_degree, max_degree + 3]):
        mb = NeighborSampler(graph, fanouts).sample(seeds, batch_rng(0, 0, 0))
        h = x[torch.from_numpy(mb.n_id)]
        for i, (conv, block) in enumerate(zip(convs, mb.blocks, strict=True)):
            h = conv((h, h[: block.size[1]]), block.edge_index, block.size)
            h = torch.relu(h) if i == 0 else h
        torch.testing.assert_close(h, full[torch.from_numpy(seeds)], rtol=1e-5, atol=1e-5)


def test_an_epoch_visits_every_train_node_once_and_any_batch_can_be_resampled_alone(graph):
    ids = np.arange(0, 20_000, 13)
    epoch3 = list(NeighborSampler(graph, [5, 5]).batches(ids, 100, seed=1, epoch=3))
    np.testing.assert_array_equal(np.sort(np.concatenate([mb.seeds for mb in epoch3])), ids)
    assert not np.array_equal(epoch3[0].seeds, batch_seeds(ids, 100, seed=1, epoch=4)[0])  # reshuffled
    again = NeighborSampler(graph, [5, 5]).sample(batch_seeds(ids, 100, 1, 3)[5], batch_rng(1, 3, 5))
    np.testing.assert_array_equal(again.n_id, epoch3[5].n_id)


def test_generated_graph_has_planted_homophily_power_law_degrees_and_permuted_ids(dataset, graph):
    labels = load_labels(dataset.root)
    dst = np.repeat(np.arange(graph.num_nodes), graph.in_degree())
    assert abs((labels[np.asarray(graph.indices)] == labels[dst]).mean() - 0.7) < 0.05
    deg = graph.in_degree()
    assert deg.max() > 15 * deg.mean() and np.median(deg) < deg.mean()  # heavy tail
    assert 17 < deg.mean() <= 20 and graph.num_edges == dataset.meta["num_edges"]
    first = labels[:1000]  # ids permuted: classes are not laid out in blocks of ids
    assert len(np.unique(first)) == 10 and (first[1:] == first[:-1]).mean() < 0.2
    np.testing.assert_array_equal(edge_keys(graph) % graph.num_nodes, np.asarray(graph.indices))
    assert (edge_keys(graph) // graph.num_nodes != np.asarray(graph.indices)).all()  # no self-loops


def test_generated_features_labels_and_split_are_what_training_reads(dataset, tmp_path):
    info = open_feature_file(dataset.features)
    assert info.shape == (20_000, 128) and info.dtype == np.float32 and info.row_bytes == 512
    split = load_split(dataset.root)
    assert (len(split.train), len(split.val), len(split.test)) == (400, 1000, 2000)
    assert len(np.unique(np.concatenate([split.train, split.val, split.test]))) == 3400
    assert load_labels(dataset.root).shape == (20_000,)
    again = generate_dataset(tmp_path / "again", num_nodes=20_000, seed=0)  # same arguments, same bytes
    assert (again.features.read_bytes() == dataset.features.read_bytes()
            and (again.graph / "indices.npy").read_bytes() == (dataset.graph / "indices.npy").read_bytes())
    assert generate_dataset(tmp_path / "again", num_nodes=500).meta["num_nodes"] == 500  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    with pytest.raises(NotAGraphError, match="never replaced or deleted"):
        generate_dataset(tmp_path / "mine", num_nodes=100)
    assert (tmp_path / "mine" / "data.csv").read_text() == "1,2"


def test_an_mlp_on_features_alone_clearly_underperforms_sampled_graphsage(tmp_path):
    ds = generate_dataset(tmp_path / "g", num_nodes=4000, train_frac=0.05, seed=1)
    graph, split = ds.load_graph(), load_split(ds.root)
    x, y = torch.from_numpy(np.array(load_features(ds.root))), torch.from_numpy(load_labels(ds.root))
    mlp_acc = mlp_test_accuracy(x, y, split)  # seeds torch with 0 first

    convs, sage = sage_model()
    opt = torch.optim.Adam(convs.parameters(), lr=0.01, weight_decay=5e-4)
    sampler = NeighborSampler(graph, [10, 10])

    def forward(mb):
        return sage(mb, x[torch.from_numpy(mb.n_id)])

    for epoch in range(15):
        for mb in sampler.batches(split.train, 50, seed=0, epoch=epoch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(forward(mb), y[torch.from_numpy(mb.seeds)]).backward()
            opt.step()
    with torch.no_grad():
        mb = sampler.sample(split.test, batch_rng(0, 99, 0))
        sage_acc = accuracy(forward(mb), y[torch.from_numpy(mb.seeds)])
    assert mlp_acc < 0.6 and sage_acc > 0.75 and sage_acc > mlp_acc + 0.2, (mlp_acc, sage_acc)
