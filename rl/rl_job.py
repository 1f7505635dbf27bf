"""Asynchronous RL post-training as a control job: ``job = "plait.rl.rl_job"`` (examples/rl_digit_sum.toml).

On the driver, ``control`` drives a trainer worker group (the spec's ``[workers]``: one rank, or data
parallelism under ``[plan]``) and ``rl.generators`` generator actors (an ActorPool outside the trainer's
process group):

  - every idle generator gets the next work item (``generation.prompts_per_call`` tasks of the stream, each
    sampled ``group_size`` times) with the newest published weights, as long as the staleness queue admits
    it (``plait.rl.staleness``: at most ``(eta + 1) * batch_prompts`` prompts outstanding);
  - finished rollouts go into the queue; whenever the trainer has fewer than ``rl.trainer_queue`` steps (2)
    and ``batch_prompts`` prompts fresh enough for the version the next step will run at are queued, that
    step is handed to the trainer (so a batch already waits there when a step ends, instead of a round trip
    through the driver); rollouts older than ``eta`` versions are dropped, never trained. No step is queued
    behind one whose version is checkpointed, so a checkpoint never runs ahead of the controller's position;
  - each step publishes version k + 1 once (object store) and generators pick it up with their next work
    (or mid-generation with ``generation.interrupt``); with ``rl.weight_sync = "broadcast"`` the driver
    instead issues no work to a generator behind the newest version, and once every generator is idle runs
    a sync round: trainer rank 0 broadcasts the version over a standalone gloo group with the generators
    (``plait.rl.weight_broadcast``; a replaced generator or a failed round starts a new group epoch);
  - a generator whose process dies is replaced, and its lost work is issued again under the same uid
    (the queue refuses a uid twice, so no sample is trained twice or lost from the count).

``rl.eta = 0`` is the synchronous baseline through the same loop. Checkpoints (every
``train.checkpoint_every`` versions and at the end) hold the policy, the optimizer, the weight version and
the controller's position (task cursor, work not yet trained, next uid); ``train.resume = "latest"``
continues from them. Metrics per version: reward, staleness_<s> (prompts trained at staleness s),
dropped, samples_per_s, gen_idle_share, trainer_idle_share (shares of the loop's wall time without work in
flight), completion_len, stop_rate (share of completions that emitted the stop token), the loss statistics,
weight_sync_bytes (what one version's sync carries: under ``[train.lora]`` the adapters only) and wall_s
(seconds since the loop started).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import ray
from plait.parallel.mesh import Layout
from plait.rl.generator import Generator, RolloutBatch, Work, as_prompt
from plait.rl.observe import RunWatch, diversity
from plait.rl.prompts import PromptSet, PromptStream, load_prompt_set
from plait.rl.rewards import reward_code
from plait.rl.rl_config import WEIGHT_SYNC, Config, RLConfig, TaskConfig, validate  # noqa: F401 (the job's spec)
from plait.rl.staleness import StalenessQueue
from plait.rl.tasks import make_tasks
from plait.rl.trainer import Trainer, collate
from plait.rl.weight_broadcast import sync_round
from plait.rl.weights import WeightStore
from plait.runtime.actor_pool import ActorLost
from plait.runtime.faults import active_faults, inject
from plait.runtime.metrics import MetricsLogger


class TaskStream:
    """Task i of the run's stream as a prompt record (rl.tasks: task i depends only on name, seed and i)."""

    def __init__(self, cfg: TaskConfig):
        self.cfg, self.tasks = cfg, []

    def __getitem__(self, i: int):
        if i >= len(self.tasks):
            self.tasks = make_tasks(self.cfg.name, max(2 * len(self.tasks), i + 1024), self.cfg.seed,
                                    **self.cfg.options)
        return as_prompt(self.tasks[i])


def prompt_source(cfg: Config) -> tuple[object, list, str]:
    """(the training stream, the held-out records, a digest of what the stream is): your files, or the task."""
    if cfg.prompts.files:
        prompts: PromptSet = load_prompt_set(cfg.prompts)
        return PromptStream(prompts.train, cfg.prompts.seed), prompts.held_out, prompts.digest
    held = [as_prompt(t) for t in make_tasks(cfg.task.name, cfg.prompts.eval_size, cfg.task.seed + 104729,
                                             **cfg.task.options)]  # another seed: prompts the stream rarely repeats
    task = cfg.task
    return TaskStream(task), held, f"task:{task.name}:{task.seed}:{sorted(task.options.items())}"


