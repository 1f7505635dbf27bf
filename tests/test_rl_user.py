"""Bring your own policy, prompts and reward: the pieces of the RL job a user supplies, and one whole job with all
three of them (a Hugging Face Llama folder, prompt files with a held-out split, a reward module beside the spec).

Unit tests need no Ray: prompt files read and refused (rl/prompts.py), the seeded stream and its digest,
built-in and user rewards run in their own process with a per-sample timeout (rl/rewards.py), the tokenizer a
policy brings (rl/policy.py) and what a user watches while RL trains (rl/observe.py). The slow test runs the
job end to end on the session's Ray cluster, then a resume with changed prompts, which must be refused.
"""

import builtins
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from plait.rl.observe import RunWatch, diversity
from plait.rl.policy import CharTokens, HFTokens, Policy, PolicyConfig, cut_at_stop
from plait.rl.prompts import Prompt, PromptConfig, PromptDataError, PromptStream, load_prompt_set
from plait.rl.rewards import (
    RewardConfig,
    RewardRunner,
    exact_match,
    extract_answer,
    format_score,
    load_reward,
    math_score,
    parse_number,
)
from plait.rl.rl_config import RLConfig
from plait.rl.tokenizer import CharTokenizer
from plait.runtime.config import ConfigError, build, is_user_error


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def restore_imports():
    """load_reward (and load_spec) put folders on sys.path and reward modules in sys.modules: undone after the
    test (the reward modules here are named ``*_reward_*``)."""
    path = list(sys.path)
    yield
    sys.path[:] = path
    for name in [n for n in sys.modules if "_reward_" in n]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A small random Llama folder (BPE tokenizer, chat template, eos ``</s>``), made offline once per module."""
    from plait.models.hf.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny-llama", hidden=32, layers=1, heads=2, kv_heads=1)


# ---------------------------------------------------------------- prompts

def test_parquet_and_jsonl_files_give_records_with_answer_source_extras_and_chat_messages(tmp_path):
    chat = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "2+2?"}]
    write_parquet(tmp_path / "gsm.parquet", [
        {"question": "1+1?", "answer": "2", "data_source": "gsm8k", "level": 1},
        {"question": "3+4?", "answer": "7", "data_source": None, "level": 2},  # no source: the file's stem
    ])
    write_parquet(tmp_path / "chat.pq", [{"question": chat, "answer": "4", "data_source": "chat", "level": 3}])
    write_jsonl(tmp_path / "more.jsonl", [
        {"question": "10-3?", "answer": 7, "level": 4, "unused": "x"},  # a number as ground truth: its text
        {"question": [{"role": "user", "content": "5*5?"}], "answer": "25", "data_source": "mine", "level": 5},
    ])
    cfg = PromptConfig(files=[str(tmp_path / "*.parquet"), str(tmp_path / "chat.pq"), str(tmp_path / "more.jsonl")],
                       prompt_column="question", answer_column="answer", extra_columns=["level"])
    prompts = load_prompt_set(cfg)
    assert prompts.held_out == []
    assert prompts.train == [
        Prompt("1+1?", "2", "gsm8k", {"level": 1}),
        Prompt("3+4?", "7", "gsm", {"level": 2}),
        Prompt(chat, "4", "chat", {"level": 3}),
        Prompt("10-3?", "7", "more", {"level": 4}),
        Prompt([{"role": "user", "content": "5*5?"}], "25", "mine", {"level": 5}),
    ]


def prompt_error(tmp_path: Path, **cfg) -> PromptDataError:
    with pytest.raises(PromptDataError) as info:
        load_prompt_set(PromptConfig(**cfg))
    e = info.value
    # the user's input is wrong: the CLI prints the message on one line and exits 2, also off the driver
    assert isinstance(e, ConfigError) and is_user_error(e, on_driver=False)
    return e


def test_unusable_prompt_files_are_refused_naming_the_file_and_the_fix(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": f"q{i}", "ground_truth": str(i)} for i in range(4)])
    write_jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "q", "answer": "1"}])
    e = prompt_error(tmp_path, files=[str(tmp_path / "noanswer.jsonl")])
    assert "noanswer.jsonl has no column 'ground_truth'" in str(e) and "['answer', 'prompt']" in str(e)
    assert "prompts.prompt_column / answer_column" in str(e)
    e = prompt_error(tmp_path, files=[str(good)], extra_columns=["level"])
    assert "good.jsonl has no column 'level'" in str(e)
    write_parquet(tmp_path / "empty.parquet", [])
    (tmp_path / "empty.jsonl").write_text("\n")
    for empty in ("empty.parquet", "empty.jsonl"):
        e = prompt_error(tmp_path, files=[str(tmp_path / empty)])
        assert f"{empty} holds no rows" in str(e)
    assert "nothing*.jsonl' matches no file" in str(prompt_error(tmp_path, files=[str(tmp_path / "nothing*.jsonl")]))
    assert "missing.jsonl is not a file" in str(prompt_error(tmp_path, files=[str(tmp_path / "missing.jsonl")]))
    (tmp_path / "data.csv").write_text("prompt,ground_truth\nq,1\n")
    assert "data.csv is neither Parquet" in str(prompt_error(tmp_path, files=[str(tmp_path / "data.csv")]))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "q", "ground_truth": "1"}\n{"prompt": \n')
    assert "broken.jsonl line 2: not JSON" in str(prompt_error(tmp_path, files=[str(tmp_path / "broken.jsonl")]))
    write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "q", "ground_truth": "1"}, {"prompt": "r", "ground_truth": " "}])
    e = prompt_error(tmp_path, files=[str(tmp_path / "blank.jsonl")])
    assert "blank.jsonl row 1: ground_truth is empty" in str(e)
    write_jsonl(tmp_path / "odd.jsonl", [{"prompt": {"text": "q"}, "ground_truth": "1"}])
    e = prompt_error(tmp_path, files=[str(tmp_path / "odd.jsonl")])
    assert "odd.jsonl row 0: prompt={'text': 'q'} is neither text nor a list of chat messages" in str(e)
    # held-out splits: overlapping the training files, empty, or leaving nothing to train on
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "q9", "ground_truth": "9"}, {"prompt": "q2", "ground_truth": "2"}])
    e = prompt_error(tmp_path, files=[str(good)], eval_files=[str(tmp_path / "test.jsonl")])
    assert "prompts.eval_files: 1 of the 2 held-out prompts are also in prompts.files (the first: 'q2')" in str(e)
    assert "remove them" in str(e)
    e = prompt_error(tmp_path, files=[str(good)], eval_files=[str(tmp_path / "empty.jsonl")])
    assert "empty.jsonl holds no rows" in str(e)
    write_jsonl(tmp_path / "one.jsonl", [{"prompt": "q", "ground_truth": "1"}])
    e = prompt_error(tmp_path, files=[str(tmp_path / "one.jsonl")], eval_fraction=0.5)
    assert "no prompt is left for training after the held-out split" in str(e)
    # the two ways of holding out, both given: refused when the spec is read
    with pytest.raises(ConfigError, match="prompts.eval_files and prompts.eval_fraction: give one held-out split"):
        build(PromptConfig, {"files": [str(good)], "eval_files": [str(good)], "eval_fraction": 0.1}, "prompts")
    with pytest.raises(ConfigError, match=r"eval_fraction=1.0 \(in \[0, 1\)\)"):
        build(PromptConfig, {"files": [str(good)], "eval_fraction": 1.0}, "prompts")


def test_the_held_out_split_is_never_in_the_training_stream(tmp_path):
    rows = [{"prompt": f"question {i}", "ground_truth": str(i)} for i in range(40)]
    rows += [dict(rows[3]), dict(rows[7])]  # a prompt a dataset holds twice is held out with both copies or neither
    write_jsonl(tmp_path / "all.jsonl", rows)
    split = load_prompt_set(PromptConfig(files=[str(tmp_path / "all.jsonl")], eval_fraction=0.25, seed=5))
    held = {r.prompt for r in split.held_out}
    assert len(split.held_out) == 10 and not held & {r.prompt for r in split.train}
    assert len(split.train) + len(split.held_out) in (40, 41, 42)  # copies of held-out prompts are dropped
    stream = PromptStream(split.train, seed=5)
    assert not held & {stream[i].prompt for i in range(3 * len(split.train))}
    again = load_prompt_set(PromptConfig(files=[str(tmp_path / "all.jsonl")], eval_fraction=0.25, seed=5))
    other = load_prompt_set(PromptConfig(files=[str(tmp_path / "all.jsonl")], eval_fraction=0.25, seed=6))
    assert again.held_out == split.held_out and other.held_out != split.held_out  # the split follows the seed
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "held out", "ground_truth": "0"}])
    files = load_prompt_set(PromptConfig(files=[str(tmp_path / "all.jsonl")],
                                         eval_files=[str(tmp_path / "test.jsonl")]))
    assert len(files.train) == 42 and [r.prompt for r in files.held_out] == ["held out"]


def test_the_stream_is_a_seeded_order_per_epoch_and_a_restart_reads_on_without_repeat_or_skip():
    records = [Prompt(f"p{i}", str(i), "src") for i in range(7)]
    whole = PromptStream(records, seed=3)
    seq = [whole[i].prompt for i in range(21)]
    for epoch in range(3):
        assert sorted(seq[7 * epoch:7 * epoch + 7]) == sorted(r.prompt for r in records)  # each record once
    assert seq[:7] != seq[7:14] or seq[7:14] != seq[14:]  # a fresh order per epoch
    assert [PromptStream(records, seed=3)[i].prompt for i in range(21)] == seq  # deterministic under the seed
    assert [PromptStream(records, seed=4)[i].prompt for i in range(21)] != seq
    for cursor in (0, 5, 7, 13):  # a run stopped at the cursor, continued by a fresh stream (a resumed run)
        first, resumed = PromptStream(records, seed=3), PromptStream(records, seed=3)
        assert [first[i].prompt for i in range(cursor)] + [resumed[i].prompt for i in range(cursor, 21)] == seq
    assert whole[2].prompt == seq[2] and whole[20].prompt == seq[20]  # random access, backwards too


def test_the_digest_changes_with_the_files_content_order_and_seed(tmp_path):
    rows = [{"prompt": f"q{i}", "ground_truth": str(i)} for i in range(5)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)

    def digest(seed: int = 0) -> str:
        return load_prompt_set(PromptConfig(files=[str(path)], seed=seed)).digest

    before = digest()
    write_jsonl(path, rows)
    assert digest() == before  # the same content, written again
    write_jsonl(path, rows[:4] + [{"prompt": "q4", "ground_truth": "44"}])
    changed = digest()
    assert changed != before
    write_jsonl(path, rows[::-1])
    assert digest() not in (before, changed)
    write_jsonl(path, rows)
    assert digest(seed=1) != before  # the stream's order follows the seed: a position means other prompts


# ---------------------------------------------------------------- rewards

@pytest.mark.parametrize("completion,truth,score", [
    ("so the total is\n#### 42", "42", 1.0),
    ("#### 42\nmore text", "The answer: #### 42", 1.0),
    ("#### 41", "42", 0.0),
    ("we get \\boxed{42} in the end", "42", 1.0),
    ("\\boxed{\\text{no}} then \\boxed{ 7 }", "7", 1.0),  # the last box
    ("the answer is 42.", "42", 1.0),  # its last number
    ("#### 1,234", "1234", 1.0),
    ("#### $1,234.00", "1234", 1.0),
    ("#### 0.5", "1/2", 1.0),
    ("#### 2/4", "0.5", 1.0),
    ("#### -3/6", "-0.5", 1.0),
    ("#### 1000000.0004", "1000000", 1.0),  # within the relative tolerance 1e-6
    ("#### 1000002", "1000000", 0.0),
    ("#### 0.0000001", "0", 0.0),  # zero is matched exactly
    ("#### 1/0", "1/0", 1.0),  # not a number: compared as text
    ("no answer at all", "3", 0.0),
    ("####", "3", 0.0),
])
def test_math_reads_hashes_boxes_and_last_numbers_with_tolerance_and_fractions(completion, truth, score):
    assert math_score("gsm8k", completion, truth) == score


def test_math_parses_and_never_evaluates_the_completion(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a reward evaluated text")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert math_score("", "#### 6*7", "42") == 0.0
    assert math_score("", "\\boxed{__import__('os').getpid()}", "1") == 0.0
    assert math_score("", "#### 42", "42") == 1.0
    assert parse_number("6*7") is None and parse_number("1e3") is None and parse_number(" 1,000. ") == 1000
    assert extract_answer("x #### 12 \n y") == "12" and extract_answer("none") is None


def test_exact_match_and_format_builtins():
    assert exact_match("", "  Paris \n", "Paris") == 1.0 and exact_match("", "paris", "Paris") == 0.0
    assert format_score("", "reasoning\n#### 12", "") == 1.0
    assert format_score("", "#### -1.5  ", "") == 1.0
    assert format_score("", "the \\boxed{x} answer", "") == 1.0
    assert format_score("", "#### 12\nand more", "") == 0.0 and format_score("", "12", "") == 0.0
    assert format_score("", "", "") == 0.0
    assert load_reward("math") is math_score and load_reward("format") is format_score
    with pytest.raises(ConfigError, match="reward.function='nope': a built-in"):
        build(RewardConfig, {"function": "nope"}, "reward")


USER_REWARD = '''
import time

import numpy as np

def compute_score(data_source, solution_str, ground_truth, extra_info):
    if ground_truth == "raise":
        raise ValueError(f"cannot score {solution_str!r}")
    if ground_truth == "sleep":
        time.sleep(120)
    if ground_truth == "numpy":
        return np.float32(0.5)
    right = solution_str.strip() == ground_truth
    return {"score": float(right), "source_is_mine": float(data_source == "mine"),
            "level": extra_info.get("level", -1), "note": "not a number: dropped"}
'''


@pytest.fixture
def user_reward(tmp_path, restore_imports):
    """A reward module in a folder of its own (not on sys.path): its name, unique per test, and the folder."""
    folder = tmp_path / "rewards"
    folder.mkdir()
    name = f"user_reward_{time.monotonic_ns()}"
    (folder / f"{name}.py").write_text(USER_REWARD)
    return name, str(folder)


def test_a_user_function_with_verls_signature_is_found_in_its_folder_and_may_return_a_dict(user_reward):
    name, folder = user_reward
    with pytest.raises(ValueError, match=f"cannot import '{name}'.*beside the spec"):
        load_reward(f"{name}:compute_score")
    runner = RewardRunner(RewardConfig(function=f"{name}:compute_score"), search=[folder])
    try:
        scores, extras = runner.score([("mine", " 4 ", "4", {"level": 2}), ("other", "5", "4", {}),
                                       ("mine", "x", "numpy", {})])
    finally:
        runner.close()
    assert scores == [1.0, 0.0, 0.5] and not runner.failures
    assert extras[0] == {"source_is_mine": 1.0, "level": 2.0} and extras[1] == {"source_is_mine": 0.0, "level": -1.0}
    with pytest.raises(ValueError, match=f"{name} has no function 'score'.*compute_score"):
        load_reward(f"{name}:score", [folder])


def test_a_module_installed_from_the_jobs_code_is_scored_in_the_reward_process(user_reward):
    """In a generator actor the reward module is not on any path: the job's code installed it from the driver's
    copy (runtime/rank_actor.py's install_modules), and the reward process must get it the same way."""
    from plait.runtime.rank_actor import install_modules

    name, folder = user_reward
    path = Path(folder) / f"{name}.py"
    install_modules({name: (str(path), path.read_text())})
    runner = RewardRunner(RewardConfig(function=f"{name}:compute_score"))  # no search folder: as rl_job makes it
    try:
        assert runner.score([("mine", "4", "4", {}), ("mine", "5", "4", {})])[0] == [1.0, 0.0]
    finally:
        runner.close()
    assert not runner.failures


def test_a_raising_or_hanging_sample_scores_on_error_is_counted_and_the_batch_goes_on(user_reward):
    name, folder = user_reward
    cfg = RewardConfig(function=f"{name}:compute_score", timeout_s=3.0, on_error=-1.0, max_error_share=0.5)
    runner = RewardRunner(cfg, search=[folder])
    samples = [("a", "1", "1", {}), ("b", "oops", "raise", {}), ("c", "zzz", "sleep", {}), ("d", "2", "2", {}),
               ("e", "3", "4", {})]
    try:
        scores, extras = runner.score(samples)
        assert scores == [1.0, -1.0, -1.0, 1.0, 0.0]
        assert extras[1] == extras[2] == {"reward_error": 1.0}
        failed = runner.failures
        assert [f.sample for f in failed] == [{"data_source": "b", "solution_str": "oops", "ground_truth": "raise"},
                                              {"data_source": "c", "solution_str": "zzz", "ground_truth": "sleep"}]
        assert failed[0].error == "ValueError: cannot score 'oops'"
        assert failed[1].error.startswith("TimeoutError: the reward took more than reward.timeout_s=3.0")
        assert runner.score([("f", "5", "5", {})])[0] == [1.0]  # a fresh process after the hung one was killed
        # more than max_error_share of a batch failing stops the job, naming the first failure
        with pytest.raises(RuntimeError, match=r"failed on 2 of 3 samples \(more than reward.max_error_share=0.5\); "
                                               r"the first: ValueError: cannot score 'x' on .*'ground_truth': 'raise'"):
            runner.score([("g", "x", "raise", {}), ("h", "y", "raise", {}), ("i", "1", "1", {})])
    finally:
        runner.close()


# ---------------------------------------------------------------- policy

def test_an_hf_folder_gives_its_tokenizer_eos_and_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    policy = Policy(PolicyConfig(path=str(tiny_llama)))
    tok, hf = policy.tokens(), AutoTokenizer.from_pretrained(tiny_llama)
    assert isinstance(tok, HFTokens) and policy.spec.name == "llama" and policy.weights == str(tiny_llama)
    assert tok.eos_id == hf.convert_tokens_to_ids("</s>") and tok.eos_id in tok.stop_ids
    assert tok.vocab_size <= policy.vocab_size and policy.max_positions == 256
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = "system: Be brief.\nuser: What is 2+2?\nassistant: "  # the folder's template, with the generation cue
    ids = tok.prompt_ids(chat)
    assert all(isinstance(i, int) for i in ids) and ids == hf(rendered, add_special_tokens=True)["input_ids"]
    assert tok.prompt_ids("What is 2+2?") == hf("What is 2+2?", add_special_tokens=True)["input_ids"]  # text as is
    as_chat = HFTokens(tiny_llama, apply_to_text=True)
    assert as_chat.prompt_ids("What is 2+2?") == hf("user: What is 2+2?\nassistant: ")["input_ids"]
    plain = HFTokens(tiny_llama, chat_template=False)  # the messages' text in order, no template
    assert plain.prompt_ids(chat) == hf("Be brief.What is 2+2?", add_special_tokens=True)["input_ids"]
    assert tok.answer_ids("42") == hf("42", add_special_tokens=False)["input_ids"] + [tok.eos_id]


def test_completions_end_at_eos_and_at_stop_strings(tiny_llama):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama)
    tok = HFTokens(tiny_llama, stop=["\n\n", "###"])
    encode = lambda text: hf(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tok.decode(encode("x = 42\n\nprint(x)")) == "x = 42"
    assert tok.decode(encode("a ### b\n\nc")) == "a "  # the first stop string in the text
    assert tok.decode(encode("def f") + [tok.eos_id] + encode("junk")) == "def f"
    assert HFTokens(tiny_llama).decode(encode("x = 42\n\nprint(x)")) == "x = 42\n\nprint(x)"
    assert cut_at_stop("one END two STOP", ["STOP", "END"]) == "one " and cut_at_stop("text", []) == "text"
    assert cut_at_stop("", ["x"]) == "" and cut_at_stop("xy", ["x"]) == ""


def test_without_a_path_the_policy_is_plaits_gpt_with_the_character_tokenizer(tmp_path):
    policy = Policy(PolicyConfig(stop=["="]))
    tok, chars = policy.tokens(), CharTokenizer()
    assert isinstance(tok, CharTokens) and policy.spec.name == "gpt" and policy.weights is None
    assert tok.vocab_size == chars.vocab_size == policy.vocab_size and tok.stop_ids == (chars.eos_id,)
    assert tok.prompt_ids("3+4=") == chars.encode("3+4=", bos=True)
    assert tok.prompt_ids([{"role": "user", "content": "3+"}, {"role": "user", "content": "4="}]) == \
        chars.encode("3+4=", bos=True)
    assert tok.decode(chars.encode("12=3") + [chars.eos_id] + chars.encode("9")) == "12"
    assert tok.answer_ids("7") == chars.encode("7", eos=True)
    with pytest.raises(ConfigError, match="has no config.json: point it at a local Hugging Face model folder"):
        Policy(PolicyConfig(path=str(tmp_path)))


# ---------------------------------------------------------------- what a user watches

def test_answer_diversity_by_hand():
    figures = diversity(["4", " 4 ", "5", "", "  "])  # answers 4 (twice), 5, and the empty one (twice)
    assert figures["distinct_answers"] == 3.0 and figures["empty_share"] == 0.4
    assert figures["answer_entropy"] == pytest.approx(-(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2)))
    assert diversity(["a", "a"]) == {"distinct_answers": 1.0, "answer_entropy": 0.0, "empty_share": 0.0}
    assert diversity([]) == {"distinct_answers": 0.0, "answer_entropy": 0.0, "empty_share": 0.0}


