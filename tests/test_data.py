"""Token datasets: a user's folder is never touched, recipes are checked, builds are atomic and taken in turn,
corruption is found before launch, and a step's cost does not grow with the dataset."""

import json
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from plait.lm.data import (
    CorruptDatasetError,
    DataConfig,
    DatasetError,
    StepBatches,
    ensure_token_dataset,
    open_token_dataset,
    permuted,
)
from plait.runtime.cli import main as plait_main
from plait.runtime.config import ConfigError
from plait.storage.row_shards import CorruptDataError, RowShards

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "gpt_dp2.toml")


def synthetic(path: Path, num_tokens: int = 10_000, **kw) -> DataConfig:
    return DataConfig(path=str(path), source="synthetic", num_tokens=num_tokens, **kw)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "thesis"
    (folder / "figures").mkdir(parents=True)
    (folder / "draft.tex").write_text("\\section{Results}")
    (folder / "figures" / "loss.png").write_bytes(b"\x89PNG not really")
    return folder


def test_a_folder_of_the_users_files_is_refused_untouched_before_anything_is_written(tmp_path):
    folder = users_folder(tmp_path)
    before, beside = snapshot(folder), sorted(tmp_path.iterdir())
    for rebuild in (False, True):
        with pytest.raises(DatasetError, match=r"thesis is not a Plait dataset .* 2 entries: draft.tex, figures"):
            ensure_token_dataset(synthetic(folder, rebuild=rebuild), folder, seq_len=16, vocab_size=32)
    assert snapshot(folder) == before and sorted(tmp_path.iterdir()) == beside  # not even a lock file
    assert issubclass(DatasetError, ConfigError)


def test_plait_run_on_a_users_folder_exits_2_naming_it(tmp_path, capsys):
    folder = users_folder(tmp_path)
    before = snapshot(folder)
    code = plait_main(["run", EXAMPLE, f"data.path={folder}", f"run_dir={tmp_path / 'run'}", "train.steps=2"])
    assert code == 2 and snapshot(folder) == before
    assert f"data.path={folder} is not a Plait dataset" in capsys.readouterr().err


def test_a_folder_without_a_manifest_is_refused(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "shard_00000.parquet").write_bytes(b"left by a crashed build of an older Plait")
    with pytest.raises(DatasetError, match=r"no manifest.json .* 1 entry: shard_00000.parquet"):
        ensure_token_dataset(synthetic(folder), folder, seq_len=16, vocab_size=32)
    assert [p.name for p in folder.iterdir()] == ["shard_00000.parquet"]


def test_another_recipe_is_refused_with_both_choices_and_left_as_it_is(tmp_path):
    path = tmp_path / "tok"
    ensure_token_dataset(synthetic(path), path, seq_len=128, vocab_size=32)
    before = snapshot(path)
    with pytest.raises(DatasetError) as e:
        ensure_token_dataset(synthetic(path), path, seq_len=64, vocab_size=32)
    msg = str(e.value)
    assert "another recipe (seq_len=128)" in msg and "asks for seq_len=64" in msg
    assert f"data.path={tmp_path / 'tok-seq_len64'}" in msg and "data.rebuild=true replaces this one" in msg
    assert snapshot(path) == before


def test_rebuild_replaces_a_plait_dataset_atomically_while_a_reader_keeps_its_copy(tmp_path, capsys):
    path = tmp_path / "tok"
    reader = ensure_token_dataset(synthetic(path), path, seq_len=128, vocab_size=32)
    capsys.readouterr()
    rebuilt = ensure_token_dataset(synthetic(path, rebuild=True), path, seq_len=64, vocab_size=32)
    assert rebuilt.width == 65 and RowShards(path).meta["seq_len"] == 64
    assert reader.read(np.arange(len(reader))).shape == (len(reader), 129)  # opened before: still the old rows
    assert "data.rebuild=true: building a new dataset there" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    again = ensure_token_dataset(synthetic(path, rebuild=True), path, seq_len=64, vocab_size=32)
    assert again.files == rebuilt.files and capsys.readouterr().out == ""  # same recipe, intact: reused


