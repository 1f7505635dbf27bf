"""The out-of-core GNN job (gnn/gnn_job.py) and its models: a spec that validates, GraphSAGE and GAT over sampled
blocks, a 2-rank DDP job that trains from packed batches, checkpoints and resumes, and a user folder refused."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from plait.gnn.generate import generate_dataset, load_features, load_labels, load_split
from plait.gnn.models import build_model
from plait.gnn.sampler import NeighborSampler
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "gnn_sage_ooc.toml")


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("gnn") / "g2k", num_nodes=2000, train_frac=0.1)


def test_example_spec_validates_for_two_workers():
    spec = load_spec(EXAMPLE)
    spec.module.validate(spec.config, spec.workers.num)
    assert spec.workers.num == 2 and spec.config.train.loader == "packed" and spec.config.train.cache_frac == 0.1


def test_packs_hold_min_epochs_4_sampled_epochs_unless_told_and_a_negative_count_is_refused(tmp_path):
    def cfg(*overrides):
        return load_spec(EXAMPLE, [f"run_dir={tmp_path}", *overrides]).config.train

    assert [cfg(f"train.epochs={e}").sampled_epochs() for e in (1, 3, 4, 10)] == [1, 3, 4, 4]
    assert cfg("train.epochs=10", "train.pack_epochs=10").sampled_epochs() == 10
    with pytest.raises(ValueError, match="train.pack_epochs >= 0"):
        cfg("train.pack_epochs=-1").check()


@pytest.mark.parametrize("name", ["sage", "gat"])
def test_model_takes_a_training_step_over_sampled_blocks(small_graph, name):
    graph, labels = small_graph.load_graph(), torch.from_numpy(load_labels(small_graph.root))
    x_all = torch.from_numpy(np.array(load_features(small_graph.root)))
    mb = NeighborSampler(graph, [5, 5]).sample(load_split(small_graph.root).train[:64], np.random.default_rng(0))
    torch.manual_seed(0)
    model = build_model(name, 128, 32, 10, num_layers=2, heads=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    out = model(x_all[mb.n_id], mb.blocks)
    loss = F.cross_entropy(out, labels[mb.seeds])
    loss.backward()
    opt.step()
    assert out.shape == (64, 10) and torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # every layer learnt


def test_model_refuses_features_of_other_nodes(small_graph):
    mb = NeighborSampler(small_graph.load_graph(), [3]).sample(np.arange(8), np.random.default_rng(0))
    with pytest.raises(ValueError, match="mb.n_id"):
        build_model("sage", 128, 16, 10, num_layers=1)(torch.zeros(len(mb.n_id) + 1, 128), mb.blocks)


def test_a_user_folder_is_refused_as_data_path_and_left_alone(tmp_path):
    mine = tmp_path / "my-notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    spec = load_spec(EXAMPLE, [f"data.path={mine}", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ValueError, match="is not a Plait GNN dataset.*thesis.txt.*never overwritten"):
        run_job(spec)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.txt"] and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_rank_packed_job_trains_checkpoints_and_resumes(ray_cluster, tmp_path):
    common = [f"data.path={tmp_path / 'data'}", "data.num_nodes=3000", f"run_dir={tmp_path / 'run'}",
              "train.batch_size=32", "train.hidden=32", "train.eval_nodes=256", "train.fanouts=[5, 5]",
              "train.pack_epochs=2"]  # fixed: by default the packs hold min(train.epochs, 4) epochs (a recipe)
    first = run_job(load_spec(EXAMPLE, ["train.epochs=2", *common]))
    assert first["start_epoch"] == 0 and len(first["val_acc"]) == 2
    assert first["checkpoint"].endswith("step_00000004")  # 150 train nodes / 32 = 4 batches: 2 per rank, 2 epochs
    assert len(set(first["param_digests"])) == 1  # DDP: both ranks hold the same parameters
    assert first["bytes_read"] > 0  # the rows outside the 10% host cache came from the packs on disk
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "sample_s", "read_s", "wait_s", "bytes_read", "compute_s"} <= records[0].keys()
    ends = [r for r in records if "val_acc" in r]  # each epoch's accounting, on the step that closes it
    assert all(r["distinct_rows"] > 0 and r["ampl_rows"] >= 1 and r["ampl_distinct"] >= r["ampl_rows"] for r in ends)
    assert any(k.endswith("hit_rate") for k in records[0])
    assert [r["step"] for r in records if "val_acc" in r] == [2, 4]  # validation accuracy closes each epoch
    packs = sorted(p for p in (tmp_path / "data.packs").iterdir() if p.is_dir())
    assert len(packs) == 1 and (packs[0] / "meta.json").is_file()

    resumed = run_job(load_spec(EXAMPLE, ["train.epochs=3", "train.resume=latest", *common]))
    assert resumed["start_epoch"] == 2 and len(resumed["val_acc"]) == 1  # only epoch 3 ran
    assert resumed["checkpoint"].endswith("step_00000006") and len(set(resumed["param_digests"])) == 1
    assert sorted(p for p in (tmp_path / "data.packs").iterdir() if p.is_dir()) == packs  # same recipe: reused