def item(texts: list[str], prompts: list[str], group_size: int = 2, version: int = 0) -> SimpleNamespace:
    """What RunWatch reads of a RolloutBatch."""
    n = len(texts)
    return SimpleNamespace(texts=texts, prompt_texts=prompts, group_size=group_size, version=version,
                           rewards=torch.arange(n, dtype=torch.float32) / 10, finished=torch.ones(n, dtype=torch.bool))


def test_the_collapse_warning_fires_after_the_window_of_one_answer_and_not_before(tmp_path, capsys):
    watch = RunWatch(tmp_path, None, RLConfig(collapse_window=3, log_completions_every=0))
    said = lambda: capsys.readouterr().out.count("collapsed")  # noqa: E731
    for version, texts in enumerate([["7", "7"], ["7", "8"], ["7", "7 "], ["7", "7"], ["9", "9"], ["9", "9"]], 1):
        watch.step(version, [item(texts, ["p"])])
        assert said() == 0 and not watch.warned, version  # never three versions in a row of one answer
    watch.step(7, [item(["9"], ["p"], 1), item(["9"], ["q"], 1)])  # one answer over the whole batch, third time
    out = capsys.readouterr().out
    assert watch.warned and "the one answer '9' to every prompt for 3 versions (version 7)" in out
    for version in (8, 9, 10):
        watch.step(version, [item(["9", "9"], ["p"])])
    assert said() == 0  # said once
    empty = RunWatch(tmp_path, None, RLConfig(collapse_window=2, log_completions_every=0))
    for version in (1, 2):
        empty.step(version, [item(["", " "], ["p"])])
    assert "the empty answer" in capsys.readouterr().out


