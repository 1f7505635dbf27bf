"""Stopping a run cleanly: Ctrl-C (SIGINT) or SIGTERM (what Slurm and Kubernetes send before preemption).

On the driver, ``StopOnSignal`` turns the first signal into a request: the ranks learn it through Ray's
key-value store (their heartbeat thread looks every beat, runtime/watchdog.py), and a training loop that
asks ``ctx.stop_requested()`` after each step commits a checkpoint at that step boundary and returns.
The driver waits for them up to ``workers.stop_grace_s``; then, or at a second signal, it stops at once
(``RunStopped``: the ranks are torn down). Either way the run ends with one line naming the last
committed checkpoint and the command that continues it (``train.resume=latest``), and exit code 130
(SIGINT) or 143 (SIGTERM). A signal while no rank runs (connecting, building data, between restarts)
stops at once.

Under torchrun and mpirun there is no driver: each rank process gets the signal itself and
``stop_on_signal_in_rank`` sets the same flag ``ctx.stop_requested()`` reads.
"""

from __future__ import annotations

import _thread
import json
import shlex
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from plait.runtime.context import StopFlag
from plait.runtime.driver_log import say

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, as a shell reports it
NAMESPACE = "plait"


def stop_key(run_id: str) -> str:
    """The key in Ray's KV store (namespace "plait") whose presence asks this run's ranks to stop."""
    return f"stop/{run_id}"


@dataclass
class StopRequest:
    signal: str  # "SIGINT" or "SIGTERM"
    at: str  # local time it arrived

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal, 1)

    @property
    def label(self) -> str:
        return "Ctrl-C (SIGINT)" if self.signal == "SIGINT" else self.signal


class RunStopped(Exception):
    """The run stopped on a signal before its ranks returned (a second signal, the grace period over, or no
    rank running yet). ``request``: which signal; ``how``: what happened."""

    def __init__(self, request: StopRequest, how: str):
        super().__init__(f"stopped by {request.label}: {how}")
        self.request, self.how = request, how


def resume_command(command: list[str]) -> str:
    """The command line that continues a run: the original one, its ``train.resume=...`` replaced by
    ``train.resume=latest``."""
    kept = [arg for arg in command if not arg.startswith("train.resume=")]
    return shlex.join([*kept, "train.resume=latest"])


def stop_line(stopped: dict) -> str:
    """The one line a stopped run ends with: why, its last committed checkpoint, the command that continues it."""
    checkpoint = stopped.get("checkpoint")
    where = f"last committed checkpoint {checkpoint}" if checkpoint else "no checkpoint committed yet"
    label = "Ctrl-C (SIGINT)" if stopped["signal"] == "SIGINT" else stopped["signal"]
    return f"stopped by {label}: {stopped['how']}; {where}; continue with: {stopped['continue_with']}"


