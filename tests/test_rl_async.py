"""Asynchronous RL: the staleness queue (pure logic), weight names and publication, and whole control jobs on
real Ray: bounded staleness under a slow trainer, eta = 0 exactly synchronous, a generator killed with
SIGKILL mid-run, a run resumed from its checkpoint, and reward rising above chance on digit_sum."""

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from plait.models.gpt import GPT, GPTConfig
from plait.parallel.activation_checkpoint import apply_activation_checkpointing
from plait.parallel.parallelize import clean_fqn, unsharded_parameters
from plait.rl.generator import RolloutBatch
from plait.rl.staleness import StalenessQueue
from plait.rl.trainer import collate, scramble
from plait.rl.weights import WeightStore, load_weights
from plait.runtime.faults import ENV
from plait.runtime.job import run_job
from plait.runtime.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


class Item:
    def __init__(self, uid: int, version: int, prompts: int = 1):
        self.uid, self.version, self.prompts = uid, version, prompts


# ---------------------------------------------------------------- the queue, without Ray

def test_eta_zero_issues_nothing_while_a_step_trains_and_trains_only_current_versions():
    q = StalenessQueue(eta=0, batch_prompts=2)
    for uid in (0, 1):
        assert q.may_issue(1)
        q.issued(uid, 1)
    assert not q.may_issue(1)  # one batch outstanding: a generator waits for the new version
    assert q.put(Item(1, 0)) and q.take(0) is None  # half a batch: the trainer waits
    assert q.put(Item(0, 0))
    batch = q.take(0)
    assert [it.uid for it in batch.items] == [0, 1] and batch.staleness == {0: 2}
    assert not q.may_issue(1)  # training: still nothing may start with the old weights
    q.step_done()
    assert q.may_issue(1) and q.may_issue(2) and not q.may_issue(3)


def test_take_drops_what_is_older_than_eta_and_serves_oldest_first():
    q = StalenessQueue(eta=1, batch_prompts=2, capacity=10)
    for uid, version in [(0, 0), (1, 2), (2, 1), (3, 2), (4, 2)]:
        q.issued(uid, 1)
        q.put(Item(uid, version))
    batch = q.take(2)
    assert [it.uid for it in batch.items] == [2, 1]  # version 1 first, then the lowest uid of version 2
    assert [r.uid for r in q.dropped] == [0] and batch.staleness == {1: 1, 0: 1}  # 2 - 0 > eta: never trained
    with pytest.raises(RuntimeError, match="step_done"):
        q.take(2)


def test_a_uid_is_queued_once_and_lost_work_can_be_issued_again():
    q = StalenessQueue(eta=1, batch_prompts=1)
    q.issued(7, 1)
    q.lost(7)  # its generator died
    assert q.outstanding == 0
    q.issued(7, 1)  # issued again under the same uid
    assert q.put(Item(7, 0)) and not q.put(Item(7, 0)) and q.duplicates == 1
    assert not q.put(Item(8, 0)) and q.duplicates == 2  # never issued
    with pytest.raises(ValueError, match="uid 7 was issued already"):
        q.issued(7, 1)
    with pytest.raises(ValueError, match="eta=-1"):
        StalenessQueue(eta=-1, batch_prompts=1)


@pytest.mark.parametrize("eta,depth", [(0, 1), (1, 1), (3, 1), (0, 2), (1, 2), (3, 2)])
def test_simulated_fast_generators_and_slow_trainer_never_train_past_eta(eta, depth):
    """``depth`` steps may be queued at the trainer (rl.trainer_queue): the batch for the step after those in
    flight is taken at the version it will train at."""
    rng = random.Random(eta)
    q = StalenessQueue(eta=eta, batch_prompts=4)
    version, uid, running, trained, queued = 0, 0, [], [], []
    while version < 40:
        while q.may_issue(1) and len(running) < 6:  # six generators, finishing in random order
            q.issued(uid, 1)
            running.append(Item(uid, version))
            uid += 1
        rng.shuffle(running)
        for item in running[: rng.randint(0, len(running))]:
            q.put(item)
        running = [r for r in running if r.uid not in q.seen]
        while len(queued) < depth and version + len(queued) < 40:
            batch = q.take(version + len(queued))
            if batch is None:
                break
            queued.append(batch)
        if queued and rng.random() < 0.5:  # the oldest queued step finishes
            batch = queued.pop(0)
            assert batch.version == version
            trained += [(it.uid, version - it.version) for it in batch.items]
            version += 1
            q.step_done()
    assert all(0 <= s <= eta for _, s in trained)
    assert len({u for u, _ in trained}) == len(trained) == 160
    if eta:
        assert max(s for _, s in trained) >= 1  # the generators did run ahead
    else:
        assert not q.dropped