def test_completions_are_logged_every_n_versions_with_prompt_completion_and_reward(tmp_path):
    watch = RunWatch(tmp_path, SimpleNamespace(tb=None), RLConfig(log_completions_every=2, log_completions=3,
                                                                  collapse_window=0))
    batch = [item(["a", "b", "c", "d"], ["What is 1+1?", "user: hi"], version=4)]
    assert watch.step(5, batch)["distinct_answers"] == 4.0
    assert not (tmp_path / "completions.jsonl").exists()  # version 5 is not a multiple of 2
    watch.step(6, batch)
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert rows == [
        {"version": 6, "made_by": 4, "prompt": "What is 1+1?", "completion": "a", "reward": 0.0, "finished": True},
        {"version": 6, "made_by": 4, "prompt": "What is 1+1?", "completion": "b", "reward": pytest.approx(0.1),
         "finished": True},
        {"version": 6, "made_by": 4, "prompt": "user: hi", "completion": "c", "reward": pytest.approx(0.2),
         "finished": True},
    ]


# ---------------------------------------------------------------- the whole job, with all three brought

SPEC = """
job = "plait.rl.rl_job"
run_dir = {run_dir}

[cluster]
num_cpus = 4

[workers]
num = 1
cpus_per_worker = 1

[model]
path = {model}
chat_template = true

[prompts]
files = [{train}]
eval_files = [{test}]
eval_every = 2
eval_size = 4

[reward]
function = "e2e_reward_mod:compute_score"
timeout_s = 30.0
on_error = 0.0
max_error_share = 0.5

[generation]
group_size = 2
prompts_per_call = 4
max_new_tokens = 4

[rl]
generators = 1
eta = 1
batch_prompts = 4
log_completions_every = 1
log_completions = 8
wait_timeout_s = 300.0

[train]
steps = 4
warm_start_steps = 0
checkpoint_every = 0
max_step_kl = 0.0

[train.optim]
lr = 1e-3
warmup_steps = 0
"""