def rank_args(per_dp: list, plan) -> list:
    """The per-rank arguments of a step: each rank gets its data-parallel coordinate's rows (tp ranks share)."""
    layout = Layout.of(plan)
    return [per_dp[layout.coordinates(r)["dp"]] for r in range(layout.world_size)]


@dataclass(frozen=True)
class EvalTag:
    version: int


@dataclass
class Position:
    """The controller's place in the task stream (checkpointed with the weights)."""

    cursor: int = 0  # next fresh task id
    next_uid: int = 0
    pending: list[list[int]] = field(default_factory=list)  # task ids of work issued but never trained
    samples_trained: int = 0

    @classmethod
    def of(cls, meta: dict) -> Position:
        return cls(**{k: meta[k] for k in ("cursor", "next_uid", "pending", "samples_trained") if k in meta})


def check_resume(cfg: Config, meta: dict) -> None:
    """On the driver, before anything starts (runtime/job.py): the checkpoint was trained on these prompts (its
    stream position means other prompts otherwise)."""
    saved = meta.get("prompts_digest")
    if saved is None:
        return
    digest = prompt_source(cfg)[2]
    if saved != digest:
        raise ValueError(f"the checkpoint was trained on other prompts (digest {saved}, these are {digest}): its "
                         "stream position would mean other prompts. Resume with the prompts (files, columns, "
                         "held-out split, prompts.seed) it was started with, or start a new run")