# ---------------------------------------------------------------- weights and batches

def test_published_weights_have_the_unwrapped_names_and_load_into_a_plain_gpt():
    cfg = GPTConfig(vocab_size=54, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    torch.manual_seed(0)
    trained = GPT(cfg)
    apply_activation_checkpointing(trained, "full")
    assert any("_checkpoint_wrapped_module" in n for n, _ in trained.named_parameters())
    params = unsharded_parameters([trained])
    plain = GPT(cfg)
    assert list(params) == [n for n, _ in plain.named_parameters()]
    load_weights(plain, params)
    tokens = torch.randint(3, 54, (2, 8))
    assert torch.equal(plain(tokens), trained(tokens))
    assert clean_fqn("module.layers.0._checkpoint_wrapped_module._orig_mod.wq.weight") == "layers.0.wq.weight"
    with pytest.raises(ValueError, match=r"missing \['layers.1"):
        load_weights(GPT(cfg), {k: v for k, v in params.items() if not k.startswith("layers.1")})
    store = WeightStore()
    with pytest.raises(RuntimeError, match="no weights published"):
        store.version  # noqa: B018


def test_collate_pads_computes_group_advantages_and_splits_rows_over_ranks():
    def item(uid, rewards, width):
        n = len(rewards)
        return RolloutBatch(uid, [uid], 0, [0], torch.ones(n, width, dtype=torch.long),
                            torch.zeros(n, width, dtype=torch.bool).index_fill_(1, torch.tensor([width - 1]), True),
                            torch.zeros(n, width), torch.tensor(rewards), 2, n, 0.0, 0.0, 0)

    parts = collate([item(0, [1.0, 0.0], 4), item(1, [0.0, 0.0], 6)], dp=2)
    assert [p[0]["tokens"].shape for p in parts] == [(2, 6), (2, 6)]
    adv = torch.cat([p[0]["advantages"] for p in parts])
    assert adv[0] > 0 > adv[1] and adv[2:].abs().max() == 0  # a group with one reward has no signal
    assert [p[0]["denominator"] for p in parts] == [2.0, 2.0]  # 4 completion tokens / 2 ranks
    with pytest.raises(ValueError, match="do not split over 3"):
        collate([item(0, [1.0, 0.0], 4)], dp=3)
    assert len(scramble("123", random.Random(0))) == 3 and scramble("a+b", random.Random(0))[1] == "+"


# ---------------------------------------------------------------- control jobs on Ray

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "generation.group_size=4",
        "generation.prompts_per_call=2", "rl.batch_prompts=4", "rl.generators=2", "train.warm_start_steps=2",
        "train.warm_start_batch=8"]


def run(tmp_path: Path, *overrides: str, faults: str = "") -> dict:
    """The example with TINY and ``overrides``; ``faults`` goes to PLAIT_FAULTS (runtime/faults.py), which the
    driver forwards to the trainer and generators, for this run only."""
    before = os.environ.get(ENV)
    os.environ[ENV] = faults
    try:
        return run_job(load_spec(ROOT / "examples" / "rl_digit_sum.toml",
                                 [f"run_dir={tmp_path / 'run'}", *TINY, *overrides]))
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def slow(seconds: float) -> str:
    return f"sleep@step,seconds={seconds}"  # a slow trainer: every step takes ``seconds`` longer


@pytest.mark.slow
def test_slow_trainer_fast_generators_stay_within_eta_and_eta_zero_is_synchronous(ray_cluster, tmp_path):
    async_run = run(tmp_path / "a", "rl.eta=1", "train.steps=5", "generation.interrupt=true", faults=slow(0.4))
    stale = [at - made for _, made, at in async_run["trained"]]
    assert max(stale) == 1 and min(stale) >= 0  # the generators ran ahead, never more than eta
    assert async_run["most_steps_queued"] == 2  # rl.trainer_queue: the next batch waited at the trainer
    assert async_run["version"] == 5 and async_run["samples_trained"] == 5 * 4 * 4
    sync_run = run(tmp_path / "s", "rl.eta=0", "train.steps=4", faults=slow(0.4))
    assert [made for _, made, _ in sync_run["trained"]] == [at for _, _, at in sync_run["trained"]]
    assert sorted({at for _, _, at in sync_run["trained"]}) == [0, 1, 2, 3] and not sync_run["dropped"]
    assert sync_run["staleness"] == {0: 8}  # 4 steps x 2 work items, every one made by the trainer's weights
    assert sync_run["most_steps_queued"] == 1  # eta = 0: the next batch cannot exist before the new version


