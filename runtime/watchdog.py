"""Hung-rank detection, C4-style: each rank publishes its step progress; the driver learns the step-time
rhythm and names the rank that stops keeping it.

In a rank (runtime/rank_actor.py), ``Heartbeat`` holds the step counter the train loop bumps through
``ctx.step_done(step)`` (a plain attribute write, free) and a daemon thread that, every ``beat_s``,
looks whether the driver asked the run to stop (runtime/stop.py) and writes one small record into
Ray's GCS key-value store: the beat count, the last step, the rank's own
median step time, and where its training thread is now (``phase``: "compute", "collective" inside a
torch.distributed call, or "checkpoint" inside plait's Checkpointer). The channel works while the
rank's actor is busy training, and a dead process or a frozen node simply stops beating.

On the driver (runtime/worker_group.py), ``Watchdog`` reads the records between bounded waits on the
ranks' calls. A rank is hung when its step has not advanced for longer than its allowance:
``first_step_s`` until the group has a rhythm (start-up, compile, checkpoint load), then
``max(floor_s, factor * median step time)``, and ``checkpoint_s`` while it is inside a checkpoint
save. The rank named is the one that stands out: behind the others' step, or the one not waiting in
a collective while its peers wait for it, or silent (no heartbeat: dead or frozen). A job that never
calls ``ctx.step_done`` is not watched (``workers.call_timeout_s`` still bounds its calls); one that
calls ``ctx.step_done(start_step)`` once before its loop has its start-up watched too.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from plait.runtime.context import StopFlag

NAMESPACE = "plait"
_COLLECTIVE_FILES = ("torch/distributed/distributed_c10d.py", "torch/distributed/c10d_logger.py",
                     "deepspeed/comm/")
_CHECKPOINT_FILES = ("runtime/checkpoint.py", "runtime/checkpoint_store.py")


@dataclass
class WatchdogConfig:
    """The spec's ``[watchdog]`` table."""

    enabled: bool = True
    floor_s: float = 60.0  # a rank is never called hung sooner than this after its last step
    factor: float = 10.0  # ... nor sooner than factor x the median step time
    first_step_s: float = 600.0  # allowance before the group has a rhythm: start-up, compile, checkpoint load
    checkpoint_s: float = 1800.0  # allowance while a rank is inside a checkpoint save (writes, uploads)
    beat_s: float = 1.0  # how often each rank publishes its record

    def check(self) -> None:
        for name in ("floor_s", "factor", "first_step_s", "checkpoint_s", "beat_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"watchdog.{name}={getattr(self, name)}: must be > 0 (set watchdog.enabled=false "
                                 "to turn hang detection off)")
        if self.beat_s * 3 > self.floor_s:
            raise ValueError(f"watchdog.beat_s={self.beat_s} must be at most a third of watchdog.floor_s="
                             f"{self.floor_s}, or a live rank could look hung between two heartbeats")


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def where_is(thread_id: int | None) -> tuple[str, str]:
    """``(phase, location)`` of a thread: "collective" (in a torch.distributed call), "checkpoint" (in a
    plait checkpoint save or load) or "compute", and the innermost frame of user code as file:line (function)."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None  # noqa: SLF001
    if frame is None:
        return "idle", ""
    phase, location, collective = "compute", "", ""
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if any(part in name for part in _CHECKPOINT_FILES):
            phase = "checkpoint"
        elif any(part in name for part in _COLLECTIVE_FILES):
            collective = collective or frame.f_code.co_name
        elif not location and "/threading.py" not in name:
            location = f"{os.path.basename(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    if phase != "checkpoint" and collective:
        phase, location = "collective", f"{collective} at {location}"
    return phase, location


class Heartbeat:
    """In a rank: the step counter and the thread that publishes it under ``key`` (None: the watchdog is off) and,
    when the job can be stopped (``stop_key``), looks whether the driver asked the ranks to stop (runtime/stop.py):
    then ``stop_flag`` is set."""

    def __init__(self, key: str | None, rank: int, node_id: str, beat_s: float, stop_key: str | None = None):
        self.key, self.rank, self.node_id, self.beat_s, self.stop_key = key, rank, node_id, beat_s, stop_key
        self.stop_flag = StopFlag()
        self.step: int | None = None
        self.intervals: deque[float] = deque(maxlen=32)
        self._last_at: float | None = None
        self._thread_id: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="plait-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self) -> None:
        """The calling thread is the one training (the actor calls this before the user's code runs)."""
        self._thread_id = threading.get_ident()

    def step_done(self, step: int) -> None:
        now = time.monotonic()
        if self._last_at is not None and self.step is not None and step > self.step:
            self.intervals.append(now - self._last_at)
        self.step, self._last_at = step, now

    def record(self, beat: int) -> dict:
        phase, location = where_is(self._thread_id)
        return {"rank": self.rank, "pid": os.getpid(), "node_id": self.node_id, "beat": beat, "step": self.step,
                "step_s": statistics.median(self.intervals) if self.intervals else None,
                "phase": phase, "where": location}

    def _loop(self) -> None:
        beat = 0
        while not self._stop.wait(self.beat_s if beat else 0):
            beat += 1
            try:
                if self.key is not None:
                    _kv()._internal_kv_put(self.key, json.dumps(self.record(beat)), overwrite=True,
                                           namespace=NAMESPACE)
                if self.stop_key is not None and not self.stop_flag.is_set() and \
                        _kv()._internal_kv_get(self.stop_key, namespace=NAMESPACE) is not None:
                    self.stop_flag.set("driver")
            except Exception:  # noqa: BLE001 - the GCS is briefly unreachable: the driver sees a missed beat
                pass

    def stop(self) -> None:
        """End the thread (it finishes its beat first: no KV call is left running)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.beat_s + 10)

    def __reduce__(self):  # a RankContext sent elsewhere (returned, pickled) carries no heartbeat
        return type(None), ()


@dataclass
class Seen:
    """What the driver last saw of one rank, on its own clock."""

    record: dict
    step_at: float  # when its step last advanced (or the call started)
    beat_at: float  # when its beat count last advanced


@dataclass
class Hang:
    ranks: list[int]
    message: str


@dataclass
class Watchdog:
    """On the driver: reads the group's heartbeats and decides whether a rank is hung."""

    prefix: str
    world_size: int
    cfg: WatchdogConfig
    seen: dict[int, Seen] = field(default_factory=dict)
    call_at: float = field(default_factory=time.monotonic)

    def key(self, rank: int) -> str:
        return f"{self.prefix}/{rank}"

    @property
    def armed(self) -> bool:
        """Only a job that reports steps is watched."""
        return self.cfg.enabled and any(s.record.get("step") is not None for s in self.seen.values())

    def call_started(self) -> None:
        """A call was sent to the ranks: idle time before it is no stall."""
        self.call_at = time.monotonic()
        for s in self.seen.values():
            s.step_at = max(s.step_at, self.call_at)

    def poll(self) -> None:
        now, kv = time.monotonic(), _kv()
        for rank in range(self.world_size):
            raw = kv._internal_kv_get(self.key(rank), namespace=NAMESPACE)
            if raw is None:
                continue
            record, old = json.loads(raw), self.seen.get(rank)
            if old is None:
                self.seen[rank] = Seen(record, max(now, self.call_at) if record["step"] is None else now, now)
                continue
            if record["beat"] != old.record["beat"]:
                old.beat_at = now
            if record["step"] != old.record["step"]:
                old.step_at = now
            old.record = record

    @property
    def has_rhythm(self) -> bool:
        """A rank has measured its step time (a rank's ``step_s`` never goes back to None)."""
        return any(s.record.get("step_s") is not None for s in self.seen.values())

    def timeout_s(self) -> float:
        if not self.has_rhythm:
            return self.cfg.first_step_s
        step_s = max(s.record["step_s"] for s in self.seen.values() if s.record.get("step_s") is not None)
        return max(self.cfg.floor_s, self.cfg.factor * step_s)

    def check(self, node_ips: list[str]) -> Hang | None:
        """Poll, then a ``Hang`` naming the rank(s) that stopped, or None."""
        self.poll()
        if not self.armed:  # no step rhythm: only a heartbeat that stopped (frozen process, lost node) counts
            return self._silent_hang(node_ips) if self.cfg.enabled else None
        now, timeout = time.monotonic(), self.timeout_s()
        stalled = []
        for rank in range(self.world_size):
            s = self.seen.get(rank)
            since = now - (s.step_at if s else self.call_at)
            allowance = self.cfg.checkpoint_s if s and s.record.get("phase") == "checkpoint" else timeout
            if since > allowance:
                stalled.append(rank)
        if not stalled:
            return None
        culprits = self.culprits()
        return Hang(culprits, self._message(culprits, node_ips, timeout, now))

    def _silent_hang(self, node_ips: list[str]) -> Hang | None:
        """For a job that reports no steps: a rank that published heartbeats and then went silent for
        ``floor_s`` while the call runs is hung (Ray has not noticed a death), so the driver's wait is bounded."""
        now = time.monotonic()
        gone = [r for r in self.silent(now) if r in self.seen and now - self.seen[r].beat_at > self.cfg.floor_s]
        if not gone:
            return None
        return Hang(gone, self._message(gone, node_ips, self.cfg.floor_s, now).replace(
            "no step progress", "no heartbeat"))

    def silent(self, now: float | None = None) -> list[int]:
        """Ranks whose heartbeat stopped (dead process, frozen or lost node) for 3 beats or more."""
        now = time.monotonic() if now is None else now
        limit = 3 * self.cfg.beat_s + 0.5
        return [r for r in range(self.world_size) if r not in self.seen or now - self.seen[r].beat_at > limit]

    def culprits(self) -> list[int]:
        """The rank(s) that stand out: silent ones; else those behind the others' step; else those not
        waiting in a collective while peers wait in one; else every rank."""
        silent = self.silent()
        if silent and len(silent) < self.world_size:
            return silent
        steps = {r: s.record.get("step") for r, s in self.seen.items()}
        known = [v for v in steps.values() if v is not None]
        if known and min(known) < max(known):
            return sorted(r for r, v in steps.items() if v is None or v < max(known))
        phases = {r: s.record.get("phase") for r, s in self.seen.items()}
        waiting = [r for r, p in phases.items() if p == "collective"]
        if waiting and len(waiting) < self.world_size:
            return sorted(r for r in range(self.world_size) if r not in waiting)
        return list(range(self.world_size))

    def _message(self, culprits: list[int], node_ips: list[str], timeout: float, now: float) -> str:
        lines = []
        for r in culprits:
            s = self.seen.get(r)
            rec = s.record if s else {}
            ip = node_ips[r] if r < len(node_ips) else "?"
            state = "silent (no heartbeat: process dead or frozen)" if r in self.silent(now) else \
                f"{rec.get('phase', '?')} at {rec.get('where') or '?'}"
            idle = now - (s.step_at if s else self.call_at)
            lines.append(f"rank {r} on node {ip} (node id {str(rec.get('node_id', '?'))[:12]}, pid "
                         f"{rec.get('pid', '?')}): no step progress for {idle:.0f}s after step {rec.get('step')}; "
                         f"{state}")
        others = [f"rank {r}: step {s.record.get('step')}, {s.record.get('phase')}"
                  for r, s in sorted(self.seen.items()) if r not in culprits]
        rhythm = (f"max(watchdog.floor_s={self.cfg.floor_s:g}, watchdog.factor={self.cfg.factor:g} x median step "
                  f"time)" if self.has_rhythm else f"watchdog.first_step_s={self.cfg.first_step_s:g} (no step "
                  "rhythm yet)")
        return (f"hung: {'; '.join(lines)}. Timeout {timeout:.1f}s = {rhythm}. Others: {', '.join(others) or 'none'}. "
                "The group was torn down; if the step legitimately takes this long, raise watchdog.floor_s "
                "(or watchdog.first_step_s for start-up)")

    def clear(self) -> None:
        try:
            _kv()._internal_kv_del(f"{self.prefix}/", del_by_prefix=True, namespace=NAMESPACE)
        except Exception:  # noqa: BLE001 - Ray may be shutting down; the keys are tiny
            pass