def control(job, cfg: Config, generator_cls: type = Generator, trainer_cls: type = Trainer,
            generator_args: tuple = ()) -> dict:
    """The controller (module docstring). ``generator_cls`` / ``trainer_cls``: the roles' classes, Generator and
    Trainer (``generator_args`` go to each generator after its reward config); bench/rl_sim.py passes subclasses
    whose work is a time model, driven through this same loop."""
    gen, rl, train = cfg.generation, cfg.rl, cfg.train
    started = time.monotonic()
    stream, held_out, digest = prompt_source(cfg)
    trainer = job.worker_group()
    trainer.start(trainer_cls, cfg)
    hello = trainer.call("hello")[0]
    if hello["meta"].get("prompts_digest", digest) != digest:
        raise ValueError(f"the checkpoint {job.resume_from} was trained on other prompts (digest "
                         f"{hello['meta']['prompts_digest']}, these are {digest}): its stream position would mean "
                         "other prompts. Resume with the prompts it was started with, or start a new run")
    store = WeightStore()
    store.update(hello["published"])
    start_version = version = hello["version"]
    pos = Position.of(hello["meta"])
    retry: deque[Work] = deque()  # lost work, issued again first
    pending = deque(pos.pending)  # a resumed run's untrained work, issued first under new uids
    job.code.update(reward_code(cfg.reward.function))  # your reward module goes to the generators with the job
    lora = {"lora": train.lora} if train.lora.rank else {}  # the generators build the trainer's adapted model
    pool = job.actor_pool(generator_cls, rl.generators, args=(cfg.model, gen, train.seed), kwargs=lora,
                          per_actor_args=[(i, cfg.reward, *generator_args) for i in range(rl.generators)],
                          cpus=rl.generator_cpus,
                          name="generator", max_restarts=rl.max_generator_restarts,
                          max_concurrency=2 if gen.interrupt else 1)
    queue = StalenessQueue(rl.eta, rl.batch_prompts, rl.capacity)
    metrics = MetricsLogger(job.run_dir, enabled=True, total_steps=train.steps, start_step=version,
                            progress="lines", desc="rl")
    watch = RunWatch(job.run_dir, metrics, rl)
    held_prompts = held_out[:cfg.prompts.eval_size]
    evals, eval_due = [], {version} if cfg.prompts.eval_every and held_prompts else set()  # versions to score
    t0 = time.monotonic()  # the loop's clock: shares and rates are over the loop, not the start-up
    cpu0 = time.process_time()  # the driver's own CPU over the loop (all its threads): the controller's cost
    busy, since = [0.0] * rl.generators, [0.0] * rl.generators
    steps: deque[tuple[list, object, float]] = deque()  # (refs, batch, submitted at) at the trainer, oldest first
    trainer_busy, trainer_free_at, most_queued = 0.0, t0, 0
    history, trained, lost_works, killed, made = [], [], 0, False, 0
    trained_tasks: list[int] = []  # task ids trained by this attempt, in order
    gen_compute, train_compute = 0.0, 0.0
    broadcast = rl.weight_sync == "broadcast"
    faults = active_faults()  # tests: PLAIT_FAULTS="kill@version=N,attempt=0" kills a busy generator at version N
    held = [-1] * rl.generators  # broadcast: the version each generator slot holds
    sync = {"round": 0, "epoch": 0, "failed": 0}

    def make_work() -> Work:
        ids = pending.popleft() if pending else list(range(pos.cursor, pos.cursor + gen.prompts_per_call))
        pos.cursor = max(pos.cursor, ids[-1] + 1)
        budget = gen.max_new_tokens
        if gen.max_new_tokens_min:  # varied lengths, fixed per task so retried work keeps its budget
            budget = random.Random(f"{cfg.task.seed}:{ids[0]}").randint(gen.max_new_tokens_min, gen.max_new_tokens)
        pos.next_uid += 1
        return Work(pos.next_uid - 1, ids, [stream[i] for i in ids], budget)

    def out_of_time() -> bool:
        return bool(train.time_budget_s) and time.monotonic() - t0 > train.time_budget_s

    def checkpoint_due(v: int) -> bool:  # the final version is saved after the loop
        return train.checkpoint_due(v, train.steps) and v < train.steps

    def may_queue_step() -> bool:
        """Another step may be handed to the trainer: below rl.trainer_queue, within train.steps, and not behind a
        step whose version is checkpointed (the save must run with nothing queued behind it)."""
        ahead = version + len(steps)
        return len(steps) < rl.trainer_queue and ahead < train.steps and not (steps and checkpoint_due(ahead))

    def finish_step() -> None:
        """The oldest step at the trainer has returned: record it, publish its version, maybe checkpoint."""
        nonlocal version, trainer_busy, trainer_free_at, train_compute
        refs, batch, submitted = steps.popleft()
        stats = trainer.gather(refs)[0]
        now = time.monotonic()
        trainer_busy += now - max(submitted, trainer_free_at)  # a queued step's wait is not the trainer's idle
        trainer_free_at = now
        train_compute += stats["compute_s"]
        version = stats["version"]
        store.update(stats["published"])
        queue.step_done()
        if gen.interrupt:
            for c in pool.in_flight():
                pool.actors[c.index].call.remote("notify", (store.latest,), {})
        rows = [(it.uid, it.version, batch.version) for it in batch.items]
        trained.extend(rows)
        trained_tasks.extend(i for it in batch.items for i in it.task_ids)
        samples = sum(it.samples for it in batch.items)
        pos.samples_trained += samples
        reward = sum(float(it.rewards.sum()) for it in batch.items) / samples
        wall = now - t0
        record = {"reward": reward, "dropped": sum(r.prompts for r in queue.dropped), "wall_s": wall,
                  **watch.step(version, batch.items),
                  "reward_errors": sum(len(it.reward_failures) for it in batch.items),
                  **mean_extras([it.reward_extras for it in batch.items], "reward_"),
                  "samples_per_s": (pos.samples_trained - hello["meta"].get("samples_trained", 0)) / wall,
                  "gen_idle_share": 1 - _busy_share(busy, since, pool, now) / (rl.generators * wall),
                  "trainer_idle_share": 1 - trainer_busy / wall,
                  "completion_len": sum(it.completion_tokens for it in batch.items) / samples,
                  "stop_rate": sum(_finished(it) for it in batch.items) / samples,
                  "weight_sync_bytes": stats["published"].num_bytes,
                  **{f"staleness_{s}": batch.staleness.get(s, 0) for s in range(rl.eta + 1)},
                  **{k: stats[k] for k in ("loss", "is_weight", "truncated_frac", "clip_frac",
                                           "behaviour_kl", "grad_norm", "updated", "step_kl")}}
        metrics.log(version, **record)
        history.append({"version": version, **record})
        for it in batch.items:
            for failure in it.reward_failures[:3]:
                print(f"[plait] reward.function failed on a sample ({failure.error}); it scored "
                      f"reward.on_error={cfg.reward.on_error}: {failure.sample}", flush=True)
        if cfg.prompts.eval_every and held_prompts and version % cfg.prompts.eval_every == 0:
            eval_due.add(version)
        if checkpoint_due(version):
            trainer.call("save", {**_meta(pos, pool, queue, retry, pending), "prompts_digest": digest})

    stopped = False
    while version < train.steps and not out_of_time():
        if job.stop_requested():  # Ctrl-C / SIGTERM: train what is queued, commit a checkpoint below, return
            stopped = True
            break
        if broadcast and not pool.in_flight() and min(held) < store.latest.version:
            sync_round(pool, hello["sync_address"], store.latest.version, held, sync, rl.weight_sync_timeout_s)
            continue
        for i in range(rl.generators):  # held-out scoring first, on a free generator
            if eval_due and pool.actors[i] is not None and not pool.in_flight(i) and \
                    (not broadcast or held[i] >= store.latest.version):
                eval_due.clear()  # scored with the newest weights: the tag is their version, not the one that was due
                pool.submit(i, "evaluate", held_prompts, store.latest, gen.max_new_tokens,
                            tag=EvalTag(store.latest.version))
                since[i] = time.monotonic()
        for i in range(rl.generators):  # keep every generator busy, within the staleness budget
            if pool.actors[i] is None or pool.in_flight(i) or not queue.may_issue(gen.prompts_per_call):
                continue
            if broadcast and held[i] < store.latest.version:
                continue  # waits for the next sync round (every generator idle)
            work = retry.popleft() if retry else make_work()
            queue.issued(work.uid, work.prompts)
            pool.submit(i, "generate", work, store.latest, tag=work)
            since[i] = time.monotonic()
        if not killed and inject("version", version, faults=faults, attempt=job.attempt):  # PLAIT_FAULTS="kill@..."
            victim = next((c.index for c in pool.in_flight()), None)
            if victim is not None:
                os.kill(pool.pids[victim], signal.SIGKILL)  # a real kill of its process, mid-generation
                killed = True
        dropped_before = len(queue.dropped)
        while may_queue_step():  # the step for version + len(steps), queued behind those in flight
            batch = queue.take(version + len(steps))
            if batch is None:
                break
            refs = trainer.submit("train_step", per_rank_args=rank_args(
                collate(batch.items, cfg.plan.dp, train.normalize, pad_id=hello["pad_id"]), cfg.plan))
            steps.append((refs, batch, time.monotonic()))
            most_queued = max(most_queued, len(steps))
        # wait on the head step's ranks still running: one that returned early must not wake the loop again and
        # again until all have (one that failed makes the step ready: gather raises)
        step_left = ray.wait(steps[0][0], num_returns=len(steps[0][0]), timeout=0)[1] if steps else []
        head_done = bool(steps) and (not step_left or trainer.ready(steps[0][0]))
        waiting = [c.ref for c in pool.in_flight()] + step_left
        if head_done:
            pass  # collected below without waiting
        elif not waiting:
            if len(queue.dropped) > dropped_before or (broadcast and min(held) < store.latest.version):
                continue  # stale rollouts made room: issue new work
            raise RuntimeError(f"RL loop stalled: nothing in flight and no batch to train at version {version} "
                               f"({len(queue.ready)} rollouts queued, outstanding {queue.outstanding} prompts)")
        elif not ray.wait(waiting, num_returns=1, timeout=rl.wait_timeout_s or None)[0]:
            running = [f"generate(uid {c.tag.uid}) on generator {c.index}" for c in pool.in_flight()]
            running += ["a training step"] if steps else []
            raise TimeoutError(f"nothing finished within rl.wait_timeout_s={rl.wait_timeout_s:g}s at version "
                               f"{version}; running: {', '.join(running)}. "
                               "Raise rl.wait_timeout_s if a step or generation legitimately takes longer")
        if head_done or (steps and trainer.ready(steps[0][0])):
            finish_step()
        while pool.in_flight():
            try:
                done = pool.next_done(timeout_s=0)
            except ActorLost as e:
                busy[e.index] += time.monotonic() - since[e.index]
                for call in e.lost:
                    if isinstance(call.tag, EvalTag):
                        eval_due.add(call.tag.version)  # scored again on another generator
                        continue
                    queue.lost(call.tag.uid)
                    retry.append(call.tag)
                    lost_works += 1
                pool.replace(e.index)
                held[e.index], sync["epoch"] = -1, sync["epoch"] + 1  # broadcast: a new member, a new group
                continue
            if done is None:
                break
            busy[done.index] += time.monotonic() - since[done.index]
            if isinstance(done.tag, EvalTag):
                evals.append(record_eval(metrics, done.tag.version, done.value))
                continue
            out: RolloutBatch = done.value
            gen_compute += out.gen_time_s
            made += out.samples if queue.put(out) else 0
    while steps:  # out of time with steps queued: they train, and the checkpoint holds them
        finish_step()
    wall, driver_cpu = time.monotonic() - t0, time.process_time() - cpu0
    end_busy = _busy_share(busy, since, pool, time.monotonic())
    checkpoint = trainer.call("save", {**_meta(pos, pool, queue, retry, pending), "prompts_digest": digest})[0]
    export = None if stopped else trainer.call("export")[0]  # outputs/hf_export when [export] asks (a folder policy)
    if held_prompts and cfg.prompts.eval_every and not stopped and (not evals or evals[-1]["version"] != version):
        if broadcast and min(held) < store.latest.version:  # the final weights reach the generators first
            sync_round(pool, hello["sync_address"], store.latest.version, held, sync, rl.weight_sync_timeout_s)
        evals.extend(final_eval(pool, held_prompts, store, gen.max_new_tokens, metrics, version))
    metrics.close()
    staleness = Counter()
    for _, made_by, at in trained:
        staleness[at - made_by] += 1
    return {
        "start_version": start_version, "version": version, "steps_run": version - start_version,
        "eta": rl.eta, "loss": train.loss, "checkpoint": checkpoint, "export": export,
        "rewards": [h["reward"] for h in history], "walls": [h["wall_s"] for h in history],
        "stop_rates": [h["stop_rate"] for h in history],
        "trained": trained, "trained_tasks": trained_tasks, "attempt": job.attempt,
        "start_position": {k: hello["meta"].get(k) for k in ("cursor", "next_uid", "pending", "samples_trained")},
        "dropped": [(r.uid, r.version) for r in queue.dropped], "duplicates": queue.duplicates,
        "issued_uids": pos.next_uid, "lost_works": lost_works, "generator_restarts": list(pool.restarts),
        "staleness": dict(sorted(staleness.items())), "samples_made": made,
        "samples_trained": pos.samples_trained - hello["meta"].get("samples_trained", 0),
        "samples_per_s": (pos.samples_trained - hello["meta"].get("samples_trained", 0)) / wall,
        "gen_busy_share": end_busy / (rl.generators * wall), "gen_compute_share": gen_compute / (rl.generators * wall),
        "trainer_busy_share": trainer_busy / wall, "loop_s": wall,
        "train_step_s": train_compute / max(1, version - start_version),
        "gen_s_per_sample": gen_compute / max(1, made), "startup_s": t0 - started,
        "driver_cpu_s": driver_cpu, "samples_received": made,
        "warm_losses": hello["warm_losses"], "weights_published": store.published,
        "weight_sync_bytes": store.latest.num_bytes, "model_bytes": hello.get("model_bytes"),
        "losses": [h["loss"] for h in history], "weight_sync": rl.weight_sync, "sync_rounds": sync["round"],
        "sync_rounds_failed": sync["failed"], "most_steps_queued": most_queued,
        "evals": evals, "answer_entropy": [h["answer_entropy"] for h in history],
        "distinct_answers": [h["distinct_answers"] for h in history], "collapsed": watch.warned, "stopped": stopped,
    }