@pytest.mark.slow
def test_a_killed_generator_is_replaced_and_a_killed_job_resumes_from_its_weight_version(ray_cluster, tmp_path):
    first = run(tmp_path, "rl.eta=1", "train.steps=4", faults="kill@version=1,attempt=0; " + slow(0.2))
    assert sum(first["generator_restarts"]) == 1 and first["lost_works"] >= 1
    uids = [uid for uid, _, _ in first["trained"]]
    assert len(uids) == len(set(uids)) and first["duplicates"] == 0  # nothing trained twice
    assert first["samples_trained"] == 4 * 4 * 4  # every step got its full batch: nothing lost from the count
    assert first["version"] == 4 and first["checkpoint"].endswith("step_00000004")
    resumed = run(tmp_path, "rl.eta=1", "train.steps=6", "train.resume=latest")
    assert resumed["start_version"] == 4 and resumed["version"] == 6 and resumed["steps_run"] == 2
    assert min(uid for uid, _, _ in resumed["trained"]) >= first["issued_uids"]  # the queue position carried on
    assert min(at for _, _, at in resumed["trained"]) == 4  # training carried on from the saved version
    assert resumed["checkpoint"].endswith("step_00000006")


@pytest.mark.slow
def test_a_trainer_killed_mid_run_restarts_from_its_last_checkpoint_and_carries_on(ray_cluster, tmp_path):
    """SIGKILL of the trainer rank's process from outside, once checkpoint 2 has committed: the runtime
    restarts the control job (workers.max_restarts=1), the new trainer loads the newest committed checkpoint
    and the run finishes at train.steps, with every step's samples trained once."""
    run_dir, killed = tmp_path / "run", {}

    def kill_after_a_checkpoint():
        marker, ckpts = run_dir / "trainer.pid", run_dir / "checkpoints"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            committed = sorted(ckpts.glob("step_*/meta.json")) if ckpts.is_dir() else []
            if committed and marker.is_file() and marker.read_text().split()[0] == "0":
                killed["pid"] = int(marker.read_text().split()[1])
                os.kill(killed["pid"], signal.SIGKILL)
                killed["committed"] = [int(p.parent.name.split("_")[1]) for p in committed]
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    watcher.start()
    steps, per_step = 8, 4 * 4  # batch_prompts x group_size samples per version
    summary = run(tmp_path, "rl.eta=1", f"train.steps={steps}", "train.checkpoint_every=2", "workers.max_restarts=1",
                  faults="pidfile@start,rank=0,path=trainer.pid; " + slow(0.3))
    watcher.join(timeout=5)
    assert killed, "the trainer was never killed: no checkpoint committed while it ran"
    assert summary["restarts"] == 1 and summary["attempt"] == 1
    start, position = summary["start_version"], summary["start_position"]
    assert start > 0 and start % 2 == 0 and start >= max(killed["committed"])  # the newest committed checkpoint
    assert summary["version"] == steps and summary["checkpoint"].endswith(f"step_{steps:08d}")
    assert min(at for _, _, at in summary["trained"]) == start  # the first step after the restart is start + 1
    # sample accounting against the checkpoint's position: nothing trained twice, nothing lost from the count
    assert position["samples_trained"] == start * per_step
    assert position["samples_trained"] + summary["samples_trained"] == steps * per_step
    done_before = set(range(position["cursor"])) - {i for ids in position["pending"] for i in ids}
    after = summary["trained_tasks"]
    assert len(after) == len(set(after)) == (steps - start) * 4 and not done_before & set(after)
    assert min(uid for uid, _, _ in summary["trained"]) >= position["next_uid"]  # new uids after the restart
    assert summary["duplicates"] == 0


@pytest.mark.slow
def test_broadcast_weight_sync_trains_exactly_like_the_object_store_at_eta_zero(ray_cluster, tmp_path):
    """eta = 0 is deterministic (batches by version then uid, sampling seeded by uid): the generators must hold
    bit-identical weights under both syncs for the rewards and losses to agree step for step."""
    runs = {how: run(tmp_path / how, "rl.eta=0", "train.steps=3", f"rl.weight_sync={how}")
            for how in ("object_store", "broadcast")}
    store, bcast = runs["object_store"], runs["broadcast"]
    assert bcast["weight_sync"] == "broadcast" and bcast["version"] == 3 and bcast["staleness"] == {0: 6}
    assert bcast["sync_rounds"] == 3 and bcast["sync_rounds_failed"] == 0  # versions 0..2 (3 is final), one each
    assert bcast["rewards"] == store["rewards"] and bcast["losses"] == store["losses"]
    assert bcast["trained"] == store["trained"]


