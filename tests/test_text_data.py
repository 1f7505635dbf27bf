"""Your own text: local Parquet/JSONL files tokenised, packed with document boundaries, read per step."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from plait.lm.data import DatasetError
from plait.lm.text_data import TextBatches, TextDataConfig, ensure_text_dataset, split_rows
from plait.runtime.config import ConfigError
from text_fixtures import EOS, stdlib_documents, train_tokenizer, write_jsonl, write_parquet
from tokenizers import Tokenizer

SEQ = 48


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tokenizer folder and the documents split over one Parquet file (several row groups) and one JSONL."""
    root = tmp_path_factory.mktemp("text")
    docs = stdlib_documents()
    tok = train_tokenizer(root / "model", docs, config={"eos_token": EOS})
    half = len(docs) // 2
    files = [str(write_parquet(root / "a.parquet", docs[:half])), str(write_jsonl(root / "b.jsonl", docs[half:]))]
    return {"root": root, "docs": docs, "tokenizer": str(tok.parent), "files": files}


@pytest.fixture(scope="module")
def built(corpus):
    cfg = TextDataConfig(files=corpus["files"], tokenizer=corpus["tokenizer"], seq_len=SEQ)
    return ensure_text_dataset(cfg, corpus["root"] / "packed", read_batch=5)


def token_stream(corpus) -> tuple[np.ndarray, np.ndarray]:
    """Every document's tokens followed by the end-of-text id, concatenated; and each token's document."""
    tok = Tokenizer.from_file(corpus["tokenizer"] + "/tokenizer.json")
    eos = tok.token_to_id(EOS)
    ids = [tok.encode(d).ids + [eos] for d in corpus["docs"]]
    return np.concatenate(ids), np.repeat(np.arange(len(ids)), [len(i) for i in ids])


