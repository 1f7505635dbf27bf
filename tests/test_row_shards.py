"""Row shards: rows read back exactly, replaced atomically, never over foreign files, corruption is named."""

import threading

import numpy as np
import pytest
from plait.lm.data import DataConfig, StepBatches, ensure_token_dataset
from plait.storage.row_shards import CorruptDataError, NotRowShardsError, RowShards, write_row_shards


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no lock file, temp or old folder left


def test_a_reader_opened_before_a_replace_keeps_reading_the_old_rows(tmp_path):
    old_rows, new_rows = np.zeros((300, 4), dtype=np.int32), np.ones((300, 4), dtype=np.int32)
    write_row_shards(tmp_path / "ds", old_rows, rows_per_shard=100)
    reader = RowShards(tmp_path / "ds")
    write_row_shards(tmp_path / "ds", new_rows, rows_per_shard=100)
    np.testing.assert_array_equal(reader.read(np.arange(300)), old_rows)  # its files are held open
    np.testing.assert_array_equal(RowShards(tmp_path / "ds").read(np.arange(300)), new_rows)


def test_a_folder_of_other_files_is_never_replaced(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my own work")
    with pytest.raises(NotRowShardsError, match=r"mine holds files .*1 entry: notes.txt.* never deleted"):
        write_row_shards(folder, np.ones((5, 2), dtype=np.int32))
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "my own work"
    write_row_shards(tmp_path / "ds", np.ones((5, 2), dtype=np.int32))
    (tmp_path / "ds" / "README").write_text("a note the user dropped into the dataset")
    with pytest.raises(NotRowShardsError, match="README"):
        write_row_shards(tmp_path / "ds", np.zeros((5, 2), dtype=np.int32))
    assert (tmp_path / "ds" / "README").is_file() and RowShards(tmp_path / "ds").read(np.array([0]))[0, 0] == 1


def test_verify_names_a_truncated_or_bit_flipped_shard(tmp_path):
    write_row_shards(tmp_path / "ds", np.arange(3000, dtype=np.int32).reshape(1000, 3), rows_per_shard=400)
    RowShards(tmp_path / "ds").verify()
    shard = tmp_path / "ds" / "shard_00001.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptDataError, match=r"shard_00001.parquet is \d+ bytes, the manifest says \d+: it was "
                       r"truncated .* delete .*ds and rebuild it"):
        RowShards(tmp_path / "ds").verify()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CorruptDataError, match=r"shard_00001.parquet fails its checksum .* delete .* rebuild it"):
        RowShards(tmp_path / "ds").verify()
    shard.unlink()
    with pytest.raises(CorruptDataError, match=r"shard_00001.parquet is missing"):
        RowShards(tmp_path / "ds").verify()


def test_reading_a_few_rows_decodes_their_row_groups_not_whole_shards(tmp_path):
    decoded = []
    for n in (5_000, 50_000):  # one shard of 5k rows, then seven shards of 8192 rows
        write_row_shards(tmp_path / f"ds{n}", np.arange(n * 3, dtype=np.int32).reshape(n, 3), rows_per_group=128)
        shards = RowShards(tmp_path / f"ds{n}")
        ids = np.random.default_rng(0).choice(n, size=16, replace=False)
        np.testing.assert_array_equal(shards.read(ids), np.arange(n * 3).reshape(n, 3)[ids])
        decoded.append(shards.rows_decoded)
    assert all(0 < d <= 16 * 128 for d in decoded), decoded  # bounded by the rows asked, on both sizes
    shards.read(ids)
    assert shards.rows_decoded == decoded[-1]  # the same rows again: served from the cache of row groups


def test_the_row_group_cache_stays_within_its_bound(tmp_path):
    rows = np.arange(4000 * 2, dtype=np.int32).reshape(4000, 2)
    write_row_shards(tmp_path / "ds", rows, rows_per_shard=1000, rows_per_group=100)
    shards = RowShards(tmp_path / "ds", cache_rows=300)
    for start in range(0, 4000, 50):
        np.testing.assert_array_equal(shards.read(np.arange(start, start + 50)), rows[start : start + 50])
    assert shards.rows_decoded == 4000  # each group decoded once while reading in order
    shards.read(np.arange(3700, 4000))
    assert shards.rows_decoded == 4000  # the last 300 rows are still cached
    shards.read(np.array([0]))
    assert shards.rows_decoded == 4100  # the first group was evicted: decoded again


def test_two_threads_writing_one_dataset_leave_one_valid_dataset(tmp_path):
    rows = np.arange(2000 * 5, dtype=np.int32).reshape(2000, 5)
    start, errors = threading.Barrier(2), []

    def write():
        start.wait()
        try:
            write_row_shards(tmp_path / "ds", rows, rows_per_shard=300)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    shards = RowShards(tmp_path / "ds")
    shards.verify()
    np.testing.assert_array_equal(shards.read(np.arange(2000)), rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


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