def mean_extras(parts: list[dict], prefix: str) -> dict[str, float]:
    """The mean of each numeric extra a dict reward returned (``{"score": 1.0, "format_ok": 1}`` ->
    ``reward_format_ok``), over the samples that carried it; ``parts``: (sum, count) per key."""
    totals: dict[str, list[float]] = {}
    for part in parts:
        for key, (total, n) in part.items():
            acc = totals.setdefault(key, [0.0, 0])
            acc[0], acc[1] = acc[0] + total, acc[1] + n
    return {f"{prefix}{key}": total / n for key, (total, n) in sorted(totals.items()) if n}


def record_eval(metrics, version: int, result: dict) -> dict:
    """A held-out scoring's figures into the metrics (at the version it scored) and the run's history."""
    rewards = result["rewards"]
    n = max(1, len(rewards))
    row = {"version": version, "eval_pass_at_1": sum(r >= 1.0 for r in rewards) / n, "eval_reward": sum(rewards) / n,
           "eval_finished": sum(result["finished"]) / n, "eval_reward_errors": result.get("reward_errors", 0)}
    row.update(mean_extras([result.get("extras", {})], "eval_reward_"))
    answers = diversity(result["texts"])  # of the greedy answers: a collapse to one answer shows here too
    row.update(eval_distinct_answers=answers["distinct_answers"], eval_answer_entropy=answers["answer_entropy"])
    metrics.log(version, **{k: v for k, v in row.items() if k != "version"})
    return {**row, "samples": list(zip(result["texts"][:8], rewards[:8], strict=False))}