def test_a_missing_path_gets_one_line_and_an_empty_folder_is_used(tmp_path, capsys):
    path = tmp_path / "typo" / "tok"
    ensure_token_dataset(synthetic(path), path, seq_len=16, vocab_size=32)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"data.path={path} does not exist: building a new dataset there" in lines[0]
    assert "source='synthetic'" in lines[0] and "seq_len=16" in lines[0] and "num_tokens=10000" in lines[0]
    ensure_token_dataset(synthetic(path), path, seq_len=16, vocab_size=32)
    assert capsys.readouterr().out == ""  # reused
    (tmp_path / "empty").mkdir()
    shards = ensure_token_dataset(synthetic(tmp_path / "empty"), tmp_path / "empty", seq_len=16, vocab_size=32)
    assert len(shards) == 10_000 // 17 and "is empty: building" in capsys.readouterr().out


def test_two_builds_at_once_make_one_dataset_and_the_second_reuses_it(tmp_path, capsys):
    path, start, results = tmp_path / "tok", threading.Barrier(2), []

    def build():
        start.wait()
        results.append(ensure_token_dataset(synthetic(path, num_tokens=50_000), path, seq_len=16, vocab_size=32))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and capsys.readouterr().out.count("building a new dataset") == 1
    everything = np.arange(len(results[0]))
    np.testing.assert_array_equal(results[0].read(everything), results[1].read(everything))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_a_corrupt_shard_is_found_on_the_driver_and_rebuild_repairs_it(tmp_path):
    path = tmp_path / "tok"
    ensure_token_dataset(synthetic(path, num_tokens=300_000), path, seq_len=16, vocab_size=32)
    shard = path / "shard_00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptDatasetError, match=r"shard_00001.parquet fails its checksum .* data.rebuild=true"):
        ensure_token_dataset(synthetic(path, num_tokens=300_000), path, seq_len=16, vocab_size=32)
    assert issubclass(CorruptDatasetError, ConfigError) and issubclass(CorruptDatasetError, CorruptDataError)
    repaired = ensure_token_dataset(synthetic(path, num_tokens=300_000, rebuild=True), path, 16, 32)
    repaired.verify()


def test_a_dataset_of_the_older_format_is_refused_with_the_rebuild_hint(tmp_path):
    path = tmp_path / "tok"
    ensure_token_dataset(synthetic(path), path, seq_len=16, vocab_size=32)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format"] = "plait-row-shards-v1"
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"format='plait-row-shards-v1'.* data.rebuild=true"):
        ensure_token_dataset(synthetic(path), path, seq_len=16, vocab_size=32)
    assert ensure_token_dataset(synthetic(path, rebuild=True), path, 16, 32).width == 17


def test_a_rank_refuses_a_dataset_rebuilt_under_it(tmp_path):
    path = tmp_path / "tok"
    ensure_token_dataset(synthetic(path), path, seq_len=16, vocab_size=32)
    assert open_token_dataset(synthetic(path), 16, 32).width == 17
    with pytest.raises(DatasetError, match=r"changed after the driver checked it.*seq_len=16.*seq_len=8"):
        open_token_dataset(synthetic(path), 8, 32)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 4099])
def test_the_epoch_permutation_is_a_deterministic_bijection(n):
    everything = np.arange(n)
    perm = permuted(everything, n, (7, 0))
    np.testing.assert_array_equal(np.sort(perm), everything)
    np.testing.assert_array_equal(permuted(everything, n, (7, 0)), perm)
    np.testing.assert_array_equal(permuted(everything[n // 2 :], n, (7, 0)), perm[n // 2 :])  # any positions
    if n >= 1000:
        assert (perm != everything).mean() > 0.9 and (permuted(everything, n, (7, 1)) != perm).mean() > 0.9


def test_the_permutation_of_a_huge_dataset_allocates_nothing_of_its_size():
    n = 50_000_000  # a full permutation would take n * 8 = 400 MB
    tracemalloc.start()
    ids = permuted(np.arange(4096, 4160), n, (0, 3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000 and len(set(ids.tolist())) == 64 and ids.min() >= 0 and ids.max() < n


def test_a_steps_batch_decodes_the_same_bounded_rows_on_a_small_and_a_10x_dataset(tmp_path):
    decoded = []
    for num_tokens in (30_000, 300_000):
        path = tmp_path / f"tok{num_tokens}"
        shards = ensure_token_dataset(synthetic(path, num_tokens=num_tokens), path, seq_len=16, vocab_size=32)
        inputs, targets = StepBatches(shards, global_batch=8, seed=1).batch(3, dp_rank=1, dp_size=2)
        assert inputs.shape == (4, 16) and (inputs[:, 1:] == targets[:, :-1]).all()
        decoded.append(shards.rows_decoded)
    assert all(0 < d <= 4 * shards.rows_per_group for d in decoded), decoded  # 4 rows: at most 4 row groups
