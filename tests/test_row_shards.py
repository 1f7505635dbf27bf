"""Row shards: rows read back exactly, writes are atomic, corruption is named."""

import numpy as np
import pytest
from plait.parallel.data import DataConfig, StepBatches, ensure_token_dataset
from plait.storage.row_shards import CorruptDataError, RowShards, write_row_shards


def test_rows_read_back_in_the_order_asked(tmp_path):
    rows = np.arange(1000 * 9, dtype=np.int32).reshape(1000, 9)
    write_row_shards(tmp_path / "ds", rows, rows_per_shard=128)
    shards = RowShards(tmp_path / "ds")
    ids = np.array([999, 0, 128, 127, 500, 0])
    assert len(shards) == 1000 and len(shards.files) == 8
    np.testing.assert_array_equal(shards.read(ids), rows[ids])
    with pytest.raises(IndexError, match=r"row ids must be in \[0, 1000\)"):
        shards.read(np.array([1000]))


def test_unfinished_or_corrupt_dataset_is_named(tmp_path):
    rows = np.ones((300, 4), dtype=np.int32)
    write_row_shards(tmp_path / "ds", rows, rows_per_shard=100)
    (tmp_path / "ds" / "shard_00001.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorruptDataError, match=r"shard_00001.parquet is unreadable .* delete .* rebuild it"):
        RowShards(tmp_path / "ds").read(np.array([150]))
    (tmp_path / "half").mkdir()  # as a crash mid-build would leave it, had it not been built aside
    with pytest.raises(CorruptDataError, match=r"manifest.json not found"):
        RowShards(tmp_path / "half")


def test_rewrite_replaces_whole_dataset_and_leaves_no_temp(tmp_path):
    write_row_shards(tmp_path / "ds", np.zeros((10, 3), dtype=np.int32))
    write_row_shards(tmp_path / "ds", np.ones((20, 3), dtype=np.int32))
    assert len(RowShards(tmp_path / "ds")) == 20
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]


def test_step_batches_are_a_function_of_step_and_split_over_dp(tmp_path):
    cfg = DataConfig(path=str(tmp_path / "tok"), source="synthetic", num_tokens=10_000)
    shards = ensure_token_dataset(cfg, tmp_path / "tok", seq_len=16, vocab_size=32)
    batches = StepBatches(shards, global_batch=8, seed=3)
    x, y = batches.batch(5)
    assert x.shape == (8, 16) and (x[:, 1:] == y[:, :-1]).all()
    again = StepBatches(RowShards(tmp_path / "tok"), global_batch=8, seed=3)
    halves = [again.batch(5, r, 2)[0] for r in range(2)]
    assert sorted(map(tuple, np.concatenate(halves).tolist())) == sorted(map(tuple, x.tolist()))
    assert ensure_token_dataset(cfg, tmp_path / "tok", 16, 32).meta == shards.meta  # reused, not rebuilt