def final_eval(pool, held: list, store, max_new_tokens: int, metrics, version: int) -> list[dict]:
    """The held-out score of the final weights, on the first free generator (object store) or generator 0, after
    any scoring still in flight (returned first)."""
    index = next((i for i in range(len(pool.actors)) if pool.actors[i] is not None and not pool.in_flight(i)), 0)
    earlier = []
    while pool.in_flight():  # rollouts still running are not trained (the checkpoint holds them as pending)
        done = pool.next_done(timeout_s=None)
        if done is not None and isinstance(done.tag, EvalTag) and done.tag.version < version:
            earlier.append(record_eval(metrics, done.tag.version, done.value))  # a held-out score in flight
    pool.submit(index, "evaluate", held, store.latest, max_new_tokens, tag=EvalTag(version))
    done = pool.next_done(timeout_s=None)
    return [*earlier, record_eval(metrics, version, done.value)]


def _finished(item: RolloutBatch) -> int:
    """Completions of ``item`` that emitted the stop token within their budget."""
    return int(item.finished.sum()) if item.finished is not None else item.samples


def _busy_share(busy: list[float], since: list[float], pool, now: float) -> float:
    """Generator-seconds with work in flight, counting calls still running up to ``now``."""
    return sum(b + (now - since[i] if pool.in_flight(i) else 0.0) for i, b in enumerate(busy))


def _meta(pos: Position, pool, queue: StalenessQueue, retry, pending) -> dict:
    """The controller's position: work in flight, queued or waiting to be retried is pending (re-issued
    first on resume); only trained work is done."""
    untrained = [c.tag.task_ids for c in pool.in_flight()] + [r.task_ids for r in queue.ready] + \
        [w.task_ids for w in retry] + [list(ids) for ids in pending]
    return {"cursor": pos.cursor, "next_uid": pos.next_uid, "pending": untrained,
            "samples_trained": pos.samples_trained}


def summarize(cfg: Config, run_dir: Path, result: dict) -> dict:
    rewards = result["rewards"]
    head = rewards[: max(1, len(rewards) // 10)]
    tail = rewards[-max(1, len(rewards) // 10):]
    out = dict(result)
    out.update(first_reward=sum(head) / len(head) if head else None,
               last_reward=sum(tail) / len(tail) if tail else None, trained_items=len(result["trained"]),
               dropped_items=len(result["dropped"]))
    if result["evals"]:
        out.update(eval_pass_at_1_start=result["evals"][0]["eval_pass_at_1"],
                   eval_pass_at_1_end=result["evals"][-1]["eval_pass_at_1"])
    return out
