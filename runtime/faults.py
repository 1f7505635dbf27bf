"""Fault injection for tests: one hook, set from outside by ``PLAIT_FAULTS``, never a knob in a job's config.

    PLAIT_FAULTS="exit@step=4,rank=1,attempt=0"          # rank 1 dies (os._exit) after step 4, first attempt only
    PLAIT_FAULTS="sleep@step,seconds=0.5"                 # every rank sleeps after every step (a slow trainer)
    PLAIT_FAULTS="pidfile@start,rank=0,path=pids.txt"    # rank 0 writes "<attempt> <pid>" to run_dir/pids.txt
    PLAIT_FAULTS="kill@version=3,attempt=0"               # the RL controller SIGKILLs a busy generator at version 3
    PLAIT_FAULTS="hang@step=2,rank=0; raise@step=5"       # several, separated by ';'

A fault is ``ACTION@POINT[=N],KEY=VALUE,...``. The code that owns a point calls ``inject(POINT, N, **facts)``
there: the training loop (runtime/trainer.py) after each step (``step``) and once before the first
(``start``), the RL controller per weight version (``version``). A fault fires when its POINT matches, its N
(if given) equals the point's value, and every other key that names a fact (``rank``, ``attempt`` ...) equals
it; the remaining keys are the action's arguments. Actions: ``exit`` (os._exit(17): a crashed process, no
cleanup), ``raise`` (RuntimeError: a bug in the job), ``hang`` (sleeps for ``seconds``, default a day),
``sleep`` (``seconds``), ``pidfile`` (``path`` under ``run_dir``, written atomically) and ``kill`` (returned
to the caller, which does the killing: only it knows which process to kill).

The driver forwards ``PLAIT_FAULTS`` to every rank and actor it starts (runtime/job.py), so a test sets it in
the driver's environment and nothing in a spec changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from plait.storage.folders import write_atomic

ENV = "PLAIT_FAULTS"
ACTIONS = ("exit", "raise", "hang", "sleep", "pidfile", "kill")
FACTS = ("rank", "attempt", "index")  # keys that select where a fault fires; the rest are arguments


@dataclass(frozen=True)
class Fault:
    action: str
    point: str
    at: int | None = None  # the point's value it fires at (None: every time)
    where: dict[str, int] = field(default_factory=dict)  # facts that must match
    args: dict[str, str] = field(default_factory=dict)

    def matches(self, point: str, value: int | None, facts: dict[str, int]) -> bool:
        if point != self.point or (self.at is not None and value != self.at):
            return False
        return all(facts.get(k) == v for k, v in self.where.items())


def parse_faults(text: str) -> list[Fault]:
    """The faults of a ``PLAIT_FAULTS`` value (see the module docstring); ValueError naming a malformed one."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        head, *pairs = [p.strip() for p in item.split(",")]
        action, sep, point = head.partition("@")
        if not sep or action not in ACTIONS or not point:
            raise ValueError(f"{ENV}: {item!r} is not ACTION@POINT[=N],KEY=VALUE... with ACTION one of "
                             f"{', '.join(ACTIONS)} (e.g. 'exit@step=4,rank=1')")
        point, _, at = point.partition("=")
        where, args = {}, {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"{ENV}: {pair!r} in {item!r} is not KEY=VALUE")
            if key in FACTS:
                where[key] = int(value)
            else:
                args[key] = value
        out.append(Fault(action, point, int(at) if at else None, where, args))
    return out


def active_faults(env: dict[str, str] | None = None) -> list[Fault]:
    return parse_faults((env if env is not None else os.environ).get(ENV, ""))


def forwarded_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """What the driver passes on to the ranks and actors it starts: ``PLAIT_FAULTS`` when it is set."""
    value = (env if env is not None else os.environ).get(ENV, "")
    return {ENV: value} if value else {}


def inject(point: str, value: int | None = None, *, run_dir: str | Path | None = None,
           faults: list[Fault] | None = None, **facts: int) -> list[Fault]:
    """Carry out the faults that match here; returns the ``kill`` faults that matched (for the caller)."""
    todo = [f for f in (faults if faults is not None else active_faults()) if f.matches(point, value, facts)]
    kills = []
    for fault in todo:
        if fault.action == "exit":
            os._exit(17)  # a crashed worker process: no Python cleanup, no exception
        elif fault.action == "raise":
            raise RuntimeError(f"fault injected by {ENV} at {point}={value}")
        elif fault.action in ("sleep", "hang"):
            time.sleep(float(fault.args.get("seconds", 86400 if fault.action == "hang" else 1)))
        elif fault.action == "pidfile":
            write_atomic(Path(run_dir or ".") / fault.args.get("path", "pids.txt"),
                         f"{facts.get('attempt', 0)} {os.getpid()}\n")
        elif fault.action == "kill":
            kills.append(fault)
    return kills