def test_packing_keeps_every_token_once_in_order_with_its_document(corpus, built):
    stream, docs = token_stream(corpus)
    tokens, doc_ids = split_rows(built.read(np.arange(len(built))))
    width = SEQ + 1
    assert tokens.shape == (len(stream) // width, width)
    assert np.array_equal(tokens.reshape(-1), stream[: tokens.size])
    assert np.array_equal(doc_ids.reshape(-1), docs[: tokens.size])
    assert built.meta["documents"] == len(corpus["docs"]) and built.meta["dropped_tokens"] == len(stream) % width


def test_build_does_not_depend_on_how_many_texts_are_read_at_a_time(corpus, built, tmp_path):
    cfg = TextDataConfig(files=corpus["files"], tokenizer=corpus["tokenizer"], seq_len=SEQ)
    other = ensure_text_dataset(cfg, tmp_path / "one-batch", read_batch=100_000)
    assert np.array_equal(other.read(np.arange(len(other))), built.read(np.arange(len(built))))


def test_targets_and_positions_restart_at_each_document(built):
    inputs, targets = TextBatches(built, global_batch=8, seed=3).batch(5)
    ids = built.read(np.sort(TextBatches(built, 8, 3).row_ids(5)))
    tokens, docs = (torch.from_numpy(a.astype(np.int64)) for a in split_rows(ids))
    assert torch.equal(inputs["input_ids"], tokens[:, :-1])
    crosses = docs[:, 1:] != docs[:, :-1]
    assert crosses.any(), "the batch should hold document boundaries"
    assert torch.equal(targets == -100, crosses)
    assert torch.equal(targets[~crosses], tokens[:, 1:][~crosses])
    for row in range(len(docs)):  # positions count 0, 1, 2, ... from each document start (and the row's start)
        expected, p = [], 0
        for t in range(SEQ):
            p = 0 if t == 0 or docs[row, t] != docs[row, t - 1] else p + 1
            expected.append(p)
        assert inputs["position_ids"][row].tolist() == expected
    assert inputs["attention_mask"].shape == (8, 1, SEQ, SEQ) and inputs["attention_mask"].dtype == torch.bool


@pytest.mark.parametrize("attn, mask_dtype", [("sdpa", torch.bool), ("eager", torch.float32)])
def test_document_mask_gives_a_llama_the_logits_of_each_document_alone(built, attn, mask_dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = attn
    batches = TextBatches(built, global_batch=4, seed=0, mask_dtype=mask_dtype)
    inputs, _ = batches.batch(0)
    documents = 0
    with torch.no_grad():
        packed = model(**inputs).logits
        for row in range(4):
            starts = (inputs["position_ids"][row] == 0).nonzero().flatten().tolist() + [SEQ]
            documents += len(starts) - 1
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                alone = model(input_ids=inputs["input_ids"][row : row + 1, a:b]).logits[0]
                torch.testing.assert_close(packed[row, a:b], alone, atol=1e-5, rtol=1e-4)
    assert documents > 4, "some row should hold several documents"
    with torch.no_grad():  # and the mask is what keeps them apart: one causal stream mixes documents
        assert not torch.allclose(model(input_ids=inputs["input_ids"]).logits, packed, atol=1e-3)


def test_resuming_under_another_dp_degree_neither_repeats_nor_skips_a_sequence(built):
    batches, global_batch = TextBatches(built, global_batch=8, seed=1, doc_mask=False), 8
    steps = len(built) // global_batch  # one whole epoch, so every sequence is read exactly once

    def rows(step, dp):
        return [tuple(r) for rank in range(dp) for r in torch.cat(
            [batches.batch(step, rank, dp)[0]["input_ids"], batches.batch(step, rank, dp)[1]], 1).tolist()]

    k = steps // 3
    uninterrupted = [r for s in range(steps) for r in rows(s, 1)]
    resumed = [r for s in range(k) for r in rows(s, 1)] + [r for s in range(k, 2 * k) for r in rows(s, 2)] + [
        r for s in range(2 * k, steps) for r in rows(s, 4)]
    assert sorted(resumed) == sorted(uninterrupted)
    assert len(set(uninterrupted)) == steps * global_batch


def test_resume_checks_the_data_state_and_refuses_another_global_batch(built):
    state = TextBatches(built, global_batch=8, seed=1).data_state(12)
    assert TextBatches(built, global_batch=8, seed=1).check_resume(state) == 12
    with pytest.raises(DatasetError, match="global_batch=8"):
        TextBatches(built, global_batch=4, seed=1).check_resume(state)
    with pytest.raises(DatasetError, match="seed"):
        TextBatches(built, global_batch=8, seed=2).check_resume(state)


def test_a_finished_dataset_is_reused_and_a_changed_input_refused_until_rebuild(corpus, tmp_path, capsys):
    jsonl = write_jsonl(tmp_path / "c.jsonl", corpus["docs"][:10])
    cfg = TextDataConfig(files=[str(jsonl)], tokenizer=corpus["tokenizer"], seq_len=SEQ)
    first = ensure_text_dataset(cfg, tmp_path / "ds")
    capsys.readouterr()
    again = ensure_text_dataset(cfg, tmp_path / "ds")
    assert "packing" not in capsys.readouterr().out and len(again) == len(first)
    write_jsonl(jsonl, corpus["docs"][:20])
    with pytest.raises(DatasetError, match=r"c\.jsonl changed.*data\.rebuild=true"):
        ensure_text_dataset(cfg, tmp_path / "ds")
    cfg.rebuild = True
    rebuilt = ensure_text_dataset(cfg, tmp_path / "ds")
    assert rebuilt.meta["documents"] == 20 and len(rebuilt) > len(first)


def test_a_foreign_folder_is_refused_even_with_rebuild(corpus, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = TextDataConfig(files=corpus["files"], tokenizer=corpus["tokenizer"], seq_len=SEQ, rebuild=True)
    with pytest.raises(DatasetError, match="not a Plait dataset"):
        ensure_text_dataset(cfg, tmp_path / "mine")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_a_failed_build_leaves_nothing_behind(corpus, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", corpus["docs"][:30])
    with open(bad, "a") as f:
        f.write('{"body": "no text key"}\n')
    cfg = TextDataConfig(files=[str(bad)], tokenizer=corpus["tokenizer"], seq_len=SEQ)
    with pytest.raises(ConfigError, match=r"bad\.jsonl:31 .*'text'"):
        ensure_text_dataset(cfg, tmp_path / "ds")
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_end_of_text_token_comes_from_the_tokenizer_or_a_clear_error(corpus, tmp_path):
    docs, jsonl = corpus["docs"][:10], write_jsonl(tmp_path / "d.jsonl", corpus["docs"][:10])
    plain = train_tokenizer(tmp_path / "plain", docs, special=("<pad>",))  # a tokenizer.json with no known eos
    cfg = TextDataConfig(files=[str(jsonl)], tokenizer=str(plain), seq_len=SEQ)
    with pytest.raises(ConfigError, match=r"end-of-text token.*<pad>.*tokenizer_config\.json"):
        ensure_text_dataset(cfg, tmp_path / "ds")
    (tmp_path / "plain" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    shards = ensure_text_dataset(cfg, tmp_path / "ds")
    pad = Tokenizer.from_file(str(plain)).token_to_id("<pad>")
    tokens, docs_of = split_rows(shards.read(np.arange(len(shards))))
    ends = docs_of.reshape(-1)[1:] != docs_of.reshape(-1)[:-1]
    assert shards.meta["eos_id"] == pad and (tokens.reshape(-1)[:-1][ends] == pad).all()


@pytest.mark.parametrize("field, value, says", [
    ("files", [], "data.files"), ("tokenizer", "", "data.tokenizer"), ("seq_len", 0, "data.seq_len"),
    ("text_column", "", "data.text_column"), ("prompt_column", "text", "data.prompt_column")])
def test_config_check_names_the_field_and_the_fix(field, value, says):
    cfg = TextDataConfig(files=["x.parquet"], tokenizer="tok.json")
    setattr(cfg, field, value)
    with pytest.raises(ConfigError, match=says):
        cfg.check()


def test_missing_column_names_the_columns_there(corpus, tmp_path):
    cfg = TextDataConfig(files=corpus["files"][:1], text_column="body", tokenizer=corpus["tokenizer"], seq_len=SEQ)
    with pytest.raises(ConfigError, match=r"no such column \(it has id, text\)"):
        ensure_text_dataset(cfg, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def write_pairs(corpus, tmp_path, n: int = 60) -> tuple[list[dict], list[str]]:
    """Prompt / completion pairs (a document's start and its next part) in a Parquet file and a JSONL file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": d[:40], "completion": d[40:70 + 7 * (i % 9)]} for i, d in enumerate(corpus["docs"][:n])]
    first = rows[: n // 2]
    pq.write_table(pa.table({"q": [r["prompt"] for r in first], "a": [r["completion"] for r in first]}),
                   tmp_path / "pairs.parquet", row_group_size=7)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"q": r["prompt"], "a": r["completion"]}) + "\n"
                                                  for r in rows[n // 2 :]))
    return rows, [str(tmp_path / "pairs.parquet"), str(tmp_path / "pairs.jsonl")]


def test_prompt_completion_pairs_are_whole_in_one_row_with_the_loss_on_the_completion_only(corpus, tmp_path):
    rows, files = write_pairs(corpus, tmp_path)
    cfg = TextDataConfig(files=files, prompt_column="q", text_column="a", tokenizer=corpus["tokenizer"], seq_len=SEQ)
    shards = ensure_text_dataset(cfg, tmp_path / "pairs", read_batch=4)
    tok = Tokenizer.from_file(corpus["tokenizer"] + "/tokenizer.json")
    eos = tok.token_to_id(EOS)
    expected = []
    for r in rows:  # the prompt as the tokenizer makes it alone, the completion without special tokens, eos
        p, c = tok.encode(r["prompt"]).ids, tok.encode(r["completion"], add_special_tokens=False).ids
        expected.append((p + c + [eos])[: SEQ + 1])
    tokens, docs, trained = split_rows(shards.read(np.arange(len(shards))), 3)
    found = []
    for row in range(len(tokens)):  # documents in order, each inside one row, then padding (no loss)
        for d in dict.fromkeys(docs[row].tolist()):
            at = docs[row] == d
            if d < (1 << 30):
                found.append(tokens[row][at].tolist())
                n_prompt = len(tok.encode(rows[d]["prompt"]).ids)
                assert trained[row][at].tolist() == [0] * n_prompt + [1] * (at.sum() - n_prompt)
            else:
                assert not trained[row][at].any() and (tokens[row][at] == eos).all()
    assert found == expected
    truncated = sum(len(tok.encode(r["prompt"]).ids) + len(tok.encode(r["completion"], add_special_tokens=False).ids)
                    + 1 > SEQ + 1 for r in rows)
    assert shards.meta["documents"] == len(rows) and shards.meta["truncated"] == truncated
    inputs, targets = TextBatches(shards, global_batch=len(shards), seed=0).batch(0)
    order = np.sort(TextBatches(shards, len(shards), 0).row_ids(0))
    t, dd, tr = (torch.from_numpy(a.astype(np.int64)) for a in split_rows(shards.read(order), 3))
    keep = (tr[:, 1:] == 1) & (dd[:, 1:] == dd[:, :-1])
    assert keep.any() and torch.equal(targets != -100, keep) and torch.equal(targets[keep], t[:, 1:][keep])
    assert (inputs["position_ids"][:, 0] == 0).all()  # every row starts a document: no pair was cut


def test_a_missing_prompt_column_is_named_and_nothing_is_written(corpus, tmp_path):
    _, files = write_pairs(corpus, tmp_path)
    cfg = TextDataConfig(files=files[:1], prompt_column="question", text_column="a", tokenizer=corpus["tokenizer"],
                         seq_len=SEQ)
    with pytest.raises(ConfigError, match=r"data.prompt_column='question'.*no such column \(it has q, a\)"):
        ensure_text_dataset(cfg, tmp_path / "ds")
    cfg.files = files[1:]
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1 is not a JSON object with 'a' and 'question' key"):
        ensure_text_dataset(cfg, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_a_pair_whose_prompt_fills_a_row_is_left_out_so_every_row_has_a_trained_token():
    from plait.lm.pair_rows import PairPacker

    out = io.BytesIO()
    packer = PairPacker(out, width=6, pad_id=0)
    packer.add([([1, 2, 3, 4, 5, 6, 7], 6), ([1, 2, 9, 9], 2), ([1, 2, 3, 4, 5, 9, 9, 9], 5), ([8, 9], 0)])
    packer.flush()
    rows = np.frombuffer(out.getvalue(), np.int32).reshape(-1, 3, 6)
    assert packer.skipped == 1 and packer.truncated == 1 and packer.documents == 3 and len(rows) == 3
    assert rows[:, 0].tolist() == [[1, 2, 9, 9, 0, 0], [1, 2, 3, 4, 5, 9], [8, 9, 0, 0, 0, 0]]
    assert rows[:, 2].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0]]
    assert all(row[2, 1:].any() for row in rows)  # a trained target in every row: no loss over nothing