E2E_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info):
    if ground_truth == "13":
        raise ValueError("no score for 13")
    return {"score": float(solution_str.strip() == ground_truth), "chars": len(solution_str)}
'''


def train_rows() -> list[dict]:
    """Eight prompts, text and chat messages; the one whose answer is 13 makes the reward raise."""
    rows = [{"prompt": f"What is {a} plus {b}?", "ground_truth": str(a + b), "data_source": "sums"}
            for a, b in [(1, 2), (2, 5), (4, 4), (6, 7), (3, 3), (9, 1)]]
    rows += [{"prompt": [{"role": "system", "content": "Answer with a number."},
                         {"role": "user", "content": f"What is {a} times {b}?"}], "ground_truth": str(a * b),
              "data_source": "products"} for a, b in [(2, 3), (4, 5)]]
    return rows


def write_job(tmp_path: Path, model: Path, train: list[dict]) -> Path:
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"What is {a} minus {b}?", "ground_truth": str(a - b)}
                                          for a, b in [(9, 2), (8, 8), (7, 1), (5, 3)]])
    (tmp_path / "e2e_reward_mod.py").write_text(E2E_REWARD)
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(run_dir=json.dumps(str(tmp_path / "run")), model=json.dumps(str(model)),
                                train=json.dumps(str(tmp_path / "train.jsonl")),
                                test=json.dumps(str(tmp_path / "test.jsonl"))))
    return spec


@pytest.mark.slow
def test_an_hf_policy_with_prompt_files_and_a_reward_module_trains_evaluates_and_refuses_other_prompts(
        ray_cluster, tmp_path, tiny_llama, restore_imports, capsys):
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    spec = write_job(tmp_path, tiny_llama, train_rows())
    summary = run_job(load_spec(spec))
    run = tmp_path / "run"
    assert summary["version"] == 4 and summary["steps_run"] == 4 and summary["checkpoint"].endswith("step_00000004")
    # held-out scoring: version 0 before training, every 2 versions, and the final weights
    versions = [e["version"] for e in summary["evals"]]
    assert versions[0] == 0 and versions[-1] == 4 and set(versions) <= {0, 2, 4} and versions == sorted(versions)
    assert all(0.0 <= e["eval_pass_at_1"] <= 1.0 for e in summary["evals"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_pass_at_1" in r]
    assert [r["step"] for r in evals] == versions and all(0.0 <= r["eval_pass_at_1"] <= 1.0 for r in evals)
    # the raising sample was counted and the job went on
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and sum(r["reward_errors"] for r in steps) > 0
    # the dict reward's extra number ("chars", the completion's length) is logged as its mean over the samples
    assert all(r["reward_chars"] >= 0 for r in steps) and any(r["reward_chars"] > 0 for r in steps)
    assert all("eval_reward_chars" in r for r in evals)
    assert "reward.function failed on a sample (ValueError: no score for 13)" in capsys.readouterr().out
    # what the user watches: completions of the prompts in the file
    shown = {r if isinstance(r, str) else "\n".join(f"{m['role']}: {m['content']}" for m in r)
             for r in (row["prompt"] for row in train_rows())}
    logged = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert logged and {row["prompt"] for row in logged} <= shown
    assert any(row["prompt"].startswith("system: Answer with a number.\nuser: What is") for row in logged)  # chat
    assert all(set(row) >= {"prompt", "completion", "reward"} for row in logged)

    # a resume with changed prompts is refused: its stream position would mean other prompts
    changed = train_rows()
    changed[0]["ground_truth"] = "4"
    write_job(tmp_path, tiny_llama, changed)
    with pytest.raises(ValueError, match=r"was trained on other prompts \(digest .*\): its stream position would "
                                         r"mean other prompts"):
        run_job(load_spec(spec, ["train.resume=latest", "train.steps=6"]))
    assert (run / "checkpoints" / "step_00000004").is_dir()  # the run it refused to continue is intact


def test_a_prompt_file_without_the_answer_column_fails_on_the_driver_before_anything_starts(tmp_path, capsys,
                                                                                          restore_imports):
    from plait.runtime.cli import main
    from plait.runtime.job import run_job
    from plait.runtime.spec import load_spec

    spec = tmp_path / "spec.toml"
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    spec.write_text(f'job = "plait.rl.rl_job"\nrun_dir = {json.dumps(str(tmp_path / "run"))}\n'
                    f'[prompts]\nfiles = [{json.dumps(str(tmp_path / "train.jsonl"))}]\n'
                    '[workers]\nnum = 1\n[reward]\nfunction = "exact_match"\n')
    with pytest.raises(PromptDataError, match=r"train.jsonl has no column 'ground_truth' \(it has \['answer', "
                                              r"'prompt'\]\)"):
        run_job(load_spec(spec))
    assert not (tmp_path / "run").exists()  # refused before the run directory, the cluster or any actor
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "has no column 'ground_truth'" in err and "answer_column" in err