class StopOnSignal:
    """The driver's SIGINT/SIGTERM handlers for one run (installed from the main thread; elsewhere a no-op).

    ``running()`` marks the spans where ranks run and can stop at a step boundary; a signal outside them stops
    the run at once (``RunStopped``). ``requested`` is the first signal's ``StopRequest`` (None: none came)."""

    def __init__(self, key: str, grace_s: float):
        self.key, self.grace_s = key, grace_s
        self.requested: StopRequest | None = None
        self.armed = False
        self.forced: RunStopped | None = None  # the stop decided by a signal handler (raised as KeyboardInterrupt)
        self._timer_fired = False
        self._previous: dict[int, Any] = {}
        self._returned = threading.Event()  # the ranks returned: the grace timer has nothing to do

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._returned.set()
        if self.requested is not None:
            self._publish(delete=True)

    def running(self) -> "_Running":
        """``with stop.running():`` around a span where ranks run (a group's call, a control function)."""
        return _Running(self)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = StopRequest(name, time.strftime("%Y-%m-%dT%H:%M:%S"))
            if self.armed:
                self._returned.clear()
                threading.Thread(target=self._ask_ranks, name="plait-stop", daemon=True).start()
                return
            self._stop_now("no rank was running yet")
        if self._timer_fired:  # the grace period ended (interrupt_main below), not a second signal
            self._timer_fired = False
            if not self.armed:
                return  # the ranks returned meanwhile
            self._stop_now(f"the ranks did not stop within workers.stop_grace_s={self.grace_s:g}s and were torn down")
        self._stop_now(f"a second {name} stopped it at once; the ranks were torn down" if self.armed else
                       "no rank was running")

    def _stop_now(self, how: str) -> None:
        """Unwind the driver now. The handler may run inside a Ray call, which turns any exception but
        KeyboardInterrupt into a SystemError: so KeyboardInterrupt it is, and ``forced`` says what it means
        (``run_job`` raises it in its place)."""
        self.forced = RunStopped(self.requested, how)
        raise KeyboardInterrupt(str(self.forced))

    def stopped_by(self) -> RunStopped:
        """What a KeyboardInterrupt that unwound the run means: the stop this handler decided (or, had it not
        decided one, a Ctrl-C)."""
        if self.forced is not None:
            return self.forced
        return RunStopped(self.requested or StopRequest("SIGINT", time.strftime("%Y-%m-%dT%H:%M:%S")), "interrupted")

    def _ask_ranks(self) -> None:
        again = "Ctrl-C again" if self.requested.signal == "SIGINT" else "a second signal"
        say(f"{self.requested.label}: asking the ranks to commit a checkpoint at their next step and stop; waiting "
            f"up to workers.stop_grace_s={self.grace_s:g}s ({again} stops at once)")
        self._publish()
        if not self._returned.wait(self.grace_s) and self.armed:
            self._timer_fired = True
            _thread.interrupt_main(signal.SIGINT)  # runs _on_signal in the main thread: RunStopped there

    def _publish(self, delete: bool = False) -> None:
        try:
            from ray.experimental import internal_kv

            if delete:
                internal_kv._internal_kv_del(self.key, namespace=NAMESPACE)
            else:
                internal_kv._internal_kv_put(self.key, json.dumps(vars(self.requested)), overwrite=True,
                                             namespace=NAMESPACE)
        except Exception as e:  # noqa: BLE001 - Ray is gone: nothing runs that could read it
            if not delete:
                say(f"could not tell the ranks to stop ({type(e).__name__}: {e}); they will be torn down")


class _Running:
    def __init__(self, stop: StopOnSignal):
        self.stop = stop

    def __enter__(self) -> None:
        if self.stop.requested is not None:  # asked before the ranks started: they would not see it in time
            self.stop.forced = RunStopped(self.stop.requested, "no rank was running yet")
            raise self.stop.forced
        self.stop.armed = True

    def __exit__(self, *exc: Any) -> None:
        self.stop.armed = False
        self.stop._returned.set()


ECHO_S = 5.0  # under torchrun/mpirun a signal to the whole job reaches a rank twice: directly and from its launcher


def stop_on_signal_in_rank(flag: StopFlag) -> None:
    """Under torchrun or mpirun: SIGTERM and SIGINT set ``flag`` (what ``ctx.stop_requested()`` reads). A signal
    within ``ECHO_S`` of the first is the same request (Ctrl-C reaches the ranks and torchrun, which then sends
    them SIGTERM); a later one ends the process at once (KeyboardInterrupt / SystemExit 143)."""
    first: list[float] = []

    def handler(signum: int, frame: Any) -> None:
        if not flag.is_set():
            flag.set(signal.Signals(signum).name)
            first.append(time.monotonic())
            print(f"[plait] {signal.Signals(signum).name}: this rank commits a checkpoint at its next step and "
                  "stops (a second signal stops it at once)", flush=True)
            return
        if first and time.monotonic() - first[0] < ECHO_S:
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(EXIT_CODES["SIGTERM"])

    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, handler)