@pytest.mark.slow
def test_reward_rises_above_chance_on_digit_sum_and_the_stop_token_survives(ray_cluster, tmp_path):
    # The example as it is: eta = 2, batches follow arrival timing, so the run differs each time. Without the
    # trust region (train.max_step_kl = 0) 3 of 12 seeds collapsed into answering nothing; with it all 12 learned.
    summary = run_job(load_spec(ROOT / "examples" / "rl_digit_sum.toml",
                                [f"run_dir={tmp_path / 'run'}", "train.steps=300"]))
    assert summary["eta"] == 2 and 1 <= max(summary["staleness"]) <= 2  # trained asynchronously, within eta
    rewards, stops = summary["rewards"], summary["stop_rates"]
    early, late = sum(rewards[:20]) / 20, sum(rewards[-60:]) / 60
    assert early < 0.2 and late > 0.18 and late > early + 0.06, (early, late)
    assert sum(stops[-100:]) / 100 > 0.9, stops[-100:]  # still answering and stopping, no collapse
    assert Path(summary["plot"]).is_file()
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(s["step_kl"] for s in steps) <= 0.05  # every kept step inside the trust region


def test_an_interrupted_generation_continues_with_the_new_weights_and_keeps_each_tokens_logprob(ray_cluster):
    from plait.rl.generate import sequence_logprobs
    from plait.rl.generator import GenerationConfig, Generator, Work
    from plait.rl.tasks import make_tasks
    from plait.rl.weights import publish

    cfg = GPTConfig(vocab_size=54, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)
    old, new = (GPT(cfg).eval() for _ in range(2))
    for model, seed in ((old, 1), (new, 2)):
        model.init_weights(seed)
    gen = Generator(cfg, GenerationConfig(group_size=4, prompts_per_call=1, max_new_tokens=5, interrupt=True), 0, 0)
    gen.notify(publish(dict(new.named_parameters()), 1))  # version 1 is out before version 0's generation starts
    out = gen.generate(Work(0, [0], make_tasks("digit_sum", 1), 5), publish(dict(old.named_parameters()), 0))
    assert out.interrupted == 1 and out.versions == [0, 1] and out.version == 0  # staleness counts from the oldest
    first = out.mask.float().argmax(1)  # each row's first completion token: sampled by version 0
    rows = torch.arange(out.tokens.shape[0])
    with torch.no_grad():
        by_old = sequence_logprobs(old, out.tokens, out.mask)
        by_new = sequence_logprobs(new, out.tokens, out.mask)
    assert torch.allclose(out.behaviour_logprobs[rows, first], by_old[rows, first], atol=1e-5)
    later = out.mask.clone()
    later[rows, first] = False
    assert later.any() and torch.allclose(out.behaviour_logprobs[later], by_new[later], atol=1e-5)


@pytest.mark.slow
def test_a_two_rank_fsdp2_trainer_publishes_full_weights_the_generators_load(ray_cluster, tmp_path):
    summary = run(tmp_path, "rl.eta=0", "train.steps=3", "workers.num=2", "plan.dp=2", "plan.engine=fsdp2",
                  "train.loss=decoupled_ppo")
    assert summary["version"] == 3 and summary["staleness"] == {0: 6}
    assert sorted({made for _, made, _ in summary["trained"]}) == [0, 1, 2]  # versions 1, 2 came from FSDP2 shards
    # The trust region over FSDP2 shards, its KL summed over both ranks: a bound no step can meet undoes every
    # step, so every version is the initial policy and even stale rollouts see no policy change.
    frozen = run(tmp_path / "frozen", "rl.eta=1", "train.steps=4", "workers.num=2", "plan.dp=2", "plan.engine=fsdp2",
                 "train.max_step_kl=1e-9", "train.max_backtracks=1", faults=slow(0.3))
    rows = [json.loads(line) for line in (tmp_path / "frozen" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(frozen["staleness"]) == 1 and [r["updated"] for r in rows] == [0.0] * 4
    assert all(abs(r["behaviour_kl"]) < 1e-5 and abs(r["is_weight"] - 1) < 1e-5 for r in rows), rows
