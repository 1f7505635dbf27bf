"""Bounded staleness between generators and the trainer: admission of new work, a bounded queue, and the
filter that never lets a sample older than ``eta`` weight versions into a training step. Pure logic, no Ray.

    q = StalenessQueue(eta=2, batch_prompts=16)
    if q.may_issue(work.prompts):                 # admission: at most (eta + 1) batches outstanding
        q.issued(work.uid, work.prompts)          # ... submit to a generator
    q.put(result)                                 # a finished rollout (uid, version, prompts); False if a duplicate
    batch = q.take(trainer_version)               # None until a full batch of fresh prompts is queued
    ...train on batch.items...
    q.step_done()                                 # the oldest step's prompts leave the outstanding count

Steps may be queued at the trainer ahead of time: while n steps are training, ``take(trainer_version + n)``
chooses the batch for the step that will run at that version, with staleness counted against it (and what
is too stale for it is dropped: it would be for every later step too); ``step_done`` retires steps in order.

Versions: the trainer's weights after k optimizer steps are version k; a step taken at version k trains
on a rollout made by version v with staleness k - v. ``take(k)`` drops (and counts, never trains on) every
queued rollout with k - v > eta, then hands out exactly ``batch_prompts`` prompts, oldest version first
(uid order within a version), or None if fewer fresh prompts are queued: the trainer waits.

Admission (AReaL's rule): new work may be issued while the prompts outstanding (in flight on a generator,
queued, or in the steps trained or queued at the trainer) stay within ``capacity`` (default
``(eta + 1) * batch_prompts``).
Work issued at the newest version k is then trained at version k + eta at the latest when generators
finish in order, so drops are rare; the filter in ``take`` is the guarantee whatever the order. With
``eta = 0`` this is the synchronous baseline: nothing is issued while a step trains, every batch is made
entirely by the weights the trainer holds, and the trainer waits for the whole batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol


class Rollout(Protocol):
    uid: int  # the work item's id: unique over a run, reused when lost work is issued again
    version: int  # the (oldest) weight version that produced it
    prompts: int  # prompt groups it holds


@dataclass
class Batch:
    items: list[Any]  # the rollouts to train on, oldest version first
    version: int  # the trainer version the step is taken at
    staleness: Counter  # prompts per staleness (version - item.version)


@dataclass
class StalenessQueue:
    eta: int
    batch_prompts: int
    capacity: int = 0  # prompts outstanding at most (in flight + queued + training); 0: (eta + 1) * batch_prompts
    in_flight: dict[int, int] = field(default_factory=dict)  # uid -> prompts, issued and not returned
    ready: list[Any] = field(default_factory=list)  # returned, not yet trained or dropped
    training: list[int] = field(default_factory=list)  # prompts per step being trained (or queued), oldest first
    taken_version: int = -1  # the version of the last batch taken
    seen: set[int] = field(default_factory=set)  # uids ever put (a second put of one is refused)
    dropped: list[Any] = field(default_factory=list)  # every rollout dropped for staleness
    duplicates: int = 0  # puts refused because the uid was seen already

    def __post_init__(self) -> None:
        if self.eta < 0:
            raise ValueError(f"eta={self.eta}: the staleness bound is a number of versions >= 0 (0 = synchronous)")
        if self.batch_prompts < 1:
            raise ValueError(f"batch_prompts={self.batch_prompts}: a training step needs at least one prompt")
        self.capacity = self.capacity or (self.eta + 1) * self.batch_prompts
        if self.capacity < self.batch_prompts:
            raise ValueError(f"capacity={self.capacity} prompts is less than one batch ({self.batch_prompts}): the "
                             "trainer could never fill a step; raise it or leave it 0 for (eta + 1) batches")

    @property
    def outstanding(self) -> int:
        """Prompts issued and not yet trained or dropped."""
        return sum(self.in_flight.values()) + sum(r.prompts for r in self.ready) + sum(self.training)

    def may_issue(self, prompts: int) -> bool:
        return self.outstanding + prompts <= self.capacity

    def issued(self, uid: int, prompts: int) -> None:
        if uid in self.in_flight or uid in self.seen:
            raise ValueError(f"work uid {uid} was issued already: give every work item its own uid")
        self.in_flight[uid] = prompts

    def lost(self, uid: int) -> None:
        """The work ``uid`` died with its generator: it no longer counts until it is issued again."""
        self.in_flight.pop(uid, None)

    def put(self, rollout: Any) -> bool:
        """Queue a finished rollout; False (and counted in ``duplicates``) when its uid was put before or was
        never issued, so no sample is trained twice."""
        if rollout.uid in self.seen or rollout.uid not in self.in_flight:
            self.duplicates += 1
            return False
        del self.in_flight[rollout.uid]
        self.seen.add(rollout.uid)
        self.ready.append(rollout)
        return True

    def take(self, version: int) -> Batch | None:
        """Drop what is too stale for a step at ``version`` (into ``dropped``), then hand out a full batch,
        oldest first, or None when fewer fresh prompts are queued."""
        if self.training and version != self.taken_version + 1:
            raise RuntimeError(f"take({version}): the step at version {self.taken_version} is still training; call "
                               f"step_done() when it finishes, or take({self.taken_version + 1}) for the step after it")
        too_old = [r for r in self.ready if version - r.version > self.eta]
        newer = [r for r in self.ready if r.version > version]
        if newer:
            raise ValueError(f"rollouts {[r.uid for r in newer][:8]} have versions {[r.version for r in newer][:8]} "
                             f"newer than the trainer's {version}: the versions come from another run")
        self.dropped.extend(too_old)
        self.ready = sorted((r for r in self.ready if version - r.version <= self.eta),
                            key=lambda r: (r.version, r.uid))
        chosen, total = [], 0
        for r in self.ready:
            if total + r.prompts <= self.batch_prompts:
                chosen.append(r)
                total += r.prompts
            if total == self.batch_prompts:
                break
        if total < self.batch_prompts:
            return None
        taken = {id(r) for r in chosen}
        self.ready = [r for r in self.ready if id(r) not in taken]
        self.training.append(total)
        self.taken_version = version
        staleness = Counter()
        for r in chosen:
            staleness[version - r.version] += r.prompts
        return Batch(chosen, version, staleness)

    def step_done(self) -> None:
        """The oldest step in training finished: its prompts are no longer outstanding."""
        if not self.training:
            raise RuntimeError("step_done() with no step taken: take() a batch first")
        self.training.pop(0)
